"""Export N:M weights: plain safetensors for any PyTorch user, or a compressed N:M form.

    from bame.export import export, load_compressed
    export(sparsifier, "model.safetensors", format="compressed")   # or a model, a run dir, a checkpoint
    model = load_compressed("model.safetensors", model=MyNet())

* ``dense``: the model's ``state_dict()`` with the effective weights (masks applied) under the plain
  names (``X.weight``, never ``X.parametrizations...``), loadable by
  ``model.load_state_dict(safetensors.torch.load_file(path))``.
* ``compressed``: every sparse weight as its kept values ``NAME.values`` ``(K, N)`` and their in-block
  positions ``NAME.indices`` ``(K, N)`` (uint8), in the ``[K, M]`` block view of the grouping axis;
  every other tensor as is. That is N/M of the weight bytes plus one byte per kept value.
  :func:`load_compressed` rebuilds the weights exactly.

What can be exported: a :class:`~bame.sparsifier.Sparsifier` (its masks, N:M and axis); a model,
attached (masks read from its layers) or squashed (the N:M structure inferred from its zeros, see
:func:`infer_pattern`); a ``bame train`` run directory; a checkpoint written from one's own loop,
``torch.save({"model": model.state_dict(), "sparsifier": sparsifier.state_dict()}, path)`` (or a bare state
dict, or a Lightning ``.ckpt`` written with ``BameCallback``); a transformers ``checkpoint-N`` folder
holding ``bame_sparsifier.pt``. Checkpoints are read with ``torch.load(weights_only=True)``.

The file's metadata records the N:M, the axis and, for a run directory, how to rebuild its model.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bame import checkpoint, masking
from bame.errors import CheckpointError, ConfigError
from bame.nm import GROUP_AXES, blocking_problem, format_nm, from_blocks, parse_nm, to_blocks
from bame.sparsifier import Sparsifier

FORMATS = ("dense", "compressed")
#: Block sizes tried when the N:M structure is inferred from zeros (indices are stored as uint8).
CANDIDATE_M = (2, 4, 8, 16, 32, 64, 128, 256)
#: The sparsifier state in a transformers ``checkpoint-N`` folder (bame.integrations.huggingface writes it).
TRAINER_STATE = "bame_sparsifier.pt"
_RAW = ".parametrizations.weight.original"  # a bame layer's raw weight W in an attached model's state_dict
_PAR = ".parametrizations.weight."
_NEEDS = ("bame export needs a run directory (model.safetensors + config.yaml), a checkpoint file saved as "
          "torch.save({'model': model.state_dict(), 'sparsifier': sparsifier.state_dict()}, path), or a Trainer "
          f"checkpoint-N folder with {TRAINER_STATE}")


@dataclass(frozen=True)
class Pattern:
    """An N:M pattern along a grouping axis, and the weights that follow it."""

    n: int
    m: int
    group_axis: str
    names: tuple[str, ...]


@dataclass
class Weights:
    """What an export writes: effective weights under plain names, and what is known of their masks."""

    tensors: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor] | None  # None: unknown, inferred from the zeros
    pattern: Pattern | None  # None: unknown, inferred from the masks or zeros
    meta: dict[str, str]


# -- export --------------------------------------------------------------------------------------------
def export(source: nn.Module | Sparsifier | str | Path, path: str | Path | None = None, format: str = "compressed",
           *, nm: str | tuple[int, int] | None = None, group_axis: str | None = None) -> dict[str, Any]:
    """Write N:M weights as ``dense`` or ``compressed`` safetensors.

    Args:
        source: a sparsifier, a model (attached or squashed), or the path of a run directory, a checkpoint
            file or a transformers ``checkpoint-N`` folder (see the module docstring).
        path: the output file; for a path source it defaults to ``model.FORMAT.safetensors`` beside it.
        format: ``"dense"`` or ``"compressed"``.
        nm: the N:M to compress with, in place of the source's own or the one inferred from the zeros.
        group_axis: the grouping axis to go with ``nm`` (default ``"cin"``); without ``nm``, the only axis
            the inference considers.

    Returns:
        ``path``, ``format``, ``bytes`` (file size), ``dense_tensor_bytes`` and their ``ratio``.

    Raises:
        ConfigError: an unknown format, no output path, or no N:M structure to compress.
        CheckpointError: a path that holds nothing exportable.
    """
    from safetensors.torch import save

    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}: choose dense or compressed")
    weights = _weights_of(source)
    out = _output_path(source, path, format)
    meta = {**weights.meta, "format": f"bame-{format}"}
    payload = weights.tensors
    if format == "compressed":
        pattern = _pattern(weights, nm, group_axis)
        masks = weights.masks if weights.masks is not None else {k: weights.tensors[k] != 0 for k in pattern.names}
        payload = compress({**weights.tensors, **{f"{k}.mask": v for k, v in masks.items()}},
                           pattern.n, pattern.m, pattern.group_axis)
        shapes = {k[: -len(".values")]: list(weights.tensors[k[: -len(".values")]].shape)
                  for k in payload if k.endswith(".values")}
        meta.update(nm=format_nm(pattern.n, pattern.m), group_axis=pattern.group_axis, shapes=json.dumps(shapes))
    blob = save(payload, metadata=meta)
    checkpoint.atomic_write(out, lambda f: f.write(blob))
    dense_bytes = sum(v.numel() * v.element_size() for v in weights.tensors.values())
    size = out.stat().st_size
    return {"path": str(out), "format": format, "bytes": size, "dense_tensor_bytes": dense_bytes,
            "ratio": size / dense_bytes}


def _weights_of(source: nn.Module | Sparsifier | str | Path) -> Weights:
    if isinstance(source, Sparsifier):
        return _from_sparsifier(source)
    if isinstance(source, nn.Module):
        return _from_model(source)
    if isinstance(source, (str, Path)):
        return read_path(Path(source))
    raise ConfigError(f"cannot export a {type(source).__name__}: pass a model, a sparsifier or a path")


def _from_sparsifier(sparsifier: Sparsifier) -> Weights:
    tensors = checkpoint.plain_state_dict(_unwrap(sparsifier.model), {})
    masks = {k: v.detach().cpu().bool() for k, v in sparsifier.masks().items()}
    pattern = Pattern(sparsifier.n, sparsifier.m, sparsifier.group_axis, tuple(masks))
    meta = {"method": sparsifier.method.name, "nm": format_nm(sparsifier.n, sparsifier.m),
            "group_axis": sparsifier.group_axis}
    return Weights(tensors, masks, pattern, meta)


def _from_model(model: nn.Module) -> Weights:
    """A model's effective weights; masks where bame is attached, else none (they are inferred)."""
    model = _unwrap(model)
    masks = {f"{name}.weight": masking.parametrization(module).mask.detach().cpu().bool()
             for name, module in model.named_modules() if masking.is_attached(module)}
    return Weights(checkpoint.plain_state_dict(model, {}), masks or None, None, {})


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel, so names match the user's model."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def _output_path(source: Any, path: str | Path | None, format: str) -> Path:
    if path is not None:
        return Path(path)
    if not isinstance(source, (str, Path)):
        raise ConfigError("export needs an output path for a model or sparsifier")
    source = Path(source)
    if source.is_dir():
        return source / f"model.{format}.safetensors"
    return source.with_name(f"{source.stem}.{format}.safetensors")


