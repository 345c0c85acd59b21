"""Streaming analysis and selection straight from checkpoint files, for models bigger than memory.

``analyze_checkpoint(PATH)`` gives the same :class:`~kappatune.analysis.SpectrumReport` as
``analyze_model(load_model(PATH))`` while never materialising the model: tensors are read one at a time, each
with one positioned read of its bytes into a fresh buffer (the offsets come from the file's header: safetensors'
documented 8-byte length + JSON header, validated by ``safe_open``; GGUF's tensor table through the ``gguf``
package's reader, dequantised by ``gguf.quants.dequantize``), analysed and dropped. Peak memory is a few copies of
the largest tensor plus the interpreter: no file stays memory-mapped, because pages of a mapping that were touched
count in the process's RSS for as long as it is mapped (measured: with ``safe_open``/``GGUFReader`` mappings the
scan's peak RSS grew with the checkpoint), and the float64 Gram matrix is built from float64 column blocks
(:func:`~kappatune.analysis._lower_gram`) instead of a float64 copy of the whole tensor.

Which tensors are linear / Conv1D / fused MoE / embedding / head is decided exactly as the in-memory path decides
it: the model class is built from ``config.json`` on PyTorch's ``meta`` device (shapes only, no storage) and
:func:`~kappatune.analysis.iter_weights` classifies its modules; each parameter is then mapped to its checkpoint
key(s): the same name, the name without/with ``base_model_prefix``, transformers' own checkpoint renamings, and
its checkpoint conversions for fused MoE experts (a ``gate_up_proj`` parameter is assembled expert by expert from
the saved ``experts.E.gate_proj`` / ``up_proj`` tensors, which is how transformers saves it). An architecture
transformers cannot build (or a GGUF file) falls back to classification by tensor names.

Per-tensor results go to a content-keyed cache (``$KAPPATUNE_CACHE/analysis/tensors/<hash>.json``, the hash of
the tensor's bytes and the numerical settings) as soon as each tensor is done, so an interrupted scan of a big
model resumes where it stopped; a full re-scan costs one read of the files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .analysis import (ANALYSIS_VERSION, DEFAULT_MOE_SUFFIXES, SpectrumReport, TensorSpectrum, WeightRef, _analyze_refs,
                       _matches, iter_weights, matrix_work_bytes)
from .errors import ModelError

__all__ = ["Checkpoint", "open_checkpoint", "analyze_checkpoint", "is_checkpoint_path", "peft_config_fragment"]

_STATS = ("kappa", "sigma_max", "sigma_min", "stable_rank", "entropy", "snr", "rank_deficient", "experts", "method")


@dataclass
class _Entry:
    """Where one stored tensor lives: its file and key, shape and dtype (from the file's header only)."""

    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: str
    start: int = -1  # absolute byte range of the data in ``file`` (safetensors; -1: not known)
    end: int = -1


@dataclass
class Checkpoint:
    """The tensors of a checkpoint on disk (nothing loaded) and its config, if any."""

    path: Path
    format: str  # "safetensors" or "gguf"
    entries: dict[str, _Entry]
    config: Any = None
    gguf_reader: Any = field(default=None, repr=False)
    gguf_tensors: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def nbytes(self) -> int:
        """Bytes of all tensor files (what loading the model would read)."""
        return sum(f.stat().st_size for f in {e.file for e in self.entries.values()})

    def load(self, key: str) -> torch.Tensor:
        """One stored tensor, as a fresh CPU tensor read from its file with one positioned read (no mapping kept)."""
        e = self.entries[key]
        if self.format == "gguf":
            return _gguf_tensor(self.gguf_reader, self.gguf_tensors[key], self.path)
        dtype = _SAFETENSORS_DTYPES.get(e.dtype)
        if dtype is None or e.start < 0 or sys.byteorder != "little":  # exotic dtype / big-endian host: safetensors
            from safetensors import safe_open

            try:
                with safe_open(str(e.file), framework="pt") as fh:
                    return fh.get_tensor(key)
            except Exception as exc:
                raise ModelError(f"cannot read tensor {key!r} from {e.file}: {_first_line(exc)} (truncated or corrupt shard?)") from exc
        buf = torch.empty(e.end - e.start, dtype=torch.uint8)
        _read_into(e.file, e.start, buf, key)
        return buf.view(dtype).reshape(e.shape)


# safetensors dtype codes (https://github.com/huggingface/safetensors#format) -> torch dtypes
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _read_into(path: Path, offset: int, buf: torch.Tensor, key: str) -> None:
    """Fill the contiguous CPU tensor ``buf`` with the bytes of ``path`` from ``offset`` (unbuffered reads straight
    into its memory: no second copy, no mapping). A short read means the file was cut: :class:`ModelError`."""
    view = memoryview(buf.view(torch.uint8).reshape(-1).numpy())
    got = 0
    try:
        with open(path, "rb", buffering=0) as fh:
            fh.seek(offset)
            while got < len(view):
                k = fh.readinto(view[got:])
                if not k:
                    break
                got += k
    except OSError as exc:
        raise ModelError(f"cannot read tensor {key!r} from {path}: {exc}") from exc
    if got < len(view):
        raise ModelError(f"cannot read tensor {key!r} from {path}: the file ends {len(view) - got:,} bytes early "
                         "(truncated or corrupt shard?)")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def is_checkpoint_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a local checkpoint the streaming path reads (a ``.gguf`` file or a directory with
    safetensors files)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p.suffix == ".gguf"
    return p.is_dir() and any(p.glob("*.safetensors"))


def open_checkpoint(path: str | os.PathLike, *, trust_remote_code: bool = False) -> Checkpoint:
    """Index the tensors of a local checkpoint (safetensors directory, sharded with or without an index, or a
    ``.gguf`` file) or of a hub id (downloaded file by file into the hub cache; needs network) without reading
    their data. Problems (no tensor files, an index naming a missing shard or tensor, a truncated file) raise
    :class:`ModelError` naming the file."""
    p = Path(path).expanduser()
    if not p.exists():
        from .models import hub_unreachable_reason

        if str(path).startswith((".", "/", "~")) or str(path).count("/") != 1:
            raise ModelError(f"checkpoint path {p} does not exist")
        reason = hub_unreachable_reason()
        if reason:
            raise ModelError(f"{path} is not a local path and the Hugging Face hub is unavailable ({reason})")
        from huggingface_hub import snapshot_download

        try:
            p = Path(snapshot_download(str(path), allow_patterns=["*.safetensors", "*.json"]))
        except Exception as exc:
            raise ModelError(f"cannot download {path}: {_first_line(exc)}") from exc
    if p.is_file() and p.suffix == ".gguf":
        return _open_gguf(p)
    if not p.is_dir():
        raise ModelError(f"{p} is not a checkpoint directory or a .gguf file")
    return _open_safetensors_dir(p, trust_remote_code=trust_remote_code)


def _open_safetensors_dir(p: Path, *, trust_remote_code: bool) -> Checkpoint:
    from safetensors import safe_open

    index = p / "model.safetensors.index.json"
    wanted: dict[str, str] | None = None
    if index.is_file():
        try:
            wanted = json.loads(index.read_text())["weight_map"]
        except Exception as exc:
            raise ModelError(f"{index} is not a valid safetensors index ({_first_line(exc)})") from exc
        files = sorted({p / f for f in wanted.values()})
    else:
        files = sorted(p.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{p} holds no .safetensors file (a pickle .bin checkpoint must be loaded, not streamed)")
    entries: dict[str, _Entry] = {}
    for f in files:
        if not f.is_file():
            raise ModelError(f"{index} names shard {f.name}, which is missing from {p}")
        try:
            with safe_open(str(f), framework="pt") as fh:  # validates the header (offsets, dtypes, shapes)
                keys = list(fh.keys())
        except Exception as exc:
            raise ModelError(f"cannot read safetensors file {f}: {_first_line(exc)} (truncated or corrupt?)") from exc
        size = f.stat().st_size
        # The byte ranges for positioned reads: safetensors has no public API for them, the format documents them
        # (8-byte little-endian header length, JSON header, data; offsets relative to the end of the header).
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            try:
                header = json.loads(fh.read(n))
            except Exception as exc:
                raise ModelError(f"cannot read safetensors file {f}: its header is not JSON (corrupt?)") from exc
        for k in keys:
            h = header[k]
            entries[k] = _Entry(f, k, tuple(int(d) for d in h["shape"]), str(h["dtype"]),
                                8 + n + int(h["data_offsets"][0]), 8 + n + int(h["data_offsets"][1]))
        # A file cut inside the data is caught here, by comparing its size with the end of the last tensor.
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if size < 8 + n + end:
            raise ModelError(f"safetensors file {f} is truncated ({size:,} bytes, its header needs {8 + n + end:,})")
    if wanted is not None:
        for k, shard in wanted.items():
            if k not in entries or entries[k].file.name != Path(shard).name:
                raise ModelError(f"{index} lists tensor {k!r} in {shard}, but that shard does not hold it")
    config = None
    if (p / "config.json").is_file():
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(p), trust_remote_code=trust_remote_code)
        except Exception as exc:
            raise ModelError(f"cannot read {p / 'config.json'}: {_first_line(exc)}") from exc
    return Checkpoint(path=p, format="safetensors", entries=entries, config=config)


# ------------------------------------------------------------------------------------------------------------ GGUF
def _open_gguf(p: Path) -> Checkpoint:
    try:
        from gguf import GGUFReader
    except ImportError as exc:  # pragma: no cover - gguf is a dependency of the smollm2 path too
        raise ModelError("reading .gguf files needs the gguf package (pip install gguf)") from exc
    from .models import check_gguf_header

    check_gguf_header(p)
    try:
        reader = GGUFReader(str(p))
    except Exception as exc:
        raise ModelError(f"cannot read GGUF file {p}: {_first_line(exc)}; the file is damaged or truncated: "
                         "download or convert it again") from exc
    entries = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))  # GGUF lists dimensions innermost first
        entries[t.name] = _Entry(p, t.name, shape, t.tensor_type.name)
    return Checkpoint(path=p, format="gguf", entries=entries, gguf_reader=reader,
                      gguf_tensors={t.name: t for t in reader.tensors})


