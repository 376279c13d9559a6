"""Tests for the baselines in bame.methods: SR-STE, Bi-Mask, ASP, RigL-NM, LBC and MaxQ.

Each method's defining behaviour is checked on a tiny hand-made case with a hand-computed answer; then
every method trains a tiny CNN and a tiny transformer-style MLP at 2:4, 1:4 and 1:16, checking the N:M
invariant each step once the mask is final, exact resume from a mid-run state, and ``squash``.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bame
from bame import methods
from bame.errors import ConfigError
from bame.flops import hardware
from bame.methods.bi_mask import best_permutation, permutation_score, random_permutations
from bame.methods.lbc import alpha_grad, candidate_matrix, cardinality, remove_smallest
from bame.methods.maxq import axis_soft, dense_share, incremental_mask, mask_values, soft_scores
from bame.methods.rigl_nm import drop_fraction, every_block_rule, fraction_rule
from bame.nm import backward_mask, is_nm, to_blocks, topn_mask

MINE = ("sr_ste", "asp", "rigl_nm", "bi_mask", "lbc", "maxq")
ALL = lambda name, module: True  # noqa: E731  (layer filter: make every layer sparse, head included)


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one intra-op thread is ~30x faster than OpenMP on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def linear(weight: list[list[float]], bias: bool = False) -> nn.Linear:
    w = torch.tensor(weight)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias)
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer


def both(charge) -> tuple[float, ...]:
    """A charge under both rules: ``(fwd, dx, dw)`` of rule "paper", then of rule "nm-hardware"."""
    return (charge.fwd, charge.dx, charge.dw, *hardware(charge))


def sgd(model: nn.Module, lr: float = 0.1, **kw) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, **kw)


def step_with_grad(sp, opt, grads: list[torch.Tensor]) -> None:
    """One optimizer step with hand-made gradients of the sparse layers' raw weights."""
    opt.zero_grad()
    for layer, g in zip(sp.layers, grads, strict=True):
        layer.weight.grad = g.clone().reshape(layer.shape)
    opt.step()


# ------------------------------------------------------------------------------------------ registry
def test_every_method_is_registered_with_its_papers_defaults():
    avail = methods.available()
    assert set(MINE) <= set(avail)
    defaults = {
        "sr_ste": {"lambda_w": 2e-4},
        "bi_mask": {"lambda_w": 2e-4, "perm_interval": 100, "candidates": 10},
        "asp": {"prune_at": 0.5, "layer_policy": "bame"},
        "rigl_nm": {"alpha": 0.3, "mode": "fraction", "delta_t": 100, "t_i": 1 / 3, "t_f": 2 / 3},
        "lbc": {"t_i": 0, "t_f": 0.5, "exponent": 3.0, "granularity": "epoch", "momentum": 0.9,
                "alpha_weight_decay": None},
        "maxq": {"decay_start": 0, "decay_end": 0.25, "schedule": "linear", "incremental": "blocks",
                 "tau": 0.01, "lambda_w": 2e-4, "granularity": "epoch"},
    }
    for name, expected in defaults.items():
        cls = methods.get(name)
        opts = vars(cls.make_options())
        assert {k: opts[k] for k in expected} == expected, name
        assert cls.paper and cls.description and cls.backward_note
    assert methods.get("asp").schedule_factor == 2.0
    assert all(methods.get(n).schedule_factor == 1.0 for n in MINE if n != "asp")
    with pytest.raises(ConfigError, match="no option"):
        methods.get("sr_ste").make_options(lambda_x=1.0)


# ------------------------------------------------------------------------------------------ SR-STE
def test_sr_ste_gradient_is_dense_plus_decay_exactly():
    model = linear([[1.0, -3.0, 0.5, 2.0]])
    opt = sgd(model, lr=1.0)
    sp = bame.sparsify(model, opt, "sr_ste", "2:4", layer_filter=ALL, verbose=False)
    layer = sp.layers[0]
    assert layer.mask.tolist() == [[False, True, False, True]]  # top-2 |W|: 3 and 2
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(layer.weight.grad.clone()))  # after bame's hook
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    model(x).sum().backward()  # G = dL/d(W*B) = x, dense (straight-through)
    w, b = layer.weight.detach().clone(), layer.mask.float()
    opt.step()
    g = x
    assert torch.equal(seen[0], g + 2e-4 * (1 - b) * w)
    expected = torch.tensor([[1.0 + 2e-4 * 1.0, 2.0, 3.0 + 2e-4 * 0.5, 4.0]])
    assert torch.allclose(seen[0], expected, rtol=1e-7, atol=0)
    # Pruned weights are never zeroed, and the mask is top-N |W| again before the next forward:
    # W - grad = [-0.0002, -5, -2.5001, -2] -> keep positions 1 and 2.
    assert layer.weight[0, 0].item() != 0.0
    assert layer.mask.tolist() == [[False, True, True, False]]


