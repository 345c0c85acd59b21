"""Spectral analysis: numbers agree with float64 SVD, every tensor kind is found, edge cases are explicit."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import types

import pytest
import torch
from torch import nn

from kappatune.analysis import analyze_model, iter_weights, singular_values, spectrum_from_singular_values
from kappatune.errors import ModelError
from kappatune.models import build_tiny_llama, build_tiny_moe
from run_helpers import free_port


def matrix_with_kappa(m: int, n: int, kappa: float, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """A random m×n matrix whose singular values decay geometrically from 1 to 1/kappa."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -math.log10(kappa), k, dtype=torch.float64)
    return (u @ torch.diag(s) @ v.T).to(dtype)


def model_of(*weights: torch.Tensor) -> nn.Module:
    seq = nn.Sequential(*[nn.Linear(w.shape[1], w.shape[0], bias=False) for w in weights])
    with torch.no_grad():
        for lin, w in zip(seq, weights):
            lin.weight.copy_(w)
    return seq


def reference_kappa(w: torch.Tensor) -> float:
    s = torch.linalg.svdvals(w.double())
    return float(s[0] / s[-1])


@pytest.mark.parametrize("kappa", [1.5, 30.0, 2e3, 9e4, 8e5])
@pytest.mark.parametrize("shape", [(48, 48), (32, 80), (96, 40)])
def test_kappa_matches_float64_svd(kappa, shape):
    w = matrix_with_kappa(*shape, kappa=kappa, seed=int(kappa) % 97)
    rep = analyze_model(model_of(w), cache=False, progress=False)
    (rec,) = rep.records
    ref = reference_kappa(w)
    assert abs(rec.kappa - ref) / ref <= 1e-6
    assert rec.method == ("gram" if ref <= 1e4 else "svd")
    s = torch.linalg.svdvals(w.double())
    assert rec.sigma_max == pytest.approx(float(s[0]), rel=1e-9)
    assert rec.sigma_min == pytest.approx(float(s[-1]), rel=1e-6)


def test_batched_singular_values_equal_per_matrix_svd():
    mats = torch.stack([matrix_with_kappa(20, 36, k, seed=i) for i, k in enumerate([2.0, 50.0, 3e5, 7.0])])
    sv, methods = singular_values(mats)
    ref = torch.linalg.svdvals(mats.double())
    assert torch.allclose(sv, ref, rtol=1e-6, atol=1e-12)
    assert methods == ["gram", "gram", "svd", "gram"]


