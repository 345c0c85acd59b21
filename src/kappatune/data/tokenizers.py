"""Tokenizers: :class:`ByteTokenizer` for the tiny random models, :func:`get_tokenizer` and :func:`tokenizer_id`.

Imports nothing from :mod:`kappatune.models` at import time (models imports :class:`ByteTokenizer` from here);
:func:`get_tokenizer` asks :mod:`kappatune.models` for a built-in model's tokenizer when called.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Iterable

import torch

from ..errors import DataError, ModelError

__all__ = ["ByteTokenizer", "get_tokenizer", "tokenizer_fingerprint", "tokenizer_id"]


class ByteTokenizer:
    """UTF-8 bytes as tokens, for the tiny random models (which have no tokenizer of their own).

    Byte ``b`` is token ``b + 3``; ids 0/1/2 are pad/bos/eos, matching ``build_tiny_llama``'s config; the vocab
    is 320 so every id fits the tiny models' embedding. Hand-written because no library tokenizer maps raw
    bytes onto this id layout without a vocab file.
    """

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    offset = 3
    vocab_size = 320
    name_or_path = "kappatune/byte"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        out = bytes(int(i) - self.offset for i in ids if self.offset <= int(i) < self.offset + 256)
        return out.decode("utf-8", "replace")

    def __call__(self, texts: str | list[str], add_special_tokens: bool = False, **_: Any) -> dict[str, Any]:
        if isinstance(texts, str):
            return {"input_ids": self.encode(texts, add_special_tokens)}
        return {"input_ids": [self.encode(t, add_special_tokens) for t in texts]}

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=320, pad=0, bos=1, eos=2)"


def get_tokenizer(model_name_or_tokenizer: Any) -> Any:
    """The tokenizer for a model: a built-in model name, a model directory or hub id, or a tokenizer (returned).

    The tiny random models (``tiny-llama``, ``tiny-moe``, or ``"byte"``) get :class:`ByteTokenizer`; a model
    object gets the byte tokenizer if its vocabulary is the tiny 320, else its ``name_or_path``'s tokenizer.
    """
    obj = model_name_or_tokenizer
    if obj is None or (isinstance(obj, str) and obj in ("byte", "tiny-llama", "tiny-moe")):
        return ByteTokenizer()
    if isinstance(obj, torch.nn.Module):
        cfg = getattr(obj, "config", None)
        if cfg is not None and getattr(cfg, "vocab_size", None) == ByteTokenizer.vocab_size:
            return ByteTokenizer()
        obj = getattr(cfg, "name_or_path", None) or getattr(cfg, "_name_or_path", None)
        if not obj:
            raise ModelError("cannot tell which tokenizer this model uses; pass the tokenizer explicitly")
    if not isinstance(obj, (str, os.PathLike)):
        if hasattr(obj, "encode") or callable(obj):
            return obj
        raise DataError(f"not a tokenizer or model name: {type(obj).__name__}")
    name = str(obj)
    from .. import models

    if name in models.BUILTIN_MODELS:
        return models.builtin_tokenizer(name)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelError(f"cannot load a tokenizer for {name!r}: {first} (a hub id needs network access)") from exc


def tokenizer_id(tokenizer: Any) -> str:
    """A stable identity of a tokenizer's behaviour (keys the token cache).

    For fast tokenizers this hashes the full serialized tokenizer (vocab, merges, normalizer), so two
    directories with the same tokenizer share a cache and a changed tokenizer never reuses stale ids.
    """
    if isinstance(tokenizer, ByteTokenizer):
        return "byte-v1"
    h = hashlib.blake2b(digest_size=12)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode("utf-8"))
    else:
        h.update(f"{type(tokenizer).__name__}|{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}".encode())
    h.update(f"|eos={_eos_id(tokenizer)}".encode())
    return f"{type(tokenizer).__name__}-{h.hexdigest()}"


# Strings whose encodings, with the special tokens, pin down how a tokenizer turns examples into training ids.
_PROBES = (
    {"prompt": "What part of speech is the word defined here?\n\nEntry: Stride: a long step.", "response": "noun"},
    {"prompt": "def f(x):\n    return x ** 2  # café, naïve, 東京, 3.14159", "response": " 42\n"},
)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What a tokenizer *does* to examples, as a short hash: its special-token ids, vocabulary size, chat template,
    and the exact ids (prompt, response, end token) of a few probe examples in the plain and the chat format.

    Unlike :func:`tokenizer_id` (which hashes the serialized tokenizer, a cache key), this depends only on
    behaviour, so the same tokenizer saved by two library versions agrees. A study records it in every cell and
    refuses to mix cells that disagree. That happened once: transformers 5.17 converted SmolLM2's GGUF tokenizer
    with another end token, so every response was trained to end differently.
    """
    from .tasks import encode_example

    parts: list[Any] = [type(tokenizer).__name__ if isinstance(tokenizer, ByteTokenizer) else "hf"]
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        parts.append(getattr(tokenizer, attr, None))
    try:
        parts.append(len(tokenizer))
    except TypeError:
        parts.append(getattr(tokenizer, "vocab_size", None))
    parts.append(getattr(tokenizer, "chat_template", None))
    for ex in _PROBES:
        for chat in (False, True):
            try:
                parts.append(encode_example(tokenizer, ex, chat_template=chat))
            except Exception as exc:  # e.g. no chat template: the failure is itself part of the behaviour
                parts.append(type(exc).__name__)
    import json

    return hashlib.sha256(json.dumps(parts, default=str).encode("utf-8")).hexdigest()[:16]


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "sep_token_id", None)
    if eos is None:
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no EOS token to separate documents")
    return int(eos)