def _pattern(weights: Weights, nm: str | tuple[int, int] | None, group_axis: str | None) -> Pattern:
    """The N:M to compress with: the source's own, the caller's, or the one the zeros (masks) show."""
    keep = weights.masks if weights.masks is not None else {
        k: v != 0 for k, v in weights.tensors.items() if v.is_floating_point() and v.dim() >= 2}
    if group_axis is not None and group_axis not in GROUP_AXES:
        raise ConfigError(f"unknown group_axis {group_axis!r}: choose one of {', '.join(GROUP_AXES)}")
    if nm is not None:
        n, m = parse_nm(nm)
        axis = group_axis or "cin"
        names = tuple(k for k, c in _max_counts(keep, m, axis).items() if c <= n)
        return Pattern(n, m, axis, names)
    if weights.pattern is not None:
        return weights.pattern
    return infer_pattern(keep, GROUP_AXES if group_axis is None else (group_axis,))


# -- inferring N:M from zeros ------------------------------------------------------------------------------
def infer_pattern(keep: dict[str, torch.Tensor], axes: tuple[str, ...] = GROUP_AXES) -> Pattern:
    """The N:M pattern under which the kept (non-zero) entries are stored smallest.

    For every axis and block size M in :data:`CANDIDATE_M`, and every N < M, the weights whose blocks all
    keep at most N are stored at N/M of their size and the others whole; the pattern with the smallest
    total wins, ties going to the smaller M (a 1:16 weight is also 2:32) and then to ``"cin"``. Linear
    weights and 1x1 convolutions are blocked alike along both axes; a tie between the axes that would
    block a larger convolution differently is ambiguous.

    Args:
        keep: weight name -> bool tensor (True where the weight is kept / non-zero), weight-shaped.
        axes: the grouping axes to consider (one, to settle an ambiguity).

    Raises:
        ConfigError: no weight has an N:M structure, or the structure is ambiguous.
    """
    sizes = {k: v.numel() for k, v in keep.items()}
    total = sum(sizes.values())
    best: dict[str, tuple[float, int, Pattern]] = {}
    for axis in axes:
        for m in CANDIDATE_M:
            counts = _max_counts(keep, m, axis)
            for n in sorted({c for c in counts.values() if 0 < c < m} | {1}):
                names = tuple(k for k, c in counts.items() if c <= n)
                cost = total - sum(sizes[k] for k in names) * (1 - n / m)
                if names and (axis not in best or (cost, m) < best[axis][:2]):
                    best[axis] = (cost, m, Pattern(n, m, axis, names))
    if not best:
        raise ConfigError("the weights' zeros form no N:M pattern: export format='dense', or pass nm= and group_axis=")
    cin, kflat = best.get("cin"), best.get("kflat")
    if cin is not None and kflat is not None and cin[:2] == kflat[:2]:
        spread = [k for k in set(cin[2].names) | set(kflat[2].names) if math.prod(keep[k].shape[2:]) > 1]
        if spread:
            raise ConfigError(f"the zeros of {spread[0]} are N:M along both cin and kflat: pass group_axis=")
    return min(best.values(), key=lambda entry: (entry[0], entry[1], GROUP_AXES.index(entry[2].group_axis)))[2]


