"""One continual-learning run: :func:`validate` (everything checkable before training), :func:`run` (train stage by
stage, evaluate every task and the control corpus, commit each stage), and the results, final outputs and reports."""

from __future__ import annotations

import contextlib
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
from ..storage import DirectoryLock, atomic_write_json, atomic_write_text, sha256_file
from .metrics import SCORE_METRICS, compute_metrics, compute_score_metrics, control_suite_changes
from .state import (
    STATE_VERSION, _clear_run_dir, _finished, _holds_a_run, _read_state, _write_state, library_versions, load_results,
)

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
    train: dict[str, Any]  # lm: blocks [N, seq_len]; sft: {input_ids, attention_mask, labels} [N, L]
    eval: dict[str, Any]  # lm: test blocks; sft: the evaluated test examples (list of dicts) -- what results report
    control_label: str | None  # the primary control (first probe of the control suite); None: no control
    control: Any
    corpora: dict[str, dict[str, Any]]
    probes: dict[str, Any] = dataclasses.field(default_factory=dict)  # every control probe, primary first
    specs: dict[str, Any] = dataclasses.field(default_factory=dict)  # label -> TaskConfig (tasks and probes)
    tokenizer: Any = None
    # The validation split of every task (lm: blocks; sft: examples): what learning curves and early stopping read,
    # so nothing that steers training looks at the test split the results report.
    valid: dict[str, Any] = dataclasses.field(default_factory=dict)

    def metrics_of(self, label: str) -> list[str]:
        """The metrics measured on a task or probe (lm: ppl; sft: ppl plus the configured ones)."""
        spec = self.specs[label]
        if spec.type != "sft":
            return ["ppl"]
        return ["ppl"] + [m for m in (spec.metrics or []) if m != "ppl"]


def _calibration(train: Any, n: int = 32) -> torch.Tensor:
    """Token ids for methods that calibrate on data (OSF): the first ``n`` training rows."""
    return train["input_ids"][:n] if isinstance(train, dict) else train[:n]


