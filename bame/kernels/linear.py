"""The three products of an N:M-sparse Linear layer, in several formulations, and their autograd Function.

For ``x (T, in)``, a packed weight ``W*B (out, in)`` and the output gradient ``dY (T, out)``:

* forward       ``y  = x @ (W*B)^T``                          -> ``(T, out)``
* input grad    ``dX = dY @ (W*B)``                           -> ``(T, in)``
* weight grad   ``dW[o, k] = sum_t dY[t, o] * x[t, cols[o, k]]`` at kept slots only -> ``(out, in//m, n)``

Each formulation is a plain function; :data:`FORWARD`, :data:`INPUT_GRAD` and :data:`WEIGHT_GRAD` map plan
names to them. They all take the values held by the :class:`Packed` they are given, in ``x``'s dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bame import native
from bame.kernels import semi
from bame.kernels.packed import Packed, csr_tensor, unpack
from bame.kernels.tiles import from_tiles, layer_tile, to_tiles

if TYPE_CHECKING:
    from bame.kernels.plan import Plan

__all__ = [
    "CUDA_ONLY",
    "FORWARD",
    "INPUT_GRAD",
    "NATIVE_ONLY",
    "WEIGHT_GRAD",
    "NMLinearFunction",
    "dw_dense",
    "dw_dense_masked",
    "dw_direct",
    "dw_full",
    "dw_native",
    "dw_sampled",
    "dw_sampled_tiles",
    "dx_csr",
    "dx_dense",
    "dx_direct",
    "dx_embag",
    "dx_embag_tiles",
    "dx_native",
    "fwd_csr",
    "fwd_dense",
    "fwd_direct",
    "fwd_embag",
    "fwd_embag_tiles",
    "fwd_native",
    "dx_semi_structured",
    "fwd_semi_structured",
    "nm_linear",
    "scatter_values",
    "semi_structured_problem",
]


def _dense_weight(packed: Packed) -> Tensor:
    """``W * B`` dense: in the packing's reusable scratch buffer when autograd cannot save it, else fresh."""
    return unpack(packed) if torch.is_grad_enabled() else packed.dense_scratch()  # (out, in)


def fwd_dense(x: Tensor, packed: Packed, tile: int = 0) -> Tensor:
    """``y = x @ (W*B)^T`` with a dense GEMM on the unpacked weight. ``tile`` is ignored."""
    return F.linear(x, _dense_weight(packed))  # (T, out)


def _embag_tiles(tables: Tensor, idx: Tensor, offsets: Tensor | None, weights: Tensor, bags: int) -> Tensor:
    """Weighted sums of gathered rows, tile by tile: ``(n_tiles, rows, tile)`` -> ``(n_tiles, bags, tile)``.

    ``idx``/``weights`` are either ``(bags, L)`` fixed-length bags (``offsets`` None) or flat, cut into bags
    by the ``bags + 1`` ``offsets``.
    """
    out = tables.new_empty(tables.shape[0], bags, tables.shape[2])  # (n_tiles, bags, tile)
    for c in range(tables.shape[0]):  # a few tiles, each a whole embedding_bag call
        out[c] = F.embedding_bag(
            idx,
            tables[c],
            offsets,
            per_sample_weights=weights,
            mode="sum",
            include_last_offset=offsets is not None,
        )
    return out


def fwd_embag_tiles(x_tiles: Tensor, packed: Packed) -> Tensor:
    """:func:`fwd_embag` on tiles: ``(n_tiles, in, tile)`` -> ``(n_tiles, out, tile)``."""
    return _embag_tiles(x_tiles, packed.cols2d, None, packed.values2d, packed.shape[0])


def fwd_embag(x: Tensor, packed: Packed, tile: int = 0) -> Tensor:
    """``y[t, o] = sum_k values[o, k] * x[t, cols[o, k]]`` as ``embedding_bag`` over the rows of ``x^T``.

    Each output row is a bag of ``K`` rows of the ``(in, T)`` table ``x^T``, weighted by the values; tokens go
    in tiles of ``tile`` (0 = :func:`layer_tile`) so that each table stays in cache.
    """
    tile = tile or layer_tile(packed.shape, x.shape[0], x)
    return from_tiles(fwd_embag_tiles(to_tiles(x, tile), packed), x.shape[0])  # (T, out)


