"""Continual-learning metrics from the perplexity matrix, and the mean ± std over seeds used by benches."""

from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = ["compute_metrics"]


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
