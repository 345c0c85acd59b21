"""Sharded training (FSDP2 through ``accelerate launch --config_file configs/accelerate/fsdp.yaml``) on two CPU
processes with gloo: every method on tiny-llama and tiny-moe matches the single-process run, selective methods
leave every other tensor bitwise unchanged and keep optimizer state for the selection only, split over the
ranks; one rank SIGKILLed mid-stage, then ``--resume``, ends with the same numbers.

Two processes cost ~10 s each to start here, so all methods run in ONE launched bench per model (tiny sizes,
3 steps per stage), compared against the same bench run in this process. Evaluation is split across the ranks
(each evaluates half of the batches); the base model's perplexities must equal the one-process ones bitwise.

Tolerance: ``rtol=1e-5`` on every perplexity and training loss. One process averages the loss over the whole
global batch; two FSDP processes each average their half and FSDP reduce-scatters (averages) the gradients, so
float32 sums are added in a different order (measured: at most 5e-7 relative after 6 steps). A wrong shard, a
missed gradient or lost optimizer state changes these numbers by orders of magnitude more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kappatune.errors import ConfigError
from kappatune.harness import bench, validate
from run_helpers import free_port, make_corpora, tiny_run_config

REPO = Path(__file__).resolve().parents[1]
FSDP_YAML = REPO / "configs" / "accelerate" / "fsdp.yaml"
RTOL = 1e-5

METHODS = [
    {"name": "full", "label": "full"},
    {"name": "selective", "label": "kappatune", "options": {"policy": "kappa", "top_p": 0.3}},
    {"name": "selective", "label": "spectrum", "options": {"policy": "snr", "top_p": 0.3}},
    {"name": "selective", "label": "random", "options": {"policy": "random", "top_p": 0.3}},
    {"name": "lora", "label": "lora", "options": {"rank": 4}},
    {"name": "lora", "label": "kappa-lora", "options": {"rank": 4, "policy": "kappa", "top_p": 0.5}},
    {"name": "eigentune", "label": "eigentune", "options": {"rank": 4}, "lr": 0.05},
    {"name": "curlora", "label": "curlora", "options": {"rank": 4}, "lr": 0.05},
]
# tiny-moe: KappaTune restricted to the fused 3-D expert tensors (the lowest-κ ones of them)
MOE_EXTRA = [{"name": "selective", "label": "kappatune-experts", "options": {"policy": "kappa", "top_p": 0.5, "include": ["experts"]}}]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, str]:
    return make_corpora(tmp_path_factory.mktemp("corpora"), n_docs=40, salt="0")


def _bench_cfg(corpora: dict[str, str], out: Path, model: str) -> dict:
    cfg = tiny_run_config(
        corpora, out, name=f"fsdp-{model}",
        # global batch 8 = 2 processes x 2 micro-batches of 2: gradient accumulation under FSDP too
        training={"steps": 3, "batch_size": 8, "micro_batch_size": 2, "seq_len": 32, "lr": 3e-3, "warmup_steps": 1,
                  "weight_decay": 0.01, "checkpoint_every": 1},
        eval={"max_blocks": 6, "batch_size": 4},  # 2 batches per corpus: one per rank
        output={"plots": False, "spectrum_plot": False, "save_model": True},
    )
    cfg["model"] = model
    cfg["num_threads"] = 1
    cfg["tasks"] = cfg["tasks"][:1]  # one stage: the cost is per cell, and stage chaining is tested without FSDP
    del cfg["method"]
    cfg["methods"] = METHODS + (MOE_EXTRA if model == "tiny-moe" else [])
    return cfg


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    for k in ("KAPPATUNE_FAULT", "KAPPATUNE_FAULT_RANK", "ACCELERATE_USE_FSDP", "FSDP_VERSION"):
        env.pop(k, None)
    return env


def _launch(*args: str, env: dict | None = None, timeout: int = 400) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file configs/accelerate/fsdp.yaml -m kappatune.cli ARGS`` on 2 CPU processes."""
    port = str(free_port())
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_YAML), "--num_processes", "2",
           "--main_process_port", port, "-m", "kappatune.cli", *args]
    return subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=timeout)


def _key(res: dict) -> tuple:
    return res["matrix"]["task_ppl"], res["matrix"]["control_ppl"], [s["losses"] for s in res["stages"]]


def _cell(root: Path, label: str) -> dict:
    return json.loads((root / label / "seed-0" / "results.json").read_text())


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-moe"])
def benches(request, corpora, tmp_path_factory):
    """(config, single-process bench dir, FSDP bench dir) for one model."""
    model = request.param
    d = tmp_path_factory.mktemp(model)
    cfg = _bench_cfg(corpora, d / "fsdp", model)
    path = d / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    proc = _launch("bench", str(path), "-q")
    assert proc.returncode == 0, proc.stderr[-4000:]
    torch.set_num_threads(1)
    bench({**cfg, "output_dir": str(d / "single")}, progress=False)
    return cfg, d / "single", d / "fsdp"


