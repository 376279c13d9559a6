"""Compressed N:M storage (issue: compressed training): values-only layers, slot-stable mask updates,
the same results as dense storage, and everything users rely on still working."""

from __future__ import annotations

import copy
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bame
from bame import native
from bame.compressed import CompressedNM, update_slots
from bame.errors import CheckpointError, ConfigError
from bame.kernels.conv import ConvGeometry, conv_dw, conv_dx, conv_forward
from bame.kernels.linear import dw_direct, dx_chunked, dx_direct, fwd_chunked, fwd_direct
from bame.kernels.packed import pack
from bame.kernels.plan import random_nm_mask
from bame.nm import from_blocks, is_nm, kept_indices, to_blocks

needs_cc = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=2, dilation=2),
                         nn.ReLU(), nn.Conv2d(32, 32, 1, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, 10))


def batch(kind: str, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + t)
    if kind == "mlp":
        return torch.randn(16, 32, generator=g), torch.randint(0, 4, (16,), generator=g)
    return torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)


def optimizer(model: nn.Module, name: str) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)


def run(kind: str, method: str, storage: str, opt_name: str, steps: int, stop: int | None = None, **kw):
    model = mlp() if kind == "mlp" else cnn()
    opt = optimizer(model, opt_name)
    options = {"delta_t": 5} if method in ("bame", "lma", "rigl_nm", "bame_bi") else {}
    sp = bame.sparsify(model, opt, method, "2:8", total_steps=steps, verbose=False, storage=storage,
                       **options, **kw)
    return model, opt, sp, train_steps(model, opt, kind, 0, steps if stop is None else stop)


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, kind: str, start: int, stop: int) -> list[float]:
    """Iterations [start, stop) on the seeded batches; the losses."""
    losses = []
    for t in range(start, stop):
        x, y = batch(kind, t)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ------------------------------------------------------------------------- the same results as dense
@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
@pytest.mark.parametrize("kind, method", [("mlp", "bame"), ("mlp", "bame_bi"), ("mlp", "rigl_nm"),
                                          ("cnn", "bame"), ("mlp", "static"), ("cnn", "asp")])
def test_compressed_training_equals_dense_storage(kind, method, opt_name):
    """300 steps: identical masks, losses and weights within float tolerance (the products sum in
    another order; dense products on the scattered weight give bit-identical numbers on the MLP)."""
    steps = 300 if kind == "mlp" else 60
    dense = run(kind, method, "dense", opt_name, steps)
    comp = run(kind, method, "compressed", opt_name, steps)
    assert comp[2].switched
    for a, b in zip(dense[2].layers, comp[2].layers, strict=True):
        assert torch.equal(a.mask, b.mask), a.name
        assert b.compressed is not None and b.weight.shape == (b.num_blocks, 2)
        assert torch.allclose(a.module.weight, b.module.weight, atol=1e-5), a.name
    assert max(abs(x - y) for x, y in zip(dense[3], comp[3], strict=True)) < 1e-4
    # the optimizer holds the values, and its state is slot-shaped
    values = {id(layer.weight) for layer in comp[2].layers}
    held = {id(p) for group in comp[1].param_groups for p in group["params"]}
    assert values <= held
    for layer in comp[2].layers:
        for state in comp[1].state[layer.weight].values():
            assert not torch.is_tensor(state) or state.dim() == 0 or state.shape == layer.weight.shape


@needs_cc
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_native_products_train_as_dense(kind, monkeypatch):
    """The native kernels forced for every product of every layer give the dense-storage results."""
    from bame import compressed
    from bame.kernels.conv import ConvPlan
    from bame.kernels.plan import Plan

    monkeypatch.setattr(compressed, "choose_plan", lambda *a, **k: Plan("chunked", "chunked", "native", reason="x"))
    monkeypatch.setattr(compressed, "choose_conv_plan", lambda *a, **k: ConvPlan("native", "native", "native", "x"))
    dense = run(kind, "bame", "dense", "sgd", 40)
    comp = run(kind, "bame", "compressed", "sgd", 40, kernel="sparse")
    notes = [row["kernel"] for row in comp[2].layer_report() if row["sparse"]]
    assert all(note.startswith("compressed; ") for note in notes)
    for a, b in zip(dense[2].layers, comp[2].layers, strict=True):
        assert torch.equal(a.mask, b.mask)
        assert torch.allclose(a.module.weight, b.module.weight, atol=1e-4)


# ------------------------------------------------------------------------------ slot-stable updates
def test_slot_stable_update_by_hand():
    # 2 blocks of 4 at 2:4: slots hold positions [0, 2] and [1, 3]
    storage = CompressedNM((1, 8), 2, 4, torch.tensor([[0, 2], [3, 1]]))
    values = nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    opt = torch.optim.SGD([values], lr=0.1, momentum=0.9)
    values.grad = torch.ones(2, 2)
    opt.step()
    new = torch.tensor([[True, True, False, False], [False, True, False, True]])  # block 0: 2 -> 1; block 1 same
    flips = update_slots(storage, values, new, opt)
    assert storage.indices.tolist() == [[0, 1], [3, 1]]  # position 1 took position 2's slot
    assert values[0].tolist() == [pytest.approx(1.0 - 0.1), 0.0] and values[1, 0].item() == pytest.approx(2.9)
    assert opt.state[values]["momentum_buffer"][0].tolist() == [1.0, 0.0]
    assert int(flips) == 2 and torch.equal(storage.block_mask(), new)


