"""Benchmarks: every method × seed of a config (:func:`bench`) and their aggregation (:func:`aggregate_bench`)."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Sequence

from ..config import RunConfig, config_fingerprint
from ..errors import ConfigError
from ..storage import atomic_write_json, atomic_write_text
from .compare import bench_curves, equal_quality
from .metrics import _stat
from .run import _as_config, _log, run, validate
from .state import _finished, _read_state, library_versions, load_results

__all__ = ["bench", "aggregate_bench", "paired_against"]

_BENCH_METRICS = (
    "final_avg_task_ppl", "task_gain_pct", "learning_gain_pct", "bwt_ppl", "avg_forgetting_ppl", "control_ppl_final",
    "control_change_abs", "control_change_pct", "trainable_params", "train_time_s", "sec_per_step", "peak_rss_mb", "peak_gpu_mb",
    "acc", "bwt_acc", "fwt_acc", "avg_forgetting_acc", "acc_norm", "bwt_acc_norm", "em", "bwt_em", "fwt_em", "avg_forgetting_em",
)


def _metric_keys(res: list[dict[str, Any]]) -> list[str]:
    """The fixed bench metrics plus each control probe's change (``probe_<name>_<metric>_change``)."""
    probes = sorted({k for r in res for k in r["metrics"] if k.startswith("probe_") and k.endswith("_change")})
    return list(_BENCH_METRICS) + probes


def paired_against(cells: dict[str, dict[int, dict[str, Any]]], baseline: str) -> dict[str, Any]:
    """Every method's per-seed paired differences (method − ``baseline``) of every bench metric, with a 95% interval.

    Seeds share batches, so the seed-matched difference is the honest comparison (:func:`kappatune.stats.paired_difference`).
    """
    from ..stats import paired_difference

    ref = cells[baseline]
    keys = _metric_keys(list(ref.values()))
    out: dict[str, Any] = {"baseline": baseline, "confidence": 0.95, "methods": {}}
    for label, by_seed in cells.items():
        if label == baseline:
            continue
        diffs = {}
        for k in keys:
            a = {s: r["metrics"].get(k) for s, r in by_seed.items()}
            b = {s: r["metrics"].get(k) for s, r in ref.items()}
            if any(v is not None for v in a.values()) and any(v is not None for v in b.values()):
                diffs[k] = paired_difference(a, b, confidence=0.95)
        out["methods"][label] = diffs
    return out


