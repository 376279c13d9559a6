"""Statistics over seeds: mean, spread and Student-t confidence intervals (``bame report`` on a sweep).

Pure functions of plain numbers. With n values x_1..x_n (one per seed) the interval is the textbook one
for a mean whose spread is estimated from the same values:

    mean +- t_{(1 + level) / 2, n - 1} * s / sqrt(n),    s = the sample standard deviation (n - 1)

and two configurations are compared *paired by seed*: the differences d_s = a_s - b_s over the seeds both
ran get the same interval. Pairing removes what a seed does to both runs alike (the initial weights and
the data order are the same for every method at one seed), so it is tighter than comparing two means.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

LEVEL = 0.95  # the usual two-sided level


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values with its sample standard deviation and confidence interval.

    ``std``, ``low`` and ``high`` are NaN for fewer than two values (no spread can be estimated).
    """

    mean: float
    std: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes(self, value: float) -> bool:
        """Whether ``value`` lies outside the interval (False when there is no interval)."""
        return self.low > value or self.high < value


NO_VALUES = Interval(math.nan, math.nan, math.nan, math.nan, 0)


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t distribution with ``df`` degrees of freedom."""
    from scipy.stats import t  # scipy comes with scikit-learn; imported here, not with bame

    if df < 1:
        raise ValueError(f"Student's t needs at least one degree of freedom, not {df}")
    return float(t.ppf(p, df))


def interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean, sample standard deviation and the Student-t interval of the mean of ``values``."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return NO_VALUES
    mean = statistics.fmean(values)
    if n == 1:
        return Interval(mean, math.nan, math.nan, math.nan, 1)
    std = statistics.stdev(values)
    half = t_quantile((1 + level) / 2, n - 1) * std / math.sqrt(n)
    return Interval(mean, std, mean - half, mean + half, n)


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> tuple[list[int], list[float]]:
    """The seeds both ``a`` and ``b`` have (sorted) and the differences ``a[s] - b[s]`` at those seeds."""
    seeds = sorted(set(a) & set(b))
    return seeds, [float(a[s]) - float(b[s]) for s in seeds]


def paired_interval(a: Mapping[int, float], b: Mapping[int, float], level: float = LEVEL) -> Interval:
    """The interval of the mean difference ``a - b``, paired by seed (seeds only one side has are left out)."""
    return interval(paired(a, b)[1], level)
