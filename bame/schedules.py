"""Schedules: pure functions of the iteration index t.

Nothing here keeps a counter; every function takes the step explicitly (SPEC section 2):

* gradual phase ``[0, t_i)``: the per-block budget falls linearly, ``k(t) = M - floor((M - N) t / t_i)``;
* evolution phase ``[t_i, t_f)``: N per block, LMA + OBF every ``delta_t`` iterations;
* frozen phase ``[t_f, T)``: masks fixed.
"""

from __future__ import annotations

import math

from bame.errors import ConfigError

GRADUAL, EVOLUTION, FROZEN = "gradual", "evolution", "frozen"


def resolve_step(value: int | float, total_steps: int | None, name: str) -> int:
    """An iteration index from an option: an int is an index, a float in [0, 1] a fraction of T.

    Raises:
        ConfigError: a fraction without ``total_steps``, or a value out of range.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be an iteration index or a fraction, not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{name}={value} must be >= 0")
        return value
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name}={value} is a float, so it must be a fraction in [0, 1] of total_steps")
        if total_steps is None:
            raise ConfigError(f"{name}={value} is a fraction of the run: pass total_steps")
        return int(round(value * total_steps))
    raise ConfigError(f"{name} must be an int (iteration) or a float in [0, 1], not {value!r}")


def phase(t: int, t_i: int, t_f: int) -> str:
    """The phase iteration t is in."""
    if t < t_i:
        return GRADUAL
    if t < t_f:
        return EVOLUTION
    return FROZEN


def budget(t: int, t_i: int, n: int, m: int) -> int:
    """Kept entries per block at iteration t: ``M - floor((M - N) t / t_i)`` before t_i, N after."""
    if t >= t_i:
        return n
    return m - math.floor((m - n) * t / t_i)


def gradual_budget(t: int, t_i: int, delta_t: int, n: int, m: int) -> int:
    """The budget in force at iteration t: the mask is re-chosen only at multiples of ``delta_t``.

    Within the gradual phase the budget of the last re-choice (at ``delta_t * floor(t / delta_t)``)
    holds; from t_i on it is N.
    """
    if t >= t_i:
        return n
    return budget(delta_t * (t // delta_t), t_i, n, m)


def is_update_step(t: int, t_i: int, t_f: int, delta_t: int) -> bool:
    """An LMA/OBF update iteration: ``t_i <= t < t_f`` and ``t % delta_t == 0``."""
    return t_i <= t < t_f and t % delta_t == 0


def schedule_lengths(epochs: int, steps_per_epoch: int, factor: float = 1.0,
                     max_steps: int | None = None) -> tuple[int, int]:
    """``(T, nominal)``: the run's optimizer steps, including a method's extra training (``factor``: ASP's 2x
    fine-tuning), and the steps of the dense baseline it is compared with; ``max_steps`` caps both."""
    nominal = epochs * steps_per_epoch
    total = int(round(nominal * factor))
    if max_steps is not None:
        total = min(total, max_steps)
        nominal = min(nominal, int(round(total / factor)))
    return total, max(1, nominal)


def cosine_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0, min_lr: float = 0.0) -> float:
    """Cosine annealing with optional linear warm-up, as a pure function of the step."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