def _spread(examples: list, k: int | None) -> list:
    """At most ``k`` examples evenly spaced over the list (deterministic; None: all)."""
    if k is None or k >= len(examples):
        return examples
    return [examples[(i * len(examples)) // k] for i in range(k)]


def _load_sft(task: Any, cfg: RunConfig, tokenizer: Any, *, train: bool, progress: bool,
              model: torch.nn.Module | None = None) -> tuple[Any, list, list, dict]:
    """An sft task's training tensors (or None), evaluated test and validation examples and info; resolves
    default metrics.

    The ``instruct-fidelity`` control probe is generated from ``model`` (the base model: its own greedy answers,
    cached per weights; ``kappatune.data.probes``)."""
    from .. import data as kdata
    from ..data.probes import FIDELITY_PROBE, fidelity_task

    e = cfg.eval
    need_choices = bool(task.metrics) and "accuracy" in task.metrics
    if task.corpus == FIDELITY_PROBE:
        if model is None:
            raise ConfigError(f"control probe {FIDELITY_PROBE!r} needs the base model to generate its answers")
        t = fidelity_task(model, tokenizer, chat_template=task.chat_template, batch_size=e.batch_size, progress=progress)
    else:
        t = kdata.load_task(task.corpus, name=task.label, seed=e.split_seed, validation_fraction=e.validation_fraction,
                            test_fraction=e.eval_fraction, prompt_field=task.prompt_field, response_field=task.response_field,
                            messages_field=task.messages_field, choices_field=task.choices_field,
                            choices_required=need_choices, progress=progress)
    if task.metrics is None:  # default: accuracy when the data has choices
        task.metrics = ["accuracy"] if t.has_choices else ["ppl"]
    # eval.split "validation" while tuning (lr_search), "test" for results; instruct-fidelity has only its one set
    # of answers (test). A task's or probe's own max_examples overrides eval.max_examples.
    cap = task.max_examples if task.max_examples is not None else e.max_examples
    test = _spread(t[e.split] if e.split in t.splits else t["test"], cap)
    valid = _spread(t["validation"], cap) if "validation" in t.splits else []
    tr = None
    if train:
        exs = t["train"]
        if cfg.training.max_train_blocks is not None:
            exs = exs[: cfg.training.max_train_blocks]
        tr = kdata.tokenize_sft(exs, tokenizer, max_length=cfg.training.seq_len, chat_template=task.chat_template,
                                packing=cfg.training.packing)
    info = {"corpus": task.corpus, "type": "sft", "source": t.source, "metrics": list(task.metrics),
            "examples": {k: len(v) for k, v in t.splits.items()}, "eval_examples": len(test),
            "validation_examples": len(valid), "train_examples": len(exs) if tr is not None else 0}
    if tr is not None and cfg.training.packing:
        info["train_rows"] = int(tr["input_ids"].shape[0])  # packed: several examples per row
    return tr, test, valid, info


def _load_data(cfg: RunConfig, tokenizer: Any, progress: bool, model: torch.nn.Module | None = None, *,
               validation: bool = True) -> _Data:
    """Every task's training data, test data (what results report) and validation data (what curves and early
    stopping read), and every control probe's test data. ``model`` is the base model (before any method is
    applied), which model-generated probes (``instruct-fidelity``) need.

    ``validation=False``: the data of runs started before lm tasks had a validation split (resumed with their
    own training data): lm tasks keep the two-way document split, and curves read the test split as they did."""
    from .. import data as kdata

    seq = cfg.training.seq_len
    e = cfg.eval
    train: dict[str, Any] = {}
    evals: dict[str, Any] = {}
    valid: dict[str, Any] = {}
    info: dict[str, dict[str, Any]] = {}
    suite = cfg.control_suite()
    specs = {t.label: dataclasses.replace(t) for t in [*cfg.tasks, *suite]}  # copies: default metrics get filled in
    for label, task in specs.items():
        is_task = label in [t.label for t in cfg.tasks]
        try:
            if task.type == "sft":
                tr, ev, va, info[label] = _load_sft(task, cfg, tokenizer, train=is_task, progress=progress,
                                                    model=model)
                if tr is not None:
                    train[label] = tr
                evals[label] = ev
                if is_task:
                    valid[label] = va if validation else ev
                continue
            corpus = kdata.load_corpus(task.corpus, text_field=task.text_field)
            # Probes (the control suite) are only ever measured, never tuned on: their split stays two-way.
            vf = e.validation_fraction if (is_task and validation) else 0.0
            common = dict(seed=e.split_seed, eval_fraction=e.eval_fraction, validation_fraction=vf,
                          text_field=task.text_field, progress=progress)
            if is_task:
                train[label] = kdata.build_blocks(corpus, tokenizer, seq, split="train", max_blocks=cfg.training.max_train_blocks, **common)
            # eval.split "validation" (lr_search) measures a task's validation blocks in place of its test blocks
            measured = "validation" if (e.split == "validation" and vf) else "test"
            evals[label] = kdata.build_blocks(corpus, tokenizer, seq, split=measured, max_blocks=e.max_blocks, **common)
            if is_task:
                valid[label] = (kdata.build_blocks(corpus, tokenizer, seq, split="validation", max_blocks=e.max_blocks, **common)
                                if vf else evals[label])
        except DataError as exc:  # name the corpus: a run reads several
            msg = str(exc)
            raise DataError(msg if task.corpus in msg or msg.startswith("tokenizer") else f"corpus {task.corpus!r}: {msg}") from None
        info[label] = {
            "corpus": task.corpus, "source": getattr(corpus, "source", ""), "license": getattr(corpus, "license", ""),
            "documents": len(corpus.documents),
            "train_blocks": int(train[label].shape[0]) if label in train else 0,
            "eval_blocks": int(evals[label].shape[0]),
        }
        if is_task:
            info[label]["validation_blocks"] = int(valid[label].shape[0]) if vf else 0
    probes = {c.label: evals.pop(c.label) for c in suite}
    primary = suite[0].label if suite else None  # no control: a `kappatune train` without --control
    return _Data([t.label for t in cfg.tasks], train, evals, primary, probes.get(primary), info, probes, specs, tokenizer,
                 valid)


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


_SELECTION_KEYS = ("policy", "top_p", "num_modules", "threshold", "param_budget", "balance_types", "include", "exclude")


def _spec_targets(spec: MethodSpec, model: torch.nn.Module, seed: int, progress: bool | None, *, pool: bool = False) -> Any:
    """The :class:`~kappatune.selection.Selection` a method's ``targets`` section asks for (None without one).

    Works for every method that adapts selected tensors: the selection is handed to the method as its targets
    (and, with a budget, ``pool=True``, as the candidate pool its ``for_budget`` ranks). Refused for full
    fine-tuning (which trains everything) and when the same knob is also given in ``options``.
    """
    t = spec.targets
    if t is None:
        return None
    import re

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
        hits = [f"{n}.weight" for n in match_module_names(linear, pats)]
        names = hits + [n for n in match_module_names(every, pats) if n not in set(hits)]
        if not names:
            raise ConfigError(f"method {spec.display!r}: targets.modules {t.modules!r} matches no module or weight of this model")
        pool_pattern = "re:^(?:" + "|".join(re.escape(n) for n in names) + ")$"
        include = [pool_pattern] if include is None else include + [pool_pattern]
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
    model, tok = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, allow_missing_weights=cfg.allow_missing_weights)
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
             deep: bool = True, command: str | None = None, resume: bool = False, force: bool = False,
             only: Sequence[str] | None = None) -> dict[str, Any]:
    """Check everything a run/bench needs before training: config, model, corpora, every method and its budget.

    With ``deep=True`` each method is also prepared on a copy of the model (catches e.g. a LoRA rank larger
    than a matrix). ``command="run"`` (with its ``resume``/``force``) or ``"bench"`` (with its ``only``) adds that
    command's own refusals — one method and seed for a run, the output directory's state, ``--only`` labels — so a
    check is exactly as strict as the command (``run --check`` / ``bench --check``). Returns ``{label: trainable
    parameters}``. Raises one :class:`KappaTuneError` on the first problem.
    """
    import copy

    cfg = _as_config(config, overrides)
    if command == "run":
        _single(cfg)
        _preflight(cfg, cfg.out_dir(), config_fingerprint(cfg), resume=resume, force=force)
    elif command == "bench":
        from .bench import _select_only, _validation_config

        cfg = _validation_config(_select_only(cfg, only))
    elif command is not None:
        raise ConfigError(f"validate: command must be 'run', 'bench' or None, got {command!r}")
    if cfg.num_threads is not None:
        # as run() does: a study worker's checks (OSF decomposes every layer of the model) would otherwise take
        # torch's default threads on cores the other workers use, which oversubscribes them many times over
        torch.set_num_threads(cfg.num_threads)
    model, tokenizer = _load(cfg)
    data = _load_data(cfg, tokenizer, progress, model)
    steps = cfg.steps_per_stage()
    if steps < 1:
        raise ConfigError("config: training.steps must be > 0")
    out: dict[str, Any] = {}
    for spec in cfg.method_specs():
        method = _build_method(spec, model, cfg, cfg.seed_list()[0], progress)
        _check_shardable(method, spec)
        if deep:
            clone = copy.deepcopy(model)
            if callable(getattr(method, "set_calibration", None)):
                method.set_calibration(_calibration(data.train[data.tasks[0]]))
            try:
                method.prepare(clone)
            except KappaTuneError as exc:
                raise type(exc)(f"method {spec.display!r}: {exc}") from None
            out[spec.display] = method.num_trainable()
            del clone
        else:
            out[spec.display] = method.budget_report.num_params if method.budget_report else None
    return out


