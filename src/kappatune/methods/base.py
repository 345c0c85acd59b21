"""The one small interface every forgetting-aware method implements.

A method takes a model, a target selection and its own config; :meth:`Method.prepare` freezes/wraps the model
in place, after which :meth:`trainable_parameters` lists what the optimizer may touch and
:meth:`make_optimizer` builds that optimizer (selective methods restrict gradients *and* optimizer state).
:meth:`merge` folds any adapter back so the result is a plain model that ``save_pretrained`` accepts;
:meth:`save` / :meth:`load` store only the trained tensors as safetensors, tagged with a fingerprint of the
base weights so they are never applied to a different base.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
import warnings
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Sequence, TypeVar, Union

import torch
from torch import nn

from ..errors import CacheError, ConfigError, require_prepared
from ..selection import Selection

# What a method adapts: a Selection, explicit module names, or "all-linear".
Targets = Union[Selection, Sequence[str], str, None]

_K = TypeVar("_K")


@dataclass(frozen=True)
class BudgetReport:
    """What budget matching chose: the knob, its value and the exact trainable-parameter count it gives.

    ``num_params`` is exact (what :meth:`Method.num_trainable` reports after ``prepare``), so results tables
    can print the real budget next to the requested one.
    """

    method: str
    param_budget: int
    knob: str
    value: Any
    num_params: int
    tolerance: float = 0.10

    @property
    def relative_error(self) -> float:
        return (self.num_params - self.param_budget) / self.param_budget

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["relative_error"] = self.relative_error
        return d


def match_budget(
    method: str,
    param_budget: int,
    candidates: Iterable[_K],
    count: Callable[[_K], int],
    *,
    knob: str,
    tolerance: float = 0.10,
    describe: Callable[[_K], str] | None = None,
) -> BudgetReport:
    """Pick the knob value whose exact trainable count is closest to ``param_budget``; it must be within ±tolerance.

    The shared search behind every :meth:`Method.for_budget`: each method supplies its candidate knob values
    (ranks, numbers of tensors, ...) and an exact counting function; ties go to the earlier (smaller) candidate.
    ``describe`` renders a candidate for the error message when it is not itself the knob's value.
    Raises :class:`ConfigError` naming the nearest reachable counts when nothing lands inside the tolerance.
    """
    param_budget = check_param_budget(param_budget, tolerance)
    best: tuple[int, Any, int] | None = None  # (distance, value, count)
    seen = 0
    for value in candidates:
        seen += 1
        n = int(count(value))
        dist = abs(n - param_budget)
        if best is None or dist < best[0]:
            best = (dist, value, n)
    if best is None:
        raise ConfigError(f"method {method!r}: no {knob} value is possible for these targets (empty selection?)")
    report = BudgetReport(method, param_budget, knob, best[1], best[2], tolerance)
    if abs(report.relative_error) > tolerance:
        raise ConfigError(
            f"method {method!r} cannot land within ±{tolerance:.0%} of {param_budget:,} trainable parameters: "
            f"the closest is {knob}={describe(best[1]) if describe else repr(best[1])} with {best[2]:,} "
            f"({report.relative_error:+.1%}); "
            "change the budget or the targets"
        )
    return report


def option(
    default: Any = dataclasses.MISSING,
    *,
    min: float | None = None,
    max: float | None = None,
    min_open: bool = False,
    max_open: bool = False,
    choices: Sequence[Any] | None = None,
    aliases: Sequence[str] = (),
    check: Callable[[Any, str], Any] | None = None,
    doc: str = "",
) -> Any:
    """Declare one method option: a dataclass field whose *type* is its annotation, plus the rest of its schema —
    ``min``/``max`` (``min_open``/``max_open``: exclusive bounds), ``choices``, ``aliases`` (other names a config
    may use, e.g. PEFT's ``r`` for LoRA's ``rank``) and ``check(value, name)`` (returns the value, possibly
    normalised, or raises :class:`ConfigError`). :class:`MethodConfig` enforces it on construction, so every way
    in (YAML config, ``get_method``, ``for_budget``, the constructor) is checked the same way."""
    meta = {"min": min, "max": max, "min_open": min_open, "max_open": max_open,
            "choices": tuple(choices) if choices is not None else None, "aliases": tuple(aliases), "check": check,
            "doc": doc}
    return dataclasses.field(default=default, metadata={"kappatune": meta})


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(tp))
        return " or ".join(_type_name(a) for a in args) + (" or null" if nullable else "")
    if origin in (list, tuple, Sequence):
        return f"a list of {_type_name(typing.get_args(tp)[0]).removeprefix('an ').removeprefix('a ')}s"
    if origin is dict:
        k, v = typing.get_args(tp) or (Any, Any)
        return f"a mapping of {_type_name(k)} to {_type_name(v)}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, getattr(tp, "__name__", str(tp)))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (the small set of annotation types method options use), or :class:`_Mismatch`.

    Lenient only where YAML is ambiguous: an integral float (``1e6``) is an int, a numeric string (YAML 1.1 reads
    ``1e-4`` as a string) is a float. ``bool`` is never a number, and NaN/inf are never valid numbers."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _Mismatch
        # the member of the value's own type first: Union[int, float] keeps 1 an int and 1.0 a float
        for a in sorted((a for a in args if a is not type(None)), key=lambda a: a is not type(value)):
            try:
                return _coerce(value, a)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin in (list, Sequence):
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [_coerce(v, item) for v in value]
    if origin is dict:
        kt, vt = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise _Mismatch
        return {_coerce(k, kt): _coerce(v, vt) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise _Mismatch
        return value
    if tp is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) < 2**53:
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Mismatch
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise _Mismatch from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _Mismatch
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _Mismatch
        return value
    return value


@dataclass
class MethodConfig:
    """Base config; each method subclasses it with its own options, declared with :func:`option`.

    The declared schema (type from the annotation; range, choices, aliases from :func:`option`) is enforced in
    ``__post_init__``: a wrong type, a value out of range or not among the choices is one :class:`ConfigError`
    naming the option, the value and what is allowed. Subclasses add cross-option checks in :meth:`validate`.
    """

    @classmethod
    def aliases(cls) -> dict[str, str]:
        """``{alias: option}`` for every option that declares aliases."""
        return {a: f.name for f in fields(cls) for a in _meta(f).get("aliases", ())}

    @classmethod
    def translate(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Hook: rewrite options that are not plain renames (e.g. LoRA's ``target_modules``) into native ones."""
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "MethodConfig":
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"options for {cls.__name__} must be a mapping, got {data!r}")
        data = dict(data or {})
        bad_keys = [k for k in data if not isinstance(k, str)]
        if bad_keys:
            raise ConfigError(f"option names must be strings, got {bad_keys[0]!r}")
        data = cls.translate(data)
        aliases = cls.aliases()
        for alias, name in aliases.items():
            if alias in data:
                if name in data:
                    raise ConfigError(f"options {alias!r} and {name!r} are the same option ({alias!r} is an alias); give one")
                data[name] = data.pop(alias)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            import difflib

            valid = names | set(aliases)
            hints = [difflib.get_close_matches(k, valid, n=1) for k in unknown]
            msg = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in zip(unknown, hints))
            raise ConfigError(f"unknown option(s) for {cls.__name__}: {msg}; valid: {', '.join(sorted(names))}")
        return cls(**data)

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            given = value = getattr(self, f.name)
            meta = _meta(f)
            try:
                value = _coerce(value, hints.get(f.name, Any))
            except _Mismatch:
                raise ConfigError(f"{f.name} must be {_type_name(hints[f.name])}, got {given!r}") from None
            if value is not None and not isinstance(value, bool) and isinstance(value, (int, float)):
                lo, hi = meta.get("min"), meta.get("max")
                if (lo is not None and (value < lo or (meta["min_open"] and value == lo))) or (
                    hi is not None and (value > hi or (meta["max_open"] and value == hi))
                ):
                    raise ConfigError(f"{f.name} must be {_range_text(meta)}, got {given!r}")
            if value is not None and meta.get("choices") is not None and value not in meta["choices"]:
                import difflib

                hint = difflib.get_close_matches(str(value), [str(c) for c in meta["choices"]], n=1)
                raise ConfigError(
                    f"{f.name}: {value!r} is not one of {', '.join(map(str, meta['choices']))}"
                    + (f" (did you mean {hint[0]!r}?)" if hint else "")
                )
            if value is not None and meta.get("check") is not None:
                value = meta["check"](value, f.name)
            object.__setattr__(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Hook: checks across options (e.g. ``min_retention <= max_retention``); raise :class:`ConfigError`."""

    @classmethod
    def schema(cls) -> list[dict[str, Any]]:
        """The declared options: name, type, default, range, choices and aliases (for docs and tools)."""
        hints = typing.get_type_hints(cls)
        out = []
        for f in fields(cls):
            meta = _meta(f)
            entry: dict[str, Any] = {"name": f.name, "type": _type_name(hints.get(f.name, Any)),
                                     "default": None if f.default is dataclasses.MISSING else f.default}
            if meta.get("min") is not None or meta.get("max") is not None:
                entry["range"] = _range_text(meta)
            if meta.get("choices") is not None:
                entry["choices"] = list(meta["choices"])
            if meta.get("aliases"):
                entry["aliases"] = list(meta["aliases"])
            if meta.get("doc"):
                entry["doc"] = meta["doc"]
            out.append(entry)
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _meta(f: dataclasses.Field) -> dict[str, Any]:
    return dict(f.metadata.get("kappatune", {}))


def _range_text(meta: dict[str, Any]) -> str:
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        return f"in {'(' if meta['min_open'] else '['}{lo}, {hi}{')' if meta['max_open'] else ']'}"
    if lo is not None:
        return f"{'>' if meta['min_open'] else '≥'} {lo}"
    return f"{'<' if meta['max_open'] else '≤'} {hi}"


def check_param_budget(param_budget: Any, tolerance: Any = 0.10) -> int:
    """``param_budget`` as a positive integer (an integral float such as YAML's ``2e4`` is accepted), and a
    tolerance in (0, 1); anything else (``'20000'``, NaN, ``True``, 0) is a :class:`ConfigError`."""
    ok = isinstance(param_budget, int) and not isinstance(param_budget, bool)
    if isinstance(param_budget, float) and math.isfinite(param_budget) and param_budget.is_integer():
        param_budget, ok = int(param_budget), True
    if not ok or param_budget <= 0:
        raise ConfigError(f"param_budget must be a positive integer (trainable parameters), got {param_budget!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1:
        raise ConfigError(f"tolerance must be a number in (0, 1), got {tolerance!r}")
    return param_budget


class Method(ABC):
    """Base class; subclasses set ``name`` and ``config_cls`` and implement ``_prepare``."""

    name: ClassVar[str]
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    #: Why the method cannot train a model sharded with FSDP (``None``: it can); the harness refuses with it.
    fsdp_unsupported: ClassVar[str | None] = None

    def __init__(self, config: MethodConfig | dict | None = None):
        if not isinstance(config, self.config_cls):
            if isinstance(config, MethodConfig):
                raise ConfigError(f"method {self.name!r} takes a {self.config_cls.__name__} or a dict, got a {type(config).__name__}")
            try:
                config = self.config_cls.from_dict(config)
            except ConfigError as exc:
                msg = str(exc)
                raise ConfigError(msg if msg.startswith("method ") else f"method {self.name!r}: {msg}") from None
        self.config = config
        self.model: nn.Module | None = None
        self.base_fingerprint: str | None = None
        self.base_fingerprint_robust: str | None = None  # survives a dtype cast of the base (see fingerprint_model)
        # Set by for_budget(): what was chosen, and the targets prepare() uses when called without targets.
        self.budget_report: BudgetReport | None = None
        self.default_targets: Targets = None

    # -- budget matching -------------------------------------------------------------------------------------
    @classmethod
    def for_budget(
        cls,
        model: nn.Module,
        param_budget: int,
        targets: Targets = None,
        *,
        tolerance: float = 0.10,
        **config: Any,
    ) -> "Method":
        """A configured (not yet prepared) method whose trainable count is within ±``tolerance`` of ``param_budget``.

        ``targets=None`` means the method's own default (all linear layers, or the policy in its config).
        Each method picks its own knob (number of tensors, LoRA rank, ...) without modifying ``model``; the
        result carries ``budget_report`` (knob, value, exact count) and ``default_targets`` so that
        ``m.prepare(model)`` uses the same targets. Implementations typically call :func:`match_budget`.
        """
        raise ConfigError(f"method {cls.name!r} does not support budget matching (param_budget)")

    # -- lifecycle -------------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, targets: Targets = None) -> nn.Module:
        """Freeze/wrap ``model`` for training on ``targets``; returns the model to train (may be a wrapper).

        ``targets=None`` means the targets chosen by :meth:`for_budget` if any, else the method's default:
        ``_prepare`` then receives ``None``, which :func:`resolve_linear_targets` reads as ``"all-linear"``
        (a method may instead derive targets from its own config, e.g. a selection policy).
        """
        from ..storage import fingerprint_model

        if targets is None:
            targets = self.default_targets
        self.base_fingerprint = fingerprint_model(model)
        self.base_fingerprint_robust = fingerprint_model(model, dtype_robust=True)
        self.model = self._prepare(model, targets)
        if self.num_trainable() == 0:
            raise ConfigError(f"method {self.name!r}: the selection leaves no trainable parameter")
        return self.model

    @abstractmethod
    def _prepare(self, model: nn.Module, targets: Targets) -> nn.Module: ...

    def trainable_parameters(self) -> list[nn.Parameter]:
        require_prepared(self)
        return [p for p in self.model.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def make_optimizer(self, optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW, **kwargs: Any) -> torch.optim.Optimizer:
        return optimizer_cls(self.trainable_parameters(), **kwargs)

    def merge(self) -> nn.Module:
        """Return a plain model with the adaptation folded into the weights (default: the model itself)."""
        require_prepared(self)
        return self.model

    # -- persistence -----------------------------------------------------------------------------------------
    def trained_state(self) -> dict[str, torch.Tensor]:
        """The tensors training changed (what an adapter file holds)."""
        require_prepared(self)
        return {n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}

    def save(self, path: str | Path, state: dict[str, torch.Tensor] | None = None,
             extra_metadata: dict[str, Any] | None = None) -> Path:
        """Write the trained tensors as safetensors, tagged with method, config, targets and base-weight
        fingerprints (plus ``extra_metadata``, e.g. the base model's name).

        ``state``: the tensors to write instead of :meth:`trained_state` (e.g. gathered from FSDP shards by
        :func:`kappatune.training.gather_trained_state`)."""
        from safetensors.torch import save

        from ..storage import atomic_write_bytes

        meta = {"method": self.name, "config": json.dumps(self.config.to_dict(), default=str),
                "base_fingerprint": self.base_fingerprint or "",
                "base_fingerprint_robust": self.base_fingerprint_robust or ""}
        targets = self.adapted_names()
        if targets is not None:
            meta["targets"] = json.dumps(targets)
        meta.update({k: str(v) for k, v in (extra_metadata or {}).items()})
        return atomic_write_bytes(path, save(self.trained_state() if state is None else state, metadata=meta))

    def adapted_names(self) -> list[str] | None:
        """The tensors/modules this prepared method adapts (recorded in adapter files so that
        :func:`load_adapter` rebuilds exactly this selection, whatever a policy would pick on a recast base)."""
        sel = getattr(self, "selection", None)
        if isinstance(sel, Selection):
            return list(sel.parameter_names)
        names = getattr(self, "target_names", None)  # set by the spectral methods' prepare (module names)
        return list(names) if names else None

    def read_adapter(self, path: str | Path, *, strict: bool = True) -> dict[str, torch.Tensor]:
        """The tensors of an adapter file written by :meth:`save`; refuses a missing or corrupt file, another
        method, or another base model (weight fingerprint).

        The base check accepts the exact weights or the same weights in another dtype (e.g. the base cast to
        bfloat16: dtype-robust fingerprint). ``strict=False`` loads despite a mismatch, with a warning: for a base
        you know is the same (e.g. re-quantised), at your own risk."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise CacheError(f"adapter file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                # clone: safetensors hands out views into the mapped file, aligned only as the header length
                # allows; BLAS kernels may round differently on unaligned operands, and a resumed run must compute
                # bitwise what an uninterrupted one does (in-memory tensors are allocator-aligned)
                state = {k: fh.get_tensor(k).clone() for k in fh.keys()}
        except Exception as exc:  # safetensors raises its own error types on corrupt headers
            raise CacheError(f"adapter file {path} is corrupt or not safetensors: {exc}") from exc
        if meta.get("method") != self.name:
            raise CacheError(f"adapter {path} was written by method {meta.get('method')!r}, not {self.name!r}")
        exact = meta.get("base_fingerprint") == self.base_fingerprint
        robust = bool(meta.get("base_fingerprint_robust")) and meta.get("base_fingerprint_robust") == self.base_fingerprint_robust
        if not (exact or robust):
            if strict:
                raise CacheError(
                    f"adapter {path} was trained on a different base model (weight fingerprint mismatch), not on these "
                    "weights in another dtype either; if you are sure it fits, load it with strict=False"
                )
            warnings.warn(f"adapter {path} was trained on a different base model (weight fingerprint mismatch); "
                          "loading it anyway (strict=False)", UserWarning, stacklevel=3)
        return state

    def load(self, path: str | Path, *, strict: bool = True) -> None:
        """Load tensors written by :meth:`save` into the prepared model; refuses another base or method
        (``strict=False``: loads despite a base mismatch, with a warning)."""
        require_prepared(self)
        state = self.read_adapter(path, strict=strict)
        params = dict(self.model.named_parameters())
        missing = [k for k in state if k not in params]
        if missing:
            raise CacheError(f"adapter {path} has tensors this model lacks: {missing[:3]}")
        wrong = [f"{k} {tuple(v.shape)} vs {tuple(params[k].shape)}" for k, v in state.items() if v.shape != params[k].shape]
        if wrong:
            raise CacheError(f"adapter {path} does not fit this method's config (shape mismatch: {wrong[0]}); "
                             "prepare the method with the config it was saved with")
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)


def resolve_linear_targets(model: nn.Module, targets: Targets) -> list[str]:
    """Module names of the 2-D linear-like layers to adapt (``all-linear`` excludes the output head)."""
    from transformers.pytorch_utils import Conv1D

    linear = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    if targets is None or targets == "all-linear":
        out_emb = getattr(model, "get_output_embeddings", lambda: None)()
        head = {n for n, m in model.named_modules() if m is out_emb}
        return [n for n in linear if n not in head]
    names = list(targets.module_names) if isinstance(targets, Selection) else [targets] if isinstance(targets, str) else list(targets)
    from ..selection import match_module_names

    known = set(linear)
    out: list[str] = []
    bad = []
    for n in names:  # full names, or PEFT-style suffixes ("q_proj" = every module whose name ends in ".q_proj")
        hits = [n] if n in known else match_module_names(linear, [n])
        out.extend(hits) if hits else bad.append(n)
    if bad:
        raise ConfigError(f"target module(s) not found or not linear: {', '.join(bad[:5])}")
    if not out:
        raise ConfigError("empty selection: no module to adapt")
    return list(dict.fromkeys(out))


def read_adapter_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an adapter file written by :meth:`Method.save` (method, config, targets, fingerprints)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CacheError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types on corrupt headers
        raise CacheError(f"adapter file {path} is corrupt or not safetensors: {exc}") from exc
    if "method" not in meta or "config" not in meta:
        raise CacheError(f"{path} is not a kappatune adapter (no method/config metadata)")
    return meta


def load_adapter(model: nn.Module, path: str | Path, *, strict: bool = True) -> "Method":
    """Rebuild the method an adapter file was saved by (name, config and the exact targets from its metadata),
    prepare ``model`` with it and load the trained tensors; returns the prepared method (``.model`` to use,
    ``.merge()`` for a plain model).

    ``path``: the ``.safetensors`` file, or a directory holding ``adapter.safetensors`` (a ``kappatune train``
    output). ``model`` must be the base the adapter was trained on (in any dtype); ``strict=False`` accepts
    another base with a warning.
    """
    from . import get_method

    p = Path(path)
    if p.is_dir():
        p = p / "adapter.safetensors"
    meta = read_adapter_metadata(p)
    try:
        config = json.loads(meta["config"])
        targets = json.loads(meta["targets"]) if meta.get("targets") else None
    except ValueError as exc:
        raise CacheError(f"adapter {p} has unreadable metadata ({exc})") from None
    config.pop("param_budget", None)  # the budget was resolved when it was saved: its targets/ranks are recorded
    method = get_method(meta["method"], config)
    method.prepare(model, targets)
    method.load(p, strict=strict)
    return method
