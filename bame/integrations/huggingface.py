"""Hugging Face transformers: N:M sparse training with one callback (``pip install 'bame[hf]'``).

    trainer = Trainer(model, args, train_dataset=..., callbacks=[BameCallback(method="bame", nm="2:4")])

Where it hooks into ``Trainer.train`` (transformers 4.4x-5.x):

* ``on_init_end``: the model exists; the callback registers a ``load_state_dict`` pre-hook on it (below).
* ``on_train_begin`` is the first event with the optimizer and ``state.max_steps``: the masks are attached
  with T = ``state.max_steps`` and the sparsifier binds the torch optimizer inside accelerate's wrapper.
* ``on_save`` runs after the trainer wrote ``checkpoint-N/``: the sparsifier state goes beside it as
  ``bame_sparsifier.pt`` (tensors and plain values; loaded with ``torch.load(weights_only=True)``).
* ``on_train_end``: with ``load_best_model_at_end`` the trainer has just loaded the best checkpoint's
  weights; the callback loads that checkpoint's masks.

Resuming: ``train(resume_from_checkpoint=...)`` loads the checkpoint's weights *before* any event, into
a model the callback has not attached yet, while the checkpoint holds the attached model's names
(``X.parametrizations.weight.original`` for a sparse layer's raw weight). The pre-hook maps them to
``X.weight`` and keeps the raw weights aside; ``on_train_begin`` attaches the masks, puts the raw weights
back (attaching may choose masks and prune), then loads ``checkpoint-N/bame_sparsifier.pt``, N being
the resumed global step. That is the order of bame's own resume: attach, weights, sparsifier state. The
weights kept aside also prove that the load went through the hook: a callback added after the Trainer
was built never saw it, and resuming is then refused rather than silently training from initial weights.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from bame import checkpoint
from bame.errors import CheckpointError
from bame.export import TRAINER_STATE
from bame.integrations._common import attach, optimizer_of
from bame.sparsifier import Sparsifier

#: The sparsifier state's file in each ``checkpoint-N`` folder (``bame export`` reads it there too).
STATE_FILE = TRAINER_STATE
STATE_FORMAT = "bame-sparsifier-1"
_RAW = ".parametrizations.weight.original"
_PAR = ".parametrizations.weight."


class BameCallback(TrainerCallback):
    """Makes a transformers ``Trainer``'s training N:M sparse.

    Pass it when the ``Trainer`` is built (``callbacks=[...]``): it must see the model before a checkpoint
    is loaded into it.

    Args:
        method: a registered method name (``bame.methods.available()``).
        nm: the N:M pattern, e.g. ``"2:4"``.
        total_steps: the run's optimizer steps T; default ``state.max_steps``.
        **options: everything else :func:`bame.sparsify` takes (``group_axis``, ``include``, ``exclude``,
            ``seed`` ...) and the method's own options (``delta_t``, ``t_i`` ...).

    Attributes:
        sparsifier: the :class:`~bame.sparsifier.Sparsifier`, once training has begun (None before).
    """

    def __init__(self, method: str = "bame", nm: str | tuple[int, int] = "2:4", total_steps: int | None = None,
                 **options: Any) -> None:
        self.method, self.nm, self.total_steps, self.options = method, nm, total_steps, options
        self.sparsifier: Sparsifier | None = None
        self._run_steps: int | None = None  # T of the run the sparsifier was built for
        self._raw: dict[str, torch.Tensor] = {}  # sparse layers' raw weights from a resumed checkpoint
        self._hooked = False

    # -- transformers events ---------------------------------------------------------------------------
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is not None and not self._hooked:
            if hasattr(model, "register_load_state_dict_pre_hook"):
                model.register_load_state_dict_pre_hook(self._take_raw_weights)
            else:  # torch < 2.5 has the same hook under its older, private name
                model._register_load_state_dict_pre_hook(self._take_raw_weights, with_module=True)
            self._hooked = True

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, optimizer: Any = None, train_dataloader: Any = None,
                       **kwargs: Any) -> None:
        fresh = self.sparsifier is None or self.sparsifier.model is not model
        if fresh:
            self._run_steps = self.total_steps if self.total_steps is not None else state.max_steps
            self.sparsifier = attach(model, self.method, self.nm, self._run_steps,
                                     _steps_per_epoch(args, train_dataloader), self.options, "transformers' Trainer")
        self.sparsifier.bind(optimizer_of(self.sparsifier, [optimizer]))
        if state.global_step > 0:
            # A model attached before the load (a second train() of this Trainer) got its raw weights directly.
            self._resume(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", restore_raw=fresh)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.sparsifier is None or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():
            raise CheckpointError(f"the trainer saved no {folder} to put {STATE_FILE} in")
        saved = {"format": STATE_FORMAT, "total_steps": self._run_steps, "sparsifier": self.sparsifier.state_dict()}
        checkpoint.save(saved, folder / STATE_FILE)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        # load_best_model_at_end has just put the best checkpoint's raw weights in: its masks go with them.
        if self.sparsifier is not None and args.load_best_model_at_end and state.best_model_checkpoint:
            self.sparsifier.load_state_dict(self._read_state(Path(state.best_model_checkpoint))["sparsifier"])

    # -- resuming ----------------------------------------------------------------------------------------
    def _take_raw_weights(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """``load_state_dict`` pre-hook: an attached model's checkpoint into a model not attached yet."""
        if any(_PAR in name for name, _ in module.named_parameters()):
            return  # attached already: the names match
        for key in [k for k in state_dict if _PAR in k]:
            value = state_dict.pop(key)
            if key.endswith(_RAW):
                name = key[len(prefix): -len(_RAW)] + ".weight"
                state_dict[prefix + name] = value
                self._raw[name] = value

    def _resume(self, folder: Path, restore_raw: bool) -> None:
        """Raw weights, then the sparsifier state of a resumed checkpoint (see the module docstring)."""
        state = self._read_state(folder)
        if restore_raw:
            self._restore_raw_weights()
        self.sparsifier.load_state_dict(state["sparsifier"])

    def _read_state(self, folder: Path) -> dict[str, Any]:
        """``folder/bame_sparsifier.pt``, checked to be of this run (safe load: tensors and plain values)."""
        path = folder / STATE_FILE
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: resume from a checkpoint that a Trainer with BameCallback "
                                  "wrote into this output_dir")
        state = checkpoint.load(path)
        if state.get("format") != STATE_FORMAT or "sparsifier" not in state:
            raise CheckpointError(f"{path} is not a BameCallback state file")
        if state["total_steps"] != self._run_steps:
            raise CheckpointError(f"the checkpoint's run has T={state['total_steps']} optimizer steps, this one "
                                  f"{self._run_steps}: the method's schedule would change")
        return state

    @torch.no_grad()
    def _restore_raw_weights(self) -> None:
        for layer in self.sparsifier.layers:
            if layer.name not in self._raw:
                raise CheckpointError(f"the resumed weights hold no raw weight for {layer.name}: pass BameCallback "
                                      "to the Trainer when you build it")
            layer.weight.copy_(self._raw[layer.name])
        self._raw = {}


def _steps_per_epoch(args: TrainingArguments, loader: Any) -> int | None:
    """Optimizer steps per epoch, as the Trainer counts them (None for a loader without a length)."""
    try:
        batches = len(loader)
    except TypeError:
        return None
    return max(math.ceil(batches / args.gradient_accumulation_steps), 1)