def fwd_csr(x: Tensor, packed: Packed, tile: int = 0) -> Tensor:
    """``y = (W_csr @ x^T)^T`` with ``torch.sparse.mm`` on the CSR weight. ``tile`` is ignored."""
    return torch.sparse.mm(packed.csr(), x.t()).t().contiguous()  # (out, T) -> (T, out)


def dx_dense(dy: Tensor, packed: Packed, tile: int = 0) -> Tensor:
    """``dX = dY @ (W*B)`` with a dense GEMM on the unpacked weight. ``tile`` is ignored."""
    return dy @ _dense_weight(packed)  # (T, in)


def dx_embag_tiles(dy_tiles: Tensor, packed: Packed) -> Tensor:
    """:func:`dx_embag` on tiles: ``(n_tiles, out, tile)`` -> ``(n_tiles, in, tile)``."""
    perm, rows, crow = packed.transposed()
    # index_select, not [perm]: advanced indexing is ~4x slower for a 1M-entry random permutation on CPU.
    weights = packed.values.reshape(-1).index_select(0, perm)  # (nnz_real,) in W^T's CSR order
    return _embag_tiles(dy_tiles, rows, crow, weights, packed.shape[1])


def dx_embag(dy: Tensor, packed: Packed, tile: int = 0) -> Tensor:
    """``dX[t, i] = sum_{(o, i) kept} W[o, i] * dY[t, o]`` as ``embedding_bag`` over the rows of ``dY^T``.

    Input column ``i`` is a bag (of variable length) of the rows ``o`` that keep it, weighted by ``W[o, i]``:
    the transposed structure from :meth:`Packed.transposed`. Tokens are tiled as in :func:`fwd_embag`.
    """
    tile = tile or layer_tile(packed.shape, dy.shape[0], dy)
    return from_tiles(dx_embag_tiles(to_tiles(dy, tile), packed), dy.shape[0])  # (T, in)


def dx_csr(dy: Tensor, packed: Packed, tile: int = 0) -> Tensor:
    """``dX = (W^T_csr @ dY^T)^T`` with ``torch.sparse.mm`` on the CSR of ``W^T``. ``tile`` is ignored."""
    return torch.sparse.mm(packed.csr_t(), dy.t()).t().contiguous()  # (in, T) -> (T, in)


def _masked(grad_values: Tensor, packed: Packed) -> Tensor:
    """Zero the gradient at padding slots (they are not weights of this mask)."""
    return grad_values if packed.slot_mask is None else grad_values * packed.slot_mask


def dw_dense(dy: Tensor, x: Tensor, packed: Packed, tile: int = 0) -> Tensor:
    """``dW`` at kept slots as the dense ``dY^T @ x`` gathered at ``cols``: ``(out, in//m, n)``."""
    full = dy.t() @ x  # (out, in)
    return _masked(torch.gather(full, 1, packed.cols2d).view_as(packed.indices), packed)


def dw_dense_masked(dy: Tensor, x: Tensor, packed: Packed) -> Tensor:
    """``(dY^T @ x) * B`` as a dense ``(out, in)`` tensor, masked in place (no second dense allocation)."""
    full = dy.t() @ x  # (out, in)
    return full.mul_(packed.dense_mask(full.dtype))  # one pass with the structure's cached 0/1 mask


def dw_sampled_tiles(dy_tiles: Tensor, x_tiles: Tensor, packed: Packed) -> Tensor:
    """:func:`dw_sampled` on tiles ``(n_tiles, out, tile)`` and ``(n_tiles, in, tile)``: sums tile products.

    ``out=`` the accumulator itself, so sampled_addmm neither copies the CSR input nor allocates, and both
    operands are already in the row-contiguous layout its CPU kernel wants (no transposing copies).
    """
    vals = x_tiles.new_zeros(packed.cols.numel())  # (nnz,)
    acc = csr_tensor(packed.row_ptr(), packed.cols, vals, packed.shape)
    for c in range(x_tiles.shape[0]):
        torch.sparse.sampled_addmm(acc, dy_tiles[c], x_tiles[c].t(), beta=1.0, out=acc)
    return _masked(acc.values().view_as(packed.indices), packed)


