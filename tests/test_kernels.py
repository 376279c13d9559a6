"""bame.kernels: packing, every formulation of the three products, NMLinearFunction and the planner."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from bame import native
from bame.errors import ConfigError
from bame.kernels import NMLinearFunction, Plan, choose_plan, clear_plan_cache, nm_linear, pack, unpack
from bame.kernels.linear import CUDA_ONLY, NATIVE_ONLY, dw_full, fwd_semi_structured, scatter_values
from bame.kernels.linear import FORWARD as ALL_FORWARD
from bame.kernels.linear import INPUT_GRAD as ALL_INPUT_GRAD
from bame.kernels.linear import WEIGHT_GRAD as ALL_WEIGHT_GRAD
from bame.kernels.plan import random_nm_mask, tokens_bucket
from bame.kernels.tiles import auto_tile, from_tiles, to_tiles


def _usable(formulations: dict) -> dict:
    """Every registered formulation, less the native ones without a C compiler and the CUDA-only ones."""
    return {k: v for k, v in formulations.items()
            if (k not in NATIVE_ONLY or native.available()) and k not in CUDA_ONLY}


FORWARD, INPUT_GRAD, WEIGHT_GRAD = _usable(ALL_FORWARD), _usable(ALL_INPUT_GRAD), _usable(ALL_WEIGHT_GRAD)
FAST = settings(max_examples=40, deadline=None)
# tile=8 with 37 tokens: several token tiles, the last one zero-padded.
PLANS = [Plan(f, d, w, tile=8) for f, d, w in itertools.product(FORWARD, INPUT_GRAD, WEIGHT_GRAD)]
# Every formulation at least once (gradcheck is slow; the fp32 comparison covers all combinations).
COVER = [Plan("dense", "dense", "dense"), Plan("embag", "embag", "sampled"), Plan("csr", "csr", "sampled")]


@st.composite
def nm_cases(draw: st.DrawFn) -> tuple[int, int, int, int, int]:
    """``(out, in, n, m, tokens)`` with M in 2, 4, 8, 16 and 0 < N < M."""
    m = draw(st.sampled_from([2, 4, 8, 16]))
    n = draw(st.integers(1, m - 1))
    return draw(st.integers(1, 20)), m * draw(st.integers(1, 6)), n, m, draw(st.integers(1, 12))


def subset_mask(mask: Tensor, keep: float, seed: int) -> Tensor:
    """A random subset of ``mask`` (some blocks end up with fewer than N ones, some with none)."""
    g = torch.Generator().manual_seed(seed)
    return mask & (torch.rand(mask.shape, generator=g) < keep)


def assert_close(got: Tensor, ref: Tensor) -> None:
    """fp32 agreement: rtol 1e-5, atol 1e-5 scaled by the reference's magnitude."""
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * scale)


