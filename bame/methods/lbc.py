"""LBC, Learning Best Combination (Zhang et al., "Learning best combination for efficient N:M sparsity",
NeurIPS 2022; code ``zyxxmu/LBC``), METHODS section 2.

Every block has C = C(M, N) candidate subsets, in the lexicographic order of
``itertools.combinations(range(M), N)``, stored as a constant 0/1 matrix P ``(C, M)``. Each layer learns
one score per candidate and block, alpha ``(K, C)``, initialised to ``1 / C(M-1, N-1)`` (each position
lies in C(M-1, N-1) candidates, so its summed score starts at exactly 1):

* mask: a weight is unmasked while an *alive* candidate covers it, ``B = (alive @ P) > 0``; the forward
  uses ``W * B`` and the weight gradient is masked, ``dW = G * B``;
* score gradient (straight-through through the mask): ``dL/dalpha = alive * ((G * W) @ P^T)``;
* removal (cubic schedule): with e the epoch (the iteration with ``granularity="iteration"``, or when
  the run's ``steps_per_epoch`` is unknown; t_i and t_f are given in iterations or fractions of T)::

      card(e) = 1 + ceil((C - 1) (1 - (e - t_i) / (t_f - t_i))^3),  progress clamped to [0, 1]

  (the exponent is an option: 3 in LBC's ResNet code, 4 in its DeiT code). Before every iteration,
  each block removes its smallest *signed* alive alphas until only card(e) remain (ties: lower
  candidate index). Removed alphas and their
  momentum are zeroed; weights no candidate covers any more are zeroed with their optimizer state.
  Once one candidate remains (e >= t_f) alpha is frozen and the mask is exact N:M.

alpha is not a parameter of the user's optimizer: it is trained here by an *internal* SGD with the
weight's param-group learning rate (each iteration), momentum 0.9 and weight decay = that group's
``weight_decay`` (coupled L2, as LBC's SGD does; LBC trains alpha with the weights' own optimizer).

Reference-code quirks not copied: removed candidates are tracked in an explicit ``alive`` buffer (LBC
treats ``alpha == 0`` as removed, and SGD momentum revives them); card is clamped to C before t_i (the
reference's topk crashes there); uncovered weights are zeroed (the reference leaves them to decay).

FLOPs: the forward, dX and dW all run at d(t), the measured covered fraction (METHODS 0.5). SPEC
section 7 charged dX and dW dense; that contradicts LBC's code (its dW is masked) and the 0.72x in
BAME's table (which the measured-d count reproduces), so bame follows METHODS.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass

import torch

from bame.contract import Method, Step
from bame.errors import ConfigError
from bame.flops import Charge
from bame.methods import register
from bame.nm import ranks
from bame.options import Options, option, same_kind_order
from bame.schedules import resolve_step

GRANULARITIES = ("epoch", "iteration")
MAX_CANDIDATES = 10**4  # SPEC: C(M, N) above this is refused (8:16 has 12870)
WARN_ALPHA_PER_WEIGHT = 16  # alpha holds C/M floats per weight; warn when that passes 16 (4:16 is 114)


@dataclass
class LbcOptions(Options):
    t_i: int | float = option(0, "LBC: removal starts here (an iteration, or a fraction of the run; LBC's "
                                 "README: epoch 0)", step=True)
    t_f: int | float = option(0.5, "LBC: one candidate per block remains from here on (LBC's README: epoch 60 "
                                   "of 120, i.e. T/2)", step=True)
    exponent: float = option(3.0, "LBC: exponent of the removal schedule (3 in its ResNet code, 4 in its DeiT "
                                  "code)", above=0.0)
    granularity: str = option("epoch", "LBC/MaxQ: evaluate the schedule per 'epoch' (as the reference code, when "
                                       "the epoch length is known) or per 'iteration'", choices=GRANULARITIES)
    momentum: float = option(0.9, "LBC: momentum of the candidate scores' SGD (LBC's optimizer)", low=0.0)
    alpha_weight_decay: float | None = option(None, "LBC: weight decay of the candidate scores (default: the "
                                                    "weights' group's, as LBC's SGD)", low=0.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        same_kind_order("t_i", self.t_i, "t_f", self.t_f, strict=True)


def candidate_matrix(n: int, m: int) -> torch.Tensor:
    """P ``(C, M)`` float: row c marks the N positions of the c-th subset of ``combinations(range(M), N)``."""
    combos = list(itertools.combinations(range(m), n))
    p = torch.zeros(len(combos), m)
    for c, positions in enumerate(combos):
        p[c, list(positions)] = 1.0
    return p


def cardinality(e: float, c: int, t_i: float, t_f: float, exponent: float = 3.0) -> int:
    """Candidates kept per block at epoch e: ``1 + ceil((C-1) (1 - (e-t_i)/(t_f-t_i))^exponent)``,
    with the progress clamped to [0, 1] (so card is C before t_i and 1 from t_f on)."""
    progress = min(1.0, max(0.0, (e - t_i) / (t_f - t_i)))
    return 1 + math.ceil((c - 1) * (1.0 - progress) ** exponent)


def coverage(alive: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The mask ``(K, M)``: positions covered by at least one alive candidate."""
    return (alive.to(p.dtype) @ p) > 0  # (K, C) @ (C, M) -> (K, M)


