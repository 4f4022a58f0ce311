"""The dependency-free statistics against textbook values (t tables, hand-computed intervals)."""

from __future__ import annotations

import math

import pytest

from dynwire.analysis import _stats as st


@pytest.mark.parametrize(
    ("p", "df", "expected"),
    [
        # two-sided 95% and 99% critical values from a standard t table
        (0.975, 1, 12.706),
        (0.975, 2, 4.303),
        (0.975, 4, 2.776),
        (0.975, 9, 2.262),
        (0.975, 29, 2.045),
        (0.995, 4, 4.604),
        (0.95, 10, 1.812),
        (0.975, 1e7, 1.960),  # -> normal
    ],
)
def test_t_quantile_matches_tables(p: float, df: float, expected: float) -> None:
    assert st.t_quantile(p, df) == pytest.approx(expected, abs=5e-4)


def test_t_cdf_symmetry_and_closed_forms() -> None:
    assert st.t_cdf(0.0, 3) == pytest.approx(0.5)
    # df = 1 is the Cauchy distribution: F(t) = 1/2 + atan(t)/pi
    for t in (-3.0, -0.5, 0.7, 10.0):
        assert st.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-10)
    # df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    for t in (-2.0, 0.3, 4.0):
        assert st.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-10)
    assert st.t_quantile(0.025, 4) == pytest.approx(-st.t_quantile(0.975, 4))
    with pytest.raises(ValueError):
        st.t_quantile(1.0, 3)
    with pytest.raises(ValueError):
        st.t_cdf(1.0, 0)


def test_mean_std_and_interval_by_hand() -> None:
    xs = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]  # mean 5, sum of squares 32, s^2 = 32/7
    assert st.mean(xs) == 5.0
    assert st.sample_std(xs) == pytest.approx(math.sqrt(32 / 7))
    ci = st.mean_ci(xs)
    assert ci.n == 8 and ci.half_width == pytest.approx(2.3646 * math.sqrt(32 / 7) / math.sqrt(8), abs=1e-3)
    one = st.mean_ci([3.0])
    assert one.n == 1 and math.isnan(one.std) and math.isnan(one.half_width)
    assert one.to_dict()["ci_half_width"] is None


def test_paired_difference_issue_numbers() -> None:
    """Issue 9: seeds 0-2, dynamic minus sequential: +0.23, -0.35, +0.03 -> sd 0.30, 95% CI about +-0.75."""
    seq = {0: 89.97, 1: 90.50, 2: 90.28, 7: 91.0}  # seed 7 has no partner: ignored
    dyn = {0: 90.20, 1: 90.15, 2: 90.31}
    d = st.paired_diff(dyn, seq)
    assert d.seeds == (0, 1, 2) and d.n == 3
    assert d.diffs == pytest.approx((0.23, -0.35, 0.03), abs=1e-9)
    assert d.ci.mean == pytest.approx(-0.03, abs=1e-9)
    # s = sqrt(((0.26)^2 + (0.32)^2 + (0.06)^2) / 2) = sqrt(0.0868) = 0.29462
    assert d.ci.std == pytest.approx(math.sqrt(0.0868), abs=1e-9)
    assert d.ci.half_width == pytest.approx(4.3027 * 0.29462 / math.sqrt(3), abs=1e-3)  # 0.732
    assert not d.excludes_zero
    d2 = st.paired_diff({0: 1.0, 1: 1.2, 2: 1.1}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert d2.excludes_zero and d2.ci.low > 0


def test_ranks_correlations_slope() -> None:
    assert st.rankdata([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]
    assert st.spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert st.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # textbook example: ranks differ by d = (0, -1, 1, 0, 0) -> rho = 1 - 6*2/(5*24) = 0.9
    assert st.spearman([1, 2, 3, 4, 5], [1, 3, 2, 4, 5]) == pytest.approx(0.9)
    assert math.isnan(st.spearman([1, 2, 3], [5, 5, 5]))
    assert st.linear_slope([0, 1, 2, 3], [1, 3, 5, 7]) == pytest.approx(2.0)
    # sxy = 4.5, sxx = 2, syy = 10.1667 -> r = 4.5 / sqrt(20.333) = 0.99795
    assert st.pearson([1, 2, 3], [2, 4, 6.5]) == pytest.approx(0.99795, abs=1e-5)
    assert math.isnan(st.linear_slope([1, 1], [0, 2]))


def test_interval_is_the_paired_t_tests() -> None:
    """The paired interval is scipy's paired t test interval (``ttest_rel``), at 95% and 90%."""
    from scipy import stats

    a = {0: 88.47, 1: 88.91, 2: 88.12, 3: 88.60, 4: 88.35}
    b = {0: 88.60, 1: 88.40, 2: 88.30, 3: 88.75, 4: 88.01}
    for level in (0.95, 0.90):
        d = st.paired_diff(a, b, level)
        ref = stats.ttest_rel(list(a.values()), list(b.values())).confidence_interval(level)
        assert (d.ci.low, d.ci.high) == pytest.approx((ref.low, ref.high), abs=1e-12)


def test_undefined_values_are_nan_without_warnings(recwarn) -> None:
    """Too few values or a constant side give NaN quietly; equal differences a zero-width interval."""
    assert math.isnan(st.pearson([1.0], [2.0])) and math.isnan(st.pearson([1, 2, 3], [4, 4, 4]))
    assert math.isnan(st.spearman([], [])) and math.isnan(st.spearman([2, 2], [1, 3]))
    assert math.isnan(st.mean([])) and math.isnan(st.sample_std([1.0]))
    assert st.rankdata([]) == []
    same = st.paired_diff({0: 1.5, 1: 2.5}, {0: 1.0, 1: 2.0})
    assert same.ci.mean == pytest.approx(0.5) and same.ci.half_width == 0.0 and same.excludes_zero
    with pytest.raises(ValueError, match="lengths differ"):
        st.spearman([1, 2], [1, 2, 3])
    assert not recwarn.list


def _median_ci_by_hand(xs: list[float], level: float) -> tuple[float, float]:
    """The order-statistic interval, its binomial tail summed with math.comb."""
    n, a = len(xs), sorted(xs)
    best = None
    for k in range(1, (n + 1) // 2 + 1):
        tail = sum(math.comb(n, i) for i in range(k)) / 2**n
        if 1 - 2 * tail >= level:
            best = k
    return (math.nan, math.nan) if best is None else (a[best - 1], a[n - best])


@pytest.mark.parametrize("n", [1, 5, 6, 7, 12, 24, 31])
@pytest.mark.parametrize("level", [0.9, 0.95, 0.99])
def test_median_ci_is_the_order_statistic_interval(n: int, level: float) -> None:
    xs = [((i * 37) % 101) / 7.0 for i in range(n)]  # unsorted, distinct
    lo, hi = st.median_ci(xs, level)
    want = _median_ci_by_hand(xs, level)
    if math.isnan(want[0]):
        assert math.isnan(lo) and math.isnan(hi)
    else:
        assert (lo, hi) == want
        med = sorted(xs)[(n - 1) // 2]
        assert lo <= med <= hi


def test_median_ci_known_values_and_bad_level() -> None:
    # n = 31 at 0.95: k = 10 (coverage 0.971; k = 11 gives 0.929), i.e. the 10th and 22nd values
    assert st.median_ci(list(range(1, 32))) == (10.0, 22.0)
    assert all(math.isnan(v) for v in st.median_ci([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert all(math.isnan(v) for v in st.median_ci([]))
    with pytest.raises(ValueError, match="level"):
        st.median_ci([1.0, 2.0], level=95)
