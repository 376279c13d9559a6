"""Route a sparsifier's Linear layers (and 1x1 convolutions) through the sparse N:M kernels.

``bame.sparsify(..., kernel="sparse")`` (or ``bame train --kernel sparse``) calls
:func:`enable_sparse_kernels`. For each eligible layer the first forward times every formulation of the
three products at that layer's shape and token count (:func:`bame.kernels.choose_plan`) and keeps the
fastest; a layer where dense is fastest keeps the masked-dense path, and the layer report says so.

Numerically nothing changes: the kernels compute ``x (W*B)^T``, ``dY (W*B_bwd)`` and the weight
gradient (at kept entries, or dense on the iterations where the method declares a dense weight
gradient) exactly as the masked-dense path does, within float tolerance. The packed structure is rebuilt
only when a layer's mask changes (tracked by the mask tensor's in-place version counter).

Under ``torch.compile`` the products are the custom operator ``bame::compressed_linear``
(:mod:`bame.kernels.ops`), called with the effective weight's values at the slots of the mask
(``bame::slot_values``, whose gradient is the weight gradient at the kept entries, zero elsewhere): the
graph calls the kernels without a break. Which iterations may do so is decided eagerly, before each iteration
(:meth:`_LayerKernel.refresh`, from the sparsifier's ``prepare``), into one flag a graph is guarded on:
iterations whose masks may still change within the step, that need the dense weight gradient (BAME's
updates) or that have a backward mask run the masked-dense products in the graph instead (a second graph,
compiled once). A compiled layer without a plan yet runs the masked products and records its input's size;
the plan is then chosen (timed) eagerly before the next iteration, which compiles once more. No graph break.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bame.kernels import ops  # noqa: F401  (registers torch.ops.bame.*)
from bame.kernels.linear import NMLinearFunction
from bame.kernels.packed import pack
from bame.kernels.plan import Plan, choose_plan
from bame.masking import default_forward
from bame.nm import kept_indices

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
    """Per-layer state: the plan, the packed structure of the current masks (eager) and their slots with the
    flag that lets a compiled forward call the operator."""

    def __init__(self, layer: SparseLayer, sparsifier: Sparsifier, repeats: int) -> None:
        self.layer, self.sparsifier, self.repeats = layer, sparsifier, repeats
        self.plan: Plan | None = None
        self.packed: Any = None
        self.packed_bwd: Any = None
        self.versions: tuple[int, int] = (-1, -1)
        #: Set eagerly before each iteration (:meth:`refresh`): a compiled forward calls the operator.
        self.traced = False
        #: uint8 ``(K, N)`` in-block positions of the mask's kept entries (the operator's slots), updated in
        #: place when the mask changes; ``positions_version`` is the mask version they were taken from.
        self.positions: torch.Tensor | None = None
        self.positions_version = -1
        #: ``(tokens, dtype, device)`` of a compiled forward's input while the layer has no plan yet
        self.input_seen: tuple[int, torch.dtype, torch.device] | None = None

    def refresh(self, t: int) -> None:
        """Before iteration t: whether a compiled forward calls the products as an operator (the mask is
        final and N:M, no dense weight gradient, no backward mask or soft scale, a sparse plan or none yet),
        and the slots of the current mask."""
        par = self.layer.par
        if getattr(par.forward_impl, "__self__", None) is not self:  # the layer left dense storage
            self.traced = False
            return
        if self.plan is None and self.input_seen is not None:  # a compiled forward ran: time the plan now
            self._choose_plan(*self.input_seen)
        self.traced = (self.sparsifier.method.mask_is_final(t) and not self.sparsifier.plan(t).dense_wgrad
                       and par.bwd_mask is None and par.scale is None and self.layer.group_axis == "cin"
                       and (self.plan is None or not self.plan.is_dense) and self._refresh_positions())

    def _refresh_positions(self) -> bool:
        """The kept entries' in-block positions (False where a block keeps more than N: not N:M yet)."""
        mask, n = self.layer.par.mask, self.layer.n
        if mask._version == self.positions_version and self.positions is not None:
            return True
        blocks = self.layer.blocks(mask)  # (K, M)
        if bool((blocks.sum(1) > n).any()):
            return False
        # a block keeping fewer than N is padded with pruned positions: their values are zero
        positions = kept_indices(blocks, n).to(torch.uint8)
        if self.positions is None or self.positions.shape != positions.shape:
            self.positions = positions
        else:
            self.positions.copy_(positions)  # in place: a compiled graph keeps reading the same tensor
        self.positions_version = mask._version
        return True

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
        if torch.compiler.is_compiling():
            if self.traced and self.plan is None:  # timed eagerly before the next iteration (refresh)
                self.input_seen = (x.numel() // self.layer.shape[1], x.dtype, x.device)
            if not self.traced or self.plan is None:  # the compiled masked products (fused)
                return default_forward(module, x)
            return self._operator(module, x)
        return self._eager(module, x)

    def _choose_plan(self, tokens: int, dtype: torch.dtype, device: torch.device) -> None:
        out, in_ = self.layer.shape[0], self.layer.shape[1]
        with torch.enable_grad():  # also from the optimizer's step hook: the timing runs backwards
            self.plan = choose_plan(out, in_, self.layer.n, self.layer.m, tokens, dtype, device,
                                    repeats=self.repeats)
        self.layer.kernel_note = self.plan.reason

    def _operator(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The products as ``bame::compressed_linear``, on the effective weight's values at the slots."""
        layer, plan = self.layer, self.plan
        is_conv = isinstance(module, nn.Conv2d)
        tokens = x.permute(0, 2, 3, 1) if is_conv else x  # (..., in)
        positions = self.positions
        values = torch.ops.bame.slot_values(module.weight, positions)  # (K, N); gradient: zero elsewhere
        y = torch.ops.bame.compressed_linear(tokens, values, positions, module.bias, None, layer.shape[0],
                                             layer.shape[1], layer.n, layer.m, plan.fwd, plan.dx, plan.dw)
        return y.permute(0, 3, 1, 2) if is_conv else y

    def _eager(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        t = self.sparsifier.step_count
        sink = self.layer.par.kernel_grad_sink()  # only this forward's backward may vouch for the gradient
        is_conv = isinstance(module, nn.Conv2d)
        if not self.sparsifier.method.mask_is_final(t) or self.layer.group_axis != "cin" or not self._repack():
            return default_forward(module, x)
        tokens = x.permute(0, 2, 3, 1) if is_conv else x  # (..., in)
        if self.plan is None:
            self._choose_plan(tokens.numel() // self.layer.shape[1], tokens.dtype, tokens.device)
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
            layer.kernel = kernel
            kernel.refresh(sparsifier.step_count)
            layer.kernel_note = "sparse kernels: plan chosen at the first forward"
        notes[layer.name] = layer.kernel_note
    return notes

