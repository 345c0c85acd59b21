"""``kappatune run CONFIG.yaml`` (one continual-learning run) and ``kappatune bench CONFIG.yaml`` (methods × seeds)."""

from __future__ import annotations

import argparse
import os
import sys


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG.yaml", help="YAML config (see docs/harness.md and configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override config keys, e.g. training.steps=5 seed=1 'tasks=[shakespeare]'")
    p.add_argument("--force", action="store_true",
                   help="run: start over in a directory holding a run (with --resume: resume although the config changed); "
                        "bench: resume cells whose config changed")
    p.add_argument("-o", "--output-dir", metavar="DIR", help="output directory (overrides output_dir)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-stage lines")
    p.add_argument("--check", action="store_true", help="only validate config, model, corpora, methods and budgets; train nothing")


def duration(text: str) -> float:
    """``--stop-after`` values: seconds (``600``, ``600s``), minutes (``45m``), hours (``2h``, ``1h30m``)."""
    import re

    t = text.strip().lower()
    m = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", t)
    if not t or m is None or not any(m.groups()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (examples: 600, 600s, 45m, 2h, 1h30m)")
    h, mi, se = (float(g) if g else 0.0 for g in m.groups())
    seconds = h * 3600 + mi * 60 + se
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the duration must be positive")
    return seconds


def _overrides(args: argparse.Namespace) -> list[str]:
    ov = list(args.overrides)
    if args.output_dir:
        ov.append(f"output_dir={args.output_dir}")
    return ov


def cmd_run(args: argparse.Namespace) -> int:
    from .. import harness, reporting

    if args.check:
        counts = harness.validate(args.config, overrides=_overrides(args), progress=not args.quiet, command="run",
                                  resume=args.resume, force=args.force)
        print("config OK; trainable parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
        return 0
    results = harness.run(args.config, resume=args.resume, force=args.force, progress=False if args.quiet else None,
                          overrides=_overrides(args))
    if os.environ.get("RANK", "0") != "0":  # under accelerate launch / torchrun only the main process reports
        return 0
    print()
    print(reporting.forgetting_table(results))
    print()
    print(reporting.metrics_table(results))
    out = results.get("config", {}).get("output_dir") or ""
    print(f"\nwrote {out or 'the output directory'}: results.json, results.md" + (", plots/" if results.get("plots") else ""))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .. import harness

    only = [x.strip() for x in args.only.split(",") if x.strip()] if args.only else None
    if args.check:
        counts = harness.validate(args.config, overrides=_overrides(args), progress=not args.quiet, command="bench", only=only)
        print("config OK; trainable parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
        return 0
    if args.rerun:
        if not args.output_dir:
            print("kappatune bench --rerun: name a directory for the re-run with -o DIR (the committed cells are "
                  "never written)", file=sys.stderr)
            return 2
        summary = harness.rerun_cell(args.config, args.rerun, args.output_dir, overrides=list(args.overrides),
                                     progress=False if args.quiet else None, force=args.force)
        print(summary["markdown"])
        print(f"wrote {summary['output_dir']}/rerun.json, rerun.md")
        return 0
    if args.report:
        from .. import reporting

        summary = harness.bench_report(args.config, overrides=_overrides(args))
        print(reporting.study_markdown(summary) if "study" in summary else reporting.bench_table(summary))
        return 0
    summary = harness.bench(args.config, force=args.force, progress=False if args.quiet else None, overrides=_overrides(args),
                            only=only, commit=args.commit, stop_after=args.stop_after)
    if args.quiet:
        from .. import reporting

        print(reporting.bench_table(summary))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="continual-learning run: train task after task, measure learning and forgetting",
        description="Train the config's method on each task in sequence; after the base model and every stage, "
                    "evaluate perplexity on every task and the control corpus. Writes results.json, results.md, plots "
                    "and the final adapter to the output directory and prints the forgetting table.",
    )
    _add_common(p)
    p.add_argument("--resume", action="store_true", help="continue the run in the output directory after its last finished stage")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser(
        "bench", help="compare methods x seeds at a matched budget (mean ± std, Pareto plot)",
        description="Run every method in 'methods' for every seed in 'seeds' (same tasks, steps, data order per "
                    "seed and, with 'budget', the same trainable-parameter count). Finished cells are not re-run; "
                    "unfinished ones resume. Writes bench.json, bench.md and pareto.png.",
    )
    _add_common(p)
    p.add_argument("--only", metavar="LABEL[,LABEL]",
                   help="run only these methods (by label), e.g. to re-run one method of a study: "
                        "--only kappatune seeds=[1] -o runs/check")
    p.add_argument("--commit", action="store_true",
                   help="study: git-commit each cell's results in output.cells_dir as soon as it finishes")
    p.add_argument("--report", action="store_true",
                   help="study: rebuild the tables (study.md, study.json) from the committed cells in output.cells_dir "
                        "alone; trains nothing")
    p.add_argument("--stop-after", metavar="DURATION", type=duration,
                   help="study: start no new cell after DURATION (600, 45m, 2h, 1h30m); the cells in progress "
                        "finish and are committed, then the report is written (ending the process instead loses them)")
    p.add_argument("--rerun", metavar="CELL",
                   help="study: re-run one committed cell (e.g. kappatune@7.08M/order-0/seed-0) from its recorded "
                        "config in -o DIR and compare it with the committed result, metric by metric")
    p.set_defaults(handler=cmd_bench)
