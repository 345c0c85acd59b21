"""Model loading: built-in tiny random models, the offline SmolLM2-135M, local directories and hub ids.

``load_model(name_or_path)`` returns ``(model, tokenizer)``. Tokenizer is ``None`` for the tiny random models
(they have a byte-level vocabulary; :mod:`kappatune.data` tokenizes for them with :class:`ByteTokenizer`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import ModelError

__all__ = ["BUILTIN_MODELS", "build_tiny_llama", "build_tiny_moe", "load_model", "list_models"]


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


# name -> (builder returning (model, tokenizer), one-line description)
BUILTIN_MODELS: dict[str, tuple[Callable[[], tuple[nn.Module, Any]], str]] = {
    "tiny-llama": (lambda: (build_tiny_llama(), None), "random-init 2-layer Llama (tests, no download)"),
    "tiny-moe": (lambda: (build_tiny_moe(), None), "random-init 2-layer Qwen3-MoE with fused 3-D experts (no download)"),
}


def list_models() -> list[dict[str, Any]]:
    """Built-in model names with a description."""
    return [{"name": n, "description": d} for n, (_, d) in BUILTIN_MODELS.items()]


def load_model(
    name_or_path: str | os.PathLike,
    *,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` from a built-in name, a local transformers directory or a hub id.

    ``trust_remote_code`` stays off unless the caller passes it: remote code is arbitrary code.
    """
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name][0]()
    path = Path(name).expanduser()
    looks_like_path = path.exists() or name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1
    if looks_like_path:
        if not path.exists():
            raise ModelError(f"model path {path} does not exist")
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a transformers model directory (no config.json)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path) if looks_like_path else name, **kwargs)
    except (OSError, ValueError) as exc:
        known = ", ".join(BUILTIN_MODELS)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"cannot load model {name!r}: {first} (built-in names: {known}; a hub id needs network access)"
        ) from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if looks_like_path else name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        tokenizer = None
    return model.eval(), tokenizer
