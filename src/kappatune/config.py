"""The YAML configuration of a continual-learning run or benchmark, validated before anything is trained.

A config names the model, the task sequence, the control corpus, the method(s) with their options, target
selection and budget, the training schedule per stage, the evaluation sizes, seed(s) and the output directory.
:func:`load_config` reads YAML with ``yaml.safe_load`` (no object construction from the file), applies
``key.sub=value`` overrides, and builds typed dataclasses. Every problem is one :class:`ConfigError` line that
names the key (``training.steps``) and what is allowed; an unknown key is rejected with the closest valid key
suggested, so a typo never silently falls back to a default.

The static checks here need no model or data; :func:`kappatune.harness.validate` adds the checks that do
(corpora exist, method known, budget reachable) — all of them before any training starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

from .errors import ConfigError

__all__ = [
    "TaskConfig",
    "LRSearchConfig",
    "PreregisteredConfig",
    "TargetsConfig",
    "MethodSpec",
    "TrainingConfig",
    "EvalConfig",
    "OutputConfig",
    "RunConfig",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "config_fingerprint",
    "SCHEDULES",
    "POLICIES",
    "TASK_TYPES",
    "METRICS",
]

POLICIES = ("kappa", "snr", "random", "all", "snr_per_type", "random_type_matched")  # = kappatune.selection.POLICIES (no torch import here)
SCHEDULES = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
    "cosine_with_min_lr", "warmup_stable_decay",
)
MIXED_PRECISION = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adafactor", "sgd")
DTYPES = ("float32", "bfloat16")


TASK_TYPES = ("lm", "sft")
METRICS = ("ppl", "accuracy", "exact_match")


def _is_builtin_sft(corpus: Any) -> bool:
    """Whether ``corpus`` names a registered built-in supervised task (a plain name, never a path)."""
    if not isinstance(corpus, str) or not corpus or "/" in corpus or os.sep in corpus or "." in corpus:
        return False
    from .data.tasks import BUILTIN_TASKS
    from . import data as _data  # noqa: F401  (registers the built-in labelled tasks)

    return corpus in BUILTIN_TASKS


@dataclass
class TaskConfig:
    """One task (or control probe): its data and how to read and measure it.

    ``type: lm`` (default): raw text — a built-in corpus name (``kappatune data``) or a .txt/.jsonl/.csv/.parquet
    file; measured by perplexity. ``type: sft``: prompt → response examples (docs/data.md) — a built-in task name,
    a .jsonl/.json/.csv/.parquet file, a ``save_to_disk`` directory or a hub dataset ``NAME[:CONFIG]:SPLIT``;
    trained with the loss on response tokens only; measured by ``metrics`` (``accuracy`` needs choices,
    ``exact_match`` generates greedily, ``ppl`` is the response perplexity). Default metrics: ``[ppl]`` for lm,
    ``[accuracy]`` for sft data with choices, else ``[ppl]``. ``type`` left out: ``sft`` for a built-in
    supervised task (``kappatune data`` lists them, e.g. ``debian-section``), else ``lm``.
    """

    corpus: str
    name: str | None = None  # label in tables; defaults to the corpus name
    text_field: str = "text"
    type: str | None = None  # None: detected (sft for a built-in supervised task, else lm)
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str | None = None  # chat data: a list of {role, content} (replaces prompt/response fields)
    choices_field: str | None = None  # candidate responses (default: a "choices" field when the data has one)
    chat_template: bool = True  # apply the tokenizer's chat template when it has one (sft)
    metrics: list[str] | None = None
    max_examples: int | None = None  # sft: test examples evaluated (evenly spaced); None: eval.max_examples

    def __post_init__(self) -> None:
        if self.type is None:
            self.type = "sft" if _is_builtin_sft(self.corpus) else "lm"

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if "/" in self.corpus or os.sep in self.corpus:  # a path: its file/directory stem
            return Path(self.corpus).stem or self.corpus
        return self.corpus


@dataclass
class TargetsConfig:
    """Which tensors a method adapts: a :func:`kappatune.selection.select_targets` policy and its knobs."""

    policy: str | None = None  # default: "kappa", or "all" when modules is given
    top_p: float | None = None
    num_modules: int | None = None
    threshold: float | None = None
    param_budget: int | None = None
    balance_types: bool = False
    include: list[str] | None = None
    exclude: list[str] | None = None
    seed: int | None = None  # random policy; defaults to the run seed
    # Explicit candidates with PEFT's target_modules semantics: a list matches full names or name suffixes
    # (["q_proj", "v_proj"]), a string is a regex matched against whole names. With policy "all" (the default
    # when modules is given) every match is adapted; with another policy the matches are ranked and cut.
    modules: list[str] | str | None = None


@dataclass
class MethodSpec:
    """A method by name, its options (the method's own config keys) and its targets.

    ``targets`` omitted means the method's default (all linear layers except the output head).
    ``budget`` (trainable parameters) overrides the top-level ``budget`` for this method; ``match_budget: false``
    exempts it from budget matching (full fine-tuning, the unconstrained reference, has no size knob).
    ``lr`` overrides ``training.lr`` for this method: adapters (LoRA, CURLoRA, EigenTune) usually need a larger
    learning rate than full or selective fine-tuning, so a fair comparison gives each its own.
    """

    name: str
    label: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    targets: TargetsConfig | None = None
    budget: int | None = None
    lr: float | None = None
    match_budget: bool = True

    @property
    def display(self) -> str:
        return self.label or self.name


@dataclass
class TrainingConfig:
    """The schedule of every stage (one stage per task; a fresh optimizer and LR schedule per stage)."""

    steps: int | None = None  # optimizer steps per stage
    tokens: int | None = None  # alternative: tokens per stage (steps = ceil(tokens / (batch_size * seq_len)))
    batch_size: int = 4  # global batch (split over processes under accelerate launch)
    micro_batch_size: int | None = None  # gradient accumulation: per-forward batch per process
    seq_len: int = 128
    lr: float = 1e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    max_train_blocks: int | None = None  # cap on training blocks built per task (None: all)
    checkpoint_every: int = 0  # mid-stage checkpoint every N steps (0: only at stage ends)
    mixed_precision: str = "no"
    optimizer: str = "adamw"  # adamw | adafactor (transformers) | sgd
    dtype: str = "float32"  # weights' dtype: float32 | bfloat16
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory, ~30% more time)
    # sft tasks: pack several examples into each seq_len row, each attending only to itself (block-diagonal causal
    # attention from per-example position ids); no compute on padding. Raw-text (lm) tasks are always packed blocks.
    packing: bool = False


@dataclass
class EvalConfig:
    """Evaluation sizes: perplexity on at most ``max_blocks`` held-out blocks of ``seq_len`` tokens per corpus."""

    max_blocks: int = 32
    batch_size: int = 8
    eval_fraction: float = 0.1
    split_seed: int = 0  # train/eval split of every corpus; fixed across run seeds so evals are comparable
    # Learning curves: every N optimizer steps, also evaluate the stage's task and the control corpus (0: only at
    # stage ends). The equal-task-quality comparison of a bench reads these curves.
    curve_every: int = 0
    curve_stages: list[int] | None = None  # stages that get a curve (1-based; None: every stage)
    # Early stopping on the stage's validation (task eval split) perplexity, read at every curve point: stop when
    # it has not improved for this many consecutive evaluations (0: off). Needs curve_every.
    early_stopping: int = 0
    # Supervised (sft) tasks: the seeded three-way split (test = eval_fraction), the evaluated test examples and
    # generation for exact_match.
    validation_fraction: float = 0.1
    max_examples: int | None = 200  # test examples evaluated per sft task (evenly spaced; None: all)
    max_new_tokens: int = 32
    stop: list[str] = field(default_factory=lambda: ["\n"])
    # Which split of an sft task is evaluated: "test" (the results) or "validation" (tuning: a learning-rate
    # search reads validation only, so no test number is seen before the protocol is fixed).
    split: str = "test"


@dataclass
class OutputConfig:
    """What a run writes besides results.json / results.md."""

    save_adapter: bool = True  # final trained tensors (safetensors) — what the method changed
    save_model: bool = False  # also the merged full model via save_pretrained (large)
    plots: bool = True
    spectrum_plot: bool = True  # κ spectrum of the adapted tensors (needs kappatune.analysis)
    # bench: where every finished cell's results are committed (one JSON per cell, e.g.
    # benchmarks/results/<study>/cells); a bench skips cells already there and `bench --report` reads only them.
    cells_dir: str | None = None


@dataclass
class CompareConfig:
    """How a bench compares methods at equal task quality (the view the KappaTune authors argue for).

    ``reference``: the label of the method whose task perplexity in stage ``stage`` (per seed) is the target:
    at the stage end, or after ``step`` steps of it (a point of its learning curve). Every method's control
    perplexity is then read where its own learning curve of that stage first reaches the target (needs
    ``eval.curve_every``). Does not change any run, only the bench report.
    """

    reference: str | None = None
    stage: int = 1
    step: int | None = None
    baseline: str | None = None  # method label: every other method's paired per-seed differences against it
    # Study only: extra paired comparisons "ROW:CONTROL" (method labels; each row of ROW against CONTROL's row at
    # the same budget), e.g. "kappatune:random-type". Reported apart from the pre-registered family, as
    # exploratory, with Holm's correction over these contrasts alone; the pre-registered tables are unchanged.
    contrasts: list[str] = field(default_factory=list)


@dataclass
class LRSearchConfig:
    """A bench's learning-rate search on validation only (the same for every method).

    Every bench row (method, budget) trains ``steps`` steps (default: the stage's) on the ``task`` (``first``: the
    first task of the first order) at each learning rate ``factors[i] × the method's lr`` (``lr`` or
    ``training.lr``): the same grid size for every method, centred on its own scale. The criterion is the task's
    validation ``metric`` (sft: ``accuracy``) at the end of that stage; the best factor (the smaller on a tie)
    sets the lr of the row's real cells. Every trial is recorded in the bench output.
    """

    factors: list[float] = field(default_factory=lambda: [0.3, 1.0, 3.0])
    task: str = "first"
    steps: int | None = None
    metric: str = "accuracy"
    seed: int | None = None  # default: the bench's first seed
    # "row": every (method, budget) row is searched; "method": each method is searched once, at its first budget,
    # and its other budgets' rows use that lr (the same rule for every method, at about half the trials)
    per: str = "row"


@dataclass
class PreregTarget:
    """The pre-registered equal-quality point: where ``reference``'s learning curve of ``stage`` stands after
    ``fraction`` of its steps, read as ``metric`` (a curve key: ``task_accuracy``, ``task_ppl``)."""

    reference: str = "full"
    stage: int = 1
    fraction: float = 0.5
    metric: str = "task_accuracy"


@dataclass
class PreregisteredConfig:
    """Comparison points fixed before a study runs: the equal-quality ``target``, the ``primary`` metrics (bench
    metric keys; ``control_suite`` stands for every control probe's change) and the ``reference`` methods every
    row is paired against. Everything else a report shows is labelled exploratory. A bench refuses to change this
    block once cells are committed (its fingerprint is the study's identity)."""

    primary: list[str] = field(default_factory=lambda: ["acc", "bwt_acc", "control_suite"])
    reference: list[str] = field(default_factory=lambda: ["full", "lora"])
    target: PreregTarget | None = None


@dataclass
class RunConfig:
    """A complete run (``method``) or benchmark (``methods`` × ``seeds``)."""

    model: str
    tasks: list[TaskConfig]
    name: str = "run"
    # The control suite: what the base model can already do, each probe reported as change from base. One task
    # (``control: NAME`` as before) or a list; the first is the primary control (its perplexity is control_ppl).
    # null: no control (a `kappatune train` without --control; the control metrics are then null)
    control: Union[TaskConfig, list[TaskConfig], None] = field(default_factory=lambda: TaskConfig(corpus="control"))
    method: MethodSpec | None = None
    methods: list[MethodSpec] = field(default_factory=list)
    budget: int | None = None  # trainable-parameter target, matched by each method's for_budget
    seed: int = 0
    seeds: list[int] | None = None  # bench: one run per method and seed (default: [seed])
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    output_dir: str | None = None  # default: runs/<name>
    trust_remote_code: bool = False
    allow_missing_weights: bool = False  # load a checkpoint lacking weights of its architecture (new ones seeded)
    progress: bool = True
    num_threads: int | None = None  # torch CPU threads (None: torch's default); 1 is far faster on a busy small CPU
    # -- bench only (a study): several budgets, several task orders, a validation LR search, pre-registered points
    budgets: list[int] | None = None  # one row per budget for every budget-matched method (replaces ``budget``)
    orders: list[list[str]] | None = None  # task orders (task labels); each cell runs one (default: ``tasks`` as given)
    lr_search: LRSearchConfig | None = None
    preregistered: PreregisteredConfig | None = None

    # -- derived ---------------------------------------------------------------------------------------------
    def steps_per_stage(self) -> int:
        t = self.training
        if t.steps is not None:
            return t.steps
        assert t.tokens is not None
        return max(1, math.ceil(t.tokens / (t.batch_size * t.seq_len)))

    def out_dir(self) -> Path:
        return Path(self.output_dir if self.output_dir is not None else Path("runs") / self.name)

    def method_specs(self) -> list[MethodSpec]:
        return list(self.methods) if self.methods else ([self.method] if self.method else [])

    def control_suite(self) -> list[TaskConfig]:
        """The control probes (the first one is the primary control)."""
        if self.control is None:  # no control (kappatune train without --control)
            return []
        return list(self.control) if isinstance(self.control, list) else [self.control]

    def learning_rate(self) -> float:
        """The learning rate of this (single-method) run: the method's ``lr`` if set, else ``training.lr``."""
        spec = self.method
        return spec.lr if spec is not None and spec.lr is not None else self.training.lr

    def seed_list(self) -> list[int]:
        return list(self.seeds) if self.seeds else [self.seed]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def for_method(self, spec: MethodSpec, seed: int, output_dir: str | os.PathLike) -> "RunConfig":
        """The single-method, single-seed run config a benchmark cell executes."""
        return dataclasses.replace(
            self, method=spec, methods=[], seed=seed, seeds=None, output_dir=str(output_dir), compare=CompareConfig(),
            name=f"{self.name}/{spec.display}/seed-{seed}", budgets=None, orders=None, lr_search=None, preregistered=None,
        )

    def task_orders(self) -> list[list[str]]:
        """The task orders a bench runs (task labels), the config's ``tasks`` order first by default."""
        return [list(o) for o in self.orders] if self.orders else [[t.label for t in self.tasks]]


# ---------------------------------------------------------------------------------------------------------------
# Building typed dataclasses from plain YAML data, with one clear message per problem.
# ---------------------------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + (" or null" if len(args) < len(typing.get_args(tp)) else "")
    if origin in (list, Sequence):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"config: {where} must be {_type_name(tp)}, got null")
        dc = [a for a in args if dataclasses.is_dataclass(a)]
        lists = [a for a in args if typing.get_origin(a) is list]
        if dc and lists:  # e.g. control: a task or a list of tasks: keep the precise error of the shape given
            return _convert(value, lists[0] if isinstance(value, (list, tuple)) else dc[0], where)
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"config: {where} must be {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"config: {where} must be {_type_name(tp)}, got {value!r}")
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config: {where} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config: {where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
                return int(value)  # YAML "1e6" is a float
            raise ConfigError(f"config: {where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config: {where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"config: {where} must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"config: {where} must be a string, got {value!r}")
        return value
    return value


def _unknown_key_error(cls: type, key: str, valid: Sequence[str], where: str) -> ConfigError:
    hint = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    full = f"{where}.{key}" if where else key
    return ConfigError(
        f"config: unknown key {full!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
        + f"; valid keys here: {', '.join(valid)}"
    )


def _not_a_label_error(what: str, label: str, disp: Sequence[str]) -> ConfigError:
    """The one error for a config field naming a method label that the config does not have."""
    hint = difflib.get_close_matches(label, list(disp), n=1)
    return ConfigError(f"config: {what} {label!r} is not a method label of this config"
                       + (f" (did you mean {hint[0]!r}?)" if hint else "") + f"; labels: {', '.join(disp)}")


def _builtin_task_defaults(name: str) -> dict[str, Any]:
    """What a task entry naming a built-in supervised task means when it does not say: ``type: sft`` plus the
    task's own defaults (a control probe's metrics, chat template and size; ``kappatune.data.probes``)."""
    from .data.tasks import BUILTIN_TASKS

    spec = BUILTIN_TASKS.get(name)
    if spec is None:
        return {}
    return {"type": "sft", **dict(spec.meta.get("defaults") or {})}


def _build(cls: type, data: Any, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    flds = [f for f in dataclasses.fields(cls)]
    names = [f.name for f in flds]
    if isinstance(data, str) and cls is TaskConfig:  # shorthand: "- code" means {corpus: code}
        data = {"corpus": data}
    if cls is TaskConfig and isinstance(data, dict) and isinstance(data.get("corpus"), str):
        data = {**_builtin_task_defaults(data["corpus"]), **data}
    if isinstance(data, str) and cls is MethodSpec:
        data = {"name": data}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {where or 'the top level'} must be a mapping, got {data!r}")
    for key in data:
        if not isinstance(key, str) or key not in names:
            raise _unknown_key_error(cls, str(key), names, where)
    kwargs = {}
    for f in flds:
        sub = f"{where}.{f.name}" if where else f.name
        if f.name in data:
            kwargs[f.name] = _convert(data[f.name], hints[f.name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            raise ConfigError(f"config: missing required key {sub!r}")
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Semantic checks that need no model or data.
# ---------------------------------------------------------------------------------------------------------------

def _positive(value: int | float | None, where: str, *, allow_none: bool = True, zero_ok: bool = False) -> None:
    if value is None:
        if not allow_none:
            raise ConfigError(f"config: {where} is required")
        return
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"config: {where} must be {'>= 0' if zero_ok else '> 0'}, got {value!r}")


def _check_targets(t: TargetsConfig, where: str) -> None:
    if t.policy is not None and t.policy not in POLICIES:
        hint = difflib.get_close_matches(t.policy, POLICIES, n=1)
        raise ConfigError(
            f"config: {where}.policy: unknown policy {t.policy!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; choose one of {', '.join(POLICIES)}"
        )
    if t.top_p is not None and not (0.0 < t.top_p <= 1.0):
        raise ConfigError(f"config: {where}.top_p must be in (0, 1], got {t.top_p!r}")
    _positive(t.num_modules, f"{where}.num_modules")
    _positive(t.param_budget, f"{where}.param_budget")
    if t.threshold is not None and t.threshold <= 0:
        raise ConfigError(f"config: {where}.threshold must be > 0, got {t.threshold!r}")


def _check_task(t: TaskConfig, where: str) -> None:
    if t.type not in TASK_TYPES:
        raise ConfigError(f"config: {where}.type must be one of {', '.join(TASK_TYPES)}, got {t.type!r}")
    if t.max_examples is not None and (not isinstance(t.max_examples, int) or t.max_examples < 1):
        raise ConfigError(f"config: {where}.max_examples must be a positive integer (or null: eval.max_examples)")
    if t.metrics is not None:
        if not t.metrics:
            raise ConfigError(f"config: {where}.metrics must list at least one of {', '.join(METRICS)}")
        for m in t.metrics:
            if m not in METRICS:
                hint = difflib.get_close_matches(m, METRICS, n=1)
                raise ConfigError(f"config: {where}.metrics: unknown metric {m!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                                  + f"; choose from {', '.join(METRICS)}")
        if t.type == "lm" and set(t.metrics) - {"ppl"}:
            bad = sorted(set(t.metrics) - {"ppl"})[0]
            raise ConfigError(f"config: {where}: metric {bad!r} needs a supervised task (type: sft); an lm task has only ppl")


def _check_method(m: MethodSpec, where: str) -> None:
    if not m.name:
        raise ConfigError(f"config: {where}.name must name a method")
    from .methods import METHODS, get_method

    get_method(m.name)  # registers every method; an unknown name is an error suggesting the closest
    try:  # each method's declared option schema (types, ranges, choices, aliases), before any model is loaded
        METHODS[m.name].config_cls.from_dict(m.options)
    except ConfigError as exc:
        raise ConfigError(f"method {m.display!r}: {exc}") from None
    if m.targets is not None:
        _check_targets(m.targets, f"{where}.targets")
    _positive(m.budget, f"{where}.budget")
    _positive(m.lr, f"{where}.lr")


def validate_static(cfg: RunConfig) -> RunConfig:
    """Checks that need neither model nor data; raises :class:`ConfigError` on the first problem."""
    if not cfg.model:
        raise ConfigError("config: model must name a model (built-in name, directory or hub id)")
    if not cfg.name or Path(cfg.name).is_absolute() or ".." in Path(cfg.name).parts:
        raise ConfigError(
            f"config: name {cfg.name!r} must be a plain name without '..' (the default output directory is runs/<name>); "
            "set output_dir to write elsewhere"
        )
    if not cfg.tasks:
        raise ConfigError("config: tasks must list at least one corpus (the stages of the run)")
    labels = [t.label for t in cfg.tasks]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"config: task names must be unique, {dup[0]!r} appears twice (give each a 'name')")
    suite = cfg.control_suite()
    if not suite and cfg.control is not None:
        raise ConfigError("config: control must name at least one corpus or task (the control suite)")
    probes = [c.label for c in suite]
    for c in probes:
        if c in labels:
            raise ConfigError(f"config: the control {c!r} is also a task; pick another control")
    dup = sorted({x for x in probes if probes.count(x) > 1})
    if dup:
        raise ConfigError(f"config: control names must be unique, {dup[0]!r} appears twice (give each a 'name')")
    from .data.tasks import BUILTIN_TASKS

    for i, t in enumerate(cfg.tasks):
        _check_task(t, f"tasks[{i}]")
        if t.corpus in BUILTIN_TASKS and BUILTIN_TASKS[t.corpus].meta.get("probe_only"):
            raise ConfigError(f"config: tasks[{i}]: {t.corpus!r} is a control probe (the base model's own answers), "
                              "not a task to train on; list it under control")
    for i, t in enumerate(suite):
        _check_task(t, "control" if not isinstance(cfg.control, list) else f"control[{i}]")
    if cfg.method is not None and cfg.methods:
        raise ConfigError("config: give either 'method' (one run) or 'methods' (a benchmark), not both")
    if cfg.method is None and not cfg.methods:
        raise ConfigError("config: missing 'method' (e.g. method: {name: selective, targets: {policy: kappa}})")
    specs = cfg.method_specs()
    for i, m in enumerate(specs):
        _check_method(m, "method" if cfg.method is not None else f"methods[{i}]")
    disp = [m.display for m in specs]
    dup = sorted({x for x in disp if disp.count(x) > 1})
    if dup:
        raise ConfigError(f"config: method label {dup[0]!r} is used twice; give each entry a distinct 'label'")
    for d in disp:
        if not d or "/" in d or d.startswith(".") or os.sep in d:
            raise ConfigError(f"config: method label {d!r} must be a plain name (it becomes a directory name)")
    _positive(cfg.budget, "budget")
    if cfg.seeds is not None:
        if not cfg.seeds:
            raise ConfigError("config: seeds must list at least one seed")
        if len(set(cfg.seeds)) != len(cfg.seeds):
            raise ConfigError(f"config: seeds must be distinct, got {cfg.seeds}")
    t = cfg.training
    if t.steps is None and t.tokens is None:
        raise ConfigError("config: training.steps (or training.tokens) is required: how long each stage trains")
    if t.steps is not None and t.tokens is not None:
        raise ConfigError("config: give training.steps or training.tokens, not both")
    _positive(t.steps, "training.steps")
    _positive(t.tokens, "training.tokens")
    _positive(t.batch_size, "training.batch_size", allow_none=False)
    _positive(t.micro_batch_size, "training.micro_batch_size")
    if t.micro_batch_size is not None and t.batch_size % t.micro_batch_size:
        raise ConfigError(
            f"config: training.batch_size ({t.batch_size}) must be a multiple of training.micro_batch_size ({t.micro_batch_size})"
        )
    if t.seq_len < 2:
        raise ConfigError(f"config: training.seq_len must be >= 2, got {t.seq_len}")
    _positive(t.lr, "training.lr", allow_none=False)
    if t.schedule not in SCHEDULES:
        hint = difflib.get_close_matches(t.schedule, SCHEDULES, n=1)
        raise ConfigError(
            f"config: training.schedule: unknown schedule {t.schedule!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; choose one of {', '.join(SCHEDULES)}"
        )
    _positive(t.warmup_steps, "training.warmup_steps", zero_ok=True)
    if t.warmup_steps >= cfg.steps_per_stage() and t.warmup_steps > 0:
        raise ConfigError(
            f"config: training.warmup_steps ({t.warmup_steps}) must be smaller than the steps per stage ({cfg.steps_per_stage()})"
        )
    _positive(t.weight_decay, "training.weight_decay", zero_ok=True)
    _positive(t.max_grad_norm, "training.max_grad_norm")
    _positive(t.max_train_blocks, "training.max_train_blocks")
    _positive(t.checkpoint_every, "training.checkpoint_every", zero_ok=True)
    if t.mixed_precision not in MIXED_PRECISION:
        raise ConfigError(f"config: training.mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {t.mixed_precision!r}")
    for key, value, allowed in (("optimizer", t.optimizer, OPTIMIZERS), ("dtype", t.dtype, DTYPES)):
        if value not in allowed:
            hint = difflib.get_close_matches(str(value), allowed, n=1)
            raise ConfigError(f"config: training.{key}: unknown {key} {value!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                              + f"; choose one of {', '.join(allowed)}")
    if t.dtype == "bfloat16" and t.mixed_precision != "no":
        raise ConfigError("config: training.dtype bfloat16 already trains in bf16; leave training.mixed_precision at 'no'")
    _positive(cfg.num_threads, "num_threads")
    e = cfg.eval
    _positive(e.max_blocks, "eval.max_blocks", allow_none=False)
    _positive(e.batch_size, "eval.batch_size", allow_none=False)
    _positive(e.curve_every, "eval.curve_every", zero_ok=True)
    _positive(e.early_stopping, "eval.early_stopping", zero_ok=True)
    if e.early_stopping and not e.curve_every:
        raise ConfigError("config: eval.early_stopping needs validation during training: set eval.curve_every (e.g. 10)")
    if e.curve_stages is not None:
        bad = [k for k in e.curve_stages if not (1 <= k <= len(cfg.tasks))]
        if bad or not e.curve_stages:
            raise ConfigError(f"config: eval.curve_stages must list stages between 1 and {len(cfg.tasks)}, got {e.curve_stages}")
    c = cfg.compare
    if c.reference is not None:
        if c.reference not in disp:
            raise _not_a_label_error("compare.reference", c.reference, disp)
        if not (1 <= c.stage <= len(cfg.tasks)):
            raise ConfigError(f"config: compare.stage must be between 1 and the number of tasks ({len(cfg.tasks)}), got {c.stage}")
        if e.curve_every == 0:
            raise ConfigError("config: compare.reference needs learning curves: set eval.curve_every (e.g. 10)")
        if c.step is not None:
            if not (1 <= c.step <= cfg.steps_per_stage()) or (c.step % e.curve_every and c.step != cfg.steps_per_stage()):
                raise ConfigError(
                    f"config: compare.step {c.step} is not a learning-curve point: use a multiple of eval.curve_every "
                    f"({e.curve_every}) up to the steps per stage ({cfg.steps_per_stage()})"
                )
        if e.curve_stages is not None and c.stage not in e.curve_stages:
            raise ConfigError(f"config: compare.stage {c.stage} has no learning curve: add it to eval.curve_stages")
    if not (0.0 < e.eval_fraction < 1.0):
        raise ConfigError(f"config: eval.eval_fraction must be in (0, 1), got {e.eval_fraction!r}")
    if not (0.0 < e.validation_fraction < 1.0) or e.validation_fraction + e.eval_fraction >= 1.0:
        raise ConfigError(f"config: eval.validation_fraction must be in (0, 1) with eval.validation_fraction + "
                          f"eval.eval_fraction < 1, got {e.validation_fraction!r}")
    _positive(e.max_examples, "eval.max_examples")
    _positive(e.max_new_tokens, "eval.max_new_tokens", allow_none=False)
    _check_study(cfg, disp)
    _check_contrasts(cfg, disp)
    if c.baseline is not None and c.baseline not in disp:
        raise _not_a_label_error("compare.baseline", c.baseline, disp)
    return cfg


def _check_contrasts(cfg: RunConfig, disp: list[str]) -> None:
    """``compare.contrasts``: "ROW:CONTROL" pairs of two different method labels, in a study (its rows pair by budget)."""
    contrasts = cfg.compare.contrasts
    if not contrasts:
        return
    if not isinstance(contrasts, list) or not all(isinstance(x, str) for x in contrasts):
        raise ConfigError(f"config: compare.contrasts must be a list of 'ROW:CONTROL' strings, got {contrasts!r}")
    if cfg.budgets is None and cfg.orders is None and cfg.preregistered is None:
        raise ConfigError("config: compare.contrasts is for studies (budgets, orders or preregistered set); "
                          "a plain bench pairs every method with compare.baseline")
    for x in contrasts:
        parts = x.split(":")
        if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
            raise ConfigError(f"config: compare.contrasts entry {x!r} must be 'ROW:CONTROL', two different method "
                              "labels, e.g. 'kappatune:random-type'")
        for lab in parts:
            if lab not in disp:
                raise _not_a_label_error(f"compare.contrasts entry {x!r}:", lab, disp)
    if len(set(contrasts)) != len(contrasts):
        raise ConfigError(f"config: compare.contrasts lists a pair twice: {contrasts!r}")


def _check_study(cfg: RunConfig, disp: list[str]) -> None:
    """The bench-only study keys: budgets, orders, lr_search, preregistered."""
    if cfg.budgets is not None:
        if not cfg.budgets or len(set(cfg.budgets)) != len(cfg.budgets):
            raise ConfigError(f"config: budgets must list distinct budgets, got {cfg.budgets}")
        for i, b in enumerate(cfg.budgets):
            _positive(b, f"budgets[{i}]", allow_none=False)
        if cfg.budget is not None:
            raise ConfigError("config: give budget (one) or budgets (several), not both")
    labels = [t.label for t in cfg.tasks]
    if cfg.orders is not None:
        if not cfg.orders:
            raise ConfigError("config: orders must list at least one task order")
        for i, o in enumerate(cfg.orders):
            if sorted(o) != sorted(labels):
                raise ConfigError(f"config: orders[{i}] {o} must be a permutation of the task labels {labels}")
    if cfg.eval.split not in ("test", "validation"):
        raise ConfigError(f"config: eval.split must be 'test' or 'validation', got {cfg.eval.split!r}")
    ls = cfg.lr_search
    if ls is not None:
        if not ls.factors or any(not (isinstance(f, (int, float)) and f > 0) for f in ls.factors):
            raise ConfigError(f"config: lr_search.factors must list positive learning-rate multipliers, got {ls.factors}")
        if len(set(ls.factors)) != len(ls.factors):
            raise ConfigError(f"config: lr_search.factors must be distinct, got {ls.factors}")
        if ls.task != "first" and ls.task not in labels:
            raise ConfigError(f"config: lr_search.task {ls.task!r} must be 'first' or a task label ({', '.join(labels)})")
        _positive(ls.steps, "lr_search.steps")
        task = cfg.tasks[0] if ls.task == "first" else cfg.tasks[labels.index(ls.task)]
        if ls.task == "first" and cfg.orders:
            task = cfg.tasks[labels.index(cfg.orders[0][0])]
        if task.type != "sft":
            raise ConfigError(f"config: lr_search needs an sft task (the search on raw-text tasks is not implemented); "
                              f"task {task.label!r} is type {task.type!r}")
        if ls.metric not in METRICS:
            raise ConfigError(f"config: lr_search.metric must be one of {', '.join(METRICS)}, got {ls.metric!r}")
        if ls.per not in ("row", "method"):
            raise ConfigError(f"config: lr_search.per must be 'row' or 'method', got {ls.per!r}")
    pr = cfg.preregistered
    if pr is not None:
        if not pr.primary:
            raise ConfigError("config: preregistered.primary must name at least one metric")
        for r in pr.reference:
            if r not in disp:
                raise _not_a_label_error("preregistered.reference", r, disp)
        t = pr.target
        if t is not None:
            if t.reference not in disp:
                raise _not_a_label_error("preregistered.target.reference", t.reference, disp)
            if not (0.0 < t.fraction <= 1.0):
                raise ConfigError(f"config: preregistered.target.fraction must be in (0, 1], got {t.fraction}")
            if not (1 <= t.stage <= len(cfg.tasks)):
                raise ConfigError(f"config: preregistered.target.stage must be between 1 and {len(cfg.tasks)}, got {t.stage}")
            if not t.metric.startswith("task_"):
                raise ConfigError(f"config: preregistered.target.metric must be a learning-curve key (task_ppl, "
                                  f"task_accuracy, ...), got {t.metric!r}")
            every, steps = cfg.eval.curve_every, cfg.steps_per_stage()
            step = round(t.fraction * steps)
            if every == 0 or (step % every and step != steps) or step < 1:
                raise ConfigError(f"config: preregistered.target: {t.fraction} of {steps} steps is step {step}, which "
                                  f"is not a learning-curve point (eval.curve_every = {every})")
            if cfg.eval.curve_stages is not None and t.stage not in cfg.eval.curve_stages:
                raise ConfigError(f"config: preregistered.target.stage {t.stage} has no learning curve: add it to eval.curve_stages")


# ---------------------------------------------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------------------------------------------

def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (value parsed as YAML: ``5``, ``1e-4``, ``[0, 1]``, ``null``)."""
    import copy

    import yaml

    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. training.steps=10)")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc.__class__.__name__})") from exc
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key part")
        node = data
        for p in parts[:-1]:
            if isinstance(node, list):
                try:
                    node = node[int(p)]
                    continue
                except (ValueError, IndexError):
                    raise ConfigError(f"override {item!r}: {p!r} is not an index of the list") from None
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, (dict, list)):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node = nxt
        if isinstance(node, list):
            try:
                node[int(parts[-1])] = value
            except (ValueError, IndexError):
                raise ConfigError(f"override {item!r}: {parts[-1]!r} is not an index of the list") from None
        else:
            node[parts[-1]] = value
    return data


MAX_CONFIG_VALUES = 100_000


def _check_size(data: Any) -> None:
    """Refuse a config that expands to more than :data:`MAX_CONFIG_VALUES` values: YAML aliases share objects, so
    a few lines of nested anchors (a "billion laughs") would otherwise hang the later deep copies and hashing."""
    stack, seen = [data], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_VALUES:
            raise ConfigError(f"config expands to more than {MAX_CONFIG_VALUES:,} values (nested YAML aliases?); simplify it")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


def config_from_dict(data: dict[str, Any], overrides: Sequence[str] = ()) -> RunConfig:
    """Build and statically validate a :class:`RunConfig` from plain data (as YAML gives it)."""
    if data is None:
        raise ConfigError("config is empty; it needs at least 'model', 'tasks', 'method' and 'training.steps'")
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping at the top level, got {type(data).__name__}")
    if overrides:
        data = apply_overrides(data, overrides)
    _check_size(data)
    cfg = _build(RunConfig, data)
    return validate_static(cfg)


def _reject_duplicate_keys(text: str, path: Path) -> None:
    """Refuse a mapping that repeats a key: YAML keeps only the last one, so a second ``training:`` section
    would silently replace the whole first. Walks the composed node graph (no objects are constructed; shared
    alias nodes are visited once, so an alias bomb stays cheap)."""
    import yaml

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, Any] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    k = (key.tag, key.value)
                    if k in first:
                        raise ConfigError(
                            f"config file {path}: key {key.value!r} appears twice (lines {first[k].line + 1} and "
                            f"{key.start_mark.line + 1}); YAML would silently keep only the last, merge them into one"
                        )
                    first[k] = key.start_mark
                stack.extend((key, value))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML config file (``yaml.safe_load``), apply overrides and validate statically."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from None
    try:
        _reject_duplicate_keys(text, p)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or exc.__class__.__name__
        raise ConfigError(f"config file {p} is not valid YAML{where}: {problem}") from None
    return config_from_dict(data, overrides)


# Keys that do not change results: excluded from the fingerprint that guards --resume.
_NON_RESULT_KEYS = ("output_dir", "progress", "name", "compare")


_LATER_KEYS = (
    ("training", "optimizer", "adamw"), ("training", "dtype", "float32"), ("training", "gradient_checkpointing", False),
    ("eval", "early_stopping", 0), ("eval", "split", "test"), (None, "budgets", None), (None, "orders", None),
    (None, "lr_search", None), (None, "preregistered", None), ("training", "packing", False),
)


def config_fingerprint(cfg: RunConfig) -> str:
    """A hash of everything in the config that affects results (not the output dir or progress display)."""
    d = cfg.to_dict()
    for k in _NON_RESULT_KEYS:
        d.pop(k, None)
    d["training"].pop("checkpoint_every", None)
    # Keys added after runs were recorded: at their defaults they leave the fingerprint as it was, so runs written
    # before they existed still resume.
    for section, key, default in _LATER_KEYS:
        node = d.get(section) if section else d
        if isinstance(node, dict) and node.get(key, default) == default:
            node.pop(key, None)
    for m in ([d.get("method")] if d.get("method") else []) + list(d.get("methods") or []):
        if isinstance(m, dict) and isinstance(m.get("targets"), dict) and m["targets"].get("modules") is None:
            m["targets"].pop("modules", None)
    if not d.get("allow_missing_weights"):  # added later: the default leaves older runs' fingerprints unchanged
        d.pop("allow_missing_weights", None)
    d["output"] = {}
    # Keys added with supervised tasks drop out at their defaults, so configs written before them keep their
    # fingerprint (and their run directories stay resumable).
    task_defaults = {f.name: f.default for f in dataclasses.fields(TaskConfig) if f.name not in ("corpus", "name", "text_field")}
    for t in d["tasks"] + (d["control"] if isinstance(d["control"], list) else [d["control"]] if d["control"] else []):
        for k, v in task_defaults.items():
            if t.get(k) == v:
                t.pop(k)
        if t.get("type") == "lm":  # the default before types were detected (and what a missing type still means)
            t.pop("type")
    for k, v in (("validation_fraction", 0.1), ("max_examples", 200), ("max_new_tokens", 32), ("stop", ["\n"])):
        if d["eval"].get(k) == v:
            d["eval"].pop(k)
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