def aggregate_bench(cells: dict[str, dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Mean ± sample std over seeds of every metric, per method (``cells[label][seed]`` = results dict)."""
    rows = []
    for label, by_seed in cells.items():
        res = list(by_seed.values())
        metrics = {k: _stat([r["metrics"].get(k) for r in res]) for k in _metric_keys(res)}
        tasks = res[0]["tasks"] if res else []
        per_task = {t: _stat([r["metrics"]["final_task_ppl"][t] for r in res]) for t in tasks}
        first = res[0] if res else {}
        rows.append({
            "label": label, "method": first.get("method", {}).get("name"), "seeds": list(by_seed),
            "metrics": metrics, "final_task_ppl": per_task,
            "budget_reports": [r.get("budget_report") for r in res],
            "dirs": {str(s): r.get("_dir") for s, r in by_seed.items()},
        })
    return rows


def _select_only(cfg: RunConfig, only: Sequence[str] | None) -> RunConfig:
    """The bench config restricted to the method labels in ``only`` (``--only``); an unknown label is an error."""
    from ..config import CompareConfig

    if not only:
        return cfg
    labels = [s.display for s in cfg.method_specs()]
    unknown = [o for o in only if o not in labels]
    if unknown:
        raise ConfigError(f"--only: no method labelled {unknown[0]!r} in this config; labels: {', '.join(labels)}")
    keep = [s for s in cfg.method_specs() if s.display in only]
    compare = cfg.compare if cfg.compare.reference in only else CompareConfig()
    return dataclasses.replace(cfg, method=None, methods=keep, compare=compare)


def bench(
    config: RunConfig | str | os.PathLike | dict,
    *,
    force: bool = False,
    progress: bool | None = None,
    overrides: Sequence[str] = (),
    only: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run every method × seed of the config (each cell resumable, finished cells skipped) and compare them.

    Writes ``bench.json``, ``bench.md`` and ``pareto.png`` to the output directory; cell ``<label>/seed-<s>/``
    holds each run. All methods are validated (and budget-matched) before the first cell trains. Under a launcher
    (DDP/FSDP) every process runs the cells; only rank 0 prints and writes the bench reports.
    ``only``: method labels to run (the others are left out of this bench and its report), e.g. to re-run one
    method of a published study; a cell's results do not depend on which other methods the config lists.
    """
    from .. import reporting

    cfg = _select_only(_as_config(config, overrides), only)
    progress = cfg.progress if progress is None else progress
    # Under a launcher every process runs the bench (the cells' training is collective); one prints and writes.
    main = os.environ.get("RANK", "0") == "0"
    talk = progress and main
    specs, seeds = cfg.method_specs(), cfg.seed_list()
    out = cfg.out_dir()
    t0 = time.perf_counter()
    # Each cell: (directory, its run config, its state or None, complete with this config?), read once.
    cell_status = {}
    for spec in specs:
        for seed in seeds:
            cell_dir = out / spec.display / f"seed-{seed}"
            cell_cfg = cfg.for_method(spec, seed, cell_dir)
            st = _read_state(cell_dir)
            done = st is not None and st.get("config_fingerprint") == config_fingerprint(cell_cfg) and _finished(cell_dir, st)
            cell_status[spec.display, seed] = (cell_dir, cell_cfg, st, done)

    if all(done for *_, done in cell_status.values()):
        # Nothing will train: re-aggregating (e.g. another `compare` view) needs no model, data or budget check.
        _log(talk, f"bench {cfg.name}: all {len(specs) * len(seeds)} cells are complete; re-aggregating")
    else:
        trainable = validate(cfg, progress=progress)
        _log(talk, f"bench {cfg.name}: {len(specs)} methods x {len(seeds)} seeds validated; trainable params: "
             + ", ".join(f"{k} {v:,}" for k, v in trainable.items() if v is not None))
    cells: dict[str, dict[int, dict[str, Any]]] = {}
    ran, skipped = [], []
    for spec in specs:
        for seed in seeds:
            cell_dir, cell_cfg, st, done = cell_status[spec.display, seed]
            if done:
                res = load_results(cell_dir)
                skipped.append(f"{spec.display}/seed-{seed}")
            else:
                _log(talk, f"== {spec.display} seed {seed} -> {cell_dir}")
                res = run(cell_cfg, resume=st is not None, force=force, progress=progress,
                          base_eval_cache=out / "base_eval.json")
                ran.append(f"{spec.display}/seed-{seed}")
            res["_dir"] = str(cell_dir)
            cells.setdefault(spec.display, {})[seed] = res
    rows = aggregate_bench(cells)
    first = next(iter(next(iter(cells.values())).values()))
    summary = {
        "kappatune_bench": 1,
        "name": cfg.name, "model": cfg.model, "tasks": first["tasks"], "control": first["control"],
        "steps_per_stage": cfg.steps_per_stage(), "seeds": seeds, "budget": cfg.budget,
        "config": cfg.to_dict(), "config_fingerprint": config_fingerprint(cfg), "libraries": library_versions(),
        "methods": rows, "ran": ran, "skipped": skipped, "wall_time_s": time.perf_counter() - t0, "plots": [],
    }
    if cfg.compare.baseline is not None and cfg.compare.baseline in cells:
        summary["paired"] = paired_against(cells, cfg.compare.baseline)
    if cfg.compare.reference is not None:
        summary["equal_quality"] = equal_quality(cells, cfg.compare.reference, cfg.compare.stage, cfg.compare.step)
    if not main:
        return summary
    if cfg.output.plots:
        reporting.plot_pareto(summary, out / "pareto.png")
        summary["plots"] = ["pareto.png"]
        if cfg.eval.curve_every > 0:
            summary["curves"] = bench_curves(cells, cfg.compare.stage)
            reporting.plot_learning_curves(summary, out / "curves.png")
            summary["plots"].append("curves.png")
    atomic_write_text(out / "bench.md", reporting.bench_markdown(summary))
    atomic_write_json(out / "bench.json", summary)
    _log(talk, reporting.bench_table(summary))
    return summary
