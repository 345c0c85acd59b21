"""The commit record of a run and its output directory: ``state.json`` (written atomically with a checksum, read
back with its integrity checked), ``results.json``, the files a run writes, and the library versions recorded."""

from __future__ import annotations

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
from ..storage import atomic_write_json

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


_RUN_ARTIFACTS = ("state.json", "results.json", "results.md", "checkpoints", "final", "plots")


def _finished(out: Path, state: dict[str, Any]) -> bool:
    """All stages committed *and* the final outputs written (a run killed during finalize is finalized on resume)."""
    if not state.get("complete"):
        return False
    try:
        return bool(load_results(out).get("finalized"))
    except KappaTuneError:
        return False


def _clear_run_dir(out: Path) -> None:
    """Remove only the files a run writes (never the whole directory: it may be the user's)."""
    for name in _RUN_ARTIFACTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


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
