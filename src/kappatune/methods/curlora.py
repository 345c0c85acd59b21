"""CURLoRA: ``W' = W + alpha * C U R`` with C/R sampled columns/rows of W and only ``U`` trained (Fawi, 2024).

C holds ``rank`` actual columns of W and R ``rank`` actual rows, sampled (seeded, with replacement as in the
reference code) with probability *inversely* proportional to their share of ``||W||_F^2``: the low-energy
directions are the ones the update may move, which is the paper's forgetting argument. ``U`` (``rank x rank``)
starts at zero, so the adapted model is exactly the base model at step 0, and it is the only trainable tensor.

No maintained package implements CURLoRA (the reference repository is notebook code hard-wired to q/k/v), so the
layer is written here; it works on any ``nn.Linear`` or GPT-2 ``Conv1D``. The forward computes
``((x R^T) U^T) C^T`` and never materialises ``C U R`` (cost ~ LoRA of the same rank).

Deviation from the reference code: the reference adds an absolute ``1e-3`` to each probability before inverting,
which makes sampling nearly uniform once a matrix has more than ~1000 columns; here the offset is relative to
the mean probability (``eps * mean(p)``), which keeps the inverse weighting at every size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CacheError, ConfigError, require_prepared
from . import register
from ._spectral import check_rank, is_conv1d, replace_module, resolve_targets, weight_2d
from .base import BudgetReport, Method, MethodConfig, Targets, check_param_budget, match_budget, option

__all__ = ["CURLoRAConfig", "CURLoRA", "CURLinear", "inverse_importance_probs"]


@dataclass
class CURLoRAConfig(MethodConfig):
    """``rank``: columns/rows sampled per layer (``U`` is ``rank x rank``); ``alpha``: scale of the update;
    ``seed``: sampling seed (each layer gets its own stream derived from it); ``replacement``: sample with
    replacement as the paper does; ``eps``: relative offset added to each probability before inverting it;
    ``clamp_rank``: give a layer smaller than ``rank`` its ``min(out, in)`` instead of raising (budget matching
    sets it when the matched rank exceeds the smallest target)."""

    rank: int = option(8, min=1)
    alpha: float = 1.0
    seed: int = 0
    replacement: bool = True
    eps: float = option(1e-3, min=0, min_open=True)
    clamp_rank: bool = False


def inverse_importance_probs(W: torch.Tensor, dim: int, eps: float = 1e-3) -> torch.Tensor:
    """Sampling probabilities over W's columns (``dim=0`` sums over rows) or rows (``dim=1``), inversely
    proportional to each one's share of the squared Frobenius norm (with a relative ``eps`` offset)."""
    W = W.detach().float()
    sq = W.pow(2).sum(dim=dim)
    p = sq / sq.sum().clamp_min(torch.finfo(torch.float32).tiny)
    inv = 1.0 / (p + eps * p.mean().clamp_min(torch.finfo(torch.float32).tiny))
    return inv / inv.sum()