def test_sr_ste_decay_is_added_once_per_optimizer_step():
    model = linear([[1.0, -3.0, 0.5, 2.0]])
    opt = sgd(model)
    sp = bame.sparsify(model, opt, "sr_ste", "2:4", layer_filter=ALL, verbose=False)
    layer = sp.layers[0]
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(layer.weight.grad.clone()))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    for _ in range(2):  # gradient accumulation: two backward passes, one step
        model(x).sum().backward()
    w, b = layer.weight.detach().clone(), layer.mask.float()
    opt.step()
    assert torch.equal(seen[0], 2 * x + 2e-4 * (1 - b) * w)
    assert both(sp.method.charge(0, layer)) == (0.5, 1.0, 1.0, 0.5, 1.0, 1.0)


# ------------------------------------------------------------------------------------------ RigL-NM
W_RIGL = [[0.5, 0.2, 0.0, 0.0, 0.0, 0.8, 0.0, 0.3]]  # 2 blocks of 4 at 2:4: keeps {0, 1} and {1, 3}
G_RIGL = [[0.0, 0.0, 0.3, 0.1, 0.2, 0.0, 0.05, 0.0]]


def test_rigl_nm_swaps_exactly_the_expected_pair():
    model = linear(W_RIGL)
    opt = sgd(model, lr=0.1)
    sp = bame.sparsify(model, opt, "rigl_nm", "2:4", total_steps=10, t_i=0, t_f=10, delta_t=1,
                       layer_filter=ALL, verbose=False)
    layer = sp.layers[0]
    assert layer.mask.int().tolist() == [[1, 1, 0, 0, 0, 1, 0, 1]]
    # f = 0.3 at t = t_i, n = floor(0.3 * K * N) = floor(1.2) = 1: the smallest kept |W| layer-wide is
    # 0.2 (block 0, position 1); block 0 regrows the largest |G| among {1, 2, 3}: position 2 (0.3).
    step_with_grad(sp, opt, [torch.tensor(G_RIGL)])
    assert layer.mask.int().tolist() == [[1, 0, 1, 0, 0, 1, 0, 1]]
    w = layer.weight.detach()[0]
    assert w[1].item() == 0.0  # dropped: zeroed, gradient masked
    assert w[2].item() == pytest.approx(-0.1 * 0.3)  # regrown at 0, then one step of -lr*G
    assert w[5].item() == pytest.approx(0.8) and w[0].item() == pytest.approx(0.5)


def test_rigl_nm_pure_rules():
    w, g = torch.tensor(W_RIGL).view(2, 4), torch.tensor(G_RIGL).view(2, 4)
    old = topn_mask(w.abs(), 2)
    assert fraction_rule(w, g, old, 2, 0.3).int().tolist() == [[1, 0, 1, 0], [0, 1, 0, 1]]
    # A dropped weight whose |G| beats every pruned one in its block wins its place back: no change.
    g_back = g.clone()
    g_back[0, 1] = 0.5
    assert torch.equal(fraction_rule(w, g_back, old, 2, 0.3), old)
    # f small enough that n = 0: nothing happens.
    assert torch.equal(fraction_rule(w, g, old, 2, 0.2), old)
    # every_block: block 0 swaps 1 -> 2 (|G| 0.3 > 0); block 1 swaps 3 -> 0 (|G| 0.2 > 0).
    assert every_block_rule(w, g, old).int().tolist() == [[1, 0, 1, 0], [1, 1, 0, 0]]
    assert drop_fraction(10, 10, 20, 0.3) == pytest.approx(0.3)
    assert drop_fraction(15, 10, 20, 0.3) == pytest.approx(0.15)
    assert drop_fraction(20, 10, 20, 0.3) == pytest.approx(0.0)
    # Per-block cap min(N, M-N) = 1 at 3:4: at most one swap per block even with many drops.
    w3 = torch.tensor([[4.0, 3.0, 2.0, 0.0], [4.0, 3.0, 1.0, 0.0]])
    g3 = torch.tensor([[0.0, 0.0, 0.0, 9.0], [0.0, 0.0, 0.0, 9.0]])
    new = fraction_rule(w3, g3, topn_mask(w3.abs(), 3), 3, 1.0)
    assert new.int().tolist() == [[1, 1, 0, 1], [1, 1, 0, 1]]


