"""Route a sparsifier's Linear layers (and 1x1 convolutions) through the sparse N:M kernels.

``bame.sparsify(..., kernel="sparse")`` (or ``bame train --kernel sparse``) calls
:func:`enable_sparse_kernels`. For each eligible layer the first forward times every formulation of the
three products at that layer's shape and token count (:func:`bame.kernels.choose_plan`) and keeps the
fastest; a layer where dense is fastest keeps the masked-dense path, and the layer report says so.

Numerically nothing changes: the kernels compute ``x (W*B)^T``, ``dY (W*B_bwd)`` and the weight
gradient (at kept entries, or dense on the iterations where the method declares a dense weight
gradient) exactly as the masked-dense path does, within float tolerance. The packed structure is rebuilt
only when a layer's mask changes (tracked by the mask tensor's in-place version counter).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bame.kernels.linear import NMLinearFunction
from bame.kernels.packed import pack
from bame.kernels.plan import Plan, choose_plan
from bame.masking import default_forward

if TYPE_CHECKING:
    from bame.sparsifier import SparseLayer, Sparsifier


def kernel_problem(module: nn.Module) -> str | None:
    """Why a layer cannot use the sparse Linear kernels, or None."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1) \
            and module.groups == 1 and module.padding in ((0, 0), "valid") and module.dilation == (1, 1):
        return None
    return "sparse kernels cover Linear layers and 1x1 convolutions only"


class _LayerKernel:
    """Per-layer state: the plan and the packed structure of the current masks."""

    def __init__(self, layer: SparseLayer, sparsifier: Sparsifier, repeats: int) -> None:
        self.layer, self.sparsifier, self.repeats = layer, sparsifier, repeats
        self.plan: Plan | None = None
        self.packed: Any = None
        self.packed_bwd: Any = None
        self.versions: tuple[int, int] = (-1, -1)

    def _repack(self) -> bool:
        """Pack the forward (and backward) mask when they changed; False if the mask is not N:M."""
        par, n, m = self.layer.par, self.layer.n, self.layer.m
        bwd = par.bwd_mask
        versions = (par.mask._version, -1 if bwd is None else bwd._version)
        if versions != self.versions:
            weight = self.layer.weight.detach().reshape(self.layer.shape[0], -1)  # (out, in)
            try:
                self.packed = pack(weight, par.mask.reshape(weight.shape), n, m)
                self.packed_bwd = None if bwd is None else pack(weight, bwd.reshape(weight.shape), n, m)
            except ValueError:  # more than N kept in some block (a gradual phase): not N:M yet
                self.packed = None
            self.versions = versions
        return self.packed is not None

    def forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # the compiled masked products (fused): the kernels are eager code
            return default_forward(module, x)
        t = self.sparsifier.step_count
        sink = self.layer.par.kernel_grad_sink()  # only this forward's backward may vouch for the gradient
        is_conv = isinstance(module, nn.Conv2d)
        if not self.sparsifier.method.mask_is_final(t) or self.layer.group_axis != "cin" or not self._repack():
            return default_forward(module, x)
        tokens = x.permute(0, 2, 3, 1) if is_conv else x  # (..., in)
        if self.plan is None:
            out, in_ = self.layer.shape[0], self.layer.shape[1]
            self.plan = choose_plan(out, in_, self.layer.n, self.layer.m, tokens.numel() // in_, tokens.dtype,
                                    tokens.device, repeats=self.repeats)
            self.layer.kernel_note = self.plan.reason
        if self.plan.is_dense:
            return default_forward(module, x)
        dense_wgrad = self.sparsifier.plan(t).dense_wgrad  # the method needs the dense G this step
        weight = module.weight.reshape(self.layer.shape[0], -1)  # effective W*B (or soft values), STE grad
        y = NMLinearFunction.apply(tokens, weight, self.packed, self.packed_bwd, module.bias, self.plan,
                                   dense_wgrad, True, sink)
        return y.permute(0, 3, 1, 2) if is_conv else y


def enable_sparse_kernels(sparsifier: Sparsifier, repeats: int = 5) -> dict[str, str]:
    """Attach the sparse kernels to every eligible sparse layer; returns ``{layer: note}``."""
    notes = {}
    for layer in sparsifier.layers:
        if layer.compressed is not None:  # its storage plans its own products (bame.compressed)
            continue
        problem = kernel_problem(layer.module)
        if problem is None and layer.group_axis != "cin":
            problem = "sparse kernels need group_axis='cin'"
        if problem is not None:
            layer.kernel_note = f"masked-dense: {problem}"
        else:
            kernel = _LayerKernel(layer, sparsifier, repeats)
            layer.par.forward_impl = kernel.forward
            layer.kernel_note = "sparse kernels: plan chosen at the first forward"
        notes[layer.name] = layer.kernel_note
    return notes

