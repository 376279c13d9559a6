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

Each dataset module registers its :class:`DatasetSpec` (what it is, and the function that builds its
loader) with :func:`register`; the registry finds every module of this package, so a new data set is one
module. Nothing is loaded when this package is imported, and torchvision is imported only for ImageNet.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bame.data.loader import Loader, TensorLoader
from bame.data.sharding import EpochPlan
from bame.data.transforms import CropFlip, Normalize
from bame.errors import DataError
from bame.registry import Registry

__all__ = [
    "DEFAULT_DATA_DIR",
    "DatasetSpec",
    "Loader",
    "Request",
    "TensorLoader",
    "available",
    "build_loader",
    "get_spec",
    "in_memory",
    "register",
]

DEFAULT_DATA_DIR = Path("data")
"""Where datasets are looked for (and downloaded to) when no ``data_dir`` is given: ``./data``."""

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Request:
    """What a loader is built for: a split of a dataset, where its files are, and the batch layout."""

    spec: DatasetSpec
    split: str
    root: Path
    download: bool
    batch_size: int
    seed: int
    rank: int
    world_size: int
    workers: int
    device: torch.device
    augment: bool
    #: Whether ``root`` was given (``data_dir``): a data set's fallback locations apply only when it was not.
    root_given: bool = False

    def plan(self, num_items: int) -> EpochPlan:
        """The batch layout over ``num_items``, refusing a train batch larger than the split."""
        train = self.split == "train"
        plan = EpochPlan(num_items, self.batch_size, shuffle=train, drop_last=train, seed=self.seed,
                         rank=self.rank, world_size=self.world_size)
        if train and plan.num_global_batches == 0:
            raise DataError(
                f"batch size {self.batch_size} is larger than the {num_items} images of the {self.spec.name} "
                "train split; use a smaller batch size"
            )
        return plan


#: An in-memory split: ``(images uint8 [N, C, H, W], labels int64 [N], normalization, train augmentation)``.
Split = tuple[torch.Tensor, torch.Tensor, Normalize, CropFlip]


def in_memory(load: Callable[[str, Path, bool], Split]) -> Callable[[Request], Loader]:
    """A dataset's loader builder from its ``load(split, root, download)``: the whole split in memory,
    augmented batched on tensors (:class:`TensorLoader`)."""

    def build(request: Request) -> Loader:
        images, labels, normalize, augmentation = load(request.split, request.root, request.download)
        return TensorLoader(images, labels, request.plan(len(images)), normalize,
                            augmentation if request.augment else None, request.device)

    return build


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
        loader: builds a split's loader from a :class:`Request` (:func:`in_memory` for the small ones).
        defaults: training options that suit a run on this data set, e.g. ``{"batch_size": 64, "epochs": 30,
            "method_options": {"delta_t": 10}}`` (keys of :class:`bame.config.TrainConfig`); they sit between
            the config's own defaults and a recipe, and method options reach only the methods that have them
            (:func:`bame.config.build_run`). ``bame demo`` trains with them.
    """

    name: str
    description: str
    num_classes: int
    in_channels: int
    image_size: int
    default_model: str
    train_size: int | None
    test_size: int | None
    loader: Callable[[Request], Loader]
    defaults: dict[str, Any] = field(default_factory=dict, hash=False)


def _normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-")


REGISTRY: Registry[DatasetSpec] = Registry("dataset", __name__, DataError, _normalize,
                                           sort_key=lambda spec: spec.image_size,
                                           unknown="unknown {kind} {name!r}; choose one of: {names}")


def register(spec: DatasetSpec) -> DatasetSpec:
    """Make a dataset available by its ``name``."""
    return REGISTRY.register(spec.name, spec, spec.description)


def available() -> dict[str, DatasetSpec]:
    """All datasets, by name, smallest images first.

    Returns:
        A new dict each call: changing it does not change the registry.
    """
    return REGISTRY.values()


def get_spec(name: str) -> DatasetSpec:
    """The spec of a dataset.

    Names are matched case-insensitively, with ``_`` taken as ``-`` (``Fashion_MNIST`` works).

    Raises:
        DataError: an unknown name; the message lists the valid ones.
    """
    return REGISTRY.get(name)


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
        data_dir: where the files are (default ``./data``, then a data set's own fallback such as Debian's
            copy of Fashion-MNIST); a directory given here must exist (unless ``download``), and only it is
            searched. Unused by ``digits``, but still checked.
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
    if data_dir is not None and not download and not root.is_dir():
        # A typo must not fall back silently to another copy of the data (the system's Fashion-MNIST).
        what = "is not a directory" if root.exists() else "does not exist"
        raise DataError(f"data directory {root} {what} (--data-dir)")
    augment = split == "train" if augment is None else bool(augment)
    return spec.loader(Request(spec, split, root, download, batch_size, seed, rank, world_size, workers, device,
                               augment, root_given=data_dir is not None))
