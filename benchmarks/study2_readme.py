"""The README's study2 tables, rebuilt from the committed study summary alone (no training, no model).

    python benchmarks/study2_readme.py                 # print the tables
    python benchmarks/study2_readme.py --write README.md   # replace the block between the study2 markers
    python benchmarks/study2_readme.py --check README.md   # exit 1 if the README's block differs

The source is ``benchmarks/results/study2/study.json``, which ``kappatune bench configs/study2.yaml --report``
rebuilds from the committed cells (``scripts/study2.sh --report``); ``tests/test_study.py`` checks both links
(cells -> study.json, study.json -> README block), so every number in the block recomputes from the cells. The
block is a condensed view of ``study.md`` (same numbers, one decimal): the primary metrics, the pre-registered
paired differences with their Holm verdicts, the exploratory contrasts, the equal-quality point, time and memory
per machine and the compute spent. The reading around the block is prose and is checked by hand.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from kappatune import reporting

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = ROOT / "benchmarks" / "results" / "study2" / "study.json"
BEGIN = "<!-- study2-tables:begin (benchmarks/study2_readme.py --write README.md; do not edit by hand) -->"
END = "<!-- study2-tables:end -->"


def _num(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:,.1f}" if abs(x) < 1e5 else f"{x:,.0f}"


def _pm(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    if stat.get("n", 1) <= 1 or stat.get("std") is None:
        return _num(stat["mean"])
    return f"{_num(stat['mean'])} ± {_num(stat['std'])}"


def _diff(d: dict[str, Any] | None) -> str:
    """A paired difference, its 95% interval and its verdict: **bold** = significant after Holm's correction over its
    family, † = the interval excludes 0 but not after the correction (nominal only), otherwise no mark."""
    if not d or d.get("mean") is None:
        return "–"
    if d.get("n", 0) < 2 or not d.get("ci"):
        return f"{_num(d['mean'])} (n={d.get('n', 0)})"
    txt = f"{_num(d['mean'])} [{_num(d['ci'][0])}, {_num(d['ci'][1])}]"
    if d.get("significant_holm"):
        return f"**{txt}**"
    return txt + (" †" if d.get("significant") else "")


def _table(rows: list[list[Any]], header: list[str]) -> list[str]:
    return reporting._md(rows, header).splitlines()  # the report's own markdown table, as lines


def tables(summary: dict[str, Any]) -> str:
    """The markdown block (without its markers)."""
    st = summary["study"]
    prim = st["primary_metrics"]
    names = {"acc": "ACC (pts)", "bwt_acc": "BWT (pts)"}
    label = [names.get(k, "control Δ%" if k.startswith("probe_") else k) for k in prim]
    cells = st["cells"]
    out = [f"Rebuilt from {cells['present']} of {cells['expected']} cells (`benchmarks/results/study2/study.json`). "
           "Mean ± std over the cells (2 orders × 3 seeds); differences are paired per (order, seed), "
           "row − reference at the same budget, with a 95% t interval. **Bold**: significant after Holm's correction "
           f"over the {st['multiplicity']['tests']} pre-registered tests; †: the interval excludes 0 but not after the "
           "correction (nominal only); no mark: the interval includes 0.", ""]
    refs = st["references"]
    method_of = {r["label"]: r["method"] for r in st["rows"]}
    rows = []
    for m in summary["methods"]:
        lab = m["label"]
        row = [lab, len(m["seeds"]), *(_pm(m["metrics"].get(k)) for k in prim)]
        for ref in refs:
            d = st["paired"][ref]["methods"].get(lab)
            row += [_diff(d.get(k)) if d is not None else "(reference)" if method_of.get(lab) == ref else "–"
                    for k in prim]
        rows.append(row)
    header = ["row", "cells", *label, *(f"{x} − {ref}" for ref in refs for x in label)]
    out += ["**Primary metrics (pre-registered).** ACC: mean final accuracy over the 3 tasks; BWT: mean change of "
            "a task's accuracy from right after it was learned to the end; control Δ%: change of the control "
            "suite's perplexity (lower is better: less forgetting of the held-out prose).", ""]
    out += _table(rows, header) + [""]
    control = next((k for k in prim if k.startswith("probe_")), None)
    if control:
        # A few cells blow the control perplexity up by orders of magnitude, and then the mean and its t interval
        # describe that spread rather than a typical cell: the median and range per row say which (exploratory).
        spread = []
        for m in summary["methods"]:
            vals = sorted((m["metrics"].get(control) or {}).get("values") or [])
            if vals:
                spread.append([m["label"], len(vals), _num(statistics.median(vals)), _num(vals[0]), _num(vals[-1])])
        out += ["**Control Δ% per cell (exploratory).** The pre-registered mean above is pulled by single cells "
                "where the control perplexity exploded; the median and the range show a typical cell and the spread.",
                ""]
        out += _table(spread, ["row", "cells", "median control Δ%", "min", "max"]) + [""]
    if st.get("plot"):
        out += [f"![learning vs forgetting](benchmarks/results/study2/{st['plot']['file']})", "",
                "One point per row (mean ± std over its cells); the dashed line joins the rows no other row beats on "
                "both axes. The control axis is on a symmetric log scale when one row's change dwarfs the rest.", ""]
    if st.get("contrasts"):
        cf = st.get("contrast_multiplicity") or {}
        crow = [[lab, pr["baselines"][lab], *(_diff(diffs.get(k)) for k in prim)]
                for pr in st["contrasts"].values() for lab, diffs in pr["methods"].items()]
        out += [f"**Contrasts (exploratory: added at 77 of 90 cells, not pre-registered).** Holm's correction over "
                f"these {cf.get('tests', 0)} tests alone; marks as above.", ""]
        out += _table(crow, ["row", "paired with", *(f"{x} difference" for x in label)]) + [""]
    t = st.get("target")
    if t:
        degenerate = len(t.get("target_at_base") or [])
        trow, head = [], ["row", "reached", "steps to target", "control Δ% at target"]
        for m in t["methods"]:
            trow.append([m["label"], f"{m['reached']}/{m['reached'] + len(m.get('not_reached') or [])}",
                         _pm(m.get("steps_to_target")), _pm(m.get("control_change_pct_at_target"))])
            if degenerate:
                inf = m.get("informative") or {}
                trow[-1] += [f"{inf.get('reached', 0)}/{inf.get('reached', 0) + len(inf.get('not_reached') or [])}",
                             _pm(inf.get("steps_to_target")), _pm(inf.get("control_change_pct_at_target"))]
        if degenerate:
            head += ["informative cells: reached", "steps", "control Δ%"]
        out += [f"**Equal-quality point (pre-registered).** Where each run's stage-1 curve first reaches the test "
                f"accuracy full FT has after {t['step']} steps (mean target {t['mean_target_task_ppl']:.3f}). In "
                f"{degenerate} of the reference's cells the target is no better than the untrained model's accuracy, "
                "so those cells compare nothing (every run reaches it at step 0); the last three columns repeat the "
                "point over the other cells alone (exploratory).", ""]
        out += _table(trow, head) + [""]
    for block in st.get("accuracy_matrix") or []:
        if not block["rows"]:
            continue
        order = block["order"]
        base = {t: next(iter(block["rows"].values()))["tasks"][t]["base"] for t in order}
        arow = [[lab, r["cells"], *(f"{_num(r['tasks'][t]['learned'].get('mean'))} → {_num(r['tasks'][t]['final'].get('mean'))}"
                                    for t in order)] for lab, r in block["rows"].items()]
        out += [f"<details><summary>Accuracy matrix, order {' → '.join(order)} (exploratory summary)</summary>", "",
                "Test accuracy (points, mean over the cells) of each task right after it was learned → at the end of "
                "the sequence. The untrained model: " + ", ".join(f"{t} {_num(base[t].get('mean'))}" for t in order)
                + ". `study.md` has the stds and the base row.", ""]
        out += _table(arow, ["row", "cells", *order]) + ["", "</details>", ""]
    machines = st.get("cost_by_machine") or {}
    if machines:
        mrow = []
        for m in summary["methods"]:
            lab, row = m["label"], [m["label"]]
            for c in machines.values():
                r = c["rows"].get(lab) or {}
                mem = r.get("peak_gpu_mb") if (r.get("peak_gpu_mb") or {}).get("mean") else r.get("peak_rss_mb")
                row += [r.get("cells", 0), _pm(r.get("sec_per_step")), _pm(mem)]
            mrow.append(row)
        head = ["row"]
        for mc in machines:
            short = mc.replace("NVIDIA ", "").replace(" 80GB HBM3", "")
            mem = "peak GPU MiB" if "CPU" not in mc else "peak RSS MiB"
            head += [f"{short}: cells", "s / step", mem]
        out += ["<details><summary>Time and memory per machine class (exploratory)</summary>", "",
                "Seconds per training step and peak memory (GPU memory on a GPU, resident memory on the CPU), mean ± "
                "std over the cells that machine ran; compare rows within a machine only.", ""]
        out += _table(mrow, head) + ["", "</details>", ""]
    comp = st.get("compute_by_machine") or {}
    if comp:
        crow = [[mc, c["cells"], c["cells_timed"], _num(c["cells_cpu_s"] / 3600.0), c["trials"],
                 _num(c["trials_cpu_s"] / 3600.0)] for mc, c in comp.items()]
        total = sum(c["cells_cpu_s"] + c["trials_cpu_s"] for c in comp.values()) / 3600.0
        out += [f"**Compute.** {_num(total)} CPU-hours recorded in all (a GPU cell counts its host CPU time; a "
                "resumed cell is untimed, its killed part unknown).", ""]
        out += _table(crow, ["machine", "cells", "timed", "cell CPU-h", "LR trials", "trial CPU-h"])
    return "\n".join(out).rstrip() + "\n"


def replace_block(readme: str, block: str) -> str:
    """``readme`` with the text between the markers replaced by ``block`` (both markers must be present once)."""
    if readme.count(BEGIN) != 1 or readme.count(END) != 1 or readme.index(BEGIN) > readme.index(END):
        raise SystemExit(f"the README needs the two markers once each, in order:\n{BEGIN}\n{END}")
    head, rest = readme.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{block}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summary", type=Path, default=SUMMARY, help="a study.json (default: study2's committed one)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--write", type=Path, metavar="README", help="replace the block between the markers")
    g.add_argument("--check", type=Path, metavar="README", help="exit 1 if the block differs")
    a = ap.parse_args(argv)
    try:
        summary = json.loads(a.summary.read_text("utf-8"))
    except (OSError, ValueError) as e:
        print(f"study2_readme: cannot read {a.summary}: {e}", file=sys.stderr)
        return 2
    block = tables(summary)
    if a.write:
        a.write.write_text(replace_block(a.write.read_text("utf-8"), block), "utf-8")
        print(f"wrote the study2 tables into {a.write}")
    elif a.check:
        text = a.check.read_text("utf-8")
        if replace_block(text, block) != text:
            print(f"{a.check}: the study2 tables differ from {a.summary}: run benchmarks/study2_readme.py --write "
                  f"{a.check}", file=sys.stderr)
            return 1
        print(f"{a.check}: the study2 tables match {a.summary}")
    else:
        print(block, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
