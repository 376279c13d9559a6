"""Which samples each rank sees in each batch: deterministic shuffling and distributed sharding.

Every loader in :mod:`bame.data` asks an :class:`EpochPlan` for its indices, so the in-memory loaders and
the ImageFolder loader shuffle and shard in exactly the same way:

* The order of epoch ``e`` is a permutation drawn from a private :class:`torch.Generator` seeded from
  ``(seed, e)`` only, never from the global RNG, so re-running an epoch, or resuming it at any batch,
  gives the same batches, whatever else the program did with random numbers in between.
* Global batch ``i`` is ``perm[i * B:(i + 1) * B]`` and rank ``r`` gets the ``r``-th contiguous slice of
  it, so ``world_size`` ranks together see exactly the samples one process sees with the same global
  batch size.
* Random augmentation parameters are drawn per *global* batch from a generator seeded from
  ``(seed, e, i)``, and each rank keeps its slice: resuming at batch ``i`` needs no replay, and two ranks
  with 32 samples each get the very same augmented images as one process with 64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bame.errors import DataError

# Stream tags mixed into the seed, so the permutation and the augmentation draws never share a stream.
_PERMUTATION_STREAM = 0
_AUGMENT_STREAM = 1


def derive_seed(*parts: int) -> int:
    """Mix integers into one well-spread 63-bit seed.

    ``seed + epoch`` would make (seed=1, epoch=0) and (seed=0, epoch=1) identical; numpy's SeedSequence
    hashes the whole tuple, and its output is fixed across numpy versions.

    Args:
        *parts: non-negative integers (seed, epoch, stream tag, batch index ...).

    Returns:
        An integer in ``[0, 2**63)``, fit for :meth:`torch.Generator.manual_seed`.
    """
    words = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return ((int(words[0]) << 32) | int(words[1])) & ((1 << 63) - 1)


def make_generator(*parts: int) -> torch.Generator:
    """A CPU :class:`torch.Generator` seeded from ``parts`` (see :func:`derive_seed`).

    CPU on purpose: random draws are tiny (a permutation, a few numbers per sample), and a CPU stream is
    identical whatever device the batches later go to.
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed(derive_seed(*parts))
    return generator


@dataclass(frozen=True)
class EpochPlan:
    """The batch layout of one split for one rank.

    Attributes:
        num_items: samples in the split.
        batch_size: the global batch size (all ranks together).
        shuffle: draw a new permutation each epoch (train) or keep file order (test).
        drop_last: drop the last incomplete global batch (train) or keep it (test).
        seed: the run seed.
        rank: this process's rank.
        world_size: number of ranks.
    """

    num_items: int
    batch_size: int
    shuffle: bool
    drop_last: bool
    seed: int = 0
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise DataError(f"batch size must be positive, got {self.batch_size}")
        if self.world_size <= 0 or not 0 <= self.rank < self.world_size:
            raise DataError(
                f"rank {self.rank} is not valid for world size {self.world_size}; "
                "ranks run from 0 to world_size - 1"
            )
        if self.batch_size % self.world_size:
            raise DataError(
                f"global batch size {self.batch_size} is not divisible by the world size "
                f"{self.world_size}; choose a batch size that is a multiple of {self.world_size}"
            )

    @property
    def num_global_batches(self) -> int:
        """Global batches per epoch (the same on every rank)."""
        if self.drop_last:
            return self.num_items // self.batch_size
        return -(-self.num_items // self.batch_size)

    @property
    def num_samples(self) -> int:
        """Samples per epoch over all ranks."""
        if self.drop_last:
            return self.num_global_batches * self.batch_size
        return self.num_items

    def global_batch_len(self, index: int) -> int:
        """Number of samples in global batch ``index``."""
        return min(self.batch_size, self.num_items - index * self.batch_size)

    def rank_bounds(self, global_len: int) -> tuple[int, int]:
        """This rank's ``[lo, hi)`` slice of a global batch of ``global_len`` samples.

        Full batches split evenly (``batch_size // world_size`` each); a short last batch (test split
        only) splits into contiguous parts whose sizes differ by at most one, so each sample still goes
        to exactly one rank.
        """
        lo = self.rank * global_len // self.world_size
        hi = (self.rank + 1) * global_len // self.world_size
        return lo, hi

    def __len__(self) -> int:
        """Batches per epoch for this rank.

        Equal to :attr:`num_global_batches`, except that a rank whose slice of the short last test batch
        would be empty (fewer samples left than ranks) gets no batch for it rather than an empty one.
        """
        count = self.num_global_batches
        if count and not self.drop_last:
            lo, hi = self.rank_bounds(self.global_batch_len(count - 1))
            if lo == hi:
                count -= 1
        return count

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's sample order: a seeded permutation (train) or ``0..n-1`` (test)."""
        if self.shuffle:
            return torch.randperm(
                self.num_items, generator=make_generator(self.seed, epoch, _PERMUTATION_STREAM)
            )
        return torch.arange(self.num_items)

    def augment_generator(self, epoch: int, batch: int) -> torch.Generator:
        """The generator for the random augmentation of global batch ``batch`` of epoch ``epoch``."""
        return make_generator(self.seed, epoch, _AUGMENT_STREAM, batch)

    def batches(self, epoch: int, start_batch: int = 0) -> list[tuple[int, torch.Tensor, int, int]]:
        """This rank's batches of an epoch, from ``start_batch`` on.

        Args:
            epoch: the epoch number (>= 0).
            start_batch: the first global batch to yield, to resume an epoch part-way.

        Returns:
            A list of ``(global_batch_index, global_indices, lo, hi)``: the whole global batch's sample
            indices (augmentation parameters are drawn for all of them) and this rank's slice of it.
            Batches whose slice is empty are left out.
        """
        check_epoch(epoch, start_batch, self.num_global_batches)
        order = self.order(epoch)
        out = []
        for i in range(start_batch, self.num_global_batches):
            indices = order[i * self.batch_size : (i + 1) * self.batch_size]
            lo, hi = self.rank_bounds(len(indices))
            if hi > lo:
                out.append((i, indices, lo, hi))
        return out


def check_epoch(epoch: int, start_batch: int, num_batches: int) -> None:
    """Reject a negative epoch or a start batch outside ``[0, num_batches]``.

    ``start_batch == num_batches`` is allowed: resuming a checkpoint taken after an epoch's last batch
    yields nothing for that epoch.
    """
    if epoch < 0:
        raise DataError(f"epoch must be >= 0, got {epoch}")
    if not 0 <= start_batch <= num_batches:
        raise DataError(
            f"start batch {start_batch} is outside this epoch's 0..{num_batches} batches; "
            "was the checkpoint made with another batch size or world size?"
        )
