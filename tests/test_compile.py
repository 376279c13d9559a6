"""torch.compile on sparsified models (issue: bame at full speed on the stack users train with).

A small CNN and a small ViT, compiled after (or before) ``bame.sparsify``, train exactly as in eager mode
for ``bame`` (gradual phase, the switch at t_i, mask updates), ``sr_ste`` (new masks every iteration) and
compressed storage, with no recompilation when masks change: one graph, plus one recompilation where the
layers switch to compressed storage (the modules change once).
"""

from __future__ import annotations

import copy
import json
from typing import Any

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


def fresh_steps(net: nn.Module, opt: torch.optim.Optimizer, steps: int = STEPS) -> list[float]:
    """``steps`` steps of ``net`` on seeded random batches, dynamo's caches and counters reset first; the
    losses."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    losses = []
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def train(model: nn.Module, method: str, storage: str, compile_as: str | None) -> tuple[list[float], int, int]:
    """Losses of STEPS steps, the number of dynamo frames compiled (graphs + recompilations) and the kinds of
    phase the steps went through (:func:`phase_kinds`)."""
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
    losses = fresh_steps(target, opt)
    assert all(not name.startswith("_orig_mod") for name in sp.masks())
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return losses, frames, phase_kinds(sp)


def phase_kinds(sp) -> int:
    """How many kinds of phase the STEPS steps went through: pruned weights exactly zero (the forward uses W
    itself) or not (W * B): one graph each, whatever the masks do."""
    return len({sp.plan(t).zeroed for t in range(STEPS)})


@pytest.mark.parametrize("make", [cnn, vit], ids=["cnn", "vit"])
@pytest.mark.parametrize("method, storage", [("bame", "dense"), ("sr_ste", "dense"), ("bame", "compressed")])
def test_compiled_training_equals_eager_without_recompiling(make, method, storage):
    base = make()
    eager, _, _ = train(copy.deepcopy(base), method, storage, None)
    compiled, frames, kinds = train(copy.deepcopy(base), method, storage, "after")
    assert compiled == pytest.approx(eager, abs=1e-5)
    # dense storage: one graph per kind of phase (bame: the gradual phase's W * B, then W from t_i; sr_ste:
    # W * B throughout), none per mask change; compressed: the layers switch at t_i, and each compressed
    # module runs eagerly (one graph before each and after the last, compiled once).
    assert frames <= (kinds if storage == "dense" else 2 * (1 + sum(1 for _ in base.modules())))
    if storage == "dense":
        assert frames == kinds == (2 if method == "bame" else 1)


@pytest.mark.parametrize("compile_as", ["before", "method"])
def test_compiling_before_sparsify_or_in_place_keeps_names(compile_as):
    eager, _, _ = train(cnn(), "bame", "dense", None)
    compiled, frames, kinds = train(cnn(), "bame", "dense", compile_as)
    assert compiled == pytest.approx(eager, abs=1e-5) and frames <= 2 * kinds


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


def _graph_breaks(model: nn.Module, x: torch.Tensor) -> tuple[int, list[str]]:
    """Graph breaks of one traced forward, and the bame operators in its graphs."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    ops = [str(node.target) for graph in explained.graphs for node in graph.graph.nodes
           if str(node.target).startswith("bame.")]
    return explained.graph_break_count, ops


@pytest.mark.parametrize("make", [cnn, vit], ids=["cnn", "vit"])
def test_compressed_products_are_operators_in_the_graph(make):
    """Ordinary iterations: every compressed product is one bame:: operator node, no graph break; an
    update iteration (the dense weight gradient goes to the storage) runs the layers eagerly."""
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = bame.sparsify(model, opt, "bame", "1:16", total_steps=STEPS * 2, verbose=False, storage="compressed",
                       t_i=0, delta_t=4)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    for _ in range(2):  # the plans are chosen at the first forward
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert sp.switched and sp.step_count == 2 and not sp.plan(2).dense_wgrad
    breaks, ops = _graph_breaks(model, x)
    assert breaks == 0
    assert len(ops) == len(sp.layers)
    assert {op.removesuffix(".default") for op in ops} <= {"bame.compressed_linear", "bame.compressed_conv"}
    sp.step_count = 4  # harness: an update iteration
    sp.prepare(4)
    _, ops = _graph_breaks(model, x)
    assert ops == []  # the layers ran eagerly (outside any graph): no operator was traced


