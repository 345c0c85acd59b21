"""Continual-learning harness: config validation, metrics, determinism, kill/resume, 2-process DDP, bench.

Everything runs on tiny-llama (byte tokenizer) and small generated corpora, so the whole file takes about a minute.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kappatune.config import config_from_dict, config_fingerprint, load_config
from kappatune.errors import ConfigError
from kappatune.harness import bench, compute_metrics, run
from run_helpers import free_port, make_corpora, tiny_run_config, subprocess_env as _env

REPO = Path(__file__).resolve().parents[1]

@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("corpora")
    return make_corpora(d, n_docs=40, salt="0")


def _cfg(corpora: dict[str, str], out: Path, **over) -> dict:
    return tiny_run_config(
        corpora, out, name="t",
        training={"steps": 6, "batch_size": 4, "seq_len": 32, "lr": 3e-3, "warmup_steps": 1},
        eval={"max_blocks": 8, "batch_size": 8},
        output={"plots": False},
        **over,
    )


def _key_metrics(results: dict) -> dict:
    return {"matrix": results["matrix"], "losses": [s["losses"] for s in results["stages"]],
            "trainable": results["trainable_params"]}




def _write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Config validation (static)
# ---------------------------------------------------------------------------------------------------------------
def test_unknown_keys_are_rejected_with_the_closest_valid_key(corpora, tmp_path):
    cfg = _cfg(corpora, tmp_path)
    cfg["trainig"] = cfg.pop("training")
    with pytest.raises(ConfigError, match=r"unknown key 'trainig' \(did you mean 'training'\?\)"):
        config_from_dict(cfg)
    cfg = _cfg(corpora, tmp_path, training__stepz=3)
    with pytest.raises(ConfigError, match=r"'training.stepz' \(did you mean 'steps'\?\)"):
        config_from_dict(cfg)


@pytest.mark.parametrize(
    "over, pattern",
    [
        ({"training__steps": 0}, r"training.steps must be > 0"),
        ({"training__lr": -1.0}, r"training.lr must be > 0"),
        ({"training__schedule": "cosin"}, r"did you mean 'cosine'"),
        ({"eval__eval_fraction": 1.5}, r"eval.eval_fraction must be in \(0, 1\)"),
        ({"training__batch_size": "four"}, r"training.batch_size must be an integer"),
        ({"budget": 0}, r"budget must be > 0"),
        ({"tasks": []}, r"tasks must list at least one corpus"),
    ],
)
def test_static_config_errors(corpora, tmp_path, over, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(_cfg(corpora, tmp_path, **over))


def test_yaml_errors_and_overrides(corpora, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny-llama\ntasks: [a, b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_config(bad)
    good = _write_yaml(tmp_path / "good.yaml", _cfg(corpora, tmp_path / "o"))
    cfg = load_config(good, ["training.steps=9", "seed=3", "method.options.top_p=0.25"])
    assert (cfg.training.steps, cfg.seed, cfg.method.options["top_p"]) == (9, 3, 0.25)
    assert config_fingerprint(cfg) != config_fingerprint(load_config(good))
    # output location and progress display do not change results, so they do not change the fingerprint
    assert config_fingerprint(load_config(good, ["output_dir=elsewhere", "progress=true"])) == config_fingerprint(load_config(good))


# ---------------------------------------------------------------------------------------------------------------
# Bad configs fail before any training, with one clear line (CLI exit 2)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "over, pattern",
    [
        ({"method": {"name": "kapatune-selective"}}, r"unknown method 'kapatune-selective'"),
        ({"tasks": [{"corpus": "/nonexistent/dir/task.txt"}]}, r"data file /nonexistent/dir/task.txt does not exist"),
        ({"training__steps": 0}, r"training.steps must be > 0"),
        ({"budget": 10**9}, r"cannot land within ±10% of 1,000,000,000 trainable parameters"),
        ({"method": {"name": "lora", "options": {"rank": 4096}}}, r"rank 4096 is larger than the matrix"),
    ],
)
def test_bad_configs_fail_before_training(corpora, tmp_path, capsys, over, pattern):
    from kappatune.cli import main

    out = tmp_path / "out"
    path = _write_yaml(tmp_path / "c.yaml", _cfg(corpora, out, **over))
    code = main(["run", str(path), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("kappatune: error:"), err
    assert re.search(pattern, err), err
    # nothing was trained: no stage checkpoint, no stage in any state file
    assert not (out / "checkpoints").exists()
    if (out / "state.json").exists():
        assert json.loads((out / "state.json").read_text())["stages_done"] == 0


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------
def test_compute_metrics_by_hand():
    # rows: base, after task a, after task b, after task c ; columns: tasks a, b, c
    R = [[10.0, 20.0, 40.0], [5.0, 19.0, 41.0], [6.0, 10.0, 39.0], [8.0, 12.0, 20.0]]
    ctrl = [30.0, 31.0, 33.0, 36.0]
    m = compute_metrics(R, ctrl, ["a", "b", "c"])
    assert m["final_avg_task_ppl"] == pytest.approx((8 + 12 + 20) / 3)
    assert m["bwt_ppl"] == pytest.approx(((5 - 8) + (10 - 12)) / 2)  # negative: forgetting
    assert m["forgetting_per_task"] == pytest.approx({"a": 8 - 5, "b": 12 - 10})
    assert m["task_gain_pct"] == pytest.approx(((10 - 8) / 10 + (20 - 12) / 20 + (40 - 20) / 40) / 3 * 100)
    assert m["learning_gain_pct"] == pytest.approx(((10 - 5) / 10 + (20 - 10) / 20 + (40 - 20) / 40) / 3 * 100)
    assert m["control_change_abs"] == pytest.approx(6.0)
    assert m["control_change_pct"] == pytest.approx(20.0)
    one = compute_metrics(R[:2], ctrl[:2], ["a", "b", "c"])  # partial run: no BWT yet
    assert "bwt_ppl" not in one and one["stages_done"] == 1


# ---------------------------------------------------------------------------------------------------------------
# A run: outputs, determinism, refusal to clobber / resume a different config
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(corpora, tmp_path_factory):
    """One uninterrupted run every resume test compares with (checkpoint_every does not affect results)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    return run(_cfg(corpora, out, output__plots=True))


