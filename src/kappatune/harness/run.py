"""One continual-learning run: :func:`validate` (everything checkable before training), :func:`run` (train stage by
stage, evaluate every task and the control corpus, commit each stage), and the results, final outputs and reports."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..config import MethodSpec, RunConfig, config_fingerprint, config_from_dict, load_config
from ..errors import CacheError, ConfigError, DataError, KappaTuneError, ModelError
from ..storage import atomic_write_json, atomic_write_text, sha256_file
from .metrics import compute_metrics
from .state import STATE_VERSION, _clear_run_dir, _finished, _read_state, _write_state, library_versions, load_results

__all__ = ["run", "validate"]


def _as_config(config: RunConfig | str | os.PathLike | dict, overrides: Sequence[str] = ()) -> RunConfig:
    if isinstance(config, RunConfig):
        if overrides:
            return config_from_dict(_plain(config), overrides)
        return config
    if isinstance(config, dict):
        return config_from_dict(config, overrides)
    return load_config(config, overrides)


def _plain(cfg: RunConfig) -> dict[str, Any]:
    d = cfg.to_dict()
    # None-valued optional sections round-trip as null, which _build accepts.
    return d


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _flat(old), _flat(new)
    ignore = ("output_dir", "progress", "name", "training.checkpoint_every")
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not k.startswith(ignore) and not k.startswith("output."))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys]


logger = logging.getLogger("kappatune")


def _log(enabled: bool, msg: str) -> None:
    """A progress line of a run, through the ``kappatune`` logger at INFO (the CLI shows INFO; ``-q`` hides it)."""
    if enabled:
        logger.info(msg)


# ---------------------------------------------------------------------------------------------------------------
# Setup: model, data, method — everything that can fail before training.
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Data:
    tasks: list[str]
    train: dict[str, torch.Tensor]
    eval: dict[str, torch.Tensor]
    control_label: str | None  # None: no control corpus (a train run without one)
    control: torch.Tensor | None
    corpora: dict[str, dict[str, Any]]


def _load_data(cfg: RunConfig, tokenizer: Any, progress: bool) -> _Data:
    from .. import data as kdata

    seq = cfg.training.seq_len
    e = cfg.eval
    train: dict[str, torch.Tensor] = {}
    evals: dict[str, torch.Tensor] = {}
    info: dict[str, dict[str, Any]] = {}
    for task in [*cfg.tasks] + ([cfg.control] if cfg.control is not None else []):
        corpus = kdata.load_corpus(task.corpus, text_field=task.text_field)
        common = dict(seed=e.split_seed, eval_fraction=e.eval_fraction, text_field=task.text_field, progress=progress)
        try:
            if task is not cfg.control:
                train[task.label] = kdata.build_blocks(corpus, tokenizer, seq, split="train", max_blocks=cfg.training.max_train_blocks, **common)
            evals[task.label] = kdata.build_blocks(corpus, tokenizer, seq, split="eval", max_blocks=e.max_blocks, **common)
        except DataError as exc:  # name the corpus: a run reads several
            msg = str(exc)
            raise DataError(msg if task.corpus in msg or msg.startswith("tokenizer") else f"corpus {task.corpus!r}: {msg}") from None
        info[task.label] = {
            "corpus": task.corpus, "source": getattr(corpus, "source", ""), "license": getattr(corpus, "license", ""),
            "documents": len(corpus.documents),
            "train_blocks": int(train[task.label].shape[0]) if task.label in train else 0,
            "eval_blocks": int(evals[task.label].shape[0]),
        }
    if cfg.control is None:
        return _Data([t.label for t in cfg.tasks], train, evals, None, None, info)
    control = evals.pop(cfg.control.label)
    return _Data([t.label for t in cfg.tasks], train, evals, cfg.control.label, control, info)


def _method_options(spec: MethodSpec, seed: int, progress: bool | None = None) -> dict[str, Any]:
    """The method's options, with ``seed`` defaulting to the run seed when the method has one (random policy,
    LoRA init) and ``progress`` following the run's progress switch."""
    from ..methods import METHODS, _load_all

    _load_all()
    opts = dict(spec.options)
    cls = METHODS.get(spec.name)
    names = {f.name for f in dataclasses.fields(cls.config_cls)} if cls is not None else set()
    if "seed" in names and "seed" not in opts:
        opts["seed"] = seed
    if progress is not None and "progress" in names and "progress" not in opts:
        opts["progress"] = progress
    return opts


