"""torch.compile on sparsified models (issue: bame at full speed on the stack users train with).

A small CNN and a small ViT, compiled after (or before) ``bame.sparsify``, train exactly as in eager mode
for ``bame`` (gradual phase, the switch at t_i, mask updates), ``sr_ste`` (new masks every iteration) and
compressed storage, with no recompilation when masks change: one graph, plus one recompilation where the
layers switch to compressed storage (the modules change once).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bame
from bame import models

STEPS = 9
OPTIONS = {"bame": {"t_i": 3, "delta_t": 2}, "sr_ste": {}}


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def vit() -> nn.Module:
    torch.manual_seed(0)
    return models.create("vit_tiny", num_classes=10, image_size=8, patch_size=4, depth=1)


def train(model: nn.Module, method: str, storage: str, compile_as: str | None) -> tuple[list[float], int]:
    """Losses of STEPS steps, and the number of dynamo frames compiled (graphs + recompilations)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    target = model
    if compile_as == "before":
        target = torch.compile(model, backend="aot_eager")
    sp = bame.sparsify(target, opt, method, "1:16", total_steps=STEPS * 2, verbose=False, storage=storage,
                       **OPTIONS[method])
    if compile_as == "after":
        target = torch.compile(model, backend="aot_eager")
    elif compile_as == "method":
        model.compile(backend="aot_eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    losses = []
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
        loss = F.cross_entropy(target(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(not name.startswith("_orig_mod") for name in sp.masks())
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return losses, frames


@pytest.mark.parametrize("make", [cnn, vit], ids=["cnn", "vit"])
@pytest.mark.parametrize("method, storage", [("bame", "dense"), ("sr_ste", "dense"), ("bame", "compressed")])
def test_compiled_training_equals_eager_without_recompiling(make, method, storage):
    base = make()
    eager, _ = train(copy.deepcopy(base), method, storage, None)
    compiled, frames = train(copy.deepcopy(base), method, storage, "after")
    assert compiled == pytest.approx(eager, abs=1e-5)
    # dense storage: one graph through every phase and mask change; compressed: the layers switch at t_i,
    # and each compressed module runs eagerly (one graph before each and after the last, compiled once).
    assert frames <= (1 if storage == "dense" else 2 * (1 + sum(1 for _ in base.modules())))
    if storage == "dense":
        assert frames == 1


@pytest.mark.parametrize("compile_as", ["before", "method"])
def test_compiling_before_sparsify_or_in_place_keeps_names(compile_as):
    eager, _ = train(cnn(), "bame", "dense", None)
    compiled, frames = train(cnn(), "bame", "dense", compile_as)
    assert compiled == pytest.approx(eager, abs=1e-5) and frames <= 2


def test_inductor_compiles_a_sparsified_cnn():
    model = cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sp = bame.sparsify(model, opt, "bame", "1:16", total_steps=8, t_i=0, delta_t=2, verbose=False)
    compiled = torch.compile(model)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    for _ in range(3):
        loss = F.cross_entropy(compiled(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss) and sp.step_count == 3
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5)


def test_attached_inference_computes_the_masked_weight_once():
    model = cnn()
    sp = bame.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "sr_ste", "1:16", verbose=False)
    layer = sp.layers[0]
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        first = model(x)
        weight = layer.module.weight
        assert layer.module.weight is weight  # cached: the same tensor while W and B stay
        assert torch.equal(model(x), first)
        layer.weight.add_(1.0)  # a change of W (as an optimizer step) invalidates it
        assert layer.module.weight is not weight
        attached = model(x)
        sp.squash()
        assert torch.equal(model(x), attached)  # the same numbers as the plain, squashed model