def _gguf_tensor(reader: Any, t: Any, path: Path) -> torch.Tensor:
    """One GGUF tensor, dequantised. Its bytes are read into a fresh array rather than through the reader's
    whole-file memory map: pages read through that mapping would stay in the RSS for the rest of the scan."""
    import numpy as np
    from gguf.quants import dequantize

    data, own = t.data, False
    if getattr(reader, "byte_order", "I") == "I":  # a file of the host's byte order: positioned read
        buf = torch.empty(int(data.nbytes), dtype=torch.uint8)
        _read_into(path, int(t.data_offset), buf, t.name)
        data, own = buf.numpy().view(data.dtype).reshape(data.shape), True
    arr = dequantize(data, t.tensor_type)
    shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))
    out = np.ascontiguousarray(arr.reshape(shape))
    return torch.from_numpy(out if own else out.copy())  # never a view of the reader's mapping


# ------------------------------------------------------------------------------------------------ classification
def _skeleton(config: Any, trust_remote_code: bool) -> nn.Module | None:
    """The model class built on the meta device (no storage), or None when transformers cannot build it."""
    if config is None:
        return None
    from transformers import AutoModel, AutoModelForCausalLM

    for auto in (AutoModelForCausalLM, AutoModel):
        try:
            with torch.device("meta"):
                return auto.from_config(config, trust_remote_code=trust_remote_code)
        except Exception:
            continue
    return None


