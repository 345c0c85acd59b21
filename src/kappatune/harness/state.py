"""The commit record of a run and its output directory: ``state.json`` (written atomically with a checksum, read
back with its integrity checked), ``results.json``, the files a run writes, and the library versions recorded."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import CacheError, ConfigError, KappaTuneError
from ..storage import atomic_write_json, sha256_file

__all__ = ["STATE_VERSION", "STATE_FILE", "library_versions", "load_results"]

STATE_VERSION = 1
STATE_FILE = "state.json"


def library_versions() -> dict[str, str]:
    """Versions of Python, kappatune and the libraries that determine the numbers."""
    from importlib import metadata

    from .. import __version__

    out = {"python": platform.python_version(), "platform": platform.platform(), "kappatune": __version__}
    for pkg in ("torch", "transformers", "peft", "accelerate", "safetensors", "datasets", "numpy", "eigentune"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    out["torch_threads"] = str(torch.get_num_threads())
    out["cuda"] = torch.version.cuda or "none"
    return out


def _state_checksum(state: dict[str, Any]) -> str:
    from ..storage import _json_default

    body = {k: v for k, v in state.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=_json_default).encode()).hexdigest()


def _write_state(out: Path, state: dict[str, Any]) -> None:
    """The commit point of a run: state.json, atomically, with a checksum of its content (bit rot is detected)."""
    state["checksum"] = _state_checksum(state)
    atomic_write_json(out / STATE_FILE, state)


def _read_state(out: Path) -> dict[str, Any] | None:
    p = out / STATE_FILE
    if not p.is_file():
        return None
    try:
        state = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CacheError(f"{p} is unreadable or corrupt ({exc}); rerun with --force to start the run over") from exc
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise CacheError(f"{p} was written by another kappatune version; rerun with --force to start over")
    if "checksum" in state and state["checksum"] != _state_checksum(state):
        raise CacheError(f"{p} is corrupt (checksum mismatch); rerun with --force to start the run over")
    ck = state.get("checkpoint")  # a path read back from disk: never let it point outside the run directory
    if ck is not None and not (isinstance(ck, dict) and re.fullmatch(r"checkpoints/stage-\d+\.safetensors", str(ck.get("file")))):
        raise CacheError(f"{p} is corrupt (bad checkpoint entry {ck!r}); rerun with --force to start the run over")
    return state


# What a run writes, relative to its output directory (globs). Only these are ever deleted (by --force): the
# directory itself, and anything else in it (the user's own files, also inside final/ or plots/), is left alone.
_RUN_FILES = (
    "state.json", "results.json", "results.md", "checkpoints/stage-*.safetensors",
    "final/adapter.safetensors", "plots/forgetting_heatmap.png", "plots/control_vs_task.png", "plots/kappa_spectrum.png",
)
_RUN_DIRS = ("final/model", "final/.model.tmp")  # written whole by save_pretrained
_MID_FILES = ("trained.safetensors", "state.pt", "meta.json")  # checkpoints/mid/step-N/


def _run_files(out: Path) -> list[Path]:
    """The files and directories in ``out`` that a run wrote (by name: see ``_RUN_FILES``)."""
    found = [p for pat in _RUN_FILES for p in sorted(out.glob(pat)) if p.is_file()]
    found += [out / d for d in _RUN_DIRS if (out / d).is_dir()]
    mid = out / "checkpoints" / "mid"
    if mid.is_dir():
        found += [f for step in sorted(mid.glob("step-*")) if step.is_dir() for f in sorted(step.iterdir())
                  if f.name in _MID_FILES or (f.name.startswith(".") and f.name.endswith(".tmp"))]
    found += [p for p in out.rglob(".*.tmp") if p.is_file()]  # torn temporaries of atomic writes
    return list(dict.fromkeys(found))


def _holds_a_run(out: Path) -> list[str]:
    """Which files of a run ``out`` holds (relative names): a run directory is recognised by any of them, not by
    ``state.json`` alone, so deleting that one file does not make the directory look free."""
    return [str(p.relative_to(out)) for p in _run_files(out) if not p.name.startswith(".")]


def _finished(out: Path, state: dict[str, Any]) -> bool:
    """All stages committed *and* the final outputs written and present (a run killed during finalize, or whose
    final adapter, plot or report was deleted since, is finalized again on resume)."""
    if not state.get("complete"):
        return False
    try:
        results = load_results(out)
    except KappaTuneError:
        return False
    if not results.get("finalized"):
        return False
    listed = [*(results.get("files") or {}).values(), *(results.get("plots") or []), "results.md"]
    if not all((out / str(f)).exists() for f in listed):
        return False
    sums = results.get("file_sha256") or {}
    return all(sha256_file(out / f) == h for f, h in sums.items() if (out / f).is_file())


def _clear_run_dir(out: Path) -> None:
    """Remove only what a run wrote (never the whole directory, nor other files in it: it may be the user's);
    directories the run created are removed only when that leaves them empty."""
    for p in _run_files(out):
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    for d in ("checkpoints/mid", "checkpoints", "final", "plots"):
        if (out / d).is_dir():
            for step in ((out / d).glob("step-*") if d == "checkpoints/mid" else ()):
                with contextlib.suppress(OSError):
                    step.rmdir()
            with contextlib.suppress(OSError):
                (out / d).rmdir()  # only if empty


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a run's ``results.json`` (``path``: the file or its output directory)."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no results at {p}") from None
    except (OSError, ValueError) as exc:
        raise CacheError(f"{p} is unreadable or corrupt: {exc}") from None