class CURLinear(nn.Module):
    """A linear (or ``Conv1D``) layer plus ``alpha * C U R``; C/R are frozen buffers, U the trainable core."""

    def __init__(self, base: nn.Module, rank: int, *, alpha: float = 1.0, generator: torch.Generator | None = None,
                 replacement: bool = True, eps: float = 1e-3):
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        self.alpha = float(alpha)
        self.merged = False
        self._orig_weight: torch.Tensor | None = None
        W = weight_2d(base).detach()
        out_f, in_f = W.shape
        # Sampled on CPU with a CPU generator so the indices do not depend on the device.
        cols = torch.multinomial(inverse_importance_probs(W.cpu(), 0, eps), rank, replacement=replacement, generator=generator)
        rows = torch.multinomial(inverse_importance_probs(W.cpu(), 1, eps), rank, replacement=replacement, generator=generator)
        self.register_buffer("col_idx", cols.to(W.device))
        self.register_buffer("row_idx", rows.to(W.device))
        self.register_buffer("C", W[:, self.col_idx].clone(), persistent=False)  # [out, r]: actual columns of W
        self.register_buffer("R", W[self.row_idx, :].clone(), persistent=False)  # [r, in]: actual rows of W
        self.U = nn.Parameter(torch.zeros(rank, rank, dtype=W.dtype, device=W.device))
        self.in_features, self.out_features = in_f, out_f

    def regather(self) -> None:
        """Rebuild C and R from the base weight and the stored indices (after loading indices)."""
        W = weight_2d(self.base).detach()
        self.C = W[:, self.col_idx].clone()
        self.R = W[self.row_idx, :].clone()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)
        if self.merged:
            return y
        U = self.U if self.alpha == 1.0 else self.U * self.alpha  # scale the r x r core, not the [T, out] output
        h = F.linear(F.linear(F.linear(x.to(self.R.dtype), self.R), U), self.C)  # x R^T U^T C^T, never C U R
        return y + h.to(y.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``alpha * C U R`` in float32, ``[out, in]``."""
        return self.alpha * (self.C.float() @ self.U.float() @ self.R.float())

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (computed in fp32); the original is kept so unmerge is bitwise exact."""
        if self.merged:
            return
        w = self.base.weight
        self._orig_weight = w.detach().clone()
        d = self.delta_weight()
        w.copy_((w.float() + (d.t() if is_conv1d(self.base) else d)).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact pre-merge base weight."""
        if not self.merged:
            return
        assert self._orig_weight is not None
        self.base.weight.copy_(self._orig_weight)
        self._orig_weight = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.U.shape[0]}, alpha={self.alpha}, merged={self.merged}"


def _layers(model: nn.Module) -> list[tuple[str, CURLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, CURLinear)]


@register
class CURLoRA(Method):
    """CURLoRA on any linear targets (a κ Selection, module names or ``"all-linear"``); see the module docstring."""

    name = "curlora"
    config_cls = CURLoRAConfig
    config: CURLoRAConfig

    def _prepare(self, model: nn.Module, targets: Targets) -> nn.Module:
        cfg = self.config
        names = resolve_targets(model, targets, self.name)
        check_rank(self.name, cfg.rank, [] if cfg.clamp_rank else names, model)
        if cfg.eps <= 0:
            raise ConfigError(f"curlora: eps must be > 0, got {cfg.eps}")
        model.requires_grad_(False)
        for i, n in enumerate(names):
            # One seeded stream per layer (seed, layer index): changing the targets does not reshuffle the others' draws
            # more than necessary, and the whole model is reproducible from (seed, targets).
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)
            mod = model.get_submodule(n)
            rank = min(cfg.rank, min(mod.weight.shape)) if cfg.clamp_rank else cfg.rank
            replace_module(model, n, CURLinear(mod, rank, alpha=cfg.alpha, generator=gen,
                                               replacement=cfg.replacement, eps=cfg.eps))
        self.target_names = names
        return model

    # -- budget ----------------------------------------------------------------------------------------------
    @staticmethod
    def count(model: nn.Module, names: list[str], rank: int) -> int:
        """Trainable parameters for ``rank`` on ``names``: one ``r x r`` U per layer, ``r = min(rank, min(out, in))``."""
        return sum(min(rank, min(model.get_submodule(n).weight.shape)) ** 2 for n in names)

    @classmethod
    def for_budget(cls, model: nn.Module, param_budget: int, targets: Targets = "all-linear", *,
                   tolerance: float = 0.10, **config: Any) -> "CURLoRA":
        """Pick the rank whose ``n_layers * rank^2`` is closest to ``param_budget`` (must be within ±tolerance)."""
        param_budget = check_param_budget(param_budget, tolerance)
        cls({k: v for k, v in config.items() if k != "rank"})  # the options are valid before any work
        names = resolve_targets(model, targets, cls.name)
        dims = [min(model.get_submodule(n).weight.shape) for n in names]
        report: BudgetReport = match_budget(cls.name, param_budget, range(1, max(dims) + 1),
                                            lambda r: cls.count(model, names, r), knob="rank", tolerance=tolerance)
        m = cls(CURLoRAConfig.from_dict({**config, "rank": report.value, "clamp_rank": report.value > min(dims)}))
        m.budget_report = report
        m.default_targets = targets
        return m

    # -- merge / persistence ---------------------------------------------------------------------------------
    def merge(self) -> nn.Module:
        """Fold every ``C U R`` into its base weight and put the plain layers back; returns the plain model."""
        require_prepared(self)
        for n, layer in _layers(self.model):
            layer.merge()
            layer._orig_weight = None
            replace_module(self.model, n, layer.base)
        return self.model

    def trained_state(self) -> dict[str, torch.Tensor]:
        """U per layer plus the sampled column/row indices (so loading never depends on re-sampling)."""
        require_prepared(self)
        out: dict[str, torch.Tensor] = {}
        for n, layer in _layers(self.model):
            out[f"{n}.U"] = layer.U.detach().cpu().contiguous()
            out[f"{n}.col_idx"] = layer.col_idx.cpu().contiguous()
            out[f"{n}.row_idx"] = layer.row_idx.cpu().contiguous()
        return out

    def load(self, path: str | Path) -> None:
        """Load U and the sampled indices saved by :meth:`save` (same base model and targets required)."""
        require_prepared(self)
        state = self.read_adapter(path)
        layers = dict(_layers(self.model))
        names = {k.rsplit(".", 1)[0] for k in state}
        if names != set(layers) or any(f"{n}.{k}" not in state for n in layers for k in ("U", "col_idx", "row_idx")):
            diff = sorted(names ^ set(layers))[:3]
            raise CacheError(f"adapter {path} targets other layers than this prepared model (e.g. {diff})")
        with torch.no_grad():
            for n, layer in layers.items():
                U = state[f"{n}.U"]
                if U.shape != layer.U.shape:
                    raise CacheError(f"adapter {path}: {n} has rank {U.shape[0]}, this model rank {layer.U.shape[0]}")
                layer.col_idx.copy_(state[f"{n}.col_idx"])
                layer.row_idx.copy_(state[f"{n}.row_idx"])
                layer.regather()
                layer.U.copy_(U)
