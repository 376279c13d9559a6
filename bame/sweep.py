"""Sweeps: a grid of ``bame train`` runs (configurations x option values x seeds), resumable and parallel.

A sweep is given by a YAML file (or by the flags of ``bame sweep``)::

    base: {dataset: fashion-mnist, width: 0.25}     # options every run shares (a recipe's keys)
    seeds: [0, 1, 2]
    grid:                                            # every combination of the axes' values
      nm: ["1:16", "2:8"]                            #   a training option (or a method option): values
      budget:                                        #   named levels, each setting several options
        short: {epochs: 2, method_options: {delta_t: 15}}
        long: {epochs: 8, method_options: {delta_t: 60}}
    configs:                                         # named configurations (a list of method names works)
      bame: {method: bame}
      control: {method: bame, method_options: {t_f: 0.3333333333333333}}
      dense: {method: dense, nm: "1:16"}             # sets an axis's option itself: run once for all nm
      early: {method: bame, method_options: {t_i: 0}, only: {nm: ["1:16"]}}   # only these axis values

A run's options are merged, later winning: the base, the grid's levels, the configuration, then the
options given explicitly on the command line. Method options from the base, the grid and the command line
go only to methods that have them (as ``bame demo`` passes ``delta_t``); a configuration's own options
must all belong to its method. Runs whose merged options are equal are trained once and shared by every
configuration cell that names them (the dense run above serves both N:M values).

The sweep directory holds ``sweep.yaml`` (the expanded grid: every configuration cell and every run),
``recipes/NAME.yaml`` (the recipe each run is trained from), ``logs/NAME.log`` and ``runs/NAME/``, an
ordinary ``bame train`` run directory. Invoked again, a sweep skips finished runs (``summary.json``),
continues runs that have a checkpoint (``--resume``) and starts the others, so a killed sweep goes on
where it stopped. Each run holds a lock (``.locks/NAME.lock``, passed to its process) for as long as its
process lives, so two sweeps never train the same run at once.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bame import config
from bame.errors import ConfigError

FORMAT = "bame-sweep-1"
SWEEP_FILE = "sweep.yaml"
RUNS, RECIPES, LOGS, LOCKS = "runs", "recipes", "logs", ".locks"
#: Files of a run directory (``bame train``'s stable layout) that tell how far a run got.
SUMMARY, CHECKPOINT = "summary.json", "checkpoint.pt"
DONE, RESUME, FRESH = "done", "resume", "start"
_SPEC_KEYS = ("base", "seeds", "grid", "configs")
#: Options the grid and the base may not set: each configuration names its method, ``seeds`` the seeds.
_RESERVED = ("method", "seed")
_SLUG = re.compile(r"[^A-Za-z0-9_.+-]+")


@dataclass(frozen=True)
class Level:
    """One value of a grid axis: its label (in run names and the report) and the options it sets."""

    label: str
    options: dict[str, Any]
    named: bool = False  # a named level of several options (else one option's value)


@dataclass
class Spec:
    """A sweep before expansion: what every run shares, the axes, the configurations and the seeds."""

    base: dict[str, Any]
    seeds: list[int]
    grid: dict[str, list[Level]]
    configs: dict[str, dict[str, Any]]  # name -> options (recipe keys, with ``method``)
    only: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # name -> axis -> allowed labels
    overrides: dict[str, Any] = field(default_factory=dict)  # explicit command-line options: win over all


@dataclass
class PlannedRun:
    """One ``bame train`` run of the sweep."""

    name: str
    seed: int
    options: dict[str, Any]  # its recipe: what ``bame train --config`` reads


@dataclass
class Cell:
    """A configuration at one value of every axis: one row of the report, one run per seed."""

    config: str
    axes: dict[str, str]  # axis -> level label
    runs: dict[int, str]  # seed -> run name


@dataclass
class Plan:
    """The expanded sweep."""

    axes: list[str]
    cells: list[Cell]
    runs: list[PlannedRun]


# -- reading a sweep -----------------------------------------------------------------------------------------


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a sweep file (:func:`build_spec` checks what it holds)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"sweep file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep file {path} must be a mapping with {', '.join(_SPEC_KEYS)}")
    return raw


def method_fields(method: str) -> set[str]:
    """The option names of a registered method."""
    from bame import methods

    return {f.name for f in dataclasses.fields(methods.get(method).Options)}


def all_method_options() -> set[str]:
    """Every option name some registered method has."""
    from bame import methods

    return set().union(*(method_fields(name) for name in methods.available()))


def _check_options(options: Any, where: str, reserved: Iterable[str] = _RESERVED) -> dict[str, Any]:
    """``options`` if it is a mapping of recipe keys without the reserved ones."""
    if not isinstance(options, dict):
        raise ConfigError(f"{where} must be a mapping of options, not {options!r}")
    unknown = sorted(set(options) - set(config.FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}")
    taken = [key for key in reserved if key in options]
    if taken:
        raise ConfigError(f"{where} may not set {taken[0]!r}: configurations name the method, seeds the seeds")
    if not isinstance(options.get("method_options", {}) or {}, dict):
        raise ConfigError(f"{where}: method_options must be a mapping")
    if "nm" in options:
        _check_nm(options["nm"], where)
    return dict(options)


def _check_nm(value: Any, where: str) -> None:
    if isinstance(value, int):  # YAML 1.1 reads an unquoted 2:4 as the base-60 number 124
        raise ConfigError(f"{where}: nm {value!r} is a number: quote the pattern, e.g. \"2:4\"")


def _scalar_level(axis: str, value: Any) -> Level:
    """The level of an axis given as a list of one option's values."""
    if axis in config.FIELDS:
        if axis == "nm":
            _check_nm(value, "grid axis nm")
        return Level(str(value), {axis: value})
    if axis in all_method_options():
        return Level(str(value), {"method_options": {axis: value}})
    raise ConfigError(f"grid axis {axis!r} is neither a training option nor a method option: give its values "
                      "as named levels ({label: {option: value, ...}, ...})")


