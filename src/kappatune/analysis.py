"""Spectral analysis of every weight tensor of a model, in one fast pass.

For each analysable tensor this computes κ = σ_max/σ_min (KappaTune), σ_max, σ_min, the stable rank
‖W‖_F²/σ_max², the spectral entropy of the normalised singular values and the Marchenko–Pastur SNR used by
Spectrum, so every selection policy in :mod:`kappatune.selection` is fed by the same numbers.

Why not just call ``torch.linalg.svdvals`` per matrix like the references do? Only singular values are needed, and
for a (m × n) matrix with m ≤ n they are the square roots of the eigenvalues of the m × m Gram matrix W Wᵀ.
Forming the Gram matrix is one GEMM (fast, all cores) and ``eigvalsh`` of a symmetric matrix is several times cheaper
than a bidiagonalising SVD, so on a 2-core CPU this is 3–6× faster per matrix. Squaring the matrix squares its
condition number, so the Gram path runs in float64 and is *only trusted* while κ ≤ ``gram_kappa_limit`` (1e4 by
default: float64's unit round-off times κ² stays ≈1e-8 there); beyond it the matrix is re-analysed with a float64
SVD. Equal-shaped matrices (e.g. all ``q_proj`` of a model, or the experts of a fused MoE tensor) are batched, the
computation runs on the weights' device, and under ``torch.distributed`` each rank analyses a share and the
results are gathered.

A rank-deficient matrix (σ_min ≤ max(m, n)·eps·σ_max, the tolerance ``torch.linalg.matrix_rank`` uses) gets
κ = inf and is flagged, instead of a silent epsilon; a tensor holding NaN/Inf raises :class:`ModelError`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .errors import ConfigError, ModelError

__all__ = [
    "TensorSpectrum",
    "SpectrumReport",
    "WeightRef",
    "analyze_model",
    "iter_weights",
    "check_patterns",
    "spectrum_from_singular_values",
    "singular_values",
    "extreme_singular_values",
    "spectrum_from_extremes",
]

ANALYSIS_VERSION = 2
DEFAULT_MOE_SUFFIXES = (".gate_up_proj", ".down_proj", ".gate_proj", ".up_proj", ".w1", ".w2", ".w3")


# ----------------------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TensorSpectrum:
    """Spectral figures of one weight tensor (one row of the report).

    ``kind``: ``linear`` (nn.Linear), ``conv1d`` (transformers' GPT-2 style Conv1D, stored transposed),
    ``moe`` (fused 3-D expert tensor; figures are the mean over experts, per-expert values in ``experts``),
    ``embedding`` (input embedding), ``head`` (output embedding / LM head, tied or not), or ``param`` (any other
    ≥2-D parameter, reshaped to (out, -1)).
    ``modules``: names of the linear-like modules that own this tensor (more than one when weights are tied).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    numel: int
    kappa: float
    sigma_max: float
    sigma_min: float
    stable_rank: float
    entropy: float
    snr: float
    rank_deficient: bool = False
    modules: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    layer: int | None = None
    module_type: str = ""
    experts: list[dict[str, float]] | None = None
    method: str = "gram"  # "gram" or "svd" (float64 fallback)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorSpectrum":
        d = dict(d)
        d["shape"] = tuple(d["shape"])
        return cls(**d)


@dataclass
class SpectrumReport:
    """All tensors of one model, with the analysis settings and the weights' fingerprint."""

    records: list[TensorSpectrum]
    fingerprint: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    from_cache: bool = False
    analysed_here: int = 0  # tensors this process analysed (fewer than len(records) when distributed or cached)

    def __iter__(self) -> Iterator[TensorSpectrum]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def by_name(self) -> dict[str, TensorSpectrum]:
        """Map every parameter name (aliases included) to its record."""
        out: dict[str, TensorSpectrum] = {}
        for r in self.records:
            out[r.name] = r
            for a in r.aliases:
                out[a] = r
        return out

    def sorted(self, key: str = "kappa", descending: bool = False) -> list[TensorSpectrum]:
        """Records sorted by a figure; inf/NaN always last."""
        def k(r: TensorSpectrum) -> tuple[int, float]:
            v = getattr(r, key)
            bad = not math.isfinite(v)
            return (1 if bad else 0, -v if (descending and not bad) else (v if not bad else 0.0))

        return sorted(self.records, key=k)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "version": ANALYSIS_VERSION,
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "seconds": self.seconds,
            "records": [r.to_dict() for r in self.records],
        }

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> "SpectrumReport":
        return cls(
            records=[TensorSpectrum.from_dict(r) for r in d["records"]],
            fingerprint=d.get("fingerprint", ""),
            settings=d.get("settings", {}),
            seconds=d.get("seconds", 0.0),
        )

    def save_json(self, path: str | Path) -> Path:
        from .storage import atomic_write_json

        return atomic_write_json(path, self.to_json_dict())

    def table(self, top: int | None = None, key: str = "kappa") -> str:
        """A fixed-width text table sorted by ``key`` (κ ascending by default)."""
        rows = self.sorted(key, descending=(key == "snr"))
        shown = rows[:top] if top else rows
        head = f"{'rank':>4}  {'tensor':<48} {'kind':<9} {'shape':<16} {'kappa':>11} {'s_max':>9} {'s_min':>10} {'st.rank':>8} {'snr':>8}"
        lines = [head, "-" * len(head)]
        for i, r in enumerate(shown, 1):
            shape = "x".join(map(str, r.shape))
            kappa = "inf" if math.isinf(r.kappa) else f"{r.kappa:.4g}"
            name = r.name if len(r.name) <= 48 else "…" + r.name[-47:]
            lines.append(
                f"{i:>4}  {name:<48} {r.kind:<9} {shape:<16} {kappa:>11} {r.sigma_max:>9.4g} {r.sigma_min:>10.4g} "
                f"{r.stable_rank:>8.3g} {r.snr:>8.3g}"
            )
        if top and len(rows) > top:
            lines.append(f"... {len(rows) - top} more tensors (use --top 0 for all)")
        deficient = [r.name for r in self.records if r.rank_deficient]
        if deficient:
            lines.append(f"rank-deficient (kappa = inf, ranked last): {', '.join(deficient[:8])}" + (" ..." if len(deficient) > 8 else ""))
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """PNG of log10 κ per layer, one line per module type."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        groups: dict[str, list[tuple[int, float]]] = {}
        other: list[tuple[str, float]] = []
        for r in self.records:
            val = math.log10(r.kappa) if math.isfinite(r.kappa) and r.kappa > 0 else float("nan")
            if r.layer is None:
                other.append((r.module_type or r.name, val))
            else:
                groups.setdefault(r.module_type or r.kind, []).append((r.layer, val))
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for mtype, pts in sorted(groups.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=mtype)
        ax.set_xlabel("layer")
        ax.set_ylabel("log10 condition number κ")
        ax.set_title("Condition number per layer and module type (low κ = adapted first by KappaTune)")
        if groups:
            ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        from .storage import atomic_write_bytes
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        return atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------------------
# Enumeration of weights
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class WeightRef:
    """One analysable tensor of a model, before analysis."""

    name: str
    kind: str
    tensor: torch.Tensor  # dequantized / detached view; 2-D, or 3-D for kind "moe"
    numel: int
    shape: tuple[int, ...]
    modules: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)

    @property
    def matrices(self) -> int:
        return self.tensor.shape[0] if self.kind == "moe" else 1


def _dequantize(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """Float copy of a possibly bitsandbytes-quantized weight (4-bit ``quant_state`` or int8 ``SCB``)."""
    if hasattr(weight, "quant_state") and weight.quant_state is not None:
        import bitsandbytes.functional as bnbf  # only reachable when bnb weights exist

        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    state = getattr(module, "state", None)
    if weight.dtype == torch.int8 and state is not None and getattr(state, "SCB", None) is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.int8_vectorwise_dequant(getattr(state, "CB", None) if getattr(state, "CB", None) is not None else weight.data, state.SCB).float()
    if weight.dtype == torch.int8 and getattr(weight, "SCB", None) is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.int8_vectorwise_dequant(weight.data, weight.SCB).float()
    return weight.detach()


def check_patterns(patterns: Any, where: str = "include") -> list[str] | None:
    """``patterns`` (``include``/``exclude``) as a list of strings, each ``re:`` expression compiled once so that a
    bad one is a :class:`ConfigError` naming it instead of a ``re.error`` deep inside the matching. A single string
    is one pattern (never iterated character by character)."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"{where} must be a list of name patterns (glob, substring or re:REGEX), got {patterns!r}")
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as exc:
                raise ConfigError(f"{where}: {p!r} is not a valid regular expression: {exc}") from None
        elif not p:
            raise ConfigError(f"{where}: an empty pattern matches every name; remove it")
    return list(patterns)


