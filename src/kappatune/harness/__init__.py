"""Continual-learning runs and fair benchmarks: train stage by stage, measure what is learned and what is forgotten.

:func:`run` executes one config: it evaluates the base model, then for every task in sequence trains one stage
(:func:`kappatune.training.train_stage`) and evaluates perplexity on *every* task's eval split and on the control
corpus, building the forgetting matrix ``R[stage][task]``. Each finished stage is committed atomically (trained
tensors as safetensors, then ``state.json`` — the commit point), so ``resume=True`` continues after the last
finished stage (or from a mid-stage checkpoint) and ends with exactly the metrics an uninterrupted run gives.
The output directory holds ``results.json`` (everything: config, library versions, matrix, metrics, per-stage
time and memory), ``results.md``, PNG plots and the final adapter (optionally the merged model).

:func:`bench` runs several methods × seeds with the same tasks, steps, data order per seed and (with ``budget``)
the same trainable-parameter count via each method's ``for_budget``; it aggregates mean ± std per metric and draws
the Pareto plot of task gain vs control degradation. Cells already finished are not re-run.

Everything that can be checked before training is checked first (:func:`validate`): config, model, corpora,
method names/options and budgets. On CPU a run is deterministic for a seed.

Modules: :mod:`~kappatune.harness.state` (``state.json``, run-directory artifacts, ``load_results``),
:mod:`~kappatune.harness.metrics` (``compute_metrics``), :mod:`~kappatune.harness.run` (``validate``, ``run``,
results and reports), :mod:`~kappatune.harness.bench` (``bench``, ``aggregate_bench``) and
:mod:`~kappatune.harness.compare` (``equal_quality``, ``bench_curves``). Everything is re-exported here. Note that
the attributes ``kappatune.harness.run`` and ``kappatune.harness.bench`` are the *functions*; the modules of the
same name are ``sys.modules["kappatune.harness.run"]`` (or ``importlib.import_module``), e.g. to monkeypatch the
``validate`` that :func:`bench` calls, patch it in ``kappatune.harness.bench``'s module.
"""

from __future__ import annotations

from .bench import _BENCH_METRICS, aggregate_bench, bench, bench_report, rerun_cell, study_rows
from .compare import _reach, _stage_curve, bench_curves, equal_quality
from .metrics import _mean, _stat, compute_metrics
from .run import (
    _as_config,
    _base_eval,
    _build_method,
    _config_diff,
    _Data,
    _finalize,
    _load,
    _load_data,
    _log,
    _method_options,
    _results,
    _write_reports,
    run,
    validate,
)
from .state import (
    STATE_FILE,
    STATE_VERSION,
    _clear_run_dir,
    _finished,
    _read_state,
    _state_checksum,
    _write_state,
    library_versions,
    load_results,
)

__all__ = ["run", "bench", "bench_report", "rerun_cell", "study_rows", "validate", "compute_metrics", "library_versions", "load_results", "aggregate_bench"]