def dw_sampled(dy: Tensor, x: Tensor, packed: Packed, tile: int = 0) -> Tensor:
    """``dW[o, k] = <dY[:, o], x[:, cols[o, k]]>`` only at kept slots, with ``torch.sparse.sampled_addmm``.

    The sampled dense-dense product: one length-``T`` dot product per slot, ``nnz * T`` work, over token
    tiles (0 = :func:`layer_tile`).
    """
    tile = tile or layer_tile(packed.shape, x.shape[0], x)
    return dw_sampled_tiles(to_tiles(dy, tile), to_tiles(x, tile), packed)


def dw_full(dy: Tensor, x: Tensor) -> Tensor:
    """The full dense weight gradient ``dY^T @ x``: ``(out, in)`` (mask-update / straight-through steps)."""
    return dy.t() @ x


def scatter_values(grad_values: Tensor, packed: Packed) -> Tensor:
    """Slot gradients ``(out, in//m, n)`` scattered into a dense ``(out, in)`` tensor, zeros elsewhere."""
    return unpack(packed.with_values(grad_values))


# -- native C kernels (bame.native) on their own token tiling -------------------------------------
def native_tile(packed: Packed, tokens: int) -> int:
    """Tokens per tile of the native kernels' tables for this layer (one size, so x and dY tiles align)."""
    return native.token_tile(max(packed.shape), tokens)


def native_tiles(a: Tensor, packed: Packed) -> Tensor:
    """``a (T, R)`` in the native kernels' tiled transposed layout ``(n_tiles, R, tw)``."""
    return native.to_tiles(a.contiguous(), native_tile(packed, a.shape[0]))


def _flat_values(packed: Packed) -> Tensor:
    return packed.values.reshape(-1).contiguous()  # (out * K,), row-major slot order


def fwd_native_tiles(x_tiles: Tensor, tokens: int, packed: Packed) -> Tensor:
    """:func:`fwd_native` from ``x`` already tiled: ``(n_tiles, in, tw)`` -> ``(T, out)``."""
    return native.bag(x_tiles, tokens, packed.cols, packed.row_ptr(), _flat_values(packed))


def fwd_native(x: Tensor, packed: Packed, tile: int = 0) -> Tensor:
    """``y[t, o] = sum_k values[o, k] * x[t, cols[o, k]]`` with the native bag kernel over tiles of ``x^T``.

    float32 CPU only (else ``NotImplementedError``). ``tile`` is ignored: the native tiling is fixed by the
    layer shape (:func:`native_tile`). The result is written directly in ``(T, out)`` layout.
    """
    native.check_inputs(x, packed.values)
    return fwd_native_tiles(native_tiles(x, packed), x.shape[0], packed)


def dx_native_tiles(dy_tiles: Tensor, tokens: int, packed: Packed) -> Tensor:
    """:func:`dx_native` from ``dY`` already tiled: ``(n_tiles, out, tw)`` -> ``(T, in)``."""
    perm, rows, crow = packed.transposed()
    weights = native.take(_flat_values(packed), perm)  # (nnz_real,) in W^T's CSR order
    return native.bag(dy_tiles, tokens, rows, crow, weights)


def dx_native(dy: Tensor, packed: Packed, tile: int = 0) -> Tensor:
    """``dX[t, i] = sum_{(o, i) kept} W[o, i] * dY[t, o]``: native bags over the columns (CSC structure).

    float32 CPU only. ``tile`` is ignored (see :func:`fwd_native`).
    """
    native.check_inputs(dy, packed.values)
    return dx_native_tiles(native_tiles(dy, packed), dy.shape[0], packed)


def dw_native_tiles(dy_tiles: Tensor, x_tiles: Tensor, tokens: int, packed: Packed) -> Tensor:
    """:func:`dw_native` from tiled ``dY`` and ``x``: the slot gradients ``(out, in//m, n)``."""
    flat = native.sampled_dot(dy_tiles, x_tiles, tokens, packed.cols, packed.row_ptr(), packed.slot_mask)
    return flat.view_as(packed.indices)


def dw_native(dy: Tensor, x: Tensor, packed: Packed, tile: int = 0) -> Tensor:
    """``dW[o, k] = <dY[:, o], x[:, cols[o, k]]>`` at kept slots with the native sampled-dot kernel.

    float32 CPU only; zero at padding slots. ``tile`` is ignored (see :func:`fwd_native`).
    """
    native.check_inputs(dy, x)
    return dw_native_tiles(native_tiles(dy, packed), native_tiles(x, packed), x.shape[0], packed)


