"""bame.native: the C kernels against dense references, thread splits, NMLinearFunction with a native
plan, and the fallbacks (no compiler, a corrupt cached library, ``BAME_NATIVE=0``)."""

from __future__ import annotations

import math
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from bame import native
from bame.kernels import Plan, choose_plan, clear_plan_cache, nm_linear, pack, unpack
from bame.kernels.linear import (
    dw_direct,
    dw_native,
    dx_direct,
    dx_native,
    fwd_direct,
    fwd_native,
    native_tiles,
    scatter_values,
)
from bame.kernels.plan import random_nm_mask

needs_cc = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")

PATTERNS = [(1, 16), (2, 4), (1, 4), (2, 8)]
TOKENS = [1, 7, 33, 64, 100]  # T = 1, odd, not a multiple of any tile, exactly one tile, several tiles


def assert_close(got: Tensor, ref: Tensor) -> None:
    """fp32 agreement relative to the reference's magnitude (the kernels sum in another order)."""
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * scale)


def case(out: int, in_: int, n: int, m: int, tokens: int, padded: bool, seed: int = 0):
    """Weight, mask (with some blocks holding fewer than N ones when ``padded``), packing, x, dY."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    w = torch.randn(out, in_, generator=g)
    mask = random_nm_mask(out, in_, n, m)
    if padded:
        mask &= torch.rand(out, in_, generator=g) < 0.6
    return w, mask, pack(w, mask, n, m), torch.randn(tokens, in_, generator=g), torch.randn(tokens, out, generator=g)


@needs_cc
@pytest.mark.parametrize("nm", PATTERNS, ids=lambda p: f"{p[0]}:{p[1]}")
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_products_match_dense(nm: tuple[int, int], tokens: int, padded: bool) -> None:
    n, m = nm
    w, mask, p, x, dy = case(24, 8 * m, n, m, tokens, padded, seed=tokens)
    if padded:
        assert p.slot_mask is not None
    assert_products_match(w, mask, p, x, dy, fwd_native, dx_native, dw_native)


def assert_products_match(w, mask, p, x, dy, fwd, dx, dw) -> None:
    """Forward, input gradient and weight gradient against the masked-dense references; padding slots get
    no gradient."""
    wm = w * mask
    assert_close(fwd(x, p), F.linear(x, wm))
    assert_close(dx(dy, p), dy @ wm)
    grad = dw(dy, x, p)
    assert grad.shape == p.indices.shape
    assert_close(scatter_values(grad, p), (dy.t() @ x) * mask)
    if p.slot_mask is not None:
        assert bool((grad[~p.slot_mask] == 0).all())


@needs_cc
@pytest.mark.parametrize("rows", [4096, 1024, 8])
def test_token_tile(rows: int) -> None:
    tw = native.token_tile(rows, 256)
    assert tw in (16, 32, 64) and rows * tw * 4 <= max(native.L2_BYTES // 2, rows * 16 * 4)
    assert native.token_tile(rows, 5) == 5
    x = torch.randn(37, rows)
    tiles = native.to_tiles(x, 16)
    assert tiles.shape == (3, rows, 16)
    assert torch.equal(tiles.transpose(1, 2).reshape(48, rows)[:37], x)
    assert bool((tiles[2, :, 5:] == 0).all())  # tokens past T are zero


@needs_cc
def test_thread_split_is_bit_identical() -> None:
    w, mask, p, x, dy = case(96, 256, 1, 4, 70, padded=True, seed=3)
    perm, rows, crow = p.transposed()
    xt, dyt = native_tiles(x, p), native_tiles(dy, p)
    vals = p.values.reshape(-1).contiguous()
    for threads in (2, 3, 5):
        assert torch.equal(native.bag(xt, 70, p.cols, p.row_ptr(), vals, threads=threads),
                           native.bag(xt, 70, p.cols, p.row_ptr(), vals, threads=1))
        wt = native.take(vals, perm, threads=threads)
        assert torch.equal(wt, vals[perm])
        assert torch.equal(native.bag(dyt, 70, rows, crow, wt, threads=threads),
                           native.bag(dyt, 70, rows, crow, wt, threads=1))
        assert torch.equal(native.sampled_dot(dyt, xt, 70, p.cols, p.row_ptr(), p.slot_mask, threads=threads),
                           native.sampled_dot(dyt, xt, 70, p.cols, p.row_ptr(), p.slot_mask, threads=1))
        dense = native.scatter_rows(vals, p.cols, p.row_ptr(), p.shape, p.slot_mask, threads=threads)
        assert torch.equal(dense, unpack(p))
        assert torch.equal(native.gather_rows(w, p.cols, p.row_ptr(), p.slot_mask, threads=threads),
                           p.gather_values(w).reshape(-1))
        assert torch.equal(native.to_tiles(x, 32, threads=threads), native.to_tiles(x, 32, threads=1))


@needs_cc
def test_other_dtypes_are_not_implemented() -> None:
    _, _, p, x, _ = case(8, 32, 1, 4, 3, padded=False)
    with pytest.raises(NotImplementedError):
        fwd_native(x.double(), pack(torch.randn(8, 32).double(), torch.ones(8, 32).bool() & (unpack(p) != 0), 1, 4))


def grads(fn, x: Tensor, w: Tensor, b: Tensor, gy: Tensor) -> tuple[Tensor, ...]:
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b)
    y.backward(gy)
    return y.detach(), x.grad, w.grad, b.grad


@needs_cc
@pytest.mark.parametrize("plan", [Plan("native", "native", "native"), Plan("native", "embag", "native"),
                                  Plan("dense", "native", "sampled"), Plan("embag", "dense", "native"),
                                  Plan("direct", "direct", "direct"), Plan("direct", "native", "dense"),
                                  Plan("chunked", "direct", "sampled")],
                         ids=lambda p: f"{p.fwd}-{p.dx}-{p.dw}")
@pytest.mark.parametrize("nm", [(1, 16), (2, 4)], ids=["1:16", "2:4"])
@pytest.mark.parametrize("padded_bwd", [False, True], ids=["fwd-mask", "bwd-mask"])
def test_function_matches_masked_dense(plan: Plan, nm: tuple[int, int], padded_bwd: bool) -> None:
    n, m = nm
    w, mask, pf, x, gy = case(40, 128, n, m, 37, padded=False, seed=5)
    x = x.view(37, 1, 128)
    gy = gy.view(37, 1, 40)
    b = torch.randn(40)
    mask_bwd = mask & (torch.rand(mask.shape, generator=torch.Generator().manual_seed(9)) < 0.5)
    pb = pack(w, mask_bwd, n, m) if padded_bwd else None
    got = grads(lambda a, ww, bb: nm_linear(a, ww, pf, pb, bb, plan), x, w, b, gy)
    y, dx, dw, db = grads(lambda a, ww, bb: F.linear(a, ww * mask, bb), x, w, b, gy)
    if padded_bwd:
        dx = gy @ (w * mask_bwd)
    for g, r in zip(got, (y, dx, dw, db), strict=True):
        assert_close(g, r)
    # the dense weight gradient of an update iteration
    _, _, dw_full, _ = grads(lambda a, ww, bb: nm_linear(a, ww, pf, pb, bb, plan, True), x, w, b, gy)
    assert_close(dw_full, gy.reshape(37, 40).t() @ x.reshape(37, 128))


@needs_cc
def test_choose_plan_times_native() -> None:
    clear_plan_cache()
    plan = choose_plan(64, 256, 1, 16, batch_tokens=40, repeats=1, warmup=0, use_cache=False)
    for product in ("fwd", "dx", "dw"):
        assert "native" in plan.timings_ms[product] and "direct" in plan.timings_ms[product]


# -- the row-major ("direct") kernels --------------------------------------------------------------------
@st.composite
def direct_cases(draw: st.DrawFn) -> tuple[int, int, int, int, int, bool, int]:
    """``(out, in, n, m, tokens, padded, seed)``: rows below, at and past 16 (not multiples of it), several M
    and N (N > 1 too), tokens below a tile, odd, and across tiles and weight-gradient chunks."""
    m = draw(st.sampled_from([2, 4, 8, 16]))
    n = draw(st.integers(1, m))
    out = draw(st.sampled_from([1, 5, 16, 17, 33]) | st.integers(1, 48))
    tokens = draw(st.sampled_from([1, 3, 15, 16, 17, 33, 257]) | st.integers(1, 80))
    return out, m * draw(st.integers(1, 6)), n, m, tokens, draw(st.booleans()), draw(st.integers(0, 1 << 16))


def check_direct(out: int, in_: int, n: int, m: int, tokens: int, padded: bool, seed: int) -> None:
    """The three direct products against the masked-dense references (padding slots: no gradient)."""
    w, mask, p, x, dy = case(out, in_, n, m, tokens, padded and n < m, seed=seed)
    assert_products_match(w, mask, p, x, dy, fwd_direct, dx_direct, dw_direct)


@needs_cc
@settings(max_examples=60, deadline=None)
@given(direct_cases())
def test_direct_kernels_match_masked_dense(shape: tuple[int, int, int, int, int, bool, int]) -> None:
    check_direct(*shape)


@needs_cc
@pytest.mark.parametrize("team", [True, False], ids=["openmp-team", "python-threads"])
def test_direct_kernels_are_bit_identical_for_any_thread_split(team: bool, monkeypatch) -> None:
    """Tiles (forward, dX) and chunks (dW) go to whichever thread claims them: the results never change."""
    if not team:
        monkeypatch.setattr(native, "_omp_parallel", lambda: None)
    w, mask, p, x, dy = case(50, 96, 2, 8, 333, padded=True, seed=4)
    vals = p.values.reshape(-1).contiguous()
    chunk = native.rows_chunk(96, 50, 333)
    assert -(-333 // chunk) > 1  # several weight-gradient chunks
    ref = (native.rows_forward(x, p.cols, vals, 50, threads=1), native.rows_input_grad(dy, p.cols, vals, 96, threads=1),
           native.rows_weight_grad(dy, x, p.cols, p.slot_mask, threads=1))
    for threads in (2, 3, 5):
        got = (native.rows_forward(x, p.cols, vals, 50, threads=threads),
               native.rows_input_grad(dy, p.cols, vals, 96, threads=threads),
               native.rows_weight_grad(dy, x, p.cols, p.slot_mask, threads=threads))
        for g, r in zip(got, ref, strict=True):
            assert torch.equal(g, r)


@needs_cc
def test_direct_weight_gradient_chunks_depend_on_shapes_only() -> None:
    for in_, rows, tokens in [(192, 768, 8320), (4096, 1024, 256), (64, 8, 5), (192, 192, 8320)]:
        ch = native.rows_chunk(in_, rows, tokens)
        assert ch % 16 == 0 and 16 <= ch <= 256
        assert (in_ + rows) * ch * 4 <= native.L2_BYTES // 2 or ch == 16  # the chunk's tables share L2
        assert ch < 2 * max(tokens, 16)  # no chunk wider than the tokens need
    assert native.rows_chunk(192, 768, 8320) == 128


@needs_cc
def test_direct_kernels_refuse_ragged_structures() -> None:
    x, cols, w = torch.randn(4, 8), torch.zeros(5, dtype=torch.int64), torch.ones(5)
    with pytest.raises(ValueError):
        native.rows_forward(x, cols, w, 2)  # 5 slots are not K per row of 2 rows
    with pytest.raises(ValueError):
        native.rows_forward(x, cols[:4], w, 2)  # one value per slot


@needs_cc
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 micro-architecture levels")
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"], ids=["avx2-fma", "plain-c"])
def test_direct_kernels_portable_builds(march: str, tmp_path, monkeypatch) -> None:
    """The AVX2+FMA and plain C paths of the kernel file (built here for those targets) compute the same
    products: AVX-512 code stays behind its #if."""
    cc = shlex.split(os.environ.get("CC", "").strip() or "cc")
    target = tmp_path / f"nm_kernels-{march}.so"
    done = subprocess.run([*cc, "-O2", f"-march={march}", "-fPIC", "-shared", "-o", str(target), str(native.SOURCE)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lib = native._open(target)
    monkeypatch.setattr(native, "_lib", lambda: lib)
    for shape in [(33, 48, 1, 16, 37, False, 1), (7, 24, 3, 4, 5, True, 2), (20, 16, 2, 2, 70, True, 3)]:
        check_direct(*shape)
    _, _, p, x, dy = case(40, 64, 1, 4, 150, padded=True, seed=6)
    vals = p.values.reshape(-1).contiguous()
    for threads in (1, 3):
        assert torch.equal(native.rows_forward(x, p.cols, vals, 40, threads=threads),
                           native.rows_forward(x, p.cols, vals, 40, threads=2))
        assert torch.equal(native.rows_weight_grad(dy, x, p.cols, p.slot_mask, threads=threads),
                           native.rows_weight_grad(dy, x, p.cols, p.slot_mask, threads=2))


# -- fallbacks ------------------------------------------------------------------------------------------
def test_missing_compiler_falls_back(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("BAME_NATIVE", raising=False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("BAME_CACHE_DIR", str(tmp_path / "cache"))
    assert not native.available()
    reason = native.unavailable_reason()
    assert reason is not None and "no C compiler" in reason and "\n" not in reason
    _, _, p, x, _ = case(8, 32, 1, 4, 3, padded=False)
    with pytest.raises(NotImplementedError):
        fwd_native(x, p)
    plan = choose_plan(16, 64, 1, 16, batch_tokens=8, repeats=1, warmup=0, use_cache=False)
    assert "native" not in plan.timings_ms["fwd"] and plan.fwd != "native"
    assert not list((tmp_path / "cache").glob("*.so")) if (tmp_path / "cache").exists() else True


def test_disabled_by_env(monkeypatch) -> None:
    monkeypatch.setenv("BAME_NATIVE", "0")
    assert not native.available()
    assert native.unavailable_reason() == "disabled by BAME_NATIVE=0"


@needs_cc
def test_build_is_cached_and_corrupt_library_rebuilt(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("BAME_CACHE_DIR", str(tmp_path))
    assert native.available()
    (lib,) = tmp_path.glob("nm_kernels-*.so")
    assert not [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]  # the temporary was moved into place
    # A new file replaces it (writing into the mapped library of this process would crash it).
    corrupt = tmp_path / "corrupt"
    corrupt.write_bytes(b"not a shared library")
    os.replace(corrupt, lib)
    # A fresh process (this one keeps the old library mapped) finds the corrupt file and rebuilds it.
    code = "from bame import native; assert native.available(), native.unavailable_reason()"
    env = {**os.environ, "BAME_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert lib.stat().st_size > 1000  # rebuilt in place
    _, mask, p, x, _ = case(8, 32, 1, 4, 3, padded=False)
    assert_close(fwd_native(x, p), F.linear(x, unpack(p)))


# -- top-N masks --------------------------------------------------------------------------------------
def _stable_topn(blocks: Tensor, n: int) -> Tensor:
    """Reference: a stable descending sort of every ``(K, M)`` block (NaN largest), the first n kept."""
    order = torch.sort(blocks, dim=-1, descending=True, stable=True).indices
    return torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, order[:, :n], True)


def _awkward_scores(k: int, m: int, seed: int) -> Tensor:
    """Few distinct values (many ties), with NaN, +-inf and -0.0 sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(-2, 3, (k, m), generator=g).float()
    u = torch.rand(k, m, generator=g)
    s[u < 0.04] = float("nan")
    s[(u >= 0.04) & (u < 0.08)] = float("inf")
    s[(u >= 0.08) & (u < 0.12)] = -float("inf")
    s[(u >= 0.12) & (u < 0.2)] = -0.0
    return s


@needs_cc
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8, 16, 32])
@pytest.mark.parametrize("magnitude", [False, True])
def test_native_topn_equals_stable_sort(m: int, magnitude: bool) -> None:
    k = 2 * 256 + 37  # more than one tile of blocks, and a partial one
    s = _awkward_scores(k, m, seed=m)
    ranked = s.abs() if magnitude else s
    for n in range(m + 1):
        expected = _stable_topn(ranked, n)
        got = native.topn_mask(s.view(k, m, 1), n, magnitude)  # blocks of M consecutive scores
        assert torch.equal(got.view(k, m), expected), (n, "blocks")
        grouped = s.view(k // 1, m).t().reshape(1, m, k).contiguous()  # one group, R = k columns
        assert torch.equal(native.topn_mask(grouped, n, magnitude).view(m, k).t(), expected), (n, "R = k")


@needs_cc
@pytest.mark.parametrize("nm", [(2, 4), (1, 16), (3, 8)])
def test_grouped_topn_dispatches_to_native_and_matches(nm: tuple[int, int], monkeypatch) -> None:
    from bame import nm as nm_mod

    n, m = nm
    w = _awkward_scores(m * 64, 600, seed=n).view(64, m, 600)  # (G, M, R): 64 groups of M rows
    assert w.numel() >= native.MIN_NUMEL  # big enough to take the native kernel
    calls = []
    monkeypatch.setattr(native, "topn_mask", lambda *a, **kw: calls.append(1) or _real_topn(*a, **kw))
    got = nm_mod.topn_mask_grouped(w, n)
    flat = nm_mod.topn_mask(w.movedim(1, -1).reshape(-1, m), n)  # (K, M) blocks, also native
    assert len(calls) == 2
    expected = _stable_topn(w.movedim(1, -1).reshape(-1, m), n)
    assert torch.equal(flat, expected)
    assert torch.equal(got.movedim(1, -1).reshape(-1, m), expected)
    magn = nm_mod.topn_mask(w.movedim(1, -1).reshape(-1, m), n, magnitude=True)
    assert torch.equal(magn, _stable_topn(w.movedim(1, -1).reshape(-1, m).abs(), n))


_real_topn = native.topn_mask


@needs_cc
def test_native_topn_thread_split_is_bit_identical() -> None:
    s = torch.randn(4096, 4, 5)
    one = native.topn_mask(s, 2, threads=1)
    assert torch.equal(one, native.topn_mask(s, 2, threads=3))
    assert (one.sum(1) == 2).all()


@needs_cc
def test_native_topn_refuses_large_blocks() -> None:
    with pytest.raises(ValueError, match="M <= 32"):
        native.topn_mask(torch.zeros(2, 64, 1), 1)


# -- mask-update helpers ------------------------------------------------------------------------------
@needs_cc
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8, 16])
def test_native_block_flips_equal_a_plain_count(m: int) -> None:
    from bame import nm as nm_mod

    g = torch.Generator().manual_seed(m)
    k = max(native.MIN_NUMEL // m + 7, 10)
    a, b = torch.rand(k, m, generator=g) > 0.5, torch.rand(k, m, generator=g) > 0.5
    expected = (a != b).sum(-1).to(torch.int32)
    assert torch.equal(native.block_flips(a, b), expected)
    assert torch.equal(native.block_flips(a, b, threads=3), expected)
    got = nm_mod.block_flips(a, b)  # large enough: the dispatch takes the native kernel
    assert got.dtype == torch.int32 and torch.equal(got, expected)


@needs_cc
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (1, 16), (2, 8), (1, 2)])
def test_native_lma_proposal_equals_scores_then_top_n(nm: tuple[int, int]) -> None:
    from bame import lma

    n, m = nm
    g = torch.Generator().manual_seed(m + n)
    k = 40_000 // m + 3
    w = torch.randn(k, m, generator=g)
    grad = torch.randn(k, m, generator=g)
    old = torch.rand(k, m, generator=g) < n / m
    w[~old] = 0.0  # pruned weights are zero in the evolution phase
    grad[:50] = 0.0  # blocks of tied zero scores: the kept entries stay
    w[50:60, 0] = float("nan")
    grad[60:70] = 1.0
    w[60:70] = 0.1 * old[60:70]  # ties between kept |G W| and pruned lr G^2 = 0.1 (lr = 0.1)
    for lr in (0.1, 3e-4):
        reference = torch.zeros(k, m, dtype=torch.bool)
        keys = lma.stable_keys(lma.scores(w, grad, old, lr), old)
        order = torch.sort(keys, dim=-1, descending=True, stable=True).indices[:, :n]
        reference.scatter_(-1, order, True)
        exact = old[:50].sum(-1) == n  # zero-gradient blocks holding N kept entries keep exactly those
        assert exact.any() and torch.equal(reference[:50][exact], old[:50][exact])
        assert torch.equal(native.lma_propose(w, grad, old, n, lr), reference)
        assert torch.equal(native.lma_propose(w, grad, old, n, lr, threads=3), reference)
        assert torch.equal(lma.propose(w, grad, old, n, lr), reference)  # the dispatch


@needs_cc
@pytest.mark.parametrize("nm", [(1, 4), (2, 4), (1, 16), (3, 8)])
def test_native_lma_regrowth_statistics_equal_the_scores_reference(nm: tuple[int, int], monkeypatch) -> None:
    """The native per-block best pruned / weakest kept scores, and the statistics built on them, equal the
    ones from :func:`bame.lma.scores` (the torch path: weight-sized temporaries and torch's median)."""
    from bame import lma

    n, m = nm
    g = torch.Generator().manual_seed(7 * m + n)
    k = 40_000 // m + 5
    w, grad = torch.randn(k, m, generator=g), torch.randn(k, m, generator=g)
    old = torch.argsort(torch.rand(k, m, generator=g), dim=-1) < n  # N kept per block
    w[~old] = 0.0
    grad[:20] = 0.0  # zero scores: a ratio of 0
    grad[20:30] = 1.0
    w[20:30] = 0.1 * old[20:30]  # ties: kept |G W| = pruned lr G^2 = 0.1
    for lr in (0.1, 3e-4):
        s = lma.scores(w, grad, old, lr)
        best, weakest = native.lma_regrowth(w, grad, old, lr)
        assert torch.equal(best, torch.where(old, -math.inf, s).amax(dim=-1))
        assert torch.equal(weakest, torch.where(old, s, math.inf).amin(dim=-1))
        assert torch.equal(native.lma_regrowth(w, grad, old, lr, threads=3)[0], best)
        fast = lma.regrowth(w, grad, old, n, lr)
        with monkeypatch.context() as patch:
            patch.setattr(native, "ready", lambda *a, **kw: False)
            assert lma.regrowth(w, grad, old, n, lr) == fast
    grad[30, 0] = grad[31, -1] = float("nan")  # a NaN score makes its block's statistics NaN, as torch's do
    grad[32, :] = float("inf")
    s = lma.scores(w, grad, old, 0.1)
    best, weakest = native.lma_regrowth(w, grad, old, 0.1)
    exact = dict(rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(best, torch.where(old, -math.inf, s).amax(dim=-1), **exact)
    torch.testing.assert_close(weakest, torch.where(old, s, math.inf).amin(dim=-1), **exact)
    assert best[30:32].isnan().any() or weakest[30:32].isnan().any()


@needs_cc
@pytest.mark.parametrize("kind", ["ties", "spread", "signed_zeros_and_infinities"])
def test_native_kth_smallest_equals_kthvalue(kind: str) -> None:
    g = torch.Generator().manual_seed(len(kind))
    if kind == "ties":
        v = torch.randint(0, 4, (5000,), generator=g).float()  # long runs of equal values (osc early on)
    elif kind == "spread":
        v = torch.randn(5000, generator=g) * torch.logspace(-30, 30, 5000)
    else:
        v = torch.randint(-2, 3, (5000,), generator=g).float()
        v[v == 0] = torch.tensor([0.0, -0.0]).repeat(2500)[: int((v == 0).sum())]
        v[:7] = float("inf")
        v[7:11] = -float("inf")
    for k in [0, 1, 2, 17, 2499, 2500, 4998, 4999] + torch.randint(0, 5000, (20,), generator=g).tolist():
        assert native.kth_smallest(v, k) == torch.kthvalue(v, k + 1).values.item(), k


@needs_cc
def test_obf_rank_threshold_takes_the_native_select_and_agrees() -> None:
    from bame import obf

    g = torch.Generator().manual_seed(3)
    v = torch.randint(0, 50, (native.MIN_NUMEL + 11,), generator=g).float() / 7
    for fraction in (0.0, 0.001, 0.3, 0.5, 1.0):
        k, rank = v.numel(), int(fraction * v.numel())
        expected = v > torch.kthvalue(v, k - rank + 1).values if rank else torch.zeros(k, dtype=torch.bool)
        assert torch.equal(obf.above_kth_largest(v, fraction), expected), fraction
    v[5] = float("nan")  # NaN: the PyTorch path decides (as before)
    threshold = torch.kthvalue(v, v.numel() - int(0.3 * v.numel()) + 1).values
    assert torch.equal(obf.above_kth_largest(v, 0.3), v > threshold)


@needs_cc
def test_native_srste_decay_is_bitwise_the_torch_expression() -> None:
    g = torch.Generator().manual_seed(5)
    grad = torch.randn(300, 130, generator=g)
    grad[0, :8] = -0.0  # -0.0 + 0.0 is +0.0 in both
    w = torch.randn(300, 130, generator=g) * 1e3
    w[1, :4] = float("inf")  # inf * 0 = NaN where kept, in both
    mask = torch.rand(300, 130, generator=g) < 0.25
    expected = grad.clone().addcmul_(w, torch.sub(1.0, mask.float()), value=2e-4)
    for threads in (1, 3):
        got = grad.clone()
        native.srste_decay_(got, w, mask, 2e-4, threads=threads)
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32))  # bit for bit, NaN included


@needs_cc
def test_sr_ste_decay_takes_the_native_kernel_on_large_layers(monkeypatch) -> None:
    import bame
    from bame.methods.sr_ste import add_sr_ste_decay

    model = torch.nn.Sequential(torch.nn.Linear(512, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = bame.sparsify(model, opt, "sr_ste", "2:4", verbose=False)
    layer = sp.layers[0]
    grad = torch.randn(128, 512)
    expected = grad.clone().addcmul_(layer.weight.detach(), torch.sub(1.0, layer.mask.float()), value=2e-4)
    calls = []
    monkeypatch.setattr(native, "srste_decay_", lambda *a, **k: calls.append(1) or _real_decay(*a, **k))
    add_sr_ste_decay(grad, layer, 2e-4)
    assert calls and torch.equal(grad, expected)


_real_decay = native.srste_decay_


def test_the_kernels_run_on_torchs_openmp_team_when_another_runtime_is_loaded_first():
    """scikit-learn (the digits data set) loads its own libgomp before bame's first kernel: the kernels must
    still take torch's team, not that one (two teams of spinning workers made a whole step 2x slower)."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch computes on another parallel backend")
    pytest.importorskip("sklearn")
    code = (
        "import ctypes, os, sklearn.datasets, torch\n"
        "from bame import native\n"
        "maps = {l.split()[-1] for l in open('/proc/self/maps') if 'gomp' in l.rsplit('/', 1)[-1]}\n"
        "home = os.path.dirname(torch.__file__) + os.sep\n"
        "theirs = [p for p in maps if not p.startswith(home)]\n"
        "ours = [ctypes.cast(ctypes.CDLL(p).GOMP_parallel, ctypes.c_void_p).value\n"
        "        for p in maps if p.startswith(home)]\n"
        "print(len(theirs) > 0, native._omp_parallel() in ours if ours else None)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    another_loaded, ours = out.stdout.split()
    if ours == "None" or another_loaded != "True":
        pytest.skip("torch's libgomp is not in its package directory here, or scikit-learn loads none")
    assert ours == "True", out.stdout
