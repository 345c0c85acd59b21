"""Property-based tests (hypothesis) for analysis and selection: random shapes, dtypes and spectra."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from kappatune.analysis import analyze_model
from kappatune.errors import ConfigError
from kappatune.selection import select_from_report

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_matrix(m: int, n: int, log10_kappa: float, seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -log10_kappa, k, dtype=torch.float64) * torch.rand(1, generator=g, dtype=torch.float64).add(0.1)
    return (u @ torch.diag(s) @ v.T).to(dtype)


@SETTINGS
@given(
    m=st.integers(2, 40),
    n=st.integers(2, 40),
    log10_kappa=st.floats(0.0, 5.9),
    seed=st.integers(0, 10_000),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
)
def test_kappa_agrees_with_float64_svd(m, n, log10_kappa, seed, dtype):
    w = make_matrix(m, n, log10_kappa, seed, dtype)
    lin = nn.Linear(n, m, bias=False).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    (rec,) = analyze_model(nn.Sequential(lin), cache=False, progress=False).records
    s = torch.linalg.svdvals(lin.weight.detach().double())
    ref = float(s[0] / s[-1])
    if ref < 1e6:  # the stored (possibly low-precision) matrix's own κ
        assert rec.kappa == pytest.approx(ref, rel=1e-6)
    else:
        assert rec.kappa >= 1e6 * (1 - 1e-6)


def _records(draw_sizes, seed):
    layers = [nn.Linear(i, o, bias=False) for i, o in draw_sizes]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in layers:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g))
    return analyze_model(nn.Sequential(*layers), cache=False, progress=False)


sizes = st.lists(st.tuples(st.integers(2, 24), st.integers(2, 24)), min_size=1, max_size=8)


@SETTINGS
@given(shapes=sizes, seed=st.integers(0, 1000), policy=st.sampled_from(["kappa", "snr", "random", "all"]),
       frac=st.floats(0.01, 1.0))
def test_param_budget_always_respected_and_deterministic(shapes, seed, policy, frac):
    rep = _records(shapes, seed)
    total = sum(r.numel for r in rep.records)
    budget = max(1, int(total * frac))
    try:
        sel = select_from_report(rep, policy, param_budget=budget, seed=seed)
    except ConfigError as exc:
        assert "smaller than the smallest" in str(exc)
        assert budget < min(r.numel for r in rep.records)
        return
    assert 0 < sel.num_params <= budget
    assert sel == select_from_report(rep, policy, param_budget=budget, seed=seed)


@SETTINGS
@given(shapes=sizes, seed=st.integers(0, 1000), top_p=st.floats(0.001, 1.0))
def test_top_p_count_and_kappa_order(shapes, seed, top_p):
    rep = _records(shapes, seed)
    sel = select_from_report(rep, "kappa", top_p=top_p)
    assert len(sel) == max(1, int(len(rep.records) * top_p))
    kappas = list(sel.scores.values())
    assert kappas == sorted(kappas, key=lambda k: (math.isinf(k), k))
    worst_kept = max(kappas)
    assert all(r.kappa >= worst_kept for r in rep.records if r.name not in sel.parameter_names)
