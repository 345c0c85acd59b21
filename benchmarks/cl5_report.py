"""Print the numbers the README quotes for a ``kappatune run configs/cl5.yaml`` result, from its results.json alone.

The accuracy matrix (test accuracy in %, rows: base and after each stage), ACC / BWT / FWT / average forgetting in
points, each task's final accuracy with its exact binomial 95% interval (``kappatune.stats.binomial_interval``, n =
the evaluated test examples), and the control suite (base -> final, change; intervals for accuracy probes).

Usage: ``PYTHONPATH=src python benchmarks/cl5_report.py [benchmarks/results/cl5/results.json]``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kappatune.stats import binomial_interval


def _interval(acc: float, n: int) -> str:
    k = round(acc * n)
    lo, hi = binomial_interval(k, n)
    return f"{100 * acc:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}] (n={n})"


def report(path: Path) -> str:
    r = json.loads(path.read_text())
    m, mx = r["metrics"], r["matrix"]
    tasks = mx["tasks"]
    n = {t: r["corpora"][t]["eval_examples"] for t in r["corpora"] if "eval_examples" in r["corpora"][t]}
    out = [f"{path}: {r['name']}, method {r['method']['label']}, status {r['status']}, "
           f"{r['steps_per_stage']} steps per stage, seed {r['seed']}"]
    out.append("| accuracy % after | " + " | ".join(tasks) + " |")
    out.append("|---|" + "---:|" * len(tasks))
    for row, vals in zip(mx["rows"], mx["accuracy"]):
        out.append(f"| {row} | " + " | ".join(f"{100 * v:.0f}" for v in vals) + " |")
    out.append(f"ACC {m['acc']:.1f} pts (base {m['base_acc']:.1f}); BWT {m['bwt_acc']:+.1f}; FWT {m['fwt_acc']:+.1f}; "
               f"average forgetting {m['avg_forgetting_acc']:.1f} pts")
    for t, base, final in zip(tasks, mx["accuracy"][0], mx["accuracy"][-1]):
        out.append(f"  {t}: base {_interval(base, n[t])} -> final {_interval(final, n[t])}")
    out.append("control suite (base -> final, change):")
    for probe, metrics in m["control_suite"].items():
        for metric, v in metrics.items():
            line = f"  {probe} {metric}: {v['base']:.4g} -> {v['final']:.4g} ({v['change']:+.2f} {v['unit']})"
            if metric.startswith("accuracy") and probe in n:
                line += f"; base {_interval(v['base'], n[probe])}, final {_interval(v['final'], n[probe])}"
            out.append(line)
    stages = r["stages"]
    train_s = sum(s.get("train_time_s") or 0 for s in stages)
    wall = r["setup_time_s"] + r["base"]["eval_time_s"] + sum(s.get("wall_time_s") or 0 for s in stages)
    out.append(f"training {train_s:.0f} s over {len(stages)} stages; base evaluation {r['base']['eval_time_s']:.0f} s; "
               f"setup {r['setup_time_s']:.0f} s; recorded wall in all {wall / 60:.1f} min")
    return "\n".join(out)


if __name__ == "__main__":
    print(report(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/cl5/results.json")))
