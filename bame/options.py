"""Typed options: one source for each option's default, type, help text and allowed values.

A method's options and the training config are dataclasses whose fields are made with :func:`option`::

    @dataclass
    class ScheduleOptions(Options):
        delta_t: int = option(100, "iterations between mask updates (the paper's best, Fig. 3)", low=1)

From that one declaration come the API default, the YAML key, the command-line flag with its type and
help text (:mod:`bame.cli.options`), and the check that runs when the dataclass is built
(:meth:`Options.__post_init__`): the value's type, its choices or range. So a wrong value is refused when
the options are built, before any data set is read or any worker is started.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from bame.errors import ConfigError

#: Python types a field annotation may name, and the values each admits (an int is a valid float).
_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,),
                                       "dict[str, Any]": (dict,), "list[str]": (list,)}


def option(
    default: Any,
    help: str,
    *,
    choices: Sequence[Any] | None = None,
    low: float | None = None,
    high: float | None = None,
    below: float | None = None,
    above: float | None = None,
    step: bool = False,
    default_factory: Any = None,
) -> Any:
    """A dataclass field with its help text and the values it admits.

    Args:
        default: the default value.
        help: one line on what the option does (the command line shows it).
        choices: the allowed values.
        low: the smallest allowed value (inclusive).
        high: the largest allowed value (inclusive).
        below: an exclusive upper bound.
        above: an exclusive lower bound.
        step: an iteration of the run: an int >= 0 (an iteration index) or a float in [0, 1] (a fraction of
            the run's steps T), resolved with :func:`bame.schedules.resolve_step`.
        default_factory: build the default (mutable defaults such as dicts).
    """
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "low": low, "high": high,
            "below": below, "above": above, "step": step}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def kinds(annotation: Any) -> list[str]:
    """The type names of a field annotation, e.g. ``"int | float | None"`` -> ``["int", "float", "None"]``."""
    return [k.strip() for k in str(annotation).split("|")]


def check_type(name: str, value: Any, annotation: Any) -> None:
    """Raise a one-line :class:`ConfigError` unless ``value`` has the annotated type (bool is not an int)."""
    names = kinds(annotation)
    if value is None and "None" in names:
        return
    allowed = tuple(t for k in names if k != "None" for t in _TYPES.get(k, (object,)))
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise ConfigError(f"{name} must be {' or '.join(names)}, not {value!r}")


def check_value(name: str, value: Any, meta: dict[str, Any]) -> None:
    """Check ``value`` against an :func:`option`'s choices, range or iteration rule."""
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}, not {value!r}")
    if meta.get("step"):
        check_step(name, value)
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and math.isnan(value):
            raise ConfigError(f"{name} must be a number, not nan")
        low, high, below, above = meta.get("low"), meta.get("high"), meta.get("below"), meta.get("above")
        if low is not None and value < low:
            raise ConfigError(f"{name}={value} must be at least {low}")
        if high is not None and value > high:
            raise ConfigError(f"{name}={value} must be at most {high}")
        if below is not None and value >= below:
            raise ConfigError(f"{name}={value} must be below {below}")
        if above is not None and value <= above:
            raise ConfigError(f"{name}={value} must be above {above}")


def check_step(name: str, value: Any) -> None:
    """An iteration option: an int >= 0, or a float fraction of the run in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be an int (iteration) or a float in [0, 1], not {value!r}")
    if isinstance(value, int) and value < 0:
        raise ConfigError(f"{name}={value} must be >= 0")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}={value} is a float, so it must be a fraction in [0, 1] of total_steps")


def same_kind_order(first: str, a: Any, second: str, b: Any, strict: bool = False) -> None:
    """Refuse ``b`` before ``a`` when both are iterations or both are fractions (mixed kinds need T)."""
    if type(a) is not type(b):
        return
    if b < a or (strict and b == a):
        relation = ">" if strict else ">="
        raise ConfigError(f"needs {second} {relation} {first} (got {first}={a}, {second}={b})")


@dataclasses.dataclass
class Options:
    """Base of option dataclasses: checks every field made with :func:`option` when built."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            check_type(f.name, value, f.type)
            check_value(f.name, value, dict(f.metadata))


def help_of(f: dataclasses.Field) -> str:
    """A field's help text ('' when it has none)."""
    return str(f.metadata.get("help", "")) if f.metadata else ""


def default_of(f: dataclasses.Field) -> Any:
    """A field's default value (built, for a default factory)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def parse_text(annotation: Any, text: str) -> Any:
    """A command-line string as the annotated type: ``"3"`` -> 3 for ``int | float``, ``"0.5"`` -> 0.5.

    Raises:
        ValueError: the text is not a value of that type.
    """
    names = [k for k in kinds(annotation) if k != "None"]
    if "int" in names:
        try:
            return int(text)
        except ValueError:
            if "float" not in names:
                raise ValueError(f"expected an integer, got {text!r}") from None
    if "float" in names:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
    return text