def parse_axis(axis: str, values: Any) -> list[Level]:
    """The levels of one grid axis: a list of values of the option ``axis``, or named levels."""
    if axis in _RESERVED or axis in ("method_options", "target"):
        raise ConfigError(f"grid axis {axis!r} is not allowed: use configs for methods and seeds for seeds")
    if isinstance(values, dict) and values:
        levels = [Level(str(label), _check_options(opts, f"grid level {axis}.{label}"), named=True)
                  for label, opts in values.items()]
    elif isinstance(values, list) and values:
        if any(isinstance(v, (dict, list)) for v in values):
            raise ConfigError(f"grid axis {axis!r}: values must be plain values, not {values!r}")
        levels = [_scalar_level(axis, v) for v in values]
    else:
        raise ConfigError(f"grid axis {axis!r} needs a non-empty list of values or mapping of named levels")
    labels = [level.label for level in levels]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"grid axis {axis!r} repeats a value: {labels}")
    return levels


def parse_configs(raw: Any) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, list[str]]]]:
    """``configs`` of a sweep file: a list of method names or a mapping name -> options (+ ``only``)."""
    if isinstance(raw, list):
        raw = {str(name): {} for name in raw}
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("configs must be a non-empty list of methods or mapping of named configurations")
    configs, only = {}, {}
    for name, entry in raw.items():
        name = str(name)
        if not name or _SLUG.search(name):
            raise ConfigError(f"configuration name {name!r}: use letters, digits and _ . + - only")
        if not isinstance(entry or {}, dict):
            raise ConfigError(f"configs.{name} must be a mapping of options, not {entry!r}")
        entry = dict(entry or {})
        restriction = entry.pop("only", {}) or {}
        if not isinstance(restriction, dict):
            raise ConfigError(f"configs.{name}.only must map grid axes to lists of their values")
        only[name] = {axis: [str(v) for v in (vals if isinstance(vals, list) else [vals])]
                      for axis, vals in restriction.items()}
        configs[name] = _check_options(entry, f"configs.{name}", reserved=("seed",))
        configs[name]["method"] = entry.get("method", name)
    return configs, only


def _parse_seeds(raw: Any) -> list[int]:
    seeds = raw if isinstance(raw, list) else [raw]
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"seeds must be a list of integers, not {raw!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds repeat: {seeds}")
    return list(seeds)