def _renamings(config: Any) -> tuple[list[tuple[str, str]], list[tuple[list[str], list[str]]]]:
    """transformers' checkpoint→model renamings (plain substrings only) and fused-tensor conversions for this
    model type: [(checkpoint, model)], [(checkpoint source patterns, model target patterns)]."""
    renames: list[tuple[str, str]] = []
    converters: list[tuple[list[str], list[str]]] = []
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        mapping = get_checkpoint_conversion_mapping(getattr(config, "model_type", "")) or []
    except Exception:
        mapping = []
    for conv in mapping:
        src, tgt = list(getattr(conv, "source_patterns", [])), list(getattr(conv, "target_patterns", []))
        if type(conv).__name__ == "WeightRenaming":
            renames += [(s, t) for s, t in zip(src, tgt) if not any(c in s + t for c in "^$()[]\\+?|")]
        elif type(conv).__name__ == "WeightConverter" and any("*" in s for s in src):
            converters.append((src, tgt))
    return renames, converters


class _Resolver:
    """Maps a model parameter name to the checkpoint key(s) that hold it."""

    def __init__(self, ckpt: Checkpoint, model: nn.Module | None):
        self.ckpt = ckpt
        self.prefix = getattr(model, "base_model_prefix", "") if model is not None else ""
        self.renames, self.converters = _renamings(ckpt.config)

    def variants(self, name: str) -> list[str]:
        out = [name]
        if self.prefix and name.startswith(self.prefix + "."):
            out.append(name[len(self.prefix) + 1:])
        elif self.prefix:
            out.append(f"{self.prefix}.{name}")
        for ck, mod in self.renames:
            out += [v.replace(mod, ck) for v in list(out) if mod in v]
        return out

    def key(self, names: Sequence[str]) -> str | None:
        for n in names:
            for v in self.variants(n):
                if v in self.ckpt.entries:
                    return v
        return None

    def expert_keys(self, name: str, experts: int) -> list[list[str]] | None:
        """Per expert, the checkpoint keys whose concatenation (along rows) is that expert's matrix."""
        for sources, targets in self.converters:
            for tgt in targets:
                t = tgt.lstrip(".")
                if not name.endswith(t):
                    continue
                head = name[: len(name) - len(t)]
                per = []
                for e in range(experts):
                    keys = []
                    for s in sources:
                        k = self.key([head + s.lstrip(".").replace("*", str(e))])
                        if k is None:
                            return None
                        keys.append(k)
                    per.append(keys)
                return per
        return None