def test_derived_figures_match_definitions():
    w = matrix_with_kappa(30, 50, 100.0)
    s = torch.linalg.svdvals(w.double())
    f = spectrum_from_singular_values(s, w.shape)
    assert f["stable_rank"] == pytest.approx(float((s**2).sum() / s[0] ** 2))
    p = s / s.sum()
    assert f["entropy"] == pytest.approx(float(-(p * p.log()).sum()))
    iqr = float(torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / 1.349
    edge = iqr * (1 + math.sqrt(30 / 50))
    snr = float(s[s > edge].sum() / s[s <= edge].sum()) / float(s[0])
    assert f["snr"] == pytest.approx(snr)


def test_rank_deficient_and_zero_matrices_get_infinite_kappa_and_rank_last():
    good = matrix_with_kappa(16, 16, 5.0)
    low = matrix_with_kappa(4, 16, 3.0).repeat(4, 1)  # exactly rank 4 (repeated rows), in any precision
    zero = torch.zeros(16, 16)
    rep = analyze_model(model_of(low, good, zero), cache=False, progress=False)
    by = {r.name: r for r in rep.records}
    assert math.isinf(by["0.weight"].kappa) and by["0.weight"].rank_deficient
    assert math.isinf(by["2.weight"].kappa) and by["2.weight"].sigma_max == 0.0
    assert math.isfinite(by["1.weight"].kappa)
    assert [r.name for r in rep.sorted("kappa")][0] == "1.weight"
    assert "rank-deficient" in rep.table()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weight_raises_naming_the_tensor(bad):
    w = matrix_with_kappa(8, 8, 3.0)
    w[2, 3] = bad
    with pytest.raises(ModelError, match=r"'1\.weight'.*NaN or Inf"):
        analyze_model(model_of(matrix_with_kappa(8, 8, 2.0), w), cache=False, progress=False)


def test_model_without_analysable_weight_is_an_error():
    with pytest.raises(ModelError, match="no analysable weight"):
        analyze_model(nn.Sequential(nn.LayerNorm(8), nn.ReLU()), cache=False, progress=False)


def test_every_tensor_kind_is_found():
    from transformers.pytorch_utils import Conv1D

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.lin = nn.Linear(6, 5)
            self.c1d = Conv1D(7, 6)  # GPT-2 style: weight stored (in=6, out=7)
            self.conv = nn.Conv2d(3, 4, 3)
            self.experts = nn.Module()
            self.experts.gate_up_proj = nn.Parameter(torch.randn(3, 8, 6))
            self.norm = nn.LayerNorm(6)

    m = Mixed()
    kinds = {r.name: r.kind for r in iter_weights(m)}
    assert kinds == {"emb.weight": "embedding", "lin.weight": "linear", "c1d.weight": "conv1d",
                     "conv.weight": "param", "experts.gate_up_proj": "moe"}
    rep = analyze_model(m, cache=False, progress=False)
    by = {r.name: r for r in rep.records}
    assert by["c1d.weight"].kappa == pytest.approx(reference_kappa(m.c1d.weight), rel=1e-6)
    assert by["conv.weight"].kappa == pytest.approx(reference_kappa(m.conv.weight.reshape(4, -1)), rel=1e-6)
    per_expert = [reference_kappa(m.experts.gate_up_proj[e]) for e in range(3)]
    moe = by["experts.gate_up_proj"]
    assert [e["kappa"] for e in moe.experts] == pytest.approx(per_expert, rel=1e-6)
    assert moe.kappa == pytest.approx(sum(per_expert) / 3, rel=1e-6)


def test_filters_min_ndim_max_dim_include_exclude():
    m = build_tiny_llama()
    names = {r.name for r in iter_weights(m)}
    assert not any("norm" in n for n in names)  # 1-D skipped
    assert {r.name for r in iter_weights(m, max_dim_size=100)} == {n for n in names if "mlp" not in n and "embed" not in n}
    assert all("q_proj" in r.name for r in iter_weights(m, include=["q_proj"]))
    assert not any("self_attn" in r.name for r in iter_weights(m, exclude=["re:self_attn\\.[qk]_proj", "*v_proj*", "o_proj"]))


def test_tied_weights_analysed_once():
    m = build_tiny_llama()
    assert m.lm_head.weight is m.model.embed_tokens.weight
    rep = analyze_model(m, cache=False, progress=False)
    tied = [r for r in rep.records if "embed_tokens" in r.name or "lm_head" in r.name or "lm_head.weight" in r.aliases]
    assert len(tied) == 1 and tied[0].aliases == ["lm_head.weight"] and tied[0].kind == "head"
    assert len(rep.records) == len({id(p) for p in m.parameters() if p.dim() == 2})


def test_bitsandbytes_weights_are_dequantized(monkeypatch):
    calls = []
    fake = types.ModuleType("bitsandbytes.functional")

    def dequantize_4bit(data, state):
        calls.append(state)
        return state["full"]

    fake.dequantize_4bit = dequantize_4bit
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", fake)
    full = matrix_with_kappa(12, 10, 40.0)
    lin = nn.Linear(10, 12, bias=False)
    packed = nn.Parameter(torch.zeros(60, 1, dtype=torch.uint8), requires_grad=False)  # what a 4-bit weight looks like
    packed.quant_state = {"full": full}
    lin.weight = packed
    rep = analyze_model(nn.Sequential(lin), cache=False, progress=False)
    assert calls and rep.records[0].kappa == pytest.approx(40.0, rel=1e-5)


def test_cache_is_keyed_by_weights_and_fast(tmp_path):
    m = build_tiny_moe()
    first = analyze_model(m, cache=tmp_path, progress=False)
    t0 = time.perf_counter()
    again = analyze_model(m, cache=tmp_path, progress=False)
    assert again.from_cache and time.perf_counter() - t0 < 1.0
    assert [r.to_dict() for r in again.records] == [r.to_dict() for r in first.records]
    with torch.no_grad():
        m.model.layers[0].self_attn.q_proj.weight.mul_(1.5)  # same "file name", different weights
    changed = analyze_model(m, cache=tmp_path, progress=False)
    assert not changed.from_cache and changed.fingerprint != first.fingerprint


def test_corrupt_cache_entry_is_recomputed_with_a_warning(tmp_path):
    m = build_tiny_llama()
    rep = analyze_model(m, cache=tmp_path, progress=False)
    path = tmp_path / f"{rep.fingerprint}.json"
    data = json.loads(path.read_text())
    data["records"][0]["kappa"] = 12345.0  # tampered: checksum no longer matches
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="corrupt"):
        again = analyze_model(m, cache=tmp_path, progress=False)
    assert not again.from_cache and again.records[0].kappa == rep.records[0].kappa
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="corrupt"):
        analyze_model(m, cache=tmp_path, progress=False)