def select_levels(axis: str, levels: list[Level], wanted: list[str]) -> list[Level]:
    """The named levels of ``axis`` whose labels are in ``wanted`` (``--grid budget=short``)."""
    by_label = {level.label: level for level in levels}
    missing = [w for w in wanted if w not in by_label]
    if missing:
        raise ConfigError(f"grid axis {axis!r} has no level {missing[0]!r} (its levels: {', '.join(by_label)})")
    return [by_label[w] for w in wanted]


def build_spec(raw: dict[str, Any], *, recipe: dict[str, Any] | None = None,
               overrides: dict[str, Any] | None = None, configs: list[str] | None = None,
               seeds: list[int] | None = None, grid: dict[str, list[Any]] | None = None) -> Spec:
    """A :class:`Spec` from a sweep file's contents and the command line.

    Args:
        raw: the sweep file (:func:`load_file`), or ``{}``.
        recipe: a ``bame train`` recipe under the file's base (``--config``).
        overrides: options given explicitly on the command line; they win over everything.
        configs: configuration names to run (a subset of the file's; a method name not in the file adds
            that method as a configuration).
        seeds: the seeds, replacing the file's.
        grid: axes from the command line: values for an option axis (replacing the file's), or the labels
            of a named axis's levels to keep.
    """
    unknown = sorted(set(raw) - set(_SPEC_KEYS))
    if unknown:
        raise ConfigError(f"sweep: unknown key(s) {', '.join(unknown)} (known: {', '.join(_SPEC_KEYS)})")
    base = _check_options({**(recipe or {}), **(raw.get("base") or {})}, "base")
    file_configs, only = parse_configs(raw["configs"]) if raw.get("configs") else ({}, {})
    spec = Spec(base, _parse_seeds(raw.get("seeds", [0])),
                {axis: parse_axis(axis, values) for axis, values in (raw.get("grid") or {}).items()},
                file_configs, only, _check_options(overrides or {}, "command-line options"))
    _check_only(spec)  # against the file's grid: --grid may narrow an axis so that a configuration drops out
    for axis, values in (grid or {}).items():
        named = spec.grid.get(axis) and spec.grid[axis][0].named
        spec.grid[axis] = select_levels(axis, spec.grid[axis], [str(v) for v in values]) if named \
            else parse_axis(axis, list(values))
    if seeds is not None:
        spec.seeds = _parse_seeds(seeds)
    if configs is not None:
        spec.configs = {name: spec.configs.get(name, {"method": name}) for name in configs}
    if not spec.configs:
        raise ConfigError("no configurations: give a sweep file with configs, or --methods")
    return spec


def _check_only(spec: Spec) -> None:
    for name, restriction in spec.only.items():
        for axis, labels in restriction.items():
            if axis not in spec.grid:
                raise ConfigError(f"configs.{name}.only names {axis!r}, which is not a grid axis")
            known = {level.label for level in spec.grid[axis]}
            if not set(labels) & known:
                raise ConfigError(f"configs.{name}.only: none of {labels} is a value of grid axis {axis!r}")


# -- expansion -------------------------------------------------------------------------------------------


def run_options(spec: Spec, name: str, levels: dict[str, Level], seed: int) -> dict[str, Any]:
    """The merged recipe of one run (see the module docstring for the order)."""
    entry = spec.configs[name]
    fields = method_fields(entry["method"])
    merged: dict[str, Any] = {}
    options: dict[str, Any] = {}
    layers = [(spec.base, False), *((level.options, False) for level in levels.values()), (entry, True),
              (spec.overrides, False)]
    for layer, own in layers:
        for key, value in layer.items():
            if key == "method_options":
                options.update({k: v for k, v in (value or {}).items() if own or k in fields})
            elif isinstance(value, dict):  # nested options (e.g. a model's) merge key by key, as in a recipe
                merged[key] = {**merged.get(key, {}), **value}
            else:
                merged[key] = value
    merged["seed"] = seed
    if options:
        merged["method_options"] = options
    return merged


