"""The method contract: a sparse-training method is a plan and a score; the sparsifier does the rest.

A method says, as a pure function of the iteration t, what that iteration does (:meth:`Method.plan`
returns a frozen :class:`Step`), and, where masks are re-chosen, how (:meth:`Method.select` before the
forward, from the weights; :meth:`Method.propose` and :meth:`Method.restrict` in the optimizer's step hook,
from the dense gradient). The sparsifier (:mod:`bame.sparsifier`) owns everything else: the one loop over
layers, the one mask-commit path (weights and optimizer state zeroed, flips counted, events recorded), the
gradient mode, the re-masking after the step and the backward masks. What the ledger, the kernels and the
tests need to know (the charge, the phase, whether the mask is final or may change) is derived from the
plan, so it cannot drift from what the method does.

The smallest method is a plan::

    @register
    class Static(Method):
        name = "static"
        def plan(self, t):  # a random mask at t = 0, pruned weights zero, masked gradients
            return Step("sparse", keep=self.n, select=t == 0, zero="pruned", zeroed=True)
        def select(self, t, layer, keep):
            return topn_mask(torch.rand((layer.num_blocks, self.m), generator=self.generator), keep)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from bame.errors import ConfigError
from bame.flops import Charge
from bame.nm import topn_mask
from bame.options import Options

if TYPE_CHECKING:
    from bame.sparsifier import SparseLayer, Sparsifier

ZERO = ("none", "pruned", "changed")
RECORD = ("none", "update", "every")
GRAD = ("masked", "dense")


@dataclass(frozen=True)
class Step:
    """What iteration t does (returned by :meth:`Method.plan`; a pure function of t).

    Attributes:
        phase: the part of the schedule, for the FLOPs breakdown (``"gradual"``, ``"update"`` ...).
        keep: entries kept per block during t (M: dense; for methods whose blocks differ, the most any keeps).
        select: before t's forward the masks are re-chosen by :meth:`Method.select` with ``keep`` per block.
        zero: what that selection sets to zero, weights and optimizer state: ``"none"``, ``"pruned"`` (every
            entry outside the new mask) or ``"changed"`` (entries whose mask bit changed).
        record: how that selection is logged: ``"none"`` (a prune: the density shows it), ``"update"`` (one
            event per layer, counted in the layer's statistics) or ``"every"`` (a re-selection every
            iteration: flips counted on the device, one aggregated event per layer every few iterations).
        evolve: in t's step hook the masks are re-chosen from the dense gradient (:meth:`Method.propose`,
            :meth:`Method.restrict`); changed entries and their optimizer state become zero.
        grad: the weight gradient the optimizer steps with: ``"masked"`` (by B) or ``"dense"`` (straight
            through; a method may add a term in :meth:`Method.on_grad`).
        zeroed: pruned weights are exactly zero through t, so ``W * B`` is ``W`` and the weights are
            re-masked after the step (skipped for optimizers that provably keep zeros).
    """

    phase: str
    keep: int
    select: bool = False
    zero: str = "none"
    record: str = "none"
    evolve: bool = False
    grad: str = "masked"
    zeroed: bool = False

    def __post_init__(self) -> None:
        for name, allowed in (("zero", ZERO), ("record", RECORD), ("grad", GRAD)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Step.{name} must be one of {allowed}, not {getattr(self, name)!r}")

    @property
    def dense_wgrad(self) -> bool:
        """Whether t needs the dense weight gradient (straight-through, or an evolution step's scores)."""
        return self.grad == "dense" or self.evolve


@dataclass
class NoOptions(Options):
    """A method without hyper-parameters of its own."""


class Method:
    """Base class of a sparse-training method: class facts, the plan, and the scores.

    Subclasses set the facts, implement :meth:`plan`, and override the selection hooks they use. Every
    hook is per layer; the sparsifier loops over the layers and applies the results.
    """

    # -- facts ------------------------------------------------------------------------------------------
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    #: Position in listings: the paper's table order (dense, static, ASP, SR-STE, RigL, LMA, BAME ...).
    order: ClassVar[float] = float("inf")
    #: What the backward pass computes, for the README's table of methods.
    backward_note: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    #: False for the dense baseline: layers are listed (for the ledger) but never masked.
    uses_masks: ClassVar[bool] = True
    #: Training length relative to the nominal epochs (ASP fine-tunes for as long as it trained: 2.0).
    schedule_factor: ClassVar[float] = 1.0
    #: The input gradient runs through a backward mask N:M along the output axis (BAME-dagger, Bi-Mask).
    backward_masks: ClassVar[bool] = False
    #: Rule "paper" charges dX at the forward mask's density ("mask") or dense ("dense": SR-STE's table).
    dx_charge: ClassVar[str] = "mask"
    #: The charges follow the masks the method measures (LBC's covered fraction), not only the plan.
    charges_follow_masks: ClassVar[bool] = False
    #: Masks evolve from the gradient on some iterations (the sparsifier keeps per-block flip counts).
    evolves: ClassVar[bool] = False
    #: Why the method needs the dense weight or a dense gradient on every iteration, so that it cannot be
    #: stored compressed (empty: from the first iteration whose plan keeps N with pruned weights zero, it can).
    dense_every_step: ClassVar[str] = ""
    #: The update proposal (and its statistics) reads the dense gradient G only at the kept entries and, in
    #: every block, at the ``min(N, M - N)`` pruned entries of largest |G| (ties: the lower position), so that
    #: compressed storage may keep just those on update iterations instead of every layer's dense G.
    top_pruned_gradient: ClassVar[bool] = False

    def __init__(self, options: Any, *, n: int, m: int, total_steps: int | None, seed: int,
                 steps_per_epoch: int | None = None) -> None:
        self.options = options
        self.n, self.m = n, m
        self.r = n / m
        self.total_steps = total_steps
        self.seed = seed
        #: Optimizer steps per epoch when known, for methods whose schedules are epoch-granular.
        self.steps_per_epoch = steps_per_epoch
        #: A seeded CPU generator for methods with random choices (identical on every rank), or None.
        self.generator: torch.Generator | None = None
        self.check_nm(n, m)

    @classmethod
    def make_options(cls, **overrides: Any) -> Any:
        """The Options dataclass, checked (types, ranges, choices); unknown names are refused."""
        known = {f.name for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            valid = ", ".join(sorted(known)) or "none"
            raise ConfigError(f"method {cls.name!r} has no option {', '.join(unknown)} (its options: {valid})")
        return cls.Options(**overrides)

    def check_nm(self, n: int, m: int) -> None:
        """Raise ConfigError if the method cannot run at this N:M."""

    # -- the plan ---------------------------------------------------------------------------------------
    def plan(self, t: int) -> Step:
        """What iteration t does; a pure function of t."""
        raise NotImplementedError

    # -- scores and selections (per layer) --------------------------------------------------------------
    def select(self, t: int, layer: SparseLayer, keep: int) -> torch.Tensor:
        """The mask ``(K, M)`` chosen before t's forward. Default: the top-``keep`` |W| of every block."""
        return topn_mask(layer.blocks(layer.weight.detach()), keep, magnitude=True)

    def score(self, t: int, layer: SparseLayer, w: torch.Tensor, g: torch.Tensor, old: torch.Tensor,
              lr: float) -> torch.Tensor:
        """Scores ``(K, M)`` on an evolution step (higher = keep), from blocks of W, G and B."""
        raise NotImplementedError(f"method {self.name!r} evolves but defines no score")

    def propose(self, t: int, layer: SparseLayer, w: torch.Tensor, g: torch.Tensor, old: torch.Tensor,
                lr: float) -> torch.Tensor:
        """The proposed mask ``(K, M)`` on an evolution step. Default: the top-N of :meth:`score`."""
        return topn_mask(self.score(t, layer, w, g, old, lr), self.n)

    def proposal_stats(self, t: int, layer: SparseLayer, w: torch.Tensor, g: torch.Tensor, old: torch.Tensor,
                       lr: float) -> dict[str, float]:
        """Statistics of an evolution step's scores, added to its event (LMA: how close regrowth comes)."""
        return {}

    def restrict(self, t: int, layer: SparseLayer, old: torch.Tensor, proposal: torch.Tensor,
                 w: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The final mask ``(K, M)`` from a proposal, and the fraction of blocks held back. Default: all adapt."""
        return proposal, 0.0

    def on_grad(self, t: int, layer: SparseLayer, grad: torch.Tensor, ctx: Sparsifier) -> None:
        """See iteration t's dense gradient before the gradient mode applies: add a term (SR-STE's decay)
        or learn from it (LBC's candidate scores)."""

    def refresh(self, t: int, layer: SparseLayer) -> None:
        """Recompute values derived from the weights and mask before t's forward and after a state load
        (MaxQ's soft mask values)."""

    def backward_perm(self, layer: SparseLayer) -> torch.Tensor | None:
        """The output-channel permutation the backward mask's groups follow (Bi-Mask), or None."""
        return None

    def layer_state(self, layer: SparseLayer) -> dict[str, torch.Tensor]:
        """Per-layer state tensors to create at attach time (saved with the sparsifier)."""
        return {}

    def event_fields(self, t: int, layer: SparseLayer) -> dict[str, Any]:
        """Extra fields of a recorded ``"update"`` selection's event (LBC: candidates alive, density)."""
        return {}

    def layer_filter(self) -> Callable[[str, Any], bool] | None:
        """A method's own layer policy ``(name, module) -> bool`` replacing the default one (ASP's
        ``layer_policy="reference"``), or None. A user's ``layer_filter`` takes precedence."""
        return None

    def schedule_problem(self) -> str | None:
        """Why this run's schedule never runs the method's own mechanism (warned at ``sparsify``, refused by
        ``bame train``), or None."""
        return None

    def restart_steps(self) -> list[int]:
        """Iterations at which the optimizer and LR schedule restart (ASP's fine-tuning)."""
        return []

    # -- derived from the plan ----------------------------------------------------------------------------
    def charge(self, t: int, layer: SparseLayer) -> Charge:
        """Densities charged to ``layer``'s products on iteration t, from the plan (SPEC section 7)."""
        step = self.plan(t)
        d = step.keep / self.m
        bwd = layer.has_bwd_mask
        dx = self.r if bwd else (d if self.dx_charge == "mask" else 1.0)
        return Charge(fwd=d, dx=dx, dw=1.0 if step.dense_wgrad else d, nm=self.r,
                      nm_blocks=1.0 if step.keep <= self.n else 0.0, nm_dx=bwd)

    def phase_of(self, t: int) -> str:
        """The part of the schedule iteration t is in (for the per-phase FLOPs breakdown)."""
        return self.plan(t).phase

    def mask_is_final(self, t: int) -> bool:
        """Whether during iteration t every block keeps exactly N (the invariant tests use it)."""
        return self.uses_masks and self.plan(t).keep == self.n

    def mask_may_change(self, t: int) -> bool:
        """Whether the mask may differ after iteration t's step (its evolution, or the selection of t+1)."""
        return self.plan(t).evolve or self.plan(t + 1).select

    # -- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {} if self.generator is None else {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"])

    def resolved_options(self) -> dict[str, Any]:
        """The options with every iteration option resolved to an iteration (written into config.yaml)."""
        return dataclasses.asdict(self.options)