# ------------------------------------------------------------------------------------------ LBC
def test_lbc_cubic_cardinality_hand_values():
    cards = [cardinality(e, 6, 0, 10) for e in range(12)]
    assert cards == [6, 5, 4, 3, 3, 2, 2, 2, 2, 2, 1, 1]
    assert cardinality(-3, 6, 0, 10) == 6  # clamped before t_i (the reference's topk crashes)
    p = candidate_matrix(2, 4)
    assert p.int().tolist() == [
        [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]
    ]


def test_lbc_alpha_gradient_and_removal_by_signed_score():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    g = torch.tensor([[0.5, -1.0, 2.0, 0.25]])  # G*W = [0.5, -2, 6, 1]
    p = candidate_matrix(2, 4)
    alive = torch.ones(1, 6, dtype=torch.bool)
    expected = [-1.5, 6.5, 1.5, 4.0, -1.0, 7.0]  # (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
    assert alpha_grad(w, g, alive, p).tolist() == [expected]
    alive[0, 5] = False
    assert alpha_grad(w, g, alive, p).tolist() == [expected[:5] + [0.0]]
    # The smallest *signed* alpha goes first; ties go to the lower candidate index.
    every = torch.ones(1, 3, dtype=torch.bool)
    assert remove_smallest(torch.tensor([[-0.5, 0.1, 0.3]]), every, 1).tolist() == [[False, True, True]]
    assert remove_smallest(torch.tensor([[0.2, 0.1, 0.1]]), every, 1).tolist() == [[True, False, True]]


def test_lbc_trains_alpha_by_internal_sgd_and_removes_on_schedule():
    model = linear([[1.0, 2.0, 3.0, 4.0]])
    opt = sgd(model, lr=0.1, momentum=0.9, weight_decay=0.01)
    sp = bame.sparsify(model, opt, "lbc", "2:4", total_steps=20, layer_filter=ALL, verbose=False)
    layer = sp.layers[0]
    a0 = 1 / 3  # 1 / C(3, 1)
    assert torch.equal(layer.state("alpha"), torch.full((1, 6), a0))
    step_with_grad(sp, opt, [torch.tensor([0.5, -1.0, 2.0, 0.25])])
    ga = torch.tensor([[-1.5, 6.5, 1.5, 4.0, -1.0, 7.0]])
    # First SGD step: buf = ga + wd*alpha; alpha -= lr*buf. Then prepare(1): card(1) = 5, so the smallest
    # signed alpha (candidate 5, the largest gradient) is removed and zeroed with its momentum.
    want = a0 - 0.1 * (ga + 0.01 * a0)
    want[0, 5] = 0.0
    assert torch.allclose(layer.state("alpha"), want, rtol=1e-6, atol=1e-7)
    assert layer.state("alive").tolist() == [[True] * 5 + [False]]
    assert layer.state("alpha_momentum")[0, 5].item() == 0.0
    assert layer.mask.all()  # every position still covered by an alive candidate
    # Cardinality per block follows the cubic schedule (t_f = T/2 = 10), the mask is N:M from t_f on.
    cards = [cardinality(t, 6, 0, 10) for t in range(20)]
    gen = torch.Generator().manual_seed(0)
    for t in range(1, 20):
        assert int(layer.state("alive").sum()) == cards[t]
        assert sp.method.mask_is_final(t) == (t >= 10)
        if t >= 10:
            assert is_nm(layer.mask, 2, 4)
        covered = layer.mask
        assert (layer.weight.detach()[~covered] == 0).all()  # uncovered weights are zeroed
        step_with_grad(sp, opt, [torch.randn(4, generator=gen)])


def test_lbc_epoch_granular_schedule_and_errors():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    opt = sgd(model)
    sp = bame.sparsify(model, opt, "lbc", "1:4", total_steps=20, steps_per_epoch=2, verbose=False)
    # t_f = 10 steps = epoch 5; C = 4: card(e) = 1 + ceil(3 (1 - e/5)^3)
    #   e = 0: 4; 1: 1 + ceil(1.536) = 3; 2: 1 + ceil(0.648) = 2; 3: 2; 4: 2; 5: 1
    assert [sp.method.card(t) for t in range(12)] == [4, 4, 3, 3, 2, 2, 2, 2, 2, 2, 1, 1]
    per_iteration = methods.get("lbc")(methods.get("lbc").make_options(granularity="iteration"), n=1, m=4,
                                       total_steps=20, seed=0, steps_per_epoch=2)
    assert [per_iteration.card(t) for t in (1, 2, 3)] == [cardinality(t, 4, 0, 10) for t in (1, 2, 3)]
    with pytest.raises(ConfigError, match="12870"):
        bame.sparsify(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 2)), opt, "lbc", "8:16", total_steps=10)
    with pytest.warns(UserWarning, match="floats per weight"):
        methods.get("lbc")(methods.get("lbc").make_options(), n=4, m=16, total_steps=10, seed=0)
    with pytest.raises(ConfigError, match="t_f > t_i"):
        methods.get("lbc")(methods.get("lbc").make_options(t_f=0), n=2, m=4, total_steps=10, seed=0)


