"""ImageNet (ILSVRC-2012) from an ImageFolder tree: ``train/<class>/*`` and ``val/<class>/*`` in a data dir.

Images are decoded by torchvision's ImageFolder in DataLoader workers, with the standard ResNet
transforms: train ``RandomResizedCrop(224)`` + ``RandomHorizontalFlip``, val ``Resize(256)`` +
``CenterCrop(224)``. The transforms stop at uint8 tensors; the batch is normalized on the target device
(a quarter of the bytes to copy, and the device does the arithmetic).

Determinism: torchvision's random transforms draw from the global RNG, whose state in a worker depends
on which worker got which batch. Here the sampler hands each sample its own seed, drawn per global batch
from ``(seed, epoch, batch)``, and the crop and flip are drawn from a generator seeded with it: the
augmentation of a sample depends neither on the number of workers nor on where the epoch was resumed.

torchvision is imported only when this loader is built (it is the optional ``vision`` extra).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bame.data import DatasetSpec, Request, register
from bame.data.sharding import EpochPlan, check_epoch
from bame.data.transforms import Normalize
from bame.errors import DataError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
IMAGE_SIZE = 224
RESIZE = 256
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
SPLIT_DIRS = {"train": "train", "test": "val"}


def _torchvision() -> Any:
    try:
        import torchvision
    except ImportError as exc:
        raise DataError("the imagenet dataset needs torchvision; run: pip install 'bame[vision]'") from exc
    return torchvision


def _class_dirs(path: Path) -> list[str]:
    return sorted(entry.name for entry in path.iterdir() if entry.is_dir())


@functools.lru_cache(maxsize=2)
def scan(root: str) -> Any:
    """The scanned ImageFolder of one split (scanning ImageNet's 1.3M files takes a while: cached)."""
    try:
        return _torchvision().datasets.ImageFolder(root)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(
            f"cannot use {root} as an ImageFolder ({exc}); it needs <class>/<image> files"
        ) from exc


def locate(split: str, data_dir: Path) -> Path:
    """Check the tree (both splits, same classes) and return the split's directory.

    Raises:
        DataError: a missing ``train/`` or ``val/``, or different class folders in the two.
    """
    dirs = {name: data_dir / name for name in ("train", "val")}
    for name, path in dirs.items():
        if not path.is_dir():
            raise DataError(
                f"ImageNet {name}/ directory not found at {path}; --data-dir must hold train/<class>/* "
                "and val/<class>/* (val sorted into class folders)"
            )
    # ImageFolder numbers classes by sorted folder name: the splits must have the same folders.
    train_classes, val_classes = _class_dirs(dirs["train"]), _class_dirs(dirs["val"])
    if train_classes != val_classes:
        extra = sorted(set(train_classes) ^ set(val_classes))[:3]
        raise DataError(
            f"{dirs['train']} has {len(train_classes)} class folders and {dirs['val']} {len(val_classes)}, "
            f"not the same ones (e.g. {', '.join(extra)}); val images must be sorted into the train classes"
        )
    return dirs[SPLIT_DIRS[split]]


def random_resized_crop_box(width: int, height: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """``RandomResizedCrop.get_params`` (scale 0.08-1, ratio 3/4-4/3), drawing from ``generator``.

    Returns:
        ``(top, left, crop_height, crop_width)``.
    """
    area = width * height
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    for _ in range(10):
        u = torch.rand(2, generator=generator).tolist()
        target_area = area * (SCALE[0] + (SCALE[1] - SCALE[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    # Fallback, as torchvision: the largest centred crop with an aspect ratio inside the range.
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif in_ratio > RATIO[1]:
        w, h = int(round(height * RATIO[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class _SeededImages(Dataset):
    """ImageFolder samples transformed to uint8 ``[3, 224, 224]``; keys are ``(index, sample_seed)``.

    ``sample_seed < 0`` means evaluation (deterministic resize + centre crop).
    """

    def __init__(self, folder: Any, augment: bool) -> None:
        self.folder = folder
        self.augment = augment

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        functional = _torchvision().transforms.functional
        index, sample_seed = key
        path, label = self.folder.samples[index]
        try:
            image = self.folder.loader(path)
        except Exception as exc:  # noqa: BLE001 - any decoding failure is the file's fault
            raise DataError(f"cannot decode image {path} ({exc}); remove or replace it") from exc
        if self.augment and sample_seed >= 0:
            generator = torch.Generator().manual_seed(sample_seed)
            top, left, h, w = random_resized_crop_box(image.width, image.height, generator)
            image = functional.resized_crop(image, top, left, h, w, [IMAGE_SIZE, IMAGE_SIZE])
            if bool(torch.rand(1, generator=generator) < 0.5):
                image = functional.hflip(image)
        else:
            image = functional.center_crop(functional.resize(image, RESIZE), IMAGE_SIZE)
        return functional.pil_to_tensor(image), label


class PlanBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's batches of an :class:`EpochPlan` as lists of ``(index, sample_seed)`` keys.

    Its own sampler rather than ``DistributedSampler``, which pads the dataset with repeated samples and
    shards round-robin; this one follows the same plan as the in-memory loaders and can start mid-epoch.
    """

    def __init__(self, plan: EpochPlan, augment: bool) -> None:
        self.plan = plan
        self.augment = augment
        self.epoch = 0
        self.start_batch = 0

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for i, indices, lo, hi in self.plan.batches(self.epoch, self.start_batch):
            if self.augment:
                # Drawn for the whole global batch, then sliced: independent of the rank.
                seeds = torch.randint(
                    0, 2**62, (len(indices),), generator=self.plan.augment_generator(self.epoch, i)
                )
                seeds = seeds[lo:hi].tolist()
            else:
                seeds = [-1] * (hi - lo)
            yield list(zip(indices[lo:hi].tolist(), seeds, strict=True))


class ImageFolderLoader:
    """A :class:`~bame.data.loader.Loader` over an ImageFolder split, decoding in DataLoader workers.

    Args:
        root: the split directory (``train/`` or ``val/``).
        plan: the batch layout for this rank.
        augment: random resized crop + flip (train) or resize + centre crop (evaluation).
        workers: DataLoader worker processes (0 decodes in this process).
        device: where the batches go.
    """

    def __init__(
        self, root: Path, plan: EpochPlan, augment: bool, workers: int, device: torch.device | str
    ) -> None:
        self.root = root
        self.plan = plan
        self.batch_size = plan.batch_size
        self.device = torch.device(device)
        self.normalize = Normalize(255.0, MEAN, STD)
        self.folder = scan(str(root))
        self.sampler = PlanBatchSampler(plan, augment)
        self._loader = DataLoader(
            _SeededImages(self.folder, augment),
            batch_sampler=self.sampler,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            # The sampler runs in this process, so set_epoch reaches it; workers need not restart.
            persistent_workers=workers > 0,
        )

    @property
    def classes(self) -> list[str]:
        """The class folder names, in label order."""
        return list(self.folder.classes)

    @property
    def num_samples(self) -> int:
        """Samples per epoch over all ranks."""
        return self.plan.num_samples

    def __len__(self) -> int:
        return len(self.plan)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch and the global batch to start from (see :class:`~bame.data.loader.Loader`)."""
        check_epoch(epoch, start_batch, self.plan.num_global_batches)
        self.sampler.epoch, self.sampler.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            for images, labels in self._loader:
                x = images.to(self.device, non_blocking=True)
                yield self.normalize(x), labels.to(self.device, dtype=torch.int64, non_blocking=True)
        except DataError as exc:
            # A worker's error arrives with the worker's traceback in its text: keep its last line.
            lines = [line for line in str(exc).splitlines() if line.strip()]
            message = lines[-1].split("DataError: ", 1)[-1] if lines else "cannot load an image"
            raise DataError(message) from None

    def __repr__(self) -> str:
        return (
            f"ImageFolderLoader({self.root}, {len(self.folder.samples)} images, "
            f"batch_size={self.batch_size}, rank={self.plan.rank}/{self.plan.world_size}, "
            f"augment={self.sampler.augment}, device={self.device})"
        )


def _loader(request: Request) -> ImageFolderLoader:
    if request.download:
        raise DataError("ImageNet cannot be downloaded automatically; get it from image-net.org into --data-dir")
    split_dir = locate(request.split, request.root)
    folder = scan(str(split_dir))
    return ImageFolderLoader(split_dir, request.plan(len(folder.samples)), request.augment, request.workers,
                             request.device)


register(DatasetSpec("imagenet", "ImageNet ILSVRC-2012 from an ImageFolder tree (train/, val/)",
                     1000, 3, 224, "resnet50", None, None, _loader))
