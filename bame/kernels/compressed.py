"""The products of a layer stored compressed: only its kept values ``(K, N)`` and their in-block positions.

Forward, input gradient and the weight gradient *at the kept slots only*, for Linear layers (N:M along
``in``) and convolutions (N:M along the input channels): the weight gradient is the values' gradient
``(K, N)`` directly, never a dense tensor, except on the iterations where the method needs the dense
gradient (BAME's update iterations): there one dense weight-gradient product runs and is handed to the
storage (``storage.stash``) for the mask update.

A *storage* is the object that holds a layer's compressed structure (:class:`bame.compressed.CompressedNM`):
``shape``, ``n``, ``m``, ``dense(values)`` (the dense weight), ``gather(dense)`` (a dense tensor at the kept
slots), ``packed(values)`` (the structure the Linear kernels take), ``want_dense_grad`` and ``stash(grad)``.
Which formulation computes each product is a :class:`~bame.kernels.plan.Plan` (``None``: all dense).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bame import native
from bame.kernels.conv import ConvGeometry, ConvTerms, conv_dw, conv_dx, conv_forward, conv_terms
from bame.kernels.linear import (
    FORWARD,
    INPUT_GRAD,
    WEIGHT_GRAD,
    dw_native_tiles,
    dx_chunked_tiles,
    dx_native_tiles,
    fwd_chunked_tiles,
    fwd_native_tiles,
    native_tiles,
)
from bame.kernels.packed import Packed
from bame.kernels.plan import Plan, time_interleaved
from bame.kernels.slots import SlotStructure

__all__ = ["CompressedConvFunction", "CompressedLinearFunction", "compressed_conv", "compressed_linear",
           "conv_backward_product", "conv_forward_product", "linear_backward", "linear_forward", "time_layer_step"]


def _names(plan: Any) -> tuple[str, str, str]:
    return ("dense", "dense", "dense") if plan is None else (plan.fwd, plan.dx, plan.dw)


#: Formulations that read the native kernels' tiling of x^T and dY^T (one tiling shared by the products).
FORWARD_TILED = {"native": fwd_native_tiles, "chunked": fwd_chunked_tiles}
INPUT_GRAD_TILED = {"native": dx_native_tiles, "chunked": dx_chunked_tiles}


def _native_slots(vals: Tensor) -> bool:
    return vals.dtype == torch.float32 and vals.device.type == "cpu" and native.available()


def linear_dense(storage: Any, vals: Tensor) -> Tensor:
    """A Linear layer's dense ``(out, in)`` weight from its values: one native pass over the rows on float32
    CPU tensors (the storage's blockwise scatter takes 1.3-2x as long), else that scatter."""
    if not _native_slots(vals):
        return storage.dense(vals)
    packed = storage.packed(vals)
    return native.scatter_rows(vals.reshape(-1).contiguous(), packed.cols, packed.row_ptr(), packed.shape)


def linear_forward(x2: Tensor, vals: Tensor, storage: Any, bias: Tensor | None, plan_names: tuple[str, str, str],
                   tile_x: bool, dense: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """``y = x W^T + b`` on ``(T, in)`` rows, W compressed; also the native kernels' tiling of x^T when the
    forward or (``tile_x``) the weight gradient reads it (one tiling shared by both). ``dense``: the dense
    weight, when the caller has it already (a dense forward then scatters nothing)."""
    fwd, _, dw_name = plan_names
    packed = None if fwd == "dense" else storage.packed(vals)
    x_nt = native_tiles(x2, storage.packed(vals)) if fwd in FORWARD_TILED or (tile_x and dw_name == "native") else None
    if fwd == "dense":
        y2 = F.linear(x2, linear_dense(storage, vals) if dense is None else dense)  # (T, out)
    elif fwd in FORWARD_TILED:
        y2 = FORWARD_TILED[fwd](x_nt, x2.shape[0], packed)
    else:
        y2 = FORWARD[fwd](x2, packed, 0)
    if bias is not None:  # a sparse product's output is a fresh tensor: add in place (no second (T, out) copy)
        y2 = y2 + bias if fwd == "dense" else y2.add_(bias)
    return y2, x_nt


def linear_backward(dy2: Tensor, x2: Tensor, vals: Tensor, storage: Any, plan_names: tuple[str, str, str],
                    need_dx: bool, need_dw: bool, x_nt: Tensor | None = None,
                    dense: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
    """``(dX (T, in), d values (K, N))`` from ``dY (T, out)``; on the storage's update iterations
    (``want_dense_grad``) the weight gradient is one dense product, handed to the storage. ``dense``: the
    forward's dense weight, for a dense input gradient without a backward mask (not scattered twice)."""
    _, dx_name, dw_name = plan_names
    sparse_dw = need_dw and not storage.want_dense_grad and dw_name != "dense"
    tiled = (need_dx and dx_name in INPUT_GRAD_TILED) or (sparse_dw and dw_name == "native")
    dy_nt = native_tiles(dy2, storage.packed(vals)) if tiled else None  # one tiling of dY^T for dX and dW
    dx = dvals = None
    if need_dx:
        bwd = vals if storage.bwd_keep is None else vals * storage.bwd_keep  # BAME-dagger's backward mask
        if dx_name == "dense":
            dx = dy2 @ (linear_dense(storage, bwd) if dense is None or storage.bwd_keep is not None else dense)
        elif dx_name in INPUT_GRAD_TILED:
            dx = INPUT_GRAD_TILED[dx_name](dy_nt, dy2.shape[0], storage.packed(bwd))
        else:
            dx = INPUT_GRAD[dx_name](dy2, storage.packed(bwd), 0)
    if need_dw:
        if sparse_dw and dw_name == "native":
            if x_nt is None:
                x_nt = native_tiles(x2, storage.packed(vals))
            dvals = dw_native_tiles(dy_nt, x_nt, dy2.shape[0], storage.packed(vals))
        elif sparse_dw:
            dvals = WEIGHT_GRAD[dw_name](dy2, x2, storage.packed(vals), 0)
        elif storage.want_dense_grad and getattr(storage, "compact_grad", False):
            dvals = storage.stash_product(dy2, x2)  # the dense product in row chunks, kept compact
        else:
            full = dy2.t() @ x2  # (out, in): the one dense weight-gradient product
            if storage.want_dense_grad:
                storage.stash(full)
            dvals = storage.gather(full)  # torch's gather: faster than a native one here
        dvals = dvals.reshape(-1, storage.n)
    return dx, dvals


class CompressedLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` for a compressed W: every product from the values and indices (see module doc)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, values: Tensor, storage: Any, bias: Tensor | None, plan: Any) -> Tensor:
        names = _names(plan)
        x2 = x.reshape(-1, x.shape[-1])  # (T, in)
        vals = values.detach().to(x.dtype)
        # Dense forward and input gradient on one weight: scatter it once, keep it for the backward.
        reuse = names[:2] == ("dense", "dense") and storage.bwd_keep is None and ctx.needs_input_grad[0]
        dense = linear_dense(storage, vals) if reuse else None  # (out, in)
        y2, x_nt = linear_forward(x2, vals, storage, bias, names, ctx.needs_input_grad[1], dense)
        ctx.save_for_backward(x2, vals, x_nt, dense)
        ctx.storage, ctx.plan_names, ctx.x_shape, ctx.v_dtype = storage, names, x.shape, values.dtype
        ctx.has_bias = bias is not None
        return y2.view(*x.shape[:-1], storage.shape[0])

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x2, vals, x_nt, dense = ctx.saved_tensors
        dy2 = grad_y.reshape(-1, grad_y.shape[-1]).to(x2.dtype)  # (T, out)
        dx, dvals = linear_backward(dy2, x2, vals, ctx.storage, ctx.plan_names, ctx.needs_input_grad[0],
                                    ctx.needs_input_grad[1], x_nt, dense)
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return (None if dx is None else dx.view(ctx.x_shape)), (None if dvals is None else dvals.to(ctx.v_dtype)), \
            None, db, None


def compressed_linear(x: Tensor, values: Tensor, storage: Any, bias: Tensor | None = None,
                      plan: Any = None) -> Tensor:
    """Functional form of :class:`CompressedLinearFunction`."""
    return CompressedLinearFunction.apply(x, values, storage, bias, plan)


def _conv_geo(storage: Any, x: Tensor, conf: tuple, plan: Any) -> ConvGeometry | None:
    """The native kernels' geometry, or None when every product of ``plan`` is dense."""
    stride, padding, dilation = conf
    return None if plan is None or plan.is_dense else conv_geometry(storage, x, padding, dilation, stride)


def conv_forward_product(x: Tensor, vals: Tensor, storage: Any, bias: Tensor | None, conf: tuple,
                         plan: Any) -> Tensor:
    """``y``: a convolution (``conf = (stride, padding, dilation)``) of contiguous ``x`` with the compressed
    weight holding ``vals``, native or dense on the scattered weight as ``plan`` says."""
    geo = _conv_geo(storage, x, conf, plan)
    if geo is not None and plan.fwd == "native":
        y = conv_forward(x, vals, storage.indices, geo, storage.m, _terms(storage, geo))
        return y if bias is None else y + bias.view(1, -1, 1, 1)
    return F.conv2d(x, storage.dense(vals), bias, *conf)


def conv_backward_product(grad_y: Tensor, x: Tensor, vals: Tensor, storage: Any, conf: tuple, plan: Any,
                          need_dx: bool, need_dw: bool) -> tuple[Tensor | None, Tensor | None]:
    """``(dX, d values (K, N))`` of :func:`conv_forward_product`; on the storage's update iterations
    (``want_dense_grad``) the weight gradient is dense, handed to the storage."""
    stride, padding, dilation = conf
    geo = _conv_geo(storage, x, conf, plan)
    grad_y = grad_y.to(x.dtype).contiguous()
    bwd = vals if storage.bwd_keep is None else vals * storage.bwd_keep  # dX's operand (BAME-dagger)
    native_dx = geo is not None and plan.dx == "native" and need_dx
    native_dw = geo is not None and plan.dw == "native" and not storage.want_dense_grad
    dense_mask = [need_dx and not native_dx, need_dw and not native_dw, False]
    dx = dvals = None
    if any(dense_mask):
        dx, dw, _ = torch.ops.aten.convolution_backward(
            grad_y, x, storage.dense(bwd), None, list(stride), list(padding), list(dilation), False, [0, 0], 1,
            dense_mask)
        if dw is not None:
            if storage.want_dense_grad:
                storage.stash(dw)
            dvals = storage.gather(dw)
    if native_dx:
        dx = conv_dx(grad_y, bwd, storage.indices, geo, storage.m, _terms(storage, geo))
    if native_dw and need_dw:
        dvals = conv_dw(grad_y, x, storage.indices, geo, storage.m, _terms(storage, geo))
    return dx, dvals


class CompressedConvFunction(torch.autograd.Function):
    """A convolution with a compressed weight (N:M along the input channels): each product native
    (:mod:`bame.kernels.conv`, any stride) or dense on the scattered weight, as the layer's
    :class:`~bame.kernels.conv.ConvPlan` says; the weight gradient at the kept slots (the dense gradient
    handed to the storage on update iterations)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, values: Tensor, storage: Any, bias: Tensor | None, stride: tuple,
                padding: tuple, dilation: tuple, plan: Any) -> Tensor:
        vals = values.detach().to(x.dtype)
        conf = (stride, padding, dilation)
        ctx.save_for_backward(x, vals)
        ctx.storage, ctx.conf, ctx.plan, ctx.has_bias, ctx.v_dtype = storage, conf, plan, bias is not None, \
            values.dtype
        return conv_forward_product(x, vals, storage, bias, conf, plan)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, vals = ctx.saved_tensors
        dx, dvals = conv_backward_product(grad_y, x, vals, ctx.storage, ctx.conf, ctx.plan, ctx.needs_input_grad[0],
                                          ctx.needs_input_grad[1])
        db = grad_y.sum(dim=(0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return dx, (None if dvals is None else dvals.to(ctx.v_dtype)), None, db, None, None, None, None


def _terms(storage: Any, geo: ConvGeometry) -> ConvTerms:
    """The layer's terms for this geometry, kept by the storage until its slots change."""
    return storage._cached(f"conv terms {geo}", lambda: conv_terms(storage.indices, geo, storage.m))


def conv_geometry(storage: Any, x: Tensor, padding: tuple, dilation: tuple, stride: tuple = (1, 1)) -> ConvGeometry:
    """The geometry of a compressed convolution on input ``x``."""
    out, cin, kh, kw = storage.shape
    return ConvGeometry(out, cin, kh, kw, x.shape[2], x.shape[3], tuple(padding), tuple(dilation), tuple(stride))


def compressed_conv(x: Tensor, values: Tensor, storage: Any, bias: Tensor | None, stride: tuple, padding: tuple,
                    dilation: tuple, plan: Any = None) -> Tensor:
    """Functional form of :class:`CompressedConvFunction`."""
    return CompressedConvFunction.apply(x, values, storage, bias, stride, padding, dilation, plan)


def time_layer_step(
    plan: Plan, packed: Packed, x: Tensor, dy: Tensor, device: torch.device, repeats: int, warmup: int
) -> dict[str, float]:
    """Median ms of a whole layer step as compressed storage runs it (forward, input gradient and the
    gradient of the kept values, :func:`bame.kernels.compressed.linear_forward` / ``linear_backward``):
    ``plan`` against all-dense products on the same values."""
    out, in_ = packed.shape
    slots = SlotStructure((out, in_), packed.n, packed.m, packed.indices.reshape(-1, packed.n))
    vals = packed.values.reshape(-1, packed.n)

    def run(names: tuple[str, str, str]) -> Callable[[], Tensor]:
        def step() -> Tensor:
            _, x_nt = linear_forward(x, vals, slots, None, names, True)
            _, dvals = linear_backward(dy, x, vals, slots, names, True, True, x_nt)
            return dvals

        return step

    with torch.no_grad():
        return time_interleaved({"dense": run(("dense",) * 3), "sparse": run((plan.fwd, plan.dx, plan.dw))},
                                device, repeats, warmup)
