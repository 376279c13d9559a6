"""What both framework callbacks need: building the sparsifier and finding the optimizer it hooks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import bame
from bame import masking
from bame.errors import ConfigError
from bame.sparsifier import Sparsifier


def attach(model: nn.Module, method: str, nm: str | tuple[int, int], total_steps: int,
           steps_per_epoch: int | None, options: dict[str, Any], framework: str) -> Sparsifier:
    """``bame.sparsify(model, None, ...)``: masks attached now, the optimizer bound once it exists.

    Raises:
        ConfigError: for a method that restarts the optimizer mid-run (ASP's fine-tuning), which a
            framework's own loop cannot do; the model is left as it was.
    """
    sparsifier = bame.sparsify(model, None, method, nm, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                               **options)
    restarts = sparsifier.method.restart_steps()
    if restarts:
        for layer in sparsifier.layers:
            masking.detach(layer.module, bake=False)
        raise ConfigError(f"method {method!r} restarts the optimizer at step {restarts[0]}, which {framework}'s "
                          "loop cannot do: train it with `bame train` or in your own loop")
    return sparsifier


def innermost_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a framework's wrapper (accelerate's ``AcceleratedOptimizer`` keeps it in
    ``.optimizer``): its ``step`` is the one that runs exactly when the weights really change."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"cannot find a torch.optim.Optimizer in {type(optimizer).__name__}")
    return optimizer


def optimizer_of(sparsifier: Sparsifier, optimizers: list[Any]) -> torch.optim.Optimizer:
    """The one optimizer (innermost) that updates the sparse layers' raw weights.

    Raises:
        ConfigError: when none does, or the sparse weights are split over several optimizers.
    """
    wanted = {id(layer.weight) for layer in sparsifier.layers}
    holders = []
    for optimizer in optimizers:
        inner = innermost_optimizer(optimizer)
        held = {id(p) for group in inner.param_groups for p in group["params"]}
        if held & wanted:
            holders.append(inner)
    if len(holders) != 1:
        raise ConfigError(f"the sparse layers' weights must be updated by exactly one optimizer, "
                          f"found {len(holders)} that update them")
    return holders[0]
