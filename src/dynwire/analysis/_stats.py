"""Small, dependency-free statistics for the study runner and the connectivity analysis.

Student's t distribution (CDF through the regularised incomplete beta function, quantile by
bisection), sample mean/std, t confidence intervals for a mean and for paired differences,
ranks with ties, Spearman's rank correlation and the least-squares slope. Only the standard
library and ``math``: scipy is not a dependency of dynwire.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "mean",
    "sample_std",
    "t_cdf",
    "t_quantile",
    "MeanCI",
    "mean_ci",
    "PairedDiff",
    "paired_diff",
    "rankdata",
    "pearson",
    "spearman",
    "linear_slope",
]

_NAN = float("nan")


def mean(xs: Sequence[float]) -> float:
    """Arithmetic mean; NaN for an empty sequence."""
    xs = list(xs)
    return math.fsum(xs) / len(xs) if xs else _NAN


def sample_std(xs: Sequence[float]) -> float:
    """Sample standard deviation (divisor ``n - 1``); NaN for fewer than two values."""
    xs = list(xs)
    n = len(xs)
    if n < 2:
        return _NAN
    m = mean(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (n - 1))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz, Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betai(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(ln_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t distribution with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _betai(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Inverse CDF of Student's t: ``t_quantile(0.975, 4) = 2.776`` (two-sided 95% with 5 values)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
        if hi > 1e12:
            return math.inf
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class MeanCI:
    """Mean, sample std and the half-width of the two-sided t confidence interval of the mean."""

    n: int
    mean: float
    std: float
    half_width: float
    level: float = 0.95

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def to_dict(self) -> dict[str, float | int | None]:
        return {
            "n": self.n,
            "mean": _finite(self.mean),
            "std": _finite(self.std),
            "ci_half_width": _finite(self.half_width),
            "ci_low": _finite(self.low),
            "ci_high": _finite(self.high),
            "level": self.level,
        }


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def mean_ci(xs: Sequence[float], level: float = 0.95) -> MeanCI:
    """``mean +- t_{(1+level)/2, n-1} * s / sqrt(n)``; the half-width is NaN for ``n < 2``."""
    xs = [float(x) for x in xs]
    n = len(xs)
    m, s = mean(xs), sample_std(xs)
    hw = t_quantile(0.5 + level / 2.0, n - 1) * s / math.sqrt(n) if n >= 2 else _NAN
    return MeanCI(n, m, s, hw, level)


@dataclass(frozen=True)
class PairedDiff:
    """Paired differences ``a[seed] - b[seed]`` over the seeds both sides have."""

    seeds: tuple[int, ...]
    diffs: tuple[float, ...]
    ci: MeanCI

    @property
    def n(self) -> int:
        return self.ci.n

    @property
    def excludes_zero(self) -> bool:
        return self.n >= 2 and math.isfinite(self.ci.half_width) and (self.ci.low > 0 or self.ci.high < 0)

    def to_dict(self) -> dict[str, object]:
        return {"seeds": list(self.seeds), "diffs": list(self.diffs), **self.ci.to_dict()}


def paired_diff(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> PairedDiff:
    """Mean paired difference ``a - b`` (matched by seed) with its t confidence interval."""
    seeds = tuple(sorted(set(a) & set(b)))
    diffs = tuple(float(a[s]) - float(b[s]) for s in seeds)
    return PairedDiff(seeds, diffs, mean_ci(diffs, level))


def rankdata(xs: Sequence[float]) -> list[float]:
    """Ranks 1..n, ties get the average of the ranks they span."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        avg = (i + j) / 2.0 + 1.0
        for k in range(i, j + 1):
            ranks[order[k]] = avg
        i = j + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; NaN when either side is constant or has fewer than two values."""
    if len(x) != len(y):
        raise ValueError(f"pearson(): lengths differ ({len(x)} vs {len(y)})")
    if len(x) < 2:
        return _NAN
    mx, my = mean(x), mean(y)
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = math.fsum((a - mx) ** 2 for a in x)
    syy = math.fsum((b - my) ** 2 for b in y)
    if sxx <= 0 or syy <= 0:
        return _NAN
    return sxy / math.sqrt(sxx * syy)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of the ranks, ties averaged)."""
    return pearson(rankdata(list(x)), rankdata(list(y)))


def linear_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of ``y`` on ``x``; NaN when ``x`` is constant."""
    if len(x) != len(y):
        raise ValueError(f"linear_slope(): lengths differ ({len(x)} vs {len(y)})")
    if len(x) < 2:
        return _NAN
    mx, my = mean(x), mean(y)
    sxx = math.fsum((a - mx) ** 2 for a in x)
    if sxx <= 0:
        return _NAN
    return math.fsum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx
