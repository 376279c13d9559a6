"""The slot structure of a compressed N:M weight: kept values ``(K, N)`` and their in-block positions.

A weight of ``shape`` (N:M along the input channels, ``group_axis="cin"``) is K blocks of M; a compressed
weight keeps N *slots* per block, each a value and its position in the block (``indices``, uint8
``(K, N)``, not necessarily sorted: slots keep their place across mask updates). :class:`Slots` is what
the products need from it (the dense weight, a gather at the slots, the Linear kernels' structure), shared
by the compressed storage (:class:`bame.compressed.CompressedNM`) and the custom operators
(:mod:`bame.kernels.ops`), which rebuild it from the tensors they are given.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bame.kernels.packed import Packed
from bame.nm import from_blocks, to_blocks

__all__ = ["SlotStructure", "Slots"]


class Slots:
    """Products' view of a compressed weight. A subclass sets ``shape``, ``n``, ``m``, ``indices`` (the
    slots' positions), ``bwd_keep`` (None, or the slots BAME-dagger's input gradient uses) and ``_cache``
    (a dict)."""

    shape: tuple[int, ...]
    n: int
    m: int
    indices: Tensor
    bwd_keep: Tensor | None
    _cache: dict[str, tuple[int, Any]]

    def _cached(self, key: str, make: Any) -> Any:
        """``make()``, kept until the slots change (``indices`` is updated in place)."""
        version = self.indices._version
        hit = self._cache.get(key)
        if hit is None or hit[0] != version:
            hit = self._cache[key] = (version, make())
        return hit[1]

    def block_mask(self) -> Tensor:
        """The forward mask B as ``(K, M)`` blocks."""
        idx = self.indices.long()
        return torch.zeros(idx.shape[0], self.m, dtype=torch.bool, device=idx.device).scatter_(1, idx, True)

    def dense(self, values: Tensor) -> Tensor:
        """The dense weight (the weight's shape) holding ``values`` at the slots, zeros elsewhere."""
        blocks = torch.zeros(values.shape[0], self.m, dtype=values.dtype, device=values.device)
        # contiguous: a convolution given the permuted view picks another algorithm (another summation order)
        return from_blocks(blocks.scatter_(1, self.indices.long(), values), self.shape, "cin").contiguous()

    def gather(self, dense: Tensor) -> Tensor:
        """A weight-shaped tensor at the slots: ``(K, N)``."""
        return to_blocks(dense, self.m, "cin").gather(1, self.indices.long())

    def packed(self, values: Tensor) -> Packed:
        """The Linear kernels' structure (absolute columns of the slots) holding ``values``."""
        out, in_ = self.shape
        cols = self._cached("cols", lambda: (torch.arange(in_ // self.m, device=self.indices.device).view(1, -1, 1)
                                             * self.m + self.indices.long().view(out, -1, self.n)).reshape(-1))
        structure = self._cached("packed", lambda: Packed(values, self.indices.view(out, -1, self.n), cols, self.n,
                                                          self.m, (out, in_)))
        return structure.with_values(values.reshape(out, -1, self.n))


class SlotStructure(Slots):
    """The slots of one call of a custom operator: products only (no dense-gradient hand-off)."""

    want_dense_grad = False

    def __init__(self, shape: tuple[int, ...], n: int, m: int, indices: Tensor, bwd_keep: Tensor | None = None):
        self.shape, self.n, self.m, self.indices, self.bwd_keep = tuple(shape), n, m, indices, bwd_keep
        self._cache = {}

    def stash(self, grad: Tensor) -> None:
        raise RuntimeError("a custom operator's slots take no dense gradient: update iterations run eagerly")
