"""κ-only analysis (Cholesky + Lanczos extremes of the Gram matrix): float64-SVD accuracy, fallbacks, wiring."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from kappatune.analysis import analyze_model, extreme_singular_values
from kappatune.errors import ConfigError
from kappatune.models import build_tiny_llama
from kappatune.selection import select_from_report, select_targets


def _matrix(m: int, n: int, log_kappa: float, seed: int, clustered: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    if clustered:  # evenly log-spaced: the extremes have near neighbours (the hard case for Lanczos)
        s = torch.logspace(0, -log_kappa, k, dtype=torch.float64)
    else:
        s = torch.cat([torch.tensor([1.0, 10 ** -log_kappa], dtype=torch.float64),
                       10 ** (-log_kappa * torch.rand(k - 2, generator=g, dtype=torch.float64))])
    return (u * s) @ v.T


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 90), extra=st.integers(0, 60), log_kappa=st.floats(0.0, 6.0), seed=st.integers(0, 10_000),
       clustered=st.booleans(), wide=st.booleans())
def test_kappa_only_matches_float64_svd(m, extra, log_kappa, seed, clustered, wide):
    w = _matrix(m, m + extra, log_kappa, seed, clustered)
    w = w if wide else w.T
    # eigvalsh_below=1 forces the Cholesky + Lanczos path even on these small matrices.
    smax, smin, fro2, methods = extreme_singular_values(w[None], eigvalsh_below=1)
    ref = torch.linalg.svdvals(w)
    kappa, ref_kappa = float(smax[0] / smin[0]), float(ref[0] / ref[-1])
    assert abs(kappa - ref_kappa) / ref_kappa <= 1e-6
    assert float(fro2[0]) == pytest.approx(float((ref * ref).sum()), rel=1e-12)
    if ref_kappa > 1.01e4:
        assert methods == ["svd"]  # beyond the Gram limit: the float64 SVD answers


def test_singular_matrix_falls_back_to_svd_and_ranks_last():
    w = torch.randn(8, 60).repeat(5, 1)  # exactly rank 8 (repeated rows), in any precision
    smax, smin, _, methods = extreme_singular_values(w[None], eigvalsh_below=1)
    assert methods == ["svd"] and float(smin[0]) <= 1e-10 * float(smax[0])
    model = torch.nn.Sequential(torch.nn.Linear(60, 40, bias=False), torch.nn.Linear(60, 40, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w)
    rep = analyze_model(model, cache=False, progress=False, kappa_only=True)
    assert rep.records[0].rank_deficient and math.isinf(rep.records[0].kappa)
    assert math.isnan(rep.records[0].entropy) and math.isnan(rep.records[0].snr)


def test_kappa_only_report_agrees_with_full_report():
    model = build_tiny_llama()
    full = analyze_model(model, cache=False, progress=False)
    fast = analyze_model(model, cache=False, progress=False, kappa_only=True)
    for a, b in zip(full.records, fast.records):
        assert b.kappa == pytest.approx(a.kappa, rel=1e-6) and b.stable_rank == pytest.approx(a.stable_rank, rel=1e-6)
    assert select_from_report(full, "kappa", top_p=0.3).parameter_names == select_from_report(fast, "kappa", top_p=0.3).parameter_names


def test_snr_policy_refuses_a_kappa_only_report_and_select_targets_picks_the_mode(tmp_path):
    model = build_tiny_llama()
    fast = analyze_model(model, cache=False, progress=False, kappa_only=True)
    with pytest.raises(ConfigError, match="κ-only"):
        select_from_report(fast, "snr", top_p=0.5)
    assert select_targets(model, "snr", top_p=0.5, progress=False, cache=False).scores  # full analysis underneath
    # A cached full analysis answers a later κ-only request.
    analyze_model(model, cache=tmp_path, progress=False)
    assert analyze_model(model, cache=tmp_path, progress=False, kappa_only=True).from_cache
