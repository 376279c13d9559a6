"""Invariants of every registered method over random layers, N:M patterns, grouping axes and seeds.

For each method in ``bame.methods.available()`` (parametrized at collection, so a new method is covered
by registering it), hypothesis draws a Linear or Conv2d layer whose grouping axis divides by M, an N:M
pattern, an axis and a seed, trains a few steps and checks after every optimizer step t:

* where ``method.mask_is_final(t)``: every block of the mask holds exactly N ones, and every block of the
  effective weight (what the forward uses) at most N non-zeros;
* where ``not method.mask_may_change(t)``: the masks are the ones from before the step;
* the sparsifier's state survives ``torch.save`` / ``torch.load(weights_only=True)``, and a run resumed
  from it half-way ends bit-identical to the uninterrupted one.

Combinations a method refuses (LBC with a huge C(M, N) ...) raise ConfigError at construction: those
examples check that the refusal is a ConfigError and nothing else.
"""

from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import bame
from bame import methods
from bame.errors import ConfigError

STEPS = 12
STEPS_PER_EPOCH = 3  # for the methods whose schedules move once per epoch (LBC, MaxQ)
#: Short intervals, so that a 12-step run goes through every phase of every schedule.
SHORT = {"delta_t": 2, "perm_interval": 3}


@dataclasses.dataclass(frozen=True)
class Setup:
    kind: str  # "linear" or "conv"
    cin: int
    cout: int
    kernel: int
    n: int
    m: int
    axis: str
    optimizer: str
    seed: int


@st.composite
def setups(draw) -> Setup:
    m = draw(st.sampled_from([2, 4, 8, 16]))
    n = draw(st.integers(1, m - 1))
    kind = draw(st.sampled_from(["linear", "conv"]))
    axis = draw(st.sampled_from(["cin", "kflat"]))
    kernel = draw(st.sampled_from([1, 3])) if kind == "conv" else 1
    unit = m if axis == "cin" else m // math.gcd(m, kernel * kernel)  # the grouping axis divides by M
    return Setup(kind, unit * draw(st.integers(1, 2)), draw(st.integers(1, 6)), kernel, n, m, axis,
                 draw(st.sampled_from(["sgd", "adamw"])), draw(st.integers(0, 2**16)))


def _build(method: str, s: Setup, init_seed: int | None = None):
    """(model, optimizer, sparsifier, batches) for a setup; the sparse layer is ``0``, the head dense."""
    torch.manual_seed(s.seed if init_seed is None else init_seed)
    if s.kind == "linear":
        model = nn.Sequential(nn.Linear(s.cin, s.cout), nn.ReLU(), nn.Linear(s.cout, 3))
        shape = (6, s.cin)
    else:
        model = nn.Sequential(nn.Conv2d(s.cin, s.cout, s.kernel, padding=s.kernel // 2), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(s.cout, 3))
        shape = (6, s.cin, 4, 4)
    if s.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    fields = {f.name for f in dataclasses.fields(methods.get(method).Options)}
    options = {k: v for k, v in SHORT.items() if k in fields}
    sparsifier = bame.sparsify(model, optimizer, method, (s.n, s.m), total_steps=STEPS, group_axis=s.axis,
                               seed=s.seed, steps_per_epoch=STEPS_PER_EPOCH, verbose=False, **options)
    g = torch.Generator().manual_seed(s.seed + 1)
    batches = [(torch.randn(shape, generator=g), torch.randint(0, 3, (shape[0],), generator=g))
               for _ in range(STEPS)]
    return model, optimizer, sparsifier, batches


def _step(model, optimizer, batch) -> None:
    x, y = batch
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def _round_trip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.filterwarnings("ignore:LBC at .* floats per weight")  # its memory note for large C(M, N)
@pytest.mark.parametrize("method", list(methods.available()))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(s=setups())
def test_invariants_of_every_method(method, s):
    try:
        model, optimizer, sparsifier, batches = _build(method, s)
    except ConfigError:  # a combination the method refuses, with a user-facing error: nothing to train
        return
    rule = sparsifier.method
    assert [layer.name for layer in sparsifier.layers] == (["0.weight"] if rule.uses_masks else [])
    half = None
    for t, batch in enumerate(batches):
        before = {name: mask.clone() for name, mask in sparsifier.masks().items()}
        _step(model, optimizer, batch)
        assert sparsifier.step_count == t + 1
        for layer in sparsifier.layers:
            if not rule.mask_may_change(t):
                assert torch.equal(layer.mask, before[layer.name]), f"mask changed on step {t}"
            if rule.mask_is_final(t):
                assert (layer.blocks(layer.mask).sum(-1) == s.n).all(), f"not exactly N kept after step {t}"
                effective = layer.blocks(layer.module.weight.detach() != 0).sum(-1)  # (K,)
                assert (effective <= s.n).all(), f"more than N non-zeros in a block after step {t}"
        if t + 1 == STEPS // 2:
            half = _round_trip({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "sparsifier": sparsifier.state_dict()})
            assert_same(half["sparsifier"], sparsifier.state_dict(), "sparsifier state after save/load")

    # resume from the half-way state in a freshly built run (other initial weights, the same config): it
    # must end exactly where this one did
    model_b, optimizer_b, sparsifier_b, _ = _build(method, s, init_seed=s.seed + 7)
    model_b.load_state_dict(half["model"])
    optimizer_b.load_state_dict(half["optimizer"])
    sparsifier_b.load_state_dict(half["sparsifier"])
    assert sparsifier_b.step_count == STEPS // 2
    for batch in batches[STEPS // 2:]:
        _step(model_b, optimizer_b, batch)
    assert_same(model_b.state_dict(), model.state_dict(), "model after resume")
    assert_same(sparsifier_b.state_dict(), sparsifier.state_dict(), "sparsifier after resume")
