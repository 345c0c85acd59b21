"""Benchmarks: every method × seed of a config (:func:`bench`) and their aggregation (:func:`aggregate_bench`).

A *study* is a bench with the study keys (``budgets``, ``orders``, ``lr_search``, ``preregistered``,
``output.cells_dir``): its cells are (method, budget, task order, seed); every finished cell's results are
committed atomically as ``<cells_dir>/<row>/[order-<o>/]seed-<s>.json`` (and with ``commit=True`` to git), a run
skips cells already committed, and :func:`bench_report` rebuilds every table from the committed cells alone.
The learning-rate search (validation split only) runs first and is committed the same way under
``<cells_dir>/lr_search/``; the pre-registered block and the search protocol are fingerprinted into
``<cells_dir>/protocol.json``, which a bench refuses to change once cells exist. Any number of bench processes
(workers) on one study share its cells through per-cell claims (:class:`_Claim`), so each cell runs once; cells run
replicate-major, so a partial study holds complete (order, seed) replicates.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .. import stats
from ..config import MethodSpec, RunConfig, config_fingerprint
from ..errors import CacheError, ConfigError
from ..storage import DirectoryLock, atomic_write_json, atomic_write_text
from .compare import bench_curves, equal_quality
from .metrics import _stat
from .run import _as_config, _log, run, validate
from .state import _finished, _read_state, library_versions, load_results

__all__ = ["bench", "bench_report", "aggregate_bench", "paired_against", "study_rows", "StudyRow"]

logger = logging.getLogger("kappatune")


def _poll_s() -> float:
    """A study worker's poll interval while other workers hold cells (``KAPPATUNE_STUDY_POLL_S``, default 30 s)."""
    return float(os.environ.get("KAPPATUNE_STUDY_POLL_S", "30"))


_BENCH_METRICS = (
    "final_avg_task_ppl", "task_gain_pct", "learning_gain_pct", "bwt_ppl", "avg_forgetting_ppl", "control_ppl_final",
    "control_change_abs", "control_change_pct", "trainable_params", "train_time_s", "sec_per_step", "peak_rss_mb", "peak_gpu_mb",
    "acc", "bwt_acc", "fwt_acc", "avg_forgetting_acc", "acc_norm", "bwt_acc_norm", "em", "bwt_em", "fwt_em", "avg_forgetting_em",
)


# What a cell costs depends on the machine that ran it (a study's cells may come from a 2-core CPU and a GPU):
# these are compared only between cells of the same machine class, never averaged across machines.
COST_KEYS = ("train_time_s", "sec_per_step", "peak_rss_mb", "peak_gpu_mb", "wall_time_s")


def machine_class(res: dict[str, Any]) -> str:
    """The machine class of a cell's ``cell_machine`` record: the accelerator's name, or the CPU model with its torch
    thread count (a CPU cell's time depends on both); ``"unrecorded"`` for cells from before the record existed."""
    m = res.get("cell_machine") or {}
    dev = m.get("device")
    if not dev:
        return "unrecorded"
    if dev != "cpu":
        return str(dev)
    n = m.get("torch_threads")
    return f"CPU {m.get('cpu') or '?'} ({n} thread{'' if n == 1 else 's'})"


def _metric_keys(res: list[dict[str, Any]]) -> list[str]:
    """The fixed bench metrics plus each control probe's change (``probe_<name>_<metric>_change``)."""
    probes = sorted({k for r in res for k in r["metrics"] if k.startswith("probe_") and k.endswith("_change")})
    return list(_BENCH_METRICS) + probes


def paired_against(cells: dict[str, dict[Any, dict[str, Any]]], baseline: str | dict[str, str],
                   keys: Sequence[str] | None = None) -> dict[str, Any]:
    """Every method's per-seed paired differences (method − ``baseline``) of every bench metric, with a 95% interval.

    Seeds share batches, so the seed-matched difference is the honest comparison (:func:`kappatune.stats.paired_difference`).
    ``baseline``: one label for every method, or ``{label: its baseline label}`` (a study pairs each budget's row
    with the reference at the same budget). ``keys``: the metrics (default: every bench metric).
    """
    from ..stats import paired_difference

    pairs = {lab: baseline for lab in cells} if isinstance(baseline, str) else dict(baseline)
    name = baseline if isinstance(baseline, str) else sorted(set(pairs.values()))[0] if pairs else None
    out: dict[str, Any] = {"baseline": name, "baselines": pairs, "confidence": 0.95, "methods": {}}
    for label, by_seed in cells.items():
        base = pairs.get(label)
        if base is None or label == base or base not in cells:
            continue
        ref = cells[base]
        diffs = {}
        for k in (keys or _metric_keys(list(ref.values()))):
            a = {s: r["metrics"].get(k) for s, r in by_seed.items()}
            b = {s: r["metrics"].get(k) for s, r in ref.items()}
            if any(v is not None for v in a.values()) and any(v is not None for v in b.values()):
                diffs[k] = paired_difference(a, b, confidence=0.95)
        out["methods"][label] = diffs
    return out


def aggregate_bench(cells: dict[str, dict[Any, dict[str, Any]]]) -> list[dict[str, Any]]:
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
    compare = dataclasses.replace(compare, contrasts=[x for x in cfg.compare.contrasts if all(p in only for p in x.split(":"))])
    return dataclasses.replace(cfg, method=None, methods=keep, compare=compare)


@dataclass(frozen=True)
class StudyRow:
    """One row of a bench's tables: a method at one budget (``budget`` None: unmatched or the config's one budget)."""

    label: str
    spec: MethodSpec
    budget: int | None
    tagged: bool = False  # the row label carries its budget (several budgets)


def _budget_tag(b: int) -> str:
    """A short, readable budget tag for row labels: 3538944 -> '3.54M'."""
    for digits in (3, 4, 6):
        for scale, unit in ((1e6, "M"), (1e3, "k")):
            if b >= scale:
                return f"{b / scale:.{digits}g}{unit}"
    return str(b)