def test_lbc_charges_the_measured_covered_fraction():
    model = linear([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    opt = sgd(model)
    sp = bame.sparsify(model, opt, "lbc", "1:4", total_steps=4, t_f=2, layer_filter=ALL, verbose=False)
    layer = sp.layers[0]
    assert both(sp.method.charge(0, layer)) == (1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    step_with_grad(sp, opt, [torch.zeros(2, 4)])  # card(1) = 1 + ceil(3/8) = 2: 2 of 4 positions per block
    d = layer.density()
    assert d == 0.5
    assert both(sp.method.charge(1, layer)) == (d, d, d, 1.0, 1.0, d)


# ------------------------------------------------------------------------------------------ Bi-Mask
def test_bi_mask_permutation_search_picks_the_hand_computed_best():
    # 1:2, weight [4 out, 2 in]; the forward mask keeps column 0 in rows 0, 1 and column 1 in rows 2, 3.
    w = torch.tensor([[4.0, 1.0], [3.0, 2.0], [1.0, 3.0], [2.0, 4.0]])
    b = torch.tensor([[True, False], [True, False], [False, True], [False, True]])
    swap_pairs = torch.tensor([1, 0, 3, 2])  # same output groups {0,1}, {2,3}: 2 of 4 forward-kept survive
    interleave = torch.tensor([0, 2, 1, 3])  # groups {0,2}, {1,3}: all 4 survive
    other = torch.tensor([0, 3, 1, 2])  # groups {0,3}, {1,2}: all 4 survive too (a tie)
    assert [permutation_score(w, b, 1, 2, p) for p in (swap_pairs, interleave, other)] == [2, 4, 4]
    best, score = best_permutation(w, b, 1, 2, [swap_pairs, interleave, other])
    assert torch.equal(best, interleave) and score == 4  # strict >: the earlier of the tied ones
    bwd = backward_mask(w, b, 1, 2, interleave)
    assert torch.equal(bwd, b)


def test_bi_mask_backward_mask_is_nm_on_outputs_subset_and_seeded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    opt = sgd(model)
    sp = bame.sparsify(model, opt, "bi_mask", "2:4", perm_interval=3, seed=7, verbose=False)
    layer = sp.layers[0]
    bwd, perm = layer.par.bwd_mask, layer.state("perm")
    # N:M along the *permuted* outputs (the kernel reorders dY's columns by perm), a subset of B_f.
    assert is_nm(bwd[perm], 2, 4, "out", exact=False) and not (bwd & ~layer.mask).any()
    # The search at t = 0 drew its candidates from the method's own CPU generator seeded with `seed`.
    w0 = layer.weight.detach()
    gen = torch.Generator().manual_seed(7)
    cands = random_permutations(8, 10, gen)
    best, _ = best_permutation(w0, topn_mask(to_blocks(w0.abs(), 4), 2).view(8, 8), 2, 4, cands)
    assert torch.equal(layer.state("perm"), best)
    assert torch.equal(bwd, backward_mask(w0, layer.mask, 2, 4, best))
    # The input gradient flows through W * B_bwd; the weight gradient stays dense.
    x = torch.randn(3, 8, requires_grad=True)
    layer.module(x).sum().backward()
    assert torch.allclose(x.grad, torch.ones(3, 8) @ (w0 * bwd))
    assert torch.allclose(layer.weight.grad, torch.ones(3, 8).t() @ x.detach())
    # The generator advances only on search iterations (t % 3 == 0).
    states = [sp.method.generator.get_state()]
    for _t in range(6):
        opt.zero_grad()
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
        states.append(sp.method.generator.get_state())
    changed = [not torch.equal(states[i], states[i + 1]) for i in range(6)]
    assert changed == [False, False, True, False, False, True]  # searches before t = 3 and t = 6


def test_bi_mask_identity_is_never_a_candidate_and_indivisible_outputs_skip():
    gen = torch.Generator().manual_seed(0)
    assert all(p.tolist() == [1, 0] for p in random_permutations(2, 5, gen))
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 2))
    sp = bame.sparsify(model, sgd(model), "bi_mask", "2:4", verbose=False)
    layer = sp.layers[0]
    assert layer.par.bwd_mask is None and "not divisible" in layer.bwd_note
    assert both(sp.method.charge(0, layer)) == (0.5, 1.0, 1.0, 0.5, 1.0, 1.0)


# ------------------------------------------------------------------------------------------ ASP
def test_asp_prunes_once_at_the_right_step_by_magnitude():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    captured = {}
    opt = sgd(model, lr=0.1, momentum=0.9, weight_decay=1e-2)
    layer_w = model[0].weight
    # Registered before the sparsifier's hook, so it sees the weights just before the prune.
    opt.register_step_post_hook(lambda o, a, k: captured.__setitem__("w", layer_w.detach().clone()))
    sp = bame.sparsify(model, opt, "asp", "2:4", total_steps=20, verbose=False)
    layer = sp.layers[0]
    assert sp.method.prune_step == 10 and sp.method.restart_steps() == [10]
    gen = torch.Generator().manual_seed(1)
    for t in range(20):
        if t in sp.method.restart_steps():  # what the engine does: a fresh optimizer and schedule
            opt = sgd(model, lr=0.1, momentum=0.9, weight_decay=1e-2)
            sp.bind(opt)
        if t < 10:
            assert layer.mask.all() and both(sp.method.charge(t, layer)) == (1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
        else:
            assert both(sp.method.charge(t, layer)) == (0.5, 0.5, 0.5, 0.5, 1.0, 0.5)
        assert sp.method.mask_is_final(t) == (t >= 10)
        opt.zero_grad()
        model(torch.randn(4, 8, generator=gen)).pow(2).sum().backward()
        opt.step()
        if t == 9:
            expected = topn_mask(to_blocks(captured["w"].abs(), 4), 2).view(8, 8)
            assert torch.equal(layer.mask, expected)
            mask_at_prune = layer.mask.clone()
        if t >= 9:  # pruned weights are exactly zero, even with momentum and weight decay
            assert torch.equal(layer.mask, mask_at_prune)
            assert (layer.weight.detach()[~layer.mask] == 0).all()
    assert sp.method.mask_may_change(9) and not sp.method.mask_may_change(10)


def test_asp_options_and_reference_layer_policy():
    make = methods.get("asp")
    assert make(make.make_options(prune_at=7), n=2, m=4, total_steps=None, seed=0).restart_steps() == [7]
    with pytest.raises(ConfigError, match="total_steps"):
        make(make.make_options(), n=2, m=4, total_steps=None, seed=0)
    with pytest.raises(ConfigError, match="no fine-tuning"):
        make(make.make_options(prune_at=10), n=2, m=4, total_steps=10, seed=0)

    def model():
        return nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(8, 8))

    m = model()
    default = bame.sparsify(m, sgd(m), "asp", "2:4", total_steps=10, verbose=False)
    assert [layer.name for layer in default.layers] == ["0.weight", "1.weight"]  # head dense
    m = model()
    ref = bame.sparsify(m, sgd(m), "asp", "2:4", total_steps=10, layer_policy="reference", verbose=False)
    # apex: dim0 % 8 == 0 and dim1 % 16 == 0, so the 8x16 layer is pruned and the 8x8 head is not.
    assert [layer.name for layer in ref.layers] == ["0.weight", "1.weight"]
    assert "2.weight" in ref.dense_layers
    m = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 8))
    ref = bame.sparsify(m, sgd(m), "asp", "2:4", total_steps=10, layer_policy="reference", verbose=False)
    assert [layer.name for layer in ref.layers] == ["0.weight", "1.weight"]  # the 8x16 head is pruned too


