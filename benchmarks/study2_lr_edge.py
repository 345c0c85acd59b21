"""Exploratory follow-up to study2's learning-rate search: extend the grid past its top edge for the rows whose
chosen rate was the grid's largest (3x), to see whether those rows were under-tuned.

Why: the pre-registered grid (0.3x, 1x, 3x each method's base lr) chose 3x for KappaTune, type-matched random,
Spectrum per type and Spectrum global. A maximum at the edge of a grid does not say where the best rate lies, so
the study's gap between those rows and full FT could be partly a tuning gap. This script runs the *same* trial at
a larger rate: it takes the committed 3x trial's recorded config (benchmarks/results/study2/cells/lr_search/),
changes only the method's lr, and scores the stage on the same validation split (no test example is read). The
study's cells and chosen rates are not touched: the grid was fixed before the run and stays the protocol. This is
labelled exploratory wherever it is reported, because it was decided after the results were seen.

    python benchmarks/study2_lr_edge.py                 # 10x for the four grid-top rows (about 14 CPU-min each)
    python benchmarks/study2_lr_edge.py --rows kappatune@3.54M --factor 10
    python benchmarks/study2_lr_edge.py --report        # the table from the committed results alone

Each finished trial is written atomically to benchmarks/results/study2/lr_edge/<row>/lr-<lr>.json (a re-run
skips it; a killed trial resumes from runs/study2_lr_edge/), and the table to lr_edge/README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from kappatune.config import config_from_dict, config_fingerprint, load_config  # noqa: E402
from kappatune.storage import atomic_write_json, atomic_write_text  # noqa: E402

CELLS = ROOT / "benchmarks/results/study2/cells"
OUT = ROOT / "benchmarks/results/study2/lr_edge"
GRID_TOP_ROWS = ["kappatune@3.54M", "spectrum-type@3.54M", "random-type@3.54M", "spectrum@3.54M"]
DEFAULT_FACTOR = 10.0  # the extension's default rate, a multiple of the method's base lr
GRID = tuple(load_config(ROOT / "configs/study2.yaml").lr_search.factors)  # the pre-registered factors


def _trials(row: str) -> dict[float, dict]:
    """The committed pre-registered trials of ``row`` and this script's extensions, by learning rate."""
    found = {}
    for d, extension in ((CELLS / "lr_search" / row, False), (OUT / row, True)):
        for p in sorted(d.glob("lr-*.json")):
            res = json.loads(p.read_text())
            found[float(res["config"]["method"]["lr"])] = {**res, "_extension": extension}
    return found


def _accuracy(res: dict) -> float:
    task = res["config"]["tasks"][0]["corpus"]
    return res["stages"][-1]["task_metrics"][task]["accuracy"]


def accuracy_by_factor(trials: dict[float, dict]) -> tuple[dict[float, float], float | None, float | None]:
    """Validation accuracy (points) of a row's trials (:func:`_trials`) keyed by their multiple of the method's base
    lr, the factor of the best rate (ties: the smaller rate, as the search chooses) and the base lr."""
    committed = [lr for lr, r in trials.items() if not r["_extension"]]
    if not committed:
        return {}, None, None
    base = max(committed) / max(GRID)
    by_factor = {float(f"{lr / base:.6g}"): 100 * _accuracy(r) for lr, r in sorted(trials.items())}
    return by_factor, max(by_factor, key=lambda f: (by_factor[f], -f)), base


