"""One training stage through accelerate, with exact checkpoint/resume.

:func:`train_stage` trains a prepared :class:`~kappatune.methods.Method` on token blocks for a fixed number of
optimizer steps: a fresh optimizer (``method.make_optimizer``) and LR schedule (``transformers.get_scheduler``)
per stage, the model and optimizer passed through ``Accelerator.prepare`` (so the same code runs single-CPU,
single-GPU, or multi-process DDP under ``accelerate launch`` / ``torchrun``), gradient accumulation with
``no_sync``, gradient clipping, and a tqdm bar showing loss and tokens/s.

Data order is written by hand rather than with a prepared ``DataLoader``, on purpose: batch ``s`` of stage ``k``
is a pure function of ``(seed, k, s)`` — a seeded permutation of the block indices — so that (1) every method in
a benchmark sees the same batches for a seed, (2) a run resumed at step ``s`` continues with exactly the batches
it would have seen, and (3) the *global* batch is identical whatever the number of processes (each process
takes its contiguous slice), which is what makes a 2-process run match a 1-process run. accelerate's sharded
dataloaders change the global batch with the process count and resume only approximately.

Checkpoints (``checkpoint_every`` steps, and at the end of training before evaluation) hold the trained tensors
(``method.save``: safetensors tagged with the base-weight fingerprint), the optimizer and scheduler state and the
torch RNG state (one ``torch.save`` file read back only with ``weights_only=True``), and a ``meta.json`` with the
step, the Python/NumPy RNG states and the SHA-256 of both files. ``meta.json`` is written last, atomically, into a new
``step-N`` directory, so a process killed mid-checkpoint leaves the previous checkpoint valid; a checksum mismatch
is detected on load.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import shutil
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import CacheError, ConfigError
from .storage import atomic_write_bytes, atomic_write_json, fault_point, sha256_file  # fault_point: test hook

__all__ = [
    "StageResult",
    "make_accelerator",
    "batch_schedule",
    "train_stage",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "remove_checkpoints",
    "get_rng_state",
    "set_rng_state",
    "seed_everything",
    "PeakMemory",
    "fault_point",
    "optimizer_class",
    "fsdp_requested",
    "is_sharded",
    "shard_model",
    "gather_trained_state",
    "optimizer_state_bytes",
    "per_rank",
]


# ---------------------------------------------------------------------------------------------------------------
# Seeds and RNG state.
# ---------------------------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """Python/NumPy RNG states as JSON-able data, torch states as tensors."""
    py = random.getstate()
    npst = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], np.asarray(npst[1], dtype=np.uint32), npst[2], npst[3], npst[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _stage_seed(seed: int, stage: int, salt: int = 0) -> int:
    """A seed for (run seed, stage): independent streams per stage, stable across processes and resumes."""
    return (seed * 1_000_003 + stage * 7_919 + salt * 104_729) % (2**63 - 1)


def batch_schedule(num_blocks: int, batch_size: int, steps: int, *, seed: int, stage: int) -> torch.Tensor:
    """Block indices of every global batch of a stage, shape ``[steps, batch_size]``.

    Epochs are consecutive seeded permutations of ``range(num_blocks)``; batches never straddle an epoch's
    reshuffle unevenly because the permutations are simply concatenated. Depends only on ``(seed, stage)``.
    """
    if num_blocks <= 0:
        raise ConfigError("no training block: the task corpus is shorter than one sequence (lower training.seq_len)")
    need = steps * batch_size
    gen = torch.Generator().manual_seed(_stage_seed(seed, stage))
    perms = [torch.randperm(num_blocks, generator=gen) for _ in range(math.ceil(need / num_blocks))]
    return torch.cat(perms)[:need].view(steps, batch_size)


# ---------------------------------------------------------------------------------------------------------------
# Accelerate.
# ---------------------------------------------------------------------------------------------------------------

def _has_gpu() -> bool:
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return bool(torch.cuda.is_available() or (mps is not None and mps.is_available())
                or (xpu is not None and xpu.is_available()))


def make_accelerator(mixed_precision: str = "no", cpu: bool | None = None):
    """An :class:`accelerate.Accelerator` (reads the environment set by ``accelerate launch`` / ``torchrun``).

    ``fp16`` on a CPU-only machine would be accepted by accelerate and change nothing (it has no CPU fp16
    autocast): it is replaced by ``"no"`` with a warning, so ``accelerator.mixed_precision`` — which the harness
    records in ``results.json`` — is what actually ran. (``bf16`` does autocast on CPU.)

    Under an FSDP launch (:func:`fsdp_requested`) on a machine without CUDA, ``cpu=True`` is forced: accelerate's
    FSDP launcher does not pass ``use_cpu`` on, and without it the processes would not even form a process group.
    """
    from accelerate import Accelerator

    if cpu is None and fsdp_requested() and not torch.cuda.is_available():
        cpu = True
    if mixed_precision == "fp16" and (cpu or not _has_gpu()):
        warnings.warn("training.mixed_precision fp16 needs a GPU; this machine has none, so training runs in full "
                      "precision (fp32); use bf16 for mixed precision on a CPU", stacklevel=2)
        mixed_precision = "no"
    kwargs: dict[str, Any] = {"mixed_precision": mixed_precision}
    if cpu is not None:
        kwargs["cpu"] = cpu
    return Accelerator(**kwargs)


class PeakMemory:
    """Peak memory while the context is open: process RSS (sampled every 20 ms) and CUDA allocator peak.

    ``ru_maxrss`` is a lifetime high-water mark and cannot be reset per stage; a sampler thread on
    ``psutil`` RSS gives a per-stage peak instead (to within the sampling interval).
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak_rss = 0
        self.peak_cuda = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            try:
                self.peak_rss = max(self.peak_rss, proc.memory_info().rss)
            except Exception:  # pragma: no cover - process info unavailable
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if torch.cuda.is_available():
            self.peak_cuda = int(torch.cuda.max_memory_allocated())

    def to_dict(self) -> dict[str, float]:
        gpu = round(self.peak_cuda / 2**20, 1) if torch.cuda.is_available() else None
        return {"peak_rss_mb": round(self.peak_rss / 2**20, 1), "peak_gpu_mb": gpu}


