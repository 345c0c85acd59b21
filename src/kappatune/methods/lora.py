"""LoRA through PEFT: on all linear layers (baseline), on κ-selected modules (κ-LoRA), or random / SNR-selected ones.

Target selection comes from :mod:`kappatune.selection`. Unlike kappaTune's own helper, which truncates a Python
*set* of module names (so its "budget" keeps arbitrary modules), the modules kept here are the first ones in the
policy's order: the lowest-κ ones for ``policy="kappa"``. Fused mixture-of-experts weights (3-D parameters)
are adapted through PEFT's ``target_parameters``. Merging uses PEFT's ``merge_and_unload``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, require_prepared
from ..selection import Selection
from . import register
from .base import Method, MethodConfig, Targets, check_param_budget, match_budget, option
from .budget import POLICIES, resolve_selection

__all__ = ["LoraMethodConfig", "LoRA", "lora_shapes", "lora_params_per_rank"]


def _patterns(value: list[str], name: str) -> list[str]:
    from ..analysis import check_patterns

    return check_patterns(value, name) or []


@dataclass
class LoraMethodConfig(MethodConfig):
    """LoRA knobs.

    ``rank``/``alpha`` (default ``2*rank``)/``dropout``; ``policy``: which modules — ``all`` (every linear layer
    but the output head, plus fused MoE weights), ``kappa`` (κ-LoRA), ``random``, ``snr``; ``top_p``,
    ``num_modules``, ``threshold``, ``balance_types``, ``seed``, ``include``, ``exclude`` go to the selection.
    ``param_budget``: trainable LoRA parameters wanted — the rank is then chosen to land within ±10%.
    ``seed`` also seeds the LoRA A initialisation, so runs are reproducible. ``rank_pattern``: per-module rank
    overrides (full module names), which budget matching uses to give some modules ``rank + 1``.

    PEFT's ``LoraConfig`` names are accepted as aliases: ``r`` (rank), ``lora_alpha`` (alpha), ``lora_dropout``
    (dropout), and ``target_modules`` — a list of module-name suffixes matched as PEFT matches them (``q_proj``
    matches ``model.layers.0.self_attn.q_proj``), a regular expression matched against the whole module name, or
    ``"all-linear"``; it restricts the candidates (the ``include`` patterns), so with the default policy ``all``
    exactly those modules get adapters, as in PEFT.
    """

    rank: int = option(8, min=1, aliases=("r",))
    alpha: float | None = option(None, min=0, min_open=True, aliases=("lora_alpha",))
    dropout: float = option(0.0, min=0, max=1, max_open=True, aliases=("lora_dropout",))
    policy: str = option("all", choices=POLICIES)
    top_p: float | None = option(None, min=0, max=1, min_open=True)
    num_modules: int | None = option(None, min=1)
    threshold: float | None = option(None, min=0, min_open=True)
    param_budget: int | None = option(None, min=1)
    balance_types: bool = False
    seed: int = 0
    include: list[str] | None = option(None, check=_patterns)
    exclude: list[str] | None = option(None, check=_patterns)
    use_rslora: bool = False
    rank_pattern: dict[str, int] | None = None

    @classmethod
    def translate(cls, data: dict[str, Any]) -> dict[str, Any]:
        """PEFT's ``target_modules`` as ``include`` patterns with the same matching rule (see the class docstring)."""
        if "target_modules" not in data:
            return data
        data = dict(data)
        tm = data.pop("target_modules")
        if data.get("include") is not None:
            raise ConfigError("give target_modules or include, not both (target_modules becomes the include patterns)")
        if tm is None or tm == "all-linear":
            return data
        if isinstance(tm, str):  # PEFT: a regex that must match the whole module name
            try:
                re.compile(tm)
            except re.error as exc:
                raise ConfigError(f"target_modules: {tm!r} is not a valid regular expression: {exc}") from None
            data["include"] = [f"re:^(?:{tm})\\.weight$"]
            return data
        if not isinstance(tm, (list, tuple)) or not tm or not all(isinstance(t, str) and t for t in tm):
            raise ConfigError(f"target_modules must be a non-empty list of module names, a regex or 'all-linear', got {tm!r}")
        # PEFT's list rule: a module matches when its name equals an entry or ends with "." + entry.
        data["include"] = [f"re:(?:^|\\.){re.escape(t)}\\.weight$" for t in tm]
        return data


