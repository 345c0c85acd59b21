"""Which tensors to adapt: κ (KappaTune), SNR (Spectrum), random and all, under a budget.

A policy orders the candidate tensors of a :class:`~kappatune.analysis.SpectrumReport`:

- ``kappa``: ascending condition number (KappaTune: the most isotropic tensors first; κ = inf last),
- ``snr``: descending Marchenko–Pastur SNR (Spectrum),
- ``random``: a seeded permutation (the control that tells whether the spectrum matters at all),
- ``all``: every candidate,
- ``snr_per_type``: Spectrum as published -- the top fraction by SNR *within each module type* (q_proj, ...,
  down_proj), as Spectrum's scanner and axolotl's Spectrum integration pick them, next to ``snr``'s global rule,
- ``random_type_matched``: the control that separates κ from tensor type -- seeded random tensors drawn within
  the module types, and with the per-type counts, that ``kappa`` picks at the same budget.

A budget then cuts the order: ``num_modules`` (first k), ``top_p`` (first ``max(1, int(N·top_p))``, PEFT's rule),
``threshold`` (κ ≤ t for ``kappa``, SNR ≥ t for ``snr``) or ``param_budget`` (walk the order and keep every tensor
that still fits in that many trainable weights: the fair way to compare methods). ``balance_types`` applies the
budget within each module type (q_proj, k_proj, ..., down_proj) so every type gets the same share.

:class:`KappaTuneSelector` and :func:`find_kappa_target_modules` reproduce PEFT 0.21's ``peft.helpers`` API on
top of the faster analysis.
"""

from __future__ import annotations

import math
import random
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

from torch import nn

from .analysis import SpectrumReport, TensorSpectrum, analyze_model
from .errors import ConfigError

__all__ = [
    "Selection", "POLICIES", "select_targets", "select_from_report", "KappaTuneSelector", "find_kappa_target_modules",
    "match_module_names",
]

POLICIES = ("kappa", "snr", "random", "all", "snr_per_type", "random_type_matched")
# Embeddings and the LM head are analysed but not adapted unless asked for (kinds=(..., "head", "embedding")).
DEFAULT_KINDS = ("linear", "conv1d", "moe")
ALL_KINDS = ("linear", "conv1d", "moe", "head", "embedding", "param")


@dataclass(frozen=True)
class Selection:
    """The result of a selection policy.

    ``module_names``: modules whose 2-D weight was selected (usable as PEFT ``target_modules``).
    ``parameter_names``: every selected parameter (``<module>.weight`` and fused MoE 3-D parameters).
    ``moe_parameter_names``: the fused 3-D expert parameters among them (PEFT ``target_parameters``).
    ``num_params``: number of weights the selection makes trainable under full fine-tuning.
    ``scores``: the policy's score per selected tensor name (κ, SNR, ...), in selection order.
    """

    policy: str
    module_names: list[str]
    parameter_names: list[str]
    moe_parameter_names: list[str] = field(default_factory=list)
    num_params: int = 0
    scores: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.parameter_names)

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "module_names": self.module_names,
            "parameter_names": self.parameter_names,
            "moe_parameter_names": self.moe_parameter_names,
            "num_params": self.num_params,
            "scores": self.scores,
        }


def match_module_names(names: Sequence[str], patterns: str | Sequence[str]) -> list[str]:
    """The names (in their order) that ``patterns`` targets, with PEFT's ``target_modules`` semantics.

    A string is a regular expression that must match the *whole* name (``re.fullmatch``); a list matches a name
    equal to an entry or ending in ``"." + entry`` (``["q_proj", "v_proj"]`` targets every layer's q and v
    projections, ``"layers.0.mlp.up_proj"`` just that one). This is how PEFT's ``LoraConfig(target_modules=...)``
    reads targets (``peft.tuners.tuners_utils.check_target_module_exists``), so a PEFT target list selects the
    same modules here.
    """
    if isinstance(patterns, str):
        try:
            rx = re.compile(patterns)
        except re.error as exc:
            raise ConfigError(f"target pattern {patterns!r} is not a valid regular expression ({exc})") from None
        return [n for n in names if rx.fullmatch(n)]
    pats = [str(p) for p in patterns]
    return [n for n in names if any(n == p or n.endswith("." + p) for p in pats)]