def _max_counts(keep: dict[str, torch.Tensor], m: int, axis: str) -> dict[str, int]:
    """Per weight that can be cut into blocks of M along ``axis``: the most entries any block keeps."""
    return {name: int(to_blocks(mask, m, axis).sum(-1, dtype=torch.int64).max())
            for name, mask in keep.items() if mask.dim() >= 2 and blocking_problem(mask.shape, m, axis) is None}


# -- the compressed form ---------------------------------------------------------------------------------
def compress(tensors: dict[str, torch.Tensor], n: int, m: int, group_axis: str) -> dict[str, torch.Tensor]:
    """Replace each masked weight by ``NAME.values`` and ``NAME.indices``; drop the masks.

    Args:
        tensors: the weights, with a bool ``NAME.mask`` beside each weight ``NAME`` to compress; a weight
            whose mask keeps more than N of some block stays whole.
    """
    out: dict[str, torch.Tensor] = {}
    masks = {k[: -len(".mask")]: v for k, v in tensors.items() if k.endswith(".mask")}
    for name, tensor in tensors.items():
        if name.endswith(".mask"):
            continue
        mask = masks.get(name)
        if mask is None or int(to_blocks(mask, m, group_axis).sum(-1).max()) > n:
            out[name] = tensor
            continue
        blocks, keep = to_blocks(tensor, m, group_axis), to_blocks(mask, m, group_axis)  # (K, M)
        # Kept positions first (stable: in index order), then ascending within the first N.
        idx = torch.sort(keep.to(torch.uint8), dim=-1, descending=True, stable=True).indices[:, :n]
        idx = idx.sort(dim=-1).values  # (K, N)
        out[f"{name}.values"] = blocks.gather(1, idx).contiguous()
        out[f"{name}.indices"] = idx.to(torch.uint8 if m <= 256 else torch.int16).contiguous()
    return out