def _as_matrix(kind: str, t: torch.Tensor) -> torch.Tensor:
    """The tensor in the layout :func:`iter_weights` analyses (Conv1D transposed, ≥3-D params flattened)."""
    if kind == "conv1d":
        return t.t()
    if kind == "moe":
        return t
    return t if t.dim() == 2 else t.reshape(t.shape[0], -1)


@dataclass
class _StreamRef:
    ref: WeightRef  # meta tensor: shapes and classification only
    load: Callable[[], torch.Tensor]
    source: str  # checkpoint key(s), for messages


def _stream_refs(ckpt: Checkpoint, *, trust_remote_code: bool, filters: dict[str, Any]) -> list[_StreamRef]:
    model = _skeleton(ckpt.config, trust_remote_code) if ckpt.format == "safetensors" else None
    if model is None:
        return _refs_by_name(ckpt, filters)
    refs = iter_weights(model, **filters)
    res = _Resolver(ckpt, model)
    out = []
    for ref in refs:
        names = [ref.name, *ref.aliases]
        key = res.key(names)
        if key is not None:
            want = ref.shape
            got = ckpt.entries[key].shape
            if tuple(got) != tuple(want):
                raise ModelError(f"checkpoint tensor {key!r} has shape {list(got)}, the config implies {list(want)}")
            out.append(_StreamRef(ref, lambda k=key, kind=ref.kind: _as_matrix(kind, ckpt.load(k)), key))
            continue
        if ref.kind == "moe":
            per = res.expert_keys(ref.name, ref.shape[0])
            if per is not None:
                def load_experts(per=per, shape=ref.shape):
                    mats = [torch.cat([ckpt.load(k) for k in keys], 0) for keys in per]
                    if tuple(mats[0].shape) != tuple(shape[1:]):
                        mats = [m.t() for m in mats]  # stored transposed: singular values are the same
                    if tuple(mats[0].shape) != tuple(shape[1:]):
                        raise ModelError(f"experts of {ref.name} assemble to {list(mats[0].shape)}, expected {list(shape[1:])}")
                    return torch.stack(mats)

                out.append(_StreamRef(ref, load_experts, f"{per[0][0]} (+{sum(map(len, per)) - 1} more)"))
                continue
        raise ModelError(
            f"checkpoint {ckpt.path} has no tensor for {ref.name} (looked for {', '.join(res.variants(ref.name)[:3])}); "
            "an index entry or a shard is missing"
        )
    return out


