"""Tokenise and pack: token ids per document (cached as safetensors), the seeded document-level
train / validation / test split, and fixed-size token blocks."""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from ..storage import atomic_write_bytes, cache_dir
from .corpora import Corpus
from .formats import load_corpus
from .tokenizers import ByteTokenizer, _eos_id, get_tokenizer, tokenizer_id

__all__ = ["SPLITS", "tokenize_corpus", "split_documents", "build_blocks"]

SPLITS = ("train", "validation", "test", "eval", "all")  # "eval" is the old name of "test"


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


def split_documents(n_docs: int, split: str, *, seed: int = 0, eval_fraction: float = 0.1,
                    validation_fraction: float = 0.0) -> np.ndarray:
    """Indices (sorted) of the documents in ``split`` under the seeded document-level split.

    A seeded permutation (``numpy.random.default_rng(seed)``) of the documents: its first
    ``max(1, round(eval_fraction * n_docs))`` entries are ``test`` (also called ``eval``, what results report),
    the next ``max(1, round(validation_fraction * n_docs))`` are ``validation`` (what learning curves, early
    stopping and any tuning read; none when ``validation_fraction`` is 0, the two-way split of earlier versions),
    the rest ``train``; ``all`` = every document. The test split does not depend on ``validation_fraction``, so
    results on it stay comparable with runs that had no validation split.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if split == "all":
        return np.arange(n_docs)
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    if not 0.0 <= validation_fraction < 1.0 or validation_fraction + eval_fraction >= 1.0:
        raise DataError(f"validation_fraction must be in [0, 1) with validation_fraction + eval_fraction < 1, "
                        f"got {validation_fraction}")
    three = validation_fraction > 0
    if n_docs < (3 if three else 2):
        raise DataError(
            f"a train/{'validation/' if three else ''}test split needs at least {3 if three else 2} documents, got "
            f"{n_docs}; add documents (blank-line separated in .txt)")
    if split == "validation" and not three:
        raise DataError("no validation split: validation_fraction is 0 (the two-way train/test split)")
    n_eval = min(n_docs - (2 if three else 1), max(1, round(eval_fraction * n_docs)))
    n_val = min(n_docs - n_eval - 1, max(1, round(validation_fraction * n_docs))) if three else 0
    perm = np.random.default_rng(seed).permutation(n_docs)
    parts = {"test": perm[:n_eval], "eval": perm[:n_eval], "validation": perm[n_eval:n_eval + n_val],
             "train": perm[n_eval + n_val:]}
    return np.sort(parts[split])


def build_blocks(
    corpus_or_name: Corpus | str | os.PathLike,
    tokenizer: Any,
    block_size: int,
    split: str = "train",
    seed: int = 0,
    eval_fraction: float = 0.1,
    max_blocks: int | None = None,
    *,
    validation_fraction: float = 0.0,
    text_field: str = "text",
    progress: bool = True,
    cache: bool = True,
) -> torch.LongTensor:
    """Token blocks ``[N, block_size]`` of one split (:func:`split_documents`: ``train`` / ``validation`` /
    ``test`` (= ``eval``) / ``all``): documents joined with EOS between them, cut in order.

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
    chosen = split_documents(len(corpus.documents), split, seed=seed, eval_fraction=eval_fraction,
                             validation_fraction=validation_fraction)
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