def _measure(model: torch.nn.Module, data: _Data, label: str, obj: Any, cfg: RunConfig, progress: bool,
             metrics: Sequence[str] | None = None, distributed: bool = False) -> dict[str, float]:
    """The metrics of one task or probe: ``{"ppl": ...}`` for lm, plus accuracy/exact_match for sft.

    ``distributed``: every process calls it and perplexity is split over them (same numbers as one process, see
    ``evaluation.mean_nll``); sft metrics are computed by every process on all examples."""
    from ..evaluation import evaluate_sft, perplexity

    bs = cfg.eval.batch_size
    spec = data.specs[label]
    if spec.type != "sft":
        return {"ppl": perplexity(model, obj, batch_size=bs, progress=progress, distributed=distributed)}
    return evaluate_sft(
        model, data.tokenizer, obj, list(metrics or data.metrics_of(label)), chat_template=spec.chat_template,
        batch_size=bs, max_length=cfg.training.seq_len, max_new_tokens=cfg.eval.max_new_tokens, stop=cfg.eval.stop,
        progress=progress,
    )


def _eval_all(model: torch.nn.Module, data: _Data, cfg: RunConfig, progress: bool,
              distributed: bool = False) -> tuple[dict[str, float], float | None, dict[str, Any]]:
    """Every task and every control probe: ``(task_ppl, control_ppl, {"task_metrics", "probes"})``.

    ``task_metrics[task]`` / ``probes[probe]`` hold every metric measured (``ppl`` included); the perplexities
    are also returned on their own, the matrix the perplexity metrics are computed from."""
    from ..training import fault_point

    fault_point("eval")
    kw = dict(distributed=distributed)
    task_metrics = {t: _measure(model, data, t, data.eval[t], cfg, progress, **kw) for t in data.tasks}
    probes = {p: _measure(model, data, p, obj, cfg, progress, **kw) for p, obj in data.probes.items()}
    task_ppl = {t: v["ppl"] for t, v in task_metrics.items()}
    ctrl = probes[data.control_label]["ppl"] if data.control_label is not None else None
    return task_ppl, ctrl, {"task_metrics": task_metrics, "probes": probes}


