"""BAME (Yang et al., ICML 2025) and its ablations: LMA only, BAME-dagger.

The three phases (SPEC section 2), with T the run's optimizer steps:

1. gradual ``[0, t_i)``: every ``delta_t`` iterations (and at t = 0) the mask becomes the top-k(t) of
   |W| per block, ``k(t) = M - floor((M - N) t / t_i)``; the forward uses W*B and the weight gradient
   stays dense (``gradual_grad="dense"``), so a pruned weight can come back by magnitude. Before the
   forward of iteration t_i the mask becomes the top-N of |W|, and pruned weights (and their optimizer
   state) are set to zero.
2. evolution ``[t_i, t_f)``: sparse forward and backward; on iterations with ``t % delta_t == 0`` the
   dense gradient of that iteration feeds LMA (:mod:`bame.lma`) and OBF (:mod:`bame.obf`), changed
   weights and their optimizer state are zeroed, and the step runs with the gradient masked by the new
   mask (a revived weight moves to ``-eta*G`` at once, the step Eq. 5 assumes).
3. frozen ``[t_f, T)``: the masks never change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bame import lma, obf
from bame.errors import ConfigError
from bame.masking import check_bidirectional_support
from bame.methods import register
from bame.methods.base import Charge, Method
from bame.nm import backward_mask, block_flips, blocking_problem, topn_mask
from bame.schedules import gradual_budget, is_update_step, phase, resolve_step


@dataclass
class ScheduleOptions:
    """Options of every block-evolution method (BAME's schedule)."""

    delta_t: int = 100  # the paper's best interval (Fig. 3)
    t_i: int | float = 1 / 3  # "evenly divide the schedule": gradual phase ends at T/3
    t_f: int | float = 2 / 3  # masks freeze at 2T/3
    gradual_grad: str = "dense"  # the paper's FLOPs table only fits a dense weight gradient here
    bidirectional: bool = False  # True: BAME-dagger's N:M backward masks


@dataclass
class BameOptions(ScheduleOptions):
    """BAME's options: the schedule plus OBF."""

    alpha: float = 0.5  # heavy blocks: norm above the floor(alpha*K)-th largest (Fig. 3 best)
    beta: float = 0.5  # oscillators: O above the floor(beta*K)-th largest (Fig. 3 best)
    gamma: float = 0.9  # EMA momentum of O; not given in the paper
    freeze: str = "and"  # Eq. 10 as printed; "or" is the text's reading


@dataclass
class BameBiOptions(BameOptions):
    bidirectional: bool = True


class BlockEvolution(Method):
    """The shared machinery of BAME, LMA-only, BAME-dagger and RigL-NM: phases, updates, zeroing.

    Subclasses choose the proposal rule (:meth:`propose`) and whether OBF restricts it (``obf``).
    """

    Options = ScheduleOptions
    obf: ClassVar[bool] = False
    backward_note = "sparse dX (W*B); dW masked, dense every delta_t and in the gradual phase"

    def __init__(self, options, **kwargs) -> None:
        super().__init__(options, **kwargs)
        o = self.options
        self.t_i = resolve_step(o.t_i, self.total_steps, "t_i")
        self.t_f = resolve_step(o.t_f, self.total_steps, "t_f")
        if self.t_f < self.t_i:
            raise ConfigError(f"t_f={self.t_f} must not come before t_i={self.t_i}")
        if not isinstance(o.delta_t, int) or o.delta_t < 1:
            raise ConfigError(f"delta_t must be a positive integer, not {o.delta_t!r}")
        if o.gradual_grad not in ("dense", "sparse"):
            raise ConfigError(f"gradual_grad must be 'dense' or 'sparse', not {o.gradual_grad!r}")
        if self.obf:
            self._check_obf_options()

    def _check_obf_options(self) -> None:
        o = self.options
        for name in ("alpha", "beta"):
            if not 0.0 <= getattr(o, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(o, name)} must lie in [0, 1]")
        if not 0.0 <= o.gamma < 1.0:
            raise ConfigError(f"gamma={o.gamma} must lie in [0, 1)")
        if o.freeze not in obf.RULES:
            raise ConfigError(f"freeze must be 'and' or 'or', not {o.freeze!r}")

    def wants_bwd_mask(self) -> bool:
        return bool(self.options.bidirectional)

    def resolved_options(self) -> dict:
        return {**super().resolved_options(), "t_i": self.t_i, "t_f": self.t_f}

    # -- lifecycle ---------------------------------------------------------------------------------------
    def init_layer(self, layer, ctx) -> None:
        layer.add_state("osc", torch.zeros(layer.num_blocks))  # O of Eq. 8
        layer.add_state("sad", torch.zeros(layer.num_blocks, dtype=torch.int32))  # flips per block (Fig. 2)
        if self.wants_bwd_mask():
            problem = check_bidirectional_support(layer.module) or blocking_problem(layer.shape, self.m, "out")
            if problem is None:
                layer.par.set_bwd_mask(layer.mask)
            else:
                layer.bwd_note = f"backward mask off ({problem}): dX uses the forward mask"

    def prepare(self, t: int, ctx) -> None:
        o = self.options
        if t < self.t_i and t % o.delta_t == 0:
            k = gradual_budget(t, self.t_i, o.delta_t, self.n, self.m)
            zero = "none" if o.gradual_grad == "dense" else "pruned"
            for layer in ctx.layers:
                keep = topn_mask(layer.blocks(layer.weight.detach()), k, magnitude=True)
                layer.set_mask(keep, ctx, zero=zero)
        elif t == self.t_i:
            for layer in ctx.layers:
                keep = topn_mask(layer.blocks(layer.weight.detach()), self.n, magnitude=True)
                layer.set_mask(keep, ctx, zero="pruned")
        pruned = t >= self.t_i or o.gradual_grad == "sparse"  # pruned weights are exactly zero from here on
        for layer in ctx.layers:
            layer.par.weights_pruned = pruned
        self.refresh(ctx)

    def refresh(self, ctx) -> None:
        for layer in ctx.layers:
            if layer.par.bwd_mask is not None:
                layer.par.set_bwd_mask(backward_mask(layer.weight, layer.mask, self.n, self.m))

    def before_step(self, t: int, ctx) -> None:
        if t < self.t_i:
            if self.options.gradual_grad == "sparse":
                for layer in ctx.layers:
                    layer.mask_grad()
            return
        if is_update_step(t, self.t_i, self.t_f, self.options.delta_t):
            for layer in ctx.layers:
                self._update_layer(t, layer, ctx)
        for layer in ctx.layers:
            layer.mask_grad()

    def after_step(self, t: int, ctx) -> None:
        if t >= self.t_i or self.options.gradual_grad == "sparse":
            for layer in ctx.layers:
                layer.apply_mask(ctx)

    @torch.no_grad()
    def _update_layer(self, t: int, layer, ctx) -> None:
        grad = layer.weight.grad
        if grad is None:  # the layer took no part in this iteration's loss
            return
        w = layer.blocks(layer.weight.detach())  # (K, M)
        g = layer.blocks(grad)  # (K, M)
        old = layer.blocks(layer.mask)  # (K, M)
        proposal = self.propose(t, layer, w, g, old, ctx.lr_of(layer.weight))
        if self.obf:
            o = self.options
            new, osc, frozen = obf.restrict_with_frozen(
                old, proposal, w, layer.state("osc"), o.gamma, o.alpha, o.beta, o.freeze
            )
            layer.state("osc").copy_(osc)
            frozen_fraction = int(torch.count_nonzero(frozen)) / frozen.numel()
        else:
            new, frozen_fraction = proposal, 0.0
        flips_per_block = block_flips(old, new)  # (K,) int32
        layer.state("sad").add_(flips_per_block)
        flips = layer.set_mask(new, ctx, zero="changed")
        ctx.record(
            t, layer, updates=layer.stats["updates"] + 1, last_flips=flips,
            total_flips=layer.stats["total_flips"] + flips,
            proposed_flips=int(torch.count_nonzero(proposal != old)),
            changed_blocks=int(torch.count_nonzero(flips_per_block)),
            frozen_fraction=frozen_fraction,
        )

    def propose(self, t: int, layer, w: torch.Tensor, g: torch.Tensor, old: torch.Tensor, lr: float) -> torch.Tensor:
        """The proposed ``(K, M)`` mask of one layer on update iteration t. Default: LMA."""
        return lma.propose(w, g, old, self.n, lr)

    # -- accounting --------------------------------------------------------------------------------------
    def charge(self, t: int, layer) -> Charge:
        r = self.r
        bwd = layer.par.bwd_mask is not None  # dX through a mask N:M along the output axis
        if t < self.t_i:
            k = gradual_budget(t, self.t_i, self.options.delta_t, self.n, self.m) / self.m
            dw = 1.0 if self.options.gradual_grad == "dense" else k
            return Charge(k, r if bwd else k, dw, k, r if bwd else 1.0, dw)
        dw = 1.0 if is_update_step(t, self.t_i, self.t_f, self.options.delta_t) else r
        return Charge(r, r, dw, r, r if bwd else 1.0, dw)

    def phase_of(self, t: int) -> str:
        if is_update_step(t, self.t_i, self.t_f, self.options.delta_t):
            return "update"
        return phase(t, self.t_i, self.t_f)

    def mask_is_final(self, t: int) -> bool:
        return t >= self.t_i

    def mask_may_change(self, t: int) -> bool:
        following = t + 1  # prepare(t + 1) re-chooses gradual masks and makes the transition at t_i
        rechoice = following < self.t_i and following % self.options.delta_t == 0
        return rechoice or following == self.t_i or is_update_step(t, self.t_i, self.t_f, self.options.delta_t)


@register
class Bame(BlockEvolution):
    name = "bame"
    description = "BAME: LMA + OBF mask evolution with sparse forward and backward (the full method)"
    paper = "Yang et al., BAME, ICML 2025"
    Options = BameOptions
    obf = True


@register
class BameBi(Bame):
    name = "bame_bi"
    description = "BAME-dagger: BAME with N:M backward masks along the output axis"
    paper = "Yang et al., BAME, ICML 2025 (Table 2, dagger)"
    Options = BameBiOptions
    backward_note = "N:M dX (W*B_bwd along outputs); dW as BAME"


@register
class Lma(BlockEvolution):
    name = "lma"
    description = "BAME without OBF: LMA mask adaption only (Table 4 'LMA')"
    paper = "Yang et al., BAME, ICML 2025, Table 4"