def test_quiet_mode_prints_nothing(capfd):
    analyze_model(build_tiny_llama(), cache=False, progress=False)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_progress_bar_shown(capfd):
    analyze_model(build_tiny_llama(), cache=False, progress=True)
    assert "Analysing weight spectra" in capfd.readouterr().err


def test_report_json_round_trip_and_plot(tmp_path):
    from kappatune.analysis import SpectrumReport

    rep = analyze_model(build_tiny_moe(), cache=False, progress=False)
    rep.save_json(tmp_path / "r.json")
    back = SpectrumReport.from_json_dict(json.loads((tmp_path / "r.json").read_text()))
    assert [r.to_dict() for r in back.records] == [r.to_dict() for r in rep.records]
    rep.plot(tmp_path / "k.png")
    assert (tmp_path / "k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


DIST_SCRIPT = r"""
import json, os, sys, torch, torch.distributed as dist
from kappatune.analysis import analyze_model
from kappatune.models import build_tiny_moe
dist.init_process_group("gloo")
rep = analyze_model(build_tiny_moe(), cache=False, progress=False)
if dist.get_rank() == 0:
    print(json.dumps({"records": [r.to_dict() for r in rep.records], "here": rep.analysed_here}))
else:
    print(json.dumps({"here": rep.analysed_here}), file=sys.stderr)
dist.destroy_process_group()
"""


def test_distributed_analysis_splits_work_and_matches_single_process(tmp_path):
    script = tmp_path / "dist.py"
    script.write_text(DIST_SCRIPT)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", str(script)],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("{"))
    got = json.loads(line)
    single = analyze_model(build_tiny_moe(), cache=False, progress=False)
    assert got["records"] == [json.loads(json.dumps(r.to_dict())) for r in single.records]
    assert 0 < got["here"] < len(single.records)


def test_blocked_lower_gram_path_matches_svd():
    """Matrices with ≥ 512 rows take the blocked lower-triangle Gram path."""
    mats = torch.stack([matrix_with_kappa(600, 700, k, seed=i) for i, k in enumerate([3.0, 400.0])])
    sv, methods = singular_values(mats)
    assert methods == ["gram", "gram"]
    assert torch.allclose(sv, torch.linalg.svdvals(mats.double()), rtol=1e-6, atol=1e-12)