def _order(records: list[TensorSpectrum], policy: str, seed: int) -> list[TensorSpectrum]:
    if policy == "snr_per_type":
        policy = "snr"
    if policy == "kappa":
        return sorted(records, key=lambda r: (not math.isfinite(r.kappa), r.kappa if math.isfinite(r.kappa) else 0.0, r.name))
    if policy == "snr":
        return sorted(records, key=lambda r: (math.isnan(r.snr), -r.snr if not math.isnan(r.snr) else 0.0, r.name))
    if policy == "random":
        out = sorted(records, key=lambda r: r.name)
        random.Random(seed).shuffle(out)
        return out
    return list(records)


def _score(r: TensorSpectrum, policy: str) -> float:
    return r.snr if policy in ("snr", "snr_per_type") else r.kappa


def _type_of(r: TensorSpectrum) -> str:
    return r.module_type or r.kind


def _per_type_top(candidates: list[TensorSpectrum], fraction: float) -> list[TensorSpectrum]:
    """Spectrum's per-type rule: within each module type, the ``int(n_type * fraction)`` highest-SNR tensors."""
    groups: dict[str, list[TensorSpectrum]] = {}
    for r in candidates:
        groups.setdefault(_type_of(r), []).append(r)
    keep: list[TensorSpectrum] = []
    for _, recs in sorted(groups.items()):
        keep += _order(recs, "snr", 0)[: int(len(recs) * fraction + 1e-9)]
    return keep


def _snr_per_type(candidates: list[TensorSpectrum], top_p, num_modules, threshold, param_budget) -> list[TensorSpectrum]:
    """``snr_per_type`` under any budget knob. ``top_p``: Spectrum's fraction per type; ``num_modules``: the
    fraction ``num_modules / N``; ``param_budget``: the largest per-type fraction whose selection fits (the
    per-type counts move together, so the smallest non-empty selection is one tensor of every type);
    ``threshold``: SNR ≥ t, which no type changes."""
    if threshold is not None:
        return [r for r in _order(candidates, "snr", 0) if r.snr >= threshold]
    if top_p is not None:
        return _per_type_top(candidates, top_p)
    if num_modules is not None:
        return _per_type_top(candidates, num_modules / len(candidates))
    if param_budget is None:
        return _order(candidates, "snr", 0)
    sizes: dict[str, int] = {}
    for r in candidates:
        sizes[_type_of(r)] = sizes.get(_type_of(r), 0) + 1
    # every fraction at which some type's count steps up; the largest one that fits
    fractions = sorted({j / n for n in sizes.values() for j in range(1, n + 1)})
    best: list[TensorSpectrum] = []
    for f in fractions:
        sel = _per_type_top(candidates, f)
        if sum(r.numel for r in sel) > param_budget:
            break
        best = sel
    return best


def _type_matched(candidates: list[TensorSpectrum], reference: list[TensorSpectrum], seed: int) -> list[TensorSpectrum]:
    """Seeded random tensors with exactly the per-type counts of ``reference`` (drawn within each type)."""
    want: dict[str, int] = {}
    for r in reference:
        want[_type_of(r)] = want.get(_type_of(r), 0) + 1
    rng = random.Random(seed)
    out: list[TensorSpectrum] = []
    for mtype in sorted(want):
        pool = sorted((r for r in candidates if _type_of(r) == mtype), key=lambda r: r.name)
        out += rng.sample(pool, want[mtype])
    return out


