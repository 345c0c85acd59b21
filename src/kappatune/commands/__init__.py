"""CLI sub-commands, one module per area; each module has ``register(subparsers)`` and sets ``handler``."""

from __future__ import annotations

import argparse
import json
from typing import Any

STDOUT = "-"


def add_json_arg(p: argparse.ArgumentParser, what: str) -> None:
    """The one meaning of ``--json`` on every command: ``--json`` prints ``what`` as JSON on stdout (and nothing
    else there), ``--json PATH`` writes it to PATH (atomically) besides the usual output."""
    p.add_argument("--json", nargs="?", const=STDOUT, default=None, metavar="PATH",
                   help=f"{what} as JSON: on stdout (no table) with --json alone, or written to PATH")


def emit_json(args: argparse.Namespace, obj: Any) -> None:
    """Honour ``--json``: print ``obj`` to stdout, or write it to the given path and say so."""
    if args.json is None:
        return
    if args.json == STDOUT:
        from ..storage import _json_default

        print(json.dumps(obj, indent=2, default=_json_default))
        return
    from ..storage import atomic_write_json

    atomic_write_json(args.json, obj)
    print(f"wrote {args.json}")


def json_only(args: argparse.Namespace) -> bool:
    """True when ``--json`` alone asked for JSON on stdout (the table is then not printed)."""
    return getattr(args, "json", None) == STDOUT
