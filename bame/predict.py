"""Predict a run's training FLOPs without data or training (``bame flops``).

Builds the model and the sparsifier exactly as a training run does (:func:`bame.engine.create_model`,
:func:`bame.engine.attach`) and counts every iteration of the schedule through the same
:class:`~bame.flops.Ledger` (:func:`replay`), so the prediction equals the ``summary.json`` of the run.
"""

from __future__ import annotations

from typing import Any

import torch

from bame import data, engine
from bame.config import TrainConfig
from bame.errors import ConfigError
from bame.flops import Ledger, inference_flops_ratio, measure
from bame.sparsifier import Sparsifier


def changing(sparsifier: Sparsifier, total: int) -> list[bool]:
    """Per iteration t, whether its mask may differ from iteration t-1's while it is not yet final."""
    method = sparsifier.method
    out = [False] * total
    for t in range(1, total):
        out[t] = not method.mask_is_final(t - 1) and method.mask_may_change(t - 1)
    return out


def replay(sparsifier: Sparsifier, ledger: Ledger, total: int) -> Ledger:
    """Count iterations ``0 .. total-1`` exactly as a training run's step callback does.

    ``ledger.add(sparsifier.charges(t), method.phase_of(t))`` for every t, with shortcuts that do not
    change a single bit of the sums (``tests/test_flops.py`` checks this for every method):

    * charges are re-read only where they can change: where the phase changes, or where the mask may
      change while it is not yet final (derived from the method's plan); elsewhere the previous
      iteration's :meth:`Ledger.increment` is counted again;
    * for a method whose charges follow its masks (the class fact ``charges_follow_masks``: LBC charges the
      density it measures), the sparsifier's :meth:`~Sparsifier.prepare` of t runs on the (throwaway)
      model before each of those iterations, so it is charged what it would measure; every other method
      charges by its plan, and replaying its mask choices would only cost time.

    The sparsifier must be freshly attached (its iteration 0 prepared).
    """
    method = sparsifier.method
    flags = changing(sparsifier, total)
    follow = method.charges_follow_masks
    inc, phase = None, None
    for t in range(total):
        if follow and flags[t]:
            sparsifier.prepare(t)
        current = method.phase_of(t)
        if inc is None or flags[t] or current != phase:
            inc = ledger.increment(sparsifier.charges(t))
        phase = current
        ledger.count(inc, phase)
    return ledger


def steps_per_epoch(dataset: str, batch_size: int) -> int:
    """Iterations per epoch without loading data: ``floor(train_size / batch)`` (drop the last batch)."""
    spec = data.get_spec(dataset)
    if spec.train_size is None:
        raise ConfigError(f"the size of {dataset}'s training set depends on its files: "
                          "give --steps-per-epoch")
    if batch_size > spec.train_size:
        raise ConfigError(f"batch size {batch_size} is larger than the {dataset} training set "
                          f"({spec.train_size})")
    return spec.train_size // batch_size


def predict(cfg: TrainConfig, steps_per_epoch_override: int | None = None) -> dict[str, Any]:
    """The FLOPs summary a training run of ``cfg`` will write, computed without data or training.

    Returns:
        :meth:`Ledger.summary` plus ``test_flops_ratio`` (from the forward densities charged on the last
        iteration), ``steps``, ``nominal_steps``, ``steps_per_epoch`` and the method and model names.
    """
    spec = data.get_spec(cfg.dataset)
    spe = steps_per_epoch_override or steps_per_epoch(cfg.dataset, cfg.batch_size)
    model = engine.create_model(cfg)
    total, nominal = engine.run_lengths(cfg, spe)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)  # only to attach to; never steps
    sparsifier = engine.attach(cfg, model, optimizer, total, spe, verbose=False)
    cost = measure(model, (spec.in_channels, spec.image_size, spec.image_size))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a replayed selection works on one layer's small tensors at a time
    try:
        ledger = replay(sparsifier, Ledger(cost, batch_size=cfg.batch_size, nominal_steps=nominal), total)
    finally:
        torch.set_num_threads(threads)
    last = sparsifier.charges(total - 1)
    densities = {layer.name: last[layer.name].fwd for layer in sparsifier.layers}
    return {"dataset": cfg.dataset, "model": cfg.model or spec.default_model, "method": cfg.method,
            "uses_masks": sparsifier.method.uses_masks, "nm": cfg.nm, "epochs": cfg.epochs,
            "batch_size": cfg.batch_size, "steps_per_epoch": spe, "steps": total, "nominal_steps": nominal,
            **ledger.summary(), "test_flops_ratio": inference_flops_ratio(cost, densities),
            "sparse_layers": len(sparsifier.layers), "dense_layers": len(sparsifier.dense_layers)}
