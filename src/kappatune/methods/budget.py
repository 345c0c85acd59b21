"""Target resolution and budget matching shared by the methods.

Fair comparisons need every method at the same trainable-parameter count. Each method implements the hook
:meth:`~kappatune.methods.base.Method.for_budget` (choosing its own knob: number of tensors, LoRA rank, ...)
through :func:`~kappatune.methods.base.match_budget`; :func:`match_budgets` runs it for several methods at once
and returns the exact counts, which is what a results table reports next to the requested budget.

This module also turns the many ways of naming targets (a :class:`~kappatune.selection.Selection`, module
names, ``"all-linear"``, a policy name plus knobs) into one :class:`Selection`, so selective fine-tuning and
LoRA select the same tensors for the same config.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from torch import nn

from ..errors import ConfigError
from ..selection import Selection, match_module_names
from .base import BudgetReport, Targets, resolve_linear_targets

__all__ = [
    "POLICIES",
    "fused_moe_parameters",
    "selection_from_names",
    "resolve_selection",
    "ranked_selection",
    "prefix_selection",
    "match_budgets",
]

# The policies a method option accepts: kappatune.selection's (tests/test_selection.py checks they agree), "all" first (the order error messages list them).
POLICIES = ("all", "kappa", "random", "snr", "snr_per_type", "random_type_matched")
# A policy with no budget knob keeps this fraction of the candidates (the default of KappaTune's PEFT helper).
DEFAULT_TOP_P = 0.2


def fused_moe_parameters(model: nn.Module) -> list[str]:
    """Names of fused mixture-of-experts weights: 3-D parameters ``[experts, out, in]`` (e.g. Qwen3-MoE ``gate_up_proj``)."""
    return [n for n, p in model.named_parameters() if p.ndim == 3]


def _linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    from transformers.pytorch_utils import Conv1D

    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def selection_from_names(model: nn.Module, names: Sequence[str], policy: str = "explicit") -> Selection:
    """A :class:`Selection` from module names (linear layers) and/or parameter names (``<module>.weight``,
    fused 3-D expert weights, tied aliases). Tied tensors are counted once, under their canonical name."""
    names = list(dict.fromkeys(names))
    if not names:
        raise ConfigError("empty selection: no module or parameter to adapt (check the policy knobs / include / exclude)")
    canonical = {id(p): n for n, p in model.named_parameters()}
    every = dict(model.named_parameters(remove_duplicate=False))
    linear = _linear_modules(model)
    owners: dict[int, list[str]] = {}
    for mname, m in linear.items():
        owners.setdefault(id(m.weight), []).append(mname)
    modules, pnames, moe = [], [], []
    expanded: list[str] = []
    for n in names:  # a name that is not a full module/parameter name is a PEFT-style suffix ("q_proj")
        if n in linear or n in every:
            expanded.append(n)
            continue
        hits = match_module_names(list(linear), [n]) or match_module_names(list(every), [n])
        if not hits:
            raise ConfigError(f"target {n!r} is neither a module nor a parameter of this model, nor the suffix of one")
        expanded.extend(hits)
    for n in dict.fromkeys(expanded):
        p = linear[n].weight if n in linear else every[n]
        if p.ndim < 2:
            raise ConfigError(f"target {n!r} is a {p.ndim}-D tensor; only weight matrices and fused expert weights can be targets")
        pname = canonical[id(p)]
        if pname in pnames:
            continue
        pnames.append(pname)
        if n in linear:
            modules.append(n)
        elif id(p) in owners:
            modules.extend(owners[id(p)][:1])
        elif p.ndim == 3:
            moe.append(pname)
    num = sum(every[p].numel() for p in pnames)
    return Selection(policy=policy, module_names=modules, parameter_names=pnames, moe_parameter_names=moe, num_params=num)


def _select(model: nn.Module, policy: str, **knobs: Any) -> Selection:
    if policy not in POLICIES:
        raise ConfigError(f"unknown selection policy {policy!r}; use one of {', '.join(POLICIES)}")
    try:
        from ..selection import select_targets
    except ImportError as exc:  # pragma: no cover - only while kappatune.selection is being written
        raise ConfigError(f"selection policy {policy!r} needs kappatune.selection.select_targets, which is not available") from exc
    knobs = {k: v for k, v in knobs.items() if v is not None}
    return select_targets(model, policy, **knobs)


def resolve_selection(
    model: nn.Module,
    targets: Targets,
    *,
    policy: str = "all",
    top_p: float | None = None,
    num_modules: int | None = None,
    threshold: float | None = None,
    param_budget: int | None = None,
    balance_types: bool = False,
    seed: int = 0,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    progress: bool = False,
) -> Selection:
    """One :class:`Selection` for whatever the caller passed.

    ``targets`` wins when given (a Selection, names, or ``"all-linear"``); with ``targets=None`` the config's
    ``policy`` and knobs decide (``"all"``: every linear layer except the output head, plus fused MoE weights;
    another policy with no knob keeps the best ``DEFAULT_TOP_P`` = 20% of the candidates).
    """
    if isinstance(targets, Selection):
        if not targets.parameter_names:
            raise ConfigError("empty selection: the Selection has no parameter to adapt")
        return targets
    if isinstance(targets, str) and targets in ("all-linear", "all"):
        return selection_from_names(model, resolve_linear_targets(model, "all-linear") + fused_moe_parameters(model), "all")
    if targets is not None:
        names = [targets] if isinstance(targets, str) else list(targets)
        return selection_from_names(model, names)
    if policy == "all" and not (include or exclude):
        return selection_from_names(model, resolve_linear_targets(model, "all-linear") + fused_moe_parameters(model), "all")
    if top_p is None and num_modules is None and threshold is None and param_budget is None:
        # "all" restricted by include/exclude keeps every remaining candidate (not a silent 20%)
        top_p = 1.0 if policy == "all" else DEFAULT_TOP_P
    sel = _select(
        model, policy, top_p=top_p, num_modules=num_modules, threshold=threshold, param_budget=param_budget,
        balance_types=balance_types or None, seed=seed, include=include, exclude=exclude, progress=progress,
    )
    if not sel.parameter_names:
        raise ConfigError(f"empty selection: policy {policy!r} with these knobs selects nothing; loosen top_p/num_modules/threshold")
    return sel


def ranked_selection(
    model: nn.Module,
    policy: str,
    *,
    seed: int = 0,
    balance_types: bool = False,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    progress: bool = False,
) -> list[str]:
    """Every candidate parameter name in the policy's preference order (lowest κ first, highest SNR first, seeded shuffle).

    Budget matching takes prefixes of this list; the order is the Selection's ``scores`` order (selection order).
    The policies whose picks are not a prefix of one order (``snr_per_type``, ``random_type_matched``) have no
    ranking: their budget is met by :func:`budget_selection`.
    """
    if policy in PER_TYPE_POLICIES:
        raise ConfigError(f"policy {policy!r} selects per module type and has no single ranking; use budget_selection")
    if policy == "all" and not (include or exclude):
        return selection_from_names(model, resolve_linear_targets(model, "all-linear") + fused_moe_parameters(model)).parameter_names
    sel = _select(model, policy, top_p=1.0, seed=seed, balance_types=balance_types or None, include=include, exclude=exclude, progress=progress)
    order = [n for n in sel.scores if n in set(sel.parameter_names)]
    if len(order) != len(sel.parameter_names):
        order = list(sel.parameter_names)
    return order


# Policies that cut per module type: a budget is met by select_targets(param_budget=...), not by a ranked prefix.
PER_TYPE_POLICIES = ("snr_per_type", "random_type_matched")


def budget_selection(model: nn.Module, policy: str, param_budget: int, **knobs: Any) -> list[str]:
    """The parameter names ``policy`` picks under ``param_budget`` (``select_targets``'s param_budget rule)."""
    knobs = {**knobs, "balance_types": knobs.get("balance_types") or None, "progress": False}
    return list(_select(model, policy, param_budget=param_budget, **knobs).parameter_names)


def prefix_selection(model: nn.Module, ranked: Sequence[str], k: int, policy: str) -> Selection:
    """The first ``k`` names of a ranked list as a :class:`Selection`."""
    return selection_from_names(model, list(ranked[:k]), policy)


def match_budgets(
    model: nn.Module,
    param_budget: int,
    methods: Iterable[str | tuple[str, dict[str, Any]]],
    targets: Targets = None,
    *,
    tolerance: float = 0.10,
) -> dict[str, Any]:
    """Configure several methods for the same budget: ``{label: Method}``, each with its ``budget_report``.

    ``methods`` holds names or ``(name, config)`` pairs; a pair's label is ``name`` plus its policy if it has one
    (``selective[random]``). Methods that cannot reach the budget raise :class:`ConfigError` naming the closest count.
    """
    from . import METHODS, _load_all, get_method

    _load_all()
    out: dict[str, Any] = {}
    for item in methods:
        name, config = (item, {}) if isinstance(item, str) else item
        get_method(name)  # unknown names fail clearly
        label = name + (f"[{config['policy']}]" if "policy" in config else "")
        out[label] = METHODS[name].for_budget(model, param_budget, targets, tolerance=tolerance, **config)
    return out


def report_table(reports: dict[str, BudgetReport]) -> str:
    """A plain-text table of budget reports (label, knob=value, exact count, relative error)."""
    rows = [("method", "knob", "trainable", "vs budget")]
    for label, r in reports.items():
        rows.append((label, f"{r.knob}={r.value}", f"{r.num_params:,}", f"{r.relative_error:+.1%}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)

