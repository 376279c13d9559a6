"""The compressed layers' products as PyTorch custom operators, so that compiled graphs call them.

``torch.compile`` cannot trace into the native kernels (ctypes) or into an autograd Function that keeps
Python objects; registered as operators (:mod:`torch.library`) with a fake implementation (shapes only,
for tracing) and an autograd formula, each product is one node of the graph:

* ``bame::compressed_linear(x, values, indices, bias, bwd_keep, out_features, in_features, n, m, fwd, dx, dw)``
  and its backward ``bame::compressed_linear_backward``: a Linear layer stored compressed (values
  ``(K, N)``, uint8 in-block positions ``(K, N)``), each product by the formulation its plan names
  (``"dense"``, ``"native"``, ``"chunked"``, ...; :mod:`bame.kernels.plan`);
* ``bame::compressed_conv`` and ``bame::compressed_conv_backward``: the same for a convolution
  (:mod:`bame.kernels.conv`; ``"dense"`` or ``"native"`` per product);
* ``bame::slot_values`` and its backward ``bame::slot_scatter``: a dense weight's values at the slots
  (N:M blocks along its rows), for the sparse kernels of layers stored dense (:mod:`bame.kernels.attach`):
  one gather forward and one scatter backward, which a compiler would otherwise lower to a sort.

The operators compute the products only. An iteration on which the method needs the dense weight gradient
(BAME's mask updates, one per ``delta_t``) runs the layer eagerly instead (:mod:`bame.compressed`), because
that gradient is handed to the storage, a side effect a graph cannot hold.
"""

import math
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

from bame.kernels.compressed import conv_backward_product, conv_forward_product, linear_backward, linear_forward
from bame.kernels.conv import ConvPlan
from bame.kernels.slots import SlotStructure

__all__ = ["clear_slots", "compressed_conv", "compressed_linear", "slot_scatter", "slot_values"]


#: The slot structures of the operators' recent ``indices`` tensors, most recent last (see :func:`_slots`).
_SLOTS: OrderedDict[int, SlotStructure] = OrderedDict()
_SLOTS_KEPT = 128  # more than the sparse layers of the models trained here (ResNet-50: 53, ViT-B: 48)


def _slots(shape: list[int], n: int, m: int, indices: Tensor, bwd_keep: Tensor | None) -> SlotStructure:
    """The slot structure of ``indices``, kept between calls for the last :data:`_SLOTS_KEPT` indices tensors:
    its derived structures (absolute columns, the transposed order some formulations read: a sort) are rebuilt
    when the indices change in place (their version), not at every call of an operator. Entries hold their
    tensor (so an id is never reused while cached) and are dropped oldest first, or by :func:`clear_slots`."""
    key = id(indices)
    slots = _SLOTS.get(key)
    if slots is None or slots.indices is not indices or slots.shape != tuple(shape) or (slots.n, slots.m) != (n, m) \
            or slots.bwd_keep is not bwd_keep:
        slots = _SLOTS[key] = SlotStructure(tuple(shape), n, m, indices, bwd_keep)
        while len(_SLOTS) > _SLOTS_KEPT:
            _SLOTS.popitem(last=False)
    _SLOTS.move_to_end(key)
    return slots


def clear_slots() -> None:
    """Forget the operators' cached slot structures (their memory is freed with the tensors' last use)."""
    _SLOTS.clear()


def _empty(like: Tensor) -> Tensor:
    """An operator returns tensors, never None: a product that was not asked for is an empty tensor."""
    return like.new_empty(0)


def _fake_backward(grad: Tensor, x: Tensor, values: Tensor, *config: Any) -> tuple[Tensor, Tensor]:
    """The backward operators' fake: ``(dX, d values)`` shaped as x and the values, empty where not asked
    (``config`` ends with ``need_dx, need_dw``)."""
    need_dx, need_dw = config[-2:]
    return (torch.empty_like(x) if need_dx else x.new_empty(0),
            torch.empty_like(values) if need_dw else values.new_empty(0))


def _setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    """Both operators' autograd context: the tensors, and the configuration after ``bwd_keep``."""
    x, values, indices, bias, bwd_keep, *config = inputs
    ctx.save_for_backward(x, values, indices, bwd_keep)
    ctx.config, ctx.has_bias = config, bias is not None


