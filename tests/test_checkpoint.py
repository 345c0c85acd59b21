"""Streaming analysis from checkpoint files: same κ and selection as the in-memory path, resume, clear errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kappatune.analysis import analyze_model
from kappatune.checkpoint import analyze_checkpoint, open_checkpoint
from kappatune.errors import ModelError
from kappatune.models import build_tiny_llama, build_tiny_moe
from kappatune.selection import select_from_report


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=48, n_head=4, vocab_size=100, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()


MODELS = {
    "llama-tied-sharded": lambda: build_tiny_llama(),
    "gpt2-conv1d": _gpt2,
    "moe-fused": lambda: build_tiny_moe(),
}


def _save(model, d: Path, shard: str = "30KB") -> Path:
    model.save_pretrained(d, max_shard_size=shard)
    return d


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("kappa_only", [False, True])
def test_streamed_equals_in_memory(tmp_path, name, kappa_only):
    model = MODELS[name]()
    d = _save(model, tmp_path / name)
    mem = analyze_model(model, cache=False, progress=False, kappa_only=kappa_only)
    st = analyze_checkpoint(d, cache=False, progress=False, kappa_only=kappa_only)
    assert [r.name for r in st.records] == [r.name for r in mem.records]
    for a, b in zip(st.records, mem.records):
        assert (a.kind, a.modules, a.aliases, a.shape) == (b.kind, b.modules, b.aliases, b.shape), a.name
        assert a.kappa == pytest.approx(b.kappa, rel=1e-12), a.name
        if a.experts:
            assert [e["kappa"] for e in a.experts] == pytest.approx([e["kappa"] for e in b.experts], rel=1e-12)
    for policy in (["kappa"] if kappa_only else ["kappa", "snr"]):
        s1 = select_from_report(st, policy, top_p=0.5)
        s2 = select_from_report(mem, policy, top_p=0.5)
        assert s1.to_dict() == s2.to_dict()


def test_kinds_are_found_without_loading(tmp_path):
    d = _save(build_tiny_moe(), tmp_path / "m")
    rep = analyze_checkpoint(d, cache=False, progress=False, kappa_only=True)
    kinds = {r.kind for r in rep.records}
    assert {"moe", "linear", "embedding", "head"} <= kinds
    moe = [r for r in rep.records if r.kind == "moe"]
    assert moe and all(len(r.experts) == 4 and r.name.endswith(("gate_up_proj", "down_proj")) for r in moe)


def test_interrupted_scan_resumes_from_the_tensor_cache(tmp_path):
    d = _save(build_tiny_llama(), tmp_path / "m")
    code = (
        "import sys; from kappatune.checkpoint import analyze_checkpoint;"
        f"analyze_checkpoint({str(d)!r}, cache={str(tmp_path / 'c')!r}, progress=False)"
    )
    env = {**os.environ, "KAPPATUNE_FAULT": "write:*/tensors/*.json:5",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -9  # killed while writing the 5th per-tensor result
    done = list((tmp_path / "c" / "tensors").glob("*.json"))
    assert len(done) == 4
    rep = analyze_checkpoint(d, cache=tmp_path / "c", progress=False)
    assert rep.analysed_here == len(rep.records) - 4  # the four finished tensors were not redone
    fresh = analyze_checkpoint(d, cache=False, progress=False)
    assert [r.kappa for r in rep.records] == [r.kappa for r in fresh.records]
    again = analyze_checkpoint(d, cache=tmp_path / "c", progress=False)
    assert again.analysed_here == 0 and again.from_cache and again.fingerprint == rep.fingerprint


def test_truncated_shard_is_one_clear_error(tmp_path):
    d = _save(build_tiny_llama(), tmp_path / "m")
    shard = sorted(d.glob("*.safetensors"))[3]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelError, match=f"{shard.name}.*truncated"):
        analyze_checkpoint(d, cache=False, progress=False)


def test_missing_index_entry_is_one_clear_error(tmp_path):
    d = _save(build_tiny_llama(), tmp_path / "m")
    index = d / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    per_shard: dict[str, list[str]] = {}
    for k, v in data["weight_map"].items():
        per_shard.setdefault(v, []).append(k)
    # A projection stored alone in its shard: without its index entry, nothing points at that shard any more.
    victim = next(ks[0] for ks in per_shard.values() if len(ks) == 1 and ks[0].endswith("proj.weight"))
    del data["weight_map"][victim]
    index.write_text(json.dumps(data))
    with pytest.raises(ModelError, match=f"no tensor for {victim}"):
        analyze_checkpoint(d, cache=False, progress=False)


def test_index_naming_a_missing_shard_is_one_clear_error(tmp_path):
    d = _save(build_tiny_llama(), tmp_path / "m")
    sorted(d.glob("*.safetensors"))[0].unlink()
    with pytest.raises(ModelError, match="missing"):
        open_checkpoint(d)


def test_nan_tensor_is_one_clear_error(tmp_path):
    model = build_tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    d = _save(model, tmp_path / "m")
    with pytest.raises(ModelError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*NaN"):
        analyze_checkpoint(d, cache=False, progress=False)


def test_cli_select_streams_and_writes_peft_config(tmp_path, capsys):
    from kappatune.cli import main

    model = build_tiny_moe()
    d = _save(model, tmp_path / "m", shard="50MB")
    out = tmp_path / "peft.json"
    assert main(["select", str(d), "--top-p", "0.5", "-q", "--no-cache", "--peft-config", str(out)]) == 0
    frag = json.loads(out.read_text())
    from kappatune.selection import select_targets

    sel = select_targets(model, "kappa", top_p=0.5, progress=False, cache=False)
    assert frag["target_modules"] == sel.module_names
    assert frag.get("target_parameters", []) == sel.moe_parameter_names
    from peft import LoraConfig

    LoraConfig(r=4, **frag)  # a valid PEFT config


def test_cli_error_is_one_line(tmp_path, capsys):
    from kappatune.cli import main

    d = _save(build_tiny_llama(), tmp_path / "m")
    sorted(d.glob("*.safetensors"))[0].write_bytes(b"\x00" * 4)
    capsys.readouterr()  # the save's progress bar
    assert main(["analyze", str(d), "-q", "--no-cache"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kappatune: error:") and "\n" not in err


def test_shard_cut_after_opening_is_one_clear_error(tmp_path):
    d = _save(build_tiny_llama(), tmp_path / "m")
    ckpt = open_checkpoint(d)  # header read while the file was whole
    shard = sorted(d.glob("*.safetensors"))[3]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ModelError, match=f"{shard.name}: the file ends 100 bytes early"):
        analyze_checkpoint(ckpt, cache=False, progress=False)


def test_tensors_are_read_without_keeping_a_mapping(tmp_path):
    """Positioned reads: the loaded tensor owns its memory and no shard stays mapped (mapped pages that were read
    would count in the RSS until unmapped)."""
    model = build_tiny_llama()
    d = _save(model, tmp_path / "m")
    ckpt = open_checkpoint(d)
    key = "model.layers.0.mlp.up_proj.weight"
    t = ckpt.load(key)
    assert torch.equal(t, model.state_dict()[key])
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert ".safetensors" not in maps.read_text()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_blockwise_float64_gram_matches_a_float64_product(dtype):
    from kappatune.analysis import _lower_gram, _symmetrize_lower_

    torch.manual_seed(0)
    w = torch.randn(3, 600, 9000).to(dtype)  # 2 row blocks; 9 float64 column blocks with this block size
    g = _lower_gram(w, block_bytes=600 * 8 * 1000)
    ref = w.double() @ w.double().mT
    low = torch.ones(600, 600, dtype=torch.bool).tril()
    assert torch.allclose(g[:, low], ref[:, low], rtol=1e-13, atol=1e-10 * float(ref.abs().max()))
    assert torch.equal(_lower_gram(w[1:2], block_bytes=600 * 8 * 1000), g[1:2])  # same bits alone or in a batch
    full = _symmetrize_lower_(g.clone())
    assert torch.equal(full, full.mT) and torch.equal(full[:, low], g[:, low])