def study_rows(cfg: RunConfig) -> list[StudyRow]:
    """The bench's rows: every method, once per budget of ``budgets`` when it is budget-matched (``label@3.54M``)."""
    rows = []
    for spec in cfg.method_specs():
        if cfg.budgets and spec.match_budget and spec.budget is None:
            several = len(cfg.budgets) > 1
            rows += [StudyRow(f"{spec.display}@{_budget_tag(b)}" if several else spec.display, spec, b, several)
                     for b in cfg.budgets]
        else:
            rows.append(StudyRow(spec.display, spec, None))
    return rows


def _validation_config(cfg: RunConfig) -> RunConfig:
    """What :func:`validate` checks for a bench: a study's every row at its own budget (one method entry per row)."""
    if not cfg.budgets:
        return cfg
    return dataclasses.replace(cfg, budgets=None, budget=None, method=None, methods=[
        dataclasses.replace(r.spec, label=r.label, budget=r.budget if r.budget is not None else r.spec.budget)
        for r in study_rows(cfg)], compare=dataclasses.replace(cfg.compare, reference=None, baseline=None))


def _is_study(cfg: RunConfig) -> bool:
    return bool(cfg.budgets or cfg.orders or cfg.lr_search or cfg.preregistered or cfg.output.cells_dir)


def _cell_key(order: int, seed: int, n_orders: int) -> Any:
    """A cell's key within its row: the seed, or ``o<order>-s<seed>`` with several orders (pairs match on it)."""
    return seed if n_orders == 1 else f"o{order}-s{seed}"


def _cell_name(row: str, order: int, seed: int, n_orders: int) -> str:
    return f"{row}/seed-{seed}" if n_orders == 1 else f"{row}/order-{order}/seed-{seed}"


def _cell_config(cfg: RunConfig, row: StudyRow, order: list[str] | None, seed: int, lr: float | None,
                 cell_dir: Path) -> RunConfig:
    """The single run a cell executes: the method at the row's budget and chosen lr, on the order's task sequence.
    Without study keys this is exactly :meth:`RunConfig.for_method` (plain benches keep their fingerprints)."""
    spec = row.spec
    if row.budget is not None and cfg.budgets:
        spec = dataclasses.replace(spec, budget=row.budget)
    if lr is not None:
        spec = dataclasses.replace(spec, lr=lr)
    base = cfg
    if order is not None and cfg.orders:
        by = {t.label: t for t in cfg.tasks}
        base = dataclasses.replace(cfg, tasks=[by[x] for x in order])
    return base.for_method(spec, seed, cell_dir)


