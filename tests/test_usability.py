"""Behaviour a new user expects (issue 12): method.targets honoured, policy "all" with include keeps every match,
PEFT suffix targets, tied-head warning, datasets.Dataset as a corpus, one meaning of --json, clear API-misuse errors
under python -O, library messages through logging, -q silencing every progress bar."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from kappatune import cli
from kappatune.errors import ConfigError, UsageError
from kappatune.methods import get_method
from kappatune.models import build_tiny_llama
from kappatune.selection import find_kappa_target_modules, match_module_names

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_policy_all_with_include_keeps_every_match():
    m = get_method("selective", {"policy": "all", "include": ["*mlp*"]})
    m.prepare(build_tiny_llama())
    every_mlp = [n for n, p in build_tiny_llama().named_parameters() if ".mlp." in n]
    assert sorted(m.selection.parameter_names) == sorted(every_mlp) and len(every_mlp) == 6  # not 20% of them
    lora = get_method("lora", {"rank": 2, "policy": "all", "exclude": ["*mlp*"]})
    lora.prepare(build_tiny_llama())
    assert len(lora.selection.module_names) == 8  # q, k, v, o of both layers


def test_targets_by_suffix_match_peft():
    from peft import LoraConfig, get_peft_model

    names = [n for n, _ in build_tiny_llama().named_modules()]
    for targets in (["q_proj", "v_proj"], ["layers.0.mlp.up_proj"], "model\\.layers\\.1\\..*_proj"):
        peft_model = get_peft_model(build_tiny_llama(), LoraConfig(r=2, target_modules=targets))
        peft_hits = sorted(n.removeprefix("base_model.model.") for n, mod in peft_model.named_modules() if hasattr(mod, "lora_A"))
        assert sorted(match_module_names(names, targets)) == peft_hits and peft_hits
    lora = get_method("lora", {"rank": 2})
    lora.prepare(build_tiny_llama(), ["q_proj", "v_proj"])
    assert sorted(lora.selection.module_names) == sorted(match_module_names(names, ["q_proj", "v_proj"]))
    sel = get_method("selective", {})
    sel.prepare(build_tiny_llama(), ["down_proj"])
    assert sel.selection.parameter_names == [f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)]
    with pytest.raises(ConfigError, match="nor the suffix of one"):
        get_method("selective", {}).prepare(build_tiny_llama(), ["no_such_proj"])


def _spec(**method):
    from kappatune.config import config_from_dict

    cfg = config_from_dict({"model": "tiny-llama", "tasks": ["x"], "method": method, "training": {"steps": 1}})
    return cfg, cfg.method


def test_method_targets_section_is_honoured():
    from kappatune.harness.run import _build_method

    cfg, spec = _spec(name="lora", options={"rank": 2}, targets={"modules": ["q_proj"]})
    m = _build_method(spec, build_tiny_llama(), cfg, 0)
    m.prepare(build_tiny_llama())
    assert sorted(m.selection.module_names) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    # targets: {policy, top_p} selects exactly what the same knobs in the method's options select
    cfg, spec = _spec(name="selective", targets={"policy": "kappa", "top_p": 0.5})
    a = _build_method(spec, build_tiny_llama(), cfg, 0)
    a.prepare(build_tiny_llama())
    b = get_method("selective", {"policy": "kappa", "top_p": 0.5})
    b.prepare(build_tiny_llama())
    assert a.selection.parameter_names == b.selection.parameter_names
    # with a budget, the targets are the pool budget matching draws from
    cfg, spec = _spec(name="selective", targets={"modules": r".*\.mlp\..*", "policy": "kappa"}, budget=20480)
    c = _build_method(spec, build_tiny_llama(), cfg, 0)
    c.prepare(build_tiny_llama())
    assert all(".mlp." in n for n in c.selection.parameter_names) and c.num_trainable() == 20480
    cfg, spec = _spec(name="eigentune", targets={"modules": ["o_proj"]})  # methods without a policy option too
    e = _build_method(spec, build_tiny_llama(), cfg, 0)
    e.prepare(build_tiny_llama())
    assert e.target_names == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    with pytest.raises(ConfigError, match="given twice"):
        cfg, spec = _spec(name="selective", options={"top_p": 0.5}, targets={"top_p": 0.2})
        _build_method(spec, build_tiny_llama(), cfg, 0)
    with pytest.raises(ConfigError, match="full fine-tuning trains every tensor"):
        cfg, spec = _spec(name="full", targets={"policy": "kappa"})
        _build_method(spec, build_tiny_llama(), cfg, 0)


def test_tied_head_warning_and_exclude_head():
    from peft import LoraConfig, get_peft_model

    model = build_tiny_llama()
    with pytest.warns(UserWarning, match="tied to the input"):
        targets = find_kappa_target_modules(model, top_p=1.0, show_progress=False)["target_modules"]
    assert "lm_head" in targets
    # what the warning is about: merging LoRA on a tied head changes the outputs of the merged model
    peft_model = get_peft_model(build_tiny_llama(), LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
    x = torch.randint(3, 259, (1, 12))
    with torch.no_grad():
        adapted = peft_model(input_ids=x).logits
        merged = peft_model.merge_and_unload()(input_ids=x).logits
    assert (adapted - merged).abs().max() > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = find_kappa_target_modules(build_tiny_llama(), top_p=1.0, show_progress=False, exclude_head=True)
    assert "lm_head" not in kept["target_modules"] and len(kept["target_modules"]) == len(targets) - 1


def test_datasets_dataset_is_a_corpus():
    import datasets

    from kappatune.data import ByteTokenizer, build_blocks, load_corpus, make_corpus

    docs = [f"document {i} " + "word " * 40 for i in range(12)]
    ds = datasets.Dataset.from_dict({"text": docs, "label": list(range(12))})
    corpus = load_corpus(ds)
    assert corpus.documents == [d.strip() for d in docs]
    got = build_blocks(ds, ByteTokenizer(), 32, split="train", cache=False, progress=False)
    want = build_blocks(make_corpus("x", docs), ByteTokenizer(), 32, split="train", cache=False, progress=False)
    assert torch.equal(got, want)
    with pytest.raises(Exception, match="no column 'body'"):
        load_corpus(ds, text_field="body")
    with pytest.raises(Exception, match="pass one split"):
        load_corpus(datasets.DatasetDict({"train": ds}))


def test_json_means_the_same_on_every_command(tmp_path, capsys):
    for argv in (["analyze", "tiny-llama", "-q"], ["select", "tiny-llama", "--top-p", "0.5", "-q"], ["models"]):
        capsys.readouterr()
        assert cli.main([*argv, "--json"]) == 0
        json.loads(capsys.readouterr().out)  # stdout is JSON alone
        path = tmp_path / f"{argv[0]}.json"
        assert cli.main([*argv, "--json", str(path)]) == 0
        out = capsys.readouterr().out
        assert f"wrote {path}" in out and json.loads(path.read_text())


def test_api_misuse_is_a_clear_error_even_under_python_O():
    code = ("from kappatune.methods import get_method\n"
            "from kappatune.errors import UsageError\n"
            "try:\n    get_method('selective').trainable_parameters()\n"
            "except UsageError as e:\n    print('UsageError:', e)\n")
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"})
    assert "UsageError: method 'selective' is not prepared yet: call method.prepare(model) first" in out.stdout, out.stderr
    with pytest.raises(UsageError):
        get_method("lora").merge()


def test_library_code_does_not_print():
    """Library messages go through logging (the CLI decides what to show); only the CLI layer prints."""
    offenders = []
    for path in (REPO / "src" / "kappatune").rglob("*.py"):
        rel = path.relative_to(REPO / "src" / "kappatune").as_posix()
        if rel == "cli.py" or rel.startswith("commands/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders


def test_quiet_silences_every_progress_bar(tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    corpus = tmp_path / "d.txt"
    corpus.write_text("\n\n".join("some words here " * 30 for _ in range(8)))
    capfd.readouterr()
    assert cli.main(["train", "--model", "tiny-llama", "--data", str(corpus), "--steps", "2", "--seq-len", "32",
                     "--batch-size", "2", "--eval-blocks", "2", "--threads", "1", "-o", str(tmp_path / "o"), "-q"]) == 0
    out, err = capfd.readouterr()
    assert err == ""  # no bar at all: kappatune's, nor transformers' "Writing model shards"
    assert out.startswith("trained ") and "stage 1/1" not in out  # and no progress lines
    assert hf_logging.is_progress_bar_enabled()  # restored for the rest of the process
    assert cli.main(["train", "--model", "tiny-llama", "--data", str(corpus), "--steps", "2", "--seq-len", "32",
                     "--batch-size", "2", "--eval-blocks", "2", "--threads", "1", "-o", str(tmp_path / "p")]) == 0
    out, err = capfd.readouterr()
    assert "stage 1/1" in out and "step/s" in err  # without -q: progress lines (logging) and bars
