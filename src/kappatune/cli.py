"""The ``kappatune`` command line: a thin layer over the Python API.

Sub-commands live in :mod:`kappatune.commands`, one module per area, each exposing
``register(subparsers)``; every handler parses flags, calls one public function and prints the result.
Input problems raise :class:`kappatune.errors.KappaTuneError`; ``main`` prints them as one line, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from .errors import KappaTuneError

COMMAND_MODULES = ("analysis", "data", "harness")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="kappatune", description="Fine-tune LLMs on new data without forgetting.")
    parser.add_argument("--version", action="version", version=f"kappatune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod in COMMAND_MODULES:
        try:
            module = importlib.import_module(f".commands.{mod}", __package__)
        except ModuleNotFoundError as exc:  # area not built yet
            if exc.name and exc.name.endswith(f"commands.{mod}"):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    # Libraries' deprecation notices about their own internals are not the user's problem (one-line errors).
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|accelerate|torch)(\.|$)")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # KEY=VALUE overrides after an option (`run c.yaml -o out training.steps=5`): argparse leaves them over
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.handler(args) or 0)
    except KappaTuneError as exc:
        print(f"kappatune: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the environment (disk full, permissions, a path that is a file) outside atomic writes
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"kappatune: error: {where}{exc.strerror or exc} (check the path, free disk space and permissions)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kappatune: interrupted (finished results are kept; rerun with --resume where offered)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
