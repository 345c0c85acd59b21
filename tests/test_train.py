"""`kappatune train` / `kappatune.train`: the output directory loads with plain transformers and `kappatune eval`,
the model card, save modes, SIGKILL + resume, optimizer/dtype/gradient checkpointing/early stopping, configs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kappatune import cli
from kappatune.errors import CacheError, ConfigError
from kappatune.finetune import train
from kappatune.models import build_tiny_llama
from run_helpers import make_corpora, subprocess_env as _env

REPO = Path(__file__).resolve().parents[1]
COMMON = dict(steps=4, seq_len=32, batch_size=2, eval_blocks=4, num_threads=1, progress=False)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, str]:
    return make_corpora(tmp_path_factory.mktemp("corpora"), n_docs=20)


@pytest.fixture(scope="module")
def trained(corpora, tmp_path_factory):
    """One train run (both save modes, with a control probe and validation every 2 steps), shared by the checks."""
    out = tmp_path_factory.mktemp("train") / "out"
    model, results = train("tiny-llama", corpora["alpha"], output_dir=out, control=corpora["ctrl"], eval_every=2,
                           save="both", lr=3e-3, **COMMON)
    return out, model, results


def test_output_loads_with_plain_transformers_and_generates(trained):
    from transformers import AutoModelForCausalLM

    out, model, results = trained
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(3, 259, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, model.eval()(input_ids=x).logits)
        gen = loaded.generate(input_ids=x[:1, :4], max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 9)
    assert (out / "generation_config.json").is_file()
    # only the selected tensors changed; every other one is bitwise the base's
    base = dict(build_tiny_llama().named_parameters())
    changed = {n for n, p in loaded.named_parameters() if not torch.equal(p, base[n])}
    selected = {r["tensor"] for r in results["export"]["selection"]}
    assert changed == selected and len(selected) >= 1


def test_model_card_and_results(trained):
    out, _, results = trained
    card = (out / "README.md").read_text()
    info = json.loads((out / "train.json").read_text())
    assert "base_model: tiny-llama" in card and "method `selective`" in card
    for row in info["selection"]:  # every adapted tensor with its κ before and after
        assert row["kappa_before"] > 1 and row["kappa_after"] > 1
        assert f"`{row['tensor']}`" in card
    assert f"steps: {info['steps']}" in card and info["steps"] == 4
    assert "torch " + torch.__version__ in card and "transformers" in card
    assert [p["step"] for p in info["validation_curve"]] == [0, 2, 4]
    assert "control perplexity" in card and results["metrics"]["control_change_pct"] is not None
    assert info["files"] == sorted(info["files"]) or "adapter.safetensors" in info["files"]


def test_kappatune_eval_on_the_output_matches_the_final_validation(trained, capsys):
    out, _, results = trained
    capsys.readouterr()
    code = cli.main(["eval", str(out), "--data", results["corpora"]["alpha"]["corpus"], "--block-size", "32",
                     "--max-blocks", "4", "--json", "-q"])
    assert code == 0
    got = json.loads(capsys.readouterr().out)
    assert got["perplexity"] == pytest.approx(results["metrics"]["final_task_ppl"]["alpha"], rel=1e-6)


def test_adapter_only_directory_and_load_adapter(trained, corpora, tmp_path):
    from kappatune.methods import load_adapter
    from kappatune.models import load_model

    out, model, _ = trained
    x = torch.randint(3, 259, (2, 16))
    # the adapter alone, applied to the base: the same model (also on a base cast to bfloat16: dtype-robust check)
    method = load_adapter(build_tiny_llama(), out)
    with torch.no_grad():
        assert torch.equal(method.merge()(input_ids=x).logits, model(input_ids=x).logits)
    load_adapter(build_tiny_llama().to(torch.bfloat16), out / "adapter.safetensors")
    with pytest.raises(CacheError, match="different base model"):
        load_adapter(build_tiny_llama(seed=1), out)
    with pytest.warns(UserWarning, match="loading it anyway"):
        load_adapter(build_tiny_llama(seed=1), out, strict=False)
    # --save adapter: no model files; load_model(DIR) applies the adapter to the base it names
    out2 = tmp_path / "adapter-only"
    m2, _ = train("tiny-llama", corpora["alpha"], output_dir=out2, save="adapter", lr=3e-3, **COMMON)
    assert not (out2 / "config.json").exists() and (out2 / "adapter.safetensors").is_file()
    loaded, _ = load_model(out2)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, m2(input_ids=x).logits)




@pytest.mark.parametrize("fault", ["train_step:3", "export:1"])
def test_sigkill_then_resume_gives_the_same_weights(corpora, tmp_path, fault, capsys):
    args = ["--model", "tiny-llama", "--data", corpora["alpha"], "--steps", "4", "--seq-len", "32", "--batch-size", "2",
            "--eval-blocks", "4", "--checkpoint-every", "2", "--lr", "3e-3", "--threads", "1", "-q"]
    ref, _ = train("tiny-llama", corpora["alpha"], output_dir=tmp_path / "ref", checkpoint_every=2, lr=3e-3, **COMMON)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "kappatune.cli", "train", *args, "-o", str(out)]
    proc = subprocess.run(cmd, env=_env(fault), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (out / "train.json").exists()
    # in-process from here: the kill was real, refusing and resuming need no second interpreter start-up
    if fault.startswith("train_step"):  # a directory holding an unfinished run is not overwritten
        capsys.readouterr()
        assert cli.main([*cmd[3:]]) == 2 and "--resume" in capsys.readouterr().err
    assert cli.main([*cmd[3:], "--resume"]) == 0
    got = load_file(str(out / "model.safetensors"))
    want = {n: p.detach() for n, p in ref.state_dict().items()}
    assert got.keys() <= want.keys()
    for n, t in got.items():
        assert torch.equal(t, want[n]), n


def test_optimizers_dtype_and_gradient_checkpointing(corpora, tmp_path):
    base = dict(build_tiny_llama().named_parameters())
    short = {**COMMON, "steps": 2}
    for opt in ("adafactor", "sgd"):
        m, r = train("tiny-llama", corpora["alpha"], output_dir=tmp_path / opt, optimizer=opt, lr=1e-2, **short)
        changed = {n for n, p in m.named_parameters() if not torch.equal(p, base[n])}
        assert changed == {row["tensor"] for row in r["export"]["selection"]}, opt
        assert r["config"]["training"]["optimizer"] == opt
    m, _ = train("tiny-llama", corpora["alpha"], output_dir=tmp_path / "bf16", dtype="bfloat16", **short)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert {t.dtype for t in load_file(str(tmp_path / "bf16" / "model.safetensors")).values()} == {torch.bfloat16}
    _, plain = train("tiny-llama", corpora["alpha"], output_dir=tmp_path / "plain", **short)
    _, ckpt = train("tiny-llama", corpora["alpha"], output_dir=tmp_path / "gc", gradient_checkpointing=True, **short)
    assert ckpt["stages"][0]["losses"] == pytest.approx(plain["stages"][0]["losses"], rel=1e-5)
    with pytest.raises(ConfigError, match="unknown optimizer 'adam'"):
        train("tiny-llama", corpora["alpha"], output_dir=tmp_path / "x", optimizer="adam", **short)


def test_early_stopping_rule():
    from kappatune.harness.run import _early_stop

    stop = _early_stop(2)
    pts = lambda *v: [{"step": i + 1, "task_ppl": x} for i, x in enumerate(v)]  # noqa: E731
    assert not stop(pts(5.0, 4.0))  # not enough points yet
    assert not stop(pts(5.0, 4.0, 4.5))  # one bad validation < patience 2
    assert stop(pts(5.0, 4.0, 4.5, 4.0))  # two validations without beating 4.0
    assert not stop(pts(5.0, 4.0, 4.5, 3.9))
    assert _early_stop(0) is None


def test_early_stopping_ends_training_and_resumes_stopped(corpora, tmp_path, monkeypatch):
    run_mod = sys.modules["kappatune.harness.run"]

    # A validation curve that keeps improving never stops with patience 1 ...
    _, r = train("tiny-llama", corpora["alpha"], output_dir=tmp_path / "go", eval_every=1, early_stopping=1, lr=3e-3,
                 **{**COMMON, "steps": 5})
    curve = [p["task_ppl"] for p in r["stages"][0]["curve"]]
    assert curve == sorted(curve, reverse=True) and "stopped_early" not in r["stages"][0]
    # ... and a rule that fires at the 3rd validation ends the stage there: 3 steps done, the rest skipped
    monkeypatch.setattr(run_mod, "_early_stop", lambda patience: (lambda c: len([p for p in c if p["step"]]) >= 3))
    _, r = train("tiny-llama", corpora["alpha"], output_dir=tmp_path / "es", eval_every=1, early_stopping=1,
                 checkpoint_every=1, lr=3e-3, **{**COMMON, "steps": 8})
    stage = r["stages"][0]
    assert stage["stopped_early"] == {"at_step": 3, "planned_steps": 8}
    assert stage["steps"] == 3 and len(stage["losses"]) == 3 and r["export"]["steps"] == 3
    assert "stopped early" in (tmp_path / "es" / "README.md").read_text()
    with pytest.raises(ConfigError, match="needs validation during training"):
        train("tiny-llama", corpora["alpha"], output_dir=tmp_path / "x", early_stopping=2, **COMMON)


def test_train_from_a_run_config_with_one_task(corpora, tmp_path, capsys):
    cfg = {"model": "tiny-llama", "tasks": [{"corpus": corpora["beta"], "name": "beta"}], "control": corpora["ctrl"],
           "method": {"name": "lora", "options": {"rank": 2}, "targets": {"modules": ["q_proj", "v_proj"]}},
           "training": {"steps": 2, "seq_len": 32, "batch_size": 2, "lr": 3e-3}, "eval": {"max_blocks": 4},
           "num_threads": 1}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert cli.main(["train", str(path), "-o", str(tmp_path / "out"), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "control probe (ctrl): perplexity" in printed  # the control's change from base, printed at the end
    info = json.loads((tmp_path / "out" / "train.json").read_text())
    assert sorted(r["tensor"] for r in info["selection"]) == [
        f"model.layers.{i}.self_attn.{p}.weight" for i in (0, 1) for p in ("q_proj", "v_proj")]
    cfg["tasks"].append({"corpus": corpora["alpha"], "name": "alpha"})
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="exactly one task"):
        train(config=path, output_dir=tmp_path / "two")


def test_train_on_supervised_examples(tmp_path, capsys):
    """sft data goes through the harness's task loader: loss on responses, held-out accuracy reported."""
    import random

    rng = random.Random(0)
    rows = []
    for i in range(60):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"prompt": f"Is {a} bigger than {b}?", "response": "yes" if a > b else "no", "choices": ["yes", "no"]})
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    capsys.readouterr()
    assert cli.main(["train", "--model", "tiny-llama", "--data", str(path), "--steps", "3", "--seq-len", "32",
                     "--batch-size", "4", "--threads", "1", "-o", str(tmp_path / "out"), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy (qa):" in printed
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["config"]["tasks"][0]["type"] == "sft" and "accuracy" in results["matrix"]
    assert "| accuracy (qa, test split) |" in (tmp_path / "out" / "README.md").read_text()