@given(st.integers(1, 3), st.sampled_from([4, 8]), st.integers(1, 20), st.integers(0, 1000))
@settings(max_examples=30, deadline=None)
def test_slot_stable_updates_keep_every_kept_value_in_its_slot(n, m, k, seed):
    g = torch.Generator().manual_seed(seed)
    n = min(n, m - 1)
    old = torch.rand(k, m, generator=g).argsort(1) < n
    new = torch.rand(k, m, generator=g).argsort(1) < n
    idx = kept_indices(old, n)[:, torch.randperm(n, generator=g)]  # any slot order
    storage = CompressedNM((1, k * m), n, m, idx)
    values = nn.Parameter(torch.randn(k, n, generator=g))
    before = {(b, int(p)): float(values[b, s]) for b in range(k) for s, p in enumerate(idx[b])}
    update_slots(storage, values.data, new, None)
    assert torch.equal(storage.block_mask(), new)
    for b in range(k):
        for s, p in enumerate(storage.indices[b].tolist()):
            expected = before.get((b, p), 0.0) if old[b, p] else 0.0
            assert values[b, s].item() == expected


# -------------------------------------------------------------------------- what users rely on
def test_module_weight_state_dict_masks_print_and_squash():
    model, opt, sp, _ = run("mlp", "bame", "compressed", "sgd", 30)
    layer = sp.layers[0]
    dense_view = layer.module.weight.detach()
    assert dense_view.shape == (64, 32) and not dense_view[~layer.mask].any()
    assert is_nm(sp.masks()["0.weight"], 2, 8)
    state = model.state_dict()
    assert state["0.parametrizations.weight.original"].shape == (64, 32)  # dense, as with dense storage
    assert torch.equal(state["0.parametrizations.weight.original"], dense_view)
    assert "density=0.2500" in repr(sp) and sp.layer_report()[0]["storage"] == "compressed"
    x, _ = batch("mlp", 0)
    before = model(x)
    sp.squash()
    assert type(model[0]) is nn.Linear and model[0].weight.shape == (64, 32)
    assert torch.allclose(model(x), before, atol=1e-6)
    assert opt.state[model[0].weight]["momentum_buffer"].shape == (64, 32)  # the optimizer still works
    opt.step()


@pytest.mark.parametrize("order", ["model first", "sparsifier first"])
def test_resume_is_bit_exact_in_either_loading_order(order):
    steps, split = 40, 23  # the switch at t_i = 13; resumed after it
    full = run("mlp", "bame", "compressed", "adamw", steps)
    model, opt, sp, head = run("mlp", "bame", "compressed", "adamw", steps, stop=split)
    assert head == full[3][:split]
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sp.state_dict()))
    assert saved[2]["switched"] and saved[2]["storage"] == "compressed"
    model2 = mlp()
    opt2 = optimizer(model2, "adamw")
    sp2 = bame.sparsify(model2, opt2, "bame", "2:8", total_steps=steps, verbose=False, storage="compressed",
                        delta_t=5)
    if order == "model first":
        model2.load_state_dict(saved[0])
        sp2.load_state_dict(saved[2])
    else:
        sp2.load_state_dict(saved[2])
        model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    for t in range(split, steps):
        x, y = batch("mlp", t)
        loss = F.cross_entropy(model2(x), y)
        opt2.zero_grad()
        loss.backward()
        opt2.step()
    for a, b in zip(full[2].layers, sp2.layers, strict=True):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.compressed.indices, b.compressed.indices)
    assert loss.item() == full[3][-1]


def test_plans_are_chosen_for_the_largest_training_input_before_the_switch(monkeypatch):
    """A FLOPs count's one-sample forward and an epoch's short last batch come before the switch: the
    plan is chosen for the full batch (16 rows), not for the first input (1 row) or the last (3)."""
    from bame import compressed

    seen = []
    real = compressed.choose_products
    monkeypatch.setattr(compressed, "choose_products", lambda *a: seen.append(a[2]) or real(*a))
    model = mlp()
    opt = optimizer(model, "sgd")
    sp = bame.sparsify(model, opt, "bame", "2:8", total_steps=12, verbose=False, storage="compressed",
                       kernel="sparse", delta_t=2)
    model(torch.randn(1, 32)).sum().backward()  # a forward on one sample
    opt.zero_grad()
    for t in range(5):
        x, y = batch("mlp", t)
        x, y = (x[:3], y[:3]) if t == 3 else (x, y)  # a short batch just before the switch (t_i = 4)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert sp.switched
    assert seen == [(16, 32), (16, 64)]