def alpha_grad(
    weight_blocks: torch.Tensor, grad_blocks: torch.Tensor, alive: torch.Tensor, p: torch.Tensor
) -> torch.Tensor:
    """``dL/dalpha = alive * ((G * W) @ P^T)`` ``(K, C)``: each alive candidate's sum of G_j W_j."""
    gw = (grad_blocks * weight_blocks).to(p.dtype)  # (K, M)
    return (gw @ p.t()) * alive  # (K, C)


def remove_smallest(alpha: torch.Tensor, alive: torch.Tensor, removed: int) -> torch.Tensor:
    """The alive set after removing, per block, the smallest signed alive alphas until ``removed``
    candidates are gone in total (ties: lower candidate index). Returns a new bool ``(K, C)``."""
    need = removed - (~alive).sum(dim=-1, keepdim=True)  # (K, 1)
    return alive & ~(ranks(torch.where(alive, alpha, math.inf), descending=False) < need)


@register
class Lbc(Method):
    name = "lbc"
    order = 9
    description = "LBC: learned scores over the C(M,N) candidate subsets, removed on a cubic schedule"
    paper = "Zhang et al., NeurIPS 2022"
    Options = LbcOptions
    backward_note = "dX through W*mask(t), dW masked: both at the covered fraction d(t)"
    dense_every_step = "learns its candidate scores from the dense gradient of every iteration"
    charges_follow_masks = True

    def __init__(self, options, **kwargs) -> None:
        super().__init__(options, **kwargs)
        self.c = math.comb(self.m, self.n)
        self.t_i = resolve_step(options.t_i, self.total_steps, "t_i")
        self.t_f = resolve_step(options.t_f, self.total_steps, "t_f")
        if self.t_f <= self.t_i:
            raise ConfigError(f"LBC needs t_f > t_i (got t_i={self.t_i}, t_f={self.t_f})")
        if self.total_steps is not None and self.t_f > self.total_steps:
            warnings.warn(f"LBC: t_f={self.t_f} is after the end: the mask never becomes N:M", stacklevel=2)
        self.p = candidate_matrix(self.n, self.m)  # (C, M)
        self.alpha0 = 1.0 / math.comb(self.m - 1, self.n - 1)
        self._density: dict[str, tuple[int, float, float]] = {}  # layer -> (mask version, covered, N:M blocks)

    def check_nm(self, n: int, m: int) -> None:
        c = math.comb(m, n)
        if c > MAX_CANDIDATES:
            raise ConfigError(
                f"LBC at {n}:{m} needs C({m},{n}) = {c} candidates per block (> {MAX_CANDIDATES}); "
                f"its scores would take {c / m:.0f}x the weights' memory"
            )
        if c / m > WARN_ALPHA_PER_WEIGHT:
            warnings.warn(f"LBC at {n}:{m}: alpha holds {c / m:.1f} floats per weight", stacklevel=3)

    def resolved_options(self) -> dict:
        return {**super().resolved_options(), "t_i": self.t_i, "t_f": self.t_f}

    # -- schedule ------------------------------------------------------------------------------------------
    def card(self, t: int) -> int:
        """Candidates alive per block at iteration t."""
        spe = self.steps_per_epoch if self.options.granularity == "epoch" else None
        if spe is None:
            return cardinality(t, self.c, self.t_i, self.t_f, self.options.exponent)
        return cardinality(t // spe, self.c, self.t_i / spe, self.t_f / spe, self.options.exponent)

    def plan(self, t: int) -> Step:
        card = self.card(t)
        removes = card < (self.card(t - 1) if t > 0 else self.c)  # candidates go before t's forward
        return Step("removal" if card > 1 else "fixed", keep=self.n if card == 1 else self.m, select=removes,
                    zero="pruned", record="update", zeroed=True)

    def _p(self, device: torch.device) -> torch.Tensor:
        if self.p.device != device:
            self.p = self.p.to(device)
        return self.p

    # -- per layer -------------------------------------------------------------------------------------------
    def layer_state(self, layer) -> dict[str, torch.Tensor]:
        shape = (layer.num_blocks, self.c)
        return {"alpha": torch.full(shape, self.alpha0),  # (K, C) candidate scores
                "alive": torch.ones(shape, dtype=torch.bool),  # (K, C) not yet removed
                "alpha_momentum": torch.zeros(shape)}  # (K, C) the internal SGD's buffer

    def select(self, t: int, layer, keep: int) -> torch.Tensor:
        alive = layer.state("alive")
        alive.copy_(remove_smallest(layer.state("alpha"), alive, self.c - self.card(t)))
        layer.state("alpha").mul_(alive)
        layer.state("alpha_momentum").mul_(alive)
        return coverage(alive, self._p(alive.device))

    def refresh(self, t: int, layer) -> None:
        if self._density.get(layer.name, (None,))[0] != layer.mask._version:  # measure once per mask change
            counts = layer.blocks(layer.mask).sum(dim=-1)  # (K,)
            nm_blocks = float((counts <= self.n).float().mean())  # blocks N:M hardware can accelerate
            self._density[layer.name] = (layer.mask._version, float(counts.sum()) / layer.mask.numel(), nm_blocks)

    def event_fields(self, t: int, layer) -> dict:
        return {"alive": self.card(t), "density": self._density[layer.name][1]}

    def on_grad(self, t: int, layer, grad: torch.Tensor, ctx) -> None:
        """One step of the internal SGD on alpha from the dense G (alpha is frozen once one candidate is left)."""
        if self.card(t) == 1:
            return
        alpha, alive, buf = layer.state("alpha"), layer.state("alive"), layer.state("alpha_momentum")
        g = alpha_grad(layer.blocks(layer.weight.detach()), layer.blocks(grad), alive, self._p(alpha.device))
        wd = self.options.alpha_weight_decay
        if wd is None:
            wd = float(ctx.group_of(layer.weight).get("weight_decay", 0.0))
        g.add_(alpha, alpha=wd)  # (K, C), coupled L2 as torch.optim.SGD
        buf.mul_(self.options.momentum).add_(g)  # torch.optim.SGD's momentum (dampening 0)
        alpha.sub_(buf * ctx.lr_of(layer.weight)).mul_(alive)

    def charge(self, t: int, layer) -> Charge:
        # The measured covered fraction d(t) for all three products (its dW is masked); N:M hardware
        # accelerates the forward of the blocks already down to N, and no dX (no mask N:M along outputs).
        _, d, nm_blocks = self._density.get(layer.name, (None, 1.0, 0.0))
        return Charge(fwd=d, dx=d, dw=d, nm=self.r, nm_blocks=nm_blocks)