def _refs_by_name(ckpt: Checkpoint, filters: dict[str, Any]) -> list[_StreamRef]:
    """Classification by tensor names when no model class is available (GGUF files, unknown architectures):
    3-D tensors with an expert suffix → moe; token embeddings → embedding; ``lm_head``/``output`` → head; other 2-D
    ``*.weight`` → linear owned by the module of that name; other ≥2-D tensors → param."""
    emb = re.compile(r"(embed_tokens|wte|wpe|word_embeddings|tok_embeddings|token_embd|position_embd)\.weight$")
    head = re.compile(r"(^|\.)(lm_head|output|embed_out)\.weight$")
    suffixes = filters.get("moe_suffixes", DEFAULT_MOE_SUFFIXES)
    out = []
    for key, e in ckpt.entries.items():
        nd = len(e.shape)
        if nd < max(2, filters.get("min_ndim", 2)):
            continue
        if nd == 3 and (any(key.endswith(s) for s in suffixes) or ".experts." in f".{key}" or "_exps." in key):
            kind, modules = "moe", []
        elif emb.search(key):
            kind, modules = "embedding", []
        elif head.search(key):
            kind, modules = "head", [key[: -len(".weight")]]
        elif nd == 2 and key.endswith(".weight"):
            kind, modules = "linear", [key[: -len(".weight")]]
        else:
            kind, modules = "param", []
        mat = e.shape if kind == "moe" else ((e.shape[0], math.prod(e.shape[1:])))
        maxd = filters.get("max_dim_size")
        if maxd is not None and any(d > maxd for d in mat[-2:]):
            continue
        if filters.get("include") and not _matches(key, filters["include"]):
            continue
        if filters.get("exclude") and _matches(key, filters["exclude"]):
            continue
        meta = torch.empty(mat, device="meta")
        ref = WeightRef(name=key, kind=kind, tensor=meta, numel=math.prod(e.shape), shape=e.shape, modules=modules)
        out.append(_StreamRef(ref, lambda k=key, kind=kind: _as_matrix(kind, ckpt.load(k)), key))
    return out


