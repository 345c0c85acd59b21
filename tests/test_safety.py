"""Safety: nothing untrusted is unpickled or executed, YAML is loaded safely, writes stay in the output directory.

* A static scan (AST, not grep, so comments and strings do not count) of every module under src/kappatune for
  the constructs that execute data: ``torch.load`` without ``weights_only=True``, ``pickle``/``marshal``/``dill``
  loading, ``yaml.load``/``unsafe_load``/``full_load`` or an unsafe Loader, ``numpy.load(allow_pickle=True)``,
  ``eval``/``exec``, ``subprocess`` with ``shell=True`` and ``trust_remote_code=True`` anywhere.
* Runtime checks that the same holds for the files kappatune reads: a malicious pickle in a model directory or in
  a checkpoint's ``state.pt`` is refused without running, a ``!!python/object`` YAML tag is rejected in a config
  and in a ``key=value`` override, a YAML alias bomb is refused quickly.
* Paths: names from a config (run name, task/control names, method labels) and paths read back from state files
  never make kappatune write outside the output directory (and its cache).
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import random
from pathlib import Path

import pytest
import torch
import yaml

from kappatune.cli import main
from kappatune.errors import CacheError, ConfigError, ModelError

SRC = Path(__file__).resolve().parents[1] / "src" / "kappatune"
SOURCES = sorted(SRC.rglob("*.py"))


# ---------------------------------------------------------------------------------------------------------------
# Static scan of the package.
# ---------------------------------------------------------------------------------------------------------------
def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _problems(tree: ast.AST) -> list[str]:
    # names bound by "from X import Y [as Z]", so that e.g. "from torch import load" is caught too
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and _is_true(node.value):
            found.append(f"line {node.value.lineno}: trust_remote_code=True")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults + node.args.kw_defaults
            for a, d in zip(args, defaults):
                if a.arg == "trust_remote_code" and _is_true(d):
                    found.append(f"line {node.lineno}: {node.name}(trust_remote_code=True) default")
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "trust_remote_code" \
                and _is_true(node.value):
            found.append(f"line {node.lineno}: trust_remote_code: ... = True default")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, rest = name.partition(".")
        full = f"{aliases.get(head, head)}.{rest}" if rest else aliases.get(head, head)
        line = f"line {node.lineno}: {name}"
        if full in ("torch.load", "torch.serialization.load") and not _is_true(_kw(node, "weights_only")):
            found.append(f"{line} without weights_only=True")
        if full in ("pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "cPickle.load",
                    "marshal.load", "marshal.loads", "dill.load", "dill.loads", "joblib.load", "shelve.open",
                    "pandas.read_pickle", "pd.read_pickle", "cloudpickle.load", "cloudpickle.loads"):
            found.append(f"{line} (unpickling)")
        if full in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
            found.append(f"{line} (unsafe YAML)")
        if full in ("yaml.load", "yaml.load_all"):
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if _dotted(loader) not in ("yaml.SafeLoader", "yaml.CSafeLoader", "SafeLoader", "CSafeLoader"):
                found.append(f"{line} without SafeLoader")
        if full in ("numpy.load", "np.load") and _is_true(_kw(node, "allow_pickle")):
            found.append(f"{line} with allow_pickle=True")
        if full in ("eval", "exec", "builtins.eval", "builtins.exec", "compile"):
            found.append(f"{line} (executes code)")
        if full.startswith("subprocess.") and _is_true(_kw(node, "shell")):
            found.append(f"{line} with shell=True")
    return found


def test_static_scan_finds_what_it_looks_for():
    """The scanner itself: each forbidden construct in a snippet is reported, safe forms are not."""
    bad = """
import torch, pickle, yaml, numpy as np, subprocess
from torch import load as tl
torch.load(f)
torch.load(f, weights_only=False)
tl(f)
pickle.loads(b)
yaml.load(s)
yaml.load(s, Loader=yaml.Loader)
yaml.unsafe_load(s)
np.load(f, allow_pickle=True)
eval("1")
subprocess.run("ls", shell=True)
m = AutoModel.from_pretrained(p, trust_remote_code=True)
def f(trust_remote_code=True): pass
"""
    assert len(_problems(ast.parse(bad))) == 12, _problems(ast.parse(bad))
    good = """
