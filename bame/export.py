"""Export a trained run's weights: plain N:M weights for any PyTorch user, or a compressed N:M form.

* ``dense``: a safetensors file with the model's ``state_dict()`` (masks applied, no masks, no bame
  names), loadable by ``model.load_state_dict(safetensors.torch.load_file(path))``.
* ``compressed``: every sparse weight as its kept values ``NAME.values`` ``(K, N)`` and their in-block
  positions ``NAME.indices`` ``(K, N)`` (uint8), in the ``[K, M]`` block view of the run's grouping
  axis; every other tensor as is. That is N/M of the weight bytes plus one byte per kept value.
  :func:`load_compressed` rebuilds the model, whose outputs equal the trained model's exactly.

The file's metadata records how to rebuild the model (name, classes, input shape, width) and the N:M.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from bame import checkpoint, data, models
from bame.errors import CheckpointError
from bame.nm import from_blocks, parse_nm, to_blocks

FORMATS = ("dense", "compressed")


def _run_weights(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The run's final tensors and the metadata needed to rebuild its model."""
    from safetensors.torch import load_file

    weights, cfg_path = run_dir / checkpoint.WEIGHTS, run_dir / "config.yaml"
    if not weights.is_file() or not cfg_path.is_file():
        raise CheckpointError(f"{run_dir} is not a finished run (needs {checkpoint.WEIGHTS} and config.yaml)")
    try:
        tensors = load_file(weights)
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{weights} is corrupt: {str(err).splitlines()[0]}") from None
    cfg = yaml.safe_load(cfg_path.read_text())
    spec = data.get_spec(cfg["dataset"])
    meta = {"model": cfg.get("model") or spec.default_model, "num_classes": str(spec.num_classes),
            "in_channels": str(spec.in_channels), "image_size": str(spec.image_size),
            "width": str(cfg.get("width", 1.0)), "nm": cfg["nm"], "group_axis": cfg.get("group_axis", "cin"),
            "method": cfg["method"]}
    return tensors, meta


def compress(tensors: dict[str, torch.Tensor], n: int, m: int, group_axis: str) -> dict[str, torch.Tensor]:
    """Replace each masked weight by ``NAME.values`` and ``NAME.indices``; drop the masks."""
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


def export(run_dir: str | Path, fmt: str, out: str | Path | None = None) -> dict[str, Any]:
    """Write a run's weights as ``dense`` or ``compressed`` safetensors; returns sizes for the report."""
    from safetensors.torch import save

    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown export format {fmt!r}: choose dense or compressed")
    tensors, meta = _run_weights(run_dir)
    out = Path(out) if out else run_dir / f"model.{fmt}.safetensors"
    dense = {k: v for k, v in tensors.items() if not k.endswith(".mask")}
    if fmt == "dense":
        payload = dense
    else:
        n, m = parse_nm(meta["nm"])
        payload = compress(tensors, n, m, meta["group_axis"])
        shapes = {k[: -len(".values")]: list(tensors[k[: -len(".values")]].shape)
                  for k in payload if k.endswith(".values")}
        meta = {**meta, "shapes": json.dumps(shapes)}
    blob = save(payload, metadata={**meta, "format": f"bame-{fmt}"})
    checkpoint.atomic_write(out, lambda f: f.write(blob))
    dense_bytes = sum(v.numel() * v.element_size() for v in dense.values())
    size = out.stat().st_size
    return {"path": str(out), "format": fmt, "bytes": size, "dense_tensor_bytes": dense_bytes,
            "ratio": size / dense_bytes}


def load_compressed(path: str | Path) -> nn.Module:
    """Rebuild the model of a ``compressed`` (or ``dense``) export with its trained weights."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") not in ("bame-compressed", "bame-dense"):
        raise CheckpointError(f"{path} is not a bame export")
    tensors = load_file(path)
    if meta["format"] == "bame-compressed":
        _, m = parse_nm(meta["nm"])
        tensors = decompress(tensors, json.loads(meta["shapes"]), m, meta["group_axis"])
    model = models.create(meta["model"], num_classes=int(meta["num_classes"]),
                          in_channels=int(meta["in_channels"]), image_size=int(meta["image_size"]),
                          width=float(meta["width"]))
    model.load_state_dict(tensors)
    return model.eval()