def _build_method(spec: MethodSpec, model: torch.nn.Module, cfg: RunConfig, seed: int, progress: bool | None = None) -> Any:
    """A configured (not yet prepared) method; with a budget, matched through the method's ``for_budget``."""
    from .. import methods

    opts = _method_options(spec, seed, progress)
    budget = (spec.budget if spec.budget is not None else cfg.budget) if spec.match_budget else None
    where = f"method {spec.display!r}"
    try:
        targets = _spec_targets(spec, model, seed, progress, pool=budget is not None)
        if budget is not None:
            return methods.for_budget(spec.name, model, int(budget), targets, **opts)
        method = methods.get_method(spec.name, opts)
        if targets is not None:
            method.default_targets = targets
        return method
    except KappaTuneError as exc:
        msg = str(exc)
        raise type(exc)(msg if spec.name in msg or spec.display in msg else f"{where}: {msg}") from None
    except TypeError as exc:  # a method's constructor rejecting an option
        raise ConfigError(f"{where}: invalid options {spec.options}: {exc}") from None


_SELECTION_KEYS = ("policy", "top_p", "num_modules", "threshold", "param_budget", "balance_types", "include", "exclude")


def _spec_targets(spec: MethodSpec, model: torch.nn.Module, seed: int, progress: bool | None, *, pool: bool = False) -> Any:
    """The :class:`~kappatune.selection.Selection` a method's ``targets`` section asks for (None without one).

    Works for every method that adapts selected tensors: the selection is handed to the method as its targets
    (and, with a budget, ``pool=True``, as the candidate pool its ``for_budget`` ranks). Refused for full fine-tuning (which
    trains everything) and when the same knob is also given in ``options``.
    """
    t = spec.targets
    if t is None:
        return None
    from ..methods.budget import resolve_selection
    from ..selection import match_module_names

    if spec.name == "full":
        raise ConfigError(f"method {spec.display!r}: full fine-tuning trains every tensor; remove its 'targets' section "
                          "(use the 'selective' method to train only some)")
    clash = [k for k in _SELECTION_KEYS if k in spec.options]
    if clash:
        raise ConfigError(f"method {spec.display!r}: the selection is given twice ({clash[0]!r} in options and a 'targets' "
                          "section); give it in one place")
    policy = t.policy or ("all" if t.modules is not None else "kappa")
    include = list(t.include) if t.include else None
    if t.modules is not None:
        every = [n for n, p in model.named_parameters() if p.ndim >= 2]
        linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        pats = t.modules if isinstance(t.modules, str) else list(t.modules)
        hits = match_module_names(linear, pats)
        names = [f"{n}.weight" for n in hits] + [n for n in match_module_names(every, pats) if n not in {f"{h}.weight" for h in hits}]
        if not names:
            raise ConfigError(f"method {spec.display!r}: targets.modules {t.modules!r} matches no module or weight of this model")
        import re

        pool = "re:^(?:" + "|".join(re.escape(n) for n in names) + ")$"
        include = [pool] if include is None else include + [pool]
        if policy == "all" and not t.exclude:
            return resolve_selection(model, names)
    top_p = t.top_p
    if pool and top_p is None and t.num_modules is None and t.threshold is None and t.param_budget is None:
        top_p = 1.0  # a budget draws from every candidate in policy order (no default 20% cut first)
    return resolve_selection(
        model, None, policy=policy, top_p=top_p, num_modules=t.num_modules, threshold=t.threshold,
        param_budget=t.param_budget, balance_types=t.balance_types, seed=t.seed if t.seed is not None else seed,
        include=include, exclude=t.exclude, progress=bool(progress),
    )


