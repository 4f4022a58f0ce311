"""The statistics of the study runner and the connectivity analysis, on :mod:`scipy.stats`.

Sample mean/std, Student's t distribution, t confidence intervals for a mean and for paired
differences, ranks with ties, Pearson's and Spearman's correlations and the least-squares
slope. Thin wrappers that keep the conventions the callers rely on: plain Python floats and
lists, NaN (not an exception, not a warning) where a value is undefined (too few values, a
constant side), and ``ValueError`` for lengths that differ or arguments out of range.

``scipy.stats`` is imported on first use (it takes about a second): the ``dynwire`` commands
import this module through the analysis, and most of them compute no statistic.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "mean",
    "sample_std",
    "t_cdf",
    "t_quantile",
    "MeanCI",
    "mean_ci",
    "PairedDiff",
    "paired_diff",
    "median_ci",
    "rankdata",
    "pearson",
    "spearman",
    "linear_slope",
]

_NAN = float("nan")


def _scipy_stats():
    from scipy import stats

    return stats


def _array(xs: Sequence[float]) -> np.ndarray:
    return np.asarray(list(xs), dtype=np.float64)


def mean(xs: Sequence[float]) -> float:
    """Arithmetic mean; NaN for an empty sequence."""
    a = _array(xs)
    return float(np.mean(a)) if a.size else _NAN


def sample_std(xs: Sequence[float]) -> float:
    """Sample standard deviation (divisor ``n - 1``); NaN for fewer than two values."""
    a = _array(xs)
    return float(np.std(a, ddof=1)) if a.size >= 2 else _NAN


def _check_df(df: float) -> None:
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t distribution with ``df`` degrees of freedom (``scipy.stats.t.cdf``)."""
    _check_df(df)
    return float(_scipy_stats().t.cdf(t, df))


def t_quantile(p: float, df: float) -> float:
    """Inverse CDF of Student's t (``scipy.stats.t.ppf``): ``t_quantile(0.975, 4) = 2.776``."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {p}")
    _check_df(df)
    return float(_scipy_stats().t.ppf(p, df))


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
    """``mean +- t_{(1+level)/2, n-1} * s / sqrt(n)``; the half-width is NaN for ``n < 2``.

    The half-width is ``scipy.stats.t.ppf`` times ``scipy.stats.sem`` (0 when every value is
    the same, where ``ttest_1samp``'s interval would be undefined).
    """
    a = _array(xs)
    n = int(a.size)
    m, s = mean(a), sample_std(a)
    hw = t_quantile(0.5 + level / 2.0, n - 1) * float(_scipy_stats().sem(a)) if n >= 2 else _NAN
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
    """Mean paired difference ``a - b`` (matched by seed) with its t confidence interval.

    The interval is that of the paired t test (``scipy.stats.ttest_rel``): the one-sample
    interval of the differences.
    """
    seeds = tuple(sorted(set(a) & set(b)))
    diffs = tuple(float(a[s]) - float(b[s]) for s in seeds)
    return PairedDiff(seeds, diffs, mean_ci(diffs, level))


def median_ci(xs: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median: the order statistics
    ``(x_(k), x_(n+1-k))`` (1-based) with the largest ``k`` whose coverage
    ``1 - 2 P(Binomial(n, 1/2) <= k - 1)`` is at least ``level`` (``scipy.stats.binom``). No
    assumption on the distribution (timings are skewed), only independent draws; ``(NaN, NaN)``
    when ``n`` is too small for ``level`` (fewer than 6 values at 0.95)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"median_ci(): level={level} must be in (0, 1), e.g. 0.95")
    a = np.sort(_array(xs))
    n = int(a.size)
    if n == 0:
        return _NAN, _NAN
    # P(B <= k - 1) for k = 1..ceil(n/2); the largest k with 2 P <= 1 - level
    tail = _scipy_stats().binom.cdf(np.arange(0, (n + 1) // 2), n, 0.5)
    ok = np.nonzero(2.0 * tail <= 1.0 - level + 1e-12)[0]
    if ok.size == 0:
        return _NAN, _NAN
    k = int(ok[-1]) + 1
    return float(a[k - 1]), float(a[n - k])


def rankdata(xs: Sequence[float]) -> list[float]:
    """Ranks 1..n, ties get the average of the ranks they span (``scipy.stats.rankdata``)."""
    a = _array(xs)
    return [float(r) for r in _scipy_stats().rankdata(a, method="average")] if a.size else []


def _pair(x: Sequence[float], y: Sequence[float], what: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = _array(x), _array(y)
    if a.size != b.size:
        raise ValueError(f"{what}(): lengths differ ({a.size} vs {b.size})")
    return a, b


def _constant(a: np.ndarray) -> bool:
    return bool(np.all(a == a[0]))


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation (``scipy.stats.pearsonr``); NaN when either side is constant or has
    fewer than two values."""
    a, b = _pair(x, y, "pearson")
    if a.size < 2 or _constant(a) or _constant(b):
        return _NAN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(_scipy_stats().pearsonr(a, b).statistic)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (``scipy.stats.spearmanr``: Pearson correlation of the ranks,
    ties averaged); NaN when either side is constant or has fewer than two values."""
    a, b = _pair(x, y, "spearman")
    if a.size < 2 or _constant(a) or _constant(b):
        return _NAN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(_scipy_stats().spearmanr(a, b).statistic)


def linear_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of ``y`` on ``x`` (``scipy.stats.linregress``); NaN when ``x`` is constant."""
    a, b = _pair(x, y, "linear_slope")
    if a.size < 2 or _constant(a):
        return _NAN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(_scipy_stats().linregress(a, b).slope)