def test_every_method_matches_one_process_with_sharded_optimizer_state(benches):
    cfg, single, fsdp = benches
    for spec in cfg["methods"]:
        label = spec["label"]
        one, two = _cell(single, label), _cell(fsdp, label)
        assert one["trainable_params"] == two["trainable_params"]
        # the base model evaluated with the batches split over 2 ranks: bitwise the one-process numbers
        assert (two["matrix"]["task_ppl"][0], two["matrix"]["control_ppl"][0]) == (one["matrix"]["task_ppl"][0], one["matrix"]["control_ppl"][0])
        for a, b in zip(_key(two), _key(one)):
            np.testing.assert_allclose(a, b, rtol=RTOL, err_msg=label)
        for st_one, st in zip(one["stages"], two["stages"]):
            assert st["processes"] == 2 and st["fsdp"] is True
            per_rank, total = st["optimizer_state_bytes_per_rank"], st_one["optimizer_state_bytes"]
            assert sum(per_rank) == total, label  # the shards partition the state exactly
            assert max(per_rank) <= 0.6 * total, (label, per_rank, total)  # ...and each rank holds about half
            if spec["name"] in ("full", "selective"):  # AdamW: two fp32 moments per trained weight, nothing else
                assert total == 2 * 4 * one["trainable_params"], label
        assert two["files"]["model"] == "final/model"


def test_selective_leaves_every_other_tensor_bitwise_unchanged_and_merged_model_loads(benches):
    from transformers import AutoModelForCausalLM

    from kappatune.models import load_model

    cfg, single, fsdp = benches
    base = dict(load_model(cfg["model"])[0].named_parameters())
    labels = ["kappatune"] + (["kappatune-experts"] if cfg["model"] == "tiny-moe" else [])
    for label in labels:
        res = _cell(fsdp, label)
        merged = AutoModelForCausalLM.from_pretrained(fsdp / label / "seed-0" / "final" / "model")
        ref = dict(AutoModelForCausalLM.from_pretrained(single / label / "seed-0" / "final" / "model").named_parameters())
        from safetensors.torch import load_file

        trained = set(load_file(fsdp / label / "seed-0" / "final" / "adapter.safetensors"))
        assert trained and sum(base[n].numel() for n in trained) == res["trainable_params"]
        if label == "kappatune-experts":
            assert all(base[n].ndim == 3 for n in trained)  # fused MoE expert tensors were the selection
        for n, p in merged.named_parameters():
            if n in trained:
                assert not torch.equal(p, base[n]), n
                torch.testing.assert_close(p, ref[n], rtol=1e-4, atol=1e-6)
            else:
                assert torch.equal(p, base[n]), f"{label}: frozen tensor {n} changed under FSDP"


def test_sigkill_of_one_rank_mid_stage_then_resume_gives_the_same_metrics(benches, tmp_path):
    cfg, _, fsdp = benches
    if cfg["model"] != "tiny-llama":
        pytest.skip("one kill/resume test (tiny-llama) is enough; the code path does not depend on the model")
    run_cfg = {k: v for k, v in cfg.items() if k != "methods"}
    run_cfg["method"] = next(m for m in cfg["methods"] if m["label"] == "kappatune")
    run_cfg["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_cfg), encoding="utf-8")
    env = _env()
    env["KAPPATUNE_FAULT"], env["KAPPATUNE_FAULT_RANK"] = "train_step:2", "1"  # rank 1, after step 2 (before its checkpoint)
    proc = _launch("run", str(path), "-q", env=env)
    assert proc.returncode != 0
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["stages_done"] == 0
    assert (tmp_path / "run" / "checkpoints" / "mid" / "step-000001" / "meta.json").is_file()
    proc = _launch("run", str(path), "--resume", "-q")
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = json.loads((tmp_path / "run" / "results.json").read_text())
    assert resumed["stages"][0]["resumed_from_step"] == 1  # from the sharded (DCP) mid-stage checkpoint
    assert _key(resumed) == _key(_cell(fsdp, "kappatune"))  # same processes, same order: bitwise the same


def test_a_method_that_cannot_be_sharded_is_refused_before_training(corpora, tmp_path, monkeypatch):
    cfg = _bench_cfg(corpora, tmp_path, "tiny-llama")
    cfg["methods"] = [{"name": "selective", "label": "ok"}, {"name": "osf", "label": "osf"}]
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match=r"method 'osf' cannot be trained under FSDP: its guarantee projects each whole weight gradient"):
        validate(cfg, deep=False)
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match=r"kappatune shards with FSDP2"):
        validate(cfg, deep=False)