def _validate_budget(top_p, num_modules, threshold, param_budget, policy) -> None:
    given = [k for k, v in dict(top_p=top_p, num_modules=num_modules, threshold=threshold, param_budget=param_budget).items() if v is not None]
    if len(given) > 1:
        raise ConfigError(f"give one budget, not several: {', '.join(given)}")
    if top_p is not None and not (0 < top_p <= 1):
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    if num_modules is not None and (int(num_modules) != num_modules or num_modules < 1):
        raise ConfigError(f"num_modules must be a positive integer, got {num_modules}")
    if param_budget is not None and (int(param_budget) != param_budget or param_budget < 1):
        raise ConfigError(f"param_budget must be a positive integer number of parameters, got {param_budget}")
    if threshold is not None:
        if policy not in ("kappa", "snr", "snr_per_type", "random_type_matched"):
            raise ConfigError(f"threshold applies to the kappa and snr policies, not {policy!r}")
        if not isinstance(threshold, (int, float)) or math.isnan(threshold):
            raise ConfigError(f"threshold must be a number, got {threshold!r}")


def _cut(
    ordered: list[TensorSpectrum], policy: str, top_p, num_modules, threshold, param_budget
) -> list[TensorSpectrum]:
    if num_modules is not None:
        return ordered[: int(num_modules)]
    if top_p is not None:
        return ordered[: max(1, int(len(ordered) * top_p))]
    if threshold is not None:
        if policy == "kappa":
            return [r for r in ordered if r.kappa <= threshold]
        return [r for r in ordered if r.snr >= threshold]
    if param_budget is not None:
        kept, used = [], 0
        for r in ordered:
            if used + r.numel <= param_budget:
                kept.append(r)
                used += r.numel
        return kept
    return ordered


def select_from_report(
    report: SpectrumReport,
    policy: str = "kappa",
    *,
    top_p: float | None = None,
    num_modules: int | None = None,
    threshold: float | None = None,
    param_budget: int | None = None,
    balance_types: bool = False,
    seed: int = 0,
    kinds: Sequence[str] = DEFAULT_KINDS,
) -> Selection:
    """Apply a policy and a budget to an existing analysis (no SVD work). See the module docstring."""
    if policy not in POLICIES:
        raise ConfigError(f"unknown selection policy {policy!r}; choose one of {', '.join(POLICIES)}")
    _validate_budget(top_p, num_modules, threshold, param_budget, policy)
    if policy in ("snr", "snr_per_type") and report.settings.get("kappa_only"):
        raise ConfigError("the snr policy needs the full spectrum, but this analysis is κ-only (kappa_only=True); "
                          "analyse again without kappa_only")
    candidates = [r for r in report.records if r.kind in kinds]
    if not candidates:
        raise ConfigError(f"no candidate tensor of kind {', '.join(kinds)} in the analysis; nothing to select")
    total = sum(r.numel for r in candidates)
    if param_budget is not None:
        if param_budget > total:
            raise ConfigError(
                f"param_budget {param_budget:,} is larger than all candidate tensors together ({total:,} parameters)"
            )
        smallest = min(r.numel for r in candidates)
        if param_budget < smallest:
            raise ConfigError(f"param_budget {param_budget:,} is smaller than the smallest candidate tensor ({smallest:,} parameters)")

    if policy == "snr_per_type":
        chosen = _snr_per_type(candidates, top_p, num_modules, threshold, param_budget)
    elif policy == "random_type_matched":
        ref = select_from_report(report, "kappa", top_p=top_p, num_modules=num_modules, threshold=threshold,
                                 param_budget=param_budget, balance_types=balance_types, seed=seed, kinds=kinds)
        picked = set(ref.parameter_names)
        chosen = _type_matched(candidates, [r for r in candidates if r.name in picked], seed)
    elif balance_types:
        groups: dict[str, list[TensorSpectrum]] = {}
        for r in candidates:
            groups.setdefault(r.module_type, []).append(r)
        chosen: list[TensorSpectrum] = []
        for i, (mtype, recs) in enumerate(sorted(groups.items())):
            share = dict(top_p=top_p, num_modules=None, threshold=threshold, param_budget=None)
            if num_modules is not None:
                share["top_p"] = num_modules / len(candidates)
            if param_budget is not None:
                share["param_budget"] = int(param_budget * sum(r.numel for r in recs) / total)
            if share["top_p"] is not None:
                share["top_p"] = min(1.0, share["top_p"])
            chosen += _cut(_order(recs, policy, seed + i), policy, **share)
        if policy != "random":  # present the union in global policy order
            keep = {r.name for r in chosen}
            chosen = [r for r in _order(candidates, policy, seed) if r.name in keep]
    else:
        chosen = _cut(_order(candidates, policy, seed), policy, top_p, num_modules, threshold, param_budget)

    if not chosen:
        raise ConfigError(
            f"empty selection: policy {policy!r} with budget "
            f"{dict(top_p=top_p, num_modules=num_modules, threshold=threshold, param_budget=param_budget)} keeps no tensor"
        )
    modules: list[str] = []
    params: list[str] = []
    moe: list[str] = []
    for r in chosen:
        if r.kind == "moe":
            moe.append(r.name)
            params.append(r.name)
        else:
            modules.extend(m for m in r.modules if m not in modules)
            params.append(r.name)
    return Selection(
        policy=policy,
        module_names=modules,
        parameter_names=params,
        moe_parameter_names=moe,
        num_params=sum(r.numel for r in chosen),
        scores={r.name: _score(r, policy) for r in chosen},
    )


