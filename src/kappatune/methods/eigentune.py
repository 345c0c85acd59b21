"""EigenTune: train only the magnitudes (or an r x r core) of a weight's top singular directions.

Wraps the ``eigentune`` package (>= 0.2): ``variant="diagonal"`` is classic EigenTune,
``W' = W + U_r diag(delta) V_r^T`` with one trainable scalar per direction; ``variant="spectral_core"`` trains an
``r x r`` core ``C``: ``W' = W + U_r C V_r^T`` (``core_bandwidth`` limits C to a band). Both start at zero
(identity at init); U_r and V_r are frozen buffers from the SVD of the base weight (canonical signs, so they are
recomputed identically when an adapter is loaded on the same base). Targets come from kappatune (a κ
:class:`~kappatune.selection.Selection`, module names or ``"all-linear"``) and are passed to the package as an
exact-name regex, so no other layer is touched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from torch import nn

from ..errors import ConfigError, require_prepared
from . import register
from ._spectral import check_rank, is_conv1d, resolve_targets
from .base import Method, MethodConfig, Targets, check_param_budget, match_budget, option

__all__ = ["EigenTuneMethodConfig", "EigenTune"]

VARIANTS = ("diagonal", "spectral_core")


@dataclass
class EigenTuneMethodConfig(MethodConfig):
    """``rank``: singular directions adapted per layer (at most ``min(out, in)``); ``variant``: ``"diagonal"`` or
    ``"spectral_core"`` (the package's ``method``); the rest pass through to ``eigentune.EigenTuneConfig``:
    ``core_bandwidth`` (spectral_core only; None = dense core), ``selection`` (principal/minor/mixed directions),
    ``update`` (additive/relative), ``svd_backend``, ``backend`` (kernel), ``rank_budget`` (global budget of
    directions spread by spectral energy; ``rank`` is then the per-layer maximum), ``svd_seed``.
    ``clamp_rank``: give a layer smaller than ``rank`` its ``min(out, in)`` instead of raising (budget matching
    sets it when the matched rank exceeds the smallest target)."""

    rank: int = option(8, min=1)
    variant: str = option("diagonal", choices=VARIANTS)
    core_bandwidth: Optional[int] = option(None, min=0)
    selection: str = "principal"
    update: str = "additive"
    svd_backend: str = "auto"
    backend: str = "auto"
    rank_budget: Optional[int] = option(None, min=1)
    svd_seed: int = 0
    clamp_rank: bool = False


@register
class EigenTune(Method):
    """EigenTune through the ``eigentune`` package on kappatune-resolved targets."""

    name = "eigentune"
    config_cls = EigenTuneMethodConfig
    config: EigenTuneMethodConfig

    def _package_config(self, names: list[str]) -> Any:
        import eigentune

        c = self.config
        if c.variant not in VARIANTS:
            raise ConfigError(f"eigentune: variant must be one of {', '.join(VARIANTS)}, got {c.variant!r}")
        try:
            return eigentune.EigenTuneConfig(
                rank=c.rank, rank_budget=c.rank_budget,
                target_modules="(?:" + "|".join(re.escape(n) for n in names) + ")",  # exact names, fullmatch
                exclude_modules=[], method=c.variant, core_bandwidth=c.core_bandwidth, selection=c.selection,
                update=c.update, svd_backend=c.svd_backend, backend=c.backend, svd_seed=c.svd_seed,
            )
        except ValueError as exc:  # the package validates its own options; surface them as config errors
            raise ConfigError(f"eigentune: {exc}") from exc

    def _prepare(self, model: nn.Module, targets: Targets) -> nn.Module:
        import eigentune

        names = resolve_targets(model, targets, self.name)
        conv = [n for n in names if is_conv1d(model.get_submodule(n))]
        if conv:
            raise ConfigError(f"eigentune: the eigentune package adapts nn.Linear only, not Conv1D ({conv[0]})")
        # the package itself silently clamps rank to min(out, in); kappatune raises unless clamp_rank is set
        check_rank(self.name, self.config.rank, [] if self.config.clamp_rank else names, model)
        cfg = self._package_config(names)
        try:
            eigentune.get_eigentune_model(model, cfg)
        except ValueError as exc:
            raise ConfigError(f"eigentune: {exc}") from exc
        self.target_names = names
        return model

    # -- budget ----------------------------------------------------------------------------------------------
    @staticmethod
    def count(variant: str, dims: list[int], rank: int) -> int:
        """Trainable parameters: ``r`` per layer (diagonal) or ``r^2`` (spectral_core; the whole core tensor is a
        parameter even when ``core_bandwidth`` masks part of it), ``r = min(rank, min(out, in))``."""
        return sum(min(rank, d) if variant == "diagonal" else min(rank, d) ** 2 for d in dims)

    @classmethod
    def for_budget(cls, model: nn.Module, param_budget: int, targets: Targets = "all-linear", *,
                   tolerance: float = 0.10, **config: Any) -> "EigenTune":
        """Pick the rank (directions per layer) whose exact count is closest to ``param_budget``."""
        param_budget = check_param_budget(param_budget, tolerance)
        cls({k: v for k, v in config.items() if k != "rank"})  # the options are valid before any work
        if config.get("rank_budget") is not None:
            raise ConfigError("eigentune: for_budget picks the rank itself; do not also pass rank_budget")
        variant = config.get("variant", "diagonal")
        if variant not in VARIANTS:
            raise ConfigError(f"eigentune: variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        names = resolve_targets(model, targets, cls.name)
        dims = [min(model.get_submodule(n).weight.shape) for n in names]
        report = match_budget(cls.name, param_budget, range(1, max(dims) + 1),
                              lambda r: cls.count(variant, dims, r), knob="rank", tolerance=tolerance)
        m = cls(EigenTuneMethodConfig.from_dict({**config, "rank": report.value, "clamp_rank": report.value > min(dims)}))
        m.budget_report = report
        m.default_targets = targets
        return m

    # -- merge -----------------------------------------------------------------------------------------------
    def merge(self) -> nn.Module:
        """Fold ``U_r C V_r^T`` (fp32) into each base weight and restore the plain layers (``save_pretrained``-ready)."""
        import eigentune

        require_prepared(self)
        return eigentune.merge_and_unload(self.model)

    def layers(self) -> dict[str, Any]:
        """The package's ``EigenTuneLinear`` layers by module name (for inspection: ``U``, ``Vh``, ``S``, ``delta``/``core``)."""
        from eigentune.model import iter_eigentune_layers

        require_prepared(self)
        return dict(iter_eigentune_layers(self.model))
