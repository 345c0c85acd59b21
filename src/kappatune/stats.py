"""Statistics for comparing methods across seeds: summaries, paired differences with intervals, Welch's test.

Seeds share batches (batch *s* of stage *k* is a pure function of seed, stage and step), so two methods run with
the same seed saw the same data: the honest comparison is the per-seed *paired* difference, with a Student-t
interval over seeds. Welch's unpaired test is given beside it for readers who compare means. The distributions
come from scipy; nothing here re-implements them.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

__all__ = ["summarize", "paired_difference", "welch_test", "binomial_interval", "holm_adjust"]


def summarize(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation (n−1) and count of the non-missing values."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": []}
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(vals), "values": vals}


def paired_difference(a: Mapping[Any, float | None], b: Mapping[Any, float | None], *,
                      confidence: float = 0.95) -> dict[str, Any]:
    """Per-key differences ``a[k] - b[k]`` over the keys (seeds) both have, with a Student-t interval.

    Returns ``mean``, ``std``, ``n``, ``ci`` (the two-sided ``confidence`` interval of the mean difference, None
    when n < 2), ``p`` (two-sided one-sample t-test of mean difference 0; None when n < 2 or every difference is
    equal, where a t statistic does not exist) and ``significant`` (the interval excludes 0), plus the per-key
    ``differences``.
    """
    from scipy import stats as st

    keys = [k for k in a if k in b and a[k] is not None and b[k] is not None]
    diffs = {k: float(a[k]) - float(b[k]) for k in keys}  # type: ignore[arg-type]
    s = summarize(list(diffs.values()))
    out: dict[str, Any] = {"mean": s["mean"], "std": s["std"], "n": s["n"], "ci": None, "p": None,
                           "significant": False, "confidence": confidence, "differences": diffs}
    n = s["n"]
    if n < 2:
        return out
    se = s["std"] / math.sqrt(n)
    half = float(st.t.ppf(0.5 + confidence / 2.0, n - 1)) * se
    out["ci"] = [s["mean"] - half, s["mean"] + half]
    if se > 0:
        out["p"] = float(2.0 * st.t.sf(abs(s["mean"] / se), n - 1))
        out["significant"] = not (out["ci"][0] <= 0.0 <= out["ci"][1])
    elif s["mean"] != 0:  # identical non-zero differences in every seed: the sign is certain, the p-value undefined
        out["significant"] = True
    return out


def welch_test(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Welch's unequal-variance t-test of mean(a) − mean(b): difference, t, degrees of freedom and two-sided p."""
    from scipy import stats as st

    sa, sb = summarize(a), summarize(b)
    if sa["n"] < 2 or sb["n"] < 2:
        return {"difference": None, "t": None, "df": None, "p": None}
    res = st.ttest_ind(sa["values"], sb["values"], equal_var=False)
    va, vb = sa["std"] ** 2 / sa["n"], sb["std"] ** 2 / sb["n"]
    df = (va + vb) ** 2 / (va**2 / (sa["n"] - 1) + vb**2 / (sb["n"] - 1)) if va + vb > 0 else None
    return {"difference": sa["mean"] - sb["mean"], "t": float(res.statistic), "df": df, "p": float(res.pvalue)}


def binomial_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) ``level`` interval for a proportion from ``k`` successes in ``n`` trials, e.g. an
    accuracy of ``k / n`` on ``n`` test examples. Conservative: covers the true proportion at least ``level`` of
    the time for every true value."""
    from scipy.stats import beta

    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def holm_adjust(p_values: Mapping[Any, float]) -> dict[Any, float]:
    """Holm–Bonferroni step-down adjusted p-values of one family of tests (same keys).

    A test whose adjusted p is below α is significant with the family-wise error rate held at α, whatever the
    dependence between the tests. (``scipy.stats.false_discovery_control`` controls the false-discovery rate
    instead, and statsmodels, which has ``multipletests(method="holm")``, is not a dependency; this is a few lines.)
    """
    order = sorted(p_values, key=lambda k: p_values[k])
    m, out, running = len(order), {}, 0.0
    for i, k in enumerate(order):
        running = max(running, min(1.0, (m - i) * float(p_values[k])))
        out[k] = running
    return out

