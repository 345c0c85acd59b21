"""Crash-safe file writes, weight fingerprints and the user cache directory.

All results kappatune writes go through :func:`atomic_write_bytes` (write to a temporary file in the same
directory, fsync, ``os.replace``), so a killed process leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import KappaTuneError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "cache_dir",
    "fingerprint_tensors",
    "fingerprint_model",
    "sha256_file",
    "fault_point",
    "DirectoryLock",
]

_UMASK = os.umask(0o022)  # read the process umask once (os.umask can only be read by setting it)
os.umask(_UMASK)

# ---------------------------------------------------------------------------------------------------------------
# Test hook: a real SIGKILL at a named point (inert unless $KAPPATUNE_FAULT is set).
# ---------------------------------------------------------------------------------------------------------------
_FAULT_COUNTS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Test hook. If ``$KAPPATUNE_FAULT`` is ``PATTERN:N``, SIGKILL this process the N-th time a point whose name
    matches ``PATTERN`` (fnmatch glob) is reached; costs one environment lookup when the variable is unset.

    Atomic writes reach ``write:<path>`` halfway through writing their temporary file (so e.g.
    ``write:*/analysis/*.json:1`` kills the first analysis-cache write mid-file); the training loop and the
    harness reach ``train_step``, ``checkpoint_write``, ``eval``, ``stage_commit`` and ``finalize``, ``kappatune train``
    also ``export``. With ``$KAPPATUNE_FAULT_RANK`` set, only the process of that ``RANK`` (torchrun / accelerate
    launch) is killed. A real,
    uncatchable signal: nothing is flushed or cleaned up, as with an OOM kill or a pulled plug. Used by
    tests/test_faults.py and tests/test_harness.py; see docs/reliability.md.
    """
    spec = os.environ.get("KAPPATUNE_FAULT")
    if not spec:
        return
    only = os.environ.get("KAPPATUNE_FAULT_RANK")  # multi-process runs: kill only the process of this RANK
    if only is not None and os.environ.get("RANK", "0") != only:
        return
    pattern, _, count = spec.rpartition(":")
    if not count.isdigit():  # no ":N": the first time
        pattern, count = spec, "1"
    if not fnmatch.fnmatchcase(name, pattern):
        return
    _FAULT_COUNTS[pattern] = _FAULT_COUNTS.get(pattern, 0) + 1
    if _FAULT_COUNTS[pattern] >= int(count):
        os.kill(os.getpid(), signal.SIGKILL)


def cache_dir(sub: str = "") -> Path:
    """kappatune's cache directory: ``$KAPPATUNE_CACHE``, else ``$XDG_CACHE_HOME/kappatune``, else ``~/.cache/kappatune``."""
    root = os.environ.get("KAPPATUNE_CACHE")
    if root:
        base = Path(root)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kappatune"
    path = base / sub if sub else base
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename). Raises a clear error on OSError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results should be readable like any new file
            with os.fdopen(fd, "wb") as fh:
                half = len(data) // 2
                fh.write(data[:half])
                if os.environ.get("KAPPATUNE_FAULT"):  # test hook: die with a torn temporary file
                    fh.flush()
                    fault_point(f"write:{path}")
                fh.write(data[half:])
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError as exc:
        raise KappaTuneError(f"cannot write {path}: {exc.strerror or exc} (check free disk space and permissions)") from exc
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX): without it a power loss can undo the rename after later steps (say, deleting
    the checkpoint the new state.json supersedes) reached the disk. Best effort: not every platform can."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomic JSON write; ``inf``/``nan`` are written as JSON ``Infinity``/``NaN`` (Python's json reads them back)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A content hash of named tensors (names, shapes, dtypes and every byte of the values).

    Hashing all bytes of a 135M-parameter model costs ~0.3 s on CPU; this is what keys the analysis cache and
    ties adapters/checkpoints to their base weights, so that numbers from a different model are never reused.
    """
    h = hashlib.blake2b(digest_size=16)
    for name, t in named:
        t = t.detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if t.device.type != "cpu":
            t = t.cpu()
        if t.numel():
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint_model(model: torch.nn.Module, *, dtype_robust: bool = False) -> str:
    """Fingerprint of a model's parameters and buffers (tied tensors counted once).

    ``dtype_robust=True``: every floating tensor is first rounded to bfloat16 and its dtype left out of the hash,
    so the same base weights give the same fingerprint in float32 and after ``model.to(torch.bfloat16)`` (a cast
    to bf16 rounds exactly as this does). Adapters carry both fingerprints: the exact one guards checkpoints, the
    robust one lets a saved adapter be applied to the same base loaded in another dtype.
    """
    if dtype_robust:
        return _fingerprint_bf16(model)
    seen: set[int] = set()
    items = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        key = t.data_ptr() if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        items.append((name, t))
    return fingerprint_tensors(items)


def _fingerprint_bf16(model: torch.nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    seen: set[int] = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        key = t.data_ptr() if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        kind = "float" if t.is_floating_point() else str(t.dtype)
        h.update(f"{name}|{tuple(t.shape)}|{kind}|".encode())
        if t.is_floating_point():
            t = t.to(torch.bfloat16)
        if t.numel():
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class DirectoryLock:
    """An exclusive, advisory lock on a directory that one kappatune process writes (a run or bench directory).

    ``fcntl.flock`` on ``$KAPPATUNE_CACHE/locks/<hash of the directory's real path>.lock`` (outside the directory,
    which stays exactly as the run leaves it; created if needed and never deleted, so that it cannot race), or on
    ``lock_file`` where given: the kernel drops the lock when the holder exits, however it exits (even
    ``SIGKILL``), so a stale lock never blocks a resume. As a context manager a second process gets one clear
    :class:`KappaTuneError` naming the holder's pid; :meth:`acquire` / :meth:`release` are the non-raising form
    (a study worker's claim on a cell). On systems without ``fcntl`` (Windows) the lock is a no-op.
    """

    def __init__(self, directory: str | os.PathLike, what: str = "run", lock_file: str | os.PathLike | None = None):
        self.directory, self.what = Path(directory), what
        self.lock_file = Path(lock_file) if lock_file is not None else None
        self._fh: Any = None

    def acquire(self, blocking: bool = False) -> bool:
        """Take the lock (``blocking``: wait for it); False if another process holds it."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return True
        if self.lock_file is not None:
            self.lock_file.parent.mkdir(parents=True, exist_ok=True)
            path = self.lock_file
        else:
            key = hashlib.sha256(os.path.realpath(self.directory).encode()).hexdigest()[:32]
            path = cache_dir("locks") / f"{key}.lock"
        fh = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError:
            fh.close()
            return False
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        self._fh = fh
        return True

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing releases the flock
            self._fh = None

    def holder(self) -> str:
        """Who holds the lock, as its holder wrote it (``pid N``), or ``unknown``."""
        path = self.lock_file or cache_dir("locks") / (
            hashlib.sha256(os.path.realpath(self.directory).encode()).hexdigest()[:32] + ".lock")
        try:
            return path.read_text("utf-8").strip() or "unknown"
        except OSError:
            return "unknown"

    def __enter__(self) -> "DirectoryLock":
        if not self.acquire():
            raise KappaTuneError(
                f"{self.directory} is in use by another kappatune process ({self.holder()}); wait for it to finish, "
                f"or choose another output_dir (two writers would overwrite each other's {self.what})"
            ) from None
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
