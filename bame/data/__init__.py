"""Datasets: a registry of what can be trained on, and :func:`build_loader` to get deterministic batches.

>>> from bame.data import build_loader
>>> train = build_loader("digits", "train", batch_size=64)
>>> train.set_epoch(0)
>>> x, y = next(iter(train))      # x: float32 [64, 1, 8, 8] normalized, y: int64 [64]

Four datasets: ``digits`` (bundled with scikit-learn, the no-download demo), ``fashion-mnist`` (IDX
files), ``cifar10`` (the official pickled batches, downloadable) and ``imagenet`` (an ImageFolder tree).
The first three are held whole in memory and augmented batched on tensors (:class:`TensorLoader`);
ImageNet is decoded by DataLoader workers (:class:`~bame.data.imagenet.ImageFolderLoader`). Both follow
the :class:`Loader` protocol, with the same seeded shuffling and rank sharding.

Nothing is loaded when this package is imported, and torchvision is imported only for ImageNet.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path

import torch

from bame.data.loader import Loader, TensorLoader
from bame.data.sharding import EpochPlan
from bame.data.transforms import CropFlip, Normalize
from bame.errors import DataError

__all__ = [
    "DEFAULT_DATA_DIR",
    "DatasetSpec",
    "Loader",
    "TensorLoader",
    "available",
    "build_loader",
    "get_spec",
]

DEFAULT_DATA_DIR = Path("data")
"""Where datasets are looked for (and downloaded to) when no ``data_dir`` is given: ``./data``."""

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is, without loading it.

    Attributes:
        name: the registry name (``--dataset``).
        description: one line for ``--help`` and listings.
        num_classes: number of classes.
        in_channels: image channels.
        image_size: the side of the (square) images the network sees.
        default_model: the model the recipes train on it.
        train_size: images in the standard train split, or ``None`` when it depends on the files.
        test_size: images in the standard test split, or ``None`` when it depends on the files.
    """

    name: str
    description: str
    num_classes: int
    in_channels: int
    image_size: int
    default_model: str
    train_size: int | None
    test_size: int | None


_REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("digits", "scikit-learn's bundled 8x8 handwritten digits (no download)",
                    10, 1, 8, "smallcnn", 1437, 360),
        DatasetSpec("fashion-mnist", "Fashion-MNIST 28x28 clothing images (IDX files)",
                    10, 1, 28, "smallcnn", 60000, 10000),
        DatasetSpec("cifar10", "CIFAR-10 32x32 colour images (python batches, downloadable)",
                    10, 3, 32, "resnet32", 50000, 10000),
        DatasetSpec("imagenet", "ImageNet ILSVRC-2012 from an ImageFolder tree (train/, val/)",
                    1000, 3, 224, "resnet50", None, None),
    )
}  # fmt: skip


def available() -> dict[str, DatasetSpec]:
    """All datasets, by name, in a fixed order (smallest first).

    Returns:
        A new dict each call: changing it does not change the registry.
    """
    return dict(_REGISTRY)


def get_spec(name: str) -> DatasetSpec:
    """The spec of a dataset.

    Names are matched case-insensitively, with ``_`` taken as ``-`` (``Fashion_MNIST`` works).

    Raises:
        DataError: an unknown name; the message lists the valid ones.
    """
    key = str(name).strip().lower().replace("_", "-")
    if key not in _REGISTRY:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(_REGISTRY)}")
    return _REGISTRY[key]


