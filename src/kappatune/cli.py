"""The ``kappatune`` command line: a thin layer over the Python API.

Sub-commands live in :mod:`kappatune.commands`, one module per area, each exposing
``register(subparsers)``; every handler parses flags, calls one public function and prints the result.
Input problems raise :class:`kappatune.errors.KappaTuneError`; ``main`` prints them as one line, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Callable, Sequence

from .errors import KappaTuneError

COMMAND_MODULES = ("analysis", "data", "harness", "train")


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
    restore = _setup_output(bool(getattr(args, "quiet", False)))
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
    finally:
        restore()


class _ConsoleHandler(logging.Handler):
    """kappatune's log lines on the console: INFO on stdout (progress lines of runs), warnings on stderr; looks up
    sys.stdout/sys.stderr at each line so redirected streams (tests, notebooks) get them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
            print(self.format(record), file=stream, flush=True)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def _setup_output(quiet: bool) -> Callable[[], None]:
    """Library messages go through the ``kappatune`` logger; the CLI shows INFO and up (``-q``: warnings only) and,
    with ``-q``, silences every progress bar, including those of transformers, datasets and huggingface_hub.
    Returns a function that undoes all of it (``main`` may be called repeatedly in one process)."""
    log = logging.getLogger("kappatune")
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    before = (log.level, log.propagate)
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    undo: list[Callable[[], None]] = []
    if quiet:
        try:
            from transformers.utils import logging as hf_logging

            if hf_logging.is_progress_bar_enabled():
                hf_logging.disable_progress_bar()
                undo.append(hf_logging.enable_progress_bar)
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            undo.append(lambda: hf_logging.set_verbosity(verbosity))
        except ImportError:  # pragma: no cover
            pass
        for mod in ("datasets.utils.logging", "huggingface_hub.utils"):
            try:
                m = importlib.import_module(mod)
            except ImportError:  # pragma: no cover
                continue
            disable = getattr(m, "disable_progress_bars", None) or getattr(m, "disable_progress_bar", None)
            enable = getattr(m, "enable_progress_bars", None) or getattr(m, "enable_progress_bar", None)
            enabled = getattr(m, "are_progress_bars_disabled", lambda: False)() is False
            if disable and enable and enabled:
                disable()
                undo.append(enable)

    def restore() -> None:
        for fn in reversed(undo):
            fn()
        log.removeHandler(handler)
        log.setLevel(before[0])
        log.propagate = before[1]

    return restore


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