@pytest.mark.parametrize("method", ["static", "bame"])
def test_a_flops_count_neither_chooses_nor_sizes_the_plan(method, monkeypatch):
    """A FLOPs count (``FlopCounterMode``) on one sample, as ``bame train`` runs after ``sparsify``: static
    storage is compressed already, and the plan must still be chosen at the first training forward."""
    from torch.utils.flop_counter import FlopCounterMode

    from bame import compressed

    seen = []
    real = compressed.choose_products
    monkeypatch.setattr(compressed, "choose_products", lambda *a: seen.append(a[2]) or real(*a))
    model = mlp()
    opt = optimizer(model, "sgd")
    options = {"delta_t": 2} if method == "bame" else {}
    bame.sparsify(model, opt, method, "2:8", total_steps=12, verbose=False, storage="compressed", kernel="sparse",
                  **options)
    with FlopCounterMode(display=False):
        model(torch.randn(1, 32)).sum().backward()
    opt.zero_grad()
    assert seen == []
    for t in range(6):
        x, y = batch("mlp", t)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert seen == [(16, 32), (16, 64)]


def test_a_strided_convolution_is_planned_with_its_stride(monkeypatch):
    from bame import compressed

    if not native.available():
        pytest.skip(f"native kernels: {native.unavailable_reason()}")
    seen = []
    real = compressed.choose_conv_plan
    monkeypatch.setattr(compressed, "choose_conv_plan", lambda geo, *a: seen.append(geo) or real(geo, *a))
    model = cnn()
    opt = optimizer(model, "sgd")
    bame.sparsify(model, opt, "static", "2:8", total_steps=4, verbose=False, storage="compressed", kernel="sparse")
    x, y = batch("cnn", 0)
    F.cross_entropy(model(x), y).backward()
    assert [g.stride for g in seen] == [(1, 1), (1, 1), (2, 2)]  # conv 16->32, the dilated one, the 1x1 of stride 2
    assert seen[-1].ho == 4 and seen[-1].height == 8


def test_static_is_compressed_from_the_start_and_resumes():
    model, opt, sp, _ = run("mlp", "static", "compressed", "sgd", 10)
    state = copy.deepcopy((model.state_dict(), opt.state_dict(), sp.state_dict()))
    model2 = mlp()
    opt2 = optimizer(model2, "sgd")
    sp2 = bame.sparsify(model2, opt2, "static", "2:8", total_steps=10, verbose=False, storage="compressed")
    assert sp2.switched  # from iteration 0
    model2.load_state_dict(state[0])
    sp2.load_state_dict(state[2])
    opt2.load_state_dict(state[1])
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(sp.layers, sp2.layers, strict=True))


def test_accumulation_scaler_clipping_and_schedules_work():
    model = mlp()
    opt = optimizer(model, "sgd")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 20)
    sp = bame.sparsify(model, opt, "bame", "2:8", total_steps=20, t_i=0, delta_t=2, verbose=False,
                       storage="compressed")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for t in range(20):
        opt.zero_grad()
        for micro in range(2):  # gradient accumulation: two backwards, one step
            x, y = batch("mlp", 2 * t + micro)
            scaler.scale(F.cross_entropy(model(x), y) / 2).backward()
        scaler.unscale_(opt)
        total = nn.utils.clip_grad_norm_(model.parameters(), 0.5)  # the values' (kept) gradients only
        assert torch.isfinite(total)
        scaler.step(opt)
        scaler.update()
        sched.step()
    # updates at t = 0, 2, ..., 12 (t_f = 2T/3 = 13), on both sparse layers
    assert sp.step_count == 20 and sum(layer.stats["updates"] for layer in sp.layers) == 2 * 7
    assert all(is_nm(layer.mask, 2, 8) for layer in sp.layers)


def test_refusals_are_one_line_at_sparsify():
    model = mlp()
    opt = optimizer(model, "sgd")
    for method in ("sr_ste", "bi_mask", "maxq", "lbc", "dense"):
        with pytest.raises(ConfigError, match=f"method '{method}' cannot train with storage='compressed'"):
            bame.sparsify(model, opt, method, "2:8", total_steps=10, verbose=False, storage="compressed")
        assert not hasattr(model[0], "parametrizations")  # refused before any layer was touched
    grouped = nn.Sequential(nn.Conv2d(16, 32, 3, groups=2), nn.Flatten(), nn.Linear(32, 2))
    with pytest.raises(ConfigError, match="grouped convolution"):
        bame.sparsify(grouped, torch.optim.SGD(grouped[0].parameters(), lr=0.1), "static", "2:8",
                      layer_filter=lambda n, m: n == "0", verbose=False, storage="compressed")
    with pytest.raises(ConfigError, match="group_axis='cin'"):
        bame.sparsify(model, opt, "static", "2:8", group_axis="kflat", verbose=False, storage="compressed")
    with pytest.raises(ConfigError, match="storage must be"):
        bame.sparsify(model, opt, "static", "2:8", verbose=False, storage="sparse")


def test_a_state_of_the_other_storage_is_refused():
    model, opt, sp, _ = run("mlp", "bame", "compressed", "sgd", 20)
    fresh = mlp()
    other = bame.sparsify(fresh, optimizer(fresh, "sgd"), "bame", "2:8", total_steps=20, delta_t=5, verbose=False)
    with pytest.raises(CheckpointError, match="storage='compressed', this run has 'dense'"):
        other.load_state_dict(sp.state_dict())