def lora_shapes(model: nn.Module, selection: Selection) -> dict[str, tuple[int, ...]]:
    """Shape of every targeted weight: ``(out, in)`` for linear layers, ``(experts, a, b)`` for fused MoE weights."""
    params = dict(model.named_parameters())
    return {n: tuple(params[n].shape) for n in selection.parameter_names}


def lora_params_per_rank(shapes: dict[str, tuple[int, ...]]) -> int:
    """Trainable LoRA weights per unit of rank: ``in+out`` per linear layer, ``experts·(a+b)`` per fused MoE weight.

    (PEFT's ParamWrapper gives a fused ``[E, a, b]`` weight ``lora_A: [r·E, b]`` and ``lora_B: [a, r·E]``.)
    """
    total = 0
    for s in shapes.values():
        total += s[0] * (s[1] + s[2]) if len(s) == 3 else s[0] + s[1]
    return total


def _max_rank(shapes: dict[str, tuple[int, ...]]) -> tuple[int, str]:
    name = min(shapes, key=lambda n: min(shapes[n][-2:]))
    return min(shapes[name][-2:]), name


@register
class LoRA(Method):
    """LoRA adapters via PEFT on the selected linear layers / fused expert weights."""

    name = "lora"
    config_cls = LoraMethodConfig
    config: LoraMethodConfig

    def __init__(self, config: LoraMethodConfig | dict | None = None):
        super().__init__(config)
        self.selection: Selection | None = None
        self.target_shapes: dict[str, tuple[int, ...]] = {}
        self.base_model: nn.Module | None = None
        self.merged = False

    def _selection(self, model: nn.Module, targets: Targets) -> Selection:
        c = self.config
        return resolve_selection(
            model, targets, policy=c.policy, top_p=c.top_p, num_modules=c.num_modules, threshold=c.threshold,
            balance_types=c.balance_types, seed=c.seed, include=c.include, exclude=c.exclude,
        )

    def _prepare(self, model: nn.Module, targets: Targets) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        c = self.config
        if targets is None and c.param_budget is not None:
            rest = {k: v for k, v in c.to_dict().items() if k != "param_budget"}
            matched = type(self).for_budget(model, c.param_budget, None, **rest)
            self.budget_report = matched.budget_report
            self.config = matched.config
            c = self.config
            targets = matched.default_targets
        sel = self._selection(model, targets)
        shapes = lora_shapes(model, sel)
        max_rank, worst = _max_rank(shapes)
        if c.rank > max_rank:
            raise ConfigError(
                f"LoRA rank {c.rank} is larger than the matrix {worst} {shapes[worst]} allows (smallest side {max_rank}); "
                f"use rank ≤ {max_rank}"
            )
        pattern = dict(c.rank_pattern or {})
        by_module = {m: f"{m}.weight" if f"{m}.weight" in shapes else None for m in sel.module_names}
        params = dict(model.named_parameters())
        for m, r in pattern.items():
            if m not in by_module:
                raise ConfigError(f"rank_pattern names {m!r}, which is not among the LoRA target modules")
            w = params.get(f"{m}.weight")
            side = min(w.shape[-2:]) if w is not None else max_rank
            if not isinstance(r, int) or not 1 <= r <= side:
                raise ConfigError(f"rank_pattern[{m!r}] = {r!r} must be an integer in [1, {side}] (smallest side of the matrix)")
        self.selection = sel
        self.target_shapes = shapes
        modules = sel.module_names
        peft_cfg = LoraConfig(
            r=c.rank,
            lora_alpha=c.alpha if c.alpha is not None else 2 * c.rank,
            lora_dropout=c.dropout,
            # An anchored regex of exact names: PEFT's list form matches by suffix, which could catch other modules.
            target_modules="^(?:" + "|".join(re.escape(m) for m in modules) + ")$" if modules else [],
            target_parameters=list(sel.moe_parameter_names) or None,
            bias="none",
            use_rslora=c.use_rslora,
            # PEFT reads pattern keys as regexes: escape the exact names.
            rank_pattern={re.escape(m): r for m, r in pattern.items()},
            alpha_pattern={re.escape(m): 2 * r for m, r in pattern.items()} if c.alpha is None else {},
        )
        for p in model.parameters():
            p.requires_grad_(False)
        self.base_model = model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            peft_model = get_peft_model(model, peft_cfg)
        return peft_model

    def merge(self) -> nn.Module:
        """Fold the adapters into the weights (PEFT ``merge_and_unload``); returns a plain transformers model."""
        require_prepared(self)
        if hasattr(self.model, "merge_and_unload"):
            self.model = self.model.merge_and_unload()
            self.merged = True
        return self.model

    def save(self, path: Any, state: dict[str, torch.Tensor] | None = None,
             extra_metadata: dict[str, Any] | None = None) -> Any:
        if self.merged:
            raise ConfigError("the LoRA adapter was merged into the model; save the adapter before merge(), "
                              "or save the merged model with save_pretrained")
        return super().save(path, state, extra_metadata)

    @classmethod
    def for_budget(
        cls, model: nn.Module, param_budget: int, targets: Targets = None, *, tolerance: float = 0.10, **config: Any
    ) -> "LoRA":
        """Choose the LoRA rank (for the configured targets) that lands within ±tolerance of ``param_budget``.

        ``targets``: a Selection / names / ``"all-linear"``; ``None`` uses the config's ``policy``.
        """
        param_budget = check_param_budget(param_budget, tolerance)
        config = {k: v for k, v in config.items() if k not in ("param_budget", "rank_pattern")}
        probe = cls(config)
        sel = probe._selection(model, targets)
        shapes = lora_shapes(model, sel)
        per_rank = lora_params_per_rank(shapes)
        max_rank, _ = _max_rank(shapes)
        try:  # one rank for every module when that lands inside the tolerance
            report = match_budget(cls.name, param_budget, range(1, max_rank + 1), lambda r: r * per_rank, knob="rank", tolerance=tolerance)
            pattern: dict[str, int] = {}
        except ConfigError as uniform_error:
            # Otherwise rank r everywhere and r + 1 on the first j linear modules (policy order): the count then
            # moves in steps of one module's in+out instead of the whole model's, so small budgets are reachable.
            mods = [m for m in sel.module_names if f"{m}.weight" in shapes]
            sizes = [sum(shapes[f"{m}.weight"]) for m in mods]
            cum = [0]
            for n in sizes:
                cum.append(cum[-1] + n)
            cands = [(r, j) for r in range(1, max_rank) for j in range(0, len(mods) + 1)]
            try:
                report = match_budget(cls.name, param_budget, cands, lambda rj: rj[0] * per_rank + cum[rj[1]],
                                      knob="rank", tolerance=tolerance)
            except ConfigError:
                raise uniform_error from None
            r, j = report.value
            pattern = {m: r + 1 for m in mods[:j]}
            report = dataclasses.replace(report, value=r if not pattern else f"{r} (+1 on {j} of {len(shapes)} targets)")
        rank = report.value if not pattern else int(str(report.value).split()[0])
        method = cls({**probe.config.to_dict(), "rank": rank, "rank_pattern": pattern or None})
        method.budget_report = report
        method.default_targets = sel
        return method