def test_run_writes_everything_and_learns(reference, corpora):
    out = Path(reference["config"]["output_dir"])
    for f in ("results.json", "results.md", "state.json", "final/adapter.safetensors",
              "plots/forgetting_heatmap.png", "plots/control_vs_task.png", "plots/kappa_spectrum.png"):
        assert (out / f).is_file(), f
    r = reference
    assert r["status"] == "complete" and len(r["matrix"]["task_ppl"]) == 3 and r["matrix"]["rows"][0] == "base"
    # each task's perplexity drops when it is trained (lr 3e-3 on a random tiny model)
    assert r["matrix"]["task_ppl"][1][0] < r["matrix"]["task_ppl"][0][0]
    assert r["matrix"]["task_ppl"][2][1] < r["matrix"]["task_ppl"][1][1]
    assert r["libraries"]["torch"] and r["config"]["model"] == "tiny-llama"
    # selective training: only the selected tensors changed, and the spectrum covers exactly those
    assert 0 < r["trainable_params"] < r["total_params"]
    assert len(r["spectrum"]["names"]) > 0
    assert all(s["peak_rss_mb"] > 0 and s["wall_time_s"] > 0 for s in r["stages"])
    assert "| base |" in (out / "results.md").read_text()


def test_same_config_same_metrics(reference, corpora, tmp_path):
    again = run(_cfg(corpora, tmp_path / "again", output__plots=True))
    assert _key_metrics(again) == _key_metrics(reference)