# ------------------------------------------------------------------------------- the native kernels
def conv_case(n: int, m: int, cin: int, out: int, kernel: int, h: int, w: int, padding: int, dilation: int,
              stride: int, batch: int, seed: int) -> tuple:
    """A random N:M conv: (x, values, indices, geometry, the masked-dense output, dY, dX and the slots' dW, the
    references computed in float64)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, cin, kernel, kernel, generator=g)
    mask = from_blocks(torch.rand(weight.numel() // m, m, generator=g).argsort(1) < n, weight.shape, "cin")
    wm = weight * mask
    idx = kept_indices(to_blocks(mask, m, "cin"), n)
    vals = to_blocks(wm, m, "cin").gather(1, idx)
    x = torch.randn(batch, cin, h, w, generator=g)
    x64, ref_w = x.double().requires_grad_(), wm.double().requires_grad_()  # a reference without rounding error
    ref = F.conv2d(x64, ref_w, None, stride, padding, dilation)
    dy = torch.randn(ref.shape, generator=g)
    ref.backward(dy.double())
    geo = ConvGeometry(out, cin, kernel, kernel, h, w, (padding, padding), (dilation, dilation), (stride, stride))
    dw = to_blocks(ref_w.grad, m, "cin").gather(1, idx)
    return x, vals, idx, geo, ref.detach().float(), dy, x64.grad.float(), dw.float()


def assert_conv_kernels_match(case: tuple, m: int) -> None:
    x, vals, idx, geo, y, dy, dx, dw = case
    assert torch.allclose(conv_forward(x, vals, idx, geo, m), y, rtol=1e-4, atol=1e-4)
    assert torch.allclose(conv_dx(dy, vals, idx, geo, m), dx, rtol=1e-4, atol=1e-4)
    assert torch.allclose(conv_dw(dy, x, idx, geo, m), dw, rtol=1e-4, atol=1e-4)  # sums over the batch


@needs_cc
@given(st.sampled_from([(1, 4), (2, 4), (1, 8), (2, 8), (1, 16)]), st.integers(1, 3), st.integers(1, 3),
       st.integers(0, 2), st.integers(1, 2), st.integers(1, 3), st.sampled_from([3, 5, 8, 9, 16, 17, 32]),
       st.sampled_from([3, 7, 8, 16, 32]), st.integers(1, 20), st.integers(0, 100))
@settings(max_examples=40, deadline=None)
def test_conv_kernels_equal_the_masked_dense_reference(nm, kernel, cin_blocks, padding, dilation, stride, h, w,
                                                       batch, seed):
    """Every product against the masked-dense reference: any kernel, padding (0 to 2), dilation, stride and
    batch (chunks of several images, a last chunk with fewer); planes 8, 16, 32 wide take the row vectors,
    other widths the output grid."""
    n, m = nm
    if min(h, w) + 2 * padding - dilation * (kernel - 1) < 1:
        return
    assert_conv_kernels_match(conv_case(n, m, cin_blocks * m, 8, kernel, h, w, padding, dilation, stride, batch,
                                        seed), m)


@needs_cc
@pytest.mark.parametrize("shape", [(32, 32, 32, 32, 1), (64, 64, 16, 16, 1), (128, 128, 8, 8, 1),
                                   (64, 32, 32, 32, 2), (16, 16, 9, 13, 2)],
                         ids=["32x32", "16x16", "8x8", "stride-2", "odd"])
def test_conv_kernels_on_resnet_shapes(shape):
    """The CIFAR ResNet's layers (3x3, padding 1, 1:16) with enough images for several chunks and parts."""
    out, cin, h, w, stride = shape
    assert_conv_kernels_match(conv_case(1, 16, cin, out, 3, h, w, 1, 1, stride, 19, 0), 16)


def test_stacking_by_hand():
    """A 3x3 conv with padding 1 on 32 x 32 planes: one zero column and one zero row between planes (33 x 33
    per image, shared), taps at e_h * 33 + e_w; stride 2 reads the 16 x 16 phases with offsets -1 and 0."""
    geo = ConvGeometry(8, 16, 3, 3, 32, 32, (1, 1), (1, 1))
    stack = geo.forward_stacking
    assert (stack.sh, stack.wp, stack.padding, stack.reach) == (33, 33, (1, 1), (2, 2))
    assert [stack.shift(e, f) for e in range(3) for f in range(3)] == [0, 1, 2, 33, 34, 35, 66, 67, 68]
    assert geo.backward_stacking == stack  # "same" padding: the flipped kernel reads the same way
    s2 = ConvGeometry(8, 16, 3, 3, 32, 32, (1, 1), (1, 1), (2, 2))
    assert (s2.ho, s2.hph, s2.taps(0)) == (16, 16, ([1, 0, 1], [-1, 0, 0]))
    assert (s2.forward_stacking.sh, s2.forward_stacking.padding, s2.forward_stacking.reach) == (17, (1, 1), (1, 1))
    assert (s2.backward_stacking.sh, s2.backward_stacking.padding) == (17, (0, 0))  # reads dY rows i and i + 1