def _torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _load(cfg: RunConfig) -> tuple[torch.nn.Module, Any]:
    from .. import data as kdata
    from ..models import load_model

    dtype = _torch_dtype(cfg.training.dtype)
    if dtype == torch.bfloat16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"training.dtype bfloat16: this GPU ({torch.cuda.get_device_name()}) does not support bf16; "
                          "use float32 (optionally with training.mixed_precision fp16)")
    model, tok = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if dtype != torch.float32:
        model = model.to(dtype)
    if cfg.training.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"model {cfg.model}: its architecture does not support gradient checkpointing")
        # non-reentrant: works when the inputs do not require grad (frozen embeddings, adapters)
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name is deprecated)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # pragma: no cover - transformers 4
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
    for name, p in model.named_parameters():  # fail fast: NaN weights would only surface as a "diverged" loss
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise ModelError(f"model {cfg.model}: weight tensor {name!r} contains NaN or Inf values; fix or reload the model")
    tokenizer = kdata.get_tokenizer(tok if tok is not None else (cfg.model if cfg.model in ("tiny-llama", "tiny-moe") else model))
    return model, tokenizer


def validate(config: RunConfig | str | os.PathLike | dict, *, overrides: Sequence[str] = (), progress: bool = False,
             deep: bool = True) -> dict[str, Any]:
    """Check everything a run/bench needs before training: config, model, corpora, every method and its budget.

    With ``deep=True`` each method is also prepared on a copy of the model (catches e.g. a LoRA rank larger
    than a matrix). Returns ``{label: trainable parameters}``. Raises one :class:`KappaTuneError` on the first problem.
    """
    import copy

    cfg = _as_config(config, overrides)
    model, tokenizer = _load(cfg)
    data = _load_data(cfg, tokenizer, progress)
    steps = cfg.steps_per_stage()
    if steps < 1:
        raise ConfigError("config: training.steps must be > 0")
    out: dict[str, Any] = {}
    for spec in cfg.method_specs():
        method = _build_method(spec, model, cfg, cfg.seed_list()[0], progress)
        if deep:
            clone = copy.deepcopy(model)
            if callable(getattr(method, "set_calibration", None)):
                method.set_calibration(data.train[data.tasks[0]][:32])
            try:
                method.prepare(clone)
            except KappaTuneError as exc:
                raise type(exc)(f"method {spec.display!r}: {exc}") from None
            out[spec.display] = method.num_trainable()
            del clone
        else:
            out[spec.display] = method.budget_report.num_params if method.budget_report else None
    return out


def _eval_all(model: torch.nn.Module, data: _Data, batch_size: int, progress: bool) -> tuple[dict[str, float], float | None]:
    from ..evaluation import perplexity
    from ..training import fault_point

    fault_point("eval")
    task = {t: perplexity(model, data.eval[t], batch_size=batch_size, progress=progress) for t in data.tasks}
    ctrl = perplexity(model, data.control, batch_size=batch_size, progress=progress) if data.control is not None else None
    return task, ctrl


def _curve_hook(method: Any, data: _Data, task: str, cfg: RunConfig) -> Callable[[int], dict[str, float] | None]:
    """Every ``eval.curve_every`` steps: perplexity on the stage's task and on the control corpus (a curve point)."""
    from ..evaluation import perplexity

    every, bs = cfg.eval.curve_every, cfg.eval.batch_size

    def hook(step: int) -> dict[str, float] | None:
        if step % every:
            return None
        point = {"task_ppl": perplexity(method.model, data.eval[task], batch_size=bs, progress=False)}
        if data.control is not None:
            point["control_ppl"] = perplexity(method.model, data.control, batch_size=bs, progress=False)
        return point

    return hook


