"""Tables (Markdown) and plots (PNG, matplotlib Agg backend) of run and benchmark results.

Every function takes the plain dicts the harness writes to ``results.json`` / ``bench.json``, so reports can be
regenerated from the files alone (``kappatune.reporting.write_run_report(json.load(...), out_dir)``).
PNG files go through :func:`kappatune.storage.atomic_write_bytes` like every other result.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Sequence

from .storage import atomic_write_bytes, atomic_write_text

__all__ = [
    "fmt",
    "forgetting_table",
    "metrics_table",
    "stage_table",
    "run_markdown",
    "bench_table",
    "bench_markdown",
    "plot_forgetting_heatmap",
    "plot_control_vs_task",
    "plot_spectrum",
    "plot_pareto",
    "METRIC_LABELS",
    "metric_label",
]

# metric key -> (label, better direction) ; "lower"/"higher"/"" (informational)
METRIC_LABELS: dict[str, tuple[str, str]] = {
    "acc": ("ACC (accuracy, pts)", "higher"),
    "bwt_acc": ("BWT (accuracy, pts)", "higher"),
    "fwt_acc": ("FWT (accuracy, pts)", "higher"),
    "avg_forgetting_acc": ("avg forgetting (accuracy, pts)", "lower"),
    "em": ("exact match (pts)", "higher"),
    "bwt_em": ("BWT (exact match, pts)", "higher"),
    "fwt_em": ("FWT (exact match, pts)", "higher"),
    "avg_forgetting_em": ("avg forgetting (exact match, pts)", "lower"),
    "final_avg_task_ppl": ("final avg task ppl", "lower"),
    "task_gain_pct": ("task gain %", "higher"),
    "learning_gain_pct": ("gain right after each stage %", "higher"),
    "bwt_ppl": ("BWT (ppl)", "higher"),
    "avg_forgetting_ppl": ("avg forgetting (ppl)", "lower"),
    "control_ppl_final": ("control ppl", "lower"),
    "control_change_abs": ("control Δppl", "lower"),
    "control_change_pct": ("control Δ%", "lower"),
    "trainable_params": ("trainable params", ""),
    "train_time_s": ("train time s", "lower"),
    "sec_per_step": ("s / step", "lower"),
    "peak_rss_mb": ("peak RSS MiB", "lower"),
    "peak_gpu_mb": ("peak GPU MiB", "lower"),
}


def metric_label(key: str) -> tuple[str, str]:
    """(label, better direction) of a metric key: the fixed metrics' from :data:`METRIC_LABELS`, and a readable one
    for each control probe's change (``probe_<probe>_<metric>_change``: % for perplexity, points for the rest)."""
    if key in METRIC_LABELS:
        return METRIC_LABELS[key]
    if key.startswith("probe_") and key.endswith("_change"):
        inner = key[len("probe_"):-len("_change")]
        probe, metric = (inner[:-4], "ppl") if inner.endswith("_ppl") else inner.rpartition("_")[::2]
        suite = "control suite" + ("" if probe in ("", "control") else f" {probe}")
        if metric == "ppl":
            return f"{suite}: ppl Δ%", "lower"
        return f"{suite}: {metric} Δ (pts)", "higher"
    return key, ""


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def fmt(x: Any, digits: int = 3) -> str:
    """Compact number formatting for tables (ints with separators, floats with ``digits`` significant decimals)."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) >= 100:
            return f"{x:.1f}"
        if abs(x) >= 1 or x == 0:
            return f"{x:.2f}"
        if abs(x) >= 0.01:
            return f"{x:.3f}"
        return f"{x:.{digits}g}"
    return str(x)


def _md(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- run tables
def forgetting_table(results: dict[str, Any]) -> str:
    """The forgetting matrix R[stage][task] (perplexity, lower is better) plus the control column."""
    tasks = results["tasks"]
    rows = []
    has_control = results.get("control") is not None
    for label, row, ctrl in zip(results["matrix"]["rows"], results["matrix"]["task_ppl"], results["matrix"]["control_ppl"]):
        rows.append([label, *(fmt(v) for v in row)] + ([fmt(ctrl)] if has_control else []))
    return _md(rows, ["perplexity after", *tasks] + ([f"control ({results['control']})"] if has_control else []))


def metrics_table(results: dict[str, Any]) -> str:
    m = results.get("metrics") or {}
    rows = []
    for key, (label, better) in METRIC_LABELS.items():
        if m.get(key) is not None:
            rows.append([label, fmt(m[key]), better and f"{better} is better"])
    for task, f in (m.get("forgetting_per_task") or {}).items():
        rows.append([f"forgetting {task} (ppl)", fmt(f), "lower is better"])
    for short, name in (("acc", "accuracy"), ("em", "exact match")):
        for task, f in (m.get(f"forgetting_{short}_per_task") or {}).items():
            rows.append([f"forgetting {task} ({name}, pts)", fmt(f), "lower is better"])
    for probe, vals in (m.get("control_suite") or {}).items():
        for metric, v in vals.items():
            unit = "%" if v.get("unit") == "%" else " pts"
            rows.append([f"control {probe} {metric}: {fmt(v['base'])} -> {fmt(v['final'])}", f"{v['change']:+.2f}{unit}",
                         "change from base"])
    return _md(rows, ["metric", "value", ""])


SCORE_NAMES = {"accuracy": "accuracy", "accuracy_norm": "length-normalised accuracy", "exact_match": "exact match"}


def score_table(results: dict[str, Any], metric: str) -> str:
    """The forgetting matrix of an accuracy-like metric (in %, higher is better; – where a task lacks it)."""
    rows = []
    for label, row in zip(results["matrix"]["rows"], results["matrix"][metric]):
        rows.append([label, *("–" if v is None else f"{100 * v:.1f}" for v in row)])
    return _md(rows, [f"{SCORE_NAMES.get(metric, metric)} % after", *results["tasks"]])


def stage_table(results: dict[str, Any]) -> str:
    rows = []
    for s in results.get("stages", []):
        losses = s.get("losses") or []
        rows.append([
            s["stage"], s["task"], s["steps"], fmt(s["tokens"]), fmt(losses[0] if losses else None),
            fmt(losses[-1] if losses else None), fmt(s.get("train_time_s")), fmt(s.get("tokens_per_s")),
            fmt(s.get("wall_time_s")), fmt(s.get("peak_rss_mb")), fmt(s.get("peak_gpu_mb")),
        ])
    return _md(rows, ["stage", "task", "steps", "tokens", "first loss", "last loss", "train s", "tok/s", "wall s",
                      "peak RSS MiB", "peak GPU MiB"])


def run_markdown(results: dict[str, Any]) -> str:
    """The whole ``results.md`` of a run."""
    cfg = results.get("config", {})
    method = results.get("method", {})
    lines = [
        f"# kappatune run: {results.get('name', '')}",
        "",
        f"- model: `{cfg.get('model')}`; method: `{method.get('label')}` (`{method.get('name')}`, options "
        f"`{method.get('options')}`)",
        f"- trainable parameters: {fmt(results.get('trainable_params'))} of {fmt(results.get('total_params'))}"
        + (f"; budget {fmt(results['budget_report'].get('param_budget'))} matched with "
           f"{results['budget_report'].get('knob')}={results['budget_report'].get('value')}"
           if results.get("budget_report") else ""),
        f"- seed {cfg.get('seed')}; {results.get('steps_per_stage')} steps per stage at batch "
        f"{cfg.get('training', {}).get('batch_size')} × {cfg.get('training', {}).get('seq_len')} tokens; "
        f"status: {results.get('status')}",
        "",
        "## Forgetting matrix (perplexity on each eval split; rows: after which stage)",
        "",
        forgetting_table(results),
        "",
    ]
    for metric in SCORE_NAMES:
        if metric in results["matrix"]:
            lines += [f"## Forgetting matrix ({SCORE_NAMES[metric]}, % of the test examples)", "", score_table(results, metric), ""]
    lines += [
        "## Metrics",
        "",
        metrics_table(results),
        "",
        "BWT = mean over earlier tasks of (ppl right after learning it − final ppl): negative means forgetting. "
        "Forgetting of a task = final ppl − best ppl it had after being learned (positive = forgot). "
        "Task gain % = mean relative ppl drop from the base model, control Δ% = relative control ppl change. "
        "Accuracy metrics (points): ACC = mean final accuracy, BWT = mean of (final − right after learning), "
        "FWT = mean of (before learning − base), forgetting = best accuracy at an earlier stage − final "
        "(docs/harness.md).",
        "",
        "## Stages",
        "",
        stage_table(results),
        "",
    ]
    plots = results.get("plots") or []
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- bench tables
def _pm_points(stat: dict[str, Any] | None) -> str:
    """Accuracy points to one decimal: ``52.2 ± 3.1`` (``52.2`` for one value, ``–`` for none)."""
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{stat['mean']:.1f}" if stat.get("n", 1) <= 1 or stat.get("std") is None else f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def _pm(stat: dict[str, Any] | None) -> str:
    if not stat:
        return "–"
    mean, std, n = stat.get("mean"), stat.get("std"), stat.get("n", 1)
    if mean is None:
        return "–"
    return fmt(mean) if n <= 1 or std is None else f"{fmt(mean)} ± {fmt(std)}"


def bench_table(bench: dict[str, Any], keys: Sequence[str] | None = None) -> str:
    """Mean ± std over seeds per method and metric."""
    keys = list(keys or [k for k in METRIC_LABELS
                         if any((m["metrics"].get(k) or {}).get("mean") is not None for m in bench["methods"])])
    rows = []
    for m in bench["methods"]:
        rows.append([m["label"], len(m.get("seeds", [])), *(_pm(m["metrics"].get(k)) for k in keys)])
    return _md(rows, ["method", "seeds", *(METRIC_LABELS[k][0] for k in keys)])


def bench_markdown(bench: dict[str, Any]) -> str:
    lines = [
        f"# kappatune bench: {bench.get('name', '')}",
        "",
        f"- model `{bench.get('model')}`, tasks {', '.join(bench.get('tasks', []))} (control {bench.get('control')}), "
        f"{bench.get('steps_per_stage')} steps per stage, seeds {bench.get('seeds')}, "
        f"trainable-parameter budget {fmt(bench.get('budget'))}",
        "",
        "## Mean ± std over seeds",
        "",
        bench_table(bench),
        "",
    ]
    task_rows = []
    for m in bench["methods"]:
        for t, stat in (m.get("final_task_ppl") or {}).items():
            task_rows.append([m["label"], t, _pm(stat)])
    if task_rows:
        lines += ["## Final perplexity per task", "", _md(task_rows, ["method", "task", "final ppl"]), ""]
    pr = bench.get("paired")
    if pr:
        rows = []
        for label, diffs in pr["methods"].items():
            for k, d in diffs.items():
                if d.get("mean") is None or k not in METRIC_LABELS and not k.startswith("probe_"):
                    continue
                ci = d.get("ci")
                rows.append([label, metric_label(k)[0], fmt(d["mean"]),
                             f"[{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "–", d["n"], "yes" if d.get("significant") else "no"])
        lines += [f"## Paired per-seed differences against {pr['baseline']} (method − {pr['baseline']}, 95% t interval)", "",
                  _md(rows, ["method", "metric", "mean difference", "95% interval", "seeds", "interval excludes 0"]), ""]
    eq = bench.get("equal_quality")
    if eq:
        lines += [equal_quality_markdown(eq), ""]
    if bench.get("plots"):
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in bench["plots"]] + [""]
    return "\n".join(lines)


def _diff_cell(d: dict[str, Any]) -> str:
    """A paired difference as 'mean [lo, hi] p=…' with its verdict."""
    if d.get("mean") is None:
        return "–"
    ci = d.get("ci")
    p = d.get("p")
    txt = fmt(d["mean"]) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")
    txt += f" p={p:.3f}" if p is not None else ""
    if d.get("n", 0) < 2:  # one pair: no interval, nothing to test (the rule paired_difference and Holm use)
        return txt + f" (n={d.get('n', 0)}, no test)"
    if "p_holm" in d:  # a primary test: bold only what holds for the whole family (Holm)
        txt += f", Holm p={d['p_holm']:.3f}"
        if d.get("significant_holm"):
            return txt + " **significant**"
        return txt + (" nominal only" if d.get("significant") else " n.s.")
    return txt + (" **significant**" if d.get("significant") else " n.s.")


def study_markdown(bench: dict[str, Any]) -> str:
    """A study's report (README Results source): protocol, validation LR search, the pre-registered comparisons
    (primary metrics with paired 95% intervals against each reference, the pre-registered equal-quality point),
    then everything else labelled exploratory, the cells present and the CPU time. Built only from committed
    cells, so ``bench --report`` rebuilds it byte for byte."""
    st = bench["study"]
    cfg = bench.get("config", {})
    cells = st["cells"]
    lines = [f"# Study: {bench.get('name', '')}", "", "## Protocol", "",
             f"- model `{bench.get('model')}`; {bench.get('steps_per_stage')} steps per task; seeds {bench.get('seeds')}; "
             f"control suite {bench.get('control')}",
             "- task orders: " + "; ".join(" → ".join(o) for o in st["orders"]),
             "- rows (method @ trainable-parameter budget): " + ", ".join(r["label"] for r in st["rows"]),
             f"- protocol fingerprint `{(st.get('protocol') or {}).get('fingerprint')}` (pre-registered block and LR "
             "search, fixed before the first cell)",
             f"- cells: {cells['present']} of {cells['expected']} committed"
             + (f"; missing: {', '.join(cells['missing'][:8])}" + (" …" if len(cells["missing"]) > 8 else "") if cells["missing"] else ""),
             ""]
    lr = st.get("lr_search")
    if lr:
        rows = []
        reused = {label: r["searched_on"] for label, r in lr["rows"].items() if "searched_on" in r}
        for label, r in lr["rows"].items():
            if label in reused:
                continue
            for t in r["trials"]:
                rows.append([label, fmt(t["factor"]), fmt(t["lr"]), fmt(t["value"]), "←" if t["lr"] == r["chosen_lr"] else ""])
        lines += ["## Learning-rate search (validation split only)", "",
                  f"Task `{lr['task']}`, {lr['steps']} steps, seed {lr['seed']}; criterion: validation {lr['metric']} at "
                  f"the end of the stage; grid: {lr['factors']} × each method's base lr (the same size for every method).",
                  "", _md(rows, ["row", "factor", "lr", f"validation {lr['metric']}", "chosen"]), ""]
        if reused:
            lines += ["Searched once per method, at its first budget; these rows use that lr: "
                      + ", ".join(f"{a} (from {b})" for a, b in reused.items()), ""]
        factors = lr.get("factors") or []
        edge = [f"{label} ({fmt(r['chosen_factor'])}×)" for label, r in lr["rows"].items()
                if label not in reused and r.get("chosen_factor") is not None and len(factors) > 1
                and r["chosen_factor"] in (min(factors), max(factors))]
        if edge:
            lines += ["Chosen at an edge of the grid (the best lr may lie outside it; the grid was fixed before the "
                      "run, so the choice stands): " + ", ".join(edge), ""]
    if not bench["methods"]:  # still in its LR search: no cell to tabulate
        lines += ["## Cells", "", "No cell is committed yet: the study is still in its learning-rate search.", ""]
        cpu = st["cpu_time_s"]
        lines += ["## Compute", "", f"- CPU time of the LR search so far: {fmt((cpu.get('lr_search') or 0.0) / 3600.0)} h "
                  f"({cpu.get('lr_search_timed', 0)} of {cpu.get('lr_search_trials', 0)} trials timed)", ""]
        return "\n".join(lines)
    by_label = {m["label"]: m for m in bench["methods"]}
    prim = st.get("primary_metrics") or []
    fam = st.get("multiplicity") or {}
    n_tests = fam.get("tests", 0)
    family = (f"the {n_tests} primary tests" if n_tests else
              "the primary tests (none yet: a test needs a row and its reference in 2 or more matching cells)")
    holm_note = (f"**significant** = the interval excludes 0 and Holm's correction over {family} keeps "
                 f"p < {fam.get('alpha', 0.05)}; nominal only = the interval excludes 0 but not after the correction"
                 ) if fam else "**significant** = the interval excludes 0"
    if prim:
        rows = [[lab, len(m.get("seeds", [])), *(_pm(m["metrics"].get(k)) for k in prim)] for lab, m in by_label.items()]
        lines += ["## Pre-registered comparisons (primary)", "",
                  "Mean ± std over seeds × orders:", "", _md(rows, ["row", "cells", *(metric_label(k)[0] for k in prim)]), ""]
        for ref, pr in (st.get("paired") or {}).items():
            rows = []
            for lab, diffs in pr["methods"].items():
                rows.append([lab, pr["baselines"].get(lab), *(_diff_cell(diffs.get(k) or {}) for k in prim)])
            lines += [f"Paired differences against `{ref}` (row − {ref} at the same budget, matched on seed and order; "
                      "95% t interval, two-sided p; " + holm_note + "):", "",
                      _md(rows, ["row", "paired with", *(metric_label(k)[0] for k in prim)]), ""]
        if st.get("plot"):
            pairs = "; ".join(f"{metric_label(y)[0]} against {metric_label(x)[0]}" for x, y in st["plot"]["panels"])
            lines += [f"![learning vs forgetting]({st['plot']['file']})", "",
                      f"Learning vs forgetting ({pairs}): one point per row, mean ± std over its cells; the dashed "
                      "line joins the rows no other row beats on both axes.", ""]
        if st.get("target"):
            lines += [equal_quality_markdown(st["target"], "Pre-registered equal-quality point"), ""]
    if st.get("contrasts"):
        keys = prim or sorted({k for pr in st["contrasts"].values() for d in pr["methods"].values() for k in d})
        cf = st.get("contrast_multiplicity") or {}
        rows = [[lab, pr["baselines"].get(lab), *(_diff_cell(diffs.get(k) or {}) for k in keys)]
                for pr in st["contrasts"].values() for lab, diffs in pr["methods"].items()]
        lines += ["## Contrasts (exploratory, `compare.contrasts`)", "",
                  "Not part of the pre-registered family, whose tests and correction above are unchanged: each row of "
                  "the first method paired with the second method's row at the same budget, matched on seed and "
                  "order; 95% t interval, two-sided p; **significant** = the interval excludes 0 and Holm's correction "
                  f"over these {cf.get('tests', 0)} contrast tests keeps p < {cf.get('alpha', 0.05)}; nominal only = "
                  "the interval excludes 0 but not after the correction.", "",
                  _md(rows, ["row", "paired with", *(metric_label(k)[0] for k in keys)]) if rows else
                  "No contrast has cells of both rows yet.", ""]
    from .harness.bench import COST_KEYS as cost_keys  # (here, not at import: the harness imports this module)
    by_machine = st.get("cost_by_machine")
    quality = [k for k in METRIC_LABELS if (by_machine is None or k not in cost_keys)
               and any((m["metrics"].get(k) or {}).get("mean") is not None for m in bench["methods"])]
    lines += ["## Exploratory (not pre-registered)", "", "Every other metric, mean ± std over seeds × orders"
              + (" (time and memory: per machine, below)" if by_machine is not None else "") + ":", "",
              bench_table(bench, quality), ""]
    for ref, pr in (st.get("paired") or {}).items():
        rows = []
        for lab, diffs in pr["methods"].items():
            for k, d in diffs.items():
                if k in prim or d.get("mean") is None or (k not in METRIC_LABELS and not k.startswith("probe_")):
                    continue
                rows.append([lab, metric_label(k)[0], _diff_cell(d)])
        if rows:
            lines += [f"Paired differences against `{ref}`, other metrics (exploratory):", "",
                      _md(rows, ["row", "metric", "difference [95% CI] p"]), ""]
    for block in st.get("accuracy_matrix") or []:
        if not block["rows"]:
            continue
        order = block["order"]
        rows = [[lab, r["cells"], *(" → ".join(_pm_points(r["tasks"][t][k]) for k in ("base", "learned", "final")) for t in order)]
                for lab, r in block["rows"].items()]
        lines += [f"Accuracy matrix, order {' → '.join(order)} (points, mean ± std over seeds; each task before "
                  "training → right after it was learned → at the end):", "",
                  _md(rows, ["row", "cells", *order]), ""]
    if by_machine is not None:
        lines += ["## Time and memory, per machine (exploratory)", "",
                  "A cell's cost depends on the machine that ran it, so each machine class has its own table, and "
                  "paired differences match cells on seed, order *and* machine.", ""]
        for mc, c in by_machine.items():
            rows = [[lab, r["cells"], *(_pm(r.get(k)) for k in cost_keys)] for lab, r in c["rows"].items()]
            lines += [f"### {mc} ({c['cells']} cells)", "",
                      _md(rows, ["row", "cells", *(METRIC_LABELS.get(k, ("wall time s",))[0] for k in cost_keys)]), ""]
            for ref, pr in (c.get("paired") or {}).items():
                prow = [[lab, METRIC_LABELS.get(k, ("wall time s",))[0], _diff_cell(d)]
                        for lab, diffs in pr["methods"].items() for k, d in diffs.items() if d.get("mean") is not None]
                if prow:
                    lines += [f"Paired against `{ref}` on this machine:", "", _md(prow, ["row", "metric", "difference [95% CI] p"]), ""]
    cpu = st["cpu_time_s"]
    lines += ["## Compute", "",
              f"- CPU time (process time of the cells that ran in one piece): cells {fmt(cpu['cells'] / 3600.0)} h "
              f"({cpu['cells_timed']} timed), LR search {fmt((cpu.get('lr_search') or 0.0) / 3600.0)} h "
              f"({cpu.get('lr_search_timed', 0)} of {cpu.get('lr_search_trials', 0)} trials timed)",
              f"- recorded wall time of the cells (setup + training + evaluation): {fmt(st['wall_time_s_recorded'] / 3600.0)} h",
              ""]
    machines = st.get("compute_by_machine")
    if machines:
        rows = [[mc, c["cells"], fmt(c["cells_cpu_s"] / 3600.0) + ("" if c.get("cells_timed", c["cells"]) == c["cells"]
                                                                   else f" ({c['cells_timed']} timed)"),
                 fmt(c["cells_wall_s"] / 3600.0), c["trials"], fmt(c["trials_cpu_s"] / 3600.0)] for mc, c in machines.items()]
        lines += ["Per machine (CPU time is the cell process's; on a GPU machine it is the host side's):", "",
                  _md(rows, ["machine", "cells", "cells CPU h", "cells wall h", "LR trials", "LR trials CPU h"]), ""]
    return "\n".join(lines)


def equal_quality_markdown(eq: dict[str, Any], title: str = "Equal task quality") -> str:
    """The equal-task-quality table: control perplexity where each method reaches the reference's task perplexity."""
    metric = eq.get("metric", "task_ppl")
    what = metric.replace("task_", "task ")
    rows = []
    some_degenerate = any(m.get("informative") for m in eq["methods"])
    for m in eq["methods"]:
        n = m["reached"] + len(m["not_reached"])
        rows.append([
            m["label"], f"{m['reached']}/{n}", _pm(m["steps_to_target"]), _pm(m["control_ppl_at_target"]),
            _pm(m["control_change_pct_at_target"]), _pm(m["best_task_ppl"]),
        ])
        if some_degenerate:
            inf = m.get("informative") or {}
            k = inf.get("reached", 0) + len(inf.get("not_reached") or [])
            rows[-1] += [f"{inf.get('reached', 0)}/{k}", _pm(inf.get("steps_to_target")),
                         _pm(inf.get("control_change_pct_at_target"))]
    extra = ["informative cells: reached", "steps to target", "control Δ% at target"] if some_degenerate else []
    return "\n".join([
        f"## {title} (stage {eq['stage']}, {eq.get('task')})",
        "",
        f"Target: the {what} `{eq['reference']}` reaches "
        + (f"after {eq['step']} steps of stage {eq['stage']} " if eq.get("step") else f"at the end of stage {eq['stage']} ")
        + f"(per seed; mean {fmt(eq['mean_target_task_ppl'])}). Control perplexity where each run's learning curve "
        "first reaches it (linear interpolation between curve points).",
        "",
        _md(rows, ["method", "reached", "steps to target", "control ppl at target", "control Δ% at target",
                   f"best {what}", *extra]),
        *_target_at_base_note(eq),
    ])


