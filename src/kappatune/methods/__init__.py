"""Forgetting-aware fine-tuning methods, one module each, behind :class:`~kappatune.methods.base.Method`.

Use :func:`get_method` to build one by name. Registered names are listed in ``METHODS``.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import (
    BudgetReport, Method, MethodConfig, Targets, check_param_budget, load_adapter, match_budget, option,
    read_adapter_metadata, resolve_linear_targets,
)

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to ``METHODS`` under ``cls.name``."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, config: dict[str, Any] | MethodConfig | None = None) -> Method:
    """Instantiate a registered method by name with its config (dict or config object)."""
    _load_all()
    if name not in METHODS:
        import difflib

        hint = difflib.get_close_matches(name, METHODS, n=1)
        raise ConfigError(
            f"unknown method {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") + f"; known: {', '.join(sorted(METHODS))}"
        )
    return METHODS[name](config)


def for_budget(name: str, model: Any, param_budget: int, targets: Targets = None, **config: Any) -> Method:
    """A method configured so its trainable count lands within ±10% of ``param_budget`` (see ``Method.for_budget``).

    The chosen knob and exact count are in ``method.budget_report``; call ``method.prepare(model)`` next.
    """
    _load_all()
    get_method(name)  # clear error for an unknown name
    return METHODS[name].for_budget(model, param_budget, targets, **config)


# Public names of the method modules, importable as ``kappatune.methods.<name>`` (loaded on first use so that
# ``import kappatune.methods`` stays cheap and a module being written does not break the others).
_LAZY = {
    "FullFineTuning": "full", "SelectiveFineTuning": "selective", "SelectiveOptimizer": "selective",
    "selective_optimizer": "selective", "LoRA": "lora", "match_budgets": "budget", "resolve_selection": "budget",
    "OSF": "osf", "EigenTune": "eigentune", "CURLoRA": "curlora",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _load_all() -> None:
    """Import every method module so its ``@register`` runs (modules not written yet are skipped)."""
    import importlib

    for mod in ("full", "selective", "lora", "osf", "eigentune", "curlora"):
        try:
            importlib.import_module(f".{mod}", __name__)
        except ModuleNotFoundError as exc:
            if not (exc.name or "").endswith(f"methods.{mod}"):
                raise


__all__ = [
    "Method", "MethodConfig", "Targets", "METHODS", "register", "get_method", "resolve_linear_targets",
    "BudgetReport", "match_budget", "for_budget", "option", "check_param_budget", "load_adapter",
    "read_adapter_metadata", *_LAZY,
]
