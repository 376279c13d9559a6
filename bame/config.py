"""One typed config: the single source of defaults for the API, the CLI flags and the YAML recipes.

A recipe states only what differs from these defaults; command-line flags given explicitly override the
recipe. The fully resolved config is written into every run directory as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bame.errors import ConfigError


@dataclass
class TrainConfig:
    """Everything that defines a training run."""

    dataset: str = "digits"
    model: str | None = None  # None: the dataset's default model
    width: float = 1.0  # channel multiplier (the paper's wider ResNet-32 is width 2)
    method: str = "bame"
    nm: str = "2:4"
    group_axis: str = "cin"
    method_options: dict[str, Any] = field(default_factory=dict)  # e.g. delta_t, alpha, t_i
    epochs: int = 10
    batch_size: int = 256  # global batch over all processes (the paper: 256)
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.1  # the paper: 0.1, cosine annealing
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    warmup_epochs: float = 0.0
    seed: int = 0
    max_steps: int | None = None  # stop after this many steps; the schedules are fitted to it
    data_dir: str | None = None
    download: bool = False
    device: str = "auto"  # auto | cpu | cuda
    workers: int = 0
    amp: bool = False
    kernel: str = "dense"  # dense | sparse (N:M kernels for Linear layers on CPU)
    check_masks: bool = False  # verify masks are identical on every rank after each update
    target: dict[str, Any] = field(default_factory=dict)  # a recipe's paper figures, for reports

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
#: Fields that may change on --resume (they do not change what is computed).
RESUMABLE = {"workers", "data_dir", "download", "device", "check_masks", "target"}


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe; refuse unknown keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of options")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ConfigError(f"recipe {path}: unknown option(s) {', '.join(unknown)}")
    if isinstance(data.get("nm"), int):  # YAML 1.1 reads an unquoted 2:4 as the base-60 number 124
        raise ConfigError(f"recipe {path}: nm {data['nm']!r} is a number: quote the pattern, e.g. nm: \"2:4\"")
    return data


def build(*layers: dict[str, Any]) -> TrainConfig:
    """Merge option dicts (later wins; ``method_options`` merge key by key) into a TrainConfig."""
    merged: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key not in FIELDS:
                raise ConfigError(f"unknown option {key!r}")
            if key == "method_options":
                if not isinstance(value or {}, dict):
                    raise ConfigError(f"method_options must be a mapping of option: value, not {value!r}")
                options.update(value or {})
            else:
                merged[key] = value
    cfg = TrainConfig(**merged, method_options=options)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Cheap checks of values (registries check names when they are used)."""
    from bame.nm import GROUP_AXES, parse_nm  # imports torch: not at import time

    _check_types(cfg)
    parse_nm(cfg.nm)  # before any data is loaded, and in ``train --nproc``'s launcher
    if cfg.group_axis not in GROUP_AXES:
        raise ConfigError(f"unknown group_axis {cfg.group_axis!r}: choose one of {', '.join(GROUP_AXES)}")
    positive = {"epochs": cfg.epochs, "batch_size": cfg.batch_size}
    for name, value in positive.items():
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, not {value!r}")
    if cfg.max_steps is not None and (not isinstance(cfg.max_steps, int) or cfg.max_steps <= 0):
        raise ConfigError(f"max_steps must be a positive integer, not {cfg.max_steps!r}")
    if cfg.optimizer not in ("sgd", "adamw"):
        raise ConfigError(f"optimizer must be 'sgd' or 'adamw', not {cfg.optimizer!r}")
    if cfg.device not in ("auto", "cpu", "cuda") and not str(cfg.device).startswith("cuda:"):
        raise ConfigError(f"device must be auto, cpu or cuda, not {cfg.device!r}")
    if cfg.kernel not in ("dense", "sparse"):
        raise ConfigError(f"kernel must be 'dense' or 'sparse', not {cfg.kernel!r}")
    if not cfg.lr > 0:
        raise ConfigError(f"lr must be positive, not {cfg.lr!r}")


_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,),
                                       "dict[str, Any]": (dict,)}


def _check_types(cfg: TrainConfig) -> None:
    """Each value has its field's type (a recipe's ``lr: fast`` would fail deep inside torch)."""
    for f in dataclasses.fields(cfg):
        value, kinds = getattr(cfg, f.name), [k.strip() for k in str(f.type).split("|")]
        if value is None and "None" in kinds:
            continue
        allowed = tuple(t for k in kinds if k != "None" for t in _TYPES.get(k, (object,)))
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise ConfigError(f"{f.name} must be {' or '.join(kinds)}, not {value!r}")


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two resolved configs, ignoring the resumable fields."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in RESUMABLE:
            continue
        if saved.get(key) != current.get(key):
            out.append(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}")
    return out


def dump(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