def _forward_chunks(packed: Packed, tw: int) -> Tensor:
    """``(out, nch + 1)`` slot offsets of every row's chunks of whole blocks (each row has the same number of
    slots in a chunk: N per block), cached with the structure."""
    key = f"fwd_chunks:{tw}"
    if key not in packed._cache:
        out, in_ = packed.shape
        blocks = max(native.chunk_rows(tw, packed.m) // packed.m, 1)  # blocks of M columns per chunk
        nch = -(-(in_ // packed.m) // blocks)
        per_row = packed.slots_per_row
        edges = torch.clamp(torch.arange(nch + 1) * blocks * packed.n, max=per_row)  # (nch + 1,)
        rows = torch.arange(out).view(-1, 1) * per_row
        packed._cache[key] = (rows + edges.view(1, -1)).to(packed.cols.device)
    return packed._cache[key]


def _input_grad_chunks(packed: Packed, tw: int) -> Tensor:
    """``(in, nch + 1)`` offsets into the transposed structure (:meth:`Packed.transposed`) of every input
    column's entries by chunks of output rows, cached with the structure."""
    key = f"dx_chunks:{tw}"
    if key not in packed._cache:
        _, rows, crow = packed.transposed()
        out, in_ = packed.shape
        size = native.chunk_rows(tw)
        nch = -(-out // size)
        column = torch.repeat_interleave(torch.arange(in_, device=rows.device), crow[1:] - crow[:-1])
        counts = torch.bincount(column * nch + rows // size, minlength=in_ * nch).view(in_, nch)
        cptr = torch.zeros(in_, nch + 1, dtype=torch.int64, device=rows.device)
        cptr[:, 1:] = torch.cumsum(counts, dim=1)
        packed._cache[key] = cptr + crow[:-1].view(-1, 1)
    return packed._cache[key]


def fwd_chunked_tiles(x_tiles: Tensor, tokens: int, packed: Packed) -> Tensor:
    """:func:`fwd_native_tiles` blocked by input columns so a chunk of the table stays in L1:
    ``(n_tiles, in, tw)`` -> ``(T, out)``."""
    return native.bag_chunked(x_tiles, tokens, packed.cols, _forward_chunks(packed, x_tiles.shape[2]),
                              _flat_values(packed))


def fwd_chunked(x: Tensor, packed: Packed, tile: int = 0) -> Tensor:
    """``y = x (W*B)^T`` with :func:`bame.native.bag_chunked` (float32 CPU; ``tile`` is ignored)."""
    native.check_inputs(x, packed.values)
    return fwd_chunked_tiles(native_tiles(x, packed), x.shape[0], packed)


def dx_chunked_tiles(dy_tiles: Tensor, tokens: int, packed: Packed) -> Tensor:
    """:func:`dx_native_tiles` blocked by output rows: ``(n_tiles, out, tw)`` -> ``(T, in)``."""
    perm, rows, _ = packed.transposed()
    return native.bag_chunked(dy_tiles, tokens, rows, _input_grad_chunks(packed, dy_tiles.shape[2]),
                              _flat_values(packed), perm)


def dx_chunked(dy: Tensor, packed: Packed, tile: int = 0) -> Tensor:
    """``dX = dY (W*B)`` with :func:`bame.native.bag_chunked` over the transposed structure."""
    native.check_inputs(dy, packed.values)
    return dx_chunked_tiles(native_tiles(dy, packed), dy.shape[0], packed)


# -- native row-major kernels: x, dY and the results in their own (T, features) layout ------------------
def fwd_direct(x: Tensor, packed: Packed, tile: int = 0) -> Tensor:
    """``y = x (W*B)^T`` with :func:`bame.native.rows_forward`: 16 output rows in lockstep over 16-token tiles
    of ``x`` transposed in registers, written straight into ``(T, out)`` (float32 CPU; ``tile`` is ignored)."""
    native.check_inputs(x, packed.values)
    return native.rows_forward(x.contiguous(), packed.cols, _flat_values(packed), packed.shape[0])


def dx_direct(dy: Tensor, packed: Packed, tile: int = 0) -> Tensor:
    """``dX = dY (W*B)`` with :func:`bame.native.rows_input_grad`: every slot scatters ``w * dY^T[row]`` into its
    column of a tile's table (the forward structure, no transposed one; ``tile`` is ignored)."""
    native.check_inputs(dy, packed.values)
    return native.rows_input_grad(dy.contiguous(), packed.cols, _flat_values(packed), packed.shape[1])


def dw_direct(dy: Tensor, x: Tensor, packed: Packed, tile: int = 0) -> Tensor:
    """``dW`` at the kept slots with :func:`bame.native.rows_weight_grad` on row-major ``dY`` and ``x``: the slot
    gradients ``(out, in//m, n)``, zero at padding slots (``tile`` is ignored)."""
    native.check_inputs(dy, x)
    grad = native.rows_weight_grad(dy.contiguous(), x.contiguous(), packed.cols, packed.slot_mask)
    return grad.view_as(packed.indices)


def scatter_values_native(grad_values: Tensor, packed: Packed) -> Tensor:
    """:func:`scatter_values` in one parallel pass (zeros and slot values written row by row)."""
    return native.scatter_rows(
        grad_values.reshape(-1).contiguous(), packed.cols, packed.row_ptr(), packed.shape, packed.slot_mask
    )


def semi_structured_problem(x: Tensor, packed: Packed) -> str | None:
    """Why the 2:4 units cannot compute this layer's products (:mod:`bame.kernels.semi`), or None."""
    return semi.semi_structured_problem(x, packed.n, packed.m, packed.shape)


def _semi_cache(packed: Packed) -> semi.SemiCache:
    cache = packed._cache.get("semi")
    if cache is None:
        cache = packed._cache["semi"] = semi.SemiCache()
    return cache


def fwd_semi_structured(x: Tensor, packed: Packed, tile: int = 0) -> Tensor:
    """``y = x @ (W*B)^T`` on CUDA's 2:4 units (:mod:`bame.kernels.semi`). The compressed weight is kept
    with the structure until the values change (one compression per optimizer step, whatever the number of
    micro-batches). Raises ``NotImplementedError`` where it cannot run, which makes the planner skip it.
    ``tile`` is ignored."""
    problem = semi_structured_problem(x, packed)
    if problem is not None:
        raise NotImplementedError(problem)
    compressed = _semi_cache(packed).get("fwd", packed.values, unpack(packed).to(x.dtype))
    return semi.semi_structured_linear(x, compressed=compressed, out_features=packed.shape[0])


def dx_semi_structured(dy: Tensor, packed: Packed, tile: int = 0) -> Tensor:
    """``dX = dY (W*B_bwd)`` on CUDA's 2:4 units, for a backward packing N:M along the *output* axis
    (BAME-dagger): ``dX^T = (W*B_bwd)^T dY^T`` with the transposed weight compressed once per step."""
    problem = semi.semi_structured_problem(dy, packed.n, packed.m, (packed.shape[1], packed.shape[0]))
    if problem is not None:
        raise NotImplementedError(problem)
    compressed = _semi_cache(packed).get("dx", packed.values, unpack(packed).to(dy.dtype).t())
    return semi.semi_structured_dx(dy, compressed_t=compressed, in_features=packed.shape[1])


ProductFn = Callable[[Tensor, Packed, int], Tensor]
FORWARD: dict[str, ProductFn] = {
    "dense": fwd_dense, "embag": fwd_embag, "csr": fwd_csr, "native": fwd_native, "chunked": fwd_chunked,
    "direct": fwd_direct, "semi_structured": fwd_semi_structured,
}
#: Formulations that can only run on a GPU (the planner skips them elsewhere).
CUDA_ONLY = frozenset({"semi_structured"})  # the 2:4 units (fwd and, with a backward mask, dX)
#: Formulations of the native C kernels (bame.native): float32 CPU tensors and a C compiler.
NATIVE_ONLY = frozenset({"native", "chunked", "direct"})
INPUT_GRAD: dict[str, ProductFn] = {
    "dense": dx_dense, "embag": dx_embag, "csr": dx_csr, "native": dx_native, "chunked": dx_chunked,
    "direct": dx_direct, "semi_structured": dx_semi_structured,
}
WEIGHT_GRAD: dict[str, Callable[[Tensor, Tensor, Packed, int], Tensor]] = {
    "dense": dw_dense,
    "sampled": dw_sampled,
    "native": dw_native,
    "direct": dw_direct,
}
# The same products on token tiles (see bame.kernels.tiles): NMLinearFunction shares the tiles among them.
FORWARD_TILES: dict[str, Callable[[Tensor, Packed], Tensor]] = {"embag": fwd_embag_tiles}
INPUT_GRAD_TILES: dict[str, Callable[[Tensor, Packed], Tensor]] = {"embag": dx_embag_tiles}
WEIGHT_GRAD_TILES: dict[str, Callable[[Tensor, Tensor, Packed], Tensor]] = {"sampled": dw_sampled_tiles}


class NMLinearFunction(torch.autograd.Function):
    """``y = x @ (W*B)^T + b`` keeping all three products sparse, as a plan picks.

    The values are gathered from ``weight`` at the packed slots on every call (O(nnz)), so the result is
    always exact for the current weight, even at a pruned entry that holds a non-zero (straight-through
    methods); only the *structure* of the packed arguments is used. ``x`` and ``dY`` are transposed into
    token tiles at most once each, shared by every tiled formulation of the plan (the native kernels use
    their own tiling, :func:`native_tiles`, likewise shared: x by the forward and dW, dY by dX and dW).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        packed_fwd: Packed,
        packed_bwd: Packed | None,
        bias: Tensor | None,
        plan: Plan | None,
        dense_wgrad: bool,
        weight_is_masked: bool = False,
        grad_sink: list | None = None,
    ) -> Tensor:
        """Compute ``y (..., out)`` from ``x (..., in)``; see the class docstring.

        ``weight_is_masked`` promises that ``weight`` is zero outside the forward packing (it is the
        parametrization's ``W*B``): dense products then use it as it is instead of unpacking the values.
        When the backward computes a weight gradient that is zero outside the forward packing (every case
        but ``dense_wgrad``), it appends ``(data_ptr, version, numel)`` of that gradient to ``grad_sink``:
        if the parameter's ``.grad`` is still exactly that tensor, masking it again is a no-op.
        """
        fwd, dx_name, dw_name, tile = _names(plan)
        x2 = x.reshape(-1, x.shape[-1])  # (T, in)
        # A dense product uses ``weight`` itself: it *is* W*B (the parametrization's output), so there is
        # nothing to unpack; only an input gradient through a separate backward mask needs W*B_bwd.
        dense_dx = weight_is_masked and ctx.needs_input_grad[0] and dx_name == "dense" and packed_bwd is None
        tokens = x2.shape[0]
        tile = tile or layer_tile(packed_fwd.shape, tokens, x2)
        sparse_dw = ctx.needs_input_grad[1] and not dense_wgrad
        tiled_dw = sparse_dw and dw_name in WEIGHT_GRAD_TILES
        native_dw = sparse_dw and dw_name == "native"
        vals_fwd = packed_fwd.gather_values(weight).to(x.dtype)  # (out, in//m, n)
        vals_bwd = None if packed_bwd is None else packed_bwd.gather_values(weight).to(x.dtype)
        x_tiles = to_tiles(x2, tile) if fwd in FORWARD_TILES or tiled_dw else None  # (n_tiles, in, tile)
        # The native kernels' own tiling of x^T, shared by the forward and the weight gradient.
        x_nt = native_tiles(x2, packed_fwd) if fwd == "native" or native_dw else None  # (n_tiles, in, tw)
        pf = packed_fwd.with_values(vals_fwd)
        if fwd == "native":
            y2 = fwd_native_tiles(x_nt, tokens, pf)  # (T, out), a fresh tensor
            if bias is not None:
                y2.add_(bias)
        else:
            if fwd == "dense" and weight_is_masked:
                y2 = F.linear(x2, weight.to(x.dtype))  # (T, out)
            elif fwd in FORWARD_TILES:
                y2 = from_tiles(FORWARD_TILES[fwd](x_tiles, pf), tokens)  # (T, out)
            else:
                y2 = FORWARD[fwd](x2, pf, tile)  # (T, out)
            if bias is not None:
                y2 = y2 + bias
        # Keep only the layout of x that the weight gradient will read (none if the weight is frozen).
        saved_x = (x_nt if native_dw else x_tiles if tiled_dw else x2) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(saved_x, vals_fwd, vals_bwd, weight if dense_dx else None)
        ctx.packed, ctx.plan_names = (packed_fwd, packed_bwd), (fwd, *_names(plan)[1:3], tile)
        ctx.dense_wgrad, ctx.x_shape, ctx.w_dtype, ctx.grad_sink = dense_wgrad, x.shape, weight.dtype, grad_sink
        return y2.view(*x.shape[:-1], packed_fwd.shape[0])

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        """``dX`` with the backward packing (else the forward one), ``dW`` (kept slots or dense), ``db``."""
        saved_x, vals_fwd, vals_bwd, dense_weight = ctx.saved_tensors
        packed_fwd, packed_bwd = ctx.packed
        _, dx_name, dw_name, tile = ctx.plan_names
        dy2 = grad_y.reshape(-1, grad_y.shape[-1])  # (T, out)
        tokens = dy2.shape[0]
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        tiled_dw = need_dw and not ctx.dense_wgrad and dw_name in WEIGHT_GRAD_TILES
        native_dw = need_dw and not ctx.dense_wgrad and dw_name == "native"
        tiled_dx = need_dx and dx_name in INPUT_GRAD_TILES
        native_dx = need_dx and dx_name == "native"
        dy_tiles = to_tiles(dy2, tile) if tiled_dx or tiled_dw else None  # (n_tiles, out, tile)
        # One native tiling of dY^T, shared by the input and the weight gradient.
        dy_nt = native_tiles(dy2, packed_fwd) if native_dx or native_dw else None  # (n_tiles, out, tw)
        dx = dw = db = None
        if need_dx:
            p_dx = (
                packed_fwd.with_values(vals_fwd) if packed_bwd is None else packed_bwd.with_values(vals_bwd)
            )
            if dense_weight is not None:
                dx = dy2 @ dense_weight.to(dy2.dtype)  # (T, in)
            elif native_dx:
                dx = dx_native_tiles(dy_nt, tokens, p_dx)  # (T, in)
            elif tiled_dx:
                dx = from_tiles(INPUT_GRAD_TILES[dx_name](dy_tiles, p_dx), tokens)  # (T, in)
            else:
                dx = INPUT_GRAD[dx_name](dy2, p_dx, tile)  # (T, in)
            dx = dx.view(ctx.x_shape)
        if need_dw:
            pf = packed_fwd.with_values(vals_fwd)
            if ctx.dense_wgrad:
                dw = dw_full(dy2, saved_x)  # (out, in)
            elif dw_name == "dense":
                dw = dw_dense_masked(dy2, saved_x, pf)  # (out, in)
            elif native_dw:
                dw = _scatter(dw_native_tiles(dy_nt, saved_x, tokens, pf), pf)  # (out, in)
            elif tiled_dw:
                dw = _scatter(WEIGHT_GRAD_TILES[dw_name](dy_tiles, saved_x, pf), pf)  # (out, in)
            else:
                dw = _scatter(WEIGHT_GRAD[dw_name](dy2, saved_x, pf, tile), pf)  # (out, in)
            dw = dw.to(ctx.w_dtype)
            if ctx.grad_sink is not None and not ctx.dense_wgrad:
                ctx.grad_sink.append((dw.data_ptr(), dw._version, dw.numel()))
        if ctx.needs_input_grad[4]:
            db = dy2.sum(0)  # (out,)
        return dx, dw, None, None, db, None, None, None, None


def _scatter(grad_values: Tensor, packed: Packed) -> Tensor:
    """The dense ``(out, in)`` weight gradient from slot gradients: one native pass when it can run."""
    if grad_values.dtype == torch.float32 and grad_values.device.type == "cpu" and native.available():
        return scatter_values_native(grad_values, packed)
    return scatter_values(grad_values, packed)


def _names(plan: Plan | None) -> tuple[str, str, str, int]:
    """``(fwd, dx, dw, tile)`` formulation names of a plan; all dense when there is none."""
    if plan is None:
        return "dense", "dense", "dense", 0
    return plan.fwd, plan.dx, plan.dw, plan.tile


def nm_linear(
    x: Tensor,
    weight: Tensor,
    packed_fwd: Packed,
    packed_bwd: Packed | None = None,
    bias: Tensor | None = None,
    plan: Plan | None = None,
    dense_wgrad: bool = False,
    weight_is_masked: bool = False,
    grad_sink: list | None = None,
) -> Tensor:
    """Functional form of :class:`NMLinearFunction`: ``x @ (W*B)^T + b`` with sparse products."""
    return NMLinearFunction.apply(x, weight, packed_fwd, packed_bwd, bias, plan, dense_wgrad, weight_is_masked,
                                  grad_sink)
