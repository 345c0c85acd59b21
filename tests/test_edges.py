"""Reliability at the edges (issue 16): every class of bad input found by trying kappatune as a new user would.

Each class has several instances; through the CLI each is exactly one ``kappatune: error:`` line and exit status 2
(or, where the catalogue says so, a warning and a repair), and through the Python API a clear
:class:`~kappatune.errors.KappaTuneError`. docs/reliability.md lists every case with its message.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kappatune.cli import main
from kappatune.config import config_from_dict
from kappatune.errors import ConfigError
from kappatune.models import build_tiny_llama
from run_helpers import cli_error, make_corpora, tiny_run_config, write_yaml


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, str]:
    return make_corpora(tmp_path_factory.mktemp("corpora"), n_docs=30)


def _cfg(corpora: dict[str, str], out: Path, **over) -> dict:
    return tiny_run_config(
        corpora, out, name="edge",
        training={"steps": 2, "batch_size": 2, "seq_len": 32, "lr": 3e-3},
        eval={"max_blocks": 2, "batch_size": 4},
        output={"plots": False, "spectrum_plot": False},
        num_threads=1, **over,
    )


_yaml, _error = write_yaml, cli_error  # shared with the other bad-input tests (run_helpers)


# ---------------------------------------------------------------------------------------------------------------
# Method options: each method's declared schema, checked at config time, in get_method and in for_budget
# ---------------------------------------------------------------------------------------------------------------
BAD_OPTIONS = [
    ("lora", {"rank": True}, "method 'lora': rank must be an integer, got True"),
    ("lora", {"alpha": "x"}, "method 'lora': alpha must be a number or null, got 'x'"),
    ("lora", {"alpha": -1}, "method 'lora': alpha must be > 0, got -1"),
    ("lora", {"seed": "x"}, "method 'lora': seed must be an integer, got 'x'"),
    ("lora", {"dropout": 1.5}, "method 'lora': dropout must be in [0, 1), got 1.5"),
    ("lora", {"include": 5}, "method 'lora': include must be a list of strings or null, got 5"),
    ("lora", {"r": 4, "rank": 4}, "options 'r' and 'rank' are the same option"),
    ("lora", {"target_modules": ["q_proj"], "include": ["v_proj"]}, "give target_modules or include, not both"),
    ("lora", {"target_modules": 5}, "target_modules must be a non-empty list of module names"),
    ("selective", {"top_p": "x"}, "method 'selective': top_p must be a number or null, got 'x'"),
    ("selective", {"top_p": float("nan")}, "top_p must be a number or null, got nan"),
    ("selective", {"num_modules": 2.5}, "num_modules must be an integer or null, got 2.5"),
    ("selective", {"policy": "kapa"}, "policy: 'kapa' is not one of all, kappa, random, snr, snr_per_type, random_type_matched (did you mean 'kappa'?)"),
    ("selective", {"exclude": ["re:("]}, "exclude: 're:(' is not a valid regular expression"),
    ("full", {"freeze_embeddings": "yes"}, "method 'full': freeze_embeddings must be true or false, got 'yes'"),
    ("osf", {"min_retention": 0.9, "max_retention": 0.1}, "need min_retention <= max_retention"),
    ("osf", {"calibration_batch_size": 0}, "calibration_batch_size must be ≥ 1, got 0"),
    ("eigentune", {"variant": "diag"}, "variant: 'diag' is not one of diagonal, spectral_core"),
    ("curlora", {"eps": 0}, "method 'curlora': eps must be > 0, got 0"),
]


@pytest.mark.parametrize("name, options, message", BAD_OPTIONS, ids=[f"{n}-{'-'.join(o)}" for n, o, _ in BAD_OPTIONS])
def test_bad_method_options_are_refused_by_the_python_api(name, options, message):
    from kappatune.methods import get_method

    with pytest.raises(ConfigError) as exc:
        get_method(name, options)
    assert message in str(exc.value)


@pytest.mark.parametrize("name, options, message", BAD_OPTIONS[:7] + BAD_OPTIONS[9:11] + BAD_OPTIONS[14:15],
                         ids=lambda x: str(x)[:20] if not isinstance(x, dict) else "-".join(x))
def test_bad_method_options_are_one_line_at_config_time(corpora, tmp_path, capsys, name, options, message):
    cfg = _cfg(corpora, tmp_path / "out", method={"name": name, "options": options})
    # refused by the static config check, before any model or corpus is loaded
    with pytest.raises(ConfigError, match="method "):
        config_from_dict(cfg)
    for argv in (["run"], ["run", "--check"]):
        err = _error(capsys, *argv, _yaml(tmp_path / "c.yaml", cfg), "-q")
        assert message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("budget", [float("nan"), "20000", True, 0, -5, 1.5, float("inf")])
def test_for_budget_refuses_a_budget_that_is_not_a_positive_integer(budget):
    from kappatune.methods import for_budget

    model = build_tiny_llama()
    for name in ("selective", "lora", "curlora"):
        with pytest.raises(ConfigError, match="param_budget must be a positive integer"):
            for_budget(name, model, budget)


def test_for_budget_checks_options_and_tolerance():
    from kappatune.methods import for_budget

    model = build_tiny_llama()
    with pytest.raises(ConfigError, match="method 'lora': alpha must be a number"):
        for_budget("lora", model, 20000, alpha="x")
    with pytest.raises(ConfigError, match="method 'curlora': alpha must be a number"):
        for_budget("curlora", model, 2000, alpha="x")
    with pytest.raises(ConfigError, match="tolerance must be a number in"):
        for_budget("selective", model, 20000, tolerance=2)
    assert for_budget("selective", model, 2e4).budget_report.param_budget == 20000  # YAML's 2e4 is an integer


def test_lora_accepts_peft_names_and_targets_the_modules_peft_would():
    from peft import LoraConfig, get_peft_model

    from kappatune.methods import get_method

    for targets in (["q_proj", "v_proj"], ["self_attn.o_proj", "down_proj"], "model\\.layers\\.1\\..*_proj"):
        m = get_method("lora", {"r": 4, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": targets})
        assert (m.config.rank, m.config.alpha, m.config.dropout) == (4, 16.0, 0.1)
        m.prepare(build_tiny_llama())
        peft = get_peft_model(build_tiny_llama(), LoraConfig(r=4, target_modules=targets))
        theirs = sorted(n.removeprefix("base_model.model.").removesuffix(".lora_A")
                        for n, _ in peft.named_modules() if n.endswith(".lora_A"))
        assert sorted(m.selection.module_names) == theirs and theirs, targets
        assert m.num_trainable() == sum(p.numel() for p in peft.parameters() if p.requires_grad)
    everything = get_method("lora", {"target_modules": "all-linear"})
    assert everything.config.include is None and everything.config.policy == "all"


def test_policy_all_with_include_keeps_every_matching_tensor():
    """`policy: all` restricted by include keeps all matching tensors (it used to keep a silent 20%), also when
    matching a budget."""
    from kappatune.methods import for_budget, get_method

    m = get_method("selective", {"policy": "all", "include": ["mlp"]})
    m.prepare(build_tiny_llama())
    assert len(m.selection.parameter_names) == 6  # gate/up/down in both layers
    fb = for_budget("selective", build_tiny_llama(), 2 * 32 * 64, policy="all", include=["v_proj"])
    names = fb.default_targets.parameter_names
    assert names and all("v_proj" in n for n in names), names


# ---------------------------------------------------------------------------------------------------------------
# Invalid regular expressions in include/exclude
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, pattern", [("--include", "re:("), ("--exclude", "re:[a-"), ("--include", "re:*x")])
def test_invalid_regex_in_analyze_and_select_is_one_line(capsys, flag, pattern):
    for cmd in (["analyze"], ["select", "--num", "1"]):
        err = _error(capsys, *cmd, "tiny-llama", flag, pattern, "-q", "--no-cache")
        assert f"{flag[2:]}: {pattern!r} is not a valid regular expression" in err, err


def test_invalid_regex_through_the_python_api():
    from kappatune.analysis import analyze_model
    from kappatune.selection import select_targets

    model = build_tiny_llama()
    with pytest.raises(ConfigError, match="include: 're:\\(' is not a valid regular expression"):
        analyze_model(model, include=["re:("], cache=False, progress=False)
    with pytest.raises(ConfigError, match="exclude must be a list of name patterns"):
        analyze_model(model, exclude=[5], cache=False, progress=False)
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        select_targets(model, "kappa", top_p=0.5, exclude=["re:(?P<"], progress=False)
    # a single string is one pattern, not a list of one-character patterns
    rep = analyze_model(model, include="q_proj", cache=False, progress=False)
    assert rep.records and all("q_proj" in r.name for r in rep.records)


# ---------------------------------------------------------------------------------------------------------------
# Duplicate YAML keys
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, key, lines", [
    ("model: tiny-llama\ntasks: [a]\nmethod: selective\ntraining: {steps: 1}\ntraining: {lr: 0.1}\n", "training", (4, 5)),
    ("model: tiny-llama\ntasks: [a]\nmethod: selective\ntraining:\n  steps: 1\n  steps: 2\n", "steps", (5, 6)),
    ("model: tiny-llama\nmodel: smollm2-135m\ntasks: [a]\nmethod: selective\ntraining: {steps: 1}\n", "model", (1, 2)),
    ("model: tiny-llama\ntasks: [{corpus: a, name: x, name: y}]\nmethod: selective\ntraining: {steps: 1}\n", "name", (2, 2)),
])
def test_duplicate_yaml_keys_are_refused(tmp_path, capsys, text, key, lines):
    from kappatune.config import load_config

    p = tmp_path / "c.yaml"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=f"key {key!r} appears twice \\(lines {lines[0]} and {lines[1]}\\)"):
        load_config(p)
    assert f"key {key!r} appears twice" in _error(capsys, "run", str(p), "--check", "-q")
    # the same keys in different mappings, and YAML merge keys, are fine
    ok = tmp_path / "ok.yaml"
    ok.write_text("base: &b {steps: 1}\nmodel: tiny-llama\ntasks: [{corpus: a, name: a}]\nmethod: {name: selective, "
                  "options: {seed: 1}}\nseed: 1\ntraining: {<<: *b}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown key 'base'"):  # parsed fine; only the unknown key is refused
        load_config(ok)


# ---------------------------------------------------------------------------------------------------------------
# Damaged GGUF files
# ---------------------------------------------------------------------------------------------------------------
def _gguf_files(d: Path) -> dict[str, Path]:
    import os

    import gguf
    import numpy as np

    d.mkdir(parents=True, exist_ok=True)
    good = d / "good.gguf"
    w = gguf.GGUFWriter(str(good), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    data = good.read_bytes()
    files = {"empty": b"", "random": os.urandom(4096), "truncated-header": data[:30], "truncated-tensors": data[: len(data) // 2],
             "bad-version": b"GGUF" + os.urandom(4092)}
    out = {}
    for name, blob in files.items():
        (out.setdefault(name, d / f"{name}.gguf")).write_bytes(blob)
    return out


def test_damaged_gguf_is_one_line_for_analyze_and_eval(tmp_path, capsys):
    for name, path in _gguf_files(tmp_path).items():
        for argv in (["analyze", str(path), "-q"], ["eval", str(path), "-q"]):
            err = _error(capsys, *argv)
            assert str(path) in err and ("GGUF" in err), (name, err)
            assert "download or convert it again" in err


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints missing weights (or holding unexpected ones)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def broken_models(tmp_path_factory) -> dict[str, Path]:
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("models")
    build_tiny_llama().save_pretrained(d / "ok")
    out = {}
    for case in ("missing", "unexpected", "both"):
        shutil.copytree(d / "ok", d / case)
        sd = load_file(d / case / "model.safetensors")
        if case in ("missing", "both"):
            sd.pop("model.layers.1.mlp.up_proj.weight")
        if case in ("unexpected", "both"):
            sd["model.layers.7.extra.weight"] = torch.zeros(3, 3)
        save_file(sd, d / case / "model.safetensors", metadata={"format": "pt"})
        out[case] = d / case
    return out


@pytest.mark.parametrize("case, what", [("missing", "1 missing (model.layers.1.mlp.up_proj.weight)"),
                                        ("unexpected", "1 unexpected (model.layers.7.extra.weight)"),
                                        ("both", "1 missing (model.layers.1.mlp.up_proj.weight); 1 unexpected")])
def test_checkpoint_with_missing_or_unexpected_weights_is_refused(broken_models, corpora, tmp_path, capsys, case, what):
    from kappatune.models import load_model
    from kappatune.storage import fingerprint_model

    path = broken_models[case]
    if case != "unexpected":  # the streaming scan (the default for a local checkpoint) refuses a missing tensor too
        err = _error(capsys, "analyze", str(path), "-q", "--no-cache")
        assert "has no tensor for model.layers.1.mlp.up_proj.weight" in err, err
    for argv in (["analyze", str(path), "--load", "-q", "--no-cache"], ["eval", str(path), "-q", "--max-blocks", "1"],
                 ["run", _yaml(tmp_path / "c.yaml", _cfg(corpora, tmp_path / "out", model=str(path))), "--check", "-q"]):
        err = _error(capsys, *argv)
        assert what in err and "--allow-missing-weights" in err, err
    # opted in: loads, with a warning, and the new weights are seeded (same model on every load)
    with pytest.warns(UserWarning, match="newly initialised"):
        a, _ = load_model(path, allow_missing_weights=True)
        b, _ = load_model(path, allow_missing_weights=True)
    assert fingerprint_model(a) == fingerprint_model(b)
    assert main(["analyze", str(path), "-q", "--no-cache", "--allow-missing-weights", "--top", "1"]) == 0


# ---------------------------------------------------------------------------------------------------------------
# Cache entries carry checksums verified on read
# ---------------------------------------------------------------------------------------------------------------
def test_corpus_text_cache_is_verified_and_rebuilt(tmp_path):
    import json
    import warnings

    from kappatune.data.corpora import CorpusSpec, _load_builtin, _raw_cache_path

    calls = []

    def loader():
        calls.append(1)
        return ["first document here", "second document", "third one"]

    spec = CorpusSpec("edge-test", "task", "test corpus", "generated", "none", loader)
    assert _load_builtin(spec).documents == loader() and len(calls) == 2
    path = _raw_cache_path(spec)
    entry = json.loads(path.read_text())
    assert entry["sha256"]
    # edited into other valid JSON: a changed document, a dropped one, a wrong type
    for docs in (["first document HERE", "second document", "third one"], ["first document here"], "text"):
        path.write_text(json.dumps({**entry, "documents": docs}))
        with pytest.warns(UserWarning, match="corpus cache .* is (corrupt \\(checksum mismatch\\)|unreadable); rebuilding"):
            assert _load_builtin(spec).documents == loader()
    # an entry written before checksums: used once and given its checksum, no warning
    path.write_text(json.dumps({k: v for k, v in entry.items() if k != "sha256"}))
    n = len(calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _load_builtin(spec).documents == loader()
    assert len(calls) == n + 1 and json.loads(path.read_text())["sha256"] == entry["sha256"]


def test_converted_model_cache_is_verified_and_rebuilt(tmp_path, monkeypatch):
    """A changed float in the converted SmolLM2 cache is detected by the checksums of the conversion and the
    directory is converted again (here the "conversion" produces a tiny model: no download in tests)."""
    import json

    from safetensors.torch import load_file, save_file

    from kappatune import models
    from kappatune.storage import fingerprint_model

    reference = build_tiny_llama()
    monkeypatch.setattr(models, "extract_smollm2_gguf", lambda tmp, progress=True: Path(tmp) / "fake.gguf")
    monkeypatch.setattr(models, "load_gguf", lambda path: (Path(path).write_bytes(b"") or build_tiny_llama(), models.ByteTokenizer()))
    monkeypatch.setattr(models.ByteTokenizer, "save_pretrained", lambda self, d: None, raising=False)
    target = models.prepare_smollm2(progress=False)
    marker = json.loads((target / models._MARKER).read_text())
    assert set(marker["files"]) >= {"config.json", "model.safetensors"}
    model, _ = models._load_smollm2()
    assert fingerprint_model(model) == fingerprint_model(reference)
    # one float changed, the file still valid safetensors
    sd = load_file(target / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight"][0, 0] += 1.0
    save_file(sd, target / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="converted model cache .* is corrupt: model.safetensors changed since it was converted"):
        model, _ = models._load_smollm2()
    assert fingerprint_model(model) == fingerprint_model(reference)
    # a cache converted before checksums: verified once by weight fingerprint, then given its checksums
    (target / models._MARKER).write_text(json.dumps({k: v for k, v in marker.items() if k != "files"}))
    model, _ = models._load_smollm2()
    assert "files" in json.loads((target / models._MARKER).read_text())
    assert fingerprint_model(model) == fingerprint_model(reference)


# ---------------------------------------------------------------------------------------------------------------
# select needs a budget; --check is exactly as strict as the command
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["kappa", "snr", "random"])
def test_select_without_a_budget_is_refused(capsys, policy):
    err = _error(capsys, "select", "tiny-llama", "--policy", policy, "-q")
    assert f"select --policy {policy} needs exactly one budget" in err
    assert main(["select", "tiny-llama", "--policy", "all", "-q"]) == 0  # "all" needs none


def test_check_is_as_strict_as_the_command(corpora, tmp_path, capsys):
    bench_cfg = _cfg(corpora, tmp_path / "b", method=None,
                     methods=[{"name": "selective", "options": {"top_p": 0.5}}, {"name": "full"}])
    path = _yaml(tmp_path / "bench.yaml", bench_cfg)
    for argv in (["run", path, "--check"], ["run", path]):
        assert "run it with `kappatune bench`" in _error(capsys, *argv, "-q")
    seeds = _yaml(tmp_path / "seeds.yaml", _cfg(corpora, tmp_path / "s", seeds=[0, 1]))
    assert "several methods or seeds" in _error(capsys, "run", seeds, "--check", "-q")
    for argv in (["bench", path, "--check", "--only", "nosuch"], ["bench", path, "--only", "nosuch"]):
        assert "--only: no method labelled 'nosuch'" in _error(capsys, *argv, "-q")
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------------------------
# Lost or unprotected work: run-directory identity, --force scope, a deleted final adapter, two writers
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(corpora, tmp_path_factory) -> dict:
    """One finished tiny run (fp16 requested: on a CPU it runs in fp32, recorded as such)."""
    import warnings

    from kappatune.harness import run

    out = tmp_path_factory.mktemp("finished") / "run"
    cfg = _cfg(corpora, out, training__mixed_precision="fp16", output__plots=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = run(cfg)
    return {"cfg": cfg, "out": out, "results": results, "warnings": [str(w.message) for w in caught]}


def _copy(finished: dict, tmp_path: Path) -> tuple[dict, Path]:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished["out"], out)
    return {**finished["cfg"], "output_dir": str(out)}, out


def test_fp16_on_a_cpu_warns_and_records_what_ran(finished):
    assert any("fp16 needs a GPU" in w for w in finished["warnings"]), finished["warnings"]
    assert finished["results"]["mixed_precision"] == {"requested": "fp16", "used": "no"}


@pytest.mark.parametrize("deleted", [["state.json"], ["state.json", "results.json"], ["state.json", "final/adapter.safetensors"]])
def test_a_run_directory_without_state_json_is_still_protected(finished, tmp_path, capsys, deleted):
    from kappatune.harness import run

    cfg, out = _copy(finished, tmp_path)
    for rel in deleted:
        (out / rel).unlink()
    other = {**cfg, "seed": 1}  # another config must not overwrite it
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for argv in ([], ["--resume"], ["--check"]):
        err = _error(capsys, "run", _yaml(tmp_path / "c.yaml", other), *argv, "-q")
        assert "holds files of a run" in err and "no state.json" in err and "--force" in err, err
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = run(other, force=True)
    assert again["status"] == "complete" and again["seed"] == 1


def test_force_deletes_only_what_the_run_wrote(finished, tmp_path):
    from kappatune.harness import run

    cfg, out = _copy(finished, tmp_path)
    mine = {"final/notes.txt": "mine", "plots/my-figure.png": "png", "checkpoints/keep.bin": "bin", "README.md": "hi"}
    for rel, text in mine.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    again = run({**cfg, "seed": 1}, force=True)
    assert again["status"] == "complete"
    for rel, text in mine.items():
        assert (out / rel).read_text() == text, rel
    assert not list((out / "checkpoints").glob("stage-1.safetensors"))  # the old run's superseded files are gone


@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_a_deleted_or_damaged_final_adapter_is_restored_on_resume(finished, tmp_path, capsys, damage):
    from safetensors.torch import load_file

    from kappatune.harness import run

    cfg, out = _copy(finished, tmp_path)
    adapter = out / "final" / "adapter.safetensors"
    original = {k: v.clone() for k, v in load_file(adapter).items()}  # not views of the file it damages
    if damage == "delete":
        adapter.unlink()
    else:
        adapter.write_bytes(adapter.read_bytes()[:-8] + b"\0" * 8)
    assert "already holds a run" in _error(capsys, "run", _yaml(tmp_path / "c.yaml", cfg), "-q")  # not "complete"
    again = run(cfg, resume=True)
    restored = load_file(adapter)
    assert restored.keys() == original.keys() and all((restored[k] == original[k]).all() for k in original)
    assert again["matrix"] == finished["results"]["matrix"]  # nothing retrained
    # without the last stage checkpoint it cannot be restored: said so, nothing else touched
    adapter.unlink()
    (out / "checkpoints" / "stage-2.safetensors").unlink()
    err = _error(capsys, "run", _yaml(tmp_path / "c.yaml", cfg), "--resume", "-q")
    assert "stage-2.safetensors is missing or corrupt" in err and "cannot be restored" in err


def test_a_second_writer_gets_one_clear_line(finished, tmp_path, capsys):
    import os

    from kappatune.harness import run
    from kappatune.storage import DirectoryLock

    cfg, out = _copy(finished, tmp_path)
    with DirectoryLock(out):
        for argv in ([], ["--resume"], ["--force"]):
            err = _error(capsys, "run", _yaml(tmp_path / "c.yaml", cfg), *argv, "-q")
            assert f"is in use by another kappatune process (pid {os.getpid()})" in err, err
    assert run(cfg)["status"] == "complete"  # released: the lock never outlives its holder
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # nothing added to the run dir
