"""The functional core (SPEC section 4): hand-computed cases and properties of the pure functions."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bame import lma, obf
from bame.errors import ConfigError
from bame.nm import (
    backward_mask,
    block_flips,
    from_blocks,
    is_nm,
    parse_nm,
    random_mask,
    to_blocks,
    topn_mask,
)
from bame.schedules import budget, gradual_budget, is_update_step, phase, resolve_step

# -- nm -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [("2:4", (2, 4)), (" 1 : 16 ", (1, 16)), ((3, 8), (3, 8))])
def test_parse_nm_valid(text, expected):
    assert parse_nm(text) == expected


@pytest.mark.parametrize("text", ["4:4", "0:4", "5:4", "2-4", "a:b", "2:4:8", "", (2,), (2.0, 4)])
def test_parse_nm_invalid(text):
    with pytest.raises(ConfigError):
        parse_nm(text)


def test_blocks_cin_layout_hand_computed():
    # w[0, c, 0, k] = 10c + k: along cin at a fixed kernel position the blocks are [0,10,20,30], [1,11,21,31]
    w = torch.tensor([[[[0.0, 1.0]], [[10.0, 11.0]], [[20.0, 21.0]], [[30.0, 31.0]]]])  # [1, 4, 1, 2]
    assert to_blocks(w, 4, "cin").tolist() == [[0, 10, 20, 30], [1, 11, 21, 31]]
    assert to_blocks(w, 4, "kflat").tolist() == [[0, 1, 10, 11], [20, 21, 30, 31]]
    assert to_blocks(w, 1 * 1, "out").shape == (8, 1)


def test_blocks_linear_along_in():
    w = torch.arange(8.0).reshape(2, 4)
    assert to_blocks(w, 2, "cin").tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert to_blocks(torch.arange(8.0).reshape(4, 2), 2, "out").tolist() == [[0, 2], [4, 6], [1, 3], [5, 7]]


@settings(max_examples=60, deadline=None)
@given(
    out=st.integers(1, 6), cin_blocks=st.integers(1, 3), k=st.sampled_from([1, 3]),
    m=st.sampled_from([2, 4, 8]), axis=st.sampled_from(["cin", "kflat", "out"]),
)
def test_blocks_round_trip(out, cin_blocks, k, m, axis):
    shape = (out * m if axis == "out" else out, cin_blocks * m, k, k)
    w = torch.randn(shape)
    blocks = to_blocks(w, m, axis)
    assert blocks.shape == (w.numel() // m, m)
    assert torch.equal(from_blocks(blocks, shape, axis), w)


def test_to_blocks_refuses_indivisible():
    with pytest.raises(ConfigError, match="not divisible"):
        to_blocks(torch.zeros(8, 3, 3, 3), 4, "cin")


def test_topn_hand_computed_and_ties_to_lower_index():
    scores = torch.tensor([[3.0, 1.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0], [0.2, 0.3, 0.3, 0.1]])
    assert topn_mask(scores, 2).tolist() == [[True, False, True, False], [True, True, False, False],
                                             [False, True, True, False]]
    assert topn_mask(scores, 1).tolist() == [[True, False, False, False], [True, False, False, False],
                                             [False, True, False, False]]


def _topn_reference(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Plain reference: a stable descending sort per block (NaN largest), keep the first n."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order[:, :n], True)


@settings(max_examples=80, deadline=None)
@given(k=st.integers(1, 40), m=st.sampled_from([1, 2, 3, 4, 8, 16]), data=st.data())
def test_topn_equals_stable_sort_with_ties_infinities_and_nans(k, m, data):
    n = data.draw(st.integers(0, m))
    # Few distinct values, so ties are common; sometimes infinities or a NaN (the fallback path).
    values = [0.0, 1.0, 2.0, -1.0] + data.draw(st.sampled_from([[], [float("inf"), -float("inf")], [float("nan")]]))
    flat = data.draw(st.lists(st.sampled_from(values), min_size=k * m, max_size=k * m))
    scores = torch.tensor(flat).view(k, m)
    assert torch.equal(topn_mask(scores, n), _topn_reference(scores, n))
    ints = scores.nan_to_num(0.0, 5.0, -5.0).to(torch.int64)  # integer scores take the same paths
    assert torch.equal(topn_mask(ints, n), _topn_reference(ints, n))


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 50), m=st.sampled_from([2, 4, 8, 16]), data=st.data())
def test_topn_keeps_exactly_n_largest(k, m, data):
    n = data.draw(st.integers(0, m))
    scores = torch.randn(k, m)
    mask = topn_mask(scores, n)
    assert (mask.sum(-1) == n).all()
    if 0 < n < m:  # every kept score >= every dropped score in its block
        kept_min = torch.where(mask, scores, torch.inf).min(-1).values
        dropped_max = torch.where(~mask, scores, -torch.inf).max(-1).values
        assert (kept_min >= dropped_max).all()


def test_random_mask_is_nm_and_seeded():
    a = random_mask(100, 4, 2, torch.Generator().manual_seed(3))
    b = random_mask(100, 4, 2, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and (a.sum(-1) == 2).all()
    assert not torch.equal(a, random_mask(100, 4, 2, torch.Generator().manual_seed(4)))


def test_backward_mask_hand_computed():
    w = torch.tensor([[1.0, -4.0], [3.0, 1.0], [0.5, 2.0], [-1.0, 0.1]])  # Linear [out=4, in=2]
    full = torch.ones_like(w, dtype=torch.bool)
    expected = [[False, True], [True, False], [False, True], [True, False]]
    assert backward_mask(w, full, 1, 2).tolist() == expected
    # with w[1, 0] pruned in the forward mask, row 0 wins its group in column 0; always a subset of B
    mask = full.clone()
    mask[1, 0] = False
    assert backward_mask(w, mask, 1, 2).tolist() == [[True, True], [False, False], [False, True], [True, False]]


def test_backward_mask_with_permutation():
    w = torch.tensor([[1.0], [3.0], [0.5], [2.0]])
    full = torch.ones_like(w, dtype=torch.bool)
    # groups over permuted rows (0, 2) and (1, 3): keep row 0 (1 > .5) and row 1 (3 > 2)
    perm = torch.tensor([0, 2, 1, 3])
    assert backward_mask(w, full, 1, 2, perm).flatten().tolist() == [True, True, False, False]


@settings(max_examples=40, deadline=None)
@given(out_groups=st.integers(1, 4), cin=st.integers(1, 5), m=st.sampled_from([2, 4]), data=st.data())
def test_backward_mask_properties(out_groups, cin, m, data):
    n = data.draw(st.integers(1, m - 1))
    w = torch.randn(out_groups * m, cin * m, 3, 3)
    mask = from_blocks(topn_mask(torch.rand(w.numel() // m, m), n), w.shape, "cin")
    bwd = backward_mask(w, mask, n, m)
    assert not (bwd & ~mask).any()  # a subset of the forward mask
    assert (to_blocks(bwd, m, "out").sum(-1) <= n).all()  # N:M (at most N) along the output axis
    assert is_nm(mask, n, m)


@settings(max_examples=50, deadline=None)
@given(groups=st.integers(1, 4), rest=st.integers(1, 6), m=st.sampled_from([2, 3, 4, 8]), permute=st.booleans(),
       data=st.data())
def test_backward_mask_equals_blockwise_reference(groups, rest, m, permute, data):
    n = data.draw(st.integers(1, m))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    w = torch.randint(-2, 3, (groups * m, rest), generator=g).float()  # few values: many ties
    mask = torch.rand(w.shape, generator=g) > 0.3
    perm = torch.randperm(groups * m, generator=g) if permute else None
    # Reference: |W*B| in the (permuted) row order, top-N of each block of M consecutive rows, un-permuted.
    scores = (w * mask).abs()
    scores = scores[perm] if permute else scores
    keep = from_blocks(_topn_reference(to_blocks(scores, m, "out"), n), scores.shape, "out")
    if permute:
        unpermuted = torch.empty_like(keep)
        unpermuted[perm] = keep
        keep = unpermuted
    assert torch.equal(backward_mask(w, mask, n, m, perm), keep & mask)


# -- lma ------------------------------------------------------------------------------------------------


def test_lma_scores_and_proposal_hand_computed():
    w = torch.tensor([[0.5, -2.0, 0.0, 0.0]])
    g = torch.tensor([[1.0, 0.1, 3.0, -0.5]])
    b = torch.tensor([[True, True, False, False]])
    s = lma.scores(w, g, b, lr=0.1)
    # kept: |G W| = 0.5, 0.2; pruned: lr G^2 = 0.9, 0.025
    assert torch.allclose(s, torch.tensor([[0.5, 0.2, 0.9, 0.025]]))
    assert lma.propose(w, g, b, 2, lr=0.1).tolist() == [[True, False, True, False]]
    # a smaller learning rate makes revival worth less: lr G^2 = 0.009 < 0.2, nothing changes
    assert lma.propose(w, g, b, 2, lr=0.001).tolist() == [[True, True, False, False]]


def test_lma_ties_keep_the_kept_weight():
    """A pruned weight must beat a kept one strictly: a block with zero gradient (all scores 0) keeps its
    mask, as does an exact tie; a strictly higher pruned score still wins."""
    w = torch.tensor([[0.0, 0.0, 0.7, 0.0], [0.0, 0.0, 0.5, 0.0], [0.0, 0.0, 0.5, 0.0]])
    g = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.2, 0.0], [1.0, 0.0, 0.19, 0.0]])
    b = torch.tensor([[False, False, True, False]] * 3)
    # row 1: kept |0.2 * 0.5| = 0.1 = pruned 0.1 * 1^2: a tie; row 2: kept 0.095 < 0.1: regrowth wins
    assert lma.propose(w, g, b, 1, lr=0.1).tolist() == [[False, False, True, False], [False, False, True, False],
                                                        [True, False, False, False]]
    assert lma.regrowth(w, g, b, 1, lr=0.1)["regrow_share"] == round(1 / 3, 4)  # the blocks that change


def test_lma_is_top_n_not_top_m_minus_n():
    # 1:4: Eq. 6 as printed (top-(M-N) = top-3) would keep three weights; SPEC keeps N = 1
    w = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    g = torch.tensor([[0.1, 2.0, 1.0, 0.0]])
    b = torch.tensor([[True, False, False, False]])
    assert lma.propose(w, g, b, 1, lr=1.0).tolist() == [[False, True, False, False]]


# -- obf ------------------------------------------------------------------------------------------------


def _obf_case():
    old = torch.tensor([[True, False], [True, False], [True, False], [True, False]])
    new = torch.tensor([[False, True], [True, False], [True, False], [False, True]])  # SAD = [2, 0, 0, 2]
    osc = torch.tensor([0.5, 0.0, 0.1, 0.3])
    w = torch.tensor([[1.0, 0.0], [0.1, 0.0], [2.0, 0.0], [3.0, 0.0]])  # norms [1, .1, 2, 3]
    return old, new, osc, w


def test_obf_and_rule_hand_computed():
    old, new, osc, w = _obf_case()
    mask, o = obf.restrict(old, new, w, osc, gamma=0.5, alpha=0.5, beta=0.5, rule="and")
    # O = .5 O + .5 SAD = [1.25, 0, .05, 1.15]; oscillators: > 2nd largest (1.15) -> block 0
    assert torch.allclose(o, torch.tensor([1.25, 0.0, 0.05, 1.15]))
    # heavy: norm > 2nd largest (2) -> block 3; AND -> nothing frozen: every block takes the proposal
    assert torch.equal(mask, new)


def test_obf_or_rule_hand_computed():
    old, new, osc, w = _obf_case()
    mask, _ = obf.restrict(old, new, w, osc, gamma=0.5, alpha=0.5, beta=0.5, rule="or")
    # OR: block 0 (oscillator) and block 3 (heavy) keep their old masks
    assert mask.tolist() == [[True, False], [True, False], [True, False], [True, False]]


def test_obf_freezes_heavy_oscillator_under_and():
    old, new, osc, w = _obf_case()
    w = torch.tensor([[3.0, 0.0], [0.1, 0.0], [2.0, 0.0], [1.0, 0.0]])  # block 0 now heaviest
    mask, _ = obf.restrict(old, new, w, osc, gamma=0.5, alpha=0.5, beta=0.5, rule="and")
    assert mask.tolist() == [[True, False], [True, False], [True, False], [False, True]]


def test_obf_first_update_threshold_zero_consequence():
    # only one of four blocks proposes a change: the 2nd-largest O is 0, so that block is an oscillator
    old = torch.tensor([[True, False]] * 4)
    new = torch.tensor([[False, True], [True, False], [True, False], [True, False]])
    w_light = torch.tensor([[0.1, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    w_heavy = torch.tensor([[3.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.1, 0.0]])
    zeros = torch.zeros(4)
    for w, rule in [(w_light, "or"), (w_heavy, "or"), (w_heavy, "and")]:
        mask, _ = obf.restrict(old, new, w, zeros, 0.9, 0.5, 0.5, rule)
        assert torch.equal(mask, old), rule  # under "or" nothing proposing can change; "and": heavy frozen
    mask, _ = obf.restrict(old, new, w_light, zeros, 0.9, 0.5, 0.5, "and")
    assert torch.equal(mask, new)  # under "and" the light block adapts


def test_obf_no_oscillator_when_all_equal_or_rank_zero():
    v = torch.full((6,), 0.7)
    assert not obf.above_kth_largest(v, 0.5).any()
    assert not obf.above_kth_largest(torch.arange(6.0), 0.1).any()  # floor(0.6) = 0
    assert obf.above_kth_largest(torch.arange(6.0), 0.5).tolist() == [False] * 4 + [True, True]


@settings(max_examples=50, deadline=None)
@given(k=st.integers(1, 40), m=st.sampled_from([2, 3, 4, 8, 16]), rule=st.sampled_from(["and", "or"]),
       alpha=st.floats(0, 1), beta=st.floats(0, 1), data=st.data())
def test_obf_restrict_properties(k, m, rule, alpha, beta, data):
    n = data.draw(st.integers(1, m - 1))
    old = topn_mask(torch.rand(k, m), n)
    prop = topn_mask(torch.rand(k, m), n)
    w = torch.randn(k, m)
    osc = torch.rand(k)
    mask, new_osc = obf.restrict(old, prop, w, osc, 0.9, alpha, beta, rule)
    _, _, frozen = obf.restrict_with_frozen(old, prop, w, osc, 0.9, alpha, beta, rule)
    assert mask.dtype == torch.bool and torch.equal(mask, torch.where(frozen[:, None], old, prop))
    assert (mask.sum(-1) == n).all()
    per_block = (mask == old).all(-1) | (mask == prop).all(-1)
    assert per_block.all()  # every block takes either its old mask or its proposal, whole
    sad = (old != prop).sum(-1).float()
    assert torch.allclose(new_osc, 0.9 * osc + 0.1 * sad)
    n_heavy = int(obf.above_kth_largest(w.norm(dim=-1), alpha).sum())
    assert n_heavy <= max(0, math.floor(alpha * k) - 1) + int((w.norm(dim=-1) == 0).sum())


# -- schedules ------------------------------------------------------------------------------------------


def test_budget_hand_computed():
    assert [budget(t, 300, 1, 4) for t in (0, 99, 100, 199, 200, 299, 300, 1000)] == [4, 4, 3, 3, 2, 2, 1, 1]
    assert [gradual_budget(t, 300, 100, 1, 4) for t in (0, 150, 250, 299)] == [4, 3, 2, 2]
    assert budget(0, 0, 2, 4) == 2  # no gradual phase


def test_phases_and_update_steps():
    assert [phase(t, 10, 20) for t in (0, 9, 10, 19, 20)] == ["gradual"] * 2 + ["evolution"] * 2 + ["frozen"]
    assert [t for t in range(40) if is_update_step(t, 10, 30, 5)] == [10, 15, 20, 25]
    assert not any(is_update_step(t, 0, 0, 1) for t in range(10))


def test_resolve_step():
    assert resolve_step(0.5, 300, "t_i") == 150
    assert resolve_step(1 / 3, 300, "t_i") == 100
    assert resolve_step(7, None, "t_i") == 7
    for bad in (1.5, -1, True):
        with pytest.raises(ConfigError):
            resolve_step(bad, 300, "t_i")
    with pytest.raises(ConfigError, match="total_steps"):
        resolve_step(0.3, None, "t_i")


@settings(max_examples=80, deadline=None)
@given(k=st.integers(1, 30), m=st.sampled_from([2, 4, 8, 16]), data=st.data())
def test_topn_fast_path_equals_stable_sort(k, m, data):
    n = data.draw(st.integers(0, m))
    scores = torch.randint(0, 3, (k, m)).float()  # many ties
    if data.draw(st.booleans()):
        scores[0, 0] = float("-inf")  # the sort path
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :n]
    expected = torch.zeros(k, m, dtype=torch.bool).scatter_(-1, order, True)
    assert torch.equal(topn_mask(scores, n), expected)


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 30), m=st.sampled_from([1, 2, 4, 8, 16, 32]), seed=st.integers(0, 100))
def test_block_flips_equals_plain_count(k, m, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(k, m, generator=g) > 0.5, torch.rand(k, m, generator=g) > 0.5
    got = block_flips(a, b)
    assert got.dtype == torch.int32 and torch.equal(got, (a != b).sum(-1).to(torch.int32))
