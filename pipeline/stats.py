"""Statistics over seeds: mean, standard deviation and a 95% confidence interval per group,
and which groups cannot be told apart from the best one. No MLflow here.

The interval is Student's t interval for a mean (Student, "The probable error of a mean",
Biometrika 6(1), 1908):

    mean +- t(0.975, n - 1) * s / sqrt(n),   s = sample standard deviation (ddof = 1),

which assumes the n seeds' results are independent draws from a normal distribution. With
one value there is no interval (its width is unknown, taken as infinite): such a group is
never called distinguishable from the best.

Two groups are "not distinguishable" when their intervals overlap. That is conservative (two
95% intervals can overlap while a two-sample test rejects equality), which is the right way
round for a ranking: a group is only ranked below the best when the evidence is clear.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

CONFIDENCE = 0.95


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student t critical value t((1 + confidence) / 2, df); df >= 1."""
    from scipy.stats import t

    return float(t.ppf((1 + confidence) / 2, df))


@dataclass
class GroupStats:
    """One group's values (one per seed) and what they say."""

    key: str  # what tells the group apart (params other than the seed)
    label: str
    values: list[float]  # every run's metric, finite or not
    members: list = field(default_factory=list)  # the runs (or anything) behind the values
    rank: str = ""  # "best", "~best" (not distinguishable from it), "2", ..., "nan"

    @property
    def finite(self) -> list[float]:
        return [v for v in self.values if math.isfinite(v)]

    @property
    def not_finite(self) -> int:
        return len(self.values) - len(self.finite)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        """NaN when any value is not finite: a seed that diverged is part of the result."""
        return statistics.fmean(self.values) if self.values and not self.not_finite else math.nan

    @property
    def std(self) -> float:
        if self.not_finite or self.n < 2:
            return math.nan
        return statistics.stdev(self.values)

    @property
    def interval(self) -> tuple[float, float]:
        """The 95% interval of the mean; (-inf, inf) for one value, NaN if any is not finite."""
        if self.not_finite or not self.values:
            return math.nan, math.nan
        if self.n < 2:
            return -math.inf, math.inf
        half = t_quantile(self.n - 1) * self.std / math.sqrt(self.n)
        return self.mean - half, self.mean + half


def rank_groups(groups: list[GroupStats], direction: str) -> list[GroupStats]:
    """Best mean first; groups with a value that is not finite last (rank "nan"). Each
    group whose interval overlaps the best group's is ranked "~best", not below it."""
    sign = -1 if direction == "max" else 1

    def key(g: GroupStats) -> tuple[int, float]:
        return (0, sign * g.mean) if math.isfinite(g.mean) else (1, 0.0)

    ranked = sorted(groups, key=key)
    best = ranked[0] if ranked and math.isfinite(ranked[0].mean) else None
    for i, g in enumerate(ranked, 1):
        if not math.isfinite(g.mean):
            g.rank = "nan"
        elif g is best:
            g.rank = "best"
        elif overlaps(g.interval, best.interval):
            g.rank = "~best"
        else:
            g.rank = str(i)
    return ranked


def overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]
