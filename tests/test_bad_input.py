"""The bad-input catalogue of docs/reliability.md, through the CLI: one clear line, exit status 2, nothing damaged.

Every case runs ``kappatune.cli.main`` in-process (fast) and checks that stderr is exactly one
``kappatune: error: ...`` line matching the documented message, that the exit status is 2 and — for the cases
that touch an existing run directory — that every file already there is byte-for-byte unchanged. The Python-API
level of most cases is tested where the code lives (test_analysis.py, test_data.py, test_selection.py,
test_methods_core.py, test_harness.py); docs/reliability.md lists which test covers which case.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from kappatune.cli import main
from kappatune.harness import run
from run_helpers import cli_error, make_corpora, tiny_run_config, write_yaml

@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("corpora")
    return make_corpora(d, n_docs=30)


def _cfg(corpora: dict[str, str], out: Path, **over) -> dict:
    return tiny_run_config(
        corpora, out, name="bad",
        training={"steps": 3, "batch_size": 2, "seq_len": 32, "lr": 3e-3},
        eval={"max_blocks": 4, "batch_size": 4},
        output={"plots": False, "spectrum_plot": False},
        num_threads=1, **over,
    )


_yaml, _error = write_yaml, cli_error  # shared with the other bad-input tests (run_helpers)


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _nothing_trained(out: Path) -> None:
    assert not (out / "checkpoints").exists() and not (out / "final").exists()
    if (out / "state.json").exists():
        assert json.loads((out / "state.json").read_text())["stages_done"] == 0


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
def test_missing_model_path(corpora, tmp_path, capsys):
    out = tmp_path / "out"
    err = _error(capsys, "run", _yaml(tmp_path / "c.yaml", _cfg(corpora, out, model=str(tmp_path / "no-such-model"))), "-q")
    assert "model path" in err and "does not exist" in err
    assert not out.exists()
    assert "does not exist" in _error(capsys, "analyze", str(tmp_path / "no-such-model"), "-q")


def test_unreadable_model_directory(corpora, tmp_path, capsys):
    bad = tmp_path / "bad-model"
    bad.mkdir()
    assert "no config.json" in _error(capsys, "analyze", str(bad), "-q")
    (bad / "config.json").write_text("{not json")
    err = _error(capsys, "run", _yaml(tmp_path / "c.yaml", _cfg(corpora, tmp_path / "out", model=str(bad))), "-q")
    assert f"cannot load the model in {bad}" in err
    assert not (tmp_path / "out").exists()


def test_model_without_analysable_weight(capsys):
    err = _error(capsys, "analyze", "tiny-llama", "--include", "no-tensor-has-this-name", "-q")
    assert "has no analysable weight" in err


def _saved_model(path: Path, edit) -> str:
    from kappatune.models import build_tiny_llama

    m = build_tiny_llama()
    with torch.no_grad():
        edit(m)
    m.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("method", ["selective", "lora"])
def test_nan_or_inf_weights(corpora, tmp_path, capsys, bad, method):
    def poison(m):
        m.model.layers[0].mlp.up_proj.weight[3, 5] = bad

    model = _saved_model(tmp_path / "m", poison)
    out = tmp_path / "out"
    cfg = _cfg(corpora, out, model=model, method={"name": method})
    err = _error(capsys, "run", _yaml(tmp_path / "c.yaml", cfg), "-q")
    assert "'model.layers.0.mlp.up_proj.weight' contains NaN or Inf" in err
    assert not out.exists()  # refused before the base evaluation wrote anything
    assert "contains NaN or Inf" in _error(capsys, "analyze", model, "-q")


def test_all_zero_matrix_is_flagged_and_never_selected(tmp_path, capsys):
    model = _saved_model(tmp_path / "m", lambda m: m.model.layers[0].mlp.up_proj.weight.zero_())
    capsys.readouterr()
    assert main(["analyze", model, "-q"]) == 0
    printed = capsys.readouterr().out
    assert "rank-deficient (kappa = inf, ranked last): model.layers.0.mlp.up_proj.weight" in printed
    assert main(["select", model, "-q", "--policy", "kappa", "--top-p", "0.9", "--json", str(tmp_path / "s.json")]) == 0
    capsys.readouterr()
    assert "model.layers.0.mlp.up_proj" not in json.loads((tmp_path / "s.json").read_text())["module_names"]


def _word_tokenizer(corpora: dict[str, str], *, eos: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for p in corpora.values() for w in Path(p).read_text().split()})
    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **({"eos_token": "</s>"} if eos else {}))


def test_tokenizer_without_pad_token_is_fine(corpora, tmp_path, capsys):
    """Blocks are fixed-length token windows, so no padding is ever needed: a tokenizer without pad token works."""
    model = _saved_model(tmp_path / "m", lambda m: None)
    tok = _word_tokenizer(corpora, eos=True)
    assert tok.pad_token is None
    tok.save_pretrained(model)
    out = tmp_path / "out"
    assert main(["run", _yaml(tmp_path / "c.yaml", _cfg(corpora, out, model=model)), "-q"]) == 0
    capsys.readouterr()
    assert json.loads((out / "results.json").read_text())["status"] == "complete"


def test_tokenizer_without_eos_token(corpora, tmp_path, capsys):
    model = _saved_model(tmp_path / "m", lambda m: None)
    _word_tokenizer(corpora, eos=False).save_pretrained(model)
    err = _error(capsys, "run", _yaml(tmp_path / "c.yaml", _cfg(corpora, tmp_path / "out", model=model)), "-q")
    assert "has no EOS token to separate documents" in err
    _nothing_trained(tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------------
# Corpora
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content, where, pattern",
    [
        (b"", "task", r"is empty; give a file with text in it"),
        (b"\n\n   \n", "task", r"holds no text"),
        (b"only one document here", "task", r"needs at least 3 documents, got 1"),
        (b"tiny\n\ntext\n\nhere", "task", r"fewer than one block"),
        ("caf\u00e9 au lait\n\nencore".encode("latin-1"), "task", r"is not UTF-8 text .*iconv"),
        (b"only one document here", "control", r"needs at least 2 documents, got 1"),
        (None, "task", r"data file .* does not exist"),
    ],
    ids=["empty", "blank", "one-document", "shorter-than-a-block", "not-utf8", "control-too-short", "missing"],
)
def test_bad_corpus(corpora, tmp_path, capsys, content, where, pattern):
    import re

    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    out = tmp_path / "out"
    cfg = _cfg(corpora, out)
    if where == "task":
        cfg["tasks"][0] = {"corpus": str(path), "name": "bad"}
    else:
        cfg["control"] = {"corpus": str(path), "name": "bad"}
    err = _error(capsys, "run", _yaml(tmp_path / "c.yaml", cfg), "-q")
    assert re.search(pattern, err), err
    assert str(path) in err  # the message names the file
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, pattern",
    [
        ("model: tiny-llama\ntasks: [a, b\n", r"is not valid YAML at line \d+, column \d+"),
        ("model: tiny-llama\n  tasks: x\n", r"is not valid YAML at line 2"),
        ("- just\n- a list\n", r"must be a mapping at the top level, got list"),
        ("", r"config is empty"),
        ("\xff\xfe", None),
    ],
    ids=["unclosed-list", "bad-indent", "list", "empty", "not-utf8"],
)
def test_malformed_yaml(tmp_path, capsys, text, pattern):
    p = tmp_path / "c.yaml"
    if pattern is None:
        p.write_bytes(b"\xff\xfe\x00model")
        pattern = r"is not UTF-8 text"
    else:
        p.write_text(text, encoding="utf-8")
    import re

    assert re.search(pattern, _error(capsys, "run", str(p), "-q"))


def test_missing_config_file(tmp_path, capsys):
    assert "does not exist" in _error(capsys, "run", str(tmp_path / "nope.yaml"), "-q")


@pytest.mark.parametrize(
    "over, message",
    [
        ({"trainig": {"steps": 3}}, "unknown key 'trainig' (did you mean 'training'?)"),
        ({"training__stepz": 3}, "unknown key 'training.stepz' (did you mean 'steps'?)"),
        ({"eval__max_block": 3}, "unknown key 'eval.max_block' (did you mean 'max_blocks'?)"),
        ({"method__options__top_pp": 0.5}, "'top_pp' (did you mean 'top_p'?)"),
        ({"method__name": "selectve"}, "unknown method 'selectve'"),
        ({"training__schedule": "cosin"}, "did you mean 'cosine'"),
    ],
)
def test_unknown_keys_suggest_the_closest(corpora, tmp_path, capsys, over, message):
    cfg = _cfg(corpora, tmp_path / "out", **over)
    if "trainig" in over:
        del cfg["training"]
    err = _error(capsys, "run", _yaml(tmp_path / "c.yaml", cfg), "-q")
    assert message in err, err
    _nothing_trained(tmp_path / "out")


@pytest.mark.parametrize(
    "over, message",
    [
        ({"budget": 0}, "budget must be > 0, got 0"),
        ({"budget": -5}, "budget must be > 0, got -5"),
        ({"method__budget": -1}, "method.budget must be > 0"),
        ({"training__steps": 0}, "training.steps must be > 0, got 0"),
        ({"training__steps": -3}, "training.steps must be > 0, got -3"),
        ({"training__lr": 0}, "training.lr must be > 0"),
        ({"training__batch_size": 0}, "training.batch_size must be > 0"),
        ({"eval__max_blocks": -1}, "eval.max_blocks must be > 0"),
        ({"method__options__param_budget": 0}, "param_budget must be ≥ 1, got 0"),
        ({"method__options": {"num_modules": 0}}, "num_modules must be ≥ 1, got 0"),
        ({"method": {"name": "lora", "options": {"rank": 0}}}, "method 'lora': rank must be ≥ 1, got 0"),
        ({"budget": 10**9}, "cannot land within ±10% of 1,000,000,000"),
    ],
)
def test_negative_or_zero_budgets(corpora, tmp_path, capsys, over, message):
    err = _error(capsys, "run", _yaml(tmp_path / "c.yaml", _cfg(corpora, tmp_path / "out", **over)), "-q")
    assert message in err, err
    _nothing_trained(tmp_path / "out")


@pytest.mark.parametrize("top_p", [0, -0.1, 1.5, 2])
def test_top_p_outside_zero_one(corpora, tmp_path, capsys, top_p):
    err = _error(capsys, "run", _yaml(tmp_path / "c.yaml", _cfg(corpora, tmp_path / "out", method__options__top_p=top_p)), "-q")
    assert f"top_p must be in (0, 1], got {top_p}" in err, err
    _nothing_trained(tmp_path / "out")
    assert "top_p must be in (0, 1]" in _error(capsys, "select", "tiny-llama", "--top-p", str(top_p), "-q")


def test_rank_larger_than_the_matrix(corpora, tmp_path, capsys):
    cfg = _cfg(corpora, tmp_path / "out", method={"name": "lora", "options": {"rank": 4096}})
    err = _error(capsys, "run", _yaml(tmp_path / "c.yaml", cfg), "-q")
    assert "rank 4096 is larger than the matrix" in err and "use rank ≤ 32" in err
    _nothing_trained(tmp_path / "out")
    assert "rank 4096 is larger than the matrix" in _error(capsys, "run", str(tmp_path / "c.yaml"), "--check", "-o", str(tmp_path / "o2"))


# ---------------------------------------------------------------------------------------------------------------
# Existing run directories: resume, foreign and corrupt files. Nothing already written is damaged.
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def partial_run(corpora, tmp_path_factory):
    """A run that committed stage 1 and then failed (disk full at the stage-2 commit): stages_done == 1."""
    out = tmp_path_factory.mktemp("partial") / "run"
    real = os.replace

    def replace(src, dst, *a, **kw):
        if fnmatch.fnmatch(str(dst), "*/checkpoints/stage-2.safetensors"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", replace)
        with pytest.raises(Exception, match="No space left"):
            run(_cfg(corpora, out))
    assert json.loads((out / "state.json").read_text())["stages_done"] == 1
    return out


@pytest.fixture
def partial(partial_run, tmp_path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(partial_run, dest)
    return dest


def _resume_cfg(corpora, tmp_path, out, **over) -> str:
    return _yaml(tmp_path / "resume.yaml", _cfg(corpora, out, **over))


def test_resume_with_a_different_config_is_refused_unless_forced(corpora, tmp_path, capsys, partial):
    before = _snapshot(partial)
    path = _resume_cfg(corpora, tmp_path, partial, training__lr=1e-3)
    err = _error(capsys, "run", path, "--resume", "-q")
    assert "cannot resume" in err and "training.lr: 0.003 -> 0.001" in err and "--force" in err
    assert _snapshot(partial) == before
    err = _error(capsys, "run", path, "-q")  # and without --resume the existing run is not clobbered either
    assert "already holds a run (1/2 stages done)" in err
    assert _snapshot(partial) == before
    assert main(["run", path, "--resume", "--force", "-q"]) == 0
    capsys.readouterr()
    res = json.loads((partial / "results.json").read_text())
    assert res["status"] == "complete" and res["forced_resume"][0]["changes"] == ["training.lr: 0.003 -> 0.001"]


def test_checkpoint_from_a_different_base_model_is_refused(corpora, tmp_path, capsys, partial):
    from kappatune.models import build_tiny_llama

    other = tmp_path / "other-model"
    build_tiny_llama(seed=1).save_pretrained(other)  # same architecture and shapes, other weights
    before = _snapshot(partial)
    err = _error(capsys, "run", _resume_cfg(corpora, tmp_path, partial, model=str(other)), "--resume", "--force", "-q")
    assert "trained on a different base model (weight fingerprint mismatch)" in err
    assert _snapshot(partial) == before


def test_corrupt_stage_checkpoint_is_detected_by_checksum(corpora, tmp_path, capsys, partial):
    ck = partial / json.loads((partial / "state.json").read_text())["checkpoint"]["file"]
    data = bytearray(ck.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit in a weight: still valid safetensors, wrong numbers
    ck.write_bytes(bytes(data))
    before = _snapshot(partial)
    err = _error(capsys, "run", _resume_cfg(corpora, tmp_path, partial), "--resume", "-q")
    assert "is missing or corrupt (checksum mismatch)" in err and "stage-1.safetensors" in err
    assert _snapshot(partial) == before


def test_corrupt_or_tampered_state_file(corpora, tmp_path, capsys, partial):
    state = partial / "state.json"
    good = state.read_text()
    state.write_text(good[: len(good) // 2])  # torn (cannot happen through atomic writes, but a disk can rot)
    err = _error(capsys, "run", _resume_cfg(corpora, tmp_path, partial), "--resume", "-q")
    assert "state.json is unreadable or corrupt" in err and "--force" in err
    rotten = json.loads(good)
    rotten["base"]["control_ppl"] *= 1.0000001  # bit rot in a number: still valid JSON, caught by the checksum
    state.write_text(json.dumps(rotten))
    err = _error(capsys, "run", _resume_cfg(corpora, tmp_path, partial), "--resume", "-q")
    assert "state.json is corrupt (checksum mismatch)" in err
    from kappatune.harness import _state_checksum

    tampered = json.loads(good)  # a crafted state file (valid checksum) pointing a path outside the run directory
    tampered["checkpoint"]["file"] = "../../../victim.txt"
    tampered["checksum"] = _state_checksum(tampered)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    state.write_text(json.dumps(tampered))
    err = _error(capsys, "run", _resume_cfg(corpora, tmp_path, partial), "--resume", "-q")
    assert "bad checkpoint entry" in err
    assert victim.read_text() == "keep me\n"


def test_corrupt_mid_stage_checkpoint_is_skipped(corpora, tmp_path, capsys):
    """A mid-stage checkpoint whose files fail their checksums is ignored (warning) and never loaded."""
    from kappatune.training import latest_checkpoint

    cfg = _cfg(corpora, tmp_path / "out")
    root = tmp_path / "mid"
    from kappatune.config import config_from_dict
    from kappatune.harness import _build_method, _load
    from kappatune.training import save_checkpoint

    c = config_from_dict(cfg)
    model, _ = _load(c)
    method = _build_method(c.method, model, c, 0)
    method.prepare(model)
    save_checkpoint(root, method, None, None, meta={"stage": 1, "steps": 3, "step": 1})
    (d,) = root.glob("step-*")
    blob = bytearray((d / "trained.safetensors").read_bytes())
    blob[-3] ^= 0x01
    (d / "trained.safetensors").write_bytes(bytes(blob))
    with pytest.warns(UserWarning, match="does not match its checksum"):
        assert latest_checkpoint(root) is None


def test_analysis_cache_of_another_model_is_not_used(tmp_path):
    """The analysis cache is keyed by a hash of the weights and each entry records it: an entry copied under
    another model's key is detected, warned about and recomputed, never used."""
    from kappatune.analysis import analyze_model
    from kappatune.models import build_tiny_llama

    a, b = build_tiny_llama(seed=0), build_tiny_llama(seed=1)
    ra = analyze_model(a, cache=tmp_path, progress=False)
    rb = analyze_model(b, cache=False, progress=False)
    rb_key = analyze_model(b, cache=tmp_path, progress=False).fingerprint
    shutil.copy(tmp_path / f"{ra.fingerprint}.json", tmp_path / f"{rb_key}.json")  # a's numbers under b's key
    with pytest.warns(UserWarning, match="corrupt"):
        again = analyze_model(b, cache=tmp_path, progress=False)
    assert not again.from_cache
    assert [r.kappa for r in again.records] == [r.kappa for r in rb.records]


