"""Full fine-tuning: the baseline that trains every weight (and forgets the most)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import ConfigError
from . import register
from .base import Method, MethodConfig, Targets, check_param_budget, match_budget

__all__ = ["FullConfig", "FullFineTuning"]


@dataclass
class FullConfig(MethodConfig):
    """``freeze_embeddings``: keep the (often tied) input embedding fixed, as many recipes do."""

    freeze_embeddings: bool = False


@register
class FullFineTuning(Method):
    """Every parameter trainable; ``targets`` is ignored (full fine-tuning has no target selection)."""

    name = "full"
    config_cls = FullConfig
    config: FullConfig

    def _prepare(self, model: nn.Module, targets: Targets) -> nn.Module:
        emb = model.get_input_embeddings() if self.config.freeze_embeddings and hasattr(model, "get_input_embeddings") else None
        frozen = {id(p) for p in emb.parameters()} if emb is not None else set()
        for p in model.parameters():
            p.requires_grad_(id(p) not in frozen)
        return model

    @classmethod
    def for_budget(
        cls, model: nn.Module, param_budget: int, targets: Targets = None, *, tolerance: float = 0.10, **config: Any
    ) -> "FullFineTuning":
        """Full fine-tuning has no knob: accepted only if the whole model is within ±tolerance of the budget."""
        param_budget = check_param_budget(param_budget, tolerance)
        method = cls(config)
        probe = {id(p): p.numel() for p in model.parameters()}
        if method.config.freeze_embeddings and hasattr(model, "get_input_embeddings"):
            for p in model.get_input_embeddings().parameters():
                probe.pop(id(p), None)
        total = sum(probe.values())
        try:
            method.budget_report = match_budget(cls.name, param_budget, ["all"], lambda _: total, knob="tensors", tolerance=tolerance)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (full fine-tuning always trains all {total:,} parameters)") from None
        return method