# ------------------------------------------------------------------------------------------------------- driver
def _tensor_key(t: torch.Tensor, numerics: dict[str, Any]) -> str:
    """Content hash of a tensor's values (bytes, shape, dtype) and the numerical settings that shape its figures."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(t.shape)}|{t.dtype}|{json.dumps(numerics, sort_keys=True)}|".encode())
    if t.numel():  # hashed through the buffer protocol: no bytes copy of the tensor
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _read_stats(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
        body = json.dumps(data["stats"], sort_keys=True)
        if data.get("checksum") != hashlib.sha256(body.encode()).hexdigest():
            return None
        return data["stats"]
    except Exception:  # missing, torn or foreign: recompute
        return None


def _write_stats(path: Path, stats: dict[str, Any]) -> None:
    from .storage import atomic_write_text

    body = json.dumps(stats, sort_keys=True)
    try:
        atomic_write_text(path, json.dumps({"stats": stats, "checksum": hashlib.sha256(body.encode()).hexdigest()}))
    except Exception:  # a cache that cannot be written must not fail the analysis
        pass


def analyze_checkpoint(
    path: str | os.PathLike | Checkpoint,
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
    kappa_only: bool = False,
    trust_remote_code: bool = False,
) -> SpectrumReport:
    """Analyse every weight of the checkpoint at ``path`` one tensor at a time (see the module docstring).

    Same arguments and same records as :func:`~kappatune.analysis.analyze_model` on the loaded model. ``cache``:
    True uses ``$KAPPATUNE_CACHE/analysis/tensors``, a path uses that directory, False disables it (and resume).
    ``device``: where the numerics run (e.g. ``"cuda"``); tensors are still read one at a time on the host.
    """
    from tqdm.auto import tqdm

    from .storage import cache_dir

    t0 = time.perf_counter()
    ckpt = path if isinstance(path, Checkpoint) else open_checkpoint(path, trust_remote_code=trust_remote_code)
    filters = dict(min_ndim=min_ndim, max_dim_size=max_dim_size, include=include, exclude=exclude, moe_suffixes=moe_suffixes)
    refs = _stream_refs(ckpt, trust_remote_code=trust_remote_code, filters=filters)
    if not refs:
        raise ModelError(f"checkpoint {ckpt.path} has no analysable weight (filters max_dim_size={max_dim_size}, "
                         f"include={include}, exclude={exclude})")
    settings = dict(min_ndim=min_ndim, max_dim_size=max_dim_size, include=list(include or []), exclude=list(exclude or []),
                    moe_suffixes=list(moe_suffixes), gram_kappa_limit=gram_kappa_limit, version=ANALYSIS_VERSION)
    if kappa_only:
        settings["kappa_only"] = True
    numerics = dict(gram_kappa_limit=gram_kappa_limit, kappa_only=kappa_only, version=ANALYSIS_VERSION)
    tdir = None
    if cache:
        tdir = Path(cache) / "tensors" if not isinstance(cache, bool) else cache_dir("analysis/tensors")
        tdir.mkdir(parents=True, exist_ok=True)
    from .analysis import _layer_and_type

    records: list[TensorSpectrum | None] = []
    keys: list[str] = []
    analysed = 0
    # Consecutive tensors of one matrix shape (a layer's gate/up/down, k/v) are analysed together, up to one per
    # thread and 1 GiB of working memory (analysis.matrix_work_bytes): LAPACK then runs on several matrices at
    # once (one thread each), as in the in-memory path, instead of one single-threaded eigensolver after another.
    # Memory stays a few tensors.
    workers = max(1, torch.get_num_threads())
    pending: list[tuple[int, WeightRef, str]] = []

    def flush() -> None:
        nonlocal analysed
        if not pending:
            return
        recs = _analyze_refs([live for _, live, _ in pending], gram_kappa_limit=gram_kappa_limit, device=device,
                             max_chunk_bytes=1 << 30, progress=False, kappa_only=kappa_only, check_finite=False)
        for (i, _, key), rec in zip(pending, recs):
            records[i] = rec
            analysed += 1
            if tdir is not None:
                _write_stats(tdir / f"{key}.json", {k: getattr(rec, k) for k in _STATS})
        pending.clear()

    def work(ref: WeightRef) -> int:
        m, n = sorted(ref.tensor.shape[-2:])
        return (ref.tensor.shape[0] if ref.kind == "moe" else 1) * matrix_work_bytes(m, n, ref.tensor.element_size(), kappa_only)

    def shape_of(ref: WeightRef) -> tuple[int, ...]:
        return (ref.kind == "moe", *sorted(ref.tensor.shape[-2:]))

    bar = tqdm(refs, desc="Streaming weight spectra", unit="tensor", disable=not progress, leave=False)
    try:
        for sref in bar:
            t = sref.load()
            ref = sref.ref
            if not bool(torch.isfinite(t).all()):
                entry = ckpt.entries.get(sref.source.split(" ")[0])
                where = entry.file if entry is not None else ckpt.path
                raise ModelError(f"weight tensor {ref.name!r} ({sref.source} in {where}) contains NaN or Inf values")
            key = _tensor_key(t, numerics)  # also what the report's fingerprint is made of
            keys.append(key)
            stats = _read_stats(tdir / f"{key}.json") if tdir is not None else None
            if stats is None:
                live = WeightRef(name=ref.name, kind=ref.kind, tensor=t, numel=ref.numel, shape=ref.shape,
                                 modules=list(ref.modules), aliases=list(ref.aliases))
                if pending and (shape_of(pending[0][1]) != shape_of(ref) or len(pending) >= workers
                                or work(ref) * (len(pending) + 1) > 1 << 30):
                    flush()
                pending.append((len(records), live, key))
                records.append(None)
            else:
                layer, mtype = _layer_and_type(ref.name)
                records.append(TensorSpectrum(name=ref.name, kind=ref.kind, shape=ref.shape, numel=ref.numel,
                                              modules=list(ref.modules), aliases=list(ref.aliases), layer=layer,
                                              module_type=mtype, **stats))
            del t
        flush()
    finally:
        bar.close()
    fingerprint = hashlib.blake2b(
        (json.dumps(settings, sort_keys=True) + "|" + "|".join(f"{r.name}:{k}" for r, k in zip(records, keys))).encode(),
        digest_size=16).hexdigest()
    return SpectrumReport(records=records, fingerprint=fingerprint, settings=settings,
                          seconds=time.perf_counter() - t0, from_cache=analysed == 0, analysed_here=analysed)


def peft_config_fragment(selection: Any) -> dict[str, Any]:
    """A LoRA/PEFT config fragment for a :class:`~kappatune.selection.Selection`: ``target_modules`` (the
    selected linear modules) and, for fused MoE tensors, ``target_parameters``; merge it into a ``LoraConfig``."""
    frag: dict[str, Any] = {"target_modules": list(selection.module_names)}
    if selection.moe_parameter_names:
        frag["target_parameters"] = list(selection.moe_parameter_names)
    return frag