def test_compiled_compressed_training_equals_eager_with_native_products():
    """Plans with native kernels (forced), compiled with the operators, against eager: the same losses."""
    from bame import native

    if not native.available():
        pytest.skip(f"native kernels: {native.unavailable_reason()}")
    from bame.kernels.conv import ConvPlan
    from bame.kernels.plan import Plan

    def run(compiled: bool) -> list[float]:
        model = cnn()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp = bame.sparsify(model, opt, "static", "1:16", verbose=False, storage="compressed",
                           layer_filter=lambda n, m: n != "0")
        for layer in sp.layers:
            layer.compressed.plan = (Plan("native", "native", "native", reason="forced") if
                                     isinstance(layer.module, nn.Linear) else ConvPlan("native", "native", "native"))
        return fresh_steps(torch.compile(model, backend="aot_eager") if compiled else model, opt, steps=4)

    assert run(True) == pytest.approx(run(False), abs=1e-5)


def _native_plans(monkeypatch) -> None:
    """Every dense-storage sparse-kernel layer plans the native products (as the timing would on larger layers)."""
    from bame import native
    from bame.kernels import attach
    from bame.kernels.plan import Plan

    if not native.available():
        pytest.skip(f"native kernels: {native.unavailable_reason()}")
    monkeypatch.setattr(attach, "choose_plan", lambda *args, **kwargs: Plan("native", "native", "native",
                                                                             reason="forced"))


