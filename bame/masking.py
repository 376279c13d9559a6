"""How a mask attaches to a layer, and what the gradient does.

A sparse layer keeps its raw weight W as an ordinary parameter and gets a parametrization
(:mod:`torch.nn.utils.parametrize`) so that ``module.weight`` is the *effective* weight ``W * B`` its
forward uses. The parametrization's backward is straight-through: the raw weight receives the dense
gradient ``G = dL/d(W*B)``. Whether that gradient is then masked (sparse training), kept dense (update
iterations, SR-STE) or extended (SR-STE's decay) is decided per method in the optimizer's step hooks,
once per real optimizer step and after any data-parallel all-reduce.

The module's class is swapped for a thin subclass (as parametrize itself does) whose forward can route
the layer through a custom autograd Function: bi-directional masks compute the input gradient with a
*backward* mask ``B_bwd`` (a subset of B that is N:M along the output axis), and the optional sparse
kernels replace the products altogether. Without either, the forward is the module's own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

ForwardImpl = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class _StraightThrough(torch.autograd.Function):
    """``W * mask`` in the forward; the gradient passes to W unmasked (STE)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class NMMask(nn.Module):
    """The parametrization of a sparse layer's weight: ``weight -> W * B`` (straight-through).

    Buffers (they move with ``model.to(...)``; none is in ``model.state_dict()``: the masks and the method's
    per-layer state are saved once, by ``Sparsifier.state_dict()``):
        mask: bool, the weight's shape; the forward mask B.
        scale: optional float values replacing B in the product (soft masks such as MaxQ's); zero
            exactly where B is zero.
        bwd_mask: optional bool backward mask for the input gradient (bi-directional methods).
    """

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.bool().clone(), persistent=False)
        # Derived from the mask and weights (recomputed after a load), so not saved.
        self.register_buffer("scale", None, persistent=False)
        self.register_buffer("bwd_mask", None, persistent=False)
        self.forward_impl: ForwardImpl | None = None
        #: Set by a method while the raw weight is exactly zero wherever the mask is: the product W*B is
        #: then W itself and is skipped (one weight-sized multiply and allocation less per forward).
        self.weights_pruned = False
        self._factor_cache: tuple[tuple, torch.Tensor] | None = None
        self._inference_cache: tuple[tuple, torch.Tensor] | None = None
        #: ``(data_ptr, version, numel)`` of weight gradients the sparse kernels produced already masked by
        #: this mask (see :meth:`grad_is_masked`); filled by their backward, cleared by every forward.
        self.kernel_grads: list[tuple[int, int, int]] = []
        self._kernel_mask_version = -1

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Ignore the mask and state entries of model state dicts written while they were saved there too
        (the sparsifier's state restores them)."""
        for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] in self._buffers]:
            del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def mask_as(self, like: torch.Tensor) -> torch.Tensor:
        """The bool mask as 0/1 in ``like``'s dtype and device, cached until the mask changes.

        Multiplying a float tensor by a bool one converts the bool operand on every call (a weight-sized
        conversion: about 7x the cost of the multiply itself on a CPU), so the per-step products use this
        copy. The cache is keyed by the mask's storage and in-place version counter, so any in-place change
        (``copy_``, ``masked_fill_``, a state load) invalidates it.
        """
        mask = self.mask
        key = (mask.data_ptr(), mask._version, like.dtype, like.device)
        cached = self._factor_cache
        if cached is None or cached[0] != key:
            # Refill the previous copy in place when it fits (methods that re-choose the mask every step):
            # a copy into existing memory from the mask's 0/1 bytes is several times faster than a fresh
            # bool -> float conversion. Nothing keeps the factor across a mask change.
            old = None if cached is None else cached[1]
            if old is None or old.shape != mask.shape or old.dtype != like.dtype or old.device != mask.device:
                old = torch.empty(mask.shape, dtype=like.dtype, device=mask.device)
            cached = self._factor_cache = (key, old.copy_(mask.view(torch.uint8)))
        return cached[1]

    def grad_is_masked(self, grad: torch.Tensor) -> bool:
        """Whether ``grad`` is, untouched, the gradient the sparse kernels computed for the current mask:
        the same storage, in-place version and size as the last one recorded, and no mask change since.
        Anything else (another contribution accumulated into it, a different tensor, a new mask) is False.
        """
        records, self.kernel_grads = self.kernel_grads, []  # a record vouches once
        if not records or self._kernel_mask_version != self.mask._version:
            return False
        return records[-1] == (grad.data_ptr(), grad._version, grad.numel())

    def kernel_grad_sink(self) -> list[tuple[int, int, int]]:
        """A fresh record list for one forward of a sparse layer (the older records are dropped)."""
        self.kernel_grads = []
        self._kernel_mask_version = self.mask._version
        return self.kernel_grads

    def set_scale(self, scale: torch.Tensor | None) -> None:
        """Use float mask values in the forward product (None: back to the bool mask)."""
        if scale is None or self.scale is None or self.scale.shape != scale.shape:
            self.scale = None if scale is None else scale.detach().clone()
        else:
            self.scale.copy_(scale)

    def set_bwd_mask(self, bwd_mask: torch.Tensor | None) -> None:
        """Use a separate mask for the input gradient (None: the forward mask)."""
        if bwd_mask is None or self.bwd_mask is None:
            self.bwd_mask = None if bwd_mask is None else bwd_mask.bool().clone()
        else:
            self.bwd_mask.copy_(bwd_mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.scale is None and self.weights_pruned:
            # W * B == W exactly; autograd gives W the dense G, as the STE does. Compiled, this is a second
            # graph (a guard on the flag, which changes at phase boundaries only, never at a mask change).
            return weight
        if torch.compiler.is_compiling():
            # One graph for every mask of a phase: the multiply is fused, and nothing is guarded on the
            # mask's storage.
            factor = self.mask.to(weight.dtype) if self.scale is None else self.scale
            return _StraightThrough.apply(weight, factor)
        if not torch.is_grad_enabled():  # inference: W * B once per change of W or B, not per forward
            return self._inference_weight(weight)
        factor = self.mask_as(weight) if self.scale is None else self.scale
        return _StraightThrough.apply(weight, factor)

    def _inference_weight(self, weight: torch.Tensor) -> torch.Tensor:
        source = self.mask if self.scale is None else self.scale
        key = (weight.data_ptr(), weight._version, source.data_ptr(), source._version, weight.dtype)
        cached = self._inference_cache
        if cached is None or cached[0] != key:
            factor = self.mask_as(weight) if self.scale is None else self.scale
            cached = self._inference_cache = (key, weight * factor)
        return cached[1]


def _sparse_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward of a swapped sparse module: a custom product where one is attached, else the default.

    In eager mode a Linear or convolution computes its effective weight here and calls the product itself:
    reading ``module.weight`` through :mod:`~torch.nn.utils.parametrize` (its property, the parametrization
    list's call and its probe for a second parametrization) costs tens of microseconds per layer, a tenth
    of a small batch's step on a CPU. Compiled, the ordinary path is traced (the same graph).
    """
    if torch.compiler.is_compiling():
        par = self.parametrizations.weight[0]
        if par.forward_impl is not None:
            return par.forward_impl(self, x)
        return default_forward(self, x)
    plist = self._modules["parametrizations"]._modules["weight"]
    par = plist._modules["0"]
    if par.forward_impl is not None:
        return par.forward_impl(self, x)
    product = self._bame_product
    buffers = par._buffers  # read directly: a buffer through ``Module.__getattr__`` costs about 0.4 us
    if product is None or buffers["bwd_mask"] is not None:
        return default_forward(self, x)
    weight = plist._parameters["original"]
    if par._forward_pre_hooks or par._forward_hooks:  # a method's hook on the parametrization (MaxQ's scale)
        return product(self, x, par(weight))
    if par.weights_pruned and buffers["scale"] is None:  # W * B is W (NMMask.forward's first case)
        return product(self, x, weight)
    return product(self, x, par.forward(weight))


def default_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The masked products: through the backward mask where there is one, else the module's own forward."""
    if parametrization(module).bwd_mask is not None:
        return bidirectional_forward(module, x)
    return module._bame_base.forward(module, x)


_SWAPPED: dict[type, type] = {}


def _linear_product(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight, module.bias)


def _conv_product(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return module._conv_forward(x, weight, module.bias)


def _own_product(base: type) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The product of a module class whose forward is exactly torch's Linear or convolution forward (a
    subclass with its own forward keeps it: None)."""
    if base.forward is nn.Linear.forward:
        return _linear_product
    if base.forward in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward):
        return _conv_product
    return None


def _swap_class(module: nn.Module) -> None:
    base = type(module)
    cls = _SWAPPED.get(base)
    if cls is None:
        product = _own_product(base)
        cls = type(f"Sparse{base.__name__.replace('Parametrized', '')}", (base,), {
            "forward": _sparse_forward, "_bame_base": base,
            "_bame_product": None if product is None else staticmethod(product),
        })
        _SWAPPED[base] = cls
    module.__class__ = cls


def attach(module: nn.Module, mask: torch.Tensor) -> NMMask:
    """Make ``module.weight`` the effective weight ``W * mask``; returns the parametrization."""
    par = NMMask(mask.to(module.weight.device))
    parametrize.register_parametrization(module, "weight", par, unsafe=True)
    _swap_class(module)
    return par


def detach(module: nn.Module, bake: bool = True) -> None:
    """Undo :func:`attach`: restore the module's class and a plain ``weight`` parameter.

    Args:
        bake: keep the effective weight ``W * B`` (True) or the raw W (False). The parameter object
            stays the same, so optimizers that hold it keep working.
    """
    module.__class__ = module._bame_base
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=bake)


def is_attached(module: nn.Module) -> bool:
    return hasattr(module, "_bame_base") and parametrize.is_parametrized(module, "weight")


def raw_weight(module: nn.Module) -> nn.Parameter:
    """The raw weight parameter W of a sparse module (the one the optimizer updates)."""
    # ``module.parametrizations.weight.original`` without three ``Module.__getattr__`` calls (per layer and step)
    return module._modules["parametrizations"]._modules["weight"]._parameters["original"]


def parametrization(module: nn.Module) -> NMMask:
    return module.parametrizations.weight[0]


class _BidirLinear(torch.autograd.Function):
    """``y = x W_f^T + b``; ``dX = dY W_bwd``; ``dW_f = dY^T X`` (dense, straight-through)."""

    @staticmethod
    def forward(ctx, x, w_fwd, w_bwd, bias):
        ctx.save_for_backward(x, w_bwd)
        ctx.has_bias = bias is not None
        return F.linear(x, w_fwd, bias)

    @staticmethod
    def backward(ctx, gy):
        x, w_bwd = ctx.saved_tensors
        gy2 = gy.reshape(-1, gy.shape[-1])  # (tokens, out)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (gy2 @ w_bwd.to(gy.dtype)).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            gw = gy2.t() @ x.reshape(-1, x.shape[-1]).to(gy.dtype)  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            gb = gy2.sum(0)
        return gx, gw, None, gb


class _BidirConv(torch.autograd.Function):
    """Convolution whose input gradient uses the backward-masked weight."""

    @staticmethod
    def forward(ctx, x, w_fwd, w_bwd, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, w_bwd)
        ctx.conf = (stride, padding, dilation, groups, bias is not None)
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[x.dim()]
        return conv(x, w_fwd, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, gy):
        x, w_bwd = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conf
        out_mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[3]]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            gy, x.to(gy.dtype), w_bwd.to(gy.dtype), [w_bwd.shape[0]] if has_bias else None,
            list(stride), list(padding), list(dilation), False, [0] * len(stride), groups, out_mask,
        )
        if gx is not None:
            gx = gx.to(x.dtype)
        return gx, gw, None, gb, None, None, None, None


def check_bidirectional_support(module: nn.Module) -> str | None:
    """Why bi-directional masks cannot run on this module, or None."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (bi-directional masks need 'zeros')"
        if isinstance(module.padding, str):
            return f"padding={module.padding!r} (bi-directional masks need explicit integer padding)"
        return None
    return f"{type(module).__name__} is not a Linear or convolution"


def bidirectional_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward with ``W * B`` and an input gradient through ``W * B_bwd``."""
    par = parametrization(module)
    w_fwd = module.weight  # W * B through the straight-through parametrization
    w_bwd = (raw_weight(module).detach() * par.bwd_mask)  # W * B_bwd, no gradient path
    if isinstance(module, nn.Linear):
        return _BidirLinear.apply(x, w_fwd, w_bwd, module.bias)
    return _BidirConv.apply(
        x, w_fwd, w_bwd, module.bias, module.stride, module.padding, module.dilation, module.groups
    )