import torch, yaml, numpy as np
torch.load(f, map_location="cpu", weights_only=True)
yaml.safe_load(s)
yaml.load(s, Loader=yaml.SafeLoader)
np.load(f)
model.eval()
def f(trust_remote_code: bool = False): pass
"""
    assert _problems(ast.parse(good)) == []


def test_no_unsafe_loading_or_code_execution_in_the_package():
    assert len(SOURCES) > 20
    report = []
    for path in SOURCES:
        for p in _problems(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            report.append(f"{path.relative_to(SRC.parent)} {p}")
    assert report == [], "\n".join(report)


def test_trust_remote_code_is_off_by_default_everywhere():
    from kappatune.cli import build_parser
    from kappatune.config import RunConfig
    from kappatune.evaluation import evaluate
    from kappatune.models import load_model

    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False
    assert inspect.signature(evaluate).parameters["trust_remote_code"].default is False
    assert RunConfig(model="m", tasks=[]).trust_remote_code is False
    parser = build_parser()
    for argv in (["analyze", "m"], ["select", "m"], ["eval", "m"]):
        assert parser.parse_args(argv).trust_remote_code is False
    assert parser.parse_args(["analyze", "m", "--trust-remote-code"]).trust_remote_code is True
    # (tests/test_models.py::test_trust_remote_code_is_off_unless_asked checks what reaches from_pretrained)


# ---------------------------------------------------------------------------------------------------------------
# Runtime: malicious files are refused without running anything.
# ---------------------------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs ``open(marker, "w")`` — the canary of arbitrary code execution."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_in_a_model_directory_is_refused(tmp_path, capsys):
    from kappatune.models import build_tiny_llama, load_model

    marker = tmp_path / "pwned"
    d = tmp_path / "model"
    m = build_tiny_llama()
    m.save_pretrained(d)
    (d / "model.safetensors").unlink()
    state = dict(m.state_dict())
    state["lm_head.extra"] = _Payload(marker)
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(ModelError, match="objects other than tensors.*refused"):
        load_model(d)
    capsys.readouterr()
    assert main(["analyze", str(d), "-q"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not marker.exists()


def test_malicious_pickle_in_a_checkpoint_is_refused(tmp_path):
    """A checkpoint's state.pt is read with weights_only=True: even with checksums recomputed by an attacker,
    a pickle that would run code is refused with a CacheError and the code never runs."""
    from kappatune.methods import get_method
    from kappatune.models import build_tiny_llama
    from kappatune.storage import atomic_write_json, sha256_file
    from kappatune.training import load_checkpoint, save_checkpoint

    model = build_tiny_llama()
    method = get_method("selective", {"policy": "kappa", "num_modules": 2})
    method.prepare(model)
    d = save_checkpoint(tmp_path / "ck", method, None, None, meta={"stage": 1, "steps": 2, "step": 1})
    marker = tmp_path / "pwned"
    torch.save({"torch_rng": torch.get_rng_state(), "optimizer": _Payload(marker)}, d / "state.pt")
    meta = json.loads((d / "meta.json").read_text())
    meta["files"]["state.pt"] = sha256_file(d / "state.pt")
    atomic_write_json(d / "meta.json", meta)
    with pytest.raises(CacheError, match="cannot be read safely"):
        load_checkpoint(d, method, None, None)
    assert not marker.exists()


@pytest.mark.parametrize("tag", ["!!python/object/apply:builtins.open", "!!python/object/new:builtins.open",
                                 "!!python/name:builtins.open"])
def test_yaml_python_tags_are_rejected(tmp_path, capsys, tag):
    marker = tmp_path / "pwned"
    cfg = tmp_path / "c.yaml"
    arg = f' ["{marker}", "w"]' if "name:" not in tag else " ''"
    cfg.write_text(f"model: {tag}{arg}\ntasks: [t1]\nmethod: selective\ntraining: {{steps: 1}}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="is not valid YAML.*could not determine a constructor"):
        from kappatune.config import load_config

        load_config(cfg)
    capsys.readouterr()
    assert main(["run", str(cfg), "-q"]) == 2
    good = tmp_path / "good.yaml"
    good.write_text("model: tiny-llama\ntasks: [t1]\nmethod: selective\ntraining: {steps: 1}\n", encoding="utf-8")
    assert main(["run", str(good), f"model={tag}{arg}", "-q", "--check"]) == 2  # overrides are YAML too
    err = capsys.readouterr().err
    assert "not valid YAML" in err and err.count("kappatune: error:") == 2
    assert not marker.exists()


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    import time

    from kappatune.config import load_config

    levels = ['a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
    levels += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]  # 10^9 values
    text = "model: tiny-llama\ntasks: [t1]\nmethod:\n  name: selective\n  options:\n" \
           + "".join(f"    {line}\n" for line in levels) + "training: {steps: 1}\n"
    p = tmp_path / "bomb.yaml"
    p.write_text(text, encoding="utf-8")
    t = time.perf_counter()
    with pytest.raises(ConfigError, match="expands to more than"):
        load_config(p)
    assert time.perf_counter() - t < 5


def test_configs_are_read_with_safe_load_only(monkeypatch, tmp_path):
    """Belt and braces for the static scan: while a config is loaded, any non-safe YAML entry point fails."""
    real_load = yaml.load
    used = []

    def checked_load(stream, Loader=None, **kw):  # safe_load is load(stream, SafeLoader)
        assert Loader in (yaml.SafeLoader, getattr(yaml, "CSafeLoader", yaml.SafeLoader)), Loader
        used.append(Loader)
        return real_load(stream, Loader=Loader, **kw)

    def boom(*a, **k):
        raise AssertionError("unsafe YAML loader used")

    monkeypatch.setattr(yaml, "load", checked_load)
    for name in ("unsafe_load", "full_load", "load_all", "full_load_all", "unsafe_load_all"):
        monkeypatch.setattr(yaml, name, boom)
    from kappatune.config import load_config

    p = tmp_path / "c.yaml"
    p.write_text("model: tiny-llama\ntasks: [t1]\nmethod: selective\ntraining: {steps: 1}\n", encoding="utf-8")
    assert load_config(p, ["seed=3"]).seed == 3
    assert len(used) == 2  # the file and the override


# ---------------------------------------------------------------------------------------------------------------
# Paths: nothing is written outside the output directory.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "over, message",
    [
        ({"name": "../../escape"}, "name '../../escape' must be a plain name"),
        ({"name": "/etc/escape"}, "name '/etc/escape' must be a plain name"),
        ({"methods": [{"name": "selective", "label": "../../escape"}], "method": None}, "must be a plain name"),
        ({"methods": [{"name": "selective", "label": ".hidden"}], "method": None}, "must be a plain name"),
    ],
)
def test_names_that_would_escape_are_rejected(over, message):
    from kappatune.config import config_from_dict

    cfg = {"model": "tiny-llama", "tasks": ["t1"], "method": "selective", "training": {"steps": 1}}
    cfg.update(over)
    if cfg.get("method") is None:
        del cfg["method"]
    with pytest.raises(ConfigError, match=message):
        config_from_dict(cfg)


def _write_corpus(path: Path, words: str, n_docs: int = 20) -> str:
    rng = random.Random(words)
    w = words.split()
    path.write_text("\n\n".join(" ".join(rng.choice(w) for _ in range(80)) for _ in range(n_docs)), encoding="utf-8")
    return str(path)


def test_a_run_writes_only_inside_its_output_directory(tmp_path, monkeypatch):
    """Hostile task/control names, relative output dir: after a complete run, only the output directory (and
    the kappatune cache) exist — compared with a listing of every file under the working directory."""
    from kappatune.harness import run

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = tmp_path / "data"
    data.mkdir()
    a = _write_corpus(data / "a.txt", "one two three four five six seven")
    b = _write_corpus(data / "b.txt", "alpha beta gamma delta epsilon zeta")
    c = _write_corpus(data / "c.txt", "red green blue yellow purple orange")
    before_data = sorted(p.name for p in data.iterdir())
    cfg = {
        "name": "safe", "model": "tiny-llama",
        "tasks": [{"corpus": a, "name": "../../../escape-a"}, {"corpus": b, "name": "/tmp/escape-b"}],
        "control": {"corpus": c, "name": "../escape-c"},
        "method": {"name": "selective", "options": {"policy": "kappa", "top_p": 0.5}},
        "training": {"steps": 2, "batch_size": 2, "seq_len": 16, "lr": 1e-3},
        "eval": {"max_blocks": 2, "batch_size": 2},
        "output": {"plots": True, "spectrum_plot": False},
        "num_threads": 1, "progress": False,
    }
    torch_threads = torch.get_num_threads()
    try:
        res = run(cfg)
    finally:
        torch.set_num_threads(torch_threads)
    assert res["status"] == "complete"
    assert sorted(p.name for p in work.iterdir()) == ["runs"]
    assert sorted(p.name for p in (work / "runs").iterdir()) == ["safe"]
    out = work / "runs" / "safe"
    for p in out.rglob("*"):
        assert p.resolve().is_relative_to(out.resolve())
    assert sorted(p.name for p in data.iterdir()) == before_data
    assert not Path("/tmp/escape-b").exists() and not (tmp_path / "escape-a").exists()
    cache = Path(os.environ["KAPPATUNE_CACHE"]).resolve()
    for p in cache.rglob("*"):
        assert p.resolve().is_relative_to(cache)