def build_loader(
    name: str,
    split: str,
    *,
    batch_size: int,
    data_dir: str | Path | None = None,
    download: bool = False,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    device: str | torch.device = "cpu",
    augment: bool | None = None,
) -> Loader:
    """A deterministic, sharded loader over one split of a dataset.

    Args:
        name: a registry name (see :func:`available`).
        split: ``"train"`` (shuffled each epoch, last incomplete batch dropped) or ``"test"`` (file
            order, every sample once; ImageNet's ``val/``).
        batch_size: the global batch size; each rank gets ``batch_size // world_size`` per batch.
        data_dir: where the files are (default ``./data``); unused by ``digits``.
        download: fetch missing files (CIFAR-10 and Fashion-MNIST; ImageNet cannot be downloaded).
        seed: the run seed; with the epoch it fixes the order and the augmentation.
        rank: this process's rank, ``0 <= rank < world_size``.
        world_size: number of ranks sharing each global batch.
        workers: DataLoader worker processes for ImageNet; the in-memory datasets need none.
        device: where the batches are put (the in-memory datasets are moved there whole).
        augment: random augmentation; ``None`` means on for ``train``, off for ``test``.

    Returns:
        A :class:`Loader`; call ``set_epoch(epoch, start_batch)`` before iterating.

    Raises:
        DataError: an unknown dataset or split, invalid batch/rank settings, or missing or corrupt files.
    """
    spec = get_spec(name)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose 'train' or 'test'")
    for option, value in (
        ("batch_size", batch_size),
        ("seed", seed),
        ("rank", rank),
        ("world_size", world_size),
        ("workers", workers),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise DataError(f"{option} must be a non-negative integer, got {value!r}")
    # Check batch size, rank and world size now, before any file is read.
    EpochPlan(0, batch_size, shuffle=False, drop_last=False, rank=rank, world_size=world_size)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DataError(f"invalid device {device!r}; use e.g. 'cpu' or 'cuda:0'") from exc
    root = Path(data_dir).expanduser() if data_dir is not None else DEFAULT_DATA_DIR
    train = split == "train"
    augment = train if augment is None else bool(augment)

    if spec.name == "imagenet":
        from bame.data import imagenet

        if download:
            raise DataError(
                "ImageNet cannot be downloaded automatically; get it from image-net.org into --data-dir"
            )
        split_dir = imagenet.locate(split, root)
        folder = imagenet.scan(str(split_dir))
        plan = _plan(spec, split, len(folder.samples), batch_size, seed, rank, world_size)
        return imagenet.ImageFolderLoader(split_dir, plan, augment, workers, device)

    images, labels, normalize, augmentation = _in_memory(spec.name, split, root, download)
    plan = _plan(spec, split, len(images), batch_size, seed, rank, world_size)
    return TensorLoader(images, labels, plan, normalize, augmentation if augment else None, device)


def _in_memory(
    name: str, split: str, root: Path, download: bool
) -> tuple[torch.Tensor, torch.Tensor, Normalize, CropFlip]:
    """Load an in-memory dataset's split with its normalization and its train augmentation."""
    if name == "digits":
        from bame.data import digits

        images, labels = digits.load(split)
        mean, std = digits.train_stats()
        # A one-pixel random shift: an 8x8 digit has no room for more, and must not be mirrored.
        return images, labels, Normalize(digits.PIXEL_SCALE, mean, std), CropFlip(padding=1, flip=False)
    if name == "fashion-mnist":
        from bame.data import fashion_mnist

        images, labels = fashion_mnist.load(split, root, download)
        return images, labels, Normalize(255.0, fashion_mnist.MEAN, fashion_mnist.STD), CropFlip(0, flip=True)
    from bame.data import cifar

    images, labels = cifar.load(split, root, download)
    return images, labels, Normalize(255.0, cifar.MEAN, cifar.STD), CropFlip(padding=4, flip=True)


def _plan(
    spec: DatasetSpec, split: str, num_items: int, batch_size: int, seed: int, rank: int, world_size: int
) -> EpochPlan:
    """The batch layout, refusing a train batch larger than the split (it would give empty epochs)."""
    train = split == "train"
    plan = EpochPlan(
        num_items, batch_size, shuffle=train, drop_last=train, seed=seed, rank=rank, world_size=world_size
    )
    if train and plan.num_global_batches == 0:
        raise DataError(
            f"batch size {batch_size} is larger than the {num_items} images of the {spec.name} train split; "
            "use a smaller batch size"
        )
    return plan
