"""One typed config: the single source of defaults, types and help for the API, the CLI flags and the recipes.

A new run's config is layered (:func:`build_run`): these defaults < the data set's defaults (a batch size,
epochs and BAME's ``delta_t`` that suit it, see :class:`bame.data.DatasetSpec`) < a recipe, which states only
what differs < the flags given explicitly on the command line. Every value is checked when the config is
built (:func:`build`), the method's options included, so a wrong value fails before any data set is read or
any worker process is started. The fully resolved config, with the method's options resolved to
iterations, is written into every run directory as ``config.yaml``; ``--resume`` starts from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bame.errors import ConfigError
from bame.options import check_type, check_value, default_of, option

OPTIMIZERS = ("sgd", "adamw")
KERNELS = ("dense", "sparse")
STORAGES = ("dense", "compressed")


@dataclass
class TrainConfig:
    """Everything that defines a training run."""

    dataset: str = option("digits", "dataset name (bame datasets)")
    model: str | None = option(None, "model name (bame models); default: the dataset's")
    model_options: dict[str, Any] = option(None, "model-specific options, e.g. shortcut=B for the CIFAR ResNets",
                                           default_factory=dict)
    width: float = option(1.0, "channel multiplier (the paper's wider ResNet-32 is width 2)", above=0.0)
    method: str = option("bame", "sparse-training method (bame methods)")
    nm: str = option("2:4", "N:M pattern, e.g. 2:4 or 1:16")
    group_axis: str = option("cin", "where blocks of M run: cin (input channels) or kflat (flattened kernel)",
                             choices=("cin", "kflat"))
    method_options: dict[str, Any] = option(None, "the method's own options, e.g. delta_t, alpha, t_i",
                                            default_factory=dict)
    epochs: int = option(10, "nominal epochs", low=1)
    batch_size: int = option(256, "global batch size over all processes (the paper: 256)", low=1)
    optimizer: str = option("sgd", "the optimizer: SGD with momentum, or AdamW", choices=OPTIMIZERS)
    lr: float = option(0.1, "peak learning rate, cosine annealing (the paper: 0.1)", above=0.0)
    momentum: float = option(0.9, "SGD momentum", low=0.0)
    nesterov: bool = option(False, "Nesterov momentum (SGD)")
    weight_decay: float = option(5e-4, "weight decay (coupled for SGD, decoupled for AdamW)", low=0.0)
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy", low=0.0, high=1.0)
    warmup_epochs: float = option(0.0, "linear learning-rate warm-up, in epochs", low=0.0)
    seed: int = option(0, "seed of the weights, the data order and the method's random choices", low=0)
    max_steps: int | None = option(None, "stop after N steps; the schedules are fitted to N (default: no cap)",
                                   low=1)
    data_dir: str | None = option(None, "where the dataset files are (default: ./data, then the system's copy; a "
                                        "directory given must exist)")
    download: bool = option(False, "download the dataset when missing (cifar10, fashion-mnist)")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    workers: int = option(0, "data-loading worker processes (ImageNet)", low=0)
    amp: bool = option(False, "automatic mixed precision (bf16 on CPU, fp16 with a GradScaler on CUDA)")
    kernel: str | None = option(None, "dense (masked products) or sparse (measured per-layer plans of N:M kernels); "
                                      "default: sparse with compressed storage, else dense", choices=KERNELS)
    storage: str = option("dense", "dense, or compressed: from the iteration the method allows it on, every sparse "
                                   "layer keeps only its kept values and the optimizer updates only those",
                          choices=STORAGES)
    compile: str = option("none", "torch.compile the model for training and evaluation with this backend "
                                  "(inductor, aot_eager), or none", choices=("none", "inductor", "aot_eager"))
    check_masks: bool = option(False, "verify after every mask update that all ranks hold identical masks")
    target: dict[str, Any] = option(None, "a recipe's paper figures, for reports", default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
#: Fields that may change on --resume (they do not change what is computed).
RESUMABLE = {"workers", "data_dir", "download", "device", "check_masks", "target", "compile"}
#: Keys of ``config.yaml`` that are not options: what the run resolved them to.
RESOLVED = "resolved"


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe (or a run's ``config.yaml``); refuse unknown keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of options")
    data.pop(RESOLVED, None)
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ConfigError(f"recipe {path}: unknown option(s) {', '.join(unknown)}")
    if isinstance(data.get("nm"), int):  # YAML 1.1 reads an unquoted 2:4 as the base-60 number 124
        raise ConfigError(f"recipe {path}: nm {data['nm']!r} is a number: quote the pattern, e.g. nm: \"2:4\"")
    return data


def build(*layers: dict[str, Any]) -> TrainConfig:
    """Merge option dicts (later wins; ``method_options`` and ``model_options`` merge key by key) into a
    checked TrainConfig."""
    merged: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {"method_options": {}, "model_options": {}}
    for layer in layers:
        for key, value in layer.items():
            if key not in FIELDS:
                raise ConfigError(f"unknown option {key!r}")
            if key in nested:
                if not isinstance(value or {}, dict):
                    raise ConfigError(f"{key} must be a mapping of option: value, not {value!r}")
                nested[key].update(value or {})
            else:
                merged[key] = value
    cfg = TrainConfig(**merged, **nested)
    if cfg.kernel is None:  # the storage's own: compressed layers are there to run sparse products
        cfg.kernel = "sparse" if cfg.storage == "compressed" else "dense"
    validate(cfg)
    return cfg


def dataset_defaults(dataset: str, method: str) -> dict[str, Any]:
    """A data set's defaults for a run of ``method``: its method options only where the method has them.

    Raises:
        DataError: an unknown data set.
        ConfigError: an unknown method.
    """
    from bame import data, methods

    defaults = dict(data.get_spec(dataset).defaults)
    known = {f.name for f in dataclasses.fields(methods.get(method).Options)}
    options = {k: v for k, v in defaults.pop("method_options", {}).items() if k in known}
    return {**defaults, "method_options": options} if options else defaults


def build_run(*layers: dict[str, Any]) -> TrainConfig:
    """A new run's config: TrainConfig defaults < the data set's defaults < ``layers`` (a recipe, then the
    flags given), each layer merged as in :func:`build`; the data set and method are the layers' own."""
    chosen = {"dataset": default_of(FIELDS["dataset"]), "method": default_of(FIELDS["method"])}
    for layer in layers:
        chosen.update({k: layer[k] for k in chosen if layer.get(k) is not None})
    return build(dataset_defaults(chosen["dataset"], chosen["method"]), *layers)


