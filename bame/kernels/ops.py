"""The compressed layers' products as PyTorch custom operators, so that compiled graphs call them.

``torch.compile`` cannot trace into the native kernels (ctypes) or into an autograd Function that keeps
Python objects; registered as operators (:mod:`torch.library`) with a fake implementation (shapes only,
for tracing) and an autograd formula, each product is one node of the graph:

* ``bame::compressed_linear(x, values, indices, bias, bwd_keep, out_features, in_features, n, m, fwd, dx, dw)``
  and its backward ``bame::compressed_linear_backward``: a Linear layer stored compressed (values
  ``(K, N)``, uint8 in-block positions ``(K, N)``), each product by the formulation its plan names
  (``"dense"``, ``"native"``, ``"chunked"``, ...; :mod:`bame.kernels.plan`);
* ``bame::compressed_conv`` and ``bame::compressed_conv_backward``: the same for a convolution
  (:mod:`bame.kernels.conv`; ``"dense"`` or ``"native"`` per product).

The operators compute the products only. An iteration on which the method needs the dense weight gradient
(BAME's mask updates, one per ``delta_t``) runs the layer eagerly instead (:mod:`bame.compressed`), because
that gradient is handed to the storage, a side effect a graph cannot hold.
"""

from typing import Any

import torch
from torch import Tensor

from bame.kernels.compressed import CompressedConvFunction, linear_backward, linear_forward
from bame.kernels.slots import SlotStructure

__all__ = ["compressed_conv", "compressed_linear"]


def _slots(shape: list[int], n: int, m: int, indices: Tensor, bwd_keep: Tensor | None) -> SlotStructure:
    return SlotStructure(tuple(shape), n, m, indices, bwd_keep)


def _empty(like: Tensor) -> Tensor:
    """An operator returns tensors, never None: a product that was not asked for is an empty tensor."""
    return like.new_empty(0)


# -- Linear ------------------------------------------------------------------------------------------------
@torch.library.custom_op("bame::compressed_linear", mutates_args=())
def compressed_linear(x: Tensor, values: Tensor, indices: Tensor, bias: Tensor | None, bwd_keep: Tensor | None,
                      out_features: int, in_features: int, n: int, m: int, fwd: str, dx: str, dw: str) -> Tensor:
    """``y = x W^T + b`` with W compressed (see the module doc)."""
    slots = _slots([out_features, in_features], n, m, indices, bwd_keep)
    x2 = x.reshape(-1, in_features)
    y2, _ = linear_forward(x2, values.detach().to(x.dtype), slots, bias, (fwd, dx, dw), tile_x=False)
    return y2.reshape(*x.shape[:-1], out_features)


@compressed_linear.register_fake
def _(x, values, indices, bias, bwd_keep, out_features, in_features, n, m, fwd, dx, dw):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("bame::compressed_linear_backward", mutates_args=())
def compressed_linear_backward(grad: Tensor, x: Tensor, values: Tensor, indices: Tensor, bwd_keep: Tensor | None,
                               out_features: int, in_features: int, n: int, m: int, fwd: str, dx: str, dw: str,
                               need_dx: bool, need_dw: bool) -> tuple[Tensor, Tensor]:
    """``(dX, d values)``: empty tensors for the ones not asked for."""
    slots = _slots([out_features, in_features], n, m, indices, bwd_keep)
    x2 = x.reshape(-1, in_features)
    dy2 = grad.reshape(-1, out_features).to(x2.dtype)
    dx_, dvals = linear_backward(dy2, x2, values.detach().to(x.dtype), slots, (fwd, dx, dw), need_dx, need_dw)
    return (_empty(x) if dx_ is None else dx_.reshape(x.shape),
            _empty(values) if dvals is None else dvals.to(values.dtype))


@compressed_linear_backward.register_fake
def _(grad, x, values, indices, bwd_keep, out_features, in_features, n, m, fwd, dx, dw, need_dx, need_dw):
    return (torch.empty_like(x) if need_dx else x.new_empty(0),
            torch.empty_like(values) if need_dw else values.new_empty(0))


def _linear_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, values, indices, bias, bwd_keep, *config = inputs
    ctx.save_for_backward(x, values, indices, bwd_keep)
    ctx.config, ctx.has_bias = config, bias is not None


def _linear_backward(ctx: Any, grad: Tensor) -> tuple:
    x, values, indices, bwd_keep = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dvals = torch.ops.bame.compressed_linear_backward(grad, x, values, indices, bwd_keep, *ctx.config, need_dx,
                                                          need_dw)
    db = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return (dx if need_dx else None, dvals if need_dw else None, None, db, None) + (None,) * len(ctx.config)


compressed_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


