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
    return apply_nested(cfg, over)


def write_sft(path: Path, key: str, n: int = 30, *, choices: bool = True) -> str:
    """Write ``n`` supervised examples as JSON lines: a prompt of words from ``WORDS[key]`` and a response that is
    one of two words decided by the prompt's first word (so it is learnable); returns the path."""
    import json

    rng = random.Random(f"sft-{key}")
    words = WORDS[key]
    answers = {"alpha": ["yes", "no"], "beta": ["up", "down"], "ctrl": ["left", "right"]}[key]
    lines = []
    for i in range(n):
        ws = [rng.choice(words) for _ in range(rng.randint(4, 8))]
        ex = {"prompt": f"{' '.join(ws)} ?", "response": answers[len(ws[0]) % 2], "id": i}
        if choices:
            ex["choices"] = answers
        lines.append(json.dumps(ex))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def tiny_sft_config(corpora: dict[str, str], sft: dict[str, str], out: Path, **over: Any) -> dict:
    """A two-task sft run config on tiny-llama (tasks ``sft['alpha']``, ``sft['beta']``, control = the ctrl corpus)."""
    cfg = tiny_run_config(
        corpora, out, name="sft",
        training={"steps": 4, "batch_size": 4, "seq_len": 48, "lr": 3e-3, "checkpoint_every": 2},
        eval={"max_blocks": 4, "batch_size": 8, "max_examples": 12},
        output={"plots": False, "spectrum_plot": False},
        num_threads=1,
    )
    cfg["tasks"] = [{"corpus": sft["alpha"], "name": "alpha", "type": "sft"},
                    {"corpus": sft["beta"], "name": "beta", "type": "sft", "metrics": ["accuracy", "exact_match"]}]
    return apply_nested(cfg, over)


def write_yaml(path: Path, cfg: dict) -> str:
    """Write ``cfg`` as YAML to ``path``; return the path as a string (for CLI argv)."""
    import yaml

    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return str(path)


def cli_error(capsys: Any, *argv: str) -> str:
    """Run the CLI; assert exit 2 and exactly one ``kappatune: error:`` line (no traceback) on stderr; return it."""
    from kappatune.cli import main

    capsys.readouterr()  # drop what the test's own set-up printed
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("kappatune: error: "), err
    assert "Traceback" not in err
    return err


def apply_nested(cfg: dict, over: dict[str, Any]) -> dict:
    """Set ``over``'s values in ``cfg``; a key ``a__b`` sets ``cfg["a"]["b"]`` (creating ``cfg["a"]``)."""
    for key, value in over.items():
        node = cfg
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return cfg


def subprocess_env(fault: str | None = None) -> dict:
    """The environment for a `python -m kappatune.cli` child: this checkout's src first on PYTHONPATH, no fault
    injected unless ``fault`` (``KAPPATUNE_FAULT``, e.g. ``"train_step:5"``) is given."""
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("KAPPATUNE_FAULT", None)
    if fault:
        env["KAPPATUNE_FAULT"] = fault
    return env


def free_port() -> int:
    """A TCP port free right now (the OS picks it), for a launched multi-process test: fixed ports collide when
    test files run in parallel (pytest-xdist)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
