"""Recompute the forgetting study's claims from its committed cells, with paired and Welch tests.

    python benchmarks/study_stats.py [benchmarks/results/study/cells]

Reads only the committed per-cell results (no training, no model). Prints, for every metric the README reads,
mean ± std per method and the paired per-seed differences (95% t-interval, p) of KappaTune against each other
method, plus Welch's unpaired p. Seeds share batches, so the paired test is the primary one. The README's
Results text is checked against this output (benchmarks/results/study/stats.txt).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kappatune.harness import equal_quality
from kappatune.stats import paired_difference, summarize, welch_test

ROOT = Path(__file__).resolve().parent / "results" / "study" / "cells"
FOCUS = "kappatune"


def load_cells(root: Path) -> dict[str, dict[int, dict]]:
    cells: dict[str, dict[int, dict]] = {}
    for path in sorted(root.glob("*/seed-*.json")):
        res = json.loads(path.read_text())
        cells.setdefault(path.parent.name, {})[int(res["seed"])] = res
    if not cells:
        sys.exit(f"no cells under {root}")
    return cells


def metric_table(cells, name: str, get) -> None:
    print(f"\n## {name}")
    ref = {s: get(r) for s, r in cells[FOCUS].items()}
    print(f"{'method':<18} {'mean':>9} {'std':>7}   {FOCUS} − method: mean [95% CI]  paired p  Welch p")
    for label, by_seed in cells.items():
        vals = {s: get(r) for s, r in by_seed.items()}
        s = summarize(list(vals.values()))
        line = f"{label:<18} {s['mean']:9.3f} {s['std']:7.3f}"
        if label != FOCUS:
            d = paired_difference(ref, vals)
            w = welch_test(list(ref.values()), list(vals.values()))
            ci = "[%+.3f, %+.3f]" % tuple(d["ci"]) if d["ci"] else "n/a"
            p = f"{d['p']:.3f}" if d["p"] is not None else "n/a"
            wp = f"{w['p']:.3f}" if w["p"] is not None else "n/a"
            line += f"   {d['mean']:+8.3f} {ci:<20} {p:>7}  {wp:>7}" + ("  *" if d["significant"] else "")
        print(line)


def equal_quality_table(cells, step: int | None) -> None:
    eq = equal_quality(cells, "full", stage=1, step=step)
    where = f"full FT's step {step}" if step else "the end of full FT's stage 1"
    print(f"\n## equal task quality: target = python-docs ppl at {where} (mean {eq['mean_target_task_ppl']:.2f})")
    per_seed = {}
    for row in eq["methods"]:
        # re-derive per-seed values so the pairs line up by seed
        per_seed[row["label"]] = row
    focus = _per_seed_at_target(cells, FOCUS, eq)
    print(f"{'method':<18} reached  steps(mean±std)   ctrlΔ%(mean±std)   {FOCUS}−method ctrlΔ% [95% CI] paired p  Welch p")
    for label in cells:
        row = per_seed[label]
        st, ch = row["steps_to_target"], row["control_change_pct_at_target"]
        line = f"{label:<18} {row['reached']}/{len(cells[label])}    "
        line += (f"{st['mean']:5.1f} ± {st['std']:4.1f}     {ch['mean']:+6.2f} ± {ch['std']:4.2f}" if st["n"] else
                 f"{'-':>16}  {'-':>16}")
        if label != FOCUS:
            other = _per_seed_at_target(cells, label, eq)
            d = paired_difference(focus["change"], other["change"])
            w = welch_test(list(focus["change"].values()), list(other["change"].values()))
            if d["ci"]:
                line += f"   {d['mean']:+6.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]  {d['p']:.3f}  {w['p']:.3f}"
                ds = paired_difference(focus["steps"], other["steps"])
                line += f"   steps Δ {ds['mean']:+.2f} p={ds['p']:.3f}" if ds["p"] is not None else ""
        print(line)


def _per_seed_at_target(cells, label: str, eq) -> dict[str, dict[int, float]]:
    from kappatune.harness import _reach, _stage_curve  # the same interpolation the bench report uses

    out = {"change": {}, "steps": {}}
    for seed, res in cells[label].items():
        cur = _stage_curve(res, 1)
        hit = _reach(cur[1], eq["target_task_ppl"].get(seed, eq["mean_target_task_ppl"])) if cur else None
        if hit:
            out["change"][seed] = (hit["control_ppl"] / res["base"]["control_ppl"] - 1) * 100
            out["steps"][seed] = hit["step"]
    return out


EXTRA_PAIRS = (("kappa-lora", "lora"), ("kappa-lora", "random-lora"), ("eigentune", "lora"))


def extra_pairs(cells) -> None:
    """Paired differences the README reads that do not involve KappaTune."""
    metrics = {
        "control change % final": lambda r: r["metrics"]["control_change_pct"],
        "BWT (ppl)": lambda r: r["metrics"]["bwt_ppl"],
        "wordnet ppl final": lambda r: r["metrics"]["final_task_ppl"]["wordnet"],
    }
    print("\n## other paired differences (a − b)")
    for a, b in EXTRA_PAIRS:
        for name, get in metrics.items():
            d = paired_difference({s: get(r) for s, r in cells[a].items()}, {s: get(r) for s, r in cells[b].items()})
            print(f"{a} − {b:<12} {name:<24} {d['mean']:+7.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]  p={d['p']:.3f}"
                  + ("  *" if d["significant"] else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cells", nargs="?", default=str(ROOT))
    cells = load_cells(Path(ap.parse_args().cells))
    tasks = next(iter(cells[FOCUS].values()))["tasks"]
    metric_table(cells, f"{tasks[0]} ppl after stage 1", lambda r: r["matrix"]["task_ppl"][1][0])
    for t in tasks:
        metric_table(cells, f"{t} ppl final", lambda r, t=t: r["metrics"]["final_task_ppl"][t])
    metric_table(cells, "BWT (ppl)", lambda r: r["metrics"]["bwt_ppl"])
    metric_table(cells, "control change % after stage 1",
                 lambda r: (r["matrix"]["control_ppl"][1] / r["matrix"]["control_ppl"][0] - 1) * 100)
    metric_table(cells, "control change % final", lambda r: r["metrics"]["control_change_pct"])
    metric_table(cells, "s/step", lambda r: r["metrics"]["sec_per_step"])
    metric_table(cells, "peak RSS (MiB)", lambda r: r["metrics"]["peak_rss_mb"])
    metric_table(cells, "cell time: wall + setup (min)", lambda r: (r["metrics"]["wall_time_s"] + r["setup_time_s"]) / 60)
    extra_pairs(cells)
    for step in (10, 5, None):
        equal_quality_table(cells, step)


if __name__ == "__main__":
    main()