def _distributed() -> bool:
    """Whether this process is one of several (evaluation is then split across them)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _curve_hook(method: Any, data: _Data, task: str, cfg: RunConfig) -> Callable[[int], dict[str, float] | None]:
    """Every ``eval.curve_every`` steps (and at step 0, the stage's start): the stage's task on its validation split
    (perplexity, and its accuracy/exact-match for sft) and the primary control's perplexity (a curve point)."""
    every = cfg.eval.curve_every
    dist = _distributed()

    def hook(step: int, control_ppl: float | None = None, force: bool = False) -> dict[str, float] | None:
        if step % every and not force:
            return None
        vals = _measure(method.model, data, task, data.valid[task], cfg, False, distributed=dist)
        point = {"task_ppl": vals.pop("ppl")}
        if data.control_label is not None:
            point["control_ppl"] = control_ppl if control_ppl is not None else _measure(
                method.model, data, data.control_label, data.control, cfg, False, ["ppl"], distributed=dist)["ppl"]
        point.update({f"task_{k}": v for k, v in vals.items()})
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


# ---------------------------------------------------------------------------------------------------------------
# Sharded (FSDP) runs: the hooks run() calls; the mechanics are in kappatune.training.
# ---------------------------------------------------------------------------------------------------------------

def _check_shardable(method: Any, spec: MethodSpec) -> None:
    """Under an FSDP launch, refuse (before anything trains) a method that cannot be sharded, naming why."""
    from ..training import fsdp_requested

    reason = getattr(method, "fsdp_unsupported", None)
    if reason and fsdp_requested():
        raise ConfigError(f"method {spec.display!r} cannot be trained under FSDP: {reason}; run it without FSDP (DDP or one process)")


def _shard_if_requested(method: Any, accelerator: Any, cfg: RunConfig) -> bool:
    """Shard the prepared model with FSDP2 when launched for it (see ``training.shard_model``); returns whether."""
    from ..training import fsdp_requested, shard_model

    if not fsdp_requested():
        return False
    shard_model(method, accelerator, mixed_precision=cfg.training.mixed_precision)
    return True


def _trained_for_commit(method: Any, sharded: bool) -> dict[str, torch.Tensor] | None:
    """The trained tensors to commit, gathered from the shards (a collective: every process calls it); ``None``
    when unsharded (``method.save`` then reads them itself)."""
    from ..training import gather_trained_state

    return gather_trained_state(method) if sharded else None


def _unsharded_method(cfg: RunConfig, spec: MethodSpec, seed: int, data: _Data, adapter: Path, progress: bool) -> Any:
    """The run's method on a fresh, unsharded copy of the base model with the committed trained tensors loaded:
    what merging and saving the final model need (FSDP2 has no way back from shards to plain modules). Main
    process only; it holds one full model, as ``save_pretrained`` of a merged model does anyway."""
    model, _ = _load(cfg)
    method = _build_method(spec, model, cfg, seed, progress)
    if callable(getattr(method, "set_calibration", None)):
        method.set_calibration(data.train[data.tasks[0]][:32])
    method.prepare(model)
    method.load(adapter)
    return method


def _base_eval_key(model: torch.nn.Module, data: _Data, cfg: RunConfig) -> str:
    from ..storage import fingerprint_model, fingerprint_tensors

    def tensor(obj: Any) -> torch.Tensor:  # sft examples: hashed through their JSON text
        if isinstance(obj, torch.Tensor):
            return obj
        blob = json.dumps(obj, sort_keys=True, default=str).encode()
        return torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.zeros(0)

    blocks = [(f"task:{t}", tensor(data.eval[t])) for t in data.tasks] + [(f"probe:{p}", tensor(o)) for p, o in data.probes.items()]
    if len(data.probes) == 1 and isinstance(data.control, torch.Tensor):  # keys of caches written before control suites
        blocks = [(f"task:{t}", tensor(data.eval[t])) for t in data.tasks] + [("control", data.control)]
    specs = {k: (v.type, v.metrics, v.chat_template) for k, v in data.specs.items() if v.type == "sft"}
    gen = (cfg.eval.max_new_tokens, cfg.eval.stop, cfg.training.seq_len) if specs else ()
    h = hashlib.sha256(f"{fingerprint_model(model)}|{fingerprint_tensors(blocks)}|{cfg.eval.batch_size}"
                       f"{'|' + json.dumps([specs, gen], default=str) if specs else ''}".encode())
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
    """:func:`run`, also returning the trained method (``None`` when the run was already complete on disk; the
    unsharded method after an FSDP run)."""
    from .. import data as kdata  # noqa: F401  (fail early if the data layer is missing)
    from ..training import make_accelerator

    cfg = _as_config(config, overrides)
    progress = cfg.progress if progress is None else progress
    spec, seed = _single(cfg)
    out = cfg.out_dir()
    fp = config_fingerprint(cfg)

    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    accelerator = make_accelerator(cfg.training.mixed_precision)
    main = accelerator.is_main_process
    # One writer (job) per run directory: a second one gets one clear line instead of silently losing results.
    # Only rank 0 of a launched job takes it (by RANK too: accelerate may not see a torchrun job on CPU).
    rank0 = main and os.environ.get("RANK", "0") == "0"
    with DirectoryLock(out) if rank0 else contextlib.nullcontext():
        return _run_locked(cfg, out, fp, spec, seed, accelerator, resume=resume, force=force, progress=progress,
                           base_eval_cache=base_eval_cache)


def _single(cfg: RunConfig) -> tuple[MethodSpec, int]:
    """The one method and seed of a run config (a config with several is a bench)."""
    specs = cfg.method_specs()
    if len(specs) != 1 or len(cfg.seed_list()) != 1:
        raise ConfigError("this config lists several methods or seeds: run it with `kappatune bench` (or give one 'method' and one 'seed')")
    return specs[0], cfg.seed_list()[0]


def _preflight(cfg: RunConfig, out: Path, fp: str, *, resume: bool, force: bool) -> tuple[str, dict[str, Any] | None]:
    """What a run in ``out`` will do — ``"complete"`` (nothing), ``"new"``, ``"restart"`` (``--force``: clear what
    the old run wrote) or ``"resume"`` — with the state to continue; refusals are :class:`ConfigError`. Reads
    only: ``run --check`` calls it too, so the check refuses exactly what the run refuses."""
    T = len(cfg.tasks)
    state = _read_state(out)
    if state is None:
        leftovers = _holds_a_run(out) if out.is_dir() else []
        if leftovers and not force:
            shown = ", ".join(leftovers[:3]) + (", ..." if len(leftovers) > 3 else "")
            raise ConfigError(
                f"{out} holds files of a run ({shown}) but no state.json, so it cannot be "
                + ("resumed" if resume else "identified") + "; pass --force to start over (only the run's files are "
                "deleted), or choose another output_dir"
            )
        return ("restart" if leftovers else "new"), None
    if not force and state.get("config_fingerprint") == fp and _finished(out, state):
        return "complete", state
    if not resume and not force:
        raise ConfigError(
            f"{out} already holds a run ({state.get('stages_done', 0)}/{state.get('num_stages', '?')} stages done); "
            "pass --resume to continue it, --force to start over, or choose another output_dir"
        )
    if not resume:  # force: start over
        return "restart", None
    if state.get("config_fingerprint") != fp:
        diff = _config_diff(state.get("config", {}), cfg.to_dict())
        if not force:
            raise ConfigError(
                f"cannot resume {out}: the config differs from the one that started it ("
                + ("; ".join(diff[:4]) or "fingerprint differs") + ("; ..." if len(diff) > 4 else "")
                + "); pass --force to resume anyway, or choose another output_dir"
            )
        state["forced_resume"] = state.get("forced_resume", []) + [{"from": state.get("config_fingerprint"), "changes": diff}]
        state["config_fingerprint"], state["config"] = fp, cfg.to_dict()
    if state.get("num_stages") != T:
        raise ConfigError(f"cannot resume {out}: it has {state.get('num_stages')} stages, the config {T}; use --force without --resume to start over")
    if _finished(out, state):  # else (killed during _finalize, or a final file deleted since) it is redone
        return "complete", state
    if state.get("stages_done", 0) > 0:
        ck = state["checkpoint"]
        path = out / ck["file"]
        if not path.is_file() or sha256_file(path) != ck["sha256"]:
            raise CacheError(f"stage checkpoint {path} is missing or corrupt (checksum mismatch); it cannot be "
                             "restored, rerun with --force to start over")
    return "resume", state


def _run_locked(cfg: RunConfig, out: Path, fp: str, spec: MethodSpec, seed: int, accelerator: Any, *, resume: bool,
                force: bool, progress: bool, base_eval_cache: Any) -> tuple[dict[str, Any], Any]:
    from ..training import PeakMemory, fault_point, remove_checkpoints, train_stage

    main = accelerator.is_main_process
    talk = progress and main
    T = len(cfg.tasks)
    steps = cfg.steps_per_stage()
    action, state = _preflight(cfg, out, fp, resume=resume, force=force)
    if action == "complete":
        _log(talk, f"{out}: this run is already complete (same config); results in {out / 'results.json'} "
                   "(--force to run it again)")
        return load_results(out), None
    if action == "restart":
        accelerator.wait_for_everyone()
        if main:
            _clear_run_dir(out)
        accelerator.wait_for_everyone()
        state = None

    if main and state is not None and out.is_dir():  # what atomic writes of a killed process left behind
        for tmp in out.rglob(".*.tmp"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)

    # -- fail-fast setup: model, data, method (budget) -- nothing trains before all of this succeeded ------------
    t0 = time.perf_counter()
    model, tokenizer = _load(cfg)
    # Runs started before tasks had validation splits (state without "validation_splits") resume on their own data.
    data = _load_data(cfg, tokenizer, progress, model,
                      validation=state is None or bool(state.get("validation_splits")))
    method = _build_method(spec, model, cfg, seed, progress)
    _check_shardable(method, spec)
    total_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    model.to(accelerator.device)
    setup_s = time.perf_counter() - t0

    if state is None:
        state = {
            "version": STATE_VERSION, "config_fingerprint": fp, "config": cfg.to_dict(), "num_stages": T,
            "stages_done": 0, "complete": False, "base": None, "stages": [], "checkpoint": None,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "validation_splits": True,
        }
    state["mixed_precision"] = str(accelerator.mixed_precision)  # what ran (fp16 on a CPU runs as "no")
    if state.get("base") is None:
        state["base"] = _base_eval(model, data, cfg, base_eval_cache, progress, main, distributed=_distributed())
        if main:
            _write_state(out, state)
        _log(talk, f"base model: " + _ppl_line(data.tasks, state["base"]["task_ppl"], data.control_label, state["base"]["control_ppl"]))

    if callable(getattr(method, "set_calibration", None)):
        # Methods that measure layer importance on data (OSF) calibrate on the first task's training blocks.
        method.set_calibration(_calibration(data.train[data.tasks[0]]))
    try:
        method.prepare(model)
    except KappaTuneError as exc:
        raise type(exc)(f"method {spec.display!r}: {exc}") from None
    trainable = method.num_trainable()
    budget_report = method.budget_report.to_dict() if getattr(method, "budget_report", None) is not None else None
    if state["stages_done"] > 0:  # verified by _preflight before anything was loaded
        path = out / state["checkpoint"]["file"]
        method.load(path)
        _log(talk, f"resuming {out} after stage {state['stages_done']}/{T}")
    sharded = _shard_if_requested(method, accelerator, cfg)
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
            task_ppl, ctrl_ppl, extra = _eval_all(method.model, data, cfg, progress, distributed=_distributed())
            eval_s = time.perf_counter() - t_eval
        record = {
            "stage": k, "task": task, "steps": res.steps, "tokens": res.tokens, "losses": res.losses,
            "train_time_s": res.train_time_s, "tokens_per_s": res.tokens / res.train_time_s if res.train_time_s > 0 else None,
            "eval_time_s": eval_s, "wall_time_s": res.train_time_s + eval_s,  # resumed stages: summed over segments
            "resumed_from_step": res.resumed_from_step, **mem.to_dict(), "task_ppl": task_ppl, "control_ppl": ctrl_ppl,
            **extra,
            **_distributed_record(accelerator, res, mem),
        }
        if res.steps < steps:
            record["stopped_early"] = {"at_step": res.steps, "planned_steps": steps}
        if curved:  # the learning curve of this stage (validation split), ending at the stage's last step
            curve = list(res.curve)
            if not curve or curve[-1]["step"] != res.steps:  # (an early stop already ends on a curve point)
                if data.valid[task] is data.eval[task]:  # a run from before validation splits: the test evaluation
                    end = {"task_ppl": task_ppl[task], **({"control_ppl": ctrl_ppl} if ctrl_ppl is not None else {}),
                           **{f"task_{k}": v for k, v in extra["task_metrics"][task].items() if k != "ppl"}}
                else:
                    end = curve_hook(res.steps, control_ppl=ctrl_ppl, force=True)
                curve.append({"step": res.steps, **end})
            record["curve"] = curve
        # -- commit: trained tensors first, then state.json (the commit point), then drop what it supersedes --
        trained = _trained_for_commit(method, sharded)
        if main:
            fault_point("stage_commit")
            ck_rel = f"checkpoints/stage-{k}.safetensors"
            method.save(out / ck_rel, trained)
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
        final = _unsharded_method(cfg, spec, seed, data, out / state["checkpoint"]["file"], progress) if sharded else method
        results = _finalize(cfg, out, final, results, progress)
        method = final
    accelerator.wait_for_everyone()
    return results, method


def _distributed_record(accelerator: Any, res: Any, mem: Any) -> dict[str, Any]:
    """A stage record's multi-process fields: processes, FSDP or not, and per rank the bytes of optimizer state
    and the peak RSS (gathered: a collective). Empty for one process."""
    from ..training import per_rank

    if accelerator.num_processes <= 1:
        return {"optimizer_state_bytes": res.optimizer_state_bytes[0] if res.optimizer_state_bytes else None}
    return {
        "processes": accelerator.num_processes, "fsdp": res.sharded,
        "optimizer_state_bytes_per_rank": res.optimizer_state_bytes,
        "peak_rss_mb_per_rank": per_rank(accelerator, mem.to_dict()["peak_rss_mb"]),
    }


def _ppl_line(tasks: Sequence[str], task_ppl: dict[str, float], control: str | None, ctrl: float | None,
              base: dict[str, Any] | None = None) -> str:
    parts = []
    if control is None:
        return "ppl " + ", ".join(f"{t} {base['task_ppl'][t]:.2f}->{task_ppl[t]:.2f}" if base else f"{t} {task_ppl[t]:.2f}"
                                  for t in tasks)
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


def _base_eval(model: torch.nn.Module, data: _Data, cfg: RunConfig, cache: Any, progress: bool, main: bool,
               distributed: bool = False) -> dict[str, Any]:
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
    task_ppl, ctrl, extra = _eval_all(model, data, cfg, progress, distributed=distributed)
    base = {"task_ppl": task_ppl, "control_ppl": ctrl, **extra, "eval_time_s": time.perf_counter() - t}
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
    matrix: dict[str, Any] = {"rows": rows, "tasks": tasks, "task_ppl": task_ppl, "control_ppl": ctrl}
    points = [base] + stages
    for m, short in SCORE_METRICS.items():  # one matrix per accuracy-like metric that some task has
        R = [[(p.get("task_metrics") or {}).get(t, {}).get(m) for t in tasks] for p in points]
        if any(v is not None for row in R for v in row):
            matrix[m] = R
            metrics.update(compute_score_metrics(R, tasks, short))
    if base.get("probes"):
        suite = control_suite_changes(base["probes"], (stages[-1] if stages else base)["probes"])
        metrics["control_suite"] = suite
        for probe, vals in suite.items():  # flat keys, one per probe and metric, for bench aggregation
            for m, v in vals.items():
                metrics[f"probe_{probe}_{m}_change"] = v["change"]
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
        "mixed_precision": {"requested": cfg.training.mixed_precision,
                            "used": state.get("mixed_precision", cfg.training.mixed_precision)},
        "trainable_params": trainable,
        "total_params": total,
        "budget_report": budget_report,
        "matrix": matrix,
        "probes": list(data.probes),
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
    base, _ = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, allow_missing_weights=cfg.allow_missing_weights)
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
        # a resume checks it: a deleted or damaged final adapter is written again from the last stage checkpoint
        results["file_sha256"] = {files["adapter"]: sha256_file(out / files["adapter"])}
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
        if "accuracy" in results["matrix"] or "exact_match" in results["matrix"]:
            metric = "accuracy" if "accuracy" in results["matrix"] else "exact_match"
            reporting.plot_score_heatmap(results, metric, out / "plots" / f"{metric}_heatmap.png")
            names.append(f"plots/{metric}_heatmap.png")
        spec = results.get("spectrum")
        if spec and spec.get("names"):
            reporting.plot_spectrum(spec, out / "plots" / "kappa_spectrum.png")
            names.append("plots/kappa_spectrum.png")
    results["plots"] = names
    atomic_write_text(out / "results.md", reporting.run_markdown(results))
    atomic_write_json(out / "results.json", results)