def _target_at_base_note(eq: dict[str, Any]) -> list[str]:
    """A warning when the target is no better than the untrained model for some of the reference's cells."""
    at_base, n = eq.get("target_at_base") or [], len(eq.get("target_task_ppl") or {})
    if not at_base:
        return []
    return ["", f"**Degenerate for {len(at_base)} of {n} reference cells** ({', '.join(map(str, at_base))}): there "
            f"the target is no better than the untrained model's own {eq.get('metric', 'task_ppl').replace('task_', 'task ')} "
            "(the curve's step 0), so every run reaches it at step 0 and the point compares nothing for those cells. "
            "The last three columns repeat the point over the other cells alone."]


# ---------------------------------------------------------------------------------------------------------- plots
def plot_forgetting_heatmap(results: dict[str, Any], path: str | Path) -> Path:
    """Heat map of the forgetting matrix as relative perplexity change vs the base model (%), control included."""
    import numpy as np

    plt = _plt()
    has_control = results.get("control") is not None
    tasks = list(results["tasks"]) + ([f"control ({results['control']})"] if has_control else [])
    vals = [list(r) + ([c] if has_control else []) for r, c in zip(results["matrix"]["task_ppl"], results["matrix"]["control_ppl"])]
    arr = np.asarray(vals, dtype=float)
    base = arr[0:1, :]
    rel = (arr / base - 1.0) * 100.0
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(tasks), 1.2 + 0.6 * arr.shape[0]))
    lim = np.nanmax(np.abs(rel[np.isfinite(rel)])) if np.isfinite(rel).any() else 1.0
    im = ax.imshow(rel, cmap="RdBu_r", vmin=-max(lim, 1e-9), vmax=max(lim, 1e-9), aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right", fontsize=8)
    ax.set_yticks(range(arr.shape[0]), results["matrix"]["rows"], fontsize=8)
    for i in range(arr.shape[0]):
        for j in range(arr.shape[1]):
            ax.text(j, i, f"{fmt(float(arr[i, j]))}\n({rel[i, j]:+.1f}%)", ha="center", va="center", fontsize=7)
    ax.set_title("Perplexity after each stage (colour: % change vs base; red = worse)", fontsize=9)
    fig.colorbar(im, ax=ax, label="% change vs base")
    fig.tight_layout()
    return _save(fig, path)


def plot_score_heatmap(results: dict[str, Any], metric: str, path: str | Path) -> Path:
    """Heat map of an accuracy-like forgetting matrix (%, higher is better; blank where a task lacks the metric)."""
    import numpy as np

    plt = _plt()
    tasks = list(results["tasks"])
    arr = np.asarray([[np.nan if v is None else 100 * v for v in r] for r in results["matrix"][metric]], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(tasks), 1.2 + 0.6 * arr.shape[0]))
    im = ax.imshow(arr, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right", fontsize=8)
    ax.set_yticks(range(arr.shape[0]), results["matrix"]["rows"], fontsize=8)
    for i in range(arr.shape[0]):
        for j in range(arr.shape[1]):
            if np.isfinite(arr[i, j]):
                ax.text(j, i, f"{arr[i, j]:.1f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_title(f"{SCORE_NAMES.get(metric, metric).capitalize()} % after each stage", fontsize=9)
    fig.colorbar(im, ax=ax, label="%")
    fig.tight_layout()
    return _save(fig, path)


def plot_control_vs_task(results: dict[str, Any], path: str | Path) -> Path:
    """Per stage: perplexity of every task and of the control corpus (log scale)."""
    plt = _plt()
    rows = results["matrix"]["rows"]
    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(7, 4))
    for j, t in enumerate(results["tasks"]):
        ax.plot(x, [r[j] for r in results["matrix"]["task_ppl"]], marker="o", label=f"task {t}")
    if results.get("control") is not None:
        ax.plot(x, results["matrix"]["control_ppl"], marker="s", color="black", lw=2, label=f"control ({results['control']})")
    ax.set_xticks(x, rows, rotation=15, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log)")
    ax.set_title(f"Task vs control perplexity per stage — {results.get('method', {}).get('label', '')}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_spectrum(spectrum: dict[str, Any], path: str | Path) -> Path:
    """log10 κ of every adapted tensor before and after the run (sorted by κ before)."""
    plt = _plt()
    names = list(spectrum["names"])
    before, after = spectrum["kappa_before"], spectrum["kappa_after"]
    order = sorted(range(len(names)), key=lambda i: before[i])
    lb = [math.log10(before[i]) if 0 < before[i] < math.inf else float("nan") for i in order]
    la = [math.log10(after[i]) if 0 < after[i] < math.inf else float("nan") for i in order]
    fig, ax = plt.subplots(figsize=(max(6, 0.12 * len(names) + 3), 4))
    ax.plot(range(len(order)), lb, "o", ms=4, label="base model")
    ax.plot(range(len(order)), la, "x", ms=5, label="after the run")
    ax.set_xlabel(f"adapted tensor (sorted by base κ; {len(names)} tensors)")
    ax.set_ylabel("log10 κ")
    ax.set_title("Condition number κ of the adapted tensors", fontsize=9)
    if len(names) <= 24:
        ax.set_xticks(range(len(order)), [names[i].replace("model.layers.", "L") for i in order], rotation=70, fontsize=6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def pareto_panels(bench: dict[str, Any]) -> list[tuple[str, str]]:
    """The (x, y) metric pairs of the learning-vs-forgetting plot.

    A study with pre-registered primary metrics plots what it compares: final average accuracy (ACC) against each
    forgetting measure among its primary metrics (the control suite's change, then BWT). Otherwise, task perplexity
    gain against control perplexity change, as every perplexity bench reports them.
    """
    prim = (bench.get("study") or {}).get("primary_metrics") or []
    learn = next((k for k in ("acc", "em") if k in prim), None)
    if learn is not None:
        forget = [k for k in prim if k.startswith("probe_")] + [k for k in prim if k.startswith("bwt_")]
        if forget:
            return [(k, learn) for k in forget]
    return [("control_change_pct", "task_gain_pct")]


def _pareto_front(pts: list[tuple[float, float]], x_lower: bool) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (y higher is better; x lower or higher, as ``x_lower`` says)."""
    def beats(q: tuple[float, float], p: tuple[float, float]) -> bool:
        return q != p and q[1] >= p[1] and (q[0] <= p[0] if x_lower else q[0] >= p[0])
    return sorted(p for p in pts if not any(beats(q, p) for q in pts))


def needs_symlog(magnitudes: Sequence[float], ratio: float = 100.0) -> bool:
    """Whether an axis showing these magnitudes (|mean| + std per point) needs a symmetric log scale: the largest is
    more than ``ratio`` times the median, so on a linear scale most points would sit in one pixel column."""
    vals = sorted(abs(v) for v in magnitudes if v is not None and math.isfinite(v))
    if len(vals) < 3:
        return False
    median = vals[len(vals) // 2]
    return vals[-1] > ratio * max(median, 1e-12)


def plot_pareto(bench: dict[str, Any], path: str | Path, panels: Sequence[tuple[str, str]] | None = None) -> Path:
    """Learning against forgetting, one point per method (mean, error bars = std over its cells), one panel per
    (x, y) metric pair (default :func:`pareto_panels`), with each panel's Pareto front dashed."""
    plt = _plt()
    panels = list(panels or pareto_panels(bench))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    # 15 rows of a study outrun matplotlib's 10-colour cycle: 20 colours and a marker per row keep them apart.
    colors = plt.get_cmap("tab20").colors
    markers = "osD^vP<X>hp*"
    for ax, (xk, yk) in zip(axes[0], panels):
        (xlabel, xbetter), (ylabel, _) = metric_label(xk), metric_label(yk)
        pts = []
        for i, m in enumerate(bench["methods"]):
            x, y = m["metrics"].get(xk), m["metrics"].get(yk)
            if not x or not y or x.get("mean") is None or y.get("mean") is None:
                continue
            pts.append((x["mean"], y["mean"]))
            ax.errorbar(x["mean"], y["mean"], xerr=x.get("std") or 0, yerr=y.get("std") or 0, fmt=markers[i % len(markers)],
                        color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20], capsize=4, label=m["label"])
            ax.annotate(m["label"], (x["mean"], y["mean"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
        front = _pareto_front(pts, x_lower=xbetter != "higher")
        if len(front) > 1:
            ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="gray", lw=1, label="Pareto front")
        ax.axvline(0, color="black", lw=0.5)
        spread = [abs(m["metrics"][xk]["mean"]) + (m["metrics"][xk].get("std") or 0.0) for m in bench["methods"]
                  if (m["metrics"].get(xk) or {}).get("mean") is not None]
        if needs_symlog(spread):
            # one diverged row (a control perplexity up 10^7 %) would squash every other point onto the axis
            lin = max(1.0, sorted(spread)[len(spread) // 2])
            ax.set_xscale("symlog", linthresh=lin)
            # a std bar of such a row reaches far below any mean: let it run off the left edge instead
            ax.set_xlim(left=min(0.0, min(p[0] for p in pts)) - lin)
            xlabel += ", symmetric log scale"
        ax.set_xlabel(f"{xlabel} ({'higher' if xbetter == 'higher' else 'lower'} = less forgetting)")
        ax.set_ylabel(f"{ylabel} (higher = learned more)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    over = "seeds × orders" if bench.get("study") else f"seeds {bench.get('seeds')}"
    fig.suptitle(f"Learning vs forgetting, mean ± std over {over}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_learning_curves(bench: dict[str, Any], path: str | Path) -> Path:
    """Control perplexity against task perplexity along each method's learning curve (mean over seeds).

    Read right to left: training lowers the task perplexity; a curve that rises steeply forgets the control corpus
    faster for the same task progress. The dashed line marks the equal-task-quality target, when there is one.
    """
    plt = _plt()
    curves = (bench.get("curves") or {}).get("methods", {})
    fig, ax = plt.subplots(figsize=(7, 5))
    for label, pts in curves.items():
        ax.plot([p["task_ppl"] for p in pts], [p["control_ppl"] for p in pts], marker="o", ms=3, label=label)
    eq = bench.get("equal_quality")
    if eq:
        ax.axvline(eq["mean_target_task_ppl"], color="gray", ls="--", lw=1, label=f"target ({eq['reference']})")
    ax.invert_xaxis()
    ax.set_xlabel("task perplexity (training goes right; lower = learned more)")
    ax.set_ylabel("control perplexity (higher = forgot more)")
    stage = (bench.get("curves") or {}).get("stage", 1)
    ax.set_title(f"Forgetting along the learning curve, stage {stage} (mean over seeds {bench.get('seeds')})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write_text(path, text)
