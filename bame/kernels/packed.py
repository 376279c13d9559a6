"""Compressed N:M form of a ``[out, in]`` weight with blocks of M along ``in``.

Every block of M consecutive columns of a row keeps exactly N slots: ``values[o, j, s]`` is the weight at
column ``j*M + indices[o, j, s]``, slots in increasing column order. A mask with fewer than N ones in a block
(a backward mask, say) is padded with zero-valued slots at unused positions, so the structure stays regular
(``N*in/M`` slots per row) and ``slot_mask`` tells real slots from padding.

The index structure only changes when the mask does; the values change at every optimizer step and are
re-gathered in O(nnz) by :meth:`Packed.refresh_values` / :meth:`Packed.gather_values`.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bame.errors import ConfigError

__all__ = ["Packed", "check_nm", "csr_tensor", "index_dtype", "pack", "unpack"]


def index_dtype(m: int) -> torch.dtype:
    """The smallest dtype that holds an in-block position ``0 <= idx < m``."""
    return torch.uint8 if m <= 256 else torch.int16


@dataclass(eq=False)
class Packed:
    """An N:M-packed weight.

    Attributes:
        values: kept values, ``(out, in//m, n)``, lower in-block index first; zero at padding slots.
        indices: in-block positions of the slots, ``(out, in//m, n)``, uint8 (int16 when ``m > 256``).
        cols: absolute column ``j*m + indices[o, j, s]`` of every slot, int64, flat ``(out*in//m*n,)``
            in row-major slot order (the order of a CSR ``col_indices``).
        n: kept entries per block.
        m: block size.
        shape: ``(out, in)`` of the dense weight.
        slot_mask: bool ``(out, in//m, n)``, False at padding slots; None when no block is padded.
    """

    values: Tensor
    indices: Tensor
    cols: Tensor
    n: int
    m: int
    shape: tuple[int, int]
    slot_mask: Tensor | None = None
    # Derived structures (CSR row pointers, the transposed structure), shared by with_values() copies.
    _cache: dict[str, Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def slots_per_row(self) -> int:
        """``K = n * in / m``: slots in one output row."""
        return self.shape[1] // self.m * self.n

    @property
    def nbytes(self) -> int:
        """Bytes of the compressed form (values + in-block indices), to compare with a dense weight."""
        return (
            self.values.numel() * self.values.element_size()
            + self.indices.numel() * self.indices.element_size()
        )

    @property
    def cols2d(self) -> Tensor:
        """``cols`` viewed as ``(out, K)``."""
        return self.cols.view(self.shape[0], self.slots_per_row)

    @property
    def values2d(self) -> Tensor:
        """``values`` viewed as ``(out, K)``."""
        return self.values.reshape(self.shape[0], self.slots_per_row)

    def gather_values(self, weight: Tensor) -> Tensor:
        """The values of ``weight`` at this structure's slots, zero at padding: ``(out, in//m, n)``.

        O(nnz): one gather at the fixed ``cols``. Differentiable, does not change ``self``.
        """
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"weight shape {tuple(weight.shape)} does not match packed shape {self.shape}")
        vals = torch.gather(weight, 1, self.cols2d).view_as(self.indices)  # (out, in//m, n)
        return vals if self.slot_mask is None else vals * self.slot_mask

    def refresh_values(self, weight: Tensor) -> None:
        """Re-gather ``values`` from ``weight`` in place, keeping the indices (after an optimizer step)."""
        with torch.no_grad():
            self.values.copy_(self.gather_values(weight.detach()))

    def with_values(self, values: Tensor) -> Packed:
        """A copy sharing this structure (and its cached derived tensors) but holding ``values``."""
        return dataclasses.replace(self, values=values.view_as(self.indices))

    def dense_scratch(self) -> Tensor:
        """``W * B`` written into a dense buffer kept in the structure's cache and reused on every call.

        A fresh 4096x4096 fp32 tensor costs ~50 ms of page faults on a VM, as much as a sparse product: the
        dense formulations use this buffer instead. It is overwritten by the next call, so only use it for
        a product that is consumed at once and not saved for backward (i.e. with grad mode off).
        """
        buf = self._cache.get("dense")
        if buf is None or buf.dtype != self.values.dtype:
            buf = self._cache["dense"] = torch.zeros(
                self.shape, dtype=self.values.dtype, device=self.cols.device
            )
        else:
            buf.zero_()
        return buf.scatter_(1, self.cols2d, self.values2d)

    def dense_mask(self, dtype: torch.dtype) -> Tensor:
        """The mask as a 0/1 ``(out, in)`` tensor of ``dtype`` (1 at real slots), cached with the structure."""
        key = f"mask:{dtype}"
        if key not in self._cache:
            ones = (
                torch.ones(self.cols.numel(), dtype=dtype, device=self.cols.device)
                if self.slot_mask is None
                else self.slot_mask.reshape(-1).to(dtype)
            )
            dense = torch.zeros(self.shape, dtype=dtype, device=self.cols.device)
            self._cache[key] = dense.scatter_(1, self.cols2d, ones.view(self.shape[0], -1))
        return self._cache[key]

    def row_ptr(self) -> Tensor:
        """CSR ``crow_indices`` of the ``(out, in)`` structure: ``arange(out + 1) * K`` (padding included)."""
        if "crow" not in self._cache:
            self._cache["crow"] = (
                torch.arange(self.shape[0] + 1, device=self.cols.device) * self.slots_per_row
            )
        return self._cache["crow"]

    def transposed(self) -> tuple[Tensor, Tensor, Tensor]:
        """The structure of ``W^T`` (``(in, out)``, CSR order), real slots only.

        Returns:
            ``(perm, rows, crow)``: ``perm`` picks flat slots in CSR-of-W^T order (so
            ``values.flatten()[perm]`` are W^T's CSR values), ``rows`` is the output row of each (W^T's column
            indices), ``crow`` the ``in + 1`` row pointers.
        """
        if "t_perm" not in self._cache:
            real = torch.arange(self.cols.numel(), device=self.cols.device)
            if self.slot_mask is not None:  # padding slots carry zeros: leave them out of dX's work
                real = real[self.slot_mask.flatten()]
            # Stable sort by column keeps rows ascending within a column, as CSR requires.
            perm = real[torch.argsort(self.cols[real], stable=True)]
            counts = torch.bincount(self.cols[real], minlength=self.shape[1])  # (in,)
            crow = torch.zeros(self.shape[1] + 1, dtype=torch.int64, device=self.cols.device)
            crow[1:] = torch.cumsum(counts, 0)
            self._cache.update(t_perm=perm, t_rows=perm // self.slots_per_row, t_crow=crow)
        return self._cache["t_perm"], self._cache["t_rows"], self._cache["t_crow"]

    def csr(self) -> Tensor:
        """This weight as a ``torch.sparse_csr`` ``(out, in)`` tensor (shares ``values``)."""
        return csr_tensor(self.row_ptr(), self.cols, self.values.reshape(-1), self.shape)

    def csr_t(self) -> Tensor:
        """``W^T`` as a ``torch.sparse_csr`` ``(in, out)`` tensor (real slots only)."""
        perm, rows, crow = self.transposed()
        return csr_tensor(
            crow, rows, self.values.reshape(-1).index_select(0, perm), (self.shape[1], self.shape[0])
        )


def csr_tensor(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """A CSR tensor from trusted parts (no invariant check: our structures are valid by construction)."""
    with warnings.catch_warnings():  # "CSR support is in beta" is noise for every caller
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def check_nm(shape: tuple[int, ...], n: int, m: int) -> None:
    """Raise :class:`ConfigError` unless a ``[out, in]`` weight can be N:M-packed along ``in``."""
    if len(shape) != 2:
        raise ConfigError(f"N:M packing needs a 2-D [out, in] weight, got shape {tuple(shape)}")
    if not 0 < n <= m:
        raise ConfigError(f"invalid N:M pattern {n}:{m}: need 0 < N <= M")
    if shape[1] % m:
        raise ConfigError(f"input size {shape[1]} is not a multiple of M={m}")


def pack(weight: Tensor, mask: Tensor, n: int, m: int) -> Packed:
    """Pack ``weight * mask`` into N:M form.

    Each block of ``mask`` (``m`` consecutive entries along ``in``) must have at most ``n`` ones; blocks with
    fewer are padded with the lowest unused positions, holding zero values (``slot_mask`` False).

    Args:
        weight: dense ``(out, in)``, any float dtype and device.
        mask: ``(out, in)``, bool or 0/1 of any dtype (non-zero = kept).
        n: kept entries per block.
        m: block size.

    Returns:
        The :class:`Packed` weight.
    """
    check_nm(tuple(weight.shape), n, m)
    if mask.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}")
    out, in_ = weight.shape
    keep = (mask != 0).view(out, in_ // m, m)  # (out, in//m, m)
    per_block = keep.sum(-1)
    if bool((per_block > n).any()):
        raise ValueError(f"mask has a block with {int(per_block.max())} > N={n} ones")
    # Kept positions rank first, then unused ones by increasing position; take n, then sort by position.
    pos = torch.arange(m, device=weight.device)
    key = keep.to(torch.int32) * m + (m - 1 - pos)  # (out, in//m, m), distinct within a block
    idx = torch.topk(key, n, dim=-1).indices.sort(dim=-1).values  # (out, in//m, n)
    slot_mask = torch.gather(keep, 2, idx)  # (out, in//m, n)
    cols = (torch.arange(in_ // m, device=weight.device).view(1, -1, 1) * m + idx).reshape(-1)
    packed = Packed(
        values=torch.empty(idx.shape, dtype=weight.dtype, device=weight.device),
        indices=idx.to(index_dtype(m)),
        cols=cols,
        n=n,
        m=m,
        shape=(out, in_),
        slot_mask=None if bool(slot_mask.all()) else slot_mask,
    )
    packed.refresh_values(weight)
    return packed


def unpack(packed: Packed) -> Tensor:
    """The dense ``(out, in)`` weight ``W * B``: values scattered at their columns, zeros elsewhere."""
    dense = torch.zeros(packed.shape, dtype=packed.values.dtype, device=packed.values.device)
    # Padding slots sit at positions no real slot uses and hold 0, so the scatter never clobbers a value.
    return dense.scatter_(1, packed.cols2d, packed.values2d)
