"""Continual-learning metrics from the perplexity matrix, and the mean ± std over seeds used by benches."""

from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = ["compute_metrics", "compute_score_metrics", "control_suite_changes", "SCORE_METRICS"]


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def compute_metrics(task_ppl: Sequence[Sequence[float]], control_ppl: Sequence[float | None], tasks: Sequence[str]) -> dict[str, Any]:
    """Continual-learning metrics from the perplexity matrix.

    ``task_ppl[s][j]``: perplexity on task ``j``'s eval split after stage ``s`` (row 0 = base model; task ``j`` is
    trained in stage ``j+1``). ``control_ppl[s]``: control perplexity after stage ``s``. Perplexity is lower-is-better,
    so the accuracy-style definitions are mirrored to keep their usual sign:

    * ``bwt_ppl`` = mean over tasks ``j < T`` of ``R[j+1][j] − R[T][j]`` (negative = forgetting);
    * ``forgetting_per_task[j]`` = ``R[T][j] − min_{j+1 ≤ l < T} R[l][j]`` (positive = forgotten), not defined for the last task;
    * ``task_gain_pct`` = mean of ``(R[0][j] − R[T][j]) / R[0][j]`` × 100 (what the run learned and kept);
    * ``learning_gain_pct`` = mean of ``(R[0][j] − R[j+1][j]) / R[0][j]`` × 100 (gain right after each stage);
    * ``control_change_abs`` / ``control_change_pct``: final minus base control perplexity, absolute and in %.
    """
    T = len(tasks)
    if len(task_ppl) < 1 or any(len(r) != T for r in task_ppl):
        raise ValueError("task_ppl must have one row per evaluation point and one column per task")
    done = len(task_ppl) - 1
    final = task_ppl[-1]
    out: dict[str, Any] = {
        "stages_done": done,
        "final_avg_task_ppl": _mean(final),
        "base_avg_task_ppl": _mean(task_ppl[0]),
        "final_task_ppl": dict(zip(tasks, final)),
        "control_ppl_base": control_ppl[0],
        "control_ppl_final": control_ppl[-1],
        # no control corpus (a `kappatune train` without --control): the control metrics are None
        "control_change_abs": control_ppl[-1] - control_ppl[0] if control_ppl[0] is not None else None,
        "control_change_pct": (control_ppl[-1] / control_ppl[0] - 1.0) * 100.0 if control_ppl[0] is not None else None,
    }
    trained = list(range(min(done, T)))  # tasks trained so far
    if trained:
        out["task_gain_pct"] = _mean([(task_ppl[0][j] - final[j]) / task_ppl[0][j] * 100.0 for j in trained])
        out["learning_gain_pct"] = _mean([(task_ppl[0][j] - task_ppl[j + 1][j]) / task_ppl[0][j] * 100.0 for j in trained])
    earlier = [j for j in trained if j + 1 < done]
    if earlier:
        out["bwt_ppl"] = _mean([task_ppl[j + 1][j] - final[j] for j in earlier])
        forgetting = {tasks[j]: final[j] - min(task_ppl[l][j] for l in range(j + 1, done)) for j in earlier}
        out["forgetting_per_task"] = forgetting
        out["avg_forgetting_ppl"] = _mean(list(forgetting.values()))
    return out


def _stat(values: list[float]) -> dict[str, Any]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": []}
    m = _mean(vals)
    std = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": m, "std": std, "n": len(vals), "values": vals}


# Accuracy-like metrics (higher is better) and the short names of their summary keys.
SCORE_METRICS = {"accuracy": "acc", "accuracy_norm": "acc_norm", "exact_match": "em"}


def compute_score_metrics(R: Sequence[Sequence[float | None]], tasks: Sequence[str], short: str) -> dict[str, Any]:
    """Continual-learning metrics of an accuracy-like matrix, in points (× 100; higher is better).

    ``R[s][j]``: the metric (a fraction) of task ``j`` after stage ``s`` (row 0 = base model, task ``j`` trained in
    stage ``j+1``); ``None`` where task ``j`` does not have this metric. With ``T`` = stages done and ``J`` = the
    trained tasks that have the metric:

    * ``{short}`` (ACC) = mean over ``J`` of ``R[T][j]``; ``base_{short}`` = mean over the same tasks of ``R[0][j]``;
    * ``bwt_{short}`` = mean over ``j`` in ``J`` trained before the last stage of ``R[T][j] − R[j+1][j]``
      (negative = forgetting);
    * ``fwt_{short}`` = mean over tasks ``j ≥ 1`` with ``j ≤ T`` of ``R[j][j] − R[0][j]`` (what earlier stages did to a
      task before it was trained, against the base model);
    * ``forgetting_{short}_per_task[j]`` = ``max_{1 ≤ l < T} R[l][j] − R[T][j]`` for ``j`` trained before the last
      stage (positive = forgotten); ``avg_forgetting_{short}`` their mean.
    """
    done = len(R) - 1
    have = [j for j in range(len(tasks)) if all(r[j] is not None for r in R)]
    if not have:
        return {}
    final = R[-1]
    trained = [j for j in have if j < done]
    out: dict[str, Any] = {f"final_{short}_per_task": {tasks[j]: final[j] for j in have}}
    if trained:
        out[short] = 100.0 * _mean([final[j] for j in trained])
        out[f"base_{short}"] = 100.0 * _mean([R[0][j] for j in trained])
    earlier = [j for j in trained if j + 1 < done]
    if earlier:
        out[f"bwt_{short}"] = 100.0 * _mean([final[j] - R[j + 1][j] for j in earlier])
        forgetting = {tasks[j]: 100.0 * (max(R[l][j] for l in range(1, done)) - final[j]) for j in earlier}
        out[f"forgetting_{short}_per_task"] = forgetting
        out[f"avg_forgetting_{short}"] = _mean(list(forgetting.values()))
    later = [j for j in have if 1 <= j <= done]
    if later:
        out[f"fwt_{short}"] = 100.0 * _mean([R[j][j] - R[0][j] for j in later])
    return out


def control_suite_changes(base: dict[str, dict[str, float]], final: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Each control probe's change from the base model: ``{probe: {metric: {base, final, change}}}``.

    ``change`` is in % for ``ppl`` (relative) and in points for accuracy-like metrics (final − base, × 100)."""
    out: dict[str, Any] = {}
    for probe, vals in final.items():
        out[probe] = {}
        for m, v in vals.items():
            b = base.get(probe, {}).get(m)
            if b is None or v is None:
                continue
            change = (v / b - 1.0) * 100.0 if m == "ppl" else (v - b) * 100.0
            out[probe][m] = {"base": b, "final": v, "change": change, "unit": "%" if m == "ppl" else "points"}
    return out
