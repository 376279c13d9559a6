"""Checkpoints: atomic writes, safe loads, and the exported weights.

* A checkpoint is written to a temporary file in the same directory, flushed to disk, then renamed over
  the old one (``os.replace`` is atomic), so a crash at any point leaves the last good checkpoint. Every
  file gets the mode ``open()`` gives: 0666 less the user's umask.
* Loading never executes code: ``torch.load(..., weights_only=True)``. A checkpoint holds only tensors
  and plain Python values.
* ``model.safetensors`` holds the final effective weights under their ``state_dict()`` names, and each
  mask as a bool tensor ``NAME.mask`` beside its weight ``NAME``.
"""

from __future__ import annotations

import os
import pickle
import re
import secrets
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bame.errors import CheckpointError

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.safetensors"


def _temp_file(path: Path) -> tuple[int, Path]:
    """A new temp file ``.NAME.XXXXXXXX.tmp`` beside ``path``, opened for writing.

    Created with mode 0666 less the user's umask, as ``open()`` creates files (``mkstemp``'s 0600 would make
    the checkpoint private while ``config.yaml`` beside it is not: every file bame writes gets one mode).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def atomic_write(path: str | Path, write: Any) -> None:
    """Write a file atomically: ``write(file_object)`` fills a temp file that then replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(state: dict[str, Any], path: str | Path) -> None:
    """Save a checkpoint atomically."""
    atomic_write(path, lambda f: torch.save(state, f))


def load(path: str | Path, map_location: str | torch.device = "cpu", bame_format: bool = True) -> Any:
    """Load a checkpoint without executing any code from it.

    Args:
        path: the file ``torch.save`` wrote.
        map_location: where tensors go.
        bame_format: require a bame checkpoint (a dict with a ``format``); False accepts any
            ``torch.save`` file of tensors and plain values (a checkpoint written from one's own loop).

    Raises:
        CheckpointError: missing, truncated, corrupt, or holding anything but tensors and plain values.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    # torch.save always writes a zip archive; anything else would reach torch's legacy pickle reader.
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: not a zip archive as torch.save writes")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(_unpickling_message(path, str(err))) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as err:
        reason = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {reason}") from None
    if bame_format and (not isinstance(state, dict) or "format" not in state):
        raise CheckpointError(f"checkpoint {path} is not a bame checkpoint")
    return state


def _unpickling_message(path: Path, text: str) -> str:
    """One line from torch's many-line weights_only refusal: code it would run, or plain corruption."""
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. Please|\n\n|$)", text, re.S)
    reason = " ".join(match.group(1).split()) if match else "unreadable pickle"
    if "global" in reason.lower():
        return (f"checkpoint {path} refused: loading it would import and call code ({reason}); a bame "
                "checkpoint holds only tensors and plain values")
    return f"checkpoint {path} is corrupt or truncated: {reason}"


def plain_state_dict(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's weights under their original names, masks applied, plus ``NAME.mask`` for each mask.

    Parametrized weights appear as ``X.parametrizations.weight.original``; they are replaced by the
    effective weight ``X.weight`` (what the forward uses), and the parametrization's buffers dropped.
    """
    out: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    for key, value in model.state_dict().items():
        if ".parametrizations.weight." not in key:
            out[key] = value.detach()
        elif key.endswith(".parametrizations.weight.original"):
            module_name = key[: -len(".parametrizations.weight.original")]
            out[f"{module_name}.weight"] = modules[module_name].weight.detach()
    for name, mask in masks.items():
        out[f"{name}.mask"] = mask.detach().bool()
    return {k: v.contiguous().cpu().clone() for k, v in out.items()}


def save_weights(model: nn.Module, masks: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """Write ``model.safetensors`` atomically."""
    from safetensors.torch import save

    tensors = plain_state_dict(model, masks)
    atomic_write(path, lambda f: f.write(save(tensors, metadata=metadata)))