def run_trial(row: str, factor: float) -> dict:
    """The committed top-of-grid trial of ``row`` at ``factor`` x the method's base lr instead (exploratory)."""
    from kappatune.data import get_tokenizer, tokenizer_fingerprint
    from kappatune.harness.bench import _machine
    from kappatune.harness.run import run
    from kappatune.harness.state import _read_state

    trials = _trials(row)
    committed = {lr: r for lr, r in trials.items() if not r["_extension"]}
    if not committed:
        raise SystemExit(f"no committed lr_search trials for {row!r} under {CELLS / 'lr_search'}")
    top_lr = max(committed)
    top = committed[top_lr]
    base_lr = top_lr / max(GRID)
    lr = float(f"{base_lr * factor:.6g}")
    path = OUT / row / f"lr-{lr:g}.json"
    if path.is_file():
        print(f"{row}: lr {lr:g} already committed ({path.relative_to(ROOT)})")
        return json.loads(path.read_text())
    cfg = config_from_dict(top["config"])
    if config_fingerprint(cfg) != top.get("config_fingerprint"):
        raise SystemExit(f"{row}: the committed trial's config no longer gives its fingerprint: this code cannot "
                         "repeat it faithfully")
    tok = tokenizer_fingerprint(get_tokenizer(cfg.model))
    if top.get("tokenizer_fingerprint") not in (None, tok):
        raise SystemExit(f"{row}: this machine tokenizes differently from the committed trial ({tok} vs "
                         f"{top['tokenizer_fingerprint']})")
    out = ROOT / "runs/study2_lr_edge" / row / f"lr-{lr:g}"
    cfg = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, lr=lr), output_dir=str(out),
                              output=dataclasses.replace(cfg.output, cells_dir=None))
    print(f"== {row}: lr {lr:g} ({factor:g}x base {base_lr:g}) -> {out.relative_to(ROOT)}", flush=True)
    c0, w0 = time.process_time(), time.perf_counter()
    resumed = _read_state(out) is not None
    res = run(cfg, resume=resumed, base_eval_cache=ROOT / "runs/study2_lr_edge/base_eval.json")
    res = {**res, "cell": f"lr_edge/{row}/lr-{lr:g}", "exploratory": True, "factor": factor,
           "extends": f"lr_search/{row}/lr-{top_lr:g}", "cell_resumed": resumed,
           "cell_cpu_time_s": None if resumed else time.process_time() - c0,
           "cell_wall_time_s": None if resumed else time.perf_counter() - w0,
           "cell_machine": _machine(), "tokenizer_fingerprint": tok}
    atomic_write_json(path, res)
    print(f"{row}: validation accuracy at lr {lr:g}: {_accuracy(res):.4f}", flush=True)
    return res


def report(rows: list[str]) -> str:
    """Markdown: every row's validation accuracy at each rate, committed grid and extensions side by side."""
    lines = ["# study2: learning-rate grid extended past its top (exploratory)", "",
             "Written by `python benchmarks/study2_lr_edge.py --report` from the committed trials. Validation accuracy "
             "(points) of the first task of order 0 (shakespeare-genre, 201 examples) after 150 steps, seed 0. The "
             "0.3x/1x/3x columns are the pre-registered search (`cells/lr_search/`); the larger rates were run after "
             "the study's results were seen, from the 3x trial's recorded config with only the lr changed. They do "
             "not change the study's chosen rates.", ""]
    trials = {row: _trials(row) for row in ["full", *rows]}
    summary = {row: accuracy_by_factor(t) for row, t in trials.items()}
    factors = sorted(set(GRID).union(*(acc for acc, _, _ in summary.values())))  # the grid and every extension run
    lines += ["| row | " + " | ".join(f"{f:g}x" for f in factors) + " | best | CPU-min (extension) |",
              "|---|" + "---|" * (len(factors) + 2)]
    for row, (acc, best, base) in summary.items():
        if not acc:
            continue
        cells = ["–" if f not in acc else f"**{acc[f]:.1f}**" if f == best else f"{acc[f]:.1f}" for f in factors]
        ext = [r.get("cell_cpu_time_s") for r in trials[row].values() if r["_extension"]]
        cpu = ", ".join(f"{t / 60:.0f}" if t else "untimed" for t in ext) or "–"
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {base * best:.6g} ({best:g}x) | {cpu} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=",".join(GRID_TOP_ROWS), help="comma-separated LR-search rows")
    ap.add_argument("--factor", type=float, default=DEFAULT_FACTOR,
                    help=f"multiple of the method's base lr (default {DEFAULT_FACTOR:g})")
    ap.add_argument("--report", action="store_true", help="only rebuild lr_edge/README.md from committed results")
    a = ap.parse_args()
    rows = [r for r in a.rows.split(",") if r]
    if not a.report:
        for row in rows:
            run_trial(row, a.factor)
    OUT.mkdir(parents=True, exist_ok=True)
    text = report([*GRID_TOP_ROWS, *(r for r in rows if r not in GRID_TOP_ROWS)])  # a one-row run keeps the others
    atomic_write_text(OUT / "README.md", text)
    print(text)


if __name__ == "__main__":
    main()
