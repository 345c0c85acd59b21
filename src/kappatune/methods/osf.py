"""Orthogonal subspace fine-tuning with adaptive rank ("Adaptive SVD", Nayak et al. 2025, arXiv 2504.07097).

Each adapted weight ``W = U diag(s) V^T`` is split into a *preserved* subspace (its top-k singular directions,
frozen) and the rest, which is trained as full-rank-within-the-complement factors ``U_low, S_low, V_low`` whose
gradients are projected orthogonal to the preserved directions. The update is
``dW = U_low S_low V_low - U_low0 S_low0 V_low0``, so ``P_U^T dW = 0`` and ``dW P_V^T = 0``: training never
changes how W acts on (or writes into) the preserved directions.

Built on PEFT's ``OSFConfig`` (layers, factored forward, gradient-projection hooks, merge). What PEFT lacks and
is added here:

* **Adaptive rank** (the paper's contribution): per-layer importance ``I_l = 1 - cos(h_in, h_out)`` (mean over the
  tokens of a calibration batch, ``h`` = the decoder layer's input/output hidden states) is min-max normalised
  to ``n_l in [0, 1]`` and mapped to a preserved fraction ``f_l = mrr + (trr - mrr) * n_l``; a module of layer l
  with weight ``m x n`` preserves ``k = round(f_l * min(m, n))`` directions (clamped to ``[1, min(m, n) - 1]``),
  passed to PEFT as ``rank_pattern``. More important layers (that change the hidden state more) preserve more.
  Without calibration data every layer gets ``n_l = 0.5`` (a fixed fraction ``(mrr + trr) / 2``) and a warning.
* **Optimizer-independent guarantee**: PEFT projects *gradients*; Adam's element-wise rescaling of a projected
  gradient is not itself in the complement, so the weights would drift into the preserved subspace. The
  optimizer from :meth:`OSF.make_optimizer` therefore re-projects ``U_low``/``V_low`` after every step
  (:meth:`OSF.project_`, cost ``O(m d r)`` per side per layer per step with ``d = min(k, complement)``; the
  gradient hooks use the same narrower basis, see :func:`_set_projector`).
* **Sequential tasks** (:meth:`OSF.next_task`): PEFT can only preserve the top-k singular directions of the current
  weight, which after merging a task's update are not the directions that task used. So after a task the update
  ``dW`` is merged, the directions carrying ``task_energy`` of its squared norm (left and right singular vectors)
  are appended to the preserved bases ``P_U``/``P_V``, and each layer's trainable factors are rebuilt from the SVD
  of ``W`` restricted to the complement of ``P_U`` (columns) and ``P_V`` (rows); PEFT's hooks then project onto
  the explicit ``P_U``/``P_V`` buffers (PEFT's ``_osf_U_high``/``_osf_V_high``). Adapter files saved after a
  ``next_task`` also carry the merged weights of the adapted modules, so they load onto the original base.
"""

from __future__ import annotations

import functools
import math
import re
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..errors import CacheError, ConfigError, DataError, require_prepared
from . import register
from ._spectral import is_conv1d, resolve_targets
from .base import BudgetReport, Method, MethodConfig, Targets, check_param_budget, match_budget, option

__all__ = ["OSFMethodConfig", "OSF", "layer_importance", "preserved_ranks"]

_ADAPTER = "default"


@dataclass
class OSFMethodConfig(MethodConfig):
    """``min_retention`` (mrr) / ``max_retention`` (trr): preserved fraction of ``min(m, n)`` for the least / most
    important layer. ``effective_rank``: a fixed preserved rank (int) or fraction (float in (0, 1)) for every
    module instead of the adaptive mapping. ``task_energy``: share of a finished task's ``||dW||_F^2`` whose
    singular directions :meth:`OSF.next_task` adds to the preserved subspace. ``project_params``: re-project
    the factors after each optimizer step (keeps the guarantee under Adam). ``calibration_batch_size``: sequences
    per forward when measuring importance. ``progress``: show progress bars."""

    min_retention: float = option(0.1, min=0, max=1)
    max_retention: float = option(0.9, min=0, max=1)
    effective_rank: Optional[Union[int, float]] = option(None, min=0, min_open=True)
    task_energy: float = option(0.99, min=0, max=1, min_open=True)
    project_params: bool = True
    calibration_batch_size: int = option(8, min=1)
    progress: bool = True

    def validate(self) -> None:
        if self.min_retention > self.max_retention:
            raise ConfigError(f"osf: need min_retention <= max_retention, got {self.min_retention}, {self.max_retention}")


