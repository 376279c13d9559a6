"""Command-line flags generated from the config dataclass and the methods' Options dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from bame import config, methods
from bame.errors import ConfigError

#: TrainConfig fields that are not flags (nested or recipe-only).
_NOT_FLAGS = {"method_options", "target"}
_HELP = {
    "dataset": "dataset name (bame datasets)", "model": "model name (bame models); default: the dataset's",
    "method": "sparse-training method (bame methods)", "nm": "N:M pattern, e.g. 2:4 or 1:16",
    "epochs": "nominal epochs", "batch_size": "global batch size", "max_steps": "stop after K steps; the "
    "schedules are fitted to K", "data_dir": "where the dataset files are", "download": "download the dataset "
    "when missing (cifar10, fashion-mnist)", "device": "auto, cpu or cuda", "workers": "data-loading workers",
    "group_axis": "cin or kflat", "kernel": "dense (masked) or sparse (N:M kernels for Linear layers)",
    "check_masks": "verify after every mask update that all ranks hold identical masks",
}


def _number(text: str) -> int | float:
    """An iteration index (int) or a fraction of the run (float)."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _flag_kwargs(default: Any, annotation: str) -> dict[str, Any]:
    if isinstance(default, bool):
        return {"action": argparse.BooleanOptionalAction}
    if "int | float" in annotation or "float | int" in annotation:
        return {"type": _number}
    if isinstance(default, int) or annotation.startswith("int"):
        return {"type": int}
    if isinstance(default, float) or annotation.startswith("float"):
        return {"type": float}
    return {"type": str}


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; only flags given explicitly override a recipe."""
    group = parser.add_argument_group("training options (defaults: bame.config.TrainConfig)")
    for f in dataclasses.fields(config.TrainConfig):
        if f.name in _NOT_FLAGS:
            continue
        default = _default_of(f)
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=argparse.SUPPRESS,
                           help=f"{_HELP.get(f.name, f.name.replace('_', ' '))} (default: {default})",
                           **_flag_kwargs(default, str(f.type)))


def method_option_fields() -> dict[str, tuple[Any, str, str]]:
    """Every method option: name -> (default, annotation, methods that have it)."""
    out: dict[str, tuple[Any, str, list[str]]] = {}
    for name in methods.available():
        for f in dataclasses.fields(methods.get(name).Options):
            entry = out.setdefault(f.name, (_default_of(f), str(f.type), []))
            entry[2].append(name)
    return {k: (v[0], v[1], ", ".join(v[2])) for k, v in out.items()}


def add_method_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("method options (each method's own defaults apply when not given)")
    for name, (default, annotation, owners) in method_option_fields().items():
        flag = name.replace("_", "-")
        if name in config.FIELDS:  # a method option named like a training option gets a prefix
            flag = f"method-{flag}"
        group.add_argument(f"--{flag}", dest=f"mopt_{name}", default=argparse.SUPPRESS,
                           help=f"[{owners}]", **_flag_kwargs(default, annotation))


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig overrides the user gave on the command line."""
    given = vars(args)
    out = {k: given[k] for k in config.FIELDS if k in given}
    options = {k[len("mopt_"):]: v for k, v in given.items() if k.startswith("mopt_")}
    if options:
        out["method_options"] = options
    return out


def resolve(args: argparse.Namespace) -> config.TrainConfig:
    """Defaults < recipe (--config) < explicit flags."""
    recipe = config.load_recipe(args.config) if getattr(args, "config", None) else {}
    cfg = config.build(recipe, overrides(args))
    methods.get(cfg.method).make_options(**cfg.method_options)  # unknown options fail here, clearly
    return cfg


def check_positive(value: int, name: str) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be positive")
