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

import torch

from bame import lma, obf
from bame.contract import Method, Step
from bame.errors import ConfigError
from bame.methods import register
from bame.options import Options, option, same_kind_order
from bame.schedules import GRADUAL, gradual_budget, is_update_step, phase, resolve_step


@dataclass
class ScheduleOptions(Options):
    """Options of every block-evolution method (BAME's schedule)."""

    delta_t: int = option(100, "iterations between mask updates (the paper's best, Fig. 3)", low=1)
    t_i: int | float = option(1 / 3, "end of the gradual phase (an iteration, or a fraction of the run): "
                                     "'evenly divide the schedule' puts it at T/3", step=True)
    t_f: int | float = option(2 / 3, "masks freeze from here on (an iteration, or a fraction of the run: 2T/3)",
                              step=True)
    gradual_grad: str = option("dense", "weight gradient in the gradual phase: 'dense' (the paper's FLOPs table "
                                        "only fits it) or 'sparse'", choices=("dense", "sparse"))
    bidirectional: bool = option(False, "BAME-dagger: the input gradient through N:M backward masks")

    def __post_init__(self) -> None:
        super().__post_init__()
        same_kind_order("t_i", self.t_i, "t_f", self.t_f)


@dataclass
class BameOptions(ScheduleOptions):
    """BAME's options: the schedule plus OBF."""

    alpha: float = option(0.5, "OBF: a block is heavy if its norm is above the floor(alpha*K)-th largest "
                               "(Fig. 3 best)", low=0.0, high=1.0)
    beta: float = option(0.5, "OBF: a block oscillates if O is above the floor(beta*K)-th largest (Fig. 3 best)",
                         low=0.0, high=1.0)
    gamma: float = option(0.9, "OBF: EMA momentum of the oscillation O (not given in the paper)", low=0.0,
                          below=1.0)
    freeze: str = option("and", "OBF: frozen = oscillator AND heavy (Eq. 10 as printed) or OR (the text)",
                         choices=obf.RULES)


@dataclass
class BameBiOptions(BameOptions):
    bidirectional: bool = option(True, "BAME-dagger: the input gradient through N:M backward masks")


class BlockEvolution(Method):
    """The shared plan of BAME, LMA-only, BAME-dagger and RigL-NM: gradual magnitude pruning to N:M,
    evolution every ``delta_t`` from the dense gradient, then frozen masks. Subclasses choose the proposal
    (:meth:`propose`, LMA by default) and whether OBF restricts it."""

    Options = ScheduleOptions
    evolves = True
    #: LMA keeps the top-N scores of a block: a pruned entry's score lr*G^2 ranks as its |G|, so only the
    #: min(N, M - N) largest pruned |G| can enter; RigL-NM grows at most that many per block by |G|.
    top_pruned_gradient = True
    backward_note = "sparse dX (W*B); dW masked, dense every delta_t and in the gradual phase"

    def __init__(self, options, **kwargs) -> None:
        super().__init__(options, **kwargs)
        self.t_i = resolve_step(options.t_i, self.total_steps, "t_i")
        self.t_f = resolve_step(options.t_f, self.total_steps, "t_f")
        if self.t_f < self.t_i:
            raise ConfigError(f"t_f={self.t_f} must not come before t_i={self.t_i}")
        self.backward_masks = bool(options.bidirectional)

    def resolved_options(self) -> dict:
        return {**super().resolved_options(), "t_i": self.t_i, "t_f": self.t_f}

    def schedule_problem(self) -> str | None:
        """An evolution phase without a single update: the method's defining mechanism would never run."""
        delta_t = self.options.delta_t
        first = -(-self.t_i // delta_t) * delta_t  # the first update iteration at or after t_i
        if self.t_f > self.t_i and first >= self.t_f:  # t_f == t_i is the deliberate no-evolution control
            return (f"{self.name}: delta_t={delta_t} leaves the evolution phase [{self.t_i}, {self.t_f}) of this "
                    f"{self.total_steps}-step run without a single mask update (the first would come at {first}): "
                    f"pass delta_t at most {self.t_f - self.t_i}, or a longer run")
        return None

    def plan(self, t: int) -> Step:
        o = self.options
        if t < self.t_i:  # gradual: top-k(t) |W| every delta_t; pruned weights train on (dense) or stay zero
            dense = o.gradual_grad == "dense"
            return Step(GRADUAL, keep=gradual_budget(t, self.t_i, o.delta_t, self.n, self.m),
                        select=t % o.delta_t == 0, zero="none" if dense else "pruned",
                        grad="dense" if dense else "masked", zeroed=not dense)
        evolve = is_update_step(t, self.t_i, self.t_f, o.delta_t)
        return Step("update" if evolve else phase(t, self.t_i, self.t_f), keep=self.n, select=t == self.t_i,
                    zero="pruned", evolve=evolve, zeroed=True)

    def propose(self, t: int, layer, w: torch.Tensor, g: torch.Tensor, old: torch.Tensor, lr: float) -> torch.Tensor:
        return lma.propose(w, g, old, self.n, lr)

    def proposal_stats(self, t: int, layer, w: torch.Tensor, g: torch.Tensor, old: torch.Tensor,
                       lr: float) -> dict[str, float]:
        return lma.regrowth(w, g, old, self.n, lr)


class WithObf(BlockEvolution):
    """BlockEvolution whose proposals OBF restricts (Eq. 7-10)."""

    def layer_state(self, layer) -> dict[str, torch.Tensor]:
        return {"osc": torch.zeros(layer.num_blocks)}  # O of Eq. 8

    def restrict(self, t: int, layer, old: torch.Tensor, proposal: torch.Tensor,
                 w: torch.Tensor) -> tuple[torch.Tensor, float]:
        o, osc = self.options, layer.state("osc")
        new, new_osc, frozen = obf.restrict_with_frozen(old, proposal, w, osc, o.gamma, o.alpha, o.beta, o.freeze)
        osc.copy_(new_osc)
        return new, int(torch.count_nonzero(frozen)) / frozen.numel()


@register
class Bame(WithObf):
    name = "bame"
    order = 6
    description = "BAME: LMA + OBF mask evolution with sparse forward and backward (the full method)"
    paper = "Yang et al., BAME, ICML 2025"
    Options = BameOptions


@register
class BameBi(Bame):
    name = "bame_bi"
    order = 7
    description = "BAME-dagger: BAME with N:M backward masks along the output axis"
    paper = "Yang et al., BAME, ICML 2025 (Table 2, dagger)"
    Options = BameBiOptions
    backward_note = "N:M dX (W*B_bwd along outputs); dW as BAME"


@register
class Lma(BlockEvolution):
    name = "lma"
    order = 5
    description = "BAME without OBF: LMA mask adaption only (Table 4 'LMA')"
    paper = "Yang et al., BAME, ICML 2025, Table 4"
