"""KappaTune selective full fine-tuning: train only the selected weight tensors, leave every other one bitwise unchanged.

:class:`SelectiveOptimizer` wraps *any* ``torch.optim.Optimizer`` class. Only selected tensors keep
``requires_grad`` (so only they get gradients) and only they are handed to the inner optimizer (so only they get
optimizer state: AdamW's two moments scale with the selection, not the model). It is a real
``torch.optim.Optimizer`` subclass sharing ``param_groups``/``state`` with the inner optimizer, so LR schedulers,
a transformers ``Trainer`` (``optimizers=(opt, None)``) and ``accelerate.Accelerator.prepare`` use it unchanged.

The ``"selective"`` method picks the tensors with a policy from :mod:`kappatune.selection`: ``kappa`` (KappaTune,
lowest condition number first), ``snr`` (the Spectrum baseline) or ``random`` (seeded, same budget).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ..errors import ConfigError, require_prepared
from ..selection import Selection
from . import register
from .base import Method, MethodConfig, Targets, check_param_budget, match_budget, option
from .budget import PER_TYPE_POLICIES, POLICIES, budget_selection, ranked_selection, resolve_selection, selection_from_names

__all__ = ["SelectiveOptimizer", "SelectiveConfig", "SelectiveFineTuning"]


class SelectiveOptimizer(torch.optim.Optimizer):
    """Wrap ``optimizer_cls`` so that only ``selected`` parameters are trained and hold optimizer state.

    ``params`` may be all of a model's parameters (or param groups, as a ``Trainer`` builds them); parameters not
    in ``selected`` are dropped from the groups and, with ``freeze_others=True``, get ``requires_grad=False`` and
    their ``.grad`` cleared, so backward neither computes nor stores their gradients. They are never passed to the
    inner optimizer, so no update (not even weight decay) can touch them.

    Written by hand because torch has no "optimizer over a subset" wrapper; KappaTune's reference wrapper is not
    an ``Optimizer`` subclass, which breaks LR schedulers and ``Trainer``.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
        optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
        *,
        selected: Iterable[nn.Parameter],
        freeze_others: bool = True,
        **optimizer_kwargs: Any,
    ):
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
            raise ConfigError(f"optimizer_cls must be a torch.optim.Optimizer class, got {optimizer_cls!r}")
        if isinstance(optimizer_cls, type) and issubclass(optimizer_cls, SelectiveOptimizer):
            raise ConfigError("SelectiveOptimizer cannot wrap itself")
        self._selected_ids = {id(p) for p in selected}
        groups = _as_groups(params)
        kept: list[dict[str, Any]] = []
        for g in groups:
            ps = [p for p in g["params"] if id(p) in self._selected_ids]
            if freeze_others:
                for p in g["params"]:
                    if id(p) not in self._selected_ids:
                        p.requires_grad_(False)
                        p.grad = None
            if ps:
                kept.append({**g, "params": ps})
        if not kept:
            raise ConfigError("empty selection: none of the given parameters is selected, so there is nothing to train")
        for g in kept:
            for p in g["params"]:
                p.requires_grad_(True)
        self.optimizer = optimizer_cls(kept, **optimizer_kwargs)
        self._ready = False
        # The base constructor sets up hook dictionaries and step profiling; we then *share* (not copy) the inner
        # optimizer's param_groups and state so schedulers and accelerate see and edit the real ones.
        super().__init__([dict(g) for g in self.optimizer.param_groups], self.optimizer.defaults)
        self._share()
        self._ready = True

    def _share(self) -> None:
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.defaults = self.optimizer.defaults

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes the wrapper lacks (e.g. schedule-free optimizers' train()/eval()).
        if name in ("optimizer", "__setstate__") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.__dict__["optimizer"], name) if "optimizer" in self.__dict__ else super().__getattribute__(name)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if closure is not None:
            with torch.enable_grad():
                return self.optimizer.step(closure)
        return self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not getattr(self, "_ready", False):  # called by the base constructor: build our own (shared later) groups
            return super().add_param_group(param_group)
        ps = param_group["params"]
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        ps = [p for p in ps if id(p) in self._selected_ids]
        if ps:
            self.optimizer.add_param_group({**param_group, "params": ps})
            self._share()

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        n_saved = sum(len(g["params"]) for g in state_dict.get("param_groups", []))
        n_here = sum(len(g["params"]) for g in self.optimizer.param_groups)
        if n_saved != n_here:
            raise ConfigError(
                f"optimizer state has {n_saved} tensors but this selection trains {n_here}; "
                "load it into a SelectiveOptimizer built on the same selection"
            )
        self.optimizer.load_state_dict(state_dict)
        self._share()

    def state_numel(self) -> int:
        """Number of elements held in optimizer state tensors (what memory scales with)."""
        return sum(t.numel() for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.ndim > 0)

    def __repr__(self) -> str:
        n = sum(len(g["params"]) for g in self.param_groups)
        return f"SelectiveOptimizer({type(self.optimizer).__name__}, {n} selected tensors)"

    # pickling/copying goes through the base class with our extra attributes
    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def _as_groups(params: Any) -> list[dict[str, Any]]:
    if isinstance(params, torch.Tensor):
        params = [params]
    params = list(params)
    if not params:
        raise ConfigError("SelectiveOptimizer got an empty parameter list")
    if isinstance(params[0], dict):
        return [{**g, "params": [g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"])} for g in params]
    return [{"params": params}]


def _patterns(value: list[str], name: str) -> list[str]:
    from ..analysis import check_patterns

    return check_patterns(value, name) or []


@dataclass
class SelectiveConfig(MethodConfig):
    """Selective full fine-tuning.

    ``policy``: kappa (KappaTune) | snr (Spectrum's SNR, one global ranking) | snr_per_type (Spectrum as
    published: the top fraction per module type) | random | random_type_matched (random within κ's module types
    and per-type counts: the control that separates κ from tensor type) | all. How many tensors: ``top_p`` (fraction),
    ``num_modules``, ``threshold`` (κ ≤ threshold) or ``param_budget`` (trainable weights, matched within ±10%).
    ``seed`` drives the random policy; ``include``/``exclude`` restrict candidates by name pattern.
    """

    policy: str = option("kappa", choices=POLICIES)
    top_p: float | None = option(None, min=0, max=1, min_open=True)
    num_modules: int | None = option(None, min=1)
    threshold: float | None = option(None, min=0, min_open=True)
    param_budget: int | None = option(None, min=1)
    balance_types: bool = False
    seed: int = 0
    include: list[str] | None = option(None, check=_patterns)
    exclude: list[str] | None = option(None, check=_patterns)


@register
class SelectiveFineTuning(Method):
    """Full fine-tuning of the selected weight tensors only (KappaTune); all other tensors stay bitwise frozen."""

    name = "selective"
    config_cls = SelectiveConfig
    config: SelectiveConfig

    def __init__(self, config: SelectiveConfig | dict | None = None):
        super().__init__(config)
        self.selection: Selection | None = None

    def _knobs(self) -> dict[str, Any]:
        c = self.config
        return dict(seed=c.seed, balance_types=c.balance_types, include=c.include, exclude=c.exclude)

    def _prepare(self, model: nn.Module, targets: Targets) -> nn.Module:
        c = self.config
        if targets is None and c.param_budget is not None:
            rest = {k: v for k, v in c.to_dict().items() if k != "param_budget"}
            matched = type(self).for_budget(model, c.param_budget, None, **rest)
            self.budget_report = matched.budget_report
            targets = matched.default_targets
        self.selection = resolve_selection(
            model, targets, policy=c.policy, top_p=c.top_p, num_modules=c.num_modules, threshold=c.threshold, **self._knobs()
        )
        chosen = set(self.selection.parameter_names)
        params = dict(model.named_parameters())
        missing = sorted(chosen - set(params))
        if missing:
            raise ConfigError(f"selected tensor(s) not in this model: {', '.join(missing[:3])}")
        for n, p in model.named_parameters():
            p.requires_grad_(n in chosen)
            if n not in chosen:
                p.grad = None
        return model

    def make_optimizer(self, optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW, **kwargs: Any) -> SelectiveOptimizer:
        """A :class:`SelectiveOptimizer` of ``optimizer_cls`` over the selected tensors only."""
        require_prepared(self)
        return SelectiveOptimizer(self.model.parameters(), optimizer_cls, selected=self.trainable_parameters(), **kwargs)

    @classmethod
    def for_budget(
        cls, model: nn.Module, param_budget: int, targets: Targets = None, *, tolerance: float = 0.10, **config: Any
    ) -> "SelectiveFineTuning":
        """Choose the policy's best tensors that fit ``param_budget`` (within ±tolerance); reports the exact count.

        Tensors are taken in policy order (lowest κ first for ``kappa``), skipping any that no longer fits.
        ``targets``, if a Selection or names, is the candidate pool in preference order; otherwise the config's
        policy ranks every candidate tensor.
        """
        param_budget = check_param_budget(param_budget, tolerance)
        config = {k: v for k, v in config.items() if k != "param_budget"}
        method = cls(config)
        c = method.config
        sizes = dict((n, p.numel()) for n, p in model.named_parameters())
        options: list[list[str]] = []
        explicit = isinstance(targets, Selection) or (targets is not None and not (isinstance(targets, str) and targets in ("all-linear", "all")))
        if not explicit and c.policy in PER_TYPE_POLICIES:
            # per-type cuts are not prefixes of one order: let the policy meet each cap itself
            for cap in (param_budget, int(param_budget * (1 + tolerance))):
                try:
                    options.append(budget_selection(model, c.policy, cap, **method._knobs()))
                except ConfigError:  # below one tensor per type, or a cap above every candidate together
                    options.append(options[-1] if options else [])
            ranked = next((o for o in options if o), [])
        elif explicit:
            ranked = resolve_selection(model, targets).parameter_names
        else:
            ranked = ranked_selection(model, c.policy, **method._knobs())
        if not ranked and c.policy == "snr_per_type" and not explicit:
            raise ConfigError(f"param_budget {param_budget:,} is smaller than one tensor of every module type, the "
                              "smallest selection of policy 'snr_per_type' (Spectrum's per-type rule)")
        if not ranked:
            raise ConfigError(f"empty selection: policy {c.policy!r} has no candidate tensor (check include/exclude)")
        # Walk the policy order and keep every tensor that still fits under a cap (the selection module's
        # param_budget rule): cap = budget, and cap = budget·(1+tolerance) in case undershooting is too far.
        for cap in (param_budget, int(param_budget * (1 + tolerance))) if not options else ():
            kept, used = [], 0
            for n in ranked:
                if used + sizes[n] <= cap:
                    kept.append(n)
                    used += sizes[n]
            options.append(kept)
        report = match_budget(cls.name, param_budget, range(len(options)),
                              lambda i: sum(sizes[n] for n in options[i]), knob="num_tensors", tolerance=tolerance,
                              describe=lambda i: str(len(options[i])))
        chosen = options[report.value]
        if not chosen:
            raise ConfigError(f"param_budget {param_budget:,} is smaller than every candidate tensor of policy {c.policy!r}")
        report = dataclasses.replace(report, value=len(chosen))
        method.budget_report = report
        method.default_targets = selection_from_names(model, chosen, c.policy)
        return method


def selective_optimizer(
    model: nn.Module,
    selection: Selection | Sequence[str],
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    **kwargs: Any,
) -> SelectiveOptimizer:
    """Convenience: freeze ``model`` except ``selection`` (a Selection or parameter names) and wrap ``optimizer_cls``."""
    names = set(selection.parameter_names if isinstance(selection, Selection) else selection)
    params = dict(model.named_parameters())
    unknown = sorted(names - set(params))
    if unknown:
        raise ConfigError(f"selected tensor(s) not in this model: {', '.join(unknown[:3])}")
    return SelectiveOptimizer(model.parameters(), optimizer_cls, selected=[params[n] for n in names], **kwargs)


__all__.append("selective_optimizer")