def test_token_cache_bit_rot_is_detected_and_rebuilt():
    """A flipped bit in a cached token array still has the right shapes: the checksum catches it."""
    from kappatune import data
    from kappatune.data import ByteTokenizer, make_corpus, tokenize_corpus

    corpus = make_corpus("rot", ["some text to tokenize " * 20] * 30)
    ids, offsets = tokenize_corpus(corpus, ByteTokenizer(), progress=False)
    (path,) = Path(data.cache_dir("tokens")).glob("rot-*.safetensors")
    blob = bytearray(path.read_bytes())
    blob[-10] ^= 0x01
    path.write_bytes(bytes(blob))
    again, _ = tokenize_corpus(corpus, ByteTokenizer(), progress=False)
    assert (again == ids).all()


def test_overrides_after_options_are_applied(corpora, tmp_path, capsys):
    """`kappatune run c.yaml -o DIR KEY=VALUE`: the override after an option is applied (here: refused value)."""
    path = _yaml(tmp_path / "c.yaml", _cfg(corpora, tmp_path / "out"))
    err = _error(capsys, "run", path, "-o", str(tmp_path / "o2"), "training.steps=0", "-q")
    assert "training.steps must be > 0, got 0" in err
    with pytest.raises(SystemExit) as exc:  # a real unknown option is still an argparse usage error (exit 2)
        main(["run", path, "--no-such-flag"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_check_validates_without_writing(corpora, tmp_path, capsys):
    """`--check` loads model, corpora and method and reports the budget, but writes nothing to the output dir."""
    out = tmp_path / "out"
    path = _yaml(tmp_path / "c.yaml", _cfg(corpora, out))
    assert main(["run", path, "--check", "-q"]) == 0
    assert "config OK; trainable parameters: selective" in capsys.readouterr().out
    assert not out.exists()
    err = _error(capsys, "run", path, "--check", "method.options.top_p=3", "-q")
    assert "top_p must be in (0, 1], got 3" in err
    assert not out.exists()
