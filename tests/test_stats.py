"""kappatune.stats: paired differences and Welch's test against independent computations."""

import math

import pytest
from scipy import stats as st

from kappatune.stats import holm_adjust, paired_difference, summarize, welch_test


def test_paired_difference_matches_ttest_rel_and_pairs_by_key():
    a = {0: 1.0, 1: 2.5, 2: 2.0, 3: 4.0}
    b = {3: 3.1, 0: 0.2, 2: 1.9, 1: 1.0, 9: 100.0}  # different order, and an unpaired key that must be ignored
    d = paired_difference(a, b)
    keys = sorted(a)
    ref = st.ttest_rel([a[k] for k in keys], [b[k] for k in keys])
    assert d["n"] == 4
    assert d["mean"] == pytest.approx(sum(a[k] - b[k] for k in keys) / 4)
    assert d["p"] == pytest.approx(ref.pvalue, rel=1e-9)
    lo, hi = d["ci"]
    assert lo < d["mean"] < hi
    # the 95% interval excludes zero exactly when p < 0.05
    assert d["significant"] == (d["p"] < 0.05)


def test_paired_difference_interval_width_uses_student_t():
    d = paired_difference({0: 1.0, 1: 3.0}, {0: 0.0, 1: 0.0})  # differences 1 and 3: mean 2, sd sqrt(2), n 2
    half = st.t.ppf(0.975, 1) * math.sqrt(2) / math.sqrt(2)
    assert d["ci"] == pytest.approx([2 - half, 2 + half])
    assert not d["significant"]  # t(1) quantile 12.7: a 2-seed interval is wide


def test_paired_difference_degenerate_cases():
    assert paired_difference({0: 1.0}, {0: 0.5})["ci"] is None  # one pair: no interval
    same = paired_difference({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0})  # identical differences: no t, sign certain
    assert same["p"] is None and same["significant"]
    assert paired_difference({0: 1.0, 1: None}, {0: 1.0, 1: 2.0})["n"] == 1


def test_welch_and_summary():
    a, b = [1.0, 2.0, 3.0], [2.0, 4.0, 6.0, 8.0]
    w = welch_test(a, b)
    assert w["p"] == pytest.approx(st.ttest_ind(a, b, equal_var=False).pvalue)
    assert w["difference"] == pytest.approx(2.0 - 5.0)
    s = summarize([1.0, None, 3.0])
    assert (s["mean"], s["n"]) == (2.0, 2) and s["std"] == pytest.approx(math.sqrt(2))


def test_binomial_interval_is_the_exact_clopper_pearson_interval():
    from kappatune.stats import binomial_interval

    lo, hi = binomial_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10))  # closed form at k = 0
    lo, hi = binomial_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 10))
    for k in (1, 29, 50):
        lo, hi = binomial_interval(k, 100)
        assert lo < k / 100 < hi
        mirror = binomial_interval(100 - k, 100)
        assert (lo, hi) == pytest.approx((1 - mirror[1], 1 - mirror[0]))
    lo, hi = binomial_interval(29, 100)  # the definition: each tail holds 2.5% at the interval's ends
    assert st.binom.cdf(29, 100, hi) == pytest.approx(0.025) and st.binom.sf(28, 100, lo) == pytest.approx(0.025)
    with pytest.raises(ValueError):
        binomial_interval(5, 3)


def test_holm_adjusted_p_values():
    # Holm (1979) step-down: sorted p (0.01, 0.02, 0.03, 0.5) x (4, 3, 2, 1), made monotone, capped at 1
    got = holm_adjust({"a": 0.03, "b": 0.01, "c": 0.5, "d": 0.02})
    assert got == pytest.approx({"b": 0.04, "d": 0.06, "a": 0.06, "c": 0.5})
    # rejections at α = 0.05 are exactly Holm's: only the smallest here (0.01 < 0.05/4; 0.02 ≥ 0.05/3 stops it)
    assert [k for k, p in got.items() if p < 0.05] == ["b"]
    assert holm_adjust({"x": 0.9, "y": 0.8}) == pytest.approx({"y": 1.0, "x": 1.0})
    assert holm_adjust({}) == {}