def load_run(out: str | Path) -> dict[str, Any] | None:
    """The options in a run directory's ``config.yaml`` (what ``--resume`` starts from), None if it has none."""
    path = Path(out) / "config.yaml"
    return load_recipe(path) if path.is_file() else None


def pins(method: str, old: dict[str, Any], new: dict[str, Any], step: int) -> dict[str, int]:
    """When a run is extended at ``step``: its schedule points (the method's iteration options) that it has
    passed and that the longer run would move, at the iteration where they happened.

    A point given as a fraction of T moves when T grows; one the run has already passed stays where it was,
    so an extended run never goes back to an earlier phase (BAME's gradual phase, ASP's dense phase).

    Args:
        method: the method's name.
        old: its resolved options for the run's length so far (iterations).
        new: its resolved options for the new length.
        step: the next iteration of the run.
    """
    from bame import methods

    steps = [f.name for f in dataclasses.fields(methods.get(method).Options) if f.metadata.get("step")]
    return {k: old[k] for k in steps if old[k] < step and new[k] != old[k]}


def validate(cfg: TrainConfig) -> None:
    """Every value's type and range, the N:M pattern, and the method's options (before any data is read)."""
    from bame import methods  # the registry imports torch: not at import time of the command line
    from bame.nm import parse_nm

    for f in dataclasses.fields(cfg):
        check_type(f.name, getattr(cfg, f.name), f.type)
        check_value(f.name, getattr(cfg, f.name), dict(f.metadata))
    parse_nm(cfg.nm)
    if cfg.device not in ("auto", "cpu", "cuda") and not str(cfg.device).startswith("cuda:"):
        raise ConfigError(f"device must be auto, cpu or cuda, not {cfg.device!r}")
    methods.get(cfg.method).make_options(**cfg.method_options)  # unknown names and bad values fail here


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two resolved configs, ignoring the resumable fields."""
    out = []
    for key in sorted((set(saved) | set(current)) - {RESOLVED}):
        if key in RESUMABLE:
            continue
        if key not in saved and key in FIELDS and current.get(key) == default_of(FIELDS[key]):
            continue  # an option newer than the saved config, at its default: the same run
        if saved.get(key) != current.get(key):
            out.append(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}")
    return out


def dump(cfg: TrainConfig, resolved: dict[str, Any] | None = None) -> str:
    """``config.yaml``: the config, and what the run resolved (T, the method's options in iterations)."""
    data = cfg.to_dict()
    if resolved:
        data[RESOLVED] = resolved
    return yaml.safe_dump(data, sort_keys=False)
