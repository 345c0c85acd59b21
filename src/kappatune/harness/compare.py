"""Comparing methods along their learning curves: control perplexity at equal task quality (:func:`equal_quality`)
and seed-averaged curves (:func:`bench_curves`)."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .metrics import _mean, _stat

__all__ = ["equal_quality", "bench_curves"]


def _stage_curve(res: dict[str, Any], stage: int) -> tuple[str, list[dict[str, float]]] | None:
    """(task, points) of stage ``stage`` of one run, from its start (step 0) to its end.

    Curves measure the task's validation split and start with a step-0 point; results written before that have
    no step-0 point, and start from the stage's starting model's test-split numbers (base or previous stage end)."""
    stages = {s["stage"]: s for s in res.get("stages", [])}
    cur = stages.get(stage)
    if cur is None or not cur.get("curve"):
        return None
    task = cur["task"]
    if cur["curve"][0].get("step") == 0:
        return task, [dict(p) for p in cur["curve"]]
    start = res["base"] if stage == 1 else stages.get(stage - 1)  # the model the stage started from
    if start is None:
        return None
    first = {"step": 0, "task_ppl": start["task_ppl"][task], "control_ppl": start["control_ppl"]}
    first.update({f"task_{k}": v for k, v in (start.get("task_metrics") or {}).get(task, {}).items() if k != "ppl"})
    return task, [first] + [dict(p) for p in cur["curve"]]


def _higher_is_better(metric: str) -> bool:
    """Curve keys: perplexity falls as a model learns, accuracy-like scores rise."""
    return not metric.endswith("ppl")


def _reach(points: list[dict[str, float]], target: float, metric: str = "task_ppl") -> dict[str, float] | None:
    """Where a learning curve first reaches the target (task ppl <= target; an accuracy-like ``metric`` >=
    target), linearly interpolated between its points."""
    sign = -1.0 if _higher_is_better(metric) else 1.0
    for i, p in enumerate(points):
        if p.get(metric) is not None and sign * p[metric] <= sign * target:
            if i == 0:
                return {"step": 0.0, "control_ppl": p["control_ppl"]}
            q = points[i - 1]
            frac = (q[metric] - target) / (q[metric] - p[metric])
            return {
                "step": q["step"] + frac * (p["step"] - q["step"]),
                "control_ppl": q["control_ppl"] + frac * (p["control_ppl"] - q["control_ppl"]),
            }
    return None


def equal_quality(cells: dict[str, dict[Any, dict[str, Any]]], reference: str, stage: int = 1,
                  step: int | None = None, metric: str = "task_ppl") -> dict[str, Any]:
    """Control perplexity of every method at the task perplexity the reference method reaches in ``stage``.

    The target is, per seed, the reference run's task perplexity at the end of that stage, or after ``step`` steps
    of it (the mean over its seeds for a seed it lacks). Each run's learning curve of the stage (``eval.curve_every`` points, linearly
    interpolated) gives the step where it first reaches the target and its control perplexity there: with a
    constant learning rate that is what "train until the task perplexity reaches the target" would give, at the
    curve's resolution. A run that never reaches the target is counted in ``not_reached`` with its best task ppl.
    ``metric``: the curve key the target is read in (``task_ppl``; ``task_accuracy`` for sft tasks, higher is
    better); ``best_task_ppl`` then holds the best value of that metric. ``target_at_base`` lists the reference's
    seeds whose target is no better than the untrained model's value (the curve's step 0): every run reaches it at
    step 0 there, so the point is degenerate for them (the report says so), and each row's ``informative`` holds
    the same statistics over the other seeds alone (``None`` when no seed is degenerate).
    """
    ref = cells.get(reference)
    if not ref:
        raise ConfigError(f"compare.reference {reference!r} has no finished runs")
    targets: dict[int, float] = {}
    trivial: list[Any] = []
    for seed, res in ref.items():
        cur = _stage_curve(res, stage)
        if cur is None:
            raise ConfigError(f"compare: the reference run {reference}/seed-{seed} has no learning curve for stage {stage} "
                              "(set eval.curve_every)")
        points = cur[1] if step is None else [p for p in cur[1] if p["step"] == step]
        if not points:
            raise ConfigError(f"compare.step {step}: the reference run {reference}/seed-{seed} has no learning-curve "
                              f"point at that step (points: {[p['step'] for p in cur[1]]})")
        if points[-1].get(metric) is None:
            raise ConfigError(f"compare: the reference run {reference}/seed-{seed} has no {metric!r} on its learning curve")
        targets[seed] = points[-1][metric]
        # the curve's first point is the untrained model: a target no better than it is reached at step 0 by every
        # run of that seed (they all start there), so the point compares nothing for it
        first = cur[1][0]
        if first.get("step") == 0 and first.get(metric) is not None and _reach([first], targets[seed], metric) is not None:
            trivial.append(seed)
    mean_target = _mean(list(targets.values()))
    rows = []
    tasks: list[str] = []  # the stage's task of every cell (a study with several task orders has one per order)
    for label, by_seed in cells.items():
        steps, ctrl, change, best, missing, reached = [], [], [], [], [], []
        for seed, res in by_seed.items():
            cur = _stage_curve(res, stage)
            if cur is None:
                missing.append(seed)
                continue
            task, points = cur
            if task not in tasks:
                tasks.append(task)
            hit = _reach(points, targets.get(seed, mean_target), metric)
            vals = [p[metric] for p in points if p.get(metric) is not None]
            best.append((max if _higher_is_better(metric) else min)(vals) if vals else None)
            if hit is None:
                missing.append(seed)
                continue
            base_ctrl = res["base"]["control_ppl"]
            reached.append(seed)
            steps.append(hit["step"])
            ctrl.append(hit["control_ppl"])
            change.append((hit["control_ppl"] / base_ctrl - 1.0) * 100.0)
        # the same point over the seeds whose target is not degenerate
        kept = [i for i, seed in enumerate(reached) if seed not in trivial]
        rows.append({
            "label": label, "reached": len(steps), "not_reached": missing,
            "steps_to_target": _stat(steps), "control_ppl_at_target": _stat(ctrl),
            "control_change_pct_at_target": _stat(change), "best_task_ppl": _stat(best),
            "informative": None if not trivial else {
                "reached": len(kept), "not_reached": [seed for seed in missing if seed not in trivial],
                "steps_to_target": _stat([steps[i] for i in kept]),
                "control_change_pct_at_target": _stat([change[i] for i in kept])},
        })
    return {"reference": reference, "stage": stage, "step": step, "task": " / ".join(tasks) or None, "metric": metric, "target_task_ppl": targets,
            "mean_target_task_ppl": mean_target, "target_at_base": trivial, "methods": rows}


def bench_curves(cells: dict[str, dict[int, dict[str, Any]]], stage: int = 1) -> dict[str, Any]:
    """Per method: stage ``stage``'s learning curve (step, task ppl, control ppl), averaged over seeds point by point."""
    out: dict[str, Any] = {}
    for label, by_seed in cells.items():
        curves = [c[1] for c in (_stage_curve(r, stage) for r in by_seed.values()) if c is not None]
        n = min((len(c) for c in curves), default=0)
        if n:
            out[label] = [
                {k: _mean([c[i][k] for c in curves]) for k in ("step", "task_ppl", "control_ppl")} for i in range(n)
            ]
    return {"stage": stage, "methods": out}