# ---------------------------------------------------------------------------------------------------------------
# Sharding (FSDP2).
# ---------------------------------------------------------------------------------------------------------------
#
# kappatune applies ``torch.distributed.fsdp.fully_shard`` itself instead of letting ``Accelerator.prepare`` do it:
# accelerate 1.15 turns FSDP on only for GPU-type backends (a CPU/gloo launch silently falls back to plain
# data parallelism), and a sharded model has to exist *before* the per-stage optimizer is built, while
# accelerate wants model and optimizer together. The settings are the ones ``accelerate launch --config_file
# configs/accelerate/fsdp.yaml`` exports (``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``, ``FSDP_RESHARD_AFTER_FORWARD``,
# ``FSDP_TRANSFORMER_CLS_TO_WRAP``), so the same config file means the same thing on CPUs and GPUs.

def fsdp_requested() -> bool:
    """Whether this process was launched for FSDP (``ACCELERATE_USE_FSDP=true``, as ``accelerate launch`` with an
    FSDP config sets it; set it yourself under ``torchrun``). Raises :class:`ConfigError` for FSDP version 1."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() not in ("1", "true", "yes"):
        return False
    version = os.environ.get("FSDP_VERSION", "2")
    if version != "2":
        raise ConfigError(f"FSDP version {version} requested: kappatune shards with FSDP2 (fully_shard); set fsdp_version: 2")
    return True


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` has been through ``fully_shard`` (its parameters are DTensor shards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _layer_classes(model: torch.nn.Module) -> set[str]:
    env = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").strip()
    if env:
        return {c.strip() for c in env.split(",") if c.strip()}
    names: set[str] = set()
    for m in model.modules():  # a PEFT wrapper has none itself; the transformers model inside it does
        names.update(getattr(m, "_no_split_modules", None) or [])
    return names


def shard_model(method: Any, accelerator: Any, *, mixed_precision: str = "no") -> torch.nn.Module:
    """Shard ``method.model`` in place with FSDP2: one unit per decoder layer, then the root (embeddings, final
    norm, head; tied weights stay one tensor). Idempotent. Call after ``method.prepare`` (and after loading any
    stage checkpoint), before building an optimizer: the optimizer then holds only this rank's shard of each
    trainable tensor, and frozen tensors get no gradient and no state (FSDP2 accepts units mixing trainable and
    frozen parameters). Raises :class:`ConfigError` for a method that declares it cannot be sharded.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = method.model
    if is_sharded(model):
        return model
    reason = getattr(method, "fsdp_unsupported", None)
    if reason:
        raise ConfigError(f"method {method.name!r} cannot be trained under FSDP: {reason}; run it without FSDP (DDP or one process)")
    if mixed_precision == "fp16":
        raise ConfigError("training.mixed_precision fp16 is not supported under FSDP (it needs a sharded gradient scaler); use bf16")
    classes = _layer_classes(model)
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    if not layers:
        raise ConfigError(
            f"FSDP: no decoder layer to shard in {type(model).__name__} (looked for {sorted(classes) or 'the model _no_split_modules'}); "
            "set fsdp_transformer_layer_cls_to_wrap in the accelerate config"
        )
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision == "bf16" else MixedPrecisionPolicy()
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in ("1", "true", "yes")
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_trained_state(method: Any) -> dict[str, torch.Tensor]:
    """``method.trained_state()`` with every sharded tensor gathered to its full value (on CPU).

    Under FSDP this is a collective: every rank must call it, in the same order; unsharded models just return
    the method's own state.
    """
    state = method.trained_state()
    if not is_sharded(method.model):
        return state
    return {k: _full(v).detach().cpu().contiguous() for k, v in state.items()}


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state tensors held by *this* process (a DTensor counts its local shard only)."""
    from torch.distributed.tensor import DTensor

    opt = getattr(optimizer, "optimizer", optimizer)
    total = 0
    for st in opt.state.values():
        for t in st.values():
            if isinstance(t, DTensor):
                t = t.to_local()
            if isinstance(t, torch.Tensor) and t.ndim > 0:
                total += t.numel() * t.element_size()
    return total


def per_rank(accelerator: Any, value: Any) -> list[Any]:
    """``value`` of every process, in rank order (one element without distribution). A collective."""
    if accelerator.num_processes <= 1:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * accelerator.num_processes
    dist.all_gather_object(out, value)
    return out


def _sharded_options(**kw: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, **kw)


def save_sharded_checkpoint(
    root: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    *, meta: dict[str, Any], accelerator: Any,
) -> Path:
    """The FSDP counterpart of :func:`save_checkpoint` (a collective: every rank calls it).

    ``step-N/dcp/`` holds the trainable tensors and their optimizer state as ``torch.distributed.checkpoint``
    shards (each rank writes its own; frozen tensors are not saved), ``state-R.pt`` each rank's RNG and the
    scheduler; rank 0 writes ``meta.json`` with the checksum of every file last, after all ranks finished,
    so a rank killed mid-write leaves the previous checkpoint the newest valid one. The checkpoint directory
    must be on a filesystem every rank sees (as DCP itself requires).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    step = int(meta["step"])
    d = Path(root) / f"step-{step:06d}"
    rank = accelerator.process_index
    if accelerator.is_main_process:
        d.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    fault_point("checkpoint_write")
    # The optimizer itself, not an inner one: SelectiveOptimizer shares its param_groups with its inner
    # optimizer and must see the load (in load_sharded_checkpoint) to keep sharing them.
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_sharded_options())
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(d / "dcp"))
    blob = {"rng": get_rng_state(), "scheduler": scheduler.state_dict() if scheduler is not None else None}
    buf = io.BytesIO()
    torch.save(blob, buf)
    atomic_write_bytes(d / f"state-{rank}.pt", buf.getvalue())
    fault_point("checkpoint_write")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = sorted(p for p in d.rglob("*") if p.is_file() and p.name != "meta.json")
        full = {**meta, "processes": accelerator.num_processes,
                "files": {str(p.relative_to(d)): sha256_file(p) for p in files}}
        atomic_write_json(d / "meta.json", full)
        remove_checkpoints(root, keep=d)
    accelerator.wait_for_everyone()
    return d


