"""The one small interface every forgetting-aware method implements.

A method takes a model, a target selection and its own config; :meth:`Method.prepare` freezes/wraps the model
in place, after which :meth:`trainable_parameters` lists what the optimizer may touch and
:meth:`make_optimizer` builds that optimizer (selective methods restrict gradients *and* optimizer state).
:meth:`merge` folds any adapter back so the result is a plain model that ``save_pretrained`` accepts;
:meth:`save` / :meth:`load` store only the trained tensors as safetensors, tagged with a fingerprint of the
base weights so they are never applied to a different base.
"""

from __future__ import annotations

import json
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
    if not isinstance(param_budget, int) or isinstance(param_budget, bool) or param_budget <= 0:
        raise ConfigError(f"param_budget must be a positive integer, got {param_budget!r}")
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


@dataclass
class MethodConfig:
    """Base config; each method subclasses it with its own knobs (rank, alpha, ...)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "MethodConfig":
        data = dict(data or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            import difflib

            hints = [difflib.get_close_matches(k, names, n=1) for k in unknown]
            msg = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in zip(unknown, hints))
            raise ConfigError(f"unknown option(s) for {cls.__name__}: {msg}; valid: {', '.join(sorted(names))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Method(ABC):
    """Base class; subclasses set ``name`` and ``config_cls`` and implement ``_prepare``."""

    name: ClassVar[str]
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, config: MethodConfig | dict | None = None):
        if config is None or isinstance(config, dict):
            config = self.config_cls.from_dict(config)
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

    def save(self, path: str | Path, extra_metadata: dict[str, Any] | None = None) -> Path:
        """Write the trained tensors as safetensors, tagged with method, config, targets and base-weight
        fingerprints (plus ``extra_metadata``, e.g. the base model's name)."""
        from safetensors.torch import save

        from ..storage import atomic_write_bytes

        meta = {"method": self.name, "config": json.dumps(self.config.to_dict(), default=str),
                "base_fingerprint": self.base_fingerprint or "",
                "base_fingerprint_robust": self.base_fingerprint_robust or ""}
        targets = self.adapted_names()
        if targets is not None:
            meta["targets"] = json.dumps(targets)
        meta.update({k: str(v) for k, v in (extra_metadata or {}).items()})
        return atomic_write_bytes(path, save(self.trained_state(), metadata=meta))

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