def decompress(tensors: dict[str, torch.Tensor], shapes: dict[str, list[int]], m: int,
               group_axis: str) -> dict[str, torch.Tensor]:
    """Inverse of :func:`compress`, given each compressed weight's shape."""
    out = {k: v for k, v in tensors.items() if not k.endswith((".values", ".indices"))}
    for name, shape in shapes.items():
        values, idx = tensors[f"{name}.values"], tensors[f"{name}.indices"].long()  # (K, N)
        blocks = torch.zeros(values.shape[0], m, dtype=values.dtype).scatter_(1, idx, values)  # (K, M)
        out[name] = from_blocks(blocks, shape, group_axis).contiguous()
    return out


# -- loading ------------------------------------------------------------------------------------------------
def load_compressed(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Load a ``compressed`` (or ``dense``) export into a model, in eval mode.

    Args:
        path: the export.
        model: a plain model of the exported architecture (a fresh instance, without bame attached). None:
            rebuild the model from the export's metadata, which only a ``bame train`` run's export has.

    Raises:
        CheckpointError: not a bame export, no model to load into, or weights that do not fit the model.
    """
    meta, tensors = read_export(path)
    if model is None:
        model = _registry_model(meta, path)
    else:
        model = _unwrap(model)
        attached = [name for name, module in model.named_modules() if masking.is_attached(module)]
        if attached:
            raise ConfigError(f"load into a plain model: {attached[0]} has bame masks attached (squash() first)")
    _load_into(model, tensors, path)
    return model.eval()


def read_export(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """An export's metadata and its dense tensors (decompressed)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(path)
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path} is not a safetensors file: {str(err).splitlines()[0]}") from None
    if meta.get("format") not in ("bame-compressed", "bame-dense"):
        raise CheckpointError(f"{path} is not a bame export")
    if meta["format"] == "bame-compressed":
        _, m = parse_nm(meta["nm"])
        tensors = decompress(tensors, json.loads(meta["shapes"]), m, meta["group_axis"])
    return meta, tensors


def _registry_model(meta: dict[str, str], path: str | Path) -> nn.Module:
    from bame import models

    if "model" not in meta:
        raise CheckpointError(f"{path} was exported from your own model: pass model=, a fresh instance of it")
    return models.create(meta["model"], num_classes=int(meta["num_classes"]), in_channels=int(meta["in_channels"]),
                         image_size=int(meta["image_size"]), width=float(meta["width"]))


def _load_into(model: nn.Module, tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as err:  # shape mismatches, with one line per tensor
        detail = " ".join(str(err).split("\n\t")[1:2]) or str(err).splitlines()[0]
        raise CheckpointError(f"{path} does not fit this model: {detail.strip()}") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{path} does not fit this model: missing {result.missing_keys[:3]}, "
                              f"unexpected {result.unexpected_keys[:3]}")


# -- reading exportable files ---------------------------------------------------------------------------------
def read_path(path: Path) -> Weights:
    """The exportable weights in a run directory, a Trainer checkpoint folder or a checkpoint file."""
    if path.is_dir():
        if (path / checkpoint.WEIGHTS).is_file() and (path / "config.yaml").is_file():
            return _from_run(path)
        if (path / TRAINER_STATE).is_file():
            return _from_trainer_folder(path)
        raise CheckpointError(f"{path} is not a finished run nor a Trainer checkpoint: {_NEEDS}")
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    if path.suffix == ".safetensors":
        return _from_state_dict(_load_safetensors(path), None, path)
    return _from_checkpoint(_load_torch(path), path)


