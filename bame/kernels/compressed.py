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

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bame.kernels.linear import (
    FORWARD,
    INPUT_GRAD,
    WEIGHT_GRAD,
    dw_native_tiles,
    dx_native_tiles,
    fwd_native_tiles,
    native_tiles,
)

__all__ = ["CompressedConvFunction", "CompressedLinearFunction", "compressed_conv", "compressed_linear"]


def _names(plan: Any) -> tuple[str, str, str]:
    return ("dense", "dense", "dense") if plan is None else (plan.fwd, plan.dx, plan.dw)


class CompressedLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` for a compressed W: every product from the values and indices (see module doc)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, values: Tensor, storage: Any, bias: Tensor | None, plan: Any) -> Tensor:
        fwd, dx_name, dw_name = _names(plan)
        out = storage.shape[0]
        x2 = x.reshape(-1, x.shape[-1])  # (T, in)
        vals = values.detach().to(x.dtype)
        packed = storage.packed(vals) if "native" in (fwd, dw_name) or fwd != "dense" or dx_name != "dense" else None
        # The native kernels' tiling of x^T, shared by the forward and the weight gradient.
        sparse_dw = ctx.needs_input_grad[1] and dw_name == "native"
        x_nt = native_tiles(x2, packed) if packed is not None and (fwd == "native" or sparse_dw) else None
        if fwd == "dense":
            y2 = F.linear(x2, storage.dense(vals))  # (T, out)
        elif fwd == "native":
            y2 = fwd_native_tiles(x_nt, x2.shape[0], packed)
        else:
            y2 = FORWARD[fwd](x2, packed, 0)
        if bias is not None:
            y2 = y2 + bias
        ctx.save_for_backward(x2, vals, x_nt)
        ctx.storage, ctx.plan_names, ctx.x_shape, ctx.v_dtype = storage, (fwd, dx_name, dw_name), x.shape, values.dtype
        ctx.has_bias = bias is not None
        return y2.view(*x.shape[:-1], out)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x2, vals, x_nt = ctx.saved_tensors
        storage = ctx.storage
        _, dx_name, dw_name = ctx.plan_names
        dy2 = grad_y.reshape(-1, grad_y.shape[-1]).to(x2.dtype)  # (T, out)
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dense_dw = need_dw and (storage.want_dense_grad or dw_name != "native" and dw_name not in WEIGHT_GRAD)
        packed = storage.packed(vals) if "native" in (dx_name, dw_name) or dx_name != "dense" \
            or (need_dw and not storage.want_dense_grad and dw_name != "dense") else None
        dy_nt = None
        if packed is not None and ((need_dx and dx_name == "native") or (need_dw and dw_name == "native")):
            dy_nt = native_tiles(dy2, packed)  # one tiling of dY^T, shared by dX and dW
        dx = dvals = db = None
        if need_dx:
            bwd = vals if storage.bwd_keep is None else vals * storage.bwd_keep  # BAME-dagger's backward mask
            if dx_name == "dense":
                dx = dy2 @ storage.dense(bwd)  # (T, in)
            elif dx_name == "native":
                dx = dx_native_tiles(dy_nt, dy2.shape[0], storage.packed(bwd))
            else:
                dx = INPUT_GRAD[dx_name](dy2, storage.packed(bwd), 0)
            dx = dx.view(ctx.x_shape)
        if need_dw:
            if storage.want_dense_grad or dense_dw or dw_name == "dense":
                full = dy2.t() @ x2  # (out, in): the one dense weight-gradient product
                if storage.want_dense_grad:
                    storage.stash(full)
                dvals = storage.gather(full)
            elif dw_name == "native":
                dvals = dw_native_tiles(dy_nt, x_nt, dy2.shape[0], packed).reshape(-1, storage.n)
            else:
                dvals = WEIGHT_GRAD[dw_name](dy2, x2, packed, 0).reshape(-1, storage.n)
            dvals = dvals.to(ctx.v_dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = dy2.sum(0)
        return dx, dvals, None, db, None


def compressed_linear(x: Tensor, values: Tensor, storage: Any, bias: Tensor | None = None,
                      plan: Any = None) -> Tensor:
    """Functional form of :class:`CompressedLinearFunction`."""
    return CompressedLinearFunction.apply(x, values, storage, bias, plan)


class CompressedConvFunction(torch.autograd.Function):
    """A convolution with a compressed weight (N:M along the input channels), portable: the weight is
    scattered dense for the products, and the weight gradient gathered at the kept slots (the dense
    gradient handed to the storage on update iterations)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, values: Tensor, storage: Any, bias: Tensor | None, stride: tuple,
                padding: tuple, dilation: tuple) -> Tensor:
        vals = values.detach().to(x.dtype)
        weight = storage.dense(vals)
        ctx.save_for_backward(x, vals)
        ctx.storage, ctx.conf, ctx.has_bias, ctx.v_dtype = storage, (stride, padding, dilation), bias is not None, \
            values.dtype
        return F.conv2d(x, weight, bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, vals = ctx.saved_tensors
        storage = ctx.storage
        stride, padding, dilation = ctx.conf
        weight = storage.dense(vals if storage.bwd_keep is None else vals * storage.bwd_keep)  # dX's operand
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[3]]
        dx, dw, db = torch.ops.aten.convolution_backward(
            grad_y.to(x.dtype), x, weight, [weight.shape[0]] if ctx.has_bias else None, list(stride),
            list(padding), list(dilation), False, [0, 0], 1, mask)
        dvals = None
        if dw is not None:
            if storage.want_dense_grad:
                storage.stash(dw)
            dvals = storage.gather(dw).to(ctx.v_dtype)
        return dx, dvals, None, db, None, None, None


def compressed_conv(x: Tensor, values: Tensor, storage: Any, bias: Tensor | None, stride: tuple, padding: tuple,
                    dilation: tuple) -> Tensor:
    """Functional form of :class:`CompressedConvFunction`."""
    return CompressedConvFunction.apply(x, values, storage, bias, stride, padding, dilation)