def case(out: int, in_: int, n: int, m: int, tokens: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A dense weight, an N:M mask, an input and an output gradient."""
    torch.manual_seed(seed)
    w = torch.randn(out, in_, dtype=dtype)
    return (
        w,
        random_nm_mask(out, in_, n, m),
        torch.randn(tokens, in_, dtype=dtype),
        torch.randn(tokens, out, dtype=dtype),
    )


@FAST
@given(nm_cases(), st.booleans())
def test_pack_unpack_round_trip(shape: tuple[int, int, int, int, int], partial: bool) -> None:
    out, in_, n, m, _ = shape
    w, mask, _, _ = case(out, in_, n, m, 1)
    if partial:
        mask = subset_mask(mask, 0.5, seed=out)
    p = pack(w, mask, n, m)
    assert torch.equal(unpack(p), w * mask)
    assert p.values.shape == p.indices.shape == (out, in_ // m, n)
    assert p.indices.dtype == torch.uint8 and p.cols.dtype == torch.int64
    blocks = torch.arange(in_ // m).view(1, -1, 1)
    assert torch.equal(p.cols, (blocks * m + p.indices.long()).reshape(-1))
    assert bool((p.indices[..., 1:] > p.indices[..., :-1]).all())  # lower in-block index first
    if p.slot_mask is not None:
        assert bool((p.values[~p.slot_mask] == 0).all())


def test_pack_rejects_bad_input() -> None:
    w = torch.randn(4, 8)
    with pytest.raises(ConfigError):
        pack(w, torch.ones(4, 8), 1, 3)  # 8 is not a multiple of 3
    with pytest.raises(ConfigError):
        pack(w, torch.ones(4, 8), 0, 4)
    with pytest.raises(ValueError):
        pack(w, torch.ones(4, 8), 2, 4)  # 4 ones in a block of a 2:4 mask


def test_nbytes_and_dtypes() -> None:
    w, mask, _, _ = case(64, 256, 1, 16, 1)
    p = pack(w, mask, 1, 16)
    assert p.nbytes == 64 * 16 * (4 + 1)  # fp32 values + uint8 indices
    assert p.nbytes < w.numel() * w.element_size() / 10
    p64 = pack(w.double(), mask, 1, 16)
    assert p64.values.dtype == torch.float64 and torch.equal(unpack(p64), (w * mask).double())


@FAST
@given(nm_cases(), st.booleans())
def test_formulations_match_masked_dense(shape: tuple[int, int, int, int, int], partial: bool) -> None:
    out, in_, n, m, tokens = shape
    w, mask, x, dy = case(out, in_, n, m, tokens, seed=tokens)
    if partial:  # a padded (backward-style) packing
        mask = subset_mask(mask, 0.6, seed=tokens)
    p = pack(w, mask, n, m)
    wm = w * mask
    for name, fn in FORWARD.items():
        assert_close(fn(x, p, 0), F.linear(x, wm)), name
        assert_close(fn(x, p, 4), F.linear(x, wm)), name  # several token tiles
    for name, fn in INPUT_GRAD.items():
        assert_close(fn(dy, p, 0), dy @ wm), name
        assert_close(fn(dy, p, 4), dy @ wm), name
    for name, fn in WEIGHT_GRAD.items():
        assert_close(scatter_values(fn(dy, x, p), p), (dy.t() @ x) * mask), name
        assert_close(scatter_values(fn(dy, x, p, 4), p), (dy.t() @ x) * mask), name


@FAST
@given(st.integers(0, 40), st.integers(1, 9), st.sampled_from([1, 4, 16]))
def test_token_tiles_round_trip(tokens: int, rows: int, tile: int) -> None:
    a = torch.randn(tokens, rows)
    tiles = to_tiles(a, tile)
    assert tiles.shape == (max(-(-tokens // tile), 1), rows, tile) and tiles.is_contiguous()
    back = from_tiles(tiles, tokens)
    assert torch.equal(back, a) and back.is_contiguous()
    assert auto_tile(4096, 256, a) == 64 and auto_tile(1024, 256, a) == 256 and auto_tile(8, 5, a) == 5


@pytest.mark.parametrize("plan", COVER, ids=lambda p: f"{p.fwd}-{p.dx}-{p.dw}")
def test_gradcheck_float64(plan: Plan) -> None:
    w, mask, x, _ = case(6, 16, 2, 8, 5, dtype=torch.float64)
    p = pack(w, mask, 2, 8)
    x = x.view(5, 1, 16).requires_grad_()
    w = w.requires_grad_()
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, ww, bb: nm_linear(a, ww, p, None, bb, plan, False), (x, w, b))


def grads(fn, x: Tensor, w: Tensor, b: Tensor, gy: Tensor) -> tuple[Tensor, ...]:
    """``(y, x.grad, w.grad, b.grad)`` of ``fn(x, w, b)`` for output gradient ``gy``."""
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b)
    y.backward(gy)
    return y.detach(), x.grad, w.grad, b.grad


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"{p.fwd}-{p.dx}-{p.dw}")
@pytest.mark.parametrize("nm", [(1, 4), (2, 8), (1, 16)])
def test_function_matches_masked_linear(plan: Plan, nm: tuple[int, int]) -> None:
    n, m = nm
    w, mask, x, gy = case(48, 128, n, m, 37)
    b = torch.randn(48)
    p = pack(w, mask, n, m)
    got = grads(lambda a, ww, bb: nm_linear(a, ww, p, None, bb, plan), x, w, b, gy)
    ref = grads(lambda a, ww, bb: F.linear(a, ww * mask, bb), x, w, b, gy)
    for g, r in zip(got, ref, strict=True):
        assert_close(g, r)


@pytest.mark.parametrize("plan", COVER, ids=lambda p: f"{p.fwd}-{p.dx}-{p.dw}")
def test_dense_wgrad_gives_full_gradient(plan: Plan) -> None:
    w, mask, x, gy = case(32, 64, 1, 4, 9)
    b = torch.zeros(32)
    _, _, dw, _ = grads(
        lambda a, ww, bb: nm_linear(a, ww, pack(w, mask, 1, 4), None, bb, plan, True), x, w, b, gy
    )
    assert_close(dw, gy.t() @ x)
    assert_close(dw_full(gy, x), gy.t() @ x)
    assert bool((dw * ~mask != 0).any())  # pruned entries get gradient too


@pytest.mark.parametrize("plan", COVER, ids=lambda p: f"{p.fwd}-{p.dx}-{p.dw}")
def test_backward_mask_used_for_dx_only(plan: Plan) -> None:
    w, mask, x, gy = case(32, 64, 2, 4, 11)
    mask_bwd = subset_mask(mask, 0.5, seed=3)
    b = torch.randn(32)
    pf, pb = pack(w, mask, 2, 4), pack(w, mask_bwd, 2, 4)
    y, dx, dw, db = grads(lambda a, ww, bb: nm_linear(a, ww, pf, pb, bb, plan), x, w, b, gy)
    assert_close(y, F.linear(x, w * mask, b))
    assert_close(dx, gy @ (w * mask_bwd))
    assert_close(dw, (gy.t() @ x) * mask)
    assert_close(db, gy.sum(0))


def test_leading_batch_dims_and_no_bias() -> None:
    w, mask, _, _ = case(12, 16, 1, 4, 1)
    x = torch.randn(2, 3, 16, requires_grad=True)
    y = NMLinearFunction.apply(
        x, w, pack(w, mask, 1, 4), None, None, Plan("embag", "embag", "sampled"), False
    )
    assert y.shape == (2, 3, 12)
    assert_close(y, F.linear(x, w * mask))
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == (2, 3, 16)
    assert_close(x.grad, torch.ones(2, 3, 12) @ (w * mask))


@pytest.mark.parametrize("plan", COVER, ids=lambda p: f"{p.fwd}-{p.dx}-{p.dw}")
def test_frozen_weight_or_input(plan: Plan) -> None:
    w, mask, x, gy = case(16, 32, 2, 8, 5)
    p = pack(w, mask, 2, 8)
    xg = x.clone().requires_grad_()
    nm_linear(xg, w, p, plan=plan).backward(gy)  # weight frozen: x is not even saved
    assert_close(xg.grad, gy @ (w * mask))
    wg = w.clone().requires_grad_()
    nm_linear(x, wg, p, plan=plan).backward(gy)
    assert_close(wg.grad, (gy.t() @ x) * mask)


def test_refresh_values_and_straight_through_weights() -> None:
    w, mask, x, _ = case(16, 32, 1, 8, 4)
    p = pack(w, mask, 1, 8)
    with torch.no_grad():
        w.mul_(2.0).add_(1.0)  # an optimizer step; pruned entries are non-zero (as in SR-STE)
    p.refresh_values(w)
    assert torch.equal(unpack(p), w * mask)
    # NMLinearFunction reads the live weight, never stale packed values
    stale = pack(w * 0.0 + 3.0, mask, 1, 8)
    assert_close(nm_linear(x, w, stale, plan=Plan("embag", "embag", "sampled")), F.linear(x, w * mask))


def test_dense_scratch_is_reused_only_without_grad() -> None:
    w, mask, x, _ = case(8, 16, 1, 4, 3)
    p = pack(w, mask, 1, 4)
    with torch.no_grad():
        first = p.dense_scratch()
        p.refresh_values(w * 2)
        assert p.dense_scratch().data_ptr() == first.data_ptr()
        assert torch.equal(first, 2 * w * mask)
        assert_close(FORWARD["dense"](x, p, 0), F.linear(x, 2 * w * mask))
    y = FORWARD["dense"](x, p.with_values(p.values.clone().requires_grad_()), 0)  # grad mode: fresh weight
    assert_close(y, F.linear(x, 2 * w * mask))


def test_refresh_keeps_padding_zero() -> None:
    w, mask, _, _ = case(8, 32, 2, 8, 1)
    p = pack(w, subset_mask(mask, 0.5, seed=1), 2, 8)
    assert p.slot_mask is not None
    p.refresh_values(torch.ones_like(w))
    assert torch.equal(p.values, p.slot_mask.float())


def test_choose_plan_valid_and_cached() -> None:
    clear_plan_cache()
    plan = choose_plan(64, 128, 1, 16, batch_tokens=50, repeats=1, warmup=0)
    assert plan.fwd in ALL_FORWARD and plan.dx in ALL_INPUT_GRAD and plan.dw in ALL_WEIGHT_GRAD
    assert plan.reason.startswith("1:16 64x128 T=64")
    assert {"fwd", "dx", "dw"} <= set(plan.timings_ms) <= {"fwd", "dx", "dw", "layer"}
    assert "dense" in plan.timings_ms["dw"]
    assert Plan.from_dict(plan.to_dict()) == plan
    assert choose_plan(64, 128, 1, 16, batch_tokens=60, repeats=1, warmup=0) is plan  # same bucket
    assert tokens_bucket(1) == 1 and tokens_bucket(64) == 64 and tokens_bucket(65) == 128
    w, mask, x, _ = case(64, 128, 1, 16, 50)
    assert_close(nm_linear(x, w, pack(w, mask, 1, 16), plan=plan), F.linear(x, w * mask))
    with pytest.raises(ConfigError):
        choose_plan(64, 100, 1, 16, batch_tokens=8)


def test_semi_structured_forward_is_skipped_where_it_cannot_run() -> None:
    w, mask, x, _ = case(64, 64, 2, 4, 8, seed=0)
    with pytest.raises(NotImplementedError, match="CUDA only"):
        fwd_semi_structured(x, pack(w, mask, 2, 4))
    plan = choose_plan(64, 64, 2, 4, batch_tokens=8, repeats=1, warmup=0, use_cache=False)
    assert "semi_structured" not in plan.timings_ms["fwd"] and plan.fwd != "semi_structured"


@pytest.mark.parametrize("plan", [Plan("dense", "dense", "dense"), Plan("embag", "dense", "sampled"),
                                  Plan("dense", "embag", "dense")], ids=["all-dense", "fwd-sparse", "dx-sparse"])
@pytest.mark.parametrize("dense_wgrad", [False, True])
def test_masked_weight_shortcut_equals_unpacking(plan: Plan, dense_wgrad: bool) -> None:
    w, mask, x, dy = case(24, 32, 1, 4, 9, seed=3)
    p = pack(w, mask, 1, 4)
    results = []
    for masked in (False, True):  # the dense products unpack the values, or use the masked weight itself
        ww = (w * mask).requires_grad_()
        xx = x.clone().requires_grad_()
        b = torch.zeros(24, requires_grad=True)
        y = nm_linear(xx, ww, p, None, b, plan, dense_wgrad, masked)
        y.backward(dy)
        results.append((y.detach(), xx.grad, ww.grad, b.grad))
    for got, ref in zip(results[1], results[0]):
        assert_close(got, ref)
    assert_close(results[0][0], F.linear(x, w * mask))


def test_plan_falls_back_to_dense_when_the_layer_gains_too_little(monkeypatch) -> None:
    from bame.kernels import plan as plan_module

    calls = []

    def fake_measure(cands, device, repeats, warmup):  # one product a bit faster sparse, the rest not
        calls.append(1)
        if len(calls) == 1:  # the forward, timed first: dense 10 ms, native 8 ms
            return {k: 8.0 if k == "native" else 10.0 for k in cands}
        return {k: 10.0 if k == "dense" else 30.0 for k in cands}

    monkeypatch.setattr(plan_module, "_measure", fake_measure)
    chosen = choose_plan(64, 64, 1, 4, batch_tokens=8, use_cache=False)
    assert chosen.is_dense and "would save 7%" in chosen.reason  # 28 of 30 ms: under the 10% margin
    monkeypatch.setattr(plan_module, "_measure", lambda cands, *a: {k: 10.0 if k == "dense" else 2.0 for k in cands})
    monkeypatch.setattr(plan_module, "_time_layer", lambda *a: {"dense": 10.0, "sparse": 2.5})  # the layer step too
    chosen = choose_plan(64, 64, 1, 4, batch_tokens=8, use_cache=False)
    assert not chosen.is_dense and "5.0x" in chosen.reason


@pytest.mark.parametrize("layer_sparse_ms", [12.0, 5.0])
def test_plan_falls_back_when_the_whole_layer_step_loses(monkeypatch, layer_sparse_ms: float) -> None:
    """Products that each win can still lose as a layer step (gathers, transposes): then dense is kept."""
    from bame.kernels import plan as plan_mod

    def fake_times(cands, device, repeats, warmup):  # every sparse product 10x faster than dense
        if set(cands) == {"dense", "sparse"}:  # the whole-layer step
            return {"dense": 10.0, "sparse": layer_sparse_ms}
        return {k: 10.0 if k == "dense" else 1.0 for k in cands}

    monkeypatch.setattr(plan_mod, "time_interleaved", fake_times)
    plan = choose_plan(64, 128, 1, 16, batch_tokens=32, use_cache=False)
    assert plan.timings_ms["layer"] == {"dense": 10.0, "sparse": layer_sparse_ms}
    if layer_sparse_ms > 10.0 / 1.1:
        assert plan.is_dense and "ran at 0.83x" in plan.reason
    else:
        assert not plan.is_dense and plan.reason.endswith("layer 2.0x")


def test_semi_structured_plumbing_pads_transposes_and_caches(monkeypatch) -> None:
    """The 2:4 products' own code (padding to the minimum shapes, the transposed input gradient, one
    compression per weight version) against dense references, with PyTorch's compression replaced by the
    identity: the GPU kernels themselves run in tests/test_cuda.py on a GPU."""
    from bame.kernels import semi

    calls = []
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", lambda t: calls.append(t.shape) or t.clone(),
                        raising=False)
    monkeypatch.setattr(semi, "_min_shape", lambda dtype: (32, 64))
    g = torch.Generator().manual_seed(0)
    out, in_, tokens = 40, 72, 5  # none a multiple of the minimum shapes
    w = torch.randn(out, in_, generator=g) * random_nm_mask(out, in_, 2, 4)
    x, dy = torch.randn(2, tokens, in_, generator=g), torch.randn(2, tokens, out, generator=g)
    assert torch.allclose(semi.semi_structured_linear(x, w), x @ w.t(), atol=1e-5)
    assert torch.allclose(semi.semi_structured_dx(dy, w), dy @ w, atol=1e-5)
    assert calls == [(64, 128), (96, 64)]  # padded: rows to 32s, columns to 64s (W 40x72, then W^T 72x40)
    cache = semi.SemiCache()
    first = cache.get("fwd", w)
    assert cache.get("fwd", w) is first  # micro-batches of one step reuse it
    w.add_(0.0)  # a new version (an optimizer step): compressed again
    assert cache.get("fwd", w) is not first and len(calls) == 4


def test_clear_plan_cache_forgets_linear_and_convolution_plans():
    from bame.kernels import conv, plan

    plan._CACHE[("linear",)] = plan.Plan()
    conv._PLANS[("conv",)] = conv.ConvPlan()
    plan.clear_plan_cache()
    assert plan._CACHE == {} and conv._PLANS == {}