def load_sharded_checkpoint(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                            *, accelerator: Any) -> None:
    """Restore a checkpoint written by :func:`save_sharded_checkpoint` into the sharded model and a freshly built
    optimizer (DCP reshards when the number of processes changed). Never unpickles."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_sharded_options())
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(directory / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_sharded_options(strict=False))
    f = directory / f"state-{accelerator.process_index}.pt"
    if not f.is_file():  # resumed on more processes than wrote it: take rank 0's RNG
        f = directory / "state-0.pt"
    try:
        blob = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CacheError(f"checkpoint {f} cannot be read safely: {exc}") from exc
    if scheduler is not None and blob.get("scheduler") is not None:
        scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------------------------------------------

def save_checkpoint(
    root: str | os.PathLike,
    method: Any,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    *,
    meta: dict[str, Any],
) -> Path:
    """Write a checkpoint to ``root/step-NNNNNN/`` and then drop the older ones under ``root``.

    Files: trained tensors (``method.save``), ``state.pt`` (optimizer, scheduler, torch RNG) and ``meta.json`` with
    the checksums of both, written last. Until that meta exists the new directory does not count, so a kill at
    any point leaves the previous checkpoint usable.
    """
    step = int(meta["step"])
    d = Path(root) / f"step-{step:06d}"
    d.mkdir(parents=True, exist_ok=True)
    fault_point("checkpoint_write")
    method.save(d / "trained.safetensors")
    rng = get_rng_state()
    blob: dict[str, Any] = {"torch_rng": rng.pop("torch")}
    if "cuda" in rng:
        blob["cuda_rng"] = rng.pop("cuda")
    if optimizer is not None:
        opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
        blob["optimizer"] = opt.state_dict()
    if scheduler is not None:
        blob["scheduler"] = scheduler.state_dict()
    buf = io.BytesIO()
    torch.save(blob, buf)
    atomic_write_bytes(d / "state.pt", buf.getvalue())
    fault_point("checkpoint_write")
    full = dict(meta)
    full["rng"] = rng
    full["files"] = {name: sha256_file(d / name) for name in ("trained.safetensors", "state.pt")}
    atomic_write_json(d / "meta.json", full)
    remove_checkpoints(root, keep=d)
    return d


def remove_checkpoints(root: str | os.PathLike, keep: Path | None = None) -> None:
    """Delete the ``step-*`` checkpoints under ``root`` (but ``keep``), each ``meta.json`` first: a deletion cut
    short by a kill leaves an incomplete directory (silently skipped), never one that looks corrupt."""
    for old in Path(root).glob("step-*"):
        if old == keep or not old.is_dir():
            continue
        try:
            (old / "meta.json").unlink(missing_ok=True)
        except OSError:
            pass
        shutil.rmtree(old, ignore_errors=True)


def read_checkpoint_meta(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint's ``meta.json`` if present and its files match their checksums; ``None`` if absent.

    Raises :class:`CacheError` when the files are present but corrupt (checksum mismatch).
    """
    d = Path(directory)
    mp = d / "meta.json"
    if not mp.is_file():
        return None
    try:
        meta = json.loads(mp.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CacheError(f"checkpoint {d} is corrupt (unreadable meta.json: {exc}); delete it to restart the stage") from exc
    for name, digest in meta.get("files", {}).items():
        f = d / name
        if not f.is_file():
            raise CacheError(f"checkpoint {d} is incomplete ({name} is missing); delete it to restart the stage")
        if sha256_file(f) != digest:
            raise CacheError(f"checkpoint {d} is corrupt ({name} does not match its checksum); delete it to restart the stage")
    return meta


def latest_checkpoint(root: str | os.PathLike, match: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete, uncorrupted checkpoint under ``root`` whose meta agrees with ``match``; else ``None``.

    Incomplete (no meta yet) or corrupt directories are skipped: a mid-stage checkpoint is not finished work.
    """
    r = Path(root)
    if not r.is_dir():
        return None
    for d in sorted((p for p in r.glob("step-*") if p.is_dir()), reverse=True):
        try:
            meta = read_checkpoint_meta(d)
        except CacheError as exc:
            warnings.warn(f"ignoring {exc}", stacklevel=2)
            continue
        if meta is not None and all(meta.get(k) == v for k, v in (match or {}).items()):
            return d, meta
    return None


def load_checkpoint(
    directory: str | os.PathLike, method: Any, optimizer: torch.optim.Optimizer | None, scheduler: Any,
    *, tensors: bool = True,
) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its meta. Never unpickles.

    Load the trained tensors (``tensors=True``) *before* building the optimizer: some methods (OSF) replace their
    parameter objects on load, and an optimizer built earlier would keep updating the old ones. Pass
    ``tensors=False`` to restore only optimizer, scheduler and RNG state into an optimizer built afterwards.
    """
    d = Path(directory)
    meta = read_checkpoint_meta(d)
    if meta is None:
        raise CacheError(f"no checkpoint in {d}")
    if tensors:
        method.load(d / "trained.safetensors")
    try:
        blob = torch.load(d / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CacheError(f"checkpoint {d}/state.pt cannot be read safely: {exc}") from exc
    if optimizer is not None and "optimizer" in blob:
        getattr(optimizer, "optimizer", optimizer).load_state_dict(blob["optimizer"])
    if scheduler is not None and "scheduler" in blob:
        scheduler.load_state_dict(blob["scheduler"])
    rng = dict(meta["rng"])
    rng["torch"] = blob["torch_rng"]
    if "cuda_rng" in blob:
        rng["cuda"] = blob["cuda_rng"]
    set_rng_state(rng)
    return meta


OPTIMIZERS = ("adamw", "adafactor", "sgd")


def optimizer_class(name: str) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The optimizer class for a name and the extra keyword arguments it needs besides ``lr``/``weight_decay``.

    ``adafactor`` is transformers' :class:`~transformers.optimization.Adafactor` with the given learning rate
    (``relative_step=False``, ``scale_parameter=False``): factored second moments, so its state is far smaller than
    AdamW's on large matrices. ``sgd`` is plain :class:`torch.optim.SGD`.
    """
    if name == "adamw":
        return torch.optim.AdamW, {}
    if name == "sgd":
        return torch.optim.SGD, {}
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor, {"scale_parameter": False, "relative_step": False, "warmup_init": False}
    raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


# ---------------------------------------------------------------------------------------------------------------
# The stage loop.
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class StageResult:
    """What one stage of training did."""

    steps: int
    tokens: int  # global tokens seen this stage
    losses: list[float] = field(default_factory=list)  # mean training loss per optimizer step (all processes)
    train_time_s: float = 0.0  # wall time spent training (summed over resumed segments)
    resumed_from_step: int = 0
    curve: list[dict[str, Any]] = field(default_factory=list)  # what ``on_step`` returned, with its step
    stopped_early: bool = False  # ``stop_when`` ended the stage before ``steps`` (then ``steps`` is the steps done)
    optimizer_state_bytes: list[int] = field(default_factory=list)  # held by each process (rank order)
    sharded: bool = False  # trained under FSDP

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


IGNORE_INDEX = -100  # label of prompt and padding positions (kappatune.data.tasks)


def _take_rows(batch: dict[str, torch.Tensor], idx: Any, device: Any = None) -> dict[str, torch.Tensor]:
    """Rows ``idx`` of an sft batch, cut to their longest example (right padding: trailing all-pad columns go)."""
    rows = {k: v[idx] for k, v in batch.items()}
    width = max(1, int(rows["attention_mask"].sum(1).max())) if rows["attention_mask"].numel() else 1
    return {k: (v[:, :width].to(device) if device is not None else v[:, :width]) for k, v in rows.items()}


def _logits_to_keep_supported(model: Any) -> bool:
    """Whether the (possibly DDP- or PEFT-wrapped) causal LM's forward takes ``logits_to_keep`` (transformers ≥ 4.45)."""
    import inspect

    m = getattr(model, "module", model)  # DDP
    base = m.get_base_model() if callable(getattr(m, "get_base_model", None)) else m
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def sft_loss_sum(model: Any, batch: dict[str, torch.Tensor], *, all_logits: bool = False) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled (response) positions of an sft batch.

    Labels -100 (prompt, padding) contribute nothing; the attention mask keeps padding out of every real token's
    context, and each row is one example, so no example attends to another. Packed rows
    (:func:`kappatune.data.tasks.pack_sft`) carry ``position_ids`` restarting per example and are run without an
    attention mask: transformers then builds the block-diagonal causal mask from the positions, so again no
    example attends to another.

    Only the positions that predict a response token go through the output layer (``logits_to_keep``): a
    response is a few tokens of a ~100-token example, and the vocabulary projection and its cross-entropy over all
    positions cost ~a fifth of a small model's step (SmolLM2: a 49,152 × 576 head). The loss and every gradient
    are the full computation's (tested in float64); ``all_logits=True`` (or a model without ``logits_to_keep``)
    projects every position.
    """
    labels = batch["labels"][:, 1:]
    kw: dict[str, Any] = {}
    keep = None
    if not all_logits and _logits_to_keep_supported(model):
        # positions t whose next token is labelled in any row (one index set for the whole batch)
        keep = (labels != IGNORE_INDEX).any(0).nonzero().flatten()
        if keep.numel() == 0:
            keep = None
        else:
            kw["logits_to_keep"] = keep.to(batch["input_ids"].device)
    if "position_ids" in batch:
        # use_cache=False: transformers detects packed sequences only when there is no KV cache
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, **kw).logits
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw).logits
    if keep is None:
        logits = logits[:, :-1, :]
    else:
        labels = labels[:, keep.to(labels.device)]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def train_stage(
    method: Any,
    blocks: torch.Tensor,
    *,
    accelerator: Any,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    stage: int,
    micro_batch_size: int | None = None,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    checkpoint_meta: dict[str, Any] | None = None,
    progress: bool = True,
    desc: str = "train",
    on_step: Callable[[int], dict[str, Any] | None] | None = None,
    optimizer: str = "adamw",
    stop_when: Callable[[list[dict[str, Any]]], bool] | None = None,
) -> StageResult:
    """Train ``method.model`` on ``blocks`` ``[N, seq_len]`` for ``steps`` optimizer steps.

    ``blocks`` may instead be an sft task's tensors (``{input_ids, attention_mask, labels}``, from
    :func:`kappatune.data.tokenize_sft`): the loss is then the mean over the response tokens of the global batch
    (:func:`sft_loss_sum`), prompt and padding excluded.

    If ``checkpoint_dir`` holds a valid checkpoint of this stage (its meta matches ``checkpoint_meta``), training
    resumes from it and ends exactly where an uninterrupted stage would. Checkpoints are written every
    ``checkpoint_every`` steps and after the last step (when ``checkpoint_dir`` is given and ``checkpoint_every > 0``).
    ``on_step(step)`` runs before the first step (``step`` 0, not on a resumed stage) and after every optimizer step
    but the last (learning curves); a dict it returns is kept in
    ``result.curve`` (and in checkpoints, so a resumed stage keeps its curve). Its time is not training time.
    ``stop_when(curve)`` (early stopping) is asked after every new curve point; when it returns True the stage ends
    there (a pure function of the curve, so a resumed stage stops at the same step). ``optimizer``: ``adamw``,
    ``adafactor`` (transformers' Adafactor with this fixed ``lr``) or ``sgd`` (see :func:`optimizer_class`).
    """
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    if steps <= 0:
        raise ConfigError(f"steps must be > 0, got {steps}")
    world, rank = accelerator.num_processes, accelerator.process_index
    if batch_size % world:
        raise ConfigError(f"training.batch_size ({batch_size}) must be a multiple of the number of processes ({world})")
    local_bs = batch_size // world
    micro = min(micro_batch_size or local_bs, local_bs)
    if local_bs % micro:
        raise ConfigError(f"per-process batch {local_bs} is not a multiple of training.micro_batch_size {micro}")
    n_micro = local_bs // micro
    sft = isinstance(blocks, dict)  # supervised: {input_ids, attention_mask, labels}, loss on response tokens only
    seq_len = (blocks["input_ids"] if sft else blocks).shape[1]
    order = batch_schedule((blocks["input_ids"] if sft else blocks).shape[0], batch_size, steps, seed=seed, stage=stage)

    # Per-stage seeding (per process for dropout); overwritten by a checkpoint's RNG state on resume.
    seed_everything(_stage_seed(seed, stage, salt=1 + rank))

    meta_base = dict(checkpoint_meta or {})
    meta_base.update({"stage": stage, "steps": steps})
    start = 0
    n_tok = int(blocks["attention_mask"][order].sum()) if sft else steps * batch_size * seq_len
    result = StageResult(steps=steps, tokens=n_tok)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    sharded = is_sharded(method.model)  # FSDP2: see shard_model
    meta_base["sharded"] = sharded  # a DDP checkpoint does not resume an FSDP stage, nor the reverse
    found = latest_checkpoint(ckpt, meta_base) if ckpt is not None else None
    if found is not None and not sharded:
        method.load(found[0] / "trained.safetensors")  # before the optimizer exists (see load_checkpoint)

    base_model = method.model
    opt_cls, opt_kwargs = optimizer_class(optimizer)
    optimizer = method.make_optimizer(opt_cls, lr=lr, weight_decay=weight_decay, **opt_kwargs)
    # The scheduler is deliberately not passed to prepare(): accelerate's wrapper steps it num_processes times
    # per step (it assumes per-process batches); our global batch is fixed, so one step per optimizer step.
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup_steps, num_training_steps=steps)
    if sharded:
        # Already sharded: FSDP2 reduce-scatters the gradients itself; accelerate would wrap it in DDP again.
        model = base_model
    else:
        model, optimizer = accelerator.prepare(base_model, optimizer)
    if found is not None:
        d, meta = found
        if sharded:
            load_sharded_checkpoint(d, model, optimizer, scheduler, accelerator=accelerator)
        else:
            load_checkpoint(d, method, optimizer, scheduler, tensors=False)
        start = int(meta["step"])
        result.losses = list(meta.get("losses", []))
        result.train_time_s = float(meta.get("train_time_s", 0.0))
        result.resumed_from_step = start
        result.curve = list(meta.get("curve", []))
        if meta.get("stopped_early"):
            result.stopped_early, steps = True, start

    params = [p for p in method.trainable_parameters()]
    model.train()
    bar = tqdm(
        total=steps, initial=start, desc=desc, unit="step", leave=False, dynamic_ncols=True,
        disable=not (progress and accelerator.is_local_main_process),
    )
    if on_step is not None and start == 0 and steps > 0:  # the curve's start: the model before this stage's training
        point = on_step(0)
        if point is not None:
            result.curve.append({"step": 0, **point})
        model.train()
    t_seg = time.perf_counter()
    t_prev = time.perf_counter()
    device = accelerator.device
    try:
        for step in range(start, steps):
            idx = order[step, rank * local_bs : (rank + 1) * local_bs]
            if sft:
                # every response token of the *global* batch weighs the same, however it is split over
                # micro-batches and processes (DDP averages gradients over processes, hence the factor world)
                n_tokens = int((blocks["labels"][order[step]][:, 1:] != IGNORE_INDEX).sum())
                batch = _take_rows(blocks, idx, device)
            else:
                batch = blocks[idx].to(device)
            loss_sum = torch.zeros((), device=device)
            for m in range(n_micro):
                sync = m == n_micro - 1
                if sft:
                    rows = _take_rows(batch, slice(m * micro, (m + 1) * micro))
                    compute = lambda rows=rows: sft_loss_sum(model, rows) * world / max(1, n_tokens)  # noqa: E731
                else:
                    x = batch[m * micro : (m + 1) * micro]
                    compute = lambda x=x: model(input_ids=x, labels=x).loss / n_micro  # noqa: E731
                if sharded:
                    model.set_requires_gradient_sync(sync)  # FSDP2's no_sync: reduce-scatter on the last micro-batch
                    loss = compute()
                    loss.backward()
                else:
                    ctx = contextlib.nullcontext() if sync else accelerator.no_sync(model)
                    with ctx, accelerator.autocast():
                        loss = compute()
                    accelerator.backward(loss)
                loss_sum += loss.detach()
            if max_grad_norm is not None:
                if sharded:  # torch's clipping computes the global norm over DTensor shards
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                else:
                    accelerator.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            mean_loss = accelerator.reduce(loss_sum, reduction="mean") if world > 1 else loss_sum
            loss_val = float(mean_loss)
            if not math.isfinite(loss_val):
                raise ConfigError(
                    f"training diverged at stage {stage} step {step + 1} (loss {loss_val}); lower training.lr"
                )
            result.losses.append(loss_val)
            now = time.perf_counter()
            bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{batch_size * seq_len / max(now - t_prev, 1e-9):,.0f}")
            t_prev = now
            bar.update(1)
            fault_point("train_step")
            done = step + 1
            if on_step is not None and done < steps:
                t_hook = time.perf_counter()
                point = on_step(done)
                if point is not None:
                    result.curve.append({"step": done, **point})
                    if stop_when is not None and stop_when(result.curve):
                        result.stopped_early = True
                t_seg += time.perf_counter() - t_hook  # evaluation is not training time
                t_prev = time.perf_counter()
            if ckpt is not None and checkpoint_every > 0 and (done % checkpoint_every == 0 or done == steps or result.stopped_early):
                elapsed = result.train_time_s + (time.perf_counter() - t_seg)
                ck_meta = {**meta_base, "step": done, "losses": result.losses, "train_time_s": elapsed, "curve": result.curve,
                           "stopped_early": result.stopped_early}
                if sharded:
                    save_sharded_checkpoint(ckpt, model, optimizer, scheduler, meta=ck_meta, accelerator=accelerator)
                elif accelerator.is_main_process:
                    save_checkpoint(ckpt, method, optimizer, scheduler, meta=ck_meta)
                accelerator.wait_for_everyone()
            if result.stopped_early:
                break
    finally:
        bar.close()
    if result.stopped_early:
        result.steps = len(result.losses)
        done_rows = order[: result.steps]
        result.tokens = int(blocks["attention_mask"][done_rows].sum()) if sft else result.steps * batch_size * seq_len
    result.train_time_s += time.perf_counter() - t_seg
    result.sharded = sharded
    result.optimizer_state_bytes = per_rank(accelerator, optimizer_state_bytes(optimizer))
    model.eval()
    accelerator.free_memory()  # drop accelerate's references to this stage's optimizer (fresh one next stage)
    del optimizer, scheduler
    return result