def _matches(name: str, patterns: Sequence[str] | None) -> bool:
    """True if ``name`` matches any glob pattern or regular expression (``re:`` prefix) in ``patterns``."""
    for p in patterns or ():
        if p.startswith("re:"):
            hit = re.search(p[3:], name) is not None
        elif any(c in p for c in "*?["):
            hit = fnmatch.fnmatchcase(name, p)
        else:
            hit = p in name
        if hit:
            return True
    return False


def iter_weights(
    model: nn.Module,
    *,
    min_ndim: int = 2,
    max_dim_size: int | None = 16384,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    moe_suffixes: Sequence[str] = DEFAULT_MOE_SUFFIXES,
) -> list[WeightRef]:
    """Every analysable weight of ``model``, tied tensors once.

    ``include``/``exclude``: glob patterns (a bare word matches as a substring, e.g. ``"q_proj"``) or ``re:``
    regular expressions, tested on parameter names. ``max_dim_size`` skips tensors with a larger dimension
    (as the references do), ``min_ndim`` skips vectors (norms, biases).
    """
    include, exclude = check_patterns(include, "include"), check_patterns(exclude, "exclude")
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover - transformers always installed with kappatune
        Conv1D = ()  # type: ignore[assignment]

    # Linear-like modules owning each weight tensor (several when weights are tied).
    linear_owner: dict[int, list[str]] = {}
    for mname, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and isinstance(module, (nn.Linear, Conv1D)) or (
            isinstance(w, torch.Tensor) and type(module).__name__ in ("Linear4bit", "Linear8bitLt")
        ):
            linear_owner.setdefault(id(w), []).append(mname)

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = {id(w) for w in [getattr(out_emb, "weight", None)] if isinstance(w, torch.Tensor)}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}

    refs: dict[tuple[int, int], WeightRef] = {}
    order: list[tuple[int, int]] = []
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            # Tied weights share storage; on the meta device (a skeleton built from a config for streaming) there is
            # no storage, and tied weights are the same Parameter object.
            key = (p.data_ptr(), p.numel()) if p.numel() and p.device.type != "meta" else (id(p), 0)
            if key in refs:
                if full not in refs[key].aliases and full != refs[key].name:
                    refs[key].aliases.append(full)
                continue
            is_linear = pname == "weight" and id(p) in linear_owner
            is_moe = p.dim() == 3 and (any(full.endswith(s) for s in moe_suffixes) or ".experts." in f".{full}")
            if id(p) in embeddings or id(p) in heads:
                # Input embedding and output head (tied or not): not adapted by default (see selection.DEFAULT_KINDS).
                kind = "head" if id(p) in heads else "embedding"
                t = p.detach() if p.dim() == 2 else p.detach().reshape(p.shape[0], -1)
            elif is_linear:
                kind = "conv1d" if isinstance(module, Conv1D) else "linear"
                t = _dequantize(module, p)
                if kind == "conv1d":
                    t = t.t()
            elif is_moe:
                kind, t = "moe", p.detach()
            else:
                if p.dim() < 2:
                    continue
                kind, t = "param", p.detach().reshape(p.shape[0], -1)
            if p.dim() < min_ndim and not is_linear:
                continue
            ref = WeightRef(name=full, kind=kind, tensor=t, numel=p.numel(), shape=tuple(p.shape),
                            modules=list(linear_owner.get(id(p), [])))
            refs[key] = ref
            order.append(key)
    out = []
    for key in order:
        ref = refs[key]
        names = [ref.name, *ref.aliases]
        mat_shape = ref.tensor.shape[-2:]
        if max_dim_size is not None and any(d > max_dim_size for d in mat_shape):
            continue
        if include and not any(_matches(n, include) for n in names):
            continue
        if exclude and any(_matches(n, exclude) for n in names):
            continue
        out.append(ref)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Numerics
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _one_lapack_thread(enabled: bool):
    """Run LAPACK with one thread per call (matrices are spread over a thread pool instead).

    MKL's threaded symmetric eigensolver and SVD are memory-bound and, on a CPU shared with other work, their
    OpenMP threads spin: measured here on 2 cores, ``eigvalsh`` of a 2048² float64 matrix took 6.5 s with 2
    threads and 2.6 s with 1. GEMMs (the Gram matrices) keep every thread.
    """
    if not enabled:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _per_matrix(fn, mats: torch.Tensor, workers: int) -> torch.Tensor:
    """Apply a LAPACK routine to each matrix of a batch, ``workers`` at a time (torch releases the GIL)."""
    if mats.device.type != "cpu" or workers <= 1 or mats.shape[0] == 1:
        return fn(mats)
    from concurrent.futures import ThreadPoolExecutor

    with _one_lapack_thread(True), ThreadPoolExecutor(workers) as pool:
        return torch.stack(list(pool.map(fn, mats.unbind(0))))