# ------------------------------------------------------------------------------------------ MaxQ
def _axis_soft_loop(x: torch.Tensor, n: int, m: int, tau: float) -> torch.Tensor:
    """An independent, row-by-row reading of MaxQ's axis score."""
    out = torch.zeros_like(x)
    for i, row in enumerate(x):
        n_prune = int((m - n) / m * len(row))
        s = sorted(row.tolist())
        thr = (s[n_prune - 1] + s[n_prune]) / 2
        keep = torch.argsort(row, stable=True)[n_prune:]
        out[i, keep] = torch.sigmoid((row[keep] - thr) / tau)
    return out


def test_maxq_soft_scores_match_the_formula():
    s = axis_soft(torch.tensor([[0.1, 0.4, 0.3, 0.2]]), 2, 4, 0.01)
    # n_prune = 2, thr = (0.2 + 0.3) / 2 = 0.25; kept 0.4 and 0.3
    expected = torch.tensor([[0.0, torch.sigmoid(torch.tensor(15.0)), torch.sigmoid(torch.tensor(5.0)), 0.0]])
    assert torch.allclose(s, expected, atol=1e-5)
    assert torch.equal(axis_soft(torch.rand(3, 1), 2, 4, 0.01), torch.ones(3, 1))  # n_prune = 0 guard
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 8, 3, 3, generator=gen) * 0.05
    a = w.abs()
    s_f = _axis_soft_loop(a.reshape(4, -1), 2, 4, 0.01).reshape(a.shape)
    by_position = a.permute(2, 3, 0, 1).reshape(9, 32)  # rows: kernel positions, across out*cin
    s_k = _axis_soft_loop(by_position, 2, 4, 0.01).reshape(3, 3, 4, 8).permute(2, 3, 0, 1)
    got_f, got_k = soft_scores(w, 2, 4, 0.01)
    assert torch.allclose(got_f, s_f, atol=1e-6) and torch.allclose(got_k, s_k, atol=1e-6)
    w1 = torch.randn(4, 8, 1, 1, generator=gen)  # 1x1: filter axis only
    s_f1 = _axis_soft_loop(w1.abs().reshape(4, 8), 2, 4, 0.01).view(w1.shape)
    got_f1, got_k1 = soft_scores(w1, 2, 4, 0.01)
    assert torch.allclose(got_f1, s_f1, atol=1e-6) and got_k1 is None


