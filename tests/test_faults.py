"""Faults: a run killed with a real SIGKILL at precise points, then resumed; disk-full and permission errors.

Every kill here is a real ``SIGKILL`` of a ``kappatune run`` subprocess (nothing flushed, no handler runs), placed
with the ``$KAPPATUNE_FAULT=PATTERN:N`` test hook (:func:`kappatune.storage.fault_point`: ``write:<path>``
points halfway through every atomic write, and ``train_step``, ``checkpoint_write``, ``eval``, ``stage_commit``,
``finalize``). After each kill the run is resumed and must
(1) complete, (2) keep every stage committed before the kill exactly as it was (its record, timings included, is
carried over, so it was not redone), (3) leave no torn file behind, and (4) end with the same metrics and
bitwise-identical trained tensors as an uninterrupted run.

test_harness.py already kills at ``train_step``, ``checkpoint_write``, ``stage_commit`` and from outside the
process; this file adds evaluation, the analysis-cache write, the stage-checkpoint and state/results writes, the
finalize step, a chain of kills across resumes, and full-disk / permission errors (see docs/reliability.md).
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kappatune.errors import KappaTuneError
from kappatune.harness import run
from kappatune.storage import sha256_file
from run_helpers import make_corpora, tiny_run_config, subprocess_env as _env

REPO = Path(__file__).resolve().parents[1]

STEPS = 4


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("corpora")
    return make_corpora(d, n_docs=30)


def _cfg(corpora: dict[str, str], out: Path, **over) -> dict:
    return tiny_run_config(
        corpora, out, name="faults",
        training={"steps": STEPS, "batch_size": 2, "seq_len": 32, "lr": 3e-3, "warmup_steps": 1, "checkpoint_every": 2},
        eval={"max_blocks": 4, "batch_size": 4},
        output={"plots": False, "spectrum_plot": False},
        num_threads=1, **over,
    )


def _write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _key_metrics(results: dict) -> dict:
    return {"matrix": results["matrix"], "losses": [s["losses"] for s in results["stages"]],
            "trainable": results["trainable_params"], "status": results["status"]}




def _cli(cfg_path: Path, *args: str, fault: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kappatune.cli", "run", str(cfg_path), "-q", *args], env=_env(fault),
                          capture_output=True, text=True, timeout=timeout)


def _kill_at(cfg_path: Path, fault: str) -> None:
    proc = _cli(cfg_path, fault=fault)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {fault}: rc {proc.returncode}\n{proc.stderr[-2000:]}"


def _state(out: Path) -> dict | None:
    p = out / "state.json"
    return json.loads(p.read_text()) if p.is_file() else None  # must parse: state.json is never torn


def _no_torn_files(*roots: Path) -> None:
    """Every JSON file parses and no temporary file of an interrupted atomic write shadows a real one."""
    for root in roots:
        if not root.exists():
            continue
        for p in root.rglob("*.json"):
            json.loads(p.read_text(encoding="utf-8"))
        for p in root.rglob("*.safetensors"):
            from safetensors import safe_open

            with safe_open(str(p), framework="pt") as fh:
                list(fh.keys())


def _cache() -> Path:
    return Path(os.environ["KAPPATUNE_CACHE"])


@pytest.fixture(scope="module")
def reference(corpora, tmp_path_factory):
    """An uninterrupted run every resumed run must reproduce exactly."""
    out = tmp_path_factory.mktemp("ref") / "run"
    results = run(_cfg(corpora, out))
    return {"results": results, "adapter": _tensors(out / "final" / "adapter.safetensors"), "out": out}


def _tensors(path: Path) -> dict:
    """Metadata and every tensor's raw bytes of a safetensors file (the header's key order is not canonical:
    safetensors writes its metadata map in hash order, so two equal files can differ byte-wise)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        return {"meta": meta, **{k: (str(t.dtype), tuple(t.shape), t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
                                 for k in fh.keys() for t in [fh.get_tensor(k)]}}


def _check_resumed(out: Path, reference: dict, before: dict | None) -> dict:
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["status"] == "complete"
    assert _key_metrics(resumed) == _key_metrics(reference["results"])
    assert _tensors(out / "final" / "adapter.safetensors") == reference["adapter"]  # bitwise-identical tensors
    if before is not None:  # what was committed before the kill is carried over untouched, not redone
        if before.get("base") is not None:
            assert resumed["base"] == before["base"]
        for rec in before["stages"]:
            assert resumed["stages"][rec["stage"] - 1] == rec
    _no_torn_files(out)
    return resumed


# ---------------------------------------------------------------------------------------------------------------
# Kill at a named point, resume, compare.
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fault, stages_done, resumed_from",
    [
        # during the evaluation after stage 1: its end-of-training checkpoint is reused, nothing is retrained
        ("eval:2", 0, [STEPS, 0]),
        # halfway through writing the analysis cache (κ of every tensor): recomputed on resume
        ("write:*/analysis/*.json:1", 0, [0, 0]),
        # halfway through writing the stage-2 commit checkpoint: stage 1 stays committed and loadable
        ("write:*/checkpoints/stage-2.safetensors:1", 1, [0, STEPS]),
        # halfway through writing state.json at the stage-1 commit: the previous state.json is intact
        ("write:*/state.json:2", 0, [STEPS, 0]),
        # halfway through the first results.json (right after stage 1 was committed)
        ("write:*/results.json:1", 1, [0, 0]),
        # halfway through the final adapter (all stages committed): only the finalize step is redone
        ("write:*/final/adapter.safetensors:1", 2, [0, 0]),
    ],
)
def test_sigkill_at_a_point_then_resume(reference, corpora, tmp_path, fault, stages_done, resumed_from):
    out = tmp_path / "run"
    path = _write_yaml(tmp_path / "c.yaml", _cfg(corpora, out))
    _kill_at(path, fault)
    before = _state(out)
    assert (before["stages_done"] if before else 0) == stages_done
    _no_torn_files(out, _cache() / "analysis")
    if before and before["stages_done"]:  # the committed stage checkpoint is intact (checksum) after the kill
        ck = before["checkpoint"]
        assert sha256_file(out / ck["file"]) == ck["sha256"]
    resumed = run(_cfg(corpora, out), resume=True)
    assert [s["resumed_from_step"] for s in resumed["stages"]] == resumed_from
    _check_resumed(out, reference, before)