def select_targets(
    model: nn.Module | SpectrumReport,
    policy: str = "kappa",
    *,
    top_p: float | None = None,
    num_modules: int | None = None,
    threshold: float | None = None,
    param_budget: int | None = None,
    balance_types: bool = False,
    seed: int = 0,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    kinds: Sequence[str] = DEFAULT_KINDS,
    progress: bool = True,
    **analysis_kwargs: Any,
) -> Selection:
    """Analyse ``model`` (cached) and select tensors to adapt. ``include``/``exclude`` filter tensor names.

    With no budget given, every candidate is selected in policy order.
    """
    if policy not in POLICIES:
        raise ConfigError(f"unknown selection policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if isinstance(model, SpectrumReport):
        report = model
    else:
        # Only the snr policy needs the whole spectrum; the others use the faster κ-only analysis.
        analysis_kwargs.setdefault("kappa_only", False)  # measured slower than the full Gram path (benchmarks/results/analysis_speed_gpu*.txt)
        report = analyze_model(model, include=include, exclude=exclude, progress=progress, **analysis_kwargs)
    return select_from_report(report, policy, top_p=top_p, num_modules=num_modules, threshold=threshold,
                              param_budget=param_budget, balance_types=balance_types, seed=seed, kinds=kinds)


# ----------------------------------------------------------------------------------------------------------------
# PEFT drop-in compatibility
# ----------------------------------------------------------------------------------------------------------------
def tied_head_modules(model: nn.Module, *, tied_only: bool = True) -> set[str]:
    """Module names of the output head (``get_output_embeddings()``); with ``tied_only`` only when its weight is the
    input embedding's tensor (tied word embeddings)."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None or getattr(head, "weight", None) is None:
        return set()
    if tied_only:
        get_in = getattr(model, "get_input_embeddings", None)
        emb = get_in() if callable(get_in) else None
        if emb is None or getattr(emb, "weight", None) is not head.weight:
            return set()
    return {n for n, m in model.named_modules() if m is head}


class KappaTuneSelector:
    """Drop-in for ``peft.helpers.KappaTuneSelector`` (PEFT 0.21) backed by :func:`analyze_model`.

    Same constructor and the same selection semantics: candidates are every ``nn.Linear`` module (for
    ``get_best_targets``) and every 3-D parameter ending in one of ``moe_param_suffixes`` (for
    ``get_best_target_parameters``, κ averaged over experts); tensors with a dimension above
    ``max_dim_size_to_analyze`` are skipped. One difference, on purpose: a singular matrix ranks last with κ = inf
    instead of PEFT's κ = σ_max / (0 + 1e-8).
    """

    def __init__(
        self,
        model: nn.Module,
        max_dim_size_to_analyze: int = 16384,
        moe_param_suffixes: tuple[str, ...] | None = None,
        show_progress: bool = True,
        exclude_head: bool = False,
    ):
        self.model = model
        self.exclude_head = exclude_head
        self.max_dim_size_to_analyze = max_dim_size_to_analyze
        self.moe_param_suffixes = tuple(moe_param_suffixes or (".gate_up_proj", ".down_proj", ".gate_proj", ".up_proj"))
        self.show_progress = show_progress
        self._condition_numbers: dict[str, float] | None = None
        self._parameter_condition_numbers: dict[str, float] | None = None

    def _compute_kappas(self) -> None:
        if self._condition_numbers is not None:
            return
        report = analyze_model(self.model, max_dim_size=self.max_dim_size_to_analyze,
                               moe_suffixes=self.moe_param_suffixes, progress=self.show_progress)
        by_name = report.by_name()
        self._condition_numbers = {}
        head = tied_head_modules(self.model, tied_only=False) if self.exclude_head else set()
        for mname, module in self.model.named_modules():
            if isinstance(module, nn.Linear) and mname not in head:
                rec = by_name.get(f"{mname}.weight" if mname else "weight")
                if rec is not None:
                    self._condition_numbers[mname] = rec.kappa
        self._parameter_condition_numbers = {
            r.name: r.kappa for r in report.records
            if r.kind == "moe" and any(r.name.endswith(s) for s in self.moe_param_suffixes)
        }

    @staticmethod
    def _pick(scores: dict[str, float], top_p, num_modules, threshold) -> list[str]:
        ordered = sorted(scores.items(), key=lambda x: x[1])
        if num_modules is not None:
            return [n for n, _ in ordered[: min(num_modules, len(ordered))]]
        if top_p is not None:
            return [n for n, _ in ordered[: max(1, int(len(ordered) * top_p))]]
        if threshold is not None:
            return [n for n, k in ordered if k <= threshold]
        return [n for n, _ in ordered]

    def get_best_targets(self, top_p: float | None = None, num_modules: int | None = None, threshold: float | None = None) -> list[str]:
        """Names of the lowest-κ ``nn.Linear`` modules (PEFT ``target_modules``).

        As in PEFT, the output head is a candidate. When it is *tied* to the input embedding, adapting it also
        changes the embedding once merged (PEFT's ``merge_and_unload`` writes the merged weight into the shared
        tensor): a warning says so; ``exclude_head=True`` in the constructor keeps the head out.
        """
        self._compute_kappas()
        picked = self._pick(self._condition_numbers or {}, top_p, num_modules, threshold)
        tied = tied_head_modules(self.model) & set(picked)
        if tied:
            warnings.warn(
                f"the selection includes the output head {sorted(tied)[0]!r}, whose weight is tied to the input "
                "embedding: merging an adapter on it also changes the embedding (the merged model's outputs differ "
                "from the adapted one's). Pass exclude_head=True to leave it out.", UserWarning, stacklevel=2,
            )
        return picked

    def get_best_target_parameters(self, top_p: float | None = None, num_modules: int | None = None, threshold: float | None = None) -> list[str]:
        """Names of the lowest-κ fused MoE parameters (PEFT ``target_parameters``)."""
        self._compute_kappas()
        return self._pick(self._parameter_condition_numbers or {}, top_p, num_modules, threshold)


def find_kappa_target_modules(
    model: nn.Module,
    top_p: float = 0.2,
    max_dim_size_to_analyze: int = 16384,
    moe_param_suffixes: tuple[str, ...] | None = None,
    show_progress: bool = True,
    exclude_head: bool = False,
) -> dict[str, list[str] | None]:
    """PEFT-compatible one-liner: ``{"target_modules": [...], "target_parameters": [...] or None}``.

    ``exclude_head=True`` keeps the output head out of the candidates (a tied head selected otherwise warns).
    """
    selector = KappaTuneSelector(model, max_dim_size_to_analyze, moe_param_suffixes, show_progress, exclude_head)
    params = selector.get_best_target_parameters(top_p=top_p)
    return {"target_modules": selector.get_best_targets(top_p=top_p), "target_parameters": params or None}
