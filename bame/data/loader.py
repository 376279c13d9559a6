"""The loader protocol and the loader for datasets held in memory.

A loader is iterated once per epoch::

    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch, start_batch if epoch == start_epoch else 0)
        for x, y in loader:
            ...

and yields ``(x, y)``: ``x`` float32 ``[B, C, H, W]`` normalized, ``y`` int64 ``[B]``, both on the
loader's device. What it yields depends only on ``(seed, epoch, start_batch)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch

from bame.data.sharding import EpochPlan, check_epoch
from bame.data.transforms import CropFlip, Normalize


@runtime_checkable
class Loader(Protocol):
    """What the trainer needs from a data loader."""

    batch_size: int
    """The global batch size (over all ranks)."""

    @property
    def num_samples(self) -> int:
        """Samples per epoch over all ranks (the train split drops its last incomplete batch)."""
        ...

    def __len__(self) -> int:
        """Batches per epoch for this rank, counted from batch 0 whatever the start batch."""
        ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch the next iterations yield, and the global batch they start at."""
        ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield this rank's ``(x, y)`` batches of the current epoch from the start batch on."""
        ...


class TensorLoader:
    """Batches of a split held whole in memory as a tensor; augmentation runs batched on the device.

    Args:
        images: ``[N, C, H, W]`` raw pixels (uint8, or float for other sources), moved to ``device``
            once here so each batch is a single gather.
        labels: ``[N]`` class indices.
        plan: the batch layout for this rank (shuffling, drop-last, sharding).
        normalize: raw pixels to network input.
        augment: random augmentation, or ``None``.
        device: where the batches go.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        plan: EpochPlan,
        normalize: Normalize,
        augment: CropFlip | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if images.ndim != 4 or len(images) != len(labels) or len(images) != plan.num_items:
            raise ValueError(
                f"images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match the plan's "
                f"{plan.num_items} samples"
            )
        self.device = torch.device(device)
        self._images = images.to(self.device)
        self._labels = labels.to(device=self.device, dtype=torch.int64)
        self.plan = plan
        self.normalize = normalize
        self.augment = augment
        self.batch_size = plan.batch_size
        self.epoch = 0
        self.start_batch = 0

    @property
    def images(self) -> torch.Tensor:
        """The whole split's raw pixels ``[N, C, H, W]``, in file order, before augmentation."""
        return self._images

    @property
    def labels(self) -> torch.Tensor:
        """The whole split's labels ``[N]`` (int64), in file order."""
        return self._labels

    @property
    def num_samples(self) -> int:
        """Samples per epoch over all ranks."""
        return self.plan.num_samples

    def __len__(self) -> int:
        return len(self.plan)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (order and augmentation) and the global batch to start from.

        The setting stays until the next call: iterating twice yields the same batches twice.

        Raises:
            DataError: a negative epoch or a start batch beyond the epoch.
        """
        check_epoch(epoch, start_batch, self.plan.num_global_batches)
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i, indices, lo, hi in self.plan.batches(self.epoch, self.start_batch):
            mine = indices[lo:hi].to(self.device)
            x = self._images[mine]
            if self.augment is not None:
                # Drawn for the whole global batch and sliced, so the draws do not depend on the rank.
                params = self.augment.sample(len(indices), self.plan.augment_generator(self.epoch, i))
                x = self.augment.apply(x, params[lo:hi])
            yield self.normalize(x), self._labels[mine]

    def __repr__(self) -> str:
        n, c, h, w = self._images.shape
        return (
            f"TensorLoader({n} images {c}x{h}x{w}, batch_size={self.batch_size}, "
            f"rank={self.plan.rank}/{self.plan.world_size}, augment={self.augment}, device={self.device})"
        )
