"""Command-line flags generated from the config dataclass and the methods' Options dataclasses.

Each flag's type, default and help come from the field that defines it (:func:`bame.options.option`);
an option shared by several methods lists what it does for each of them, and a default that a data set
changes (:attr:`bame.data.DatasetSpec.defaults`) is listed with it.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import yaml

from bame import config, data, methods
from bame.errors import ConfigError
from bame.options import default_of, help_of, kinds, parse_text

#: TrainConfig fields that are not plain flags (nested, or recipe-only).
_NOT_FLAGS = {"method_options", "model_options", "target"}
#: Metavars that say what a text option holds (the type alone would say TEXT).
_METAVARS = {"dataset": "NAME", "model": "NAME", "method": "NAME", "nm": "N:M", "data_dir": "DIR",
             "device": "auto|cpu|cuda[:N]"}


def _flag_kwargs(annotation: Any, metavar: str) -> dict[str, Any]:
    names = kinds(annotation)
    if "bool" in names:
        return {"action": argparse.BooleanOptionalAction}

    def parse(text: str) -> Any:
        try:
            return parse_text(annotation, text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = metavar.lower()  # argparse names the type in its error messages
    return {"type": parse, "metavar": metavar}


def _metavar(annotation: Any, choices: tuple | None) -> str:
    if choices:
        return "{" + ",".join(map(str, choices)) + "}"
    names = [k for k in kinds(annotation) if k != "None"]
    return {"int": "N", "float": "X", "str": "TEXT"}.get(names[0], "V") if len(names) == 1 else "STEP"


def _escape(text: str) -> str:
    return text.replace("%", "%%")  # argparse formats help strings with %


def _rounded(value: Any) -> str:
    """A default as a reader wants it: 1/3 as 0.3333, not 0.3333333333333333."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _by_dataset(name: str, method_option: bool = False) -> str:
    """``"; digits 64, fashion-mnist 128"``: the data sets whose defaults change this option."""
    found = []
    for dataset, spec in data.available().items():
        defaults = spec.defaults.get("method_options", {}) if method_option else spec.defaults
        if name in defaults:
            found.append(f"{dataset} {_rounded(defaults[name])}")
    return "; " + ", ".join(found) if found else ""


def _default_text(f: dataclasses.Field) -> str:
    """`` (default: X)``, with the data sets that change it; nothing where the help already says it."""
    if "default:" in help_of(f):
        return ""
    return f" (default: {_rounded(default_of(f))}{_by_dataset(f.name)})"


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; only flags given explicitly override a recipe."""
    group = parser.add_argument_group("training options (defaults: bame.config.TrainConfig, then the data set's)")
    for f in dataclasses.fields(config.TrainConfig):
        if f.name in _NOT_FLAGS:
            continue
        meta = dict(f.metadata)
        metavar = _METAVARS.get(f.name) or _metavar(f.type, meta.get("choices"))
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=argparse.SUPPRESS,
                           help=_escape(help_of(f) + _default_text(f)), **_flag_kwargs(f.type, metavar))
    group.add_argument("--model-option", dest="model_option", action="append", default=argparse.SUPPRESS,
                       metavar="KEY=VALUE", help="a model-specific option, e.g. shortcut=B (repeatable)")


def method_option_fields() -> dict[str, list[tuple[str, dataclasses.Field]]]:
    """Every method option name -> ``[(method, field), ...]`` for the methods that have it."""
    out: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    for name in methods.available():
        for f in dataclasses.fields(methods.get(name).Options):
            out.setdefault(f.name, []).append((name, f))
    return out


def _method_help(owners: list[tuple[str, dataclasses.Field]]) -> str:
    """What an option does for each method that has it (methods sharing one meaning share one line)."""
    parts: dict[str, list[str]] = {}
    for method, f in owners:
        default = "" if "default:" in help_of(f) else f" (default {_rounded(default_of(f))}{_by_dataset(f.name, True)})"
        parts.setdefault(help_of(f) + default, []).append(method)
    return "; ".join(f"[{', '.join(names)}] {text}" for text, names in parts.items())


def add_method_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("method options (each method's own defaults apply when not given)")
    for name, owners in method_option_fields().items():
        flag = name.replace("_", "-")
        if name in config.FIELDS:  # a method option named like a training option gets a prefix
            flag = f"method-{flag}"
        f = owners[0][1]
        group.add_argument(f"--{flag}", dest=f"mopt_{name}", default=argparse.SUPPRESS,
                           help=_escape(_method_help(owners)),
                           **_flag_kwargs(f.type, _metavar(f.type, dict(f.metadata).get("choices"))))


def _model_options(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--model-option expects KEY=VALUE, not {pair!r}")
        out[key.strip()] = yaml.safe_load(text)
    return out


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig overrides the user gave on the command line."""
    given = vars(args)
    out = {k: given[k] for k in config.FIELDS if k in given}
    options = {k[len("mopt_"):]: v for k, v in given.items() if k.startswith("mopt_")}
    if options:
        out["method_options"] = options
    if given.get("model_option"):
        out["model_options"] = _model_options(given["model_option"])
    return out


def resolve(args: argparse.Namespace, saved: dict[str, Any] | None = None) -> config.TrainConfig:
    """TrainConfig defaults < the data set's defaults < recipe (--config) < explicit flags; every value
    checked. A run's own ``config.yaml`` (``saved``, on --resume) replaces the first two."""
    recipe = config.load_recipe(args.config) if getattr(args, "config", None) else {}
    if saved is not None:
        return config.build(saved, recipe, overrides(args))
    return config.build_run(recipe, overrides(args))


def check_positive(value: int, name: str) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be positive")