def _slug(axis: str, level: Level) -> str:
    text = _SLUG.sub("_", level.label)
    # nm values are recognisable on their own (1_16); other option values are not (a bare "4")
    return text if level.named or axis == "nm" else f"{axis}_{text}"


def run_name(spec: Spec, name: str, levels: dict[str, Level], seed: int) -> str:
    """``CONFIG-LEVEL...-sSEED``, naming only the axes whose values change this configuration's runs."""
    parts = [name]
    for axis, level in levels.items():
        variants = {json.dumps(run_options(spec, name, {**levels, axis: other}, seed), sort_keys=True, default=str)
                    for other in spec.grid[axis]}
        if len(variants) > 1:
            parts.append(_slug(axis, level))
    return "-".join([*parts, f"s{seed}"])


def _allowed(restriction: dict[str, list[str]], levels: dict[str, Level]) -> bool:
    return all(levels[axis].label in labels for axis, labels in restriction.items())


def expand(spec: Spec) -> Plan:
    """Every configuration cell and every distinct run (equal merged options are trained once)."""
    axes = list(spec.grid)
    cells: list[Cell] = []
    runs: dict[str, PlannedRun] = {}  # by configuration and merged options
    for name in spec.configs:
        for combo in itertools.product(*(spec.grid[axis] for axis in axes)):
            levels = dict(zip(axes, combo, strict=True))
            if not _allowed(spec.only.get(name, {}), levels):
                continue
            cell = Cell(name, {axis: level.label for axis, level in levels.items()}, {})
            for seed in spec.seeds:
                options = run_options(spec, name, levels, seed)
                key = name + json.dumps(options, sort_keys=True, default=str)
                if key not in runs:
                    runs[key] = PlannedRun(run_name(spec, name, levels, seed), seed, options)
                cell.runs[seed] = runs[key].name
            cells.append(cell)
    names = [run.name for run in runs.values()]
    clash = next((n for n in names if names.count(n) > 1), None)
    if clash:
        raise ConfigError(f"two different runs would be named {clash!r}: give the grid distinct values")
    return Plan(axes, cells, list(runs.values()))


def validate(plan: Plan) -> None:
    """Build every run's config from its recipe (wrong values fail here, before anything runs)."""
    from bame import methods

    for run in plan.runs:
        try:
            cfg = config.build_run(run.options)  # as bame train builds it: data-set defaults below
            methods.get(cfg.method).make_options(**cfg.method_options)
        except ConfigError as err:
            raise ConfigError(f"sweep run {run.name}: {err}") from None


# -- the sweep directory ---------------------------------------------------------------------------------------


def plan_record(plan: Plan, spec: Spec) -> dict[str, Any]:
    """What ``sweep.yaml`` holds: the request and its expansion."""
    return {
        "format": FORMAT,
        "request": {"base": spec.base, "seeds": spec.seeds, "overrides": spec.overrides,
                    "grid": {axis: {level.label: level.options for level in levels}
                             for axis, levels in spec.grid.items()},
                    "configs": spec.configs, "only": {k: v for k, v in spec.only.items() if v}},
        "axes": plan.axes,
        "cells": [{"config": c.config, "axes": c.axes, "runs": c.runs} for c in plan.cells],
        "runs": [{"name": r.name, "seed": r.seed, "dir": f"{RUNS}/{r.name}", "options": r.options}
                 for r in plan.runs],
    }


def write_plan(root: Path, plan: Plan, spec: Spec) -> None:
    """``sweep.yaml`` and one recipe per run; the directories the runs and their logs go to."""
    for sub in (RUNS, RECIPES, LOGS, LOCKS):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for run in plan.runs:
        (root / RECIPES / f"{run.name}.yaml").write_text(yaml.safe_dump(run.options, sort_keys=False))
    (root / SWEEP_FILE).write_text(yaml.safe_dump(plan_record(plan, spec), sort_keys=False))


def read_plan(root: str | Path) -> dict[str, Any]:
    """A sweep directory's ``sweep.yaml``."""
    path = Path(root) / SWEEP_FILE
    record = yaml.safe_load(path.read_text()) if path.is_file() else None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a sweep file written by `bame sweep` (format {FORMAT})")
    return record