@needs_cc
@pytest.mark.parametrize("team", [True, False], ids=["openmp-team", "python-threads"])
def test_conv_kernels_are_bit_identical_for_any_thread_split(team, monkeypatch):
    """Chunks of images go to whichever thread claims them, and the weight gradient's partial sums are fixed
    per chunk of images: results never depend on the thread count."""
    if not team:
        monkeypatch.setattr(native, "_omp_parallel", lambda: None)
    for h in (16, 9):  # row vectors, output grid
        x, vals, idx, geo, y, dy, dx, dw = conv_case(1, 8, 32, 24, 3, h, h, 1, 1, 1, 37, 3)
        from bame.kernels.conv import conv_terms

        t = conv_terms(idx, geo, 8)
        fwd = geo.forward_stacking.geo(37, 32, 32, t.maxshift)
        dots = geo.forward_stacking.geo(37, 32, 56, t.maxshift, 8)
        assert dots[12] < 37  # several partial sums
        runs = [(native.conv_bags(x, fwd, t.row, t.shift, t.ptr, vals.reshape(-1), threads=k),
                 native.conv_dots(dy, x, dots, t.row, t.shift, t.ptr, threads=k)) for k in (1, 2, 3)]
        for a, b in runs[1:]:
            assert torch.equal(a, runs[0][0]) and torch.equal(b, runs[0][1])
        assert torch.allclose(runs[0][0], y, atol=1e-4)


CONV_CHECK = """
import sys, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from test_compressed import assert_conv_kernels_match, conv_case
from bame import native
assert native.available(), native.unavailable_reason()
for shape in [(16, 16, 3, 32, 32, 1, 1, 1), (32, 32, 3, 8, 8, 1, 1, 1), (16, 8, 3, 9, 13, 1, 1, 2),
              (16, 16, 1, 16, 16, 0, 1, 1), (16, 16, 3, 12, 12, 2, 2, 1)]:
    cin, out, k, h, w, p, d, s = shape
    assert_conv_kernels_match(conv_case(1, 16, cin, out, k, h, w, p, d, s, 5, 0), 16)
print("ok")
"""


@needs_cc
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("gcc") is None,
                    reason="builds the kernels for x86-64 targets with gcc")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"], ids=["avx2", "plain-c"])