def _from_run(run_dir: Path) -> Weights:
    """A ``bame train`` run's final weights, its masks, and the metadata needed to rebuild its model."""
    import yaml

    from bame import data

    tensors = _load_safetensors(run_dir / checkpoint.WEIGHTS)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    spec = data.get_spec(cfg["dataset"])
    meta = {"model": cfg.get("model") or spec.default_model, "num_classes": str(spec.num_classes),
            "in_channels": str(spec.in_channels), "image_size": str(spec.image_size),
            "width": str(cfg.get("width", 1.0)), "nm": cfg["nm"], "group_axis": cfg.get("group_axis", "cin"),
            "method": cfg["method"]}
    masks = {k[: -len(".mask")]: v.bool() for k, v in tensors.items() if k.endswith(".mask")}
    weights = {k: v for k, v in tensors.items() if not k.endswith(".mask")}
    n, m = parse_nm(meta["nm"])
    return Weights(weights, masks, Pattern(n, m, meta["group_axis"], tuple(masks)), meta)


def _from_trainer_folder(folder: Path) -> Weights:
    """A transformers ``checkpoint-N`` folder: the trainer's weights and ``bame_sparsifier.pt``."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors = {k: v for shard in shards for k, v in _load_safetensors(folder / shard).items()}
    else:
        tensors = _load_safetensors(folder / "model.safetensors")
    return _from_state_dict(tensors, checkpoint.load(folder / TRAINER_STATE).get("sparsifier"), folder)


def _from_checkpoint(state: Any, path: Path) -> Weights:
    """``{"model": state_dict, "sparsifier": ...}`` (bame's and one's own), a Lightning ``.ckpt``, or a state dict."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}: {_NEEDS}")
    state_dict = state.get("model", state.get("state_dict", state))
    if not isinstance(state_dict, dict) or not state_dict or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise CheckpointError(f"{path} holds no model state_dict: {_NEEDS}")
    sparsifier = state.get("sparsifier")
    for entry in (state.get("callbacks") or {}).values():  # Lightning keeps BameCallback's state there
        if sparsifier is None and isinstance(entry, dict) and "sparsifier" in entry:
            sparsifier = entry["sparsifier"]
    return _from_state_dict(state_dict, sparsifier, path)


def _from_state_dict(state_dict: dict[str, torch.Tensor], sparsifier: dict[str, Any] | None, path: Path) -> Weights:
    """Effective weights under plain names from a (possibly attached) model's state dict and sparsifier state."""
    tensors, raw = {}, []
    for key, value in state_dict.items():
        if key.endswith(_RAW):
            name = key[: -len(_RAW)] + ".weight"
            tensors[name] = value
            raw.append(name)
        elif _PAR not in key:  # a parametrization's own buffers (method state) are not weights
            tensors[key] = value
    layers = (sparsifier or {}).get("layers", {})
    unmasked = [name for name in raw if name not in layers]
    if unmasked:
        raise CheckpointError(f"{path} holds the raw weight of bame layer {unmasked[0]} but no sparsifier state "
                              f"to mask it: {_NEEDS}")
    if sparsifier is None:
        return Weights(tensors, None, None, {})
    masks = {}
    for name, entry in layers.items():
        if name not in tensors:
            raise CheckpointError(f"{path}: the sparsifier state's layer {name} is not in the model's weights")
        masks[name] = entry["mask"].bool()
        tensors[name] = tensors[name] * masks[name]  # the raw W becomes the effective W * B
    n, m = parse_nm(sparsifier["nm"])
    meta = {"method": str(sparsifier["method"]), "nm": format_nm(n, m), "group_axis": sparsifier["group_axis"]}
    return Weights(tensors, masks, Pattern(n, m, sparsifier["group_axis"], tuple(masks)), meta)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path} is corrupt: {str(err).splitlines()[0]}") from None


def _load_torch(path: Path) -> Any:
    """``torch.load(weights_only=True)`` of any checkpoint: a file that would run code is refused, in one line."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a checkpoint written by torch.save (not a zip archive): {_NEEDS}")
    return checkpoint.load(path, bame_format=False)