def test_kill_then_resume_through_the_cli(reference, corpora, tmp_path):
    """The same through the CLI end to end: killed in the middle of stage 2's training, `--resume` finishes it."""
    out = tmp_path / "run"
    path = _write_yaml(tmp_path / "c.yaml", _cfg(corpora, out))
    _kill_at(path, f"train_step:{STEPS + 3}")
    before = _state(out)
    assert before["stages_done"] == 1
    proc = _cli(path, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = _check_resumed(out, reference, before)
    assert resumed["stages"][1]["resumed_from_step"] == 2
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert run(_cfg(corpora, out), resume=True) == resumed  # a finished run resumed again does nothing...
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files  # ... and changes nothing


def test_chain_of_kills_across_resumes(reference, corpora, tmp_path):
    """Killed again and again — each resumed process dies at a seeded random point — and still exact at the end."""
    rng = random.Random(7)
    out = tmp_path / "run"
    path = _write_yaml(tmp_path / "c.yaml", _cfg(corpora, out))
    points = ["train_step:{}".format(rng.randint(1, STEPS)), "write:*/state.json:1",
              "checkpoint_write:{}".format(rng.randint(1, 3)), "eval:1"]
    committed: dict[int, dict] = {}
    kills = 0
    for fault in points:
        proc = _cli(path, "--resume", fault=fault)
        if proc.returncode == 0:  # the run finished before reaching the point
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        kills += 1
        state = _state(out)
        for rec in (state or {"stages": []})["stages"]:  # a committed stage never changes afterwards
            assert committed.setdefault(rec["stage"], rec) == rec
    assert kills >= 3, kills
    resumed = run(_cfg(corpora, out), resume=True)
    for k, rec in committed.items():
        assert resumed["stages"][k - 1] == rec
    _check_resumed(out, reference, None)


def test_torn_temporary_files_do_not_shadow_results(reference, corpora, tmp_path):
    """A kill mid-write leaves only a hidden ``.NAME.*.tmp`` beside the old file; readers never look at it, and
    the resumed run removes it."""
    out = tmp_path / "run"
    path = _write_yaml(tmp_path / "c.yaml", _cfg(corpora, out))
    _kill_at(path, "write:*/state.json:2")
    tmps = list(out.glob(".state.json.*.tmp"))
    assert tmps, "the hook should have left a torn temporary file"
    assert json.loads((out / "state.json").read_text())["stages_done"] == 0
    run(_cfg(corpora, out), resume=True)
    assert json.loads((out / "state.json").read_text())["complete"] is True
    assert not list(out.rglob(".*.tmp"))  # the resume swept the leftovers


# ---------------------------------------------------------------------------------------------------------------
# Disk full / permission denied on the output directory.
# ---------------------------------------------------------------------------------------------------------------
def _fail_writes(monkeypatch, pattern: str, err: int) -> None:
    """Make ``os.replace`` (the commit of every atomic write) fail with ``err`` for destinations matching ``pattern``."""
    import fnmatch

    real = os.replace

    def replace(src, dst, *a, **kw):
        if fnmatch.fnmatch(str(dst), pattern):
            raise OSError(err, os.strerror(err), str(dst))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("err, words", [(errno.ENOSPC, "No space left on device"), (errno.EACCES, "Permission denied"),
                                         (errno.EROFS, "Read-only file system")])
def test_disk_full_or_read_only_keeps_the_previous_checkpoint(reference, corpora, tmp_path, monkeypatch, capsys, err, words):
    from kappatune.cli import main

    out = tmp_path / "run"
    path = _write_yaml(tmp_path / "c.yaml", _cfg(corpora, out))
    _fail_writes(monkeypatch, "*/checkpoints/stage-2.safetensors", err)
    assert main(["run", str(path), "-q"]) == 2
    msg = capsys.readouterr().err.strip()
    assert len(msg.splitlines()) == 1 and msg.startswith("kappatune: error: cannot write"), msg
    assert words in msg and "stage-2.safetensors" in msg
    state = _state(out)
    assert state["stages_done"] == 1  # stage 1 stays committed...
    ck = out / state["checkpoint"]["file"]
    assert sha256_file(ck) == state["checkpoint"]["sha256"]  # ... its checkpoint intact ...
    from kappatune.harness import _build_method, _load
    from kappatune.config import config_from_dict

    cfg = config_from_dict(_cfg(corpora, out))
    model, _ = _load(cfg)
    method = _build_method(cfg.method, model, cfg, 0)
    method.prepare(model)
    method.load(ck)  # ... and loadable
    assert not list(out.rglob(".*.tmp")), "a failed write must not leave its temporary file"
    monkeypatch.undo()  # space freed: the run resumes and ends as if nothing happened
    resumed = run(_cfg(corpora, out), resume=True)
    assert resumed["stages"][0] == state["stages"][0]
    _check_resumed(out, reference, state)


def test_disk_full_while_writing_the_data_is_reported_and_cleaned_up(tmp_path, monkeypatch):
    """ENOSPC from write/fsync (not only rename): one clear error, old file intact, no temporary left."""
    from kappatune.storage import atomic_write_text

    target = tmp_path / "results.json"
    atomic_write_text(target, "old\n")

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(KappaTuneError, match=r"cannot write .*results.json: No space left on device \(check free disk space"):
        atomic_write_text(target, "new\n")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_output_directory_is_a_clear_error(corpora, tmp_path, capsys):
    from kappatune.cli import main

    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        path = _write_yaml(tmp_path / "c.yaml", _cfg(corpora, out))
        assert main(["run", str(path), "-q"]) == 2
        msg = capsys.readouterr().err.strip()
        assert len(msg.splitlines()) == 1 and "Permission denied" in msg, msg
    finally:
        out.chmod(0o700)


def test_output_path_that_is_a_file_is_a_clear_error(corpora, tmp_path, capsys):
    from kappatune.cli import main

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("precious\n")
    path = _write_yaml(tmp_path / "c.yaml", _cfg(corpora, blocker / "run"))
    assert main(["run", str(path), "-q"]) == 2
    msg = capsys.readouterr().err.strip()
    assert len(msg.splitlines()) == 1 and msg.startswith("kappatune: error:"), msg
    assert blocker.read_text() == "precious\n"


# ---------------------------------------------------------------------------------------------------------------
# Determinism: same config and seed -> bitwise-identical selections, tensors and (CPU) metrics.
# ---------------------------------------------------------------------------------------------------------------
def test_two_uninterrupted_runs_are_bitwise_identical(reference, corpora, tmp_path):
    again = run(_cfg(corpora, tmp_path / "again"))
    assert _key_metrics(again) == _key_metrics(reference["results"])
    assert _tensors(tmp_path / "again" / "final" / "adapter.safetensors") == reference["adapter"]
    assert again["budget_report"] == reference["results"]["budget_report"]


def test_selections_are_identical_across_processes(tmp_path):
    """Separate processes (different hash seeds, no shared cache) select exactly the same tensors, every policy."""
    script = (
        "import json, sys\n"
        "from kappatune.models import build_tiny_moe\n"
        "from kappatune.selection import select_targets\n"
        "m = build_tiny_moe()\n"
        "out = {p: select_targets(m, p, top_p=0.3, seed=5, progress=False).to_dict() for p in ('kappa', 'snr', 'random')}\n"
        "sys.stdout.write(json.dumps(out, sort_keys=True))\n"
    )
    env = _env()
    env["PYTHONHASHSEED"] = "12345"  # another hash seed than this process's
    env["KAPPATUNE_CACHE"] = str(tmp_path / "cache-other")  # and no shared analysis cache
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from kappatune.models import build_tiny_moe
    from kappatune.selection import select_targets

    m = build_tiny_moe()
    here = {p: select_targets(m, p, top_p=0.3, seed=5, progress=False).to_dict() for p in ("kappa", "snr", "random")}
    assert proc.stdout == json.dumps(here, sort_keys=True)
    sel = json.loads(proc.stdout)
    assert sel["random"] != sel["kappa"]  # the policies really differ, so equality above is not vacuous


def test_bench_killed_mid_cell_reruns_only_the_unfinished_cell(reference, corpora, tmp_path):
    """A benchmark killed inside its second cell: rerun, the finished cell is skipped (not re-run), the killed
    one resumes, and the finished cell's numbers equal the single-run reference."""
    from kappatune.harness import bench

    cfg = _cfg(corpora, tmp_path / "bench")
    del cfg["method"]
    cfg.update(name="bench-faults", seeds=[0], methods=[
        {"name": "selective", "label": "kappatune", "options": {"policy": "kappa", "top_p": 0.5}},
        {"name": "lora", "label": "lora", "options": {"rank": 2}},
    ])
    path = _write_yaml(tmp_path / "b.yaml", cfg)
    proc = subprocess.run([sys.executable, "-m", "kappatune.cli", "bench", str(path), "-q"],
                          env=_env(f"train_step:{2 * STEPS + 3}"), capture_output=True, text=True, timeout=180)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    first = json.loads((tmp_path / "bench" / "kappatune" / "seed-0" / "results.json").read_text())
    assert first["finalized"] and _key_metrics(first) == _key_metrics(reference["results"])
    summary = bench(cfg)
    assert summary["skipped"] == ["kappatune/seed-0"] and summary["ran"] == ["lora/seed-0"]
    lora = json.loads((tmp_path / "bench" / "lora" / "seed-0" / "results.json").read_text())
    assert lora["status"] == "complete" and lora["stages"][0]["resumed_from_step"] == 2
    assert json.loads((tmp_path / "bench" / "kappatune" / "seed-0" / "results.json").read_text()) == first


def test_ctrl_c_is_one_line_and_resumable(reference, corpora, tmp_path):
    """SIGINT (Ctrl-C) mid-run: exit status 130, one line saying finished results are kept, no traceback; resume."""
    import time

    out = tmp_path / "run"
    path = _write_yaml(tmp_path / "c.yaml", _cfg(corpora, out, training__steps=40, training__checkpoint_every=5))
    proc = subprocess.Popen([sys.executable, "-m", "kappatune.cli", "run", str(path), "-q"], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # wait until stage 1 is committed, then interrupt
        try:
            if (_state(out) or {}).get("stages_done", 0) >= 1:
                break
        except ValueError:
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before the interrupt arrived")
    assert proc.returncode == 130, err[-2000:]
    lines = [l for l in err.splitlines() if l.strip()]
    assert lines == ["kappatune: interrupted (finished results are kept; rerun with --resume where offered)"], err[-2000:]
    before = _state(out)
    assert before["stages_done"] >= 1
    resumed = run(_cfg(corpora, out, training__steps=40, training__checkpoint_every=5), resume=True)
    assert resumed["status"] == "complete"
    for rec in before["stages"]:
        assert resumed["stages"][rec["stage"] - 1] == rec


def test_damaged_results_of_a_finished_run_are_rebuilt_on_resume(reference, corpora, tmp_path):
    """results.json is derived from the committed state: if it is damaged, --resume rewrites it (no retraining)."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    state = (out / "state.json").read_bytes()
    (out / "results.json").write_text('{"truncated": ')
    resumed = run(_cfg(corpora, out), resume=True)
    assert _key_metrics(resumed) == _key_metrics(reference["results"])
    assert resumed["stages"] == reference["results"]["stages"]  # carried over, not retrained
    assert json.loads((out / "results.json").read_text())["finalized"] is True
    assert (out / "state.json").read_bytes() == state