def test_conv_kernels_without_avx512(march, tmp_path):
    """The AVX2 + FMA and the plain-C builds of the kernels (a compiler wrapper swaps -march=native)."""
    cc = tmp_path / "cc"
    cc.write_text(f'#!/bin/sh\nfor a; do shift; [ "$a" = -march=native ] && a=-march={march}; set -- "$@" "$a"; done\n'
                  'exec gcc "$@"\n')
    cc.chmod(0o755)
    env = {**os.environ, "CC": str(cc), "BAME_CACHE_DIR": str(tmp_path / "cache")}
    root, tests = Path(__file__).resolve().parents[1], Path(__file__).resolve().parent
    done = subprocess.run([sys.executable, "-c", CONV_CHECK.format(root=str(root), tests=str(tests))], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@needs_cc
@pytest.mark.parametrize("shape, nm, tokens", [((64, 128), (1, 16), 70), ((128, 64), (2, 8), 33),
                                               ((96, 1024), (1, 4), 16)])
def test_chunked_linear_kernels_equal_the_reference(shape, nm, tokens):
    g = torch.Generator().manual_seed(0)
    out, in_ = shape
    w = torch.randn(out, in_, generator=g)
    mask = random_nm_mask(out, in_, *nm)
    packed = pack(w, mask, *nm)
    x, dy = torch.randn(tokens, in_, generator=g), torch.randn(tokens, out, generator=g)
    assert torch.allclose(fwd_chunked(x, packed), x @ (w * mask).t(), atol=1e-4)
    assert torch.allclose(dx_chunked(dy, packed), dy @ (w * mask), atol=1e-4)
    assert torch.allclose(fwd_direct(x, packed), x @ (w * mask).t(), atol=1e-4)
    assert torch.allclose(dx_direct(dy, packed), dy @ (w * mask), atol=1e-4)
    dw = torch.gather(dy.t() @ x, 1, packed.cols2d).view_as(packed.indices)
    assert torch.allclose(dw_direct(dy, x, packed), dw, atol=1e-4)


@needs_cc
@given(st.sampled_from([(1, 4), (2, 4), (3, 4), (1, 8), (2, 8), (1, 16), (2, 16)]), st.integers(1, 40),
       st.integers(1, 5), st.sampled_from([1, 2, 7, 15, 16, 17, 31, 64, 129]), st.integers(0, 1000))
@settings(max_examples=40, deadline=None)
def test_direct_linear_kernels_equal_the_reference(nm, out, blocks, tokens, seed):
    """The row-major kernels on a compressed layer's own structure (slots in any order within a block, as
    slot-stable mask updates leave them): odd and tiny token counts, rows not a multiple of 16, N > 1."""
    from bame.kernels.slots import SlotStructure

    n, m = nm
    g = torch.Generator().manual_seed(seed)
    in_ = blocks * m
    order = torch.rand(out * blocks, m, generator=g).argsort(dim=1)[:, :n]  # (K, N): kept positions, unsorted
    slots = SlotStructure((out, in_), n, m, order.to(torch.uint8))
    values = torch.randn(out * blocks, n, generator=g)
    dense = slots.dense(values)  # (out, in)
    packed = slots.packed(values)
    x, dy = torch.randn(tokens, in_, generator=g), torch.randn(tokens, out, generator=g)
    assert torch.allclose(fwd_direct(x, packed), x @ dense.t(), atol=1e-4)
    assert torch.allclose(dx_direct(dy, packed), dy @ dense, atol=1e-4)
    assert torch.allclose(dw_direct(dy, x, packed).reshape(-1, n), slots.gather(dy.t() @ x), atol=1e-4)


@needs_cc
@pytest.mark.parametrize("method", ["bame", "bame_bi"])
def test_direct_products_train_as_dense(method, monkeypatch):
    """The row-major kernels forced for every product of every Linear layer (BAME-dagger's input gradient
    through its backward mask) give the dense-storage results."""
    from bame import compressed
    from bame.kernels.plan import Plan

    monkeypatch.setattr(compressed, "choose_plan", lambda *a, **k: Plan("direct", "direct", "direct", reason="x"))
    dense = run("mlp", method, "dense", "sgd", 40)
    comp = run("mlp", method, "compressed", "sgd", 40, kernel="sparse")
    notes = [row["kernel"] for row in comp[2].layer_report() if row["sparse"]]
    assert notes and all(note == "compressed; x" for note in notes)
    for a, b in zip(dense[2].layers, comp[2].layers, strict=True):
        assert torch.equal(a.mask, b.mask)
        assert torch.allclose(a.module.weight, b.module.weight, atol=1e-4)
    assert max(abs(x - y) for x, y in zip(dense[3], comp[3], strict=True)) < 1e-4


def test_compressed_plans_are_checked_with_the_compressed_layer_step(monkeypatch):
    """The whole-layer check of a compressed layer's plan times the compressed step (values in, the kept
    values' gradient out), not dense storage's (whose dense weight gradient made 1:4 plans fall back)."""
    from bame import compressed
    from bame.kernels import plan as planner
    from bame.kernels.compressed import time_layer_step
    from bame.kernels.plan import Plan

    monkeypatch.setattr(planner, "_measure", lambda cands, *a: {k: 10.0 if k == "dense" else 1.0 for k in cands})
    calls = []

    def timer(result):
        return lambda *a: calls.append(result) or result

    slow = planner.choose_plan(64, 256, 1, 16, 64, layer_timer=timer({"dense": 1.0, "sparse": 100.0}), use_cache=False)
    assert slow.is_dense and "ran at 0.01x" in slow.reason
    fast = planner.choose_plan(64, 256, 1, 16, 64, layer_timer=timer({"dense": 100.0, "sparse": 1.0}), use_cache=False)
    assert not fast.is_dense and len(calls) == 2
    seen = {}
    monkeypatch.setattr(compressed, "choose_plan", lambda *a, **k: seen.update(k) or fast)
    model = mlp()
    bame.sparsify(model, optimizer(model, "sgd"), "static", "2:8", total_steps=4, verbose=False,
                  storage="compressed", kernel="sparse")
    model(torch.randn(16, 32))
    assert seen["layer_timer"] is time_layer_step
    if not native.available():
        pytest.skip(f"native kernels: {native.unavailable_reason()}")
    packed = pack(torch.randn(64, 256), random_nm_mask(64, 256, 1, 16), 1, 16)
    x, dy = torch.randn(32, 256), torch.randn(32, 64)
    times = time_layer_step(Plan("direct", "direct", "direct"), packed, x, dy, torch.device("cpu"), 2, 0)
    assert set(times) == {"dense", "sparse"} and min(times.values()) > 0


# ------------------------------------------------------------------ layers whose products are all faster dense
def _dense_first_layer(monkeypatch) -> list[tuple]:
    """Plans as the timing would choose them on a machine where the first layer (32 -> 64) computes every
    product faster dense, and the others get no plan (dense products on the scattered values)."""
    from bame import compressed
    from bame.kernels.plan import Plan

    asked = []

    def choose(storage, module, shape, dtype, device):
        asked.append(tuple(storage.shape))
        return Plan(reason="test: dense is faster") if tuple(storage.shape) == (64, 32) else None

    monkeypatch.setattr(compressed, "choose_products", choose)
    return asked


def test_dense_is_faster_only_for_an_all_dense_plan_at_density_one_half_or_more():
    from bame.compressed import dense_is_faster
    from bame.kernels.plan import Plan

    assert dense_is_faster(Plan(), 2, 4) and dense_is_faster(Plan(), 4, 8) and dense_is_faster(Plan(), 1, 2)
    assert not dense_is_faster(Plan(), 1, 4) and not dense_is_faster(Plan(), 2, 8) and not dense_is_faster(None, 2, 4)
    assert not dense_is_faster(Plan(fwd="embag"), 2, 4) and not dense_is_faster(Plan(dw="direct"), 2, 4)


@pytest.mark.parametrize("method", ["bame", "static"])
def test_a_layer_faster_dense_stays_in_dense_storage_and_trains_as_dense(method, monkeypatch):
    """2:4, the first layer's plan all dense: BAME leaves it in dense storage at the switch, static (switched
    before any input) moves it back after its first forward chose the plan; the run equals dense storage's and
    resumes with the same storage per layer."""
    asked = _dense_first_layer(monkeypatch)
    steps, options = 30, ({"delta_t": 5} if method == "bame" else {})

    def train(storage: str, stop: int = steps, state: tuple | None = None):
        model = mlp()
        opt = optimizer(model, "sgd")
        sp = bame.sparsify(model, opt, method, "2:4", total_steps=steps, verbose=False, storage=storage,
                           kernel="sparse" if storage == "compressed" else "dense", **options)
        if state is not None:
            model.load_state_dict(state[0])
            sp.load_state_dict(state[2])
            opt.load_state_dict(state[1])
        return model, opt, sp, train_steps(model, opt, "mlp", sp.step_count, stop)

    dense, comp = train("dense"), train("compressed")
    assert asked and set(asked) <= {(64, 32), (32, 64)}
    report = {row["name"]: row for row in comp[2].layer_report() if row["sparse"]}
    assert report["0.weight"]["storage"] == "dense"
    assert report["0.weight"]["kernel"] == "dense storage: every product is faster dense (test: dense is faster)"
    assert report["2.weight"]["storage"] == "compressed"
    first = comp[2].layers[0]
    assert first.compressed is None and first.weight.shape == (64, 32)
    held = {id(p) for group in comp[1].param_groups for p in group["params"]}
    assert id(first.weight) in held and id(comp[2].layers[1].weight) in held
    assert comp[1].state[first.weight]["momentum_buffer"].shape == (64, 32)
    for a, b in zip(dense[2].layers, comp[2].layers, strict=True):
        assert torch.equal(a.mask, b.mask), a.name
        assert torch.allclose(a.module.weight, b.module.weight, atol=1e-5), a.name
    assert max(abs(x - y) for x, y in zip(dense[3], comp[3], strict=True)) < 1e-4
    # a checkpoint keeps each layer's storage: the resumed run is the uninterrupted one, bit for bit
    half = train("compressed", stop=steps // 2)
    state = copy.deepcopy((half[0].state_dict(), half[1].state_dict(), half[2].state_dict()))
    assert "indices" not in state[2]["layers"]["0.weight"] and "indices" in state[2]["layers"]["2.weight"]
    resumed = train("compressed", state=state)
    assert resumed[2].layers[0].compressed is None and resumed[2].layers[1].compressed is not None
    assert resumed[3] == comp[3][steps // 2:]
    for a, b in zip(comp[2].layers, resumed[2].layers, strict=True):
        assert torch.equal(a.weight, b.weight), a.name


# ------------------------------------------------------------------------ the compact update gradient
def _quantized(k: int, m: int, g: torch.Generator) -> torch.Tensor:
    """Values on a coarse grid (many exact ties), some zero, both signs."""
    return torch.randint(-3, 4, (k, m), generator=g).float() / 4


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([(1, 4), (2, 4), (3, 4), (1, 8), (2, 8), (1, 16), (4, 16)]), st.integers(0, 10_000))
def test_the_compact_gradient_gives_every_block_evolution_rule_the_same_result(nm, seed):
    """LMA's proposal and statistics and both RigL-NM rules read only the kept entries and each block's
    min(N, M - N) largest pruned |G|: on the compact gradient (zero elsewhere) they decide exactly as on the
    dense one, ties included."""
    from bame import lma
    from bame.compressed import top_pruned
    from bame.methods.rigl_nm import every_block_rule, fraction_rule
    from bame.nm import kept_indices

    n, m = nm
    g = torch.Generator().manual_seed(seed)
    k = 64
    old = torch.argsort(torch.rand(k, m, generator=g), dim=-1) < n
    w = _quantized(k, m, g) * old  # pruned weights are zero
    grad = _quantized(k, m, g)
    slots = kept_indices(old, n).to(torch.uint8)
    where, pruned = top_pruned(grad, slots, n)
    compact = torch.zeros_like(grad).scatter_(1, slots.long(), grad.gather(1, slots.long()))
    compact.scatter_(1, where.long(), pruned)
    for lr in (0.5, 4.0):
        assert torch.equal(lma.propose(w, compact, old, n, lr), lma.propose(w, grad, old, n, lr))
        assert lma.regrowth(w, compact, old, n, lr) == lma.regrowth(w, grad, old, n, lr)
    assert torch.equal(every_block_rule(w, compact, old), every_block_rule(w, grad, old))
    assert torch.equal(fraction_rule(w, compact, old, n, 0.3), fraction_rule(w, grad, old, n, 0.3))


@needs_cc
@pytest.mark.parametrize("nm", [(1, 4), (2, 4), (1, 16), (5, 16), (2, 64)])
def test_native_top_pruned_equals_the_sorting_reference(nm, monkeypatch):
    from bame import compressed
    from bame.nm import kept_indices

    n, m = nm
    g = torch.Generator().manual_seed(m * 10 + n)
    k = 40_000 // m + 7
    grad = _quantized(k, m, g)
    grad[3, :] = float("nan")
    grad[4, 1] = float("inf")
    grad[5, 0] = float("nan")
    grad[5, -1] = float("-inf")  # NaN and inf rank alike: the lower position first
    slots = kept_indices(torch.argsort(torch.rand(k, m, generator=g), dim=-1) < n, n).to(torch.uint8)
    slots = slots[:, torch.randperm(n, generator=g)].contiguous()  # slots keep no order
    fast = compressed.top_pruned(grad, slots, n)
    with monkeypatch.context() as patch:
        patch.setattr(native, "ready", lambda *a, **kw: False)
        slow = compressed.top_pruned(grad, slots, n)
    assert fast[0].shape == (k, min(n, m - n)) and torch.equal(fast[0], slow[0])
    assert torch.equal(fast[1].nan_to_num(7.0), slow[1].nan_to_num(7.0)) and fast[1][3].isnan().all()
    held = torch.zeros(k, m, dtype=torch.bool).scatter_(1, slots.long(), True)
    assert not held.gather(1, fast[0].long()).any()  # never a kept entry


def _bame_run(micro_batches: int, monkeypatch) -> tuple[list, int]:
    """BAME 2:8 with compressed storage (update every 2 steps from t_i = 0); the compact gradients used."""
    used = []
    real = CompressedNM.compact_dense_grad
    monkeypatch.setattr(CompressedNM, "compact_dense_grad", lambda self: used.append(1) or real(self))
    model = mlp()
    opt = optimizer(model, "sgd")
    sp = bame.sparsify(model, opt, "bame", "2:8", total_steps=12, t_i=0, delta_t=2, verbose=False,
                       storage="compressed", kernel="dense")
    for t in range(12):
        opt.zero_grad()
        for micro in range(micro_batches):
            x, y = batch("mlp", micro_batches * t + micro)
            (F.cross_entropy(model(x), y) / micro_batches).backward()
        opt.step()
    return [layer.mask.clone() for layer in sp.layers], len(used)


def test_update_iterations_keep_a_compact_gradient_unless_steps_accumulate(monkeypatch):
    """One backward per step: from the second update on (the first step counts the forwards), each layer
    keeps the compact gradient and the masks are dense storage's; two micro-batches per step: the dense one."""
    masks, used = _bame_run(1, monkeypatch)
    assert used == 3 * 2  # updates at t = 2, 4, 6 (t_f = 8; t = 0 has no count yet); two sparse layers
    model = mlp()
    opt = optimizer(model, "sgd")
    sp = bame.sparsify(model, opt, "bame", "2:8", total_steps=12, t_i=0, delta_t=2, verbose=False)
    train_steps(model, opt, "mlp", 0, 12)
    assert all(torch.equal(a, b.mask) for a, b in zip(masks, sp.layers, strict=True))
    assert sum(int(layer.flips[0]) for layer in sp.layers) > 0  # the masks did evolve
    _, used = _bame_run(2, monkeypatch)
    assert used == 0


def test_a_second_backward_on_a_compact_update_iteration_is_refused_in_one_line():
    model = mlp()
    opt = optimizer(model, "sgd")
    bame.sparsify(model, opt, "bame", "2:8", total_steps=12, t_i=0, delta_t=2, verbose=False, storage="compressed",
                  kernel="dense")
    x, y = batch("mlp", 0)
    for _ in range(2):  # steps 0 and 1: one forward each
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()  # step 2, an update iteration: compact
    with pytest.raises(RuntimeError, match="second backward on a mask-update iteration") as err:
        F.cross_entropy(model(x), y).backward()
    assert "\n" not in str(err.value)


def test_the_compact_gradient_from_row_chunks_equals_the_one_from_the_whole_product():
    """A wide Linear layer's update gradient is computed in chunks of output rows (512 x 4096: two chunks of
    256 rows) and reduced at once; on integer data (exact products) it is the whole product's, bit for bit."""
    from bame.nm import kept_indices

    g = torch.Generator().manual_seed(5)
    out, in_, n, m = 512, 4096, 2, 8
    mask = torch.argsort(torch.rand(out * in_ // m, m, generator=g), dim=-1) < n
    storage = CompressedNM((out, in_), n, m, kept_indices(mask, n))
    storage.compact_grad = True
    dy = torch.randint(-2, 3, (16, out), generator=g).float()
    x = torch.randint(-2, 3, (16, in_), generator=g).float()
    kept = storage.stash_product(dy, x)
    chunked, storage.compact = storage.compact, None
    storage.stash(dy.t() @ x)
    assert all(torch.equal(a, b) for a, b in zip(chunked, storage.compact, strict=True))
    assert torch.equal(kept, chunked[0]) and kept.data_ptr() != chunked[0].data_ptr()
    with pytest.raises(RuntimeError, match="second backward"):
        storage.stash_product(dy, x)
