"""Lightning: N:M sparse training with one callback (``pip install 'bame[lightning]'``).

    trainer = L.Trainer(max_epochs=10, callbacks=[BameCallback(method="bame", nm="2:4")])

Where it hooks into ``Trainer.fit`` (Lightning 2.x, ``Trainer._run``):

* ``setup("fit")`` runs before the strategy moves the model, wraps it (DDP) and calls
  ``configure_optimizers``: the masks are attached to the plain LightningModule there, with
  T = ``trainer.estimated_stepping_batches``. DDP then wraps a module whose raw weights are the
  parameters it all-reduces and the optimizer updates.
* ``fit(ckpt_path=...)`` restores the model and the callbacks after ``setup`` and before the optimizer
  exists: :meth:`BameCallback.load_state_dict` gets back the sparsifier state that
  :meth:`BameCallback.state_dict` put in every checkpoint (tensors and plain values only, so
  ``fit(..., weights_only=True)`` works).
* ``on_fit_start`` is the first hook with ``trainer.optimizers``: the sparsifier binds to the one that
  updates the sparse weights (``Sparsifier.bind``).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import nn

from bame.errors import CheckpointError, ConfigError
from bame.integrations._common import attach, optimizer_of
from bame.sparsifier import Sparsifier


class BameCallback(pl.Callback):
    """Makes a LightningModule's training N:M sparse.

    Args:
        method: a registered method name (``bame.methods.available()``).
        nm: the N:M pattern, e.g. ``"2:4"``.
        total_steps: the run's optimizer steps T; default ``trainer.estimated_stepping_batches``.
        **options: everything else :func:`bame.sparsify` takes (``group_axis``, ``include``, ``exclude``,
            ``seed`` ...) and the method's own options (``delta_t``, ``t_i`` ...).

    Attributes:
        sparsifier: the :class:`~bame.sparsifier.Sparsifier`, once ``fit`` has set up (None before).
    """

    def __init__(self, method: str = "bame", nm: str | tuple[int, int] = "2:4", total_steps: int | None = None,
                 **options: Any) -> None:
        self.method, self.nm, self.total_steps, self.options = method, nm, total_steps, options
        self.sparsifier: Sparsifier | None = None
        self._run_steps: int | None = None  # T of the run the sparsifier was built for

    # -- Lightning hooks --------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or (self.sparsifier is not None and self.sparsifier.model is pl_module):
            return
        total, per_epoch = self._steps(trainer)
        # Masks may be chosen from the weights at attach time: every rank must start from rank 0's, as DDP
        # would only make them equal later, at wrapping.
        _broadcast_from_rank0(pl_module)
        self.sparsifier = attach(pl_module, self.method, self.nm, total, per_epoch, self.options, "Lightning")
        self._run_steps = total

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.sparsifier is None:
            return
        # Lightning steps with a closure: the sparsifier's step pre-hook runs it first (the gradient exists
        # only then) and refuses LBFGS, which evaluates its closure many times per step.
        self.sparsifier.bind(optimizer_of(self.sparsifier, trainer.optimizers))

    def state_dict(self) -> dict[str, Any]:
        if self.sparsifier is None:
            return {}
        return {"total_steps": self._run_steps, "sparsifier": self.sparsifier.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict or self.sparsifier is None:
            return  # not fitting (validate/test/predict with ckpt_path): nothing was attached to restore into
        if state_dict["total_steps"] != self._run_steps:
            raise CheckpointError(f"the checkpoint's run has T={state_dict['total_steps']} optimizer steps, this "
                                  f"one {self._run_steps}: the method's schedule would change")
        self.sparsifier.load_state_dict(state_dict["sparsifier"])

    # -- helpers --------------------------------------------------------------------------------------------
    def _steps(self, trainer: pl.Trainer) -> tuple[int, int | None]:
        """T (total optimizer steps) and the optimizer steps per epoch, where finite."""
        estimated = trainer.estimated_stepping_batches  # loads the train dataloader, so its length is known
        total = self.total_steps if self.total_steps is not None else estimated
        if not math.isfinite(total):
            raise ConfigError("BameCallback needs a finite run: set max_steps or max_epochs, or pass total_steps")
        batches = trainer.num_training_batches
        per_epoch = math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else None
        return int(total), per_epoch


@torch.no_grad()
def _broadcast_from_rank0(module: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (a no-op outside a multi-process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    for tensor in [*module.parameters(), *module.buffers()]:
        staged = tensor.detach() if device is None else tensor.detach().to(device)
        dist.broadcast(staged, src=0)
        if device is not None:
            tensor.copy_(staged)