def _gram_blocks(m: int, min_block: int = 256, max_blocks: int = 8) -> list[tuple[int, int]]:
    """Row blocks ``[(start, end)]`` of an m × m Gram matrix (see :func:`_lower_gram`)."""
    nb = max(1, min(max_blocks, m // min_block))
    bs = -(-m // nb)
    return [(i, min(i + bs, m)) for i in range(0, m, bs)]


def _lower_gram(a: torch.Tensor, min_block: int = 256, max_blocks: int = 8,
                block_bytes: int = 64 << 20) -> torch.Tensor:
    """The lower triangle of ``a @ aᵀ`` in float64 for a batch ``(B, m, n)`` of any float dtype, in row blocks:
    ~(nb+1)/(2·nb) of the flops.

    ``eigvalsh`` and ``cholesky`` read only the lower triangle, so the upper blocks are never computed (left zero;
    the diagonal blocks are full); torch has no SYRK, and with 8 blocks this is 56% of a full GEMM's work
    (measured: 2.9 s instead of 4.9 s for a 4096 × 14336 float64 matrix on 2 cores). The columns are converted to
    float64 one block of ≤ ``block_bytes`` per matrix at a time and their products accumulated, so a bf16 tensor
    never exists as a whole float64 copy (a 14336 × 4096 one would be 470 MB). The block width depends on m
    only, so a matrix gets bit-identical values alone or in a batch.
    """
    m, n = a.shape[-2:]
    blocks = _gram_blocks(m, min_block, max_blocks)
    kb = max(256, min(n, block_bytes // max(1, m * 8)))
    gram = torch.zeros(*a.shape[:-1], m, dtype=torch.float64, device=a.device)
    for k in range(0, n, kb):
        src = a[..., k:k + kb]
        # Always a contiguous float64 block: the GEMM then sees one memory layout whether the matrix came alone, in
        # a batch or transposed (another layout picks other kernels and rounds differently).
        x = src if src.dtype == torch.float64 and src.is_contiguous() else \
            torch.empty(src.shape, dtype=torch.float64, device=src.device).copy_(src)
        if len(blocks) == 1:
            gram.baddbmm_(x, x.transpose(-2, -1)) if gram.dim() == 3 else gram.addmm_(x, x.transpose(-2, -1))
            continue
        for i, e in blocks:
            out = gram[..., i:e, :e]
            if out.dim() == 3:
                out.baddbmm_(x[..., i:e, :], x[..., :e, :].transpose(-2, -1))
            else:
                out.addmm_(x[..., i:e, :], x[..., :e, :].transpose(-2, -1))
    return gram


def _symmetrize_lower_(gram: torch.Tensor) -> torch.Tensor:
    """Make a :func:`_lower_gram` result the full symmetric matrix in place (the lower triangle mirrored, block by
    block: temporaries of one diagonal block only)."""
    for i, e in _gram_blocks(gram.shape[-1]):
        d = gram[..., i:e, i:e]
        d.copy_(d.tril() + d.tril(-1).transpose(-2, -1))
        if i:
            gram[..., :i, i:e].copy_(gram[..., i:e, :i].transpose(-2, -1))
    return gram


def singular_values(mats: torch.Tensor, *, gram_kappa_limit: float = 1e4) -> tuple[torch.Tensor, list[str]]:
    """Singular values (descending, float64) of a batch of equal-shaped matrices ``(B, m, n)``.

    Gram + ``eigvalsh`` in float64 where the resulting κ ≤ ``gram_kappa_limit``; float64 SVD for the others.
    Returns the values and, per matrix, ``"gram"`` or ``"svd"``.
    """
    a = mats if mats.is_floating_point() else mats.to(torch.float64)  # float64 per column block in _lower_gram
    if a.shape[-2] > a.shape[-1]:
        a = a.transpose(-2, -1)
    m, n = a.shape[-2:]
    if m == 0 or n == 0:
        return torch.zeros(a.shape[0], 0, dtype=torch.float64), ["gram"] * a.shape[0]
    workers = torch.get_num_threads()
    gram = _lower_gram(a)
    with _one_lapack_thread(a.device.type == "cpu"):
        eig = _per_matrix(torch.linalg.eigvalsh, gram, workers)
    sv = eig.flip(-1).clamp_min(0).sqrt()  # descending
    smax, smin = sv[:, 0], sv[:, -1]
    trusted = smin * gram_kappa_limit >= smax
    methods = ["gram"] * a.shape[0]
    if not bool(trusted.all()):
        idx = (~trusted).nonzero().flatten()
        sv = sv.clone()
        with _one_lapack_thread(a.device.type == "cpu"):
            sv[idx] = _per_matrix(torch.linalg.svdvals, a[idx].to(torch.float64), workers)
        for i in idx.tolist():
            methods[i] = "svd"
    return sv, methods


def _krylov_top_eigenvalue(op, batch: int, m: int, *, dtype: torch.dtype, device: torch.device, tol: float,
                           max_steps: int, block: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest eigenvalue of each of ``batch`` symmetric positive semi-definite m × m operators (``op(X)`` maps a
    ``(batch, m, block)`` block to its product), by block Lanczos with full reorthogonalisation and Rayleigh–Ritz.

    Rigorous a posteriori stopping rule: for the top Ritz pair (θ, y) the explicit residual r = ‖Op y − θ y‖
    bounds the distance from θ to an eigenvalue, and θ ≤ λ_max (Cauchy interlacing), so the error is
    min(r, r²/gap) with gap the distance to the next Ritz value (Kato–Temple, once gap > r). Stops per matrix
    when that is ≤ ``tol``·θ; returns (θ, converged) and the caller falls back to a full solver where
    ``converged`` is False. Blocks of 4 vectors make each product a small GEMM (memory-bound like a single
    matrix-vector product, so ~4 directions for the price of one) and need fewer steps on clustered spectra.
    The start block is a seeded Gaussian, so results are reproducible bit for bit.
    """
    b = max(1, min(block, m))
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, m, b, generator=g, dtype=dtype).to(device))
    Q, W = q, op(q)
    T = Q.mT @ W
    theta = torch.zeros(batch, dtype=dtype, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    steps = max(1, min(max_steps, m) // b)
    for k in range(1, steps + 1):
        th, S = torch.linalg.eigh((T + T.mT) / 2)
        y = S[..., -1:]
        theta = th[..., -1]
        r = torch.linalg.vector_norm(W @ y - theta[:, None, None] * (Q @ y), dim=(1, 2))
        if Q.shape[-1] >= m:  # the Krylov space is the whole space: Ritz values are the eigenvalues
            done[:] = True
            break
        gap = th[..., -1] - th[..., -2]
        bound = torch.where(gap > r, torch.minimum(r, r * r / gap.clamp_min(torch.finfo(dtype).tiny)), r)
        done = bound <= tol * theta.abs()
        if bool(done.all()) or k == steps:
            break
        nb = min(b, m - Q.shape[-1])
        v = W[..., -b:][..., :nb]
        v = v - Q @ (Q.mT @ v)
        v = v - Q @ (Q.mT @ v)  # twice is enough (Kahan–Parlett)
        # A (numerically) vanishing direction means an invariant subspace was found: replace the block by fresh
        # random directions orthogonal to Q (the Ritz values found stay exact, so the bound stays valid).
        nrm = torch.linalg.vector_norm(v, dim=1).amin(-1)
        ref = torch.linalg.vector_norm(W[..., -b:], dim=1).amax(-1).clamp_min(torch.finfo(dtype).tiny)
        if bool((nrm <= 1e-8 * ref).any()):
            fresh = torch.randn(batch, m, nb, generator=g, dtype=dtype).to(device)
            fresh = fresh - Q @ (Q.mT @ fresh)
            fresh = fresh - Q @ (Q.mT @ fresh)
            v = torch.where((nrm <= 1e-8 * ref)[:, None, None], fresh, v)
        v, _ = torch.linalg.qr(v)
        w = op(v)
        top = Q.mT @ w
        corner = v.mT @ w
        T = torch.cat([torch.cat([T, top], -1), torch.cat([top.mT, corner], -1)], -2)
        Q, W = torch.cat([Q, v], -1), torch.cat([W, w], -1)
    return theta, done


def extreme_singular_values(
    mats: torch.Tensor, *, gram_kappa_limit: float = 1e4, tol: float = 1e-8, eigvalsh_below: int = 320,
    max_steps: int = 300,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """σ_max, σ_min and ‖W‖_F² (float64) of a batch ``(B, m, n)`` without a full eigendecomposition (κ-only mode).

    The float64 Gram matrix G = W Wᵀ (m ≤ n) is Cholesky-factorised (G = L Lᵀ, m³/3 flops of BLAS-3, about a tenth
    of ``eigvalsh``'s memory-bound tridiagonalisation); σ_max² = λ_max(G) and σ_min² = 1/λ_max(G⁻¹) come from
    Lanczos (:func:`_krylov_top_eigenvalue`, relative error ≤ ``tol`` each, so κ is within ~``tol`` of the exact
    Gram value), G⁻¹ applied by two triangular solves. The Cholesky factorisation fails exactly when G is
    numerically singular; those matrices, matrices whose κ exceeds ``gram_kappa_limit`` (the limit the full
    Gram path trusts) and any where Lanczos did not converge are redone with a float64 ``svdvals``. Matrices
    with fewer than ``eigvalsh_below`` rows take the full ``eigvalsh`` (cheaper there: measured, see the
    README). Returns (σ_max, σ_min, ‖W‖_F², per-matrix method ``"lanczos"``/``"gram"``/``"svd"``).
    """
    a = mats if mats.is_floating_point() else mats.to(torch.float64)  # float64 per column block in _lower_gram
    if a.shape[-2] > a.shape[-1]:
        a = a.transpose(-2, -1)
    batch, m, n = a.shape
    if m == 0 or n == 0:
        z = torch.zeros(batch, dtype=torch.float64)
        return z, z, z.clone(), ["gram"] * batch
    if m < eigvalsh_below:
        sv, methods = singular_values(a, gram_kappa_limit=gram_kappa_limit)
        fro2 = (sv * sv).sum(-1)
        return sv[:, 0].cpu(), sv[:, -1].cpu(), fro2.cpu(), methods
    gram = _symmetrize_lower_(_lower_gram(a))  # the full symmetric matrix (Lanczos multiplies by it)
    fro2 = gram.diagonal(dim1=-2, dim2=-1).sum(-1)  # ‖W‖_F² = trace(W Wᵀ), without a float64 copy of W
    chol, info = torch.linalg.cholesky_ex(gram)
    ok = info == 0
    chol_t = chol.mT.contiguous()

    def inv_op(x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve_triangular(chol_t, torch.linalg.solve_triangular(chol, x, upper=False), upper=True)

    # Lanczos is a long chain of small memory-bound products: on a CPU, OpenMP threads only spin on them (measured
    # 13x slower with 2 threads than 1 on a loaded 2-core machine), so it runs single-threaded there.
    with _one_lapack_thread(a.device.type == "cpu"):
        lam_max, conv_max = _krylov_top_eigenvalue(lambda x: gram @ x, batch, m, dtype=torch.float64, device=a.device,
                                                   tol=tol, max_steps=max_steps, seed=1)
        if bool(ok.any()):
            inv_max, conv_min = _krylov_top_eigenvalue(inv_op, batch, m, dtype=torch.float64, device=a.device, tol=tol,
                                                       max_steps=max_steps, seed=2)
        else:
            inv_max, conv_min = torch.ones_like(lam_max), torch.zeros_like(ok)
    smax = lam_max.clamp_min(0).sqrt()
    smin = torch.where(ok & (inv_max > 0), 1.0 / inv_max.clamp_min(torch.finfo(torch.float64).tiny).sqrt(),
                       torch.zeros_like(smax))
    trusted = ok & conv_max & conv_min & (smin * gram_kappa_limit >= smax)
    methods = ["lanczos"] * batch
    if not bool(trusted.all()):
        idx = (~trusted).nonzero().flatten()
        with _one_lapack_thread(a.device.type == "cpu"):
            sv = _per_matrix(torch.linalg.svdvals, a[idx].to(torch.float64), torch.get_num_threads())
        smax, smin = smax.clone(), smin.clone()
        smax[idx], smin[idx] = sv[:, 0], sv[:, -1]
        for i in idx.tolist():
            methods[i] = "svd"
    return smax.cpu(), smin.cpu(), fro2.cpu(), methods


def spectrum_from_extremes(smax: float, smin: float, fro2: float, shape: Sequence[int]) -> dict[str, float]:
    """The κ-only figures (κ, σ_max, σ_min, stable rank) from the extreme singular values and ‖W‖_F².

    Spectral entropy and SNR need every singular value: they are NaN in a κ-only analysis.
    """
    m, n = sorted(int(d) for d in shape[-2:])
    if m == 0:
        return dict(kappa=math.inf, sigma_max=0.0, sigma_min=0.0, stable_rank=0.0, entropy=math.nan, snr=math.nan,
                    rank_deficient=True)
    tol = max(m, n) * torch.finfo(torch.float64).eps * smax
    rank_deficient = smax == 0.0 or smin <= tol
    return dict(kappa=math.inf if rank_deficient else smax / smin, sigma_max=smax, sigma_min=smin,
                stable_rank=fro2 / (smax * smax) if smax > 0 else 0.0, entropy=math.nan, snr=math.nan,
                rank_deficient=rank_deficient)


def spectrum_from_singular_values(sv: torch.Tensor, shape: Sequence[int]) -> dict[str, float]:
    """κ, σ_max, σ_min, stable rank, spectral entropy and Marchenko–Pastur SNR from descending singular values.

    Entropy: Shannon entropy (nats) of p_i = σ_i/Σσ (exp of it is Roy & Vetterli's effective rank).
    SNR (Spectrum, Hartford et al. 2024): σ_noise = IQR(σ)/1.349, MP edge = σ_noise·(1+√β) with β = m/n ≤ 1;
    SNR = Σσ above the edge / Σσ below it, divided by σ_max.
    """
    sv = sv.double()
    m, n = sorted(int(d) for d in shape[-2:])
    if sv.numel() == 0:
        return dict(kappa=math.inf, sigma_max=0.0, sigma_min=0.0, stable_rank=0.0, entropy=0.0, snr=0.0, rank_deficient=True)
    smax = float(sv[0])
    smin = float(sv[-1])
    tol = max(m, n) * torch.finfo(torch.float64).eps * smax
    rank_deficient = smax == 0.0 or smin <= tol
    kappa = math.inf if rank_deficient else smax / smin
    fro2 = float((sv * sv).sum())
    stable_rank = fro2 / (smax * smax) if smax > 0 else 0.0
    total = float(sv.sum())
    if total > 0:
        p = sv / total
        p = p[p > 0]
        entropy = float(-(p * p.log()).sum())
    else:
        entropy = 0.0
    if smax > 0 and sv.numel() > 1:
        q = torch.quantile(sv, torch.tensor([0.25, 0.75], dtype=sv.dtype))
        sigma_noise = float(q[1] - q[0]) / 1.349
        edge = sigma_noise * (1 + math.sqrt(m / n))
        signal = float(sv[sv > edge].sum())
        noise = float(sv[sv <= edge].sum())
        snr = (signal / noise if noise > 0 else math.inf) / smax
    else:
        snr = 0.0
    return dict(kappa=kappa, sigma_max=smax, sigma_min=smin, stable_rank=stable_rank, entropy=entropy, snr=snr,
                rank_deficient=rank_deficient)


def _layer_and_type(name: str) -> tuple[int | None, str]:
    parts = name.split(".")
    if parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    layer = next((int(p) for p in parts if p.isdigit()), None)
    mtype = parts[-1] if parts else name
    return layer, mtype


def _check_finite(ref: WeightRef) -> None:
    if not bool(torch.isfinite(ref.tensor).all()):
        raise ModelError(f"weight tensor {ref.name!r} contains NaN or Inf values; fix or reload the model before analysing it")


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------
def _analysis_device(t: torch.Tensor, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if t.device.type in ("cuda", "xpu"):
        return t.device
    return torch.device("cpu")  # MPS has no float64


def matrix_work_bytes(m: int, n: int, element_size: int, kappa_only: bool = False) -> int:
    """Working memory of one m × n matrix (m ≤ n) in a batch: its stacked copy, the float64 Gram matrix (three
    m × m matrices in κ-only mode: Gram, Cholesky factor and its transpose) and its float64 column block."""
    return m * n * element_size + (3 if kappa_only else 1) * m * m * 8 + min(n, max(256, (64 << 20) // max(1, m * 8))) * m * 8


def _analyze_refs(
    refs: list[WeightRef],
    *,
    gram_kappa_limit: float,
    device: str | torch.device | None,
    max_chunk_bytes: int,
    progress: bool,
    kappa_only: bool = False,
    check_finite: bool = True,
) -> list[TensorSpectrum]:
    """Spectral records of ``refs`` (in order); equal-shaped matrices are batched (≤ ``max_chunk_bytes`` of working
    memory per batch, :func:`matrix_work_bytes`) so LAPACK runs on several at once, one thread each.
    ``check_finite=False``: the caller already checked for NaN/Inf."""
    from tqdm.auto import tqdm

    # Work items: (ref index, expert index or None, 2-D matrix); grouped by matrix shape for batching.
    groups: dict[tuple[int, int, str], list[tuple[int, int | None]]] = {}
    for i, ref in enumerate(refs):
        if check_finite:
            _check_finite(ref)
        mats = [(i, e) for e in range(ref.tensor.shape[0])] if ref.kind == "moe" else [(i, None)]
        shape = tuple(ref.tensor.shape[-2:])
        shape = (min(shape), max(shape))
        dev = _analysis_device(ref.tensor, device)
        groups.setdefault((shape[0], shape[1], str(dev)), []).extend(mats)

    per_matrix: dict[tuple[int, int | None], tuple[torch.Tensor, str]] = {}
    total = sum(len(v) for v in groups.values())
    bar = tqdm(total=total, desc="Analysing weight spectra", unit="matrix", disable=not progress, leave=False)
    try:
        for (m, n, dev), items in groups.items():
            elem = max(refs[i].tensor.element_size() for i, _ in items)
            per = max(1, max_chunk_bytes // matrix_work_bytes(m, n, elem, kappa_only))
            for start in range(0, len(items), per):
                chunk = items[start:start + per]
                mats = []
                for i, e in chunk:
                    t = refs[i].tensor if e is None else refs[i].tensor[e]
                    # Kept in its own float dtype (float64 per column block in _lower_gram); a lone matrix is not
                    # copied by a stack.
                    t = t.to(device=dev) if t.is_floating_point() else t.to(device=dev, dtype=torch.float64)
                    mats.append(t.t() if t.shape[0] > t.shape[1] else t)
                mats = mats[0].unsqueeze(0) if len(mats) == 1 else torch.stack(mats)
                if kappa_only:
                    smax, smin, fro2, methods = extreme_singular_values(mats, gram_kappa_limit=gram_kappa_limit)
                    for k, key in enumerate(chunk):
                        per_matrix[key] = (torch.stack([smax[k], smin[k], fro2[k]]), methods[k])
                else:
                    sv, methods = singular_values(mats, gram_kappa_limit=gram_kappa_limit)
                    sv = sv.cpu()
                    for k, key in enumerate(chunk):
                        per_matrix[key] = (sv[k], methods[k])
                bar.update(len(chunk))
    finally:
        bar.close()

    def stats(values: torch.Tensor, shape: Sequence[int]) -> dict[str, float]:
        if kappa_only:
            return spectrum_from_extremes(float(values[0]), float(values[1]), float(values[2]), shape)
        return spectrum_from_singular_values(values, shape)

    records = []
    for i, ref in enumerate(refs):
        layer, mtype = _layer_and_type(ref.name)
        if ref.kind == "moe":
            experts = []
            for e in range(ref.tensor.shape[0]):
                sv, _ = per_matrix[(i, e)]
                experts.append(stats(sv, ref.tensor.shape[-2:]))
            agg = {k: float(sum(x[k] for x in experts) / len(experts)) for k in ("kappa", "sigma_max", "sigma_min", "stable_rank", "entropy", "snr")}
            agg["rank_deficient"] = any(x["rank_deficient"] for x in experts)
            used = {per_matrix[(i, e)][1] for e in range(ref.tensor.shape[0])}
            method = "svd" if "svd" in used else ("lanczos" if "lanczos" in used else "gram")
            rec = TensorSpectrum(name=ref.name, kind=ref.kind, shape=ref.shape, numel=ref.numel, modules=ref.modules,
                                 aliases=ref.aliases, layer=layer, module_type=mtype, experts=experts, method=method, **agg)
        else:
            sv, method = per_matrix[(i, None)]
            rec = TensorSpectrum(name=ref.name, kind=ref.kind, shape=ref.shape, numel=ref.numel, modules=ref.modules,
                                 aliases=ref.aliases, layer=layer, module_type=mtype, method=method,
                                 **stats(sv, ref.tensor.shape))
        records.append(rec)
    return records


def _cache_path(fingerprint: str) -> Path:
    from .storage import cache_dir

    return cache_dir("analysis") / f"{fingerprint}.json"


def _read_cache(path: Path, fingerprint: str) -> SpectrumReport | None:
    """Cached report for this fingerprint, or None; a corrupt entry warns and is recomputed."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        body = json.dumps(data["records"], sort_keys=True)
        import hashlib

        if data.get("checksum") != hashlib.sha256(body.encode()).hexdigest() or data.get("fingerprint") != fingerprint:
            raise ValueError("checksum mismatch")
        if data.get("version") != ANALYSIS_VERSION:
            return None
        rep = SpectrumReport.from_json_dict(data)
        rep.from_cache = True
        return rep
    except Exception as exc:  # corrupt file of any kind: never trust it, never crash on it
        warnings.warn(f"analysis cache entry {path} is corrupt ({exc}); recomputing", stacklevel=3)
        return None


def _write_cache(path: Path, report: SpectrumReport) -> None:
    import hashlib

    from .storage import atomic_write_text

    data = report.to_json_dict()
    data["checksum"] = hashlib.sha256(json.dumps(data["records"], sort_keys=True).encode()).hexdigest()
    try:
        atomic_write_text(path, json.dumps(data))
    except Exception as exc:  # a cache that cannot be written must not fail the analysis
        warnings.warn(f"could not write analysis cache {path}: {exc}", stacklevel=3)


def _distributed_share(refs: list[WeightRef]) -> tuple[list[int], Any]:
    """Indices this rank analyses (cost-balanced round robin) and the process group, when distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(range(len(refs))), None
    world, rank = dist.get_world_size(), dist.get_rank()
    cost = sorted(range(len(refs)), key=lambda i: -refs[i].numel * min(refs[i].tensor.shape[-2:]))
    return sorted(cost[rank::world]), dist


def analyze_model(
    model: nn.Module,
    *,
    min_ndim: int = 2,
    max_dim_size: int | None = 16384,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    moe_suffixes: Sequence[str] = DEFAULT_MOE_SUFFIXES,
    gram_kappa_limit: float = 1e4,
    device: str | torch.device | None = None,
    cache: bool | str | Path = True,
    progress: bool = True,
    max_chunk_bytes: int = 1 << 30,
    kappa_only: bool = False,
) -> SpectrumReport:
    """Analyse every weight tensor of ``model`` (see the module docstring for what and how).

    ``kappa_only``: compute only κ, σ_max, σ_min and the stable rank (entropy and SNR are NaN) with
    :func:`extreme_singular_values`, without a full eigendecomposition: what the κ selection needs, and faster
    on large matrices. A cached full analysis of the same weights also answers a κ-only request.

    ``cache``: True uses ``$KAPPATUNE_CACHE/analysis/<fingerprint>.json`` (the key is a hash of the analysed
    weights and settings, never a file name); a path uses that directory; False disables caching.
    """
    from .storage import fingerprint_tensors

    t0 = time.perf_counter()
    include, exclude = check_patterns(include, "include"), check_patterns(exclude, "exclude")
    refs = iter_weights(model, min_ndim=min_ndim, max_dim_size=max_dim_size, include=include, exclude=exclude,
                        moe_suffixes=moe_suffixes)
    if not refs:
        raise ModelError(
            f"{type(model).__name__} has no analysable weight (no ≥{min_ndim}-D parameter passes the filters"
            f" max_dim_size={max_dim_size}, include={include}, exclude={exclude})"
        )
    settings = dict(min_ndim=min_ndim, max_dim_size=max_dim_size, include=list(include or []), exclude=list(exclude or []),
                    moe_suffixes=list(moe_suffixes), gram_kappa_limit=gram_kappa_limit, version=ANALYSIS_VERSION)
    if kappa_only:
        settings["kappa_only"] = True
    fingerprint = ""
    path = None
    if cache:
        import hashlib

        weights_hash = fingerprint_tensors((r.name, r.tensor) for r in refs)

        def key(st: dict[str, Any]) -> tuple[str, Path]:
            fp = hashlib.blake2b(f"{weights_hash}|{json.dumps(st, sort_keys=True)}".encode(), digest_size=16).hexdigest()
            return fp, (Path(cache) / f"{fp}.json") if not isinstance(cache, bool) else _cache_path(fp)

        full_settings = {k: v for k, v in settings.items() if k != "kappa_only"}
        for st in ([full_settings, settings] if kappa_only else [settings]):  # a full analysis answers κ-only too
            fingerprint, path = key(st)
            hit = _read_cache(path, fingerprint)
            if hit is not None:
                hit.seconds = time.perf_counter() - t0
                return hit

    mine, dist = _distributed_share(refs)
    records = _analyze_refs([refs[i] for i in mine], gram_kappa_limit=gram_kappa_limit, device=device,
                            max_chunk_bytes=max_chunk_bytes, progress=progress, kappa_only=kappa_only)
    if dist is not None:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, [(i, r.to_dict()) for i, r in zip(mine, records)])
        by_index = {i: TensorSpectrum.from_dict(d) for part in gathered for i, d in part}
        records = [by_index[i] for i in range(len(refs))]
    report = SpectrumReport(records=records, fingerprint=fingerprint, settings=settings, seconds=time.perf_counter() - t0,
                            analysed_here=len(mine))
    if path is not None and (dist is None or dist.get_rank() == 0):
        _write_cache(path, report)
    return report
