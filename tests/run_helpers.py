"""Shared helpers for the harness, fault and bad-input tests: small generated corpora and tiny run configs."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

# Three tiny "domains": two tasks and a control, as word lists to sample documents from.
WORDS = {
    "alpha": "the quick brown fox jumps over a lazy dog while seven wizards box".split(),
    "beta": "def return import class lambda yield async await print range len dict".split(),
    "ctrl": "it is a truth universally acknowledged that a single man in possession of fortune".split(),
}


def write_corpus(path: Path, key: str, n_docs: int = 30, salt: str | None = None) -> str:
    """Write ``n_docs`` blank-line-separated documents of 60–100 words from ``WORDS[key]``; returns the path."""
    rng = random.Random(key if salt is None else f"{key}-{salt}")
    docs = [" ".join(rng.choice(WORDS[key]) for _ in range(rng.randint(60, 100))) for _ in range(n_docs)]
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return str(path)


def make_corpora(directory: Path, n_docs: int = 30, salt: str | None = None) -> dict[str, str]:
    """One corpus file per key of ``WORDS`` in ``directory``."""
    return {k: write_corpus(directory / f"{k}.txt", k, n_docs, salt) for k in WORDS}


def tiny_run_config(corpora: dict[str, str], out: Path, *, name: str, training: dict[str, Any],
                    eval: dict[str, Any], output: dict[str, Any], **over: Any) -> dict:
    """A two-task tiny-llama run config (KappaTune selective, top 50%) as a plain dict.

    ``over``: extra keys, ``a__b=value`` setting nested ``cfg["a"]["b"]``.
    """
    cfg: dict[str, Any] = {
        "name": name,
        "model": "tiny-llama",
        "tasks": [{"corpus": corpora["alpha"], "name": "alpha"}, {"corpus": corpora["beta"], "name": "beta"}],
        "control": {"corpus": corpora["ctrl"], "name": "ctrl"},
        "method": {"name": "selective", "options": {"policy": "kappa", "top_p": 0.5}},
        "training": training,
        "eval": eval,
        "output": output,
        "seed": 0,
        "output_dir": str(out),
        "progress": False,
    }
    for key, value in over.items():
        node = cfg
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return cfg