def _protocol(cfg: RunConfig) -> dict[str, Any]:
    """What a study fixes before it runs: the pre-registered block and the tuning protocol, with their hash."""
    block = {
        "preregistered": dataclasses.asdict(cfg.preregistered) if cfg.preregistered else None,
        "lr_search": dataclasses.asdict(cfg.lr_search) if cfg.lr_search else None,
    }
    if block["lr_search"] is not None and block["lr_search"].get("per") == "row":
        block["lr_search"].pop("per")  # added later: the default keeps earlier studies' fingerprints
    fp = hashlib.sha256(json.dumps(block, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {**block, "fingerprint": fp}


def _check_protocol(cfg: RunConfig, cells_dir: Path, *, write: bool) -> dict[str, Any]:
    """Refuse a changed pre-registered/tuning block once cells are committed; write ``protocol.json`` first."""
    proto = _protocol(cfg)
    path = cells_dir / "protocol.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise CacheError(f"{path} is unreadable or corrupt: {exc}") from None
        if old.get("fingerprint") != proto["fingerprint"]:
            changed = [k for k in ("preregistered", "lr_search") if old.get(k) != proto[k]]
            raise ConfigError(
                f"the study's {' and '.join(changed) or 'protocol'} block differs from the one its committed cells in "
                f"{cells_dir} were run under ({path}); a pre-registered protocol cannot change after the fact: "
                "restore it, or start a new study (another output.cells_dir)")
    elif write:
        if any(cells_dir.rglob("seed-*.json")) or any(cells_dir.rglob("lr-*.json")):
            raise ConfigError(f"{cells_dir} holds committed cells but no protocol.json: they cannot be tied to a "
                              "pre-registered protocol; start a new study (another output.cells_dir)")
        atomic_write_json(path, proto)
    return proto


def _read_cell(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise CacheError(f"committed cell {path} is unreadable or corrupt: {exc}") from None


def _git_commit(paths: Sequence[Path], message: str) -> None:
    """``git add`` + ``git commit`` exactly these files (a failure is logged: the cell is safe on disk anyway)."""
    if not paths:
        return
    cwd = Path(paths[0]).parent
    files = [str(Path(p).resolve()) for p in paths]
    for attempt in range(6):  # several workers commit into one repository: wait out another's index.lock
        try:
            subprocess.run(["git", "add", "--", *files], cwd=cwd, check=True, capture_output=True, text=True)
            subprocess.run(["git", "commit", "-q", "-m", message, "--", *files], cwd=cwd, check=True, capture_output=True, text=True)
            return
        except (OSError, subprocess.CalledProcessError) as exc:
            err = getattr(exc, "stderr", "") or str(exc)
            if "index.lock" in err and attempt < 5:
                time.sleep(1.0 + attempt)
                continue
            logger.warning("could not git-commit %s: %s", ", ".join(files), err.strip().splitlines()[-1] if err.strip() else exc)
            return


def _code_fingerprint() -> str:
    """A hash of kappatune's own source files: a study's validation marker holds only for the code it ran on."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _machine() -> dict[str, Any]:
    """Where a cell ran (provenance: a study's cells may come from several machines): the accelerator's name, or
    the CPU's, and the number of CPU threads torch used."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"device": gpu or "cpu", "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


class _Claim(DirectoryLock):
    """A worker's exclusive claim on one cell of a study, so that several ``kappatune bench`` processes on the same
    config share the work (each cell runs once) without any coordinator.

    A :class:`~kappatune.storage.DirectoryLock` on ``<bench output dir>/.claims/<cell>.lock`` (beside the run
    directories, which ``run`` locks itself): the kernel drops it when the holder exits, however it exits, so a
    killed worker's cell is simply claimed (and resumed from its run directory) by the next pass of any worker.
    Without ``fcntl`` (Windows) every claim succeeds: run one worker there.
    """

    def __init__(self, out: Path, name: str):
        super().__init__(out / name, what="cell", lock_file=out / ".claims" / (name.replace("/", "__") + ".lock"))

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Wait for the claim (blocking), hold it for the ``with`` block."""
        self.acquire(blocking=True)
        try:
            yield
        finally:
            self.release()


class _Cells:
    """Runs (or reads back) the cells of a bench: committed JSON first, then the run directory, then training."""

    def __init__(self, cfg: RunConfig, out: Path, *, force: bool, progress: bool, talk: bool, commit: bool,
                 report_only: bool, protocol: dict[str, Any] | None, deadline: float | None = None):
        self.cfg, self.out, self.force, self.progress, self.talk = cfg, out, force, progress, talk
        self.deadline = deadline  # time.time() after which no new cell starts (``stop_after``)
        self.stopped = False  # a cell was left for a later run because the deadline had passed
        self.cells_dir = Path(cfg.output.cells_dir) if cfg.output.cells_dir else None
        self.commit, self.report_only, self.protocol = commit, report_only, protocol
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self.missing: list[str] = []
        self.busy: list[str] = []  # cells another worker is running right now (claimed)
        self.validated = False
        self._tokenizer_fp: str | None = None
        self.tokenizer_fps: dict[str, str] = {}  # tokenizer fingerprint -> the first committed cell that has it

    def tokenizer_fp(self) -> str:
        """This machine's tokenizer fingerprint for the study's model (loaded once, only when a cell runs)."""
        if self._tokenizer_fp is None:
            from ..data import get_tokenizer, tokenizer_fingerprint

            self._tokenizer_fp = tokenizer_fingerprint(get_tokenizer(self.cfg.model))
        return self._tokenizer_fp

    def _check_tokenizer(self, name: str, committed: dict[str, Any]) -> None:
        """Refuse to mix cells whose tokenizers behave differently (an end token changed by a library version
        trains another target); cells from before the fingerprint was recorded are not checked."""
        fp = committed.get("tokenizer_fingerprint")
        if fp is None:
            return
        first = self.tokenizer_fps.setdefault(fp, name)
        other = next((c for f, c in self.tokenizer_fps.items() if f != fp), None)
        if other is not None:
            raise ConfigError(
                f"committed cells {other} and {first} were tokenized differently (tokenizer fingerprints "
                f"{next(f for f in self.tokenizer_fps if f != fp)} and {fp}): another transformers/tokenizers version "
                "converted the tokenizer with other special tokens, so they trained on other ids; move the cells of "
                "one kind out of the cells directory (see cell['libraries'] for the versions)")

    def status(self, name: str, cell_cfg: RunConfig) -> tuple[dict[str, Any] | None, dict[str, Any] | None, bool]:
        """(committed results or None, run-directory state or None, run directory complete?)."""
        fp = config_fingerprint(cell_cfg)
        committed = _read_cell(self.cells_dir / f"{name}.json") if self.cells_dir else None
        if committed is not None:
            if committed.get("config_fingerprint") != fp:
                raise ConfigError(
                    f"committed cell {self.cells_dir / (name + '.json')} was run with another config (fingerprint "
                    f"{committed.get('config_fingerprint')}, this config gives {fp}); restore the config, or remove "
                    "the cell to run it again")
            if self.protocol and committed.get("protocol_fingerprint") != self.protocol["fingerprint"]:
                raise ConfigError(f"committed cell {name} was run under another pre-registered protocol")
            self._check_tokenizer(name, committed)
            return committed, None, True
        if self.report_only:
            return None, None, False
        cell_dir = Path(cell_cfg.output_dir or "")
        st = _read_state(cell_dir)
        done = st is not None and st.get("config_fingerprint") == fp and _finished(cell_dir, st)
        return None, st, done

    def get(self, name: str, cell_cfg: RunConfig, base_cache: Path, validate_first: Callable[[], None]) -> dict[str, Any] | None:
        committed, st, done = self.status(name, cell_cfg)
        if committed is not None:
            self.skipped.append(name)
            return committed
        if self.report_only:
            self.missing.append(name)
            return None
        if self.tokenizer_fps and self.tokenizer_fp() not in self.tokenizer_fps:
            have = next(iter(self.tokenizer_fps.values()))
            raise ConfigError(
                f"this machine's tokenizer for {self.cfg.model} behaves differently from the one the committed cells "
                f"used (fingerprint {self.tokenizer_fp()}, cell {have} has {next(iter(self.tokenizer_fps))}): its "
                "cells would train on other ids; use the same transformers/tokenizers versions as the committed cells "
                "(cell['libraries'])")
        if self.deadline is not None and time.time() >= self.deadline and not done:
            self.missing.append(name)
            self.stopped = True
            return None
        claim = _Claim(self.out, name)
        # Under a launcher every rank runs every cell together: only single-process benches share cells by claims.
        if self.cells_dir is not None and os.environ.get("WORLD_SIZE", "1") == "1":
            if not claim.acquire():
                self.busy.append(name)
                return None
            committed, st, done = self.status(name, cell_cfg)  # another worker may have finished it meanwhile
            if committed is not None:
                claim.release()
                self.skipped.append(name)
                return committed
        try:
            return self._run(name, cell_cfg, st, done, base_cache, validate_first)
        finally:
            claim.release()

    def _run(self, name: str, cell_cfg: RunConfig, st: dict[str, Any] | None, done: bool, base_cache: Path,
             validate_first: Callable[[], None]) -> dict[str, Any]:
        cell_dir = Path(cell_cfg.output_dir or "")
        cpu = wall = None
        resumed = False
        if done:
            res = load_results(cell_dir)
            self.skipped.append(name)
        else:
            if not self.validated:
                validate_first()
                self.validated = True
            _log(self.talk, f"== {name} -> {cell_dir}")
            c0, w0 = time.process_time(), time.perf_counter()
            res = run(cell_cfg, resume=st is not None, force=self.force, progress=self.progress, base_eval_cache=base_cache)
            resumed = st is not None
            # a resumed cell's earlier part ran in a process that was killed: its time is unknown, so the cell is
            # recorded as untimed (the report counts timed cells) rather than with the resumed part alone
            if not resumed:
                cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            self.ran.append(name)
        if self.cells_dir is not None and os.environ.get("RANK", "0") == "0":
            res = {**res, "cell": name, "cell_cpu_time_s": cpu, "cell_wall_time_s": wall, "cell_machine": None if done else _machine(),
                   "cell_resumed": resumed,
                   "tokenizer_fingerprint": self.tokenizer_fp(),
                   "protocol_fingerprint": self.protocol["fingerprint"] if self.protocol else None}
            path = self.cells_dir / f"{name}.json"
            atomic_write_json(path, res)
            if self.commit:
                extra = [p for p in (self.cells_dir / "protocol.json", self.cells_dir / "validated.json") if p.is_file()]
                _git_commit([*extra, path] if self.protocol else [path],
                            f"{self.cfg.name}: cell {name}")
        return res


def _lr_trial_config(cfg: RunConfig, row: StudyRow, lr: float, seed: int, out: Path) -> RunConfig:
    """One learning-rate trial: the row's method alone on the search task, scored on its validation split."""
    ls = cfg.lr_search
    assert ls is not None
    labels = [t.label for t in cfg.tasks]
    task_label = cfg.task_orders()[0][0] if ls.task == "first" else ls.task
    task = cfg.tasks[labels.index(task_label)]
    steps = ls.steps or cfg.steps_per_stage()
    training = dataclasses.replace(cfg.training, steps=steps, tokens=None,
                                   warmup_steps=min(cfg.training.warmup_steps, max(0, steps - 1)))
    ev = dataclasses.replace(cfg.eval, split="validation", curve_every=0, curve_stages=None, early_stopping=0)
    metrics = task.metrics if task.metrics else [ls.metric]
    if ls.metric not in metrics:
        metrics = list(metrics) + [ls.metric]
    trial = dataclasses.replace(cfg, tasks=[dataclasses.replace(task, metrics=metrics)], control=None,
                                training=training, eval=ev, orders=None)
    return _cell_config(trial, row, None, seed, lr, out)


def _lr_search(cfg: RunConfig, rows: list[StudyRow], cells: _Cells, out: Path, validate_first: Callable[[], None]) -> dict[str, Any]:
    """Every searched row's trials (the same factors for every method) and the lr each row's real cells use.

    ``lr_search.per: method`` searches each method once, on its first row (its first budget); its other rows reuse
    that lr (``searched_on`` names the row whose trials set it)."""
    ls = cfg.lr_search
    assert ls is not None
    seed = ls.seed if ls.seed is not None else cfg.seed_list()[0]
    task = cfg.task_orders()[0][0] if ls.task == "first" else ls.task
    found: dict[str, Any] = {}
    searched: dict[str, str] = {}  # method label -> the row its search ran on (per: method)
    for row in rows:
        if ls.per == "method" and row.spec.display in searched:
            first = found[searched[row.spec.display]]
            found[row.label] = {**first, "searched_on": searched[row.spec.display]}
            continue
        searched[row.spec.display] = row.label
        base_lr = row.spec.lr if row.spec.lr is not None else cfg.training.lr
        trials = []
        for f in ls.factors:
            lr = float(f"{base_lr * f:.6g}")
            name = f"lr_search/{row.label}/lr-{lr:g}"
            tcfg = _lr_trial_config(cfg, row, lr, seed, out / name)
            res = cells.get(name, tcfg, out / "lr_search" / "base_eval.json", validate_first)
            value = None
            if res is not None:
                stage = res["stages"][-1]
                value = (stage.get("task_metrics") or {}).get(task, {}).get(ls.metric)
            trials.append({"factor": f, "lr": lr, "value": value, "cell": name,
                           "cpu_time_s": res.get("cell_cpu_time_s") if res is not None else None,
                           "machine": machine_class(res) if res is not None else None})
        scored = [t for t in trials if t["value"] is not None]
        chosen = min(scored, key=lambda t: (-t["value"], t["lr"])) if len(scored) == len(trials) else None
        found[row.label] = {"trials": trials, "chosen_lr": chosen["lr"] if chosen else None,
                            "chosen_factor": chosen["factor"] if chosen else None, "base_lr": base_lr}
    return {"task": task, "split": "validation", "metric": ls.metric, "seed": seed,
            "steps": ls.steps or cfg.steps_per_stage(), "factors": list(ls.factors), "rows": found}


def _reference_pairs(rows: list[StudyRow], reference: str) -> dict[str, str]:
    """Each row's partner of ``reference`` (a method label): the reference's row at the same budget, else its
    only (or first) row."""
    ref_rows = [r for r in rows if r.spec.display == reference]
    if not ref_rows:
        return {}
    by_budget = {r.budget: r.label for r in ref_rows}
    return {r.label: by_budget.get(r.budget, ref_rows[0].label) for r in rows}


def _expand_primary(primary: Sequence[str], keys: Sequence[str]) -> list[str]:
    out: list[str] = []
    for p in primary:
        if p == "control_suite":
            out += [k for k in keys if k.startswith("probe_") and k.endswith("_change")]
        else:
            out.append(p)
    return list(dict.fromkeys(out))


def _study(cfg: RunConfig, *, force: bool, progress: bool, talk: bool, main: bool, commit: bool,
           report_only: bool, validate_first: Callable[[], None], deadline: float | None = None) -> dict[str, Any]:
    """Run (or, ``report_only``, read back) every cell of a study and summarise them (see :func:`bench`)."""
    out = cfg.out_dir()
    rows = study_rows(cfg)
    orders = cfg.task_orders()
    seeds = cfg.seed_list()
    cells_dir = Path(cfg.output.cells_dir) if cfg.output.cells_dir else None
    protocol = None
    if cells_dir is not None:
        if report_only and not cells_dir.is_dir():
            raise ConfigError(f"--report: no committed cells at {cells_dir} (output.cells_dir)")
        protocol = _check_protocol(cfg, cells_dir, write=main and not report_only)
    elif report_only:
        raise ConfigError("--report rebuilds the tables from committed cells: set output.cells_dir in the config")
    cells = _Cells(cfg, out, force=force, progress=progress, talk=talk, commit=commit, report_only=report_only,
                   protocol=protocol, deadline=deadline)
    lr = _lr_search(cfg, rows, cells, out, validate_first) if cfg.lr_search else None
    found: dict[tuple[str, int, int], dict[str, Any]] = {}
    n_orders = len(orders) if cfg.orders else 1
    # Replicate-major: every row's cell of (order 0, seed 0), then of the next replicate, so a study stopped part
    # way holds complete replicates, i.e. paired comparisons across all rows, rather than some rows complete.
    for o in range(n_orders):
        for seed in seeds:
            for row in rows:
                name = _cell_name(row.label, o, seed, n_orders)
                chosen = lr["rows"][row.label]["chosen_lr"] if lr else None
                if lr and chosen is None:  # its trials are not all committed yet: the cell cannot be named
                    cells.missing.append(name)
                    continue
                ccfg = _cell_config(cfg, row, orders[o] if cfg.orders else None, seed, chosen, out / name)
                res = cells.get(name, ccfg, out / "base_eval.json", validate_first)
                if res is not None:
                    res["_dir"] = name
                    found[row.label, o, seed] = res
    results: dict[str, dict[Any, dict[str, Any]]] = {}
    for row in rows:  # tables in row order, cells within a row in (order, seed) order
        for o in range(n_orders):
            for seed in seeds:
                if (row.label, o, seed) in found:
                    results.setdefault(row.label, {})[_cell_key(o, seed, n_orders)] = found[row.label, o, seed]
    return {"rows": rows, "cells": results, "lr_search": lr, "ran": cells.ran, "skipped": cells.skipped,
            "missing": cells.missing, "busy": cells.busy, "protocol": protocol, "stopped": cells.stopped}


def bench(
    config: RunConfig | str | os.PathLike | dict,
    *,
    force: bool = False,
    progress: bool | None = None,
    overrides: Sequence[str] = (),
    only: Sequence[str] | None = None,
    commit: bool = False,
    report: bool = False,
    stop_after: float | None = None,
) -> dict[str, Any]:
    """Run every method × seed of the config (each cell resumable, finished cells skipped) and compare them.

    Writes ``bench.json``, ``bench.md`` and ``pareto.png`` to the output directory; cell ``<label>/seed-<s>/``
    holds each run. All methods are validated (and budget-matched) before the first cell trains. Under a launcher
    (DDP/FSDP) every process runs the cells; only rank 0 prints and writes the bench reports.
    ``only``: method labels to run (the others are left out of this bench and its report), e.g. to re-run one
    method of a published study; a cell's results do not depend on which other methods the config lists.

    A study (``budgets``, ``orders``, ``lr_search``, ``preregistered``, ``output.cells_dir``; module docstring)
    has one cell per (method, budget, order, seed), runs the learning-rate search first, commits every finished
    cell to ``output.cells_dir`` (``commit=True``: also ``git commit`` each one as it lands) and writes
    ``study.md`` / ``study.json`` next to the cells directory. ``report=True`` trains nothing: it is
    :func:`bench_report`.

    ``stop_after`` (seconds): a study worker starts no new cell or LR trial after this long; the ones in progress
    finish and are committed, then it writes the report and returns. For time-limited machines (a session's end,
    a lent GPU): ending the process instead loses the cells in progress.
    """
    from .. import reporting

    full_cfg = _as_config(config, overrides)
    cfg = _select_only(full_cfg, only)
    progress = cfg.progress if progress is None else progress
    # Under a launcher every process runs the bench (the cells' training is collective); one prints and writes.
    main = os.environ.get("RANK", "0") == "0"
    talk = progress and main
    specs, seeds = cfg.method_specs(), cfg.seed_list()
    out = cfg.out_dir()
    t0 = time.perf_counter()
    if stop_after is not None and not stop_after > 0:
        raise ConfigError(f"stop_after must be a positive number of seconds, got {stop_after!r}")
    deadline = time.time() + stop_after if stop_after is not None else None

    validated: list[bool] = []

    def validate_first() -> None:  # once per bench, however many passes a study worker makes
        if validated:
            return
        validated.append(True)
        if _is_study(cfg) and cfg.output.cells_dir:
            # Study workers validate once per config between them (the budget matching of every row can take many
            # minutes: OSF decomposes every layer): the first holds a lock while it validates and leaves a marker
            # named by the config's fingerprint; the others wait for it and skip.
            # The marker sits beside the committed cells, so a later session on the same config and the same
            # kappatune code starts training at once. It is always the whole study's: a worker restricted with
            # ``only`` accepts it (validating every row covers its rows) and, when it has to validate its own rows,
            # leaves it alone (a marker for some rows would make the next full worker validate all of them again).
            with _Claim(out, "validate").hold():
                marker = Path(cfg.output.cells_dir) / "validated.json"
                code = _code_fingerprint()
                want = [{"config_fingerprint": config_fingerprint(_validation_config(c)), "code_fingerprint": code}
                        for c in ((full_cfg, cfg) if only else (cfg,))]
                try:
                    seen = json.loads(marker.read_text("utf-8")) if marker.is_file() else None
                except (OSError, ValueError):
                    seen = None
                if seen is not None and any(all(seen.get(k) == v for k, v in w.items()) for w in want):
                    _log(talk, f"bench {cfg.name}: this config was validated with this code already ({marker})")
                    return
                _validate()
                if not only:
                    atomic_write_json(marker, want[0])
            return
        _validate()

    def _validate() -> None:
        trainable = validate(_validation_config(cfg), progress=progress)
        _log(talk, f"bench {cfg.name}: {len(specs)} methods x {len(seeds)} seeds validated; trainable params: "
             + ", ".join(f"{k} {v:,}" for k, v in trainable.items() if v is not None))

    if deadline is not None and not _is_study(cfg):
        raise ConfigError("stop_after is for study workers (a config with output.cells_dir, budgets, orders or lr_search)")
    if _is_study(cfg) or report:
        st = _study(cfg, force=force, progress=progress, talk=talk, main=main, commit=commit, report_only=report,
                    validate_first=validate_first, deadline=deadline)
        ran = list(st["ran"])
        # Other workers hold some cells: wait for them (their results may unblock rows still in their LR search),
        # then take whatever is left, until nothing is held elsewhere.
        while st.get("busy") and not (deadline is not None and time.time() >= deadline):
            _log(talk, f"bench {cfg.name}: {len(st['busy'])} cell(s) running in another worker "
                       f"({', '.join(st['busy'][:3])}{' …' if len(st['busy']) > 3 else ''}); waiting")
            time.sleep(_poll_s())
            st = _study(cfg, force=force, progress=progress, talk=talk, main=main, commit=commit, report_only=report,
                        validate_first=validate_first, deadline=deadline)
            ran += st["ran"]
        st["ran"] = ran
        if st.get("stopped") or (deadline is not None and st.get("busy") and time.time() >= deadline):
            _log(talk, f"bench {cfg.name}: stop_after reached: no new cell started; {len(st['missing'])} cell(s) "
                       "left for a later run")
        cells, rows = st["cells"], st["rows"]
        if not cells and not (st.get("lr_search") and any(t["value"] is not None for r in st["lr_search"]["rows"].values()
                                                          for t in r["trials"])):
            raise ConfigError(f"bench {cfg.name}: no finished cell to report" + (f" ({len(st['missing'])} missing)" if st["missing"] else ""))
    else:
        # Each cell: (directory, its run config, its state or None, complete with this config?), read once.
        cell_status = {}
        for spec in specs:
            for seed in seeds:
                cell_dir = out / spec.display / f"seed-{seed}"
                cell_cfg = cfg.for_method(spec, seed, cell_dir)
                sta = _read_state(cell_dir)
                done = sta is not None and sta.get("config_fingerprint") == config_fingerprint(cell_cfg) and _finished(cell_dir, sta)
                cell_status[spec.display, seed] = (cell_dir, cell_cfg, sta, done)

        if all(done for *_, done in cell_status.values()):
            # Nothing will train: re-aggregating (e.g. another `compare` view) needs no model, data or budget check.
            _log(talk, f"bench {cfg.name}: all {len(specs) * len(seeds)} cells are complete; re-aggregating")
        else:
            validate_first()
        cells = {}
        ran, skipped = [], []
        for spec in specs:
            for seed in seeds:
                cell_dir, cell_cfg, sta, done = cell_status[spec.display, seed]
                if done:
                    res = load_results(cell_dir)
                    skipped.append(f"{spec.display}/seed-{seed}")
                else:
                    _log(talk, f"== {spec.display} seed {seed} -> {cell_dir}")
                    res = run(cell_cfg, resume=sta is not None, force=force, progress=progress,
                              base_eval_cache=out / "base_eval.json")
                    ran.append(f"{spec.display}/seed-{seed}")
                res["_dir"] = str(cell_dir)
                cells.setdefault(spec.display, {})[seed] = res
        st = {"ran": ran, "skipped": skipped}
        rows = None
    agg = aggregate_bench(cells)
    # (a study still in its LR search has trials but no cell yet: its report shows the protocol and the search)
    first = next(iter(next(iter(cells.values())).values())) if cells else {
        "tasks": [t.label for t in cfg.tasks], "control": [c.label for c in cfg.control_suite()]}
    summary = {
        "kappatune_bench": 1,
        "name": cfg.name, "model": cfg.model, "tasks": first["tasks"], "control": first["control"],
        "steps_per_stage": cfg.steps_per_stage(), "seeds": seeds, "budget": cfg.budget,
        "config": cfg.to_dict(), "config_fingerprint": config_fingerprint(cfg), "libraries": library_versions(),
        "methods": agg, "ran": st["ran"], "skipped": st["skipped"], "wall_time_s": time.perf_counter() - t0, "plots": [],
    }
    if cfg.compare.baseline is not None and cfg.compare.baseline in cells:
        summary["paired"] = paired_against(cells, cfg.compare.baseline)
    if cfg.compare.reference is not None and cfg.compare.reference in cells:
        summary["equal_quality"] = equal_quality(cells, cfg.compare.reference, cfg.compare.stage, cfg.compare.step)
    if rows is not None:
        summary["study"] = _study_summary(cfg, rows, cells, st)
    if not main:
        return summary
    if cfg.output.plots and not report:
        reporting.plot_pareto(summary, out / "pareto.png")
        summary["plots"] = ["pareto.png"]
        if cfg.eval.curve_every > 0:
            summary["curves"] = bench_curves(cells, cfg.compare.stage)
            reporting.plot_learning_curves(summary, out / "curves.png")
            summary["plots"].append("curves.png")
    if not report:
        atomic_write_text(out / "bench.md", reporting.bench_markdown(summary))
        atomic_write_json(out / "bench.json", summary)
    if rows is not None and cfg.output.cells_dir:
        where = Path(cfg.output.cells_dir).parent
        if cfg.output.plots and cells:  # (no plot while the study is still in its LR search)
            reporting.plot_pareto(summary, where / "pareto.png")
            summary["study"]["plot"] = {"file": "pareto.png", "panels": reporting.pareto_panels(summary)}
        atomic_write_text(where / "study.md", reporting.study_markdown(summary))
        atomic_write_json(where / "study.json", _stable(summary))
    _log(talk, reporting.bench_table(summary))
    return summary


def _stable(summary: dict[str, Any]) -> dict[str, Any]:
    """The parts of a study summary that depend only on the committed cells (what ``--report`` rebuilds)."""
    drop = ("ran", "skipped", "wall_time_s", "plots", "curves", "libraries")
    out = {k: v for k, v in summary.items() if k not in drop}
    out["methods"] = [{k: v for k, v in m.items() if k != "dirs"} for m in summary["methods"]]
    return out


def _holm_over_primary(paired: dict[str, Any], primary: Sequence[str], alpha: float = 0.05) -> dict[str, Any]:
    """Holm's correction over the whole primary family: every (row, reference, primary metric) paired test, a pair
    that appears under both references (lora − full and full − lora) counted once. Sets ``p_holm`` and
    ``significant_holm`` on each primary difference in ``paired`` (in place) and returns the family's size.

    Dozens of primary tests at 95% each would let a few "significant" differences appear by chance; the report
    shows each interval's own verdict and, beside it, whether it holds for the family at ``alpha``."""
    tests: dict[tuple[frozenset[str], str], float] = {}
    where: dict[tuple[frozenset[str], str], list[dict[str, Any]]] = collections.defaultdict(list)
    for pr in paired.values():
        for label, diffs in pr["methods"].items():
            for k in primary:
                d = diffs.get(k)
                if not d or d.get("n", 0) < 2:
                    continue
                key = (frozenset((label, pr["baselines"][label])), k)
                where[key].append(d)
                # identical non-zero differences in every pair: certain sign, no t statistic; p taken as 0
                tests[key] = d["p"] if d.get("p") is not None else (0.0 if d.get("significant") else 1.0)
    adjusted = stats.holm_adjust(tests)
    for key, p in adjusted.items():
        for d in where[key]:
            d["p_holm"], d["significant_holm"] = p, bool(d.get("significant")) and p < alpha
    return {"method": "holm", "alpha": alpha, "tests": len(tests),
            "significant": sum(bool(where[k][0]["significant_holm"]) for k in adjusted)}


def _contrasts(cfg: RunConfig, rows: list[StudyRow], cells: dict[str, dict[Any, dict[str, Any]]],
               keys: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``compare.contrasts`` ("ROW:CONTROL"): each row of method ROW paired (per order and seed) with CONTROL's row at
    the same budget, on ``keys``, and Holm's correction over these contrasts alone: a family of its own, kept
    apart from the pre-registered one (whose tests and corrections it leaves unchanged)."""
    out: dict[str, Any] = {}
    for x in cfg.compare.contrasts:
        row, control = x.split(":")
        mine = {r.label for r in rows if r.spec.display == row}
        pairs = {lab: ctl for lab, ctl in _reference_pairs(rows, control).items() if lab in mine}
        out[x] = paired_against(cells, pairs, keys)
    return out, (_holm_over_primary(out, keys) if out else None)


def _study_summary(cfg: RunConfig, rows: list[StudyRow], cells: dict[str, dict[Any, dict[str, Any]]],
                   st: dict[str, Any]) -> dict[str, Any]:
    """The study's own view: protocol, LR search, pre-registered comparisons, exploratory pairs, cells and time."""
    pr = cfg.preregistered
    refs = list(pr.reference) if pr else ([cfg.compare.baseline] if cfg.compare.baseline else [])
    any_res = [r for by in cells.values() for r in by.values()]
    keys = _metric_keys(any_res)
    primary = _expand_primary(pr.primary, keys) if pr else []
    quality_keys = [k for k in keys if k not in COST_KEYS]
    paired = {ref: paired_against(cells, _reference_pairs(rows, ref), quality_keys) for ref in refs}
    family = _holm_over_primary(paired, primary)
    contrasts, contrast_family = _contrasts(cfg, rows, cells, primary or quality_keys)
    # Cost per machine class: means over that machine's cells, pairs only between cells that ran on the same one.
    by_machine: dict[str, dict[str, dict[Any, dict[str, Any]]]] = {}
    for label, by in cells.items():
        for key, res in by.items():
            by_machine.setdefault(machine_class(res), {}).setdefault(label, {})[key] = res
    cost = {mc: {"cells": sum(len(v) for v in sub.values()),
                 "rows": {label: {"cells": len(by), **{k: _stat([r["metrics"].get(k) for r in by.values()]) for k in COST_KEYS}}
                          for label, by in sub.items()},
                 "paired": {ref: paired_against(sub, _reference_pairs(rows, ref), COST_KEYS) for ref in refs}}
            for mc, sub in sorted(by_machine.items())}
    target = None
    if pr and pr.target is not None:
        t = pr.target
        ref_rows = [r.label for r in rows if r.spec.display == t.reference and r.label in cells]
        if ref_rows:
            step = round(t.fraction * cfg.steps_per_stage())
            target = equal_quality(cells, ref_rows[0], t.stage, step, t.metric)
    cpu = [r.get("cell_cpu_time_s") for r in any_res]
    lr = st.get("lr_search")
    trials = [t for row in (lr["rows"].values() if lr else ()) if "searched_on" not in row for t in row["trials"]]
    trial_cpu = [t.get("cpu_time_s") for t in trials]
    compute: dict[str, dict[str, float]] = collections.defaultdict(
        lambda: {"cells": 0, "cells_timed": 0, "cells_cpu_s": 0.0, "cells_wall_s": 0.0, "trials": 0, "trials_cpu_s": 0.0})
    for r in any_res:
        c = compute[machine_class(r)]
        c["cells"] += 1
        c["cells_timed"] += r.get("cell_cpu_time_s") is not None  # a resumed cell is untimed (its killed part is unknown)
        c["cells_cpu_s"] += r.get("cell_cpu_time_s") or 0.0
        c["cells_wall_s"] += (r["metrics"].get("wall_time_s") or 0.0) + (r.get("setup_time_s") or 0.0)
    for t in trials:
        if t.get("value") is None:
            continue
        c = compute[t.get("machine") or "unrecorded"]
        c["trials"] += 1
        c["trials_cpu_s"] += t.get("cpu_time_s") or 0.0
    expected = len(rows) * len(cfg.task_orders() if cfg.orders else [0]) * len(cfg.seed_list())
    return {
        "protocol": st.get("protocol"),
        "rows": [{"label": r.label, "method": r.spec.display, "budget": r.budget} for r in rows],
        "orders": cfg.task_orders(),
        "lr_search": st.get("lr_search"),
        "primary_metrics": primary,
        "references": refs,
        "paired": paired,
        "multiplicity": family,
        "contrasts": contrasts,
        "contrast_multiplicity": contrast_family,
        "target": target,
        "cells": {"expected": expected, "present": sum(len(v) for v in cells.values()), "missing": st.get("missing", [])},
        "cpu_time_s": {"cells": sum(c for c in cpu if c is not None), "cells_timed": sum(c is not None for c in cpu),
                       "lr_search": sum(c for c in trial_cpu if c is not None),
                       "lr_search_timed": sum(c is not None for c in trial_cpu), "lr_search_trials": len(trial_cpu)},
        "accuracy_matrix": _accuracy_matrix_summary(cfg, cells),
        "cost_by_machine": cost,
        "compute_by_machine": dict(sorted(compute.items())),
        "wall_time_s_recorded": sum((r["metrics"].get("wall_time_s") or 0.0) + (r.get("setup_time_s") or 0.0) for r in any_res),
    }


def _accuracy_matrix_summary(cfg: RunConfig, cells: dict[str, dict[Any, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per task order, per row, per task (in training order): its accuracy before training, right after it was
    learned and at the end (mean ± std over seeds, in points): the accuracy matrix that ACC, BWT and FWT summarise."""
    orders = [list(o) for o in cfg.task_orders()]
    out = []
    for order in orders:
        rows: dict[str, dict[str, dict[str, Any]]] = {}
        for label, by in cells.items():
            runs = [r for r in by.values() if list(r.get("tasks") or []) == order and (r.get("matrix") or {}).get("accuracy")]
            if not runs:
                continue
            per_task = {}
            for j, task in enumerate(order):
                pick = {"base": lambda a, j=j: a[0][j], "learned": lambda a, j=j: a[j + 1][j], "final": lambda a, j=j: a[-1][j]}
                per_task[task] = {k: _stat([100.0 * f(r["matrix"]["accuracy"]) for r in runs if f(r["matrix"]["accuracy"]) is not None])
                                  for k, f in pick.items()}
            rows[label] = {"cells": len(runs), "tasks": per_task}
        out.append({"order": order, "rows": rows})
    return out


def bench_report(config: RunConfig | str | os.PathLike | dict, *, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The study's tables rebuilt from the committed cells in ``output.cells_dir`` alone: no model, no data, no
    training. Writes ``study.md`` / ``study.json`` (and ``pareto.png``) next to the cells directory; cells not yet
    committed are listed as missing."""
    return bench(config, overrides=overrides, report=True, progress=False)


def rerun_cell(config: RunConfig | str | os.PathLike | dict, cell: str, output_dir: str | os.PathLike, *,
               overrides: Sequence[str] = (), progress: bool | None = None, force: bool = False) -> dict[str, Any]:
    """Re-run one committed cell of a study (``<row>/order-<o>/seed-<s>`` or an LR trial) and compare it with the
    committed result: the reproducibility check of a published row.

    The cell runs from the config it recorded (refused if that config no longer gives its recorded fingerprint),
    in ``output_dir/<cell>``, never touching the committed cells. Every quality metric is listed committed vs
    re-run with the difference, next to the seed-to-seed std of the cell's row (its other committed cells): a
    difference well inside that std reproduces the row. Time and memory are left out (they depend on the machine;
    both machines are named). Writes ``rerun.json`` and ``rerun.md`` in ``output_dir/<cell>``.
    """
    from .. import reporting
    from ..config import config_from_dict

    cfg = _as_config(config, overrides)
    if not cfg.output.cells_dir:
        raise ConfigError("rerun re-runs a committed cell of a study: the config sets no output.cells_dir")
    cells_dir = Path(cfg.output.cells_dir)
    cell = str(cell).strip().strip("/").removesuffix(".json")
    path = cells_dir / f"{cell}.json"
    committed = _read_cell(path)
    if committed is None or "config" not in committed:
        some = sorted(str(p.relative_to(cells_dir).with_suffix("")) for p in cells_dir.rglob("seed-*.json"))[:4]
        raise ConfigError(f"rerun: no committed cell {cell!r} in {cells_dir}"
                          + (f" (committed cells look like: {', '.join(some)})" if some else " (it holds no cell yet)"))
    ccfg = config_from_dict(committed["config"])
    if config_fingerprint(ccfg) != committed.get("config_fingerprint"):
        raise ConfigError(f"committed cell {path}: its recorded config no longer gives its recorded fingerprint "
                          f"({config_fingerprint(ccfg)} vs {committed.get('config_fingerprint')}), so this code cannot "
                          "re-run it faithfully")
    from ..data import get_tokenizer, tokenizer_fingerprint

    tok_fp = tokenizer_fingerprint(get_tokenizer(ccfg.model))
    if committed.get("tokenizer_fingerprint") not in (None, tok_fp):
        raise ConfigError(f"committed cell {cell} was tokenized differently from this machine (tokenizer fingerprint "
                          f"{committed['tokenizer_fingerprint']}, here {tok_fp}): a re-run here would train on other "
                          "ids; use the library versions in the cell's 'libraries'")
    out = Path(output_dir) / cell
    ccfg = dataclasses.replace(ccfg, output_dir=str(out), output=dataclasses.replace(ccfg.output, cells_dir=None))
    c0, w0 = time.process_time(), time.perf_counter()
    res = run(ccfg, resume=_read_state(out) is not None, force=force, progress=progress,
              base_eval_cache=Path(output_dir) / "base_eval.json")
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0

    row = cell.split("/order-")[0].split("/seed-")[0]
    # the row's committed cells give its seed-to-seed spread (an LR trial has no replicates: no spread)
    siblings = [] if cell.startswith("lr_search/") else [
        r for p in sorted((cells_dir / row).rglob("seed-*.json")) if (r := _read_cell(p)) is not None]
    keys = [k for k in _metric_keys([committed, res]) if k not in COST_KEYS and k != "trainable_params"]
    metrics = {}
    for k in keys:
        a, b = committed["metrics"].get(k), res["metrics"].get(k)
        if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
            continue
        spread = _stat([s["metrics"].get(k) for s in siblings])
        metrics[k] = {"committed": a, "rerun": b, "difference": b - a, "row_std": spread["std"], "row_cells": spread["n"]}
    summary = {"cell": cell, "committed_machine": machine_class(committed), "rerun_machine": machine_class({"cell_machine": _machine()}),
               "config_fingerprint": committed["config_fingerprint"], "tokenizer_fingerprint": tok_fp, "rerun_cpu_time_s": cpu, "rerun_wall_time_s": wall,
               "metrics": metrics, "output_dir": str(out)}
    rows = [[reporting.metric_label(k)[0], reporting.fmt(m["committed"]), reporting.fmt(m["rerun"]),
             reporting.fmt(m["difference"]), reporting.fmt(m["row_std"]), m["row_cells"]] for k, m in metrics.items()]
    md = "\n".join([f"# Re-run of `{cell}`", "",
                    f"- committed on: {summary['committed_machine']}; re-run on: {summary['rerun_machine']} "
                    f"({reporting.fmt(wall / 60.0)} min wall, {reporting.fmt(cpu / 60.0)} min CPU)",
                    f"- config fingerprint `{summary['config_fingerprint']}` (the cell's recorded config)", "",
                    reporting._md(rows, ["metric", "committed", "re-run", "difference", "row's seed-to-seed std", "row cells"]), ""])
    atomic_write_json(out / "rerun.json", summary)
    atomic_write_text(out / "rerun.md", md)
    summary["markdown"] = md
    return summary
