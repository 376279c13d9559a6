"""Several processes with PyTorch's own engine: torchrun's environment, rank-0 I/O, reductions.

``torchrun --nproc_per_node=K -m bame train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK; the process group
uses gloo on the CPU and nccl on CUDA. Without those variables everything runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from bame.errors import BameError, ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is a clear error."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for, but no CUDA device is available")
        return torch.device(preference if ":" in preference else f"cuda:{local_rank}")
    return torch.device("cpu")


def init(device_preference: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun; otherwise a single-process DistInfo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, device)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a few floats over all ranks (float64, so counts stay exact)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: float, info: DistInfo) -> float:
    """The largest of one float over all ranks."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_agree(flag: bool, info: DistInfo) -> bool:
    """True only if ``flag`` is True on every rank."""
    if not info.enabled:
        return flag
    return all_reduce_sum([0.0 if flag else 1.0], info)[0] == 0.0


def raise_together(error: BameError | None, info: DistInfo) -> None:
    """Raise, on every rank, the first error any rank met (in rank order), or return if none did.

    For checks only some ranks make (rank 0's output directory): the others would otherwise go on to the
    next collective and wait for a peer that has already exited.
    """
    if not info.enabled:
        if error is not None:
            raise error
        return
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, None if error is None else (type(error), str(error)))
    for item in gathered:
        if item is not None:
            cls, message = item
            raise cls(message)


def gather_checksums(values: list[float], info: DistInfo) -> list[list[float]]:
    """Every rank's list of checksums (for the mask consistency check)."""
    if not info.enabled:
        return [list(values)]
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    out = [torch.empty_like(t) for _ in range(info.world_size)]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]
