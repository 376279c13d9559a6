"""What every sparse-training method is: a small class that declares its facts and decides masks.

The sparsifier (:mod:`bame.sparsifier`) owns the lifecycle and calls a method at three points of every
iteration t, always passing t explicitly:

* ``prepare(t, ctx)`` - before the forward of iteration t (at attach for the first t); choose masks
  that depend on weights only (magnitude top-N, gradual budgets, backward masks);
* ``before_step(t, ctx)`` - in the optimizer's step pre-hook, with the (all-reduced, unscaled)
  gradients of iteration t; gradient-based mask updates and the gradient transform (mask it, keep it
  dense, add a decay);
* ``after_step(t, ctx)`` - in the step post-hook.

Everything that differs between methods and that the engine or the FLOPs ledger needs is *declared*
here (class attributes and :meth:`Method.charge`), so neither ever tests a method's name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from bame.errors import ConfigError

if TYPE_CHECKING:
    from bame.sparsifier import SparseLayer, Sparsifier


@dataclass(frozen=True)
class Charge:
    """Densities charged to one layer's three products on one iteration (SPEC section 7).

    ``fwd``/``dx``/``dw`` follow rule "paper" (the convention of the paper's tables); the ``*_hw``
    fields follow rule "nm-hardware" (only what N:M hardware can accelerate).
    """

    fwd: float
    dx: float
    dw: float
    fwd_hw: float
    dx_hw: float
    dw_hw: float

    @staticmethod
    def dense() -> Charge:
        return Charge(1.0, 1.0, 1.0, 1.0, 1.0, 1.0)


@dataclass
class NoOptions:
    """A method without hyper-parameters of its own."""


class Method:
    """Base class of a sparse-training method.

    Subclasses set the class attributes and override the hooks they need.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    #: False for the dense baseline: layers are listed (for the ledger) but never masked.
    uses_masks: ClassVar[bool] = True
    #: Training length relative to the nominal epochs (ASP fine-tunes for as long as it trained: 2.0).
    schedule_factor: ClassVar[float] = 1.0
    #: What the backward pass computes, for the README's table of methods.
    backward_note: ClassVar[str] = ""

    def __init__(
        self, options: Any, *, n: int, m: int, total_steps: int | None, seed: int, steps_per_epoch: int | None = None
    ) -> None:
        self.options = options
        self.n, self.m = n, m
        self.r = n / m
        self.total_steps = total_steps
        self.seed = seed
        #: Optimizer steps per epoch when known, for methods whose schedules are epoch-granular.
        self.steps_per_epoch = steps_per_epoch
        self.check_nm(n, m)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def make_options(cls, **overrides: Any) -> Any:
        """Build the Options dataclass, refusing unknown names."""
        known = {f.name for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            valid = ", ".join(sorted(known)) or "none"
            raise ConfigError(f"method {cls.name!r} has no option {', '.join(unknown)} (its options: {valid})")
        return cls.Options(**overrides)

    def check_nm(self, n: int, m: int) -> None:
        """Raise ConfigError if the method cannot run at this N:M."""

    def wants_bwd_mask(self) -> bool:
        """Whether sparse layers get a backward mask for the input gradient."""
        return False

    def layer_filter(self) -> Callable[[str, Any], bool] | None:
        """A method's own layer policy ``(name, module) -> bool`` replacing the default one (e.g. ASP's
        ``layer_policy="reference"``), or None. A user's ``layer_filter`` takes precedence."""
        return None

    # -- lifecycle (override as needed) --------------------------------------------------------------
    def init_layer(self, layer: SparseLayer, ctx: Sparsifier) -> None:
        """Create per-layer state at attach time (the mask starts all ones)."""

    def prepare(self, t: int, ctx: Sparsifier) -> None:
        """Before the forward of iteration t."""

    def before_step(self, t: int, ctx: Sparsifier) -> None:
        """In the optimizer's step pre-hook of iteration t. The default masks every gradient."""
        for layer in ctx.layers:
            layer.mask_grad()

    def after_step(self, t: int, ctx: Sparsifier) -> None:
        """In the optimizer's step post-hook of iteration t."""

    def refresh(self, ctx: Sparsifier) -> None:
        """Recompute derived buffers (backward masks, soft mask values) after a state load."""

    def restart_steps(self) -> list[int]:
        """Iterations at which the optimizer and LR schedule restart (ASP's fine-tuning)."""
        return []

    # -- accounting ----------------------------------------------------------------------------------
    def charge(self, t: int, layer: SparseLayer) -> Charge:
        """Densities charged to ``layer``'s products on iteration t. Default: static N:M."""
        r = self.r
        return Charge(r, r, r, r, 1.0, r)

    def phase_of(self, t: int) -> str:
        """A name for the part of the schedule iteration t is in (for the per-phase FLOPs breakdown)."""
        return "sparse"

    def mask_is_final(self, t: int) -> bool:
        """Whether from iteration t on every block keeps exactly N (the invariant tests use it)."""
        return True

    def mask_may_change(self, t: int) -> bool:
        """Whether the mask may differ after iteration t's step from before it."""
        return False

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def resolved_options(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)