def _early_stop(patience: int) -> Callable[[list[dict[str, Any]]], bool] | None:
    """Stop when the last ``patience`` curve points' task (validation) perplexity did not beat the best before them."""
    if patience <= 0:
        return None

    def stop(curve: list[dict[str, Any]]) -> bool:
        vals = [p["task_ppl"] for p in curve if "task_ppl" in p]
        if len(vals) <= patience:
            return False
        return min(vals[-patience:]) >= min(vals[:-patience])

    return stop


def _base_eval_key(model: torch.nn.Module, data: _Data, cfg: RunConfig) -> str:
    from ..storage import fingerprint_model, fingerprint_tensors

    blocks = [(f"task:{t}", data.eval[t]) for t in data.tasks] + ([("control", data.control)] if data.control is not None else [])
    h = hashlib.sha256(f"{fingerprint_model(model)}|{fingerprint_tensors(blocks)}|{cfg.eval.batch_size}".encode())
    return h.hexdigest()[:24]


# ---------------------------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------------------------

def run(
    config: RunConfig | str | os.PathLike | dict,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool | None = None,
    overrides: Sequence[str] = (),
    base_eval_cache: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run one continual-learning config; returns the ``results.json`` content.

    ``resume``: continue the run in the output directory after its last finished stage (refused if the config
    changed, unless ``force``). ``force`` without ``resume``: start over in a directory that already holds a run.
    ``base_eval_cache``: a JSON file sharing the base model's evaluation between runs (used by :func:`bench`).
    """
    return _run(config, resume=resume, force=force, progress=progress, overrides=overrides,
                base_eval_cache=base_eval_cache)[0]


def _run(
    config: RunConfig | str | os.PathLike | dict,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool | None = None,
    overrides: Sequence[str] = (),
    base_eval_cache: str | os.PathLike | None = None,
) -> tuple[dict[str, Any], Any]:
    """:func:`run`, also returning the trained method (``None`` when the run was already complete on disk)."""
    from .. import data as kdata  # noqa: F401  (fail early if the data layer is missing)
    from ..training import PeakMemory, fault_point, make_accelerator, remove_checkpoints, train_stage

    cfg = _as_config(config, overrides)
    progress = cfg.progress if progress is None else progress
    specs = cfg.method_specs()
    if len(specs) != 1 or len(cfg.seed_list()) != 1:
        raise ConfigError("this config lists several methods or seeds: run it with `kappatune bench` (or give one 'method' and one 'seed')")
    spec, seed = specs[0], cfg.seed_list()[0]
    out = cfg.out_dir()
    fp = config_fingerprint(cfg)
    T = len(cfg.tasks)
    steps = cfg.steps_per_stage()

    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    accelerator = make_accelerator(cfg.training.mixed_precision)
    main = accelerator.is_main_process
    talk = progress and main

    state = _read_state(out)
    if state is not None and not force and state.get("config_fingerprint") == fp and _finished(out, state):
        _log(talk, f"{out}: this run is already complete (same config); results in {out / 'results.json'} "
                   "(--force to run it again)")
        return load_results(out), None
    if state is not None:
        if not resume and not force:
            raise ConfigError(
                f"{out} already holds a run ({state.get('stages_done', 0)}/{state.get('num_stages', '?')} stages done); "
                "pass --resume to continue it, --force to start over, or choose another output_dir"
            )
        if not resume:  # force: start over
            accelerator.wait_for_everyone()
            if main:
                _clear_run_dir(out)
            accelerator.wait_for_everyone()
            state = None
        elif state.get("config_fingerprint") != fp:
            diff = _config_diff(state.get("config", {}), cfg.to_dict())
            if not force:
                raise ConfigError(
                    f"cannot resume {out}: the config differs from the one that started it ("
                    + ("; ".join(diff[:4]) or "fingerprint differs") + ("; ..." if len(diff) > 4 else "")
                    + "); pass --force to resume anyway, or choose another output_dir"
                )
            state["forced_resume"] = state.get("forced_resume", []) + [{"from": state.get("config_fingerprint"), "changes": diff}]
            state["config_fingerprint"], state["config"] = fp, cfg.to_dict()
        if state is not None and state.get("num_stages") != T:
            raise ConfigError(f"cannot resume {out}: it has {state.get('num_stages')} stages, the config {T}; use --force without --resume to start over")
        if state is not None and _finished(out, state):  # else (killed during _finalize) it is redone below
            _log(talk, f"{out}: run already complete (all {T} stages); results in {out / 'results.json'}")
            return load_results(out), None

    if main and state is not None and out.is_dir():  # what atomic writes of a killed process left behind
        for tmp in out.rglob(".*.tmp"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)

    # -- fail-fast setup: model, data, method (budget) -- nothing trains before all of this succeeded ------------
    t0 = time.perf_counter()
    model, tokenizer = _load(cfg)
    data = _load_data(cfg, tokenizer, progress)
    method = _build_method(spec, model, cfg, seed, progress)
    total_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    model.to(accelerator.device)
    setup_s = time.perf_counter() - t0

    if state is None:
        state = {
            "version": STATE_VERSION, "config_fingerprint": fp, "config": cfg.to_dict(), "num_stages": T,
            "stages_done": 0, "complete": False, "base": None, "stages": [], "checkpoint": None,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    if state.get("base") is None:
        state["base"] = _base_eval(model, data, cfg, base_eval_cache, progress, main)
        if main:
            _write_state(out, state)
        _log(talk, f"base model: " + _ppl_line(data.tasks, state["base"]["task_ppl"], data.control_label, state["base"]["control_ppl"]))

    if callable(getattr(method, "set_calibration", None)):
        # Methods that measure layer importance on data (OSF) calibrate on the first task's training blocks.
        method.set_calibration(data.train[data.tasks[0]][:32])
    try:
        method.prepare(model)
    except KappaTuneError as exc:
        raise type(exc)(f"method {spec.display!r}: {exc}") from None
    trainable = method.num_trainable()
    budget_report = method.budget_report.to_dict() if getattr(method, "budget_report", None) is not None else None
    if state["stages_done"] > 0:
        ck = state["checkpoint"]
        path = out / ck["file"]
        if not path.is_file() or sha256_file(path) != ck["sha256"]:
            raise CacheError(f"stage checkpoint {path} is missing or corrupt (checksum mismatch); rerun with --force to start over")
        method.load(path)
        _log(talk, f"resuming {out} after stage {state['stages_done']}/{T}")
    accelerator.wait_for_everyone()

    for k in range(state["stages_done"] + 1, T + 1):
        task = data.tasks[k - 1]
        with PeakMemory() as mem:
            t_stage = time.perf_counter()
            if k > 1 and callable(getattr(method, "next_task", None)):
                # Continual methods (OSF) fold the finished task in and protect its directions before the next
                # one. Called at the start of the stage, after the previous stage's commit, so a resumed run
                # (stage checkpoint loaded, then next_task) reaches exactly the state an uninterrupted one had.
                method.next_task()
            curved = cfg.eval.curve_every > 0 and (cfg.eval.curve_stages is None or k in cfg.eval.curve_stages)
            curve_hook = _curve_hook(method, data, task, cfg) if curved else None
            res = train_stage(
                method, data.train[task], accelerator=accelerator, steps=steps, batch_size=cfg.training.batch_size,
                micro_batch_size=cfg.training.micro_batch_size, lr=cfg.learning_rate(), schedule=cfg.training.schedule,
                warmup_steps=cfg.training.warmup_steps, weight_decay=cfg.training.weight_decay,
                max_grad_norm=cfg.training.max_grad_norm, seed=seed, stage=k,
                checkpoint_dir=out / "checkpoints" / "mid", checkpoint_every=cfg.training.checkpoint_every,
                checkpoint_meta={"config_fingerprint": fp}, progress=progress, desc=f"stage {k}/{T} {task}",
                on_step=curve_hook, optimizer=cfg.training.optimizer, stop_when=_early_stop(cfg.eval.early_stopping),
            )
            t_eval = time.perf_counter()
            task_ppl, ctrl_ppl = _eval_all(method.model, data, cfg.eval.batch_size, progress)
            eval_s = time.perf_counter() - t_eval
        record = {
            "stage": k, "task": task, "steps": res.steps, "tokens": res.tokens, "losses": res.losses,
            "train_time_s": res.train_time_s, "tokens_per_s": res.tokens / res.train_time_s if res.train_time_s > 0 else None,
            "eval_time_s": eval_s, "wall_time_s": res.train_time_s + eval_s,  # resumed stages: summed over segments
            "resumed_from_step": res.resumed_from_step, **mem.to_dict(), "task_ppl": task_ppl, "control_ppl": ctrl_ppl,
        }
        if res.steps < steps:
            record["stopped_early"] = {"at_step": res.steps, "planned_steps": steps}
        if curved:  # the learning curve of this stage, ending with the stage-end evaluation
            end = {"step": res.steps, "task_ppl": task_ppl[task]}
            if ctrl_ppl is not None:
                end["control_ppl"] = ctrl_ppl
            record["curve"] = (res.curve if not (res.curve and res.curve[-1]["step"] == res.steps) else res.curve[:-1]) + [end]
        # -- commit: trained tensors first, then state.json (the commit point), then drop what it supersedes --
        if main:
            fault_point("stage_commit")
            ck_rel = f"checkpoints/stage-{k}.safetensors"
            method.save(out / ck_rel)
            prev = state.get("checkpoint")
            state["stages"] = [s for s in state["stages"] if s["stage"] < k] + [record]
            state["stages_done"] = k
            state["checkpoint"] = {"file": ck_rel, "sha256": sha256_file(out / ck_rel)}
            state["complete"] = k == T
            fault_point("stage_commit")
            _write_state(out, state)
            if prev and prev["file"] != ck_rel:
                (out / prev["file"]).unlink(missing_ok=True)
            remove_checkpoints(out / "checkpoints" / "mid")  # meta.json first: an interrupted removal is not "corrupt"
            shutil.rmtree(out / "checkpoints" / "mid", ignore_errors=True)
            results = _results(cfg, state, data, trainable, total_params, budget_report, spec, setup_s, fp)
            _write_reports(out, results, plots=cfg.output.plots, final=False)
        else:
            state["stages"] = [s for s in state["stages"] if s["stage"] < k] + [record]
            state["stages_done"], state["complete"] = k, k == T
        accelerator.wait_for_everyone()
        base = state["base"]
        _log(talk, (
            f"stage {k}/{T} [{task}] {res.steps} steps, loss {res.losses[0]:.3f}->{res.losses[-1]:.3f}, "
            f"{record['tokens_per_s'] or 0:,.0f} tok/s, {record['wall_time_s']:.1f} s | "
            + _ppl_line(data.tasks, task_ppl, data.control_label, ctrl_ppl, base)
        ))

    results = _results(cfg, state, data, trainable, total_params, budget_report, spec, setup_s, fp)
    if main:
        results = _finalize(cfg, out, method, results, progress)
    accelerator.wait_for_everyone()
    return results, method


def _ppl_line(tasks: Sequence[str], task_ppl: dict[str, float], control: str | None, ctrl: float | None,
              base: dict[str, Any] | None = None) -> str:
    parts = []
    if control is None:
        return "ppl " + ", ".join(f"{t} {base['task_ppl'][t]:.2f}->{task_ppl[t]:.2f}" if base else f"{t} {task_ppl[t]:.2f}" for t in tasks)
    for t in tasks:
        if base:
            parts.append(f"{t} {base['task_ppl'][t]:.2f}->{task_ppl[t]:.2f}")
        else:
            parts.append(f"{t} {task_ppl[t]:.2f}")
    if base:
        pct = (ctrl / base["control_ppl"] - 1) * 100
        parts.append(f"control({control}) {base['control_ppl']:.2f}->{ctrl:.2f} ({pct:+.1f}%)")
    else:
        parts.append(f"control({control}) {ctrl:.2f}")
    return "ppl " + ", ".join(parts)


def _base_eval(model: torch.nn.Module, data: _Data, cfg: RunConfig, cache: Any, progress: bool, main: bool) -> dict[str, Any]:
    """Perplexities of the untouched base model (shared through ``cache`` between the cells of a benchmark)."""
    key = _base_eval_key(model, data, cfg) if cache is not None else None
    if cache is not None:
        p = Path(cache)
        try:
            entries = json.loads(p.read_text("utf-8")) if p.is_file() else {}
        except (OSError, ValueError):
            entries = {}
        if key in entries:
            return entries[key]
    t = time.perf_counter()
    task_ppl, ctrl = _eval_all(model, data, cfg.eval.batch_size, progress)
    base = {"task_ppl": task_ppl, "control_ppl": ctrl, "eval_time_s": time.perf_counter() - t}
    if cache is not None and main:
        p = Path(cache)
        try:
            entries = json.loads(p.read_text("utf-8")) if p.is_file() else {}
        except (OSError, ValueError):
            entries = {}
        entries[key] = base
        atomic_write_json(p, entries)
    return base


def _results(cfg: RunConfig, state: dict[str, Any], data: _Data, trainable: int, total: int, budget_report: Any,
             spec: MethodSpec, setup_s: float, fp: str) -> dict[str, Any]:
    tasks = data.tasks
    base = state["base"]
    stages = sorted(state["stages"], key=lambda s: s["stage"])
    rows = ["base"] + [f"after {s['stage']}: {s['task']}" for s in stages]
    task_ppl = [[base["task_ppl"][t] for t in tasks]] + [[s["task_ppl"][t] for t in tasks] for s in stages]
    ctrl = [base["control_ppl"]] + [s["control_ppl"] for s in stages]
    metrics = compute_metrics(task_ppl, ctrl, tasks)
    train_s = sum(s["train_time_s"] for s in stages)
    n_steps = sum(s["steps"] for s in stages)
    metrics.update(
        trainable_params=trainable, trainable_pct=100.0 * trainable / total if total else None,
        train_time_s=train_s, sec_per_step=train_s / n_steps if n_steps else None,
        peak_rss_mb=max((s.get("peak_rss_mb") or 0 for s in stages), default=None),
        peak_gpu_mb=max((s["peak_gpu_mb"] for s in stages if s.get("peak_gpu_mb") is not None), default=None),
        wall_time_s=sum(s["wall_time_s"] for s in stages) + base.get("eval_time_s", 0.0),
    )
    return {
        "kappatune_results": 1,
        "name": cfg.name,
        "status": "complete" if state["stages_done"] == len(tasks) else f"partial ({state['stages_done']}/{len(tasks)} stages)",
        "config_fingerprint": fp,
        "config": cfg.to_dict(),
        "libraries": library_versions(),
        "method": {"label": spec.display, "name": spec.name, "options": _method_options(spec, cfg.seed_list()[0])},
        "seed": cfg.seed_list()[0],
        "tasks": tasks,
        "control": data.control_label,
        "corpora": data.corpora,
        "steps_per_stage": cfg.steps_per_stage(),
        "trainable_params": trainable,
        "total_params": total,
        "budget_report": budget_report,
        "matrix": {"rows": rows, "tasks": tasks, "task_ppl": task_ppl, "control_ppl": ctrl},
        "metrics": metrics,
        "base": base,
        "stages": stages,
        "setup_time_s": setup_s,
        "forced_resume": state.get("forced_resume", []),
        "plots": [],
        "files": {},
    }


def _spectrum(cfg: RunConfig, merged: torch.nn.Module) -> dict[str, Any] | None:
    """κ of every tensor the run changed, before (fresh base model) and after (merged model)."""
    import re

    from ..models import load_model

    try:
        from ..analysis import analyze_model
    except ImportError:  # pragma: no cover - analysis not installed
        return None
    base, _ = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    bp = dict(base.named_parameters())
    changed = []
    for n, p in merged.named_parameters():
        q = bp.get(n)  # the base as loaded (float32) cast to the trained model's dtype (training.dtype)
        if q is not None and q.ndim >= 2 and q.shape == p.shape and not torch.equal(q.detach().cpu().to(p.dtype), p.detach().cpu()):
            changed.append(n)
    if not changed:
        return {"names": [], "kappa_before": [], "kappa_after": []}
    pat = ["re:^(?:" + "|".join(re.escape(n) for n in changed) + ")$"]

    def kappas(m: torch.nn.Module) -> dict[str, float]:
        rep = analyze_model(m, include=pat, cache=False, progress=False)
        out: dict[str, float] = {}
        for r in rep.records:
            for n in [r.name, *getattr(r, "aliases", [])]:
                out[n] = r.kappa
        return out

    kb, ka = kappas(base), kappas(merged.cpu())
    names = [n for n in changed if n in kb and n in ka]
    return {"names": names, "kappa_before": [kb[n] for n in names], "kappa_after": [ka[n] for n in names]}


def _finalize(cfg: RunConfig, out: Path, method: Any, results: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Final adapter/model, κ spectrum, plots and reports (idempotent: a killed finalize is simply redone)."""
    files: dict[str, str] = {}
    if cfg.output.save_adapter:
        method.save(out / "final" / "adapter.safetensors", extra_metadata={"base_model": cfg.model})
        files["adapter"] = "final/adapter.safetensors"
    from ..training import fault_point

    fault_point("finalize")
    need_merge = cfg.output.save_model or (cfg.output.plots and cfg.output.spectrum_plot)
    if need_merge:
        merged = method.merge()
        if cfg.output.plots and cfg.output.spectrum_plot:
            try:
                spec = _spectrum(cfg, merged)
            except KappaTuneError as exc:  # e.g. a diverged model with NaN weights: report, don't crash the run
                spec, results["spectrum_error"] = None, str(exc)
            if spec is not None:
                results["spectrum"] = spec
        if cfg.output.save_model:
            tmp = out / "final" / ".model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            merged.save_pretrained(tmp, safe_serialization=True)
            dest = out / "final" / "model"
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
            files["model"] = "final/model"
    results["files"] = files
    results["finalized"] = True  # written last (results.json): a resume that sees it has nothing left to do
    _write_reports(out, results, plots=cfg.output.plots, final=True)
    _log(progress, f"results: {out / 'results.json'} and {out / 'results.md'}")
    return results


def _write_reports(out: Path, results: dict[str, Any], *, plots: bool, final: bool) -> None:
    from .. import reporting

    names: list[str] = []
    if plots and final:  # plots only once at the end: matplotlib costs ~1 s per figure on a busy 2-core CPU
        reporting.plot_forgetting_heatmap(results, out / "plots" / "forgetting_heatmap.png")
        reporting.plot_control_vs_task(results, out / "plots" / "control_vs_task.png")
        names += ["plots/forgetting_heatmap.png", "plots/control_vs_task.png"]
        spec = results.get("spectrum")
        if spec and spec.get("names"):
            reporting.plot_spectrum(spec, out / "plots" / "kappa_spectrum.png")
            names.append("plots/kappa_spectrum.png")
    results["plots"] = names
    atomic_write_text(out / "results.md", reporting.run_markdown(results))
    atomic_write_json(out / "results.json", results)