def test_existing_run_is_not_clobbered_and_changed_config_not_resumed(reference, corpora, tmp_path):
    out = Path(reference["config"]["output_dir"])
    cfg = _cfg(corpora, out, output__plots=True)
    mtime = (out / "results.json").stat().st_mtime_ns
    assert run(cfg)["matrix"] == reference["matrix"]  # complete with the same config: returned, not re-run
    assert run(cfg, resume=True)["matrix"] == reference["matrix"]
    assert (out / "results.json").stat().st_mtime_ns == mtime
    with pytest.raises(ConfigError, match="already holds a run"):
        run(_cfg(corpora, out, output__plots=True, seed=1))  # another config must not overwrite it
    changed = _cfg(corpora, out, output__plots=True, training__lr=1e-3)
    with pytest.raises(ConfigError, match=r"config differs.*training.lr: 0.003 -> 0.001.*--force"):
        run(changed, resume=True)


def test_force_starts_over_with_identical_results(reference, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference["config"]["output_dir"], out)
    (out / "checkpoints" / "stray.txt").write_text("x")
    cfg = {**reference["config"], "output_dir": str(out)}
    again = run(cfg, force=True)
    assert _key_metrics(again) == _key_metrics(reference)
    # only the run's own files were cleared first: a user's file inside checkpoints/ is kept
    assert (out / "checkpoints" / "stray.txt").read_text() == "x"