# --------------------------------------------------------------------------------------------------------------
# Layer importance and the importance -> rank mapping
# --------------------------------------------------------------------------------------------------------------
_LAYER_RE = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")


def layer_of(name: str) -> Optional[tuple[str, int]]:
    """``("model.layers", 3)`` for ``model.layers.3.mlp.up_proj``: the first numbered container in the path."""
    m = _LAYER_RE.match(name)
    return (m.group(1), int(m.group(2))) if m else None


@torch.no_grad()
def layer_importance(model: nn.Module, input_ids: torch.Tensor, layer_list: str, *, batch_size: int = 8,
                     progress: bool = True) -> list[float]:
    """``1 - mean cos(h_in, h_out)`` per block of ``model.<layer_list>`` on ``input_ids`` ([N, T] token ids).

    The paper's layer-importance score: a layer that leaves its input nearly unchanged (cosine ~1) matters little.
    Forward hooks read each block's input and output hidden states; padding is not masked (calibration blocks are
    full-length token blocks).
    """
    from tqdm.auto import tqdm

    blocks = model.get_submodule(layer_list)
    n_layers = len(blocks)
    sums = torch.zeros(n_layers, dtype=torch.float64)
    count = 0
    captured: dict[int, torch.Tensor] = {}

    def pre_hook(idx: int):
        def fn(_mod, args, kwargs):
            h = args[0] if args else kwargs.get("hidden_states")
            captured[idx] = h.detach()
        return fn

    def post_hook(idx: int):
        def fn(_mod, _args, _kwargs, out):
            h_out = out[0] if isinstance(out, (tuple, list)) else out
            h_in = captured.pop(idx, None)
            if not isinstance(h_in, torch.Tensor) or not isinstance(h_out, torch.Tensor) or h_in.shape != h_out.shape:
                raise ConfigError(f"osf: {layer_list}[{idx}] is not a residual block (its input and output hidden "
                                  "states differ in shape); layer importance needs decoder blocks")
            cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.detach().float(), dim=-1)
            sums[idx] += float(cos.double().sum())
        return fn

    handles = []
    for i, blk in enumerate(blocks):
        handles.append(blk.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(blk.register_forward_hook(post_hook(i), with_kwargs=True))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    emb = getattr(model, "get_input_embeddings", lambda: None)()
    vocab = getattr(emb, "num_embeddings", None)
    if vocab is not None and (int(input_ids.max()) >= vocab or int(input_ids.min()) < 0):
        raise DataError(f"osf: calibration token ids must lie in [0, {vocab}), got {int(input_ids.min())}..{int(input_ids.max())}")
    try:
        for start in tqdm(range(0, input_ids.shape[0], batch_size), desc="OSF layer importance", disable=not progress):
            batch = input_ids[start:start + batch_size].to(device)
            try:
                model(input_ids=batch)
            except TypeError as exc:
                raise ConfigError(f"osf: calibration needs a model called as model(input_ids=...): {exc}") from exc
            count += batch.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [1.0 - float(s) / count for s in sums]


def preserved_ranks(shapes: dict[str, tuple[int, int]], importance: dict[str, float], mrr: float, trr: float) -> dict[str, int]:
    """Preserved rank per module: ``k = round((mrr + (trr - mrr) * n) * min(m, n))`` clamped to ``[1, min - 1]``,
    with ``n`` the module's normalised importance in [0, 1]."""
    out = {}
    for name, shape in shapes.items():
        d = min(shape)
        f = mrr + (trr - mrr) * importance[name]
        out[name] = int(min(max(round(f * d), 1), d - 1))
    return out


def _scaled_ranks(shapes: dict[str, tuple[int, int]], importance: dict[str, float], mrr: float, trr: float,
                  scale: float) -> dict[str, int]:
    """Preserved ranks with every module's trainable fraction multiplied by ``scale``: ``f_c = 1 - c (1 - f)``."""
    out = {}
    for name, shape in shapes.items():
        d = min(shape)
        f = 1.0 - scale * (1.0 - (mrr + (trr - mrr) * importance[name]))
        out[name] = int(min(max(round(f * d), 1), d - 1))
    return out


def _match_scale(shapes: dict[str, tuple[int, int]], importance: dict[str, float], mrr: float, trr: float,
                 budget: int, tolerance: float) -> tuple[BudgetReport, dict[str, int]]:
    """Budget matching for adaptive OSF: the scale ``c`` (geometric grid up to where every module is fully
    trainable) whose exact count is closest to ``budget``; returns the report and the preserved ranks."""
    fmax = max(mrr + (trr - mrr) * v for v in importance.values())
    c_max = 1.0 / max(1.0 - fmax, 1e-6)
    grid = [c_max * math.exp(-i / 200) for i in range(2000)][::-1]  # ~0.5 % steps, smallest c first
    report = match_budget("osf", budget, grid, lambda c: _count(shapes, _scaled_ranks(shapes, importance, mrr, trr, c)),
                          knob="trainable_scale", tolerance=tolerance)
    return report, _scaled_ranks(shapes, importance, mrr, trr, report.value)


def _count(shapes: dict[str, tuple[int, int]], ranks: dict[str, int]) -> int:
    """Trainable count of PEFT OSF: ``r (m + n + 1)`` per module with ``r = min(m, n) - k``."""
    return sum((min(s) - ranks[n]) * (s[0] + s[1] + 1) for n, s in shapes.items())


def _orth_complement(P: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis ``[d, d - a]`` of the complement of the orthonormal columns ``P`` ``[d, a]``."""
    d, a = P.shape
    if a == 0:
        return torch.eye(d, dtype=P.dtype, device=P.device)
    Q, _ = torch.linalg.qr(P, mode="complete")
    return Q[:, a:]


def _extend_basis(P: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of span([P, new]) whose first columns are P (``new`` is re-orthogonalised against P)."""
    if new.shape[1] == 0:
        return P
    new = new - P @ (P.T @ new)
    q, r = torch.linalg.qr(new)
    keep = r.diagonal().abs() > 1e-6 * max(1.0, float(r.diagonal().abs().max()))
    return torch.cat([P, q[:, keep]], dim=1)


def _energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest k whose top-k squared singular values carry ``energy`` of the total (0 for a zero matrix).

    Computed on the CPU: ``s`` is a short vector, and the singular values of a CUDA layer are on the GPU, where a
    CPU ``energy`` tensor would not mix with them (the first GPU study run failed here)."""
    e = s.detach().double().cpu().pow(2)
    total = float(e.sum())
    if total <= 0:
        return 0
    return int(torch.searchsorted(torch.cumsum(e, 0) / total, torch.tensor(energy, dtype=torch.float64)).item()) + 1


def _osf_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """PEFT's OSF forward, plus a dense path when it is cheaper.

    PEFT applies the update factored, ``x B^T A^T`` with inner width ``2r``: ideal for LoRA-sized ranks, but OSF's
    trainable rank is a large share of ``min(m, n)``, so for ``T`` tokens that costs ``2rT(m + n)`` on top of the base
    matmul. Materialising ``W + dW`` costs ``2rmn`` once per call instead, cheaper whenever ``T > mn / (m + n)``
    (about half the width; true for any real batch). Same values and gradients (PEFT's projection hooks sit on the
    factors and still apply).
    """
    base = self.get_base_layer()
    active = self.active_adapters[0] if self.active_adapters else None
    m, n = base.weight.shape
    tokens = x.numel() // max(x.shape[-1], 1)
    if self.disable_adapters or self.merged or active not in self.osf_svd_params or tokens * (m + n) <= m * n:
        return type(self).forward(self, x, *args, **kwargs)
    w = base.weight
    return nn.functional.linear(x, w + self.get_delta_weight(active).to(w.dtype), base.bias)


def _set_projector(layer: Any) -> None:
    """Choose, per side, the cheaper exact projector onto the complement of the preserved subspace, and hook it.

    Removing ``P`` (``g - P P^T g``, ``a`` preserved columns) and keeping ``Q`` (``Q Q^T g``, ``Q`` an orthonormal
    basis of the complement) give the same result; the cost is proportional to the basis width. The init factor
    (``U_low_init`` / ``V_low_init``) *is* such a ``Q`` when it spans the whole complement (the square side of a
    weight), so it is used when narrower than ``P`` -- e.g. a layer preserving 560 of 576 directions projects with
    16 columns, not 560. Replaces PEFT's gradient hooks (which always use ``P`` once it is stored) with the same
    projection, and :meth:`OSF.project_` uses it for the parameters.
    """
    PU, PV = layer._osf_U_high[_ADAPTER], layer._osf_V_high[_ADAPTER]
    U0, V0 = layer._osf_U_low_init[_ADAPTER], layer._osf_V_low_init[_ADAPTER]
    m, n = PU.shape[0], PV.shape[1]
    layer._osf_kt_keep = {
        "U": U0.shape[1] == m - PU.shape[1] and U0.shape[1] < PU.shape[1],
        "V": V0.shape[0] == n - PV.shape[0] and V0.shape[0] < PV.shape[0],
    }
    layer._detach_hooks()
    params = layer.osf_svd_params[_ADAPTER]
    for side, key in (("U", "U_low"), ("V", "V_low")):
        layer.hook_handles.append(params[key].register_hook(functools.partial(_project, layer, side)))


def _project(layer: Any, side: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` (``U_low``-shaped ``[m, r]`` or ``V_low``-shaped ``[r, n]``) without its preserved-subspace component."""
    keep = layer._osf_kt_keep[side]
    if side == "U":
        B = layer._osf_U_low_init[_ADAPTER] if keep else layer._osf_U_high[_ADAPTER]  # columns [m, d]
        c = B.T @ t
        return B @ c if keep else t - B @ c
    B = layer._osf_V_low_init[_ADAPTER] if keep else layer._osf_V_high[_ADAPTER]  # rows [d, n]
    c = t @ B.T
    return c @ B if keep else t - c @ B


# --------------------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------------------
@register
class OSF(Method):
    """Orthogonal subspace fine-tuning with per-layer preserved rank; see the module docstring."""

    name = "osf"
    config_cls = OSFMethodConfig
    config: OSFMethodConfig
    fsdp_unsupported = (
        "its guarantee projects each whole weight gradient and the updated weights onto the complement of the "
        "preserved subspace (hooks on the parameter objects, which FSDP replaces by per-rank shards that never see "
        "a whole matrix), and next_task() swaps in new parameters between tasks, which a sharded model cannot take"
    )

    def __init__(self, config: OSFMethodConfig | dict | None = None):
        super().__init__(config)
        self.calibration: torch.Tensor | None = None
        self.importance: dict[str, float] = {}  # normalised importance per target module (after prepare)
        self.ranks: dict[str, int] = {}  # preserved rank per target module at prepare
        self.task = 0
        self.layer_scores: dict[str, float] = {}  # raw 1 - cos per decoder block (after prepare with calibration)
        self._budget: tuple[int, float] | None = None  # (param_budget, tolerance) from for_budget, adaptive mode

    def set_calibration(self, input_ids: torch.Tensor) -> "OSF":
        """Token ids ``[N, T]`` (e.g. from ``kappatune.data.build_blocks``) used to measure layer importance."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
            raise DataError("OSF calibration data must be a non-empty [num_blocks, block_size] tensor of token ids")
        if input_ids.is_floating_point():
            raise DataError("OSF calibration data must hold integer token ids, not floats")
        self.calibration = input_ids.long()
        return self

    # -- config checks / ranks -------------------------------------------------------------------------------
    def _check_config(self) -> None:
        c = self.config
        if not (0.0 <= c.min_retention <= c.max_retention <= 1.0):
            raise ConfigError(f"osf: need 0 <= min_retention <= max_retention <= 1, got {c.min_retention}, {c.max_retention}")
        if not (0.0 < c.task_energy <= 1.0):
            raise ConfigError(f"osf: task_energy must be in (0, 1], got {c.task_energy}")
        if c.calibration_batch_size < 1:
            raise ConfigError("osf: calibration_batch_size must be >= 1")

    def _shapes(self, model: nn.Module, names: list[str]) -> dict[str, tuple[int, int]]:
        conv = [n for n in names if is_conv1d(model.get_submodule(n))]
        if conv:
            raise ConfigError(f"osf: PEFT's OSF adapts nn.Linear only, not Conv1D ({conv[0]})")
        shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
        small = [n for n, s in shapes.items() if min(s) < 2]
        if small:
            raise ConfigError(f"osf: {small[0]} has a dimension below 2, nothing to split into preserved/trainable")
        return shapes

    def _importance(self, model: nn.Module, names: list[str]) -> dict[str, float]:
        """Normalised importance in [0, 1] per module (0.5 everywhere, with a warning, without calibration)."""
        c = self.config
        if self.calibration is None:
            warnings.warn("osf: no calibration data (set_calibration); every layer gets the same preserved fraction "
                          f"{(c.min_retention + c.max_retention) / 2:.2f} (uniform importance)", stacklevel=3)
            return {n: 0.5 for n in names}
        lists: dict[str, set[int]] = {}
        for n in names:
            lo = layer_of(n)
            if lo is not None:
                lists.setdefault(lo[0], set()).add(lo[1])
        raw: dict[tuple[str, int], float] = {}
        for lst in lists:
            scores = layer_importance(model, self.calibration, lst, batch_size=c.calibration_batch_size, progress=c.progress)
            raw.update({(lst, i): s for i, s in enumerate(scores)})
        if not raw:
            warnings.warn("osf: targets are not inside numbered decoder blocks; using uniform importance", stacklevel=3)
            return {n: 0.5 for n in names}
        vals = list(raw.values())
        lo_v, hi_v = min(vals), max(vals)
        norm = {k: (v - lo_v) / (hi_v - lo_v) if hi_v > lo_v else 0.5 for k, v in raw.items()}
        mean = sum(norm.values()) / len(norm)
        self.layer_scores = {f"{k[0]}.{k[1]}": v for k, v in raw.items()}
        return {n: norm[layer_of(n)] if layer_of(n) in norm else mean for n in names}  # type: ignore[index]

    def _ranks(self, shapes: dict[str, tuple[int, int]], importance: dict[str, float]) -> dict[str, int]:
        c = self.config
        if c.effective_rank is None:
            return preserved_ranks(shapes, importance, c.min_retention, c.max_retention)
        er = c.effective_rank
        out = {}
        for n, s in shapes.items():
            d = min(s)
            if isinstance(er, float) and not isinstance(er, bool) and 0 < er < 1:
                k = min(max(1, round(er * d)), d - 1)  # a fraction always leaves one trainable direction
            elif isinstance(er, int) and not isinstance(er, bool) and er >= 1:
                k = er
            else:
                raise ConfigError(f"osf: effective_rank must be an int >= 1 or a fraction in (0, 1), got {er!r}")
            if k >= d:
                raise ConfigError(f"osf: effective_rank={er} preserves all {d} directions of {n} (weight {s}), leaving "
                                  "nothing to train; lower it")
            out[n] = int(min(k, d - 1))
        return out

    # -- prepare ---------------------------------------------------------------------------------------------
    def _prepare(self, model: nn.Module, targets: Targets) -> nn.Module:
        from peft import OSFConfig, get_peft_model

        self._check_config()
        names = resolve_targets(model, targets, self.name)
        shapes = self._shapes(model, names)
        self.importance = self._importance(model, names) if self.config.effective_rank is None else {n: 0.5 for n in names}
        self.ranks = self._ranks(shapes, self.importance)
        if self._budget is not None and self.config.effective_rank is None:
            self.budget_report, self.ranks = _match_scale(shapes, self.importance, self.config.min_retention,
                                                          self.config.max_retention, *self._budget)
        peft_cfg = OSFConfig(target_modules=names, rank_pattern={f"^{re.escape(n)}$": k for n, k in self.ranks.items()})
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*rank_pattern keys did not match.*")
            peft_model = get_peft_model(model, peft_cfg)
        self.target_names = names
        self.model = peft_model
        # PEFT stores the preserved bases only where they are not implied by U_low_init (non-square factors);
        # store them everywhere so projection (PEFT's hooks and project_) and tests use one explicit basis.
        from peft.tuners.osf.utils import decompose_weight_matrix
        from tqdm.auto import tqdm

        for name, layer in tqdm(self.layers().items(), desc="OSF preserved bases", unit="layer", leave=False,
                                disable=not self.config.progress):
            layer.forward = types.MethodType(_osf_forward, layer)
            k = layer.effective_rank[_ADAPTER]
            need_u, need_v = _ADAPTER not in layer._osf_U_high, _ADAPTER not in layer._osf_V_high
            if need_u or need_v:
                svd = decompose_weight_matrix(layer.get_base_layer().weight.data, top_k=k)
                if need_u:
                    layer._osf_U_high[_ADAPTER] = svd["U_high"].detach().clone()
                if need_v:
                    layer._osf_V_high[_ADAPTER] = svd["V_high"].detach().clone()
            _set_projector(layer)
        return peft_model

    def layers(self) -> dict[str, Any]:
        """PEFT ``OSFLayer`` modules by their *plain* model name (e.g. ``model.layers.0.self_attn.q_proj``)."""
        from peft.tuners.osf.layer import OSFLayer

        require_prepared(self)
        base = self.model.get_base_model()
        return {n: m for n, m in base.named_modules() if isinstance(m, OSFLayer)}

    def preserved_bases(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``(P_U [m, a], P_V [b, n])`` per module: the directions training must not touch."""
        return {n: (l._osf_U_high[_ADAPTER], l._osf_V_high[_ADAPTER]) for n, l in self.layers().items()}

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """The current update ``dW`` ``[out, in]`` of every adapted module (since the current task began)."""
        with torch.no_grad():
            return {n: l.get_delta_weight(_ADAPTER).detach() for n, l in self.layers().items()}

    # -- training --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def project_(self) -> None:
        """Remove any component of the trainable factors inside the preserved subspaces (idempotent)."""
        for layer in self.layers().values():
            p = layer.osf_svd_params[_ADAPTER]
            p["U_low"].copy_(_project(layer, "U", p["U_low"]))
            p["V_low"].copy_(_project(layer, "V", p["V_low"]))

    def make_optimizer(self, optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW, **kwargs: Any) -> torch.optim.Optimizer:
        """The optimizer over the OSF factors, re-projecting them after each step (see ``project_params``).

        If you build your own optimizer from :meth:`trainable_parameters`, call :meth:`project_` after each step.
        """
        opt = optimizer_cls(self.trainable_parameters(), **kwargs)
        if self.config.project_params:
            opt.register_step_post_hook(lambda *_: self.project_())
        return opt

    # -- sequential tasks ------------------------------------------------------------------------------------
    @torch.no_grad()
    def next_task(self) -> dict[str, int]:
        """Finish the current task: merge its update, preserve the directions it used, re-split every layer.

        Returns the preserved rank (columns of ``P_U``) per module for the next task. Build a new optimizer
        afterwards (the trainable tensors are new). Adapter files saved after this also hold the merged weights
        of the adapted modules, so they still load onto the *original* base model (same fingerprint).
        """
        from tqdm.auto import tqdm

        require_prepared(self)
        capped = []
        for name, layer in tqdm(self.layers().items(), desc="OSF next task", disable=not self.config.progress):
            base = layer.get_base_layer()
            W = base.weight
            dW = layer.get_delta_weight(_ADAPTER).float()
            W.copy_((W.float() + dW).to(W.dtype))  # merge this task's update
            PU = layer._osf_U_high[_ADAPTER].float()
            PV = layer._osf_V_high[_ADAPTER].float().T  # [n, b] columns
            m, n = W.shape
            Ud, Sd, Vdh = torch.linalg.svd(dW, full_matrices=False)
            k = _energy_rank(Sd, self.config.task_energy)
            room = min(m - PU.shape[1], n - PV.shape[1]) - 1  # keep at least one trainable direction
            if k > room:
                capped.append(name)
                k = max(room, 0)
            PU = _extend_basis(PU, Ud[:, :k])
            PV = _extend_basis(PV, Vdh[:k].T)
            self._install(layer, PU, PV.T)
        if capped:
            warnings.warn(f"osf: {len(capped)} layer(s) (e.g. {capped[0]}) ran out of free directions; part of the "
                          "last task's update could not be preserved (lower task_energy or retention)", stacklevel=3)
        self.task += 1
        return {n: l._osf_U_high[_ADAPTER].shape[1] for n, l in self.layers().items()}

    @torch.no_grad()
    def _install(self, layer: Any, PU: torch.Tensor, PV: torch.Tensor, params: dict[str, torch.Tensor] | None = None,
                 inits: dict[str, torch.Tensor] | None = None) -> None:
        """Re-split ``layer`` around explicit preserved bases ``PU`` [m, a] / ``PV`` [b, n].

        The trainable part is the SVD of ``Q_U^T W Q_V`` (W restricted to the complements), mapped back, so every
        factor lies in the complement exactly; ``params``/``inits`` (from an adapter file) replace the computed ones.
        """
        W = layer.get_base_layer().weight
        dtype, device = W.dtype, W.device
        if inits is None:
            QU, QV = _orth_complement(PU.float()), _orth_complement(PV.float().T)
            A, S, Bh = torch.linalg.svd(QU.T @ W.float() @ QV, full_matrices=False)
            inits = {"U_low": QU @ A, "S_low": S, "V_low": Bh @ QV.T}
        layer._detach_hooks()
        for key, buf in (("U_low", layer._osf_U_low_init), ("S_low", layer._osf_S_low_init), ("V_low", layer._osf_V_low_init)):
            buf[_ADAPTER] = inits[key].to(device=device, dtype=dtype).contiguous()
        layer._osf_U_high[_ADAPTER] = PU.to(device=device, dtype=dtype).contiguous()
        layer._osf_V_high[_ADAPTER] = PV.to(device=device, dtype=dtype).contiguous()
        src = params if params is not None else inits
        layer.osf_svd_params[_ADAPTER] = nn.ParameterDict(
            {k: nn.Parameter(src[k].to(device=device, dtype=dtype).clone()) for k in ("U_low", "S_low", "V_low")}
        )
        layer.effective_rank[_ADAPTER] = int(PU.shape[1])
        _set_projector(layer)

    # -- budget ----------------------------------------------------------------------------------------------
    @classmethod
    def for_budget(cls, model: nn.Module, param_budget: int, targets: Targets = "all-linear", *,
                   tolerance: float = 0.10, calibration: torch.Tensor | None = None, **config: Any) -> "OSF":
        """Scale every layer's trainable fraction by one factor ``c`` to land on ``param_budget``.

        Each module's preserved fraction ``f = mrr + (trr - mrr) n`` becomes ``f_c = 1 - c (1 - f)`` (then the usual
        rounding/clamping to ``[1, min(m, n) - 1]``): importance order is kept (important layers still preserve
        more). The report's value is ``c``. The search is repeated in :meth:`prepare` with the importance measured
        there (calibration set after this call is used), and ``budget_report`` updated to the exact count.
        With a fixed ``effective_rank`` the knob is one preserved fraction for every module instead.
        ``calibration``: token ids for importance.
        """
        param_budget = check_param_budget(param_budget, tolerance)
        probe = cls(config)
        probe._check_config()
        if calibration is not None:
            probe.set_calibration(calibration)
        names = resolve_targets(model, targets, cls.name)
        shapes = probe._shapes(model, names)
        c = probe.config
        if c.effective_rank is not None:
            # fixed (non-adaptive) mode: one preserved *fraction* for every module (an absolute rank cannot fit
            # modules of different sizes); the result's effective_rank is that fraction
            def count_fixed(frac: float) -> int:
                return _count(shapes, {n: int(min(max(round(frac * min(s)), 1), min(s) - 1)) for n, s in shapes.items()})

            report: BudgetReport = match_budget(cls.name, param_budget, [i / 1000 for i in range(999, 0, -1)],
                                                count_fixed, knob="effective_rank", tolerance=tolerance)
            m = cls({**c.to_dict(), "effective_rank": report.value})
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the uniform-importance warning is repeated at prepare()
                imp = probe._importance(model, names)
            report, _ = _match_scale(shapes, imp, c.min_retention, c.max_retention, param_budget, tolerance)
            m = cls(c.to_dict())
            # prepare() repeats the search with the importance it measures then (calibration may be set later,
            # e.g. by the harness), so the prepared count is always the reported one
            m._budget = (param_budget, tolerance)
        if calibration is not None:
            m.set_calibration(calibration)
        m.budget_report = report
        m.default_targets = targets
        return m

    # -- merge / persistence ---------------------------------------------------------------------------------
    def merge(self) -> nn.Module:
        """Fold the update into the base weights and unwrap: a plain transformers model for ``save_pretrained``."""
        require_prepared(self)
        return self.model.merge_and_unload()

    _KEYS = ("U_low", "S_low", "V_low", "U_low_init", "S_low_init", "V_low_init", "U_high", "V_high")

    def trained_state(self) -> dict[str, torch.Tensor]:
        """Trainable factors plus their initial values and the preserved bases (needed to resume, and after
        :meth:`next_task` not recomputable from the base weights); after :meth:`next_task` also each adapted
        module's merged base weight (``<module>.base_weight``), so the file takes the *original* base model to
        the current state, and ``_osf.task`` (the number of finished tasks)."""
        out = {"_osf.task": torch.tensor([self.task], dtype=torch.int64)}
        for n, l in self.layers().items():
            p = l.osf_svd_params[_ADAPTER]
            vals = {"U_low": p["U_low"], "S_low": p["S_low"], "V_low": p["V_low"],
                    "U_low_init": l._osf_U_low_init[_ADAPTER], "S_low_init": l._osf_S_low_init[_ADAPTER],
                    "V_low_init": l._osf_V_low_init[_ADAPTER], "U_high": l._osf_U_high[_ADAPTER],
                    "V_high": l._osf_V_high[_ADAPTER]}
            if self.task > 0:
                vals["base_weight"] = l.get_base_layer().weight
            out.update({f"{n}.{k}": v.detach().cpu().contiguous() for k, v in vals.items()})
        return out

    def load(self, path: str | Path) -> None:
        """Load an adapter saved by :meth:`save` into a model prepared from the same original base (also a file
        saved after :meth:`next_task`: its merged weights are restored too)."""
        require_prepared(self)
        state = self.read_adapter(path)
        task = state.pop("_osf.task", None)
        layers = self.layers()
        names = {k.rsplit(".", 1)[0] for k in state}
        if names != set(layers) or any(f"{n}.{k}" not in state for n in layers for k in self._KEYS):
            diff = sorted(names ^ set(layers))[:3]
            raise CacheError(f"adapter {path} does not match this prepared model's OSF layers (e.g. {diff})")
        for n, layer in layers.items():
            g = {k: state[f"{n}.{k}"] for k in self._KEYS}
            W = layer.get_base_layer().weight
            if g["U_low"].shape[0] != W.shape[0] or g["V_low"].shape[1] != W.shape[1]:
                raise CacheError(f"adapter {path}: {n} factors do not fit weight {tuple(W.shape)}")
            if f"{n}.base_weight" in state:
                bw = state[f"{n}.base_weight"]
                if bw.shape != W.shape:
                    raise CacheError(f"adapter {path}: {n} base weight {tuple(bw.shape)} does not fit {tuple(W.shape)}")
                with torch.no_grad():
                    W.copy_(bw)
            self._install(layer, g["U_high"], g["V_high"],
                          params={k: g[k] for k in ("U_low", "S_low", "V_low")},
                          inits={k: g[f"{k}_init"] for k in ("U_low", "S_low", "V_low")})
        self.task = int(task.item()) if task is not None else 0