def test_maxq_mask_values_add_in_the_reference_codes_order():
    """``mask_local * (1 + mask_filter + mask_position)`` in MaxQ's code is ``(1 + s_f) + s_k``: with
    s_f = s_k = 2^-24 (half an ulp of 1.0 each) that is 1 + 2^-24 -> 1 (ties to even), then 1 again; the
    other order adds them first, 2^-23, and gives 1 + 2^-23."""
    hard = torch.tensor([1.0, 0.0, 1.0])
    tiny = torch.full((3,), 2.0**-24)
    assert mask_values(hard, tiny, tiny).tolist() == [1.0, 0.0, 1.0]
    assert (hard * (1 + (tiny + tiny))).tolist() == [1 + 2.0**-23, 0.0, 1 + 2.0**-23]  # the order it replaced
    assert mask_values(hard, torch.tensor([0.5, 0.5, 0.25]), None).tolist() == [1.5, 0.0, 1.25]  # 1x1 / Linear


def test_maxq_evaluates_with_the_mask_of_the_epoch_just_trained():
    """MaxQ's code validates epoch e with the mask recomputed at p(e) from the trained weights; the next
    epoch's training uses p(e+1). Epochs of 2 steps, window [0, 4) iterations = 2 epochs: p = 1, 0.5, 0, 0
    (8 blocks: 8, 4, 0 dense), weights fixed (lr 0) so the masks are known by hand."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1.0, 33.0).view(4, 8))  # block L1 grows with the block index
    opt = sgd(model, lr=0.0)
    sp = bame.sparsify(model, opt, "maxq", "2:4", total_steps=8, steps_per_epoch=2, decay_end=4, layer_filter=ALL,
                       lambda_w=0.0, verbose=False)
    layer = sp.layers[0]

    def dense_blocks() -> tuple[int, int]:
        seen = []
        for train in (True, False):
            model.train(train)
            blocks = to_blocks(model[0].weight.detach() != 0, 4).sum(-1)  # (8,) kept per block
            assert bool(((blocks == 4) | (blocks == 2)).all())
            seen.append(int((blocks == 4).sum()))
        model.train()
        return seen[0], seen[1]

    expected = {1: (8, 8), 2: (4, 8), 3: (4, 4), 4: (0, 4), 5: (0, 0), 8: (0, 0)}  # step: (train, eval)
    for _ in range(8):
        opt.zero_grad()
        model(torch.ones(1, 8)).sum().backward()
        opt.step()
        if sp.step_count in expected:
            assert dense_blocks() == expected[sp.step_count], sp.step_count
    assert int(to_blocks(layer.mask, 4).sum(-1).eq(2).sum()) == 8  # the final mask, the one saved: all N:M


def test_maxq_mask_values_and_gradient_on_a_tiny_layer():
    model = linear([[0.1, -0.4, 0.3, 0.2]])
    opt = sgd(model)
    sp = bame.sparsify(model, opt, "maxq", "2:4", total_steps=10, decay_end=0, layer_filter=ALL,
                       verbose=False)
    layer = sp.layers[0]
    sig = torch.sigmoid(torch.tensor([15.0, 5.0]))
    values = torch.tensor([[0.0, 1 + sig[0], 1 + sig[1], 0.0]])
    assert torch.allclose(layer.par.scale, values, atol=1e-6)
    assert torch.allclose(model.weight, layer.weight.detach() * values)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(layer.weight.grad.clone()))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    model(x).sum().backward()
    w = layer.weight.detach().clone()
    opt.step()
    # straight-through: G = x, not scaled by the soft mask; plus 2e-4 * (1 - B) * W with B = [0, 1, 1, 0]
    assert torch.equal(seen[0], x + 2e-4 * (1 - torch.tensor([[0.0, 1.0, 1.0, 0.0]])) * w)


def test_maxq_dense_block_share_follows_the_schedule():
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(16, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4, 16, generator=gen))
    model = nn.Sequential(layer)
    opt = sgd(model, lr=0.0)  # weights fixed: only the schedule moves
    sp = bame.sparsify(model, opt, "maxq", "2:4", total_steps=40, layer_filter=ALL, verbose=False)
    sl = sp.layers[0]
    l1 = to_blocks(sl.weight.detach().abs(), 4).sum(-1)  # (16,)
    for t in range(12):
        p = max(0.0, 1 - t / 10)  # linear over [0, T/4) = [0, 10)
        assert sp.method.share(t) == pytest.approx(p)
        counts = to_blocks(sl.mask, 4).sum(-1)
        dense = counts == 4
        assert int(dense.sum()) == math.floor(p * 16) and bool(((counts == 2) | dense).all())
        if dense.any() and not dense.all():  # the smallest-L1 blocks stay dense
            assert l1[dense].max() <= l1[~dense].min()
        d = (math.floor(p * 16) + (16 - math.floor(p * 16)) * 0.5) / 16
        assert both(sp.method.charge(t, sl)) == (d, d, 1.0, d, 1.0, 1.0)
        assert sp.method.mask_is_final(t) == (t >= 10)
        opt.zero_grad()
        model(torch.randn(2, 16, generator=gen)).sum().backward()
        opt.step()


def test_maxq_schedules_and_options():
    assert [dense_share(e, 0, 4, "linear") for e in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert [dense_share(e, 0, 2, "cubic") for e in range(3)] == [1.0, 0.125, 0.0]
    assert dense_share(1, 0, 2, "cos") == pytest.approx(math.cos(math.pi / 4))
    assert dense_share(4, 0, 5, "exp") == 0.0 and dense_share(0, 0, 5, "exp") == 1.0  # exp: 0 at t-1
    assert dense_share(0, 0, 0, "linear") == 0.0  # s = t = 0: no incremental phase
    assert dense_share(2, 3, 6, "linear") == 1.0
    w = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    # per_block at 1:4, p = 0.5: floor(3 * 0.5) = 1 pruned per block, 3 kept
    assert incremental_mask(w, 1, 0.5, "per_block").int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 0]]
    assert incremental_mask(w, 1, 0.5).int().tolist() == [[1, 0, 0, 0], [1, 1, 1, 1]]  # lighter block dense
    make = methods.get("maxq")
    with pytest.raises(ConfigError, match="empty window"):
        make(make.make_options(decay_start=5, decay_end=5), n=2, m=4, total_steps=10, seed=0)
    epoch = make(make.make_options(decay_end=8), n=2, m=4, total_steps=10, seed=0, steps_per_epoch=2)
    assert [epoch.share(t) for t in range(6)] == [1.0, 1.0, 0.75, 0.75, 0.5, 0.5]
    per_iteration = make(make.make_options(decay_end=8, granularity="iteration"), n=2, m=4, total_steps=10,
                         seed=0, steps_per_epoch=2)
    assert [per_iteration.share(t) for t in range(3)] == [1.0, 0.875, 0.75]


# ------------------------------------------------------------------------------------------ training
class TinyMixer(nn.Module):
    """A transformer-style block: token embedding, pre-norm residual MLP, dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, 16)
        h = self.embed(x)  # (B, T, 32)
        h = h + self.fc2(F.gelu(self.fc1(self.norm(h))))
        return self.head(h.mean(dim=1))  # (B, 4)


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),  # stem: cin=3, dense
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