# ---------------------------------------------------------------------------------------------------------------
# Kill -9 and resume
# ---------------------------------------------------------------------------------------------------------------
def _spawn(cfg_path: Path, *args: str, fault: str | None = None) -> subprocess.Popen:
    env = _env()
    if fault:
        env["KAPPATUNE_FAULT"] = fault
    return subprocess.Popen([sys.executable, "-m", "kappatune.cli", "run", str(cfg_path), "-q", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize(
    "fault, every, resumed_from",
    [
        ("train_step:9", 2, 2),  # stage 2, step 3: resumes from the step-2 mid-stage checkpoint
        ("checkpoint_write:10", 2, 2),  # killed mid-write of the stage-2 step-4 checkpoint: the step-2 one is used
        ("stage_commit:4", 0, 0),  # killed after the stage-2 tensors, before state.json: stage 2 is redone
    ],
)
def test_sigkill_mid_stage_then_resume_gives_identical_metrics(reference, corpora, tmp_path, fault, every, resumed_from):
    out = tmp_path / "run"
    path = _write_yaml(tmp_path / "c.yaml", _cfg(corpora, out, output__plots=True, training__checkpoint_every=every))
    proc = _spawn(path, fault=fault)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    state = json.loads((out / "state.json").read_text())
    assert state["stages_done"] == 1 and not state["complete"]  # died inside stage 2
    with pytest.raises(ConfigError, match=r"already holds a run \(1/2 stages done\); pass --resume"):
        run(load_config(path))
    run(load_config(path), resume=True)  # in-process: the kill was real, the resume needs no second interpreter
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["stages"][1]["resumed_from_step"] == resumed_from
    assert _key_metrics(resumed) == _key_metrics(reference)


def test_sigkill_resume_with_a_method_that_replaces_its_parameters(corpora, tmp_path):
    """OSF swaps its parameter objects on load and folds each task in (next_task) between stages."""
    cfg = _cfg(corpora, tmp_path / "ref", method={"name": "osf"}, training__checkpoint_every=2)
    ref = run(cfg)
    out = tmp_path / "run"
    path = _write_yaml(tmp_path / "c.yaml", {**cfg, "output_dir": str(out)})
    proc = _spawn(path, fault="train_step:9")  # stage 2, after the first OSF next_task
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    resumed = run({**cfg, "output_dir": str(out)}, resume=True)
    assert resumed["stages"][1]["resumed_from_step"] == 2
    assert _key_metrics(resumed) == _key_metrics(ref)


def test_external_sigkill_then_resume(reference, corpora, tmp_path):
    """The test itself kills the process (kill -9) as soon as stage 1 is committed, wherever it then is."""
    out = tmp_path / "run"
    path = _write_yaml(tmp_path / "c.yaml", _cfg(corpora, out, output__plots=True, training__checkpoint_every=1))
    proc = _spawn(path)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        st = out / "state.json"
        try:
            if st.is_file() and json.loads(st.read_text())["stages_done"] >= 1:
                break
        except (ValueError, OSError):
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    proc = _spawn(path, "--resume")  # (kept as a real `kappatune run --resume` process)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert _key_metrics(json.loads((out / "results.json").read_text())) == _key_metrics(reference)


# ---------------------------------------------------------------------------------------------------------------
# Two processes (gloo DDP through accelerate) match one process
# ---------------------------------------------------------------------------------------------------------------
def test_two_process_gloo_matches_single_process(reference, corpora, tmp_path):
    out = tmp_path / "ddp"
    path = _write_yaml(tmp_path / "c.yaml", _cfg(corpora, out, output__plots=True))
    env = _env()
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "kappatune.cli", "run", str(path), "-q"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((out / "results.json").read_text())
    assert ddp["config"]["training"]["batch_size"] == 4  # global batch: 2 per process
    import numpy as np

    np.testing.assert_allclose(ddp["matrix"]["task_ppl"], reference["matrix"]["task_ppl"], rtol=2e-3)
    np.testing.assert_allclose(ddp["matrix"]["control_ppl"], reference["matrix"]["control_ppl"], rtol=2e-3)
    np.testing.assert_allclose(ddp["stages"][0]["losses"], reference["stages"][0]["losses"], rtol=2e-3)
    assert ddp["trainable_params"] == reference["trainable_params"]


# ---------------------------------------------------------------------------------------------------------------
# Bench: 3 methods x 2 seeds at a matched budget, finished cells not re-run
# ---------------------------------------------------------------------------------------------------------------
def test_bench_three_methods_two_seeds(corpora, tmp_path, monkeypatch):
    cfg = _cfg(corpora, tmp_path / "bench", output__plots=True, output__spectrum_plot=False)
    del cfg["method"]
    cfg.update(
        name="bench-tiny", budget=20480, seeds=[0, 1],
        methods=[
            {"name": "selective", "label": "kappatune", "options": {"policy": "kappa"}},
            {"name": "selective", "label": "random-selective", "options": {"policy": "random"}},
            {"name": "lora", "label": "lora"},
        ],
    )
    t0 = time.time()
    summary = bench(cfg)
    elapsed = time.time() - t0
    assert elapsed < 120, elapsed
    labels = [m["label"] for m in summary["methods"]]
    assert labels == ["kappatune", "random-selective", "lora"] and len(summary["ran"]) == 6
    for m in summary["methods"]:
        tp = m["metrics"]["trainable_params"]
        assert abs(tp["mean"] - 20480) <= 0.10 * 20480  # matched budget
        assert m["metrics"]["task_gain_pct"]["n"] == 2 and m["metrics"]["task_gain_pct"]["std"] is not None
    # the base model is evaluated once and shared by every cell
    bases = set()
    for m in summary["methods"]:
        for d in m["dirs"].values():
            bases.add(json.dumps(json.loads((Path(d) / "results.json").read_text())["base"]["task_ppl"], sort_keys=True))
    assert len(bases) == 1
    # random selection depends on the seed, κ selection does not
    rnd = summary["methods"][1]["dirs"]
    r0, r1 = (json.loads((Path(rnd[s]) / "results.json").read_text()) for s in ("0", "1"))
    assert r0["matrix"] != r1["matrix"]
    out = tmp_path / "bench"
    assert (out / "pareto.png").is_file() and (out / "bench.md").is_file() and (out / "bench.json").is_file()
    assert "±" in (out / "bench.md").read_text()
    import importlib

    bench_module = importlib.import_module("kappatune.harness.bench")  # (kappatune.harness.bench is the function)

    def no_validation(*a, **k):
        raise AssertionError("a bench whose cells are all complete must not load the model to validate")

    monkeypatch.setattr(bench_module, "validate", no_validation)  # the binding bench() calls
    again = bench(cfg)
    assert again["ran"] == [] and len(again["skipped"]) == 6
    assert again["methods"][0]["metrics"] == summary["methods"][0]["metrics"]


def test_batch_schedule_depends_only_on_seed_and_stage():
    from kappatune.training import batch_schedule

    a = batch_schedule(10, 4, 6, seed=0, stage=1)
    assert a.shape == (6, 4) and a.equal(batch_schedule(10, 4, 6, seed=0, stage=1))
    assert not a.equal(batch_schedule(10, 4, 6, seed=1, stage=1)) and not a.equal(batch_schedule(10, 4, 6, seed=0, stage=2))
    flat = a.flatten().tolist()
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # epochs = permutations


def test_shipped_configs_are_valid():
    for name in ("tiny.yaml", "demo.yaml", "bench_tiny.yaml", "study.yaml"):
        cfg = load_config(REPO / "configs" / name)
        assert cfg.steps_per_stage() > 0 and cfg.method_specs()


def test_per_method_learning_rate(corpora, tmp_path):
    """A method's own `lr` overrides training.lr for its cells (adapters usually need a larger one)."""
    cfg = _cfg(corpora, tmp_path / "lr", output__plots=False, output__spectrum_plot=False)
    del cfg["method"]
    cfg.update(
        name="lr", seeds=[0],
        methods=[
            {"name": "selective", "label": "default-lr", "options": {"policy": "kappa", "top_p": 0.5}},
            {"name": "selective", "label": "small-lr", "options": {"policy": "kappa", "top_p": 0.5}, "lr": 1e-6},
        ],
    )
    summary = bench(cfg)
    a, b = (json.loads((Path(m["dirs"]["0"]) / "results.json").read_text()) for m in summary["methods"])
    assert b["config"]["method"]["lr"] == 1e-6 and a["config"]["method"]["lr"] is None
    gain = [r["metrics"]["task_gain_pct"] for r in (a, b)]
    assert abs(gain[1]) < abs(gain[0])  # a tiny learning rate barely moves the model


def test_negative_method_lr_is_rejected(corpora, tmp_path):
    cfg = _cfg(corpora, tmp_path / "neg")
    cfg["method"]["lr"] = -1.0
    with pytest.raises(ConfigError, match=r"method\.lr"):
        run(cfg)


# ---------------------------------------------------------------------------------------------------------------
# Learning curves and the equal-task-quality view
def test_learning_curve_points_match_a_run_stopped_at_that_step(corpora, tmp_path):
    """A curve point at step k is the model after k steps on the task's validation split: a constant-LR run of k
    steps ends at the same point; step 0 is the model the stage starts from."""
    from kappatune.evaluation import evaluate

    common = dict(training__schedule="constant", training__warmup_steps=0)
    curved = run(_cfg(corpora, tmp_path / "curve", eval__curve_every=2, **common))
    stage1 = curved["stages"][0]
    assert [p["step"] for p in stage1["curve"]] == [0, 2, 4, 6]
    # the curve reads the validation split, never the test split the results report
    val = evaluate("tiny-llama", corpora["alpha"], split="validation", validation_fraction=0.1, block_size=32,
                   max_blocks=8, progress=False)
    test = evaluate("tiny-llama", corpora["alpha"], split="test", block_size=32, max_blocks=8, progress=False)
    assert stage1["curve"][0]["task_ppl"] == pytest.approx(val["perplexity"], rel=1e-6)
    assert curved["base"]["task_ppl"]["alpha"] == pytest.approx(test["perplexity"], rel=1e-6)
    assert val["perplexity"] != pytest.approx(test["perplexity"], rel=1e-3)
    assert stage1["curve"][0]["control_ppl"] == pytest.approx(curved["base"]["control_ppl"], rel=1e-6)
    assert stage1["curve"][-1]["control_ppl"] == stage1["control_ppl"]  # the stage end: same model, same control
    assert curved["stages"][1]["curve"][0]["control_ppl"] == pytest.approx(stage1["control_ppl"], rel=1e-6)
    short = run(_cfg(corpora, tmp_path / "short", training__steps=4, eval__curve_every=4,
                     tasks=[{"corpus": corpora["alpha"], "name": "alpha"}], **common))
    assert short["stages"][0]["curve"][-1]["task_ppl"] == pytest.approx(stage1["curve"][2]["task_ppl"], rel=1e-6)
    assert short["stages"][0]["control_ppl"] == pytest.approx(stage1["curve"][2]["control_ppl"], rel=1e-6)
    # curve evaluations do not change training: same losses as a run without curves
    plain = run(_cfg(corpora, tmp_path / "plain", eval__curve_every=2, eval__curve_stages=[2], **common))
    assert [s["losses"] for s in plain["stages"]] == [s["losses"] for s in curved["stages"]]
    assert "curve" not in plain["stages"][0]  # curve_stages: only stage 2 has one
    assert plain["stages"][1]["curve"] == curved["stages"][1]["curve"]


def test_tasks_have_disjoint_validation_blocks_and_old_runs_keep_their_data(corpora, tmp_path):
    """Every lm task gets train / validation / test blocks from disjoint documents; the test blocks are those of
    the two-way split (results keep their meaning); a run whose state predates validation splits resumes on the
    two-way split's training data."""
    import torch

    from kappatune import data as kdata
    from kappatune.harness.run import _load, _load_data

    cfg = config_from_dict(_cfg(corpora, tmp_path / "x"))
    _, tok = _load(cfg)
    new = _load_data(cfg, tok, False)
    old = _load_data(cfg, tok, False, validation=False)
    for t in ("alpha", "beta"):
        rows = {name: {tuple(r.tolist()) for r in blocks} for name, blocks in
                (("train", new.train[t]), ("validation", new.valid[t]), ("test", new.eval[t]))}
        assert not rows["train"] & rows["validation"] and not rows["validation"] & rows["test"]
        assert torch.equal(new.eval[t], old.eval[t])  # the test split is unchanged
        assert old.valid[t] is old.eval[t] and new.train[t].shape[0] < old.train[t].shape[0]
        two_way = kdata.build_blocks(corpora[t], tok, 32, split="train", progress=False)
        assert torch.equal(old.train[t], two_way)
        assert new.corpora[t]["validation_blocks"] == new.valid[t].shape[0] > 0
    # a new run records that it has validation splits (what a resume checks)
    run(_cfg(corpora, tmp_path / "r", training__steps=2, tasks=[{"corpus": corpora["alpha"], "name": "alpha"}]))
    assert json.loads((tmp_path / "r" / "state.json").read_text())["validation_splits"] is True


def test_curve_survives_a_mid_stage_kill(corpora, tmp_path):
    cfg = _cfg(corpora, tmp_path / "ref", eval__curve_every=2, training__checkpoint_every=2)
    ref = run(cfg)
    out = tmp_path / "run"
    path = _write_yaml(tmp_path / "c.yaml", {**cfg, "output_dir": str(out)})
    proc = _spawn(path, fault="train_step:9")  # stage 2 step 3: resumes from its step-2 checkpoint
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    run(load_config(path), resume=True)  # in-process: the kill was real
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["stages"][1]["resumed_from_step"] == 2
    assert [s["curve"] for s in resumed["stages"]] == [s["curve"] for s in ref["stages"]]


def test_reach_interpolates_and_reports_misses():
    from kappatune.harness import _reach

    pts = [{"step": 0, "task_ppl": 10.0, "control_ppl": 5.0}, {"step": 10, "task_ppl": 8.0, "control_ppl": 6.0},
           {"step": 20, "task_ppl": 4.0, "control_ppl": 10.0}]
    assert _reach(pts, 11.0) == {"step": 0.0, "control_ppl": 5.0}
    assert _reach(pts, 8.0) == {"step": 10.0, "control_ppl": 6.0}
    hit = _reach(pts, 6.0)  # halfway between the second and third point
    assert hit["step"] == pytest.approx(15.0) and hit["control_ppl"] == pytest.approx(8.0)
    assert _reach(pts, 3.9) is None


def test_bench_equal_quality_with_an_unmatched_full_reference(corpora, tmp_path):
    cfg = _cfg(corpora, tmp_path / "eq", output__plots=True, output__spectrum_plot=False, eval__curve_every=2,
               training__schedule="constant_with_warmup")
    del cfg["method"]
    cfg.update(
        name="eq", budget=20480, seeds=[0, 1], compare={"reference": "full", "stage": 1},
        methods=[
            {"name": "full", "match_budget": False},
            {"name": "selective", "label": "kappatune", "options": {"policy": "kappa"}},
            {"name": "selective", "label": "tiny-lr", "options": {"policy": "kappa"}, "lr": 1e-7},
        ],
    )
    summary = bench(cfg)
    rows = {m["label"]: m for m in summary["methods"]}
    total = json.loads((Path(rows["full"]["dirs"]["0"]) / "results.json").read_text())["total_params"]
    assert rows["full"]["metrics"]["trainable_params"]["mean"] == total  # exempt from the budget
    assert abs(rows["kappatune"]["metrics"]["trainable_params"]["mean"] - 20480) <= 2048
    eq = summary["equal_quality"]
    by = {m["label"]: m for m in eq["methods"]}
    # the reference reaches its own target exactly at its last step, with its own stage-1 control ppl
    full0 = json.loads((Path(rows["full"]["dirs"]["0"]) / "results.json").read_text())
    # (task quality along curves is validation-split perplexity: the target is the stage end's validation point)
    assert eq["target_task_ppl"][0] == full0["stages"][0]["curve"][-1]["task_ppl"]
    assert eq["target_task_ppl"][0] != full0["stages"][0]["task_ppl"]["alpha"]
    assert by["full"]["reached"] == 2 and by["full"]["steps_to_target"]["mean"] == 6
    assert by["full"]["control_ppl_at_target"]["values"][0] == pytest.approx(full0["stages"][0]["control_ppl"])
    assert by["tiny-lr"]["reached"] == 0 and by["tiny-lr"]["not_reached"] == [0, 1]  # barely moves: never gets there
    out = tmp_path / "eq"
    md = (out / "bench.md").read_text()
    assert "Equal task quality" in md and "0/2" in md
    assert (out / "curves.png").is_file() and "curves.png" in summary["plots"]
    # re-running one method/seed of the bench elsewhere reproduces its row exactly (what the study promises)
    again = bench({**cfg, "seeds": [1], "output_dir": str(tmp_path / "again")}, only=["kappatune"])
    assert [m["label"] for m in again["methods"]] == ["kappatune"] and "equal_quality" not in again
    first = json.loads((Path(rows["kappatune"]["dirs"]["1"]) / "results.json").read_text())
    second = json.loads((Path(again["methods"][0]["dirs"]["1"]) / "results.json").read_text())
    assert _key_metrics(first) == _key_metrics(second)
    with pytest.raises(ConfigError, match=r"--only: no method labelled 'nope'"):
        bench(cfg, only=["nope"])


@pytest.mark.parametrize(
    "over, pattern",
    [
        ({"compare": {"reference": "nope"}}, r"compare\.reference 'nope' is not a method label"),
        ({"compare": {"reference": "kappatune"}}, r"compare\.reference needs learning curves: set eval\.curve_every"),
        ({"compare": {"reference": "kappatune", "stage": 3}, "eval": {"curve_every": 2}}, r"compare\.stage must be between 1 and"),
        ({"eval": {"curve_every": -1}}, r"eval\.curve_every must be >= 0"),
        ({"compare": {"reference": "kappatune", "step": 3}, "eval": {"curve_every": 2}}, r"compare\.step 3 is not a learning-curve point"),
        ({"eval": {"curve_every": 2, "curve_stages": [3]}}, r"eval\.curve_stages must list stages between 1 and 2"),
        ({"compare": {"reference": "kappatune", "stage": 2}, "eval": {"curve_every": 2, "curve_stages": [1]}},
         r"compare\.stage 2 has no learning curve"),
    ],
)
def test_compare_config_errors(corpora, tmp_path, over, pattern):
    from kappatune.config import config_from_dict

    cfg = _cfg(corpora, tmp_path / "x")
    del cfg["method"]
    cfg["methods"] = [{"name": "selective", "label": "kappatune"}]
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(cfg)


def test_equal_quality_target_at_a_reference_step():
    from kappatune.harness import equal_quality

    def res(curve):
        return {"base": {"task_ppl": {"a": 10.0}, "control_ppl": 50.0},
                "stages": [{"stage": 1, "task": "a", "curve": [{"step": s, "task_ppl": t, "control_ppl": c} for s, t, c in curve]}]}

    cells = {
        "ref": {0: res([(5, 8.0, 55.0), (10, 6.0, 60.0)])},
        "slow": {0: res([(5, 9.0, 51.0), (10, 8.0, 52.0)])},
    }
    at_end = equal_quality(cells, "ref", 1)
    assert at_end["target_task_ppl"] == {0: 6.0}
    slow = at_end["methods"][1]
    assert slow["reached"] == 0 and slow["not_reached"] == [0] and slow["best_task_ppl"]["mean"] == 8.0
    at_5 = equal_quality(cells, "ref", 1, step=5)
    assert at_5["target_task_ppl"] == {0: 8.0} and at_5["step"] == 5
    slow = at_5["methods"][1]  # reaches 8.0 exactly at its step 10, control 52 = +4%
    assert slow["steps_to_target"]["mean"] == 10 and slow["control_change_pct_at_target"]["mean"] == pytest.approx(4.0)
    with pytest.raises(ConfigError, match=r"compare\.step 7: the reference run ref/seed-0 has no learning-curve point"):
        equal_quality(cells, "ref", 1, step=7)


def test_equal_quality_flags_a_target_no_better_than_the_untrained_model():
    """study2's first full-FT cell: validation accuracy 0.428 at step 0, 0.423 at step 75 (the pre-registered
    target), 0.567 at 150. Every run starts at the same untrained model, so each reaches that target at step 0:
    the point compares nothing for that seed, and the report says so instead of printing a tie."""
    from kappatune.harness import equal_quality
    from kappatune.reporting import equal_quality_markdown

    def res(accs, task="a"):
        return {"base": {"task_ppl": {task: 10.0}, "control_ppl": 50.0},
                "stages": [{"stage": 1, "task": task, "curve": [
                    {"step": s, "task_accuracy": a, "control_ppl": 50.0 + s} for s, a in zip((0, 75, 150), accs)]}]}

    # keys as in a study with two task orders: order 1 learns another task first
    cells = {"full": {0: res([0.428, 0.423, 0.567]), 1: res([0.428, 0.50, 0.60], "b")},
             "other": {0: res([0.428, 0.40, 0.45]), 1: res([0.428, 0.45, 0.55], "b")}}
    eq = equal_quality(cells, "full", 1, step=75, metric="task_accuracy")
    assert eq["target_at_base"] == [0]  # seed 1's target (0.50) lies above the start
    assert eq["task"] == "a / b"  # the title names the stage's task of every order
    other = eq["methods"][1]
    assert other["reached"] == 2 and other["steps_to_target"]["mean"] == pytest.approx((0.0 + 112.5) / 2)  # seed 0 at step 0
    # the same point over the informative seed alone: other reaches 0.50 between its steps 75 (0.45) and 150 (0.55)
    inf = other["informative"]
    assert inf["reached"] == 1 and inf["steps_to_target"]["values"] == [pytest.approx(112.5)]
    assert inf["control_change_pct_at_target"]["mean"] == pytest.approx(112.5 / 50.0 * 100.0)
    md = equal_quality_markdown(eq)
    assert "Degenerate for 1 of 2 reference cells** (0)" in md and "informative cells: reached" in md
    assert "| other | 2/2 |" in md and "| 1/1 | 112.5" in md
    eq_end = equal_quality(cells, "full", 1, metric="task_accuracy")
    assert eq_end["target_at_base"] == [] and "Degenerate" not in equal_quality_markdown(eq_end)
    assert eq_end["methods"][1]["informative"] is None and "informative" not in equal_quality_markdown(eq_end)