# -- convolutions ------------------------------------------------------------------------------------------
class _ConvCtx:
    """What CompressedConvFunction's backward reads from its context, for a call outside autograd."""

    def __init__(self, saved: tuple, storage: Any, conf: tuple, has_bias: bool, v_dtype: torch.dtype, plan: Any,
                 geo: Any, needs: tuple[bool, ...]) -> None:
        self.saved_tensors, self.storage, self.conf = saved, storage, conf
        self.has_bias, self.v_dtype = has_bias, v_dtype
        self.plan, self.geo, self.needs_input_grad = plan, geo, needs

    def save_for_backward(self, *tensors: Any) -> None:
        self.saved_tensors = tensors


def _conv_plan(fwd: str, dx: str, dw: str) -> Any:
    from bame.kernels.conv import ConvPlan

    return None if fwd == dx == dw == "dense" else ConvPlan(fwd, dx, dw)


def _conv_run(x: Tensor, values: Tensor, indices: Tensor, bias: Tensor | None, bwd_keep: Tensor | None,
              shape: list[int], n: int, m: int, stride: list[int], padding: list[int], dilation: list[int], fwd: str,
              dx: str, dw: str, needs: tuple[bool, ...]) -> tuple[Tensor, _ConvCtx]:
    slots = _slots(shape, n, m, indices, bwd_keep)
    ctx = _ConvCtx((), slots, (), bias is not None, values.dtype, None, None, needs)
    y = CompressedConvFunction.forward(ctx, x.contiguous(), values, slots, bias, tuple(stride), tuple(padding),
                                       tuple(dilation), _conv_plan(fwd, dx, dw))
    return y, ctx


@torch.library.custom_op("bame::compressed_conv", mutates_args=())
def compressed_conv(x: Tensor, values: Tensor, indices: Tensor, bias: Tensor | None, bwd_keep: Tensor | None,
                    shape: list[int], n: int, m: int, stride: list[int], padding: list[int], dilation: list[int],
                    fwd: str, dx: str, dw: str) -> Tensor:
    """A convolution with W compressed (see the module doc)."""
    y, _ = _conv_run(x, values, indices, bias, bwd_keep, shape, n, m, stride, padding, dilation, fwd, dx, dw,
                     (False, False, False, False))
    return y


@compressed_conv.register_fake
def _(x, values, indices, bias, bwd_keep, shape, n, m, stride, padding, dilation, fwd, dx, dw):
    out = [(size + 2 * p - d * (k - 1) - 1) // s + 1
           for size, k, s, p, d in zip(x.shape[2:], shape[2:], stride, padding, dilation, strict=True)]
    return x.new_empty(x.shape[0], shape[0], *out)


@torch.library.custom_op("bame::compressed_conv_backward", mutates_args=())
def compressed_conv_backward(grad: Tensor, x: Tensor, values: Tensor, indices: Tensor, bwd_keep: Tensor | None,
                             shape: list[int], n: int, m: int, stride: list[int], padding: list[int],
                             dilation: list[int], fwd: str, dx: str, dw: str, need_dx: bool,
                             need_dw: bool) -> tuple[Tensor, Tensor]:
    """``(dX, d values)`` (the forward's padded planes are rebuilt: the operator keeps no state)."""
    _, ctx = _conv_run(x, values, indices, None, bwd_keep, shape, n, m, stride, padding, dilation, fwd, dx, dw,
                       (need_dx, need_dw, False, False))
    dx_, dvals, *_ = CompressedConvFunction.backward(ctx, grad)
    return (_empty(x) if dx_ is None else dx_.contiguous(),
            _empty(values) if dvals is None else dvals.to(values.dtype))


@compressed_conv_backward.register_fake
def _(grad, x, values, indices, bwd_keep, shape, n, m, stride, padding, dilation, fwd, dx, dw, need_dx, need_dw):
    return (torch.empty_like(x) if need_dx else x.new_empty(0),
            torch.empty_like(values) if need_dw else values.new_empty(0))


def _conv_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, values, indices, bias, bwd_keep, *config = inputs
    ctx.save_for_backward(x, values, indices, bwd_keep)
    ctx.config, ctx.has_bias = config, bias is not None


def _conv_backward(ctx: Any, grad: Tensor) -> tuple:
    x, values, indices, bwd_keep = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dvals = torch.ops.bame.compressed_conv_backward(grad, x, values, indices, bwd_keep, *ctx.config, need_dx,
                                                        need_dw)
    db = grad.sum(dim=(0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return (dx if need_dx else None, dvals if need_dw else None, None, db, None) + (None,) * len(ctx.config)


compressed_conv.register_autograd(_conv_backward, setup_context=_conv_setup)