MODELS = {"cnn": tiny_cnn, "mixer": TinyMixer}
T = 24
#: Every registered method that masks: registering a method is enough to be covered here.
MASKED = [name for name, cls in methods.REGISTRY.values().items() if cls.uses_masks]
SHORT = {"delta_t": 4, "perm_interval": 5}  # option values that put updates inside a 24-step run


def short_run(method: str) -> dict:
    fields = {f.name for f in dataclasses.fields(methods.get(method).Options)}
    return {k: v for k, v in SHORT.items() if k in fields}


def batch(kind: str, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + t)
    if kind == "cnn":
        return torch.randn(4, 3, 6, 6, generator=gen), torch.randint(0, 10, (4,), generator=gen)
    return torch.randn(4, 5, 16, generator=gen), torch.randint(0, 4, (4,), generator=gen)


def build(kind: str, method: str, nm: str):
    torch.manual_seed(0)
    model = MODELS[kind]()
    opt = sgd(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    sp = bame.sparsify(model, opt, method, nm, total_steps=T, verbose=False, **short_run(method))
    return model, opt, sp


def train(kind: str, model, opt, sp, start: int, stop: int, check: bool) -> tuple[list[float], object]:
    losses = []
    for t in range(start, stop):
        assert sp.step_count == t
        if t in sp.method.restart_steps():  # as the engine does for ASP's fine-tuning
            opt = sgd(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
            sp.bind(opt)
        x, y = batch(kind, t)
        loss = F.cross_entropy(model(x), y)
        assert torch.isfinite(loss)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if check and sp.method.mask_is_final(t + 1):
            check_invariants(sp)
    return losses, opt


def check_invariants(sp) -> None:
    for layer in sp.layers:
        assert is_nm(layer.mask, sp.n, sp.m, sp.group_axis), layer.name
        effective = layer.module.weight.detach()  # W*B (or W*scale): nothing outside the mask
        assert not (effective != 0)[~layer.mask].any(), layer.name
        if layer.par.bwd_mask is not None:  # N:M along the (permuted, for Bi-Mask) output axis
            perm = layer.state("perm") if "perm" in layer.state_names else slice(None)
            assert is_nm(layer.par.bwd_mask[perm], sp.n, sp.m, "out", exact=False)
            assert not (layer.par.bwd_mask & ~layer.mask).any()


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("nm", ["2:4", "1:4", "1:16"])
@pytest.mark.parametrize("method", MASKED)
def test_training_invariants_exact_resume_and_squash(method: str, nm: str, kind: str):
    model, opt, sp = build(kind, method, nm)
    assert sp.layers, "the test model must have sparse layers"
    full, opt = train(kind, model, opt, sp, 0, T, check=True)
    assert sp.method.mask_is_final(T - 1)

    # Resume: stop mid-run, save everything, rebuild from scratch (with the global RNG elsewhere, so
    # any use of it would show), load, and continue: the result must be bit-identical. Mid-schedule, and
    # after a restart (ASP's prune at 12) where there is one.
    split = max([11, *(r + 2 for r in sp.method.restart_steps())])
    model2, opt2, sp2 = build(kind, method, nm)
    head, opt2 = train(kind, model2, opt2, sp2, 0, split, check=False)
    saved = copy.deepcopy((model2.state_dict(), opt2.state_dict(), sp2.state_dict()))
    del model2, opt2, sp2
    model3, opt3, sp3 = build(kind, method, nm)
    if any(r < split for r in sp3.method.restart_steps()):  # the optimizer the saved one was re-created as
        opt3 = sgd(model3, lr=0.05, momentum=0.9, weight_decay=5e-4)
        sp3.bind(opt3)
    torch.manual_seed(12345)
    model3.load_state_dict(saved[0])
    opt3.load_state_dict(saved[1])
    sp3.load_state_dict(saved[2])
    tail, _ = train(kind, model3, opt3, sp3, split, T, check=False)
    assert head + tail == full
    for key, value in model.state_dict().items():
        assert torch.equal(value, model3.state_dict()[key]), key
    for layer, layer3 in zip(sp.layers, sp3.layers, strict=True):
        assert torch.equal(layer.mask, layer3.mask)
        for name in layer.state_names:
            assert torch.equal(layer.state(name), layer3.state(name)), name

    # squash: plain modules holding the N:M effective weights, identical outputs.
    model.eval()
    x, _ = batch(kind, 0)
    before = model(x)
    effective = {layer.name: layer.module.weight.detach().clone() for layer in sp.layers}
    sp.squash()
    after = model(x)
    assert torch.equal(before, after)
    for layer in sp.layers:
        module = layer.module
        assert type(module) in (nn.Conv2d, nn.Linear)
        assert not hasattr(module, "parametrizations")
        assert torch.equal(module.weight.detach(), effective[layer.name])
        assert is_nm(module.weight.detach() != 0, sp.n, sp.m, sp.group_axis, exact=False)
