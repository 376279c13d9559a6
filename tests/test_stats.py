"""bame.stats: means, spreads and Student-t intervals over seeds, checked against hand computations."""

import math

import pytest

from bame import stats


def t_closed_form(p: float, df: int) -> float:
    """Student's t quantile where it has a closed form: df = 1 (Cauchy) and df = 2."""
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    assert df == 2
    return (2 * p - 1) / math.sqrt(2 * p * (1 - p))


@pytest.mark.parametrize("p", [0.9, 0.95, 0.975, 0.995])
@pytest.mark.parametrize("df", [1, 2])
def test_t_quantile_matches_the_closed_forms(p, df):
    assert stats.t_quantile(p, df) == pytest.approx(t_closed_form(p, df), rel=1e-12)


def test_t_quantile_textbook_values():
    assert stats.t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-4)  # the printed tables
    assert stats.t_quantile(0.975, 2) == pytest.approx(4.3027, abs=1e-4)
    assert stats.t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-4)
    with pytest.raises(ValueError):
        stats.t_quantile(0.975, 0)


def test_interval_of_three_values_by_hand():
    iv = stats.interval([90.0, 92.0, 94.0])
    # mean 92; s = sqrt((4 + 0 + 4) / 2) = 2; half width = t(0.975, 2) * 2 / sqrt(3)
    half = (0.95 / math.sqrt(2 * 0.975 * 0.025)) * 2 / math.sqrt(3)
    assert (iv.mean, iv.std, iv.n) == (92.0, 2.0, 3)
    assert iv.low == pytest.approx(92 - half, rel=1e-12) and iv.high == pytest.approx(92 + half, rel=1e-12)
    assert half == pytest.approx(4.96827, abs=1e-5)
    assert iv.half_width == pytest.approx(half, rel=1e-12)


def test_interval_of_two_values_uses_one_degree_of_freedom():
    iv = stats.interval([1.0, 3.0])  # mean 2, s = sqrt(2), half = tan(0.475 pi) * sqrt(2) / sqrt(2)
    assert iv.mean == 2.0 and iv.std == pytest.approx(math.sqrt(2))
    assert iv.high - iv.mean == pytest.approx(math.tan(0.475 * math.pi), rel=1e-12)


def test_a_narrower_level_gives_a_narrower_interval():
    iv = stats.interval([90.0, 92.0, 94.0], level=0.90)  # t(0.95, 2) = 0.9 / sqrt(2 * 0.95 * 0.05) = 2.92
    assert iv.high - iv.mean == pytest.approx(2.919986 * 2 / math.sqrt(3), abs=1e-5)


def test_one_value_has_no_spread_and_none_has_no_mean():
    one = stats.interval([91.5])
    assert one.mean == 91.5 and one.n == 1 and math.isnan(one.std) and math.isnan(one.low)
    assert not one.excludes(0.0)  # no interval: it excludes nothing
    none = stats.interval([])
    assert none.n == 0 and math.isnan(none.mean)


def test_equal_values_give_a_zero_width_interval():
    iv = stats.interval([0.25, 0.25, 0.25])  # a FLOPs ratio that no seed changes
    assert (iv.mean, iv.std, iv.low, iv.high) == (0.25, 0.0, 0.25, 0.25)


def test_paired_differences_use_only_the_common_seeds():
    a = {0: 90.0, 1: 92.0, 2: 95.0}
    b = {0: 89.0, 1: 90.0, 2: 92.0, 3: 80.0}  # seed 3 has no partner in a
    assert stats.paired(a, b) == ([0, 1, 2], [1.0, 2.0, 3.0])
    iv = stats.paired_interval(a, b)
    half = 4.302652729749464 * 1 / math.sqrt(3)  # differences 1, 2, 3: mean 2, s 1
    assert (iv.mean, iv.std, iv.n) == (2.0, 1.0, 3)
    assert (iv.low, iv.high) == (pytest.approx(2 - half), pytest.approx(2 + half))
    assert not iv.excludes(0.0)  # [-0.48, 4.48]


def test_pairing_sees_a_consistent_gain_that_two_means_hide():
    a = {0: 80.0, 1: 90.0, 2: 85.0}
    b = {0: 78.0, 1: 88.5, 2: 82.5}  # a wins by 2, 1.5, 2.5 at every seed; the seeds spread by 10
    paired = stats.paired_interval(a, b)
    assert paired.mean == pytest.approx(2.0) and paired.excludes(0.0)  # [0.76, 3.24]
    assert paired.low == pytest.approx(2.0 - 4.302652729749464 * 0.5 / math.sqrt(3))
    each_a, each_b = stats.interval(list(a.values())), stats.interval(list(b.values()))
    assert each_a.low < each_b.high  # unpaired, the two intervals overlap