def _autograd(backward_op: Any, bias_grad: Any) -> Any:
    """The autograd formula of an operator whose products' backward is ``backward_op`` (``bias_grad(grad)``:
    the bias's gradient)."""

    def backward(ctx: Any, grad: Tensor) -> tuple:
        x, values, indices, bwd_keep = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx, dvals = backward_op(grad, x, values, indices, bwd_keep, *ctx.config, need_dx, need_dw)
        db = bias_grad(grad) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return (dx if need_dx else None, dvals if need_dw else None, None, db, None) + (None,) * len(ctx.config)

    return backward


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


compressed_linear_backward.register_fake(_fake_backward)
compressed_linear.register_autograd(
    _autograd(torch.ops.bame.compressed_linear_backward, lambda grad: grad.reshape(-1, grad.shape[-1]).sum(0)),
    setup_context=_setup)


# -- convolutions ------------------------------------------------------------------------------------------
def _conv_args(shape: list[int], n: int, m: int, indices: Tensor, bwd_keep: Tensor | None, stride: list[int],
               padding: list[int], dilation: list[int], fwd: str, dx: str, dw: str) -> tuple:
    """The slots, ``(stride, padding, dilation)`` and plan of one call (None: every product dense)."""
    plan = None if fwd == dx == dw == "dense" else ConvPlan(fwd, dx, dw)
    return _slots(shape, n, m, indices, bwd_keep), (tuple(stride), tuple(padding), tuple(dilation)), plan


@torch.library.custom_op("bame::compressed_conv", mutates_args=())
def compressed_conv(x: Tensor, values: Tensor, indices: Tensor, bias: Tensor | None, bwd_keep: Tensor | None,
                    shape: list[int], n: int, m: int, stride: list[int], padding: list[int], dilation: list[int],
                    fwd: str, dx: str, dw: str) -> Tensor:
    """A convolution with W compressed (see the module doc)."""
    slots, conf, plan = _conv_args(shape, n, m, indices, bwd_keep, stride, padding, dilation, fwd, dx, dw)
    return conv_forward_product(x.contiguous(), values.detach().to(x.dtype), slots, bias, conf, plan)


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
    """``(dX, d values)``: empty tensors for the ones not asked for."""
    slots, conf, plan = _conv_args(shape, n, m, indices, bwd_keep, stride, padding, dilation, fwd, dx, dw)
    dx_, dvals = conv_backward_product(grad, x.contiguous(), values.detach().to(x.dtype), slots, conf, plan,
                                       need_dx, need_dw)
    return (_empty(x) if dx_ is None else dx_.contiguous(),
            _empty(values) if dvals is None else dvals.to(values.dtype))


compressed_conv_backward.register_fake(_fake_backward)
compressed_conv.register_autograd(
    _autograd(torch.ops.bame.compressed_conv_backward, lambda grad: grad.sum(dim=(0, 2, 3))), setup_context=_setup)


# -- a dense weight's values at the slots ------------------------------------------------------------------
def _structure_of(shape: list[int], positions: Tensor) -> SlotStructure:
    """The slots ``positions`` (uint8 ``(K, N)``) of a weight of ``shape``, N:M along its input channels."""
    return SlotStructure(tuple(shape), positions.shape[1], math.prod(shape) // positions.shape[0], positions)


@torch.library.custom_op("bame::slot_values", mutates_args=())
def slot_values(weight: Tensor, positions: Tensor) -> Tensor:
    """``(K, N)``: the weight's values at the slots ``positions`` (uint8 ``(K, N)`` in-block positions of its
    blocks of M = numel / K along the input channels)."""
    return _structure_of(list(weight.shape), positions).gather(weight.detach())


@slot_values.register_fake
def _(weight, positions):
    return weight.new_empty(positions.shape)


@torch.library.custom_op("bame::slot_scatter", mutates_args=())
def slot_scatter(values: Tensor, positions: Tensor, shape: list[int]) -> Tensor:
    """The inverse of ``slot_values``: a dense tensor of ``shape`` holding ``values`` at the slots, zeros
    elsewhere."""
    return _structure_of(shape, positions).dense(values)


@slot_scatter.register_fake
def _(values, positions, shape):
    return values.new_empty(shape)


def _slot_values_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    weight, positions = inputs
    ctx.save_for_backward(positions)
    ctx.shape = list(weight.shape)


def _slot_values_backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
    (positions,) = ctx.saved_tensors
    return torch.ops.bame.slot_scatter(grad, positions, ctx.shape), None


slot_values.register_autograd(_slot_values_backward, setup_context=_slot_values_setup)