@pytest.mark.parametrize("method, options", [("static", {}), ("bame", {"t_i": 3, "delta_t": 2})])
def test_dense_storage_sparse_kernels_are_operators_in_the_graph(monkeypatch, method, options):
    """``kernel="sparse"`` in dense storage, compiled: once a layer's plan is chosen (timed eagerly after the
    first compiled step, which runs the masked products), its products are the bame::compressed_linear
    operator in the graph, with the losses of the eager kernels; BAME's gradual phase and update iterations
    run the masked products (one graph each, compiled once). Never a graph break."""
    _native_plans(monkeypatch)

    def run(compiled: bool) -> tuple[list[float], Any]:
        model = cnn()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp = bame.sparsify(model, opt, method, "1:16", total_steps=STEPS * 2, verbose=False, kernel="sparse",
                           layer_filter=lambda name, module: name != "0", **options)
        return fresh_steps(torch.compile(model, backend="aot_eager") if compiled else model, opt), (model, sp)

    eager, _ = run(False)
    compiled, (model, sp) = run(True)
    assert compiled == pytest.approx(eager, abs=1e-6)
    assert not torch._dynamo.utils.counters["graph_break"]
    # a graph per kind of phase, one more for the operators once the plans exist, one for BAME's updates
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= phase_kinds(sp) + 2
    kernels = [layer.kernel for layer in sp.layers if layer.kernel is not None]
    assert len(kernels) == 3 and all(kernel.plan is not None for kernel in kernels)  # 1x1 conv, 2 Linear
    # steady state: more steps (BAME: ordinary and update iterations) compile nothing new and never break
    counters = torch._dynamo.utils.counters
    counters.clear()
    net, opt = torch.compile(model, backend="aot_eager"), sp.optimizer
    for _ in range(4):
        loss = F.cross_entropy(net(torch.randn(4, 3, 8, 8)), torch.randint(0, 10, (4,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not counters["graph_break"] and not counters["stats"]["unique_graphs"]
    t = sp.step_count
    assert not sp.plan(t).dense_wgrad and all(kernel.traced for kernel in kernels)
    breaks, ops = _graph_breaks(model, torch.randn(4, 3, 8, 8))
    assert breaks == 0 and [op.removesuffix(".default") for op in ops] == ["bame.slot_values",
                                                                          "bame.compressed_linear"] * 3
    if method == "bame":  # an update iteration needs the dense weight gradient: the masked products
        sp.step_count = max(u for u in range(STEPS * 2) if sp.plan(u).dense_wgrad)  # harness
        sp.prepare(sp.step_count)
        assert sp.plan(sp.step_count).dense_wgrad and not any(kernel.traced for kernel in kernels)
        assert _graph_breaks(model, torch.randn(4, 3, 8, 8)) == (0, [])


def test_kernel_slots_follow_the_mask_in_place():
    """The operator's slots are the kept entries' in-block positions, refreshed in place at a mask change;
    a block keeping more than N (not N:M yet) turns the operator off."""
    model = nn.Sequential(nn.Linear(8, 2), nn.ReLU(), nn.Linear(2, 2))  # the last one: the head, dense
    sp = bame.sparsify(model, torch.optim.SGD(model.parameters(), lr=0.1), "static", "2:4", verbose=False,
                       kernel="sparse")
    (layer,) = sp.layers
    kernel = layer.kernel
    with torch.no_grad():
        layer.mask.copy_(torch.tensor([[0, 1, 1, 0, 1, 0, 0, 1], [1, 1, 0, 0, 0, 0, 1, 1]], dtype=torch.bool))
    kernel.refresh(sp.step_count)
    positions = kernel.positions
    assert kernel.traced and positions.dtype == torch.uint8
    assert [sorted(block) for block in positions.tolist()] == [[1, 2], [0, 3], [0, 1], [2, 3]]
    with torch.no_grad():
        layer.mask[0, 0] = True  # three kept in the first block
    kernel.refresh(sp.step_count)
    assert not kernel.traced
    with torch.no_grad():
        layer.mask[0, :4] = torch.tensor([True, False, False, True])
    kernel.refresh(sp.step_count)
    assert kernel.traced and kernel.positions is positions  # the same tensor, updated
    assert sorted(positions[0].tolist()) == [0, 3]


#: Options that make every method change its masks (or scales) within STEPS iterations.
EVERY = {"bame": {"t_i": 3, "delta_t": 2}, "lma": {"t_i": 3, "delta_t": 2}, "rigl_nm": {"t_i": 3, "delta_t": 2},
         "bame_bi": {"t_i": 3, "delta_t": 2}, "asp": {"prune_at": 3}, "bi_mask": {"perm_interval": 3},
         "lbc": {"t_i": 0, "t_f": 6, "granularity": "iteration"}, "maxq": {"decay_start": 0, "decay_end": 6}}


@pytest.mark.parametrize("method", list(__import__("bame").methods.available()))
def test_every_method_compiles_without_graph_breaks_or_recompiles(method):
    """Through its mask changes: one graph per kind of phase (pruned weights zero or not; MaxQ: one more, its
    soft-mask scale appears at the decay's start), no graph break."""
    model = cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = bame.sparsify(model, opt, method, "1:4", total_steps=STEPS * 2, verbose=False, steps_per_epoch=3,
                       **EVERY.get(method, {}))
    fresh_steps(torch.compile(model, backend="aot_eager"), opt)
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] <= phase_kinds(sp) + (method == "maxq") <= 3
    assert not counters["graph_break"]


@pytest.mark.parametrize("storage", ["dense", "compressed"])
def test_bame_train_compiled_trains_as_eager(tmp_path, storage):
    """``bame train --compile BACKEND``: the run's losses and accuracy match the eager run's, and the model's
    names, state dict and checkpoint are the plain model's (nothing of the compiled wrapper)."""
    from bame import config
    from bame.engine import fit

    def run(compile_as: str) -> tuple[list[dict], dict]:
        cfg = config.build({"dataset": "digits", "method": "bame", "nm": "1:4", "epochs": 1, "batch_size": 64,
                            "max_steps": 12, "storage": storage, "compile": compile_as,
                            "method_options": {"delta_t": 4, "t_i": 2}})
        out = tmp_path / compile_as
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        fit(cfg, out)
        graphs[compile_as] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return rows, torch.load(out / "checkpoint.pt", weights_only=True)

    graphs: dict[str, int] = {}

    eager, eager_state = run("none")
    compiled, state = run("aot_eager")
    assert state["config"]["compile"] == "aot_eager" and graphs["none"] == 0 and graphs["aot_eager"] >= 1
    assert [r["step"] for r in compiled] == [r["step"] for r in eager] == [12]
    for key in ("train_loss", "test_loss", "train_top1", "test_top1"):
        assert compiled[0][key] == pytest.approx(eager[0][key], rel=1e-4, abs=1e-4), key
    assert list(state["model"]) == list(eager_state["model"])
    assert not any("_orig_mod" in key for key in state["model"])
