"""Evaluation: token-weighted perplexity over token blocks, and log-likelihood accuracy on prompt/label pairs.

Both run under ``torch.no_grad()`` in eval mode (the model's training flag is restored afterwards), in a fixed
order with no sampling, so evaluating the same model on the same blocks twice gives the same number.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .errors import DataError

__all__ = ["perplexity", "mean_nll", "accuracy", "evaluate"]


def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


class _EvalMode:
    """Put a model in eval mode for the duration, then restore its previous training flag."""

    def __init__(self, model: nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self) -> nn.Module:
        self.model.eval()
        return self.model

    def __exit__(self, *exc: Any) -> None:
        self.model.train(self.was_training)


def _check_blocks(blocks: Any) -> torch.Tensor:
    if not isinstance(blocks, torch.Tensor):
        blocks = torch.as_tensor(blocks)
    if blocks.dim() != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise DataError(f"expected token blocks of shape [N >= 1, block_size >= 2], got {tuple(blocks.shape)}")
    if blocks.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise DataError(f"token blocks must be integer ids, got {blocks.dtype}")
    return blocks.long()


@torch.no_grad()
def mean_nll(model: nn.Module, blocks: Any, *, batch_size: int = 8, progress: bool = True, desc: str = "perplexity",
             distributed: bool = False) -> float:
    """Mean next-token negative log-likelihood (nats) over every predicted token of every block.

    Token-weighted: each block of length T contributes T-1 predictions; sums are accumulated in float64.

    ``distributed=True`` (every process of an initialised ``torch.distributed`` group calls it with the same
    blocks): process ``r`` evaluates batches ``r, r + W, ...``, the per-batch sums are all-reduced into their
    slots and added up in batch order, so the result is the single-process number (same batches, same order of
    addition) at 1/W of the work per process. Every process runs the same number of forwards (a process short
    of batches repeats one and discards it), which a sharded (FSDP) model needs for its collectives.
    """
    blocks = _check_blocks(blocks)
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and int(blocks.max()) >= vocab:
        raise DataError(
            f"token id {int(blocks.max())} is outside the model's vocabulary of {vocab}; the blocks were made with "
            "another model's tokenizer"
        )
    from tqdm.auto import tqdm

    device = _device_of(model)
    starts = list(range(0, blocks.shape[0], batch_size))
    rank, world = 0, 1
    if distributed:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
    rounds = -(-len(starts) // world)
    sums = torch.zeros(len(starts), dtype=torch.float64)
    with _EvalMode(model):
        for i in tqdm(range(rounds), desc=desc, unit="batch", disable=not progress, leave=False):
            j = rank + i * world  # this process's i-th batch
            start = starts[j] if j < len(starts) else starts[0]  # a spare forward keeps FSDP's collectives in step
            batch = blocks[start:start + batch_size].to(device)
            logits = model(input_ids=batch).logits[:, :-1, :].float()
            targets = batch[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            )
            if j < len(starts):
                sums[j] = nll.double().cpu()
    if world > 1:
        import torch.distributed as dist

        # Each slot is written by exactly one process (the others hold 0.0), so the sum is exact.
        buf = sums.to(device) if dist.get_backend() == "nccl" else sums
        dist.all_reduce(buf)
        sums = buf.cpu()
    total = 0.0
    for v in sums.tolist():  # batch order, as one process adds them
        total += v
    count = blocks.shape[0] * (blocks.shape[1] - 1)
    return total / count


def perplexity(model: nn.Module, blocks: Any, *, batch_size: int = 8, progress: bool = True, distributed: bool = False) -> float:
    """Token-weighted perplexity ``exp(mean NLL)`` of ``model`` on ``blocks`` (``[N, block_size]`` token ids).

    Deterministic, batched and gradient-free. Returns ``inf`` if the mean NLL overflows ``exp`` and ``nan`` if
    the model produced non-finite logits (a diverged model), never a silently clipped number.
    ``distributed``: split the batches over the processes of ``torch.distributed`` (see :func:`mean_nll`).
    """
    return _ppl(mean_nll(model, blocks, batch_size=batch_size, progress=progress, distributed=distributed))


def _ppl(nll: float) -> float:
    if math.isnan(nll):
        return math.nan
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


def _encode(tokenizer: Any, text: str) -> list[int]:
    if hasattr(tokenizer, "encode"):
        try:
            return list(tokenizer.encode(text, add_special_tokens=False))
        except TypeError:
            return list(tokenizer.encode(text))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def accuracy(
    model: nn.Module,
    tokenizer: Any,
    pairs: Iterable[tuple[str, str]],
    *,
    labels: Sequence[str] | None = None,
    label_prefix: str = " ",
    batch_size: int = 8,
    progress: bool = True,
) -> float:
    """Classification accuracy on ``(prompt, label)`` pairs by log-likelihood ranking.

    Each candidate label (``labels``, or every distinct label in ``pairs``) is scored by the summed log
    probability of its tokens (``label_prefix + label``) after the prompt; the highest-scoring candidate is the
    prediction. Returns the fraction of pairs predicted correctly.
    """
    from . import data as _data

    tokenizer = _data.get_tokenizer(tokenizer)
    pairs = [(str(p), str(lab)) for p, lab in pairs]
    if not pairs:
        raise DataError("accuracy needs at least one (prompt, label) pair")
    candidates = list(labels) if labels is not None else sorted({lab for _, lab in pairs})
    unknown = {lab for _, lab in pairs} - set(candidates)
    if unknown:
        raise DataError(f"labels {sorted(unknown)[:5]} are not among the candidate labels {candidates[:10]}")
    if len(candidates) < 2:
        raise DataError(f"accuracy needs at least two candidate labels, got {candidates}")
    cand_ids = [_encode(tokenizer, label_prefix + c) for c in candidates]
    if any(not ids for ids in cand_ids):
        raise DataError("a candidate label encodes to no tokens; give non-empty labels")
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = int(pad) if pad is not None else _data._eos_id(tokenizer)
    # one sequence per (pair, candidate): prompt + candidate; score = sum log p(candidate tokens | prefix)
    seqs: list[tuple[list[int], int]] = []
    for prompt, _ in pairs:
        p_ids = _encode(tokenizer, prompt)
        if not p_ids:
            bos = getattr(tokenizer, "bos_token_id", None)
            p_ids = [int(bos if bos is not None else _data._eos_id(tokenizer))]
        for c in cand_ids:
            seqs.append((p_ids + c, len(p_ids)))
    from tqdm.auto import tqdm

    device = _device_of(model)
    scores = torch.empty(len(seqs), dtype=torch.float64)
    with _EvalMode(model):
        for start in tqdm(range(0, len(seqs), batch_size), desc="accuracy", unit="batch", disable=not progress, leave=False):
            chunk = seqs[start:start + batch_size]
            width = max(len(s) for s, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (s, _) in enumerate(chunk):  # right padding: positions of real tokens are unchanged
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
            logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1).cpu()
            for i, (s, plen) in enumerate(chunk):
                pos = torch.arange(plen, len(s))
                scores[start + i] = logp[i, pos - 1, torch.tensor(s[plen:])].double().sum()
    scores = scores.view(len(pairs), len(candidates))
    pred = scores.argmax(dim=1)
    gold = torch.tensor([candidates.index(lab) for _, lab in pairs])
    return float((pred == gold).double().mean())


def evaluate(
    model_name_or_model: Any,
    data: Any = "control",
    *,
    tokenizer: Any = None,
    split: str = "eval",
    block_size: int = 128,
    max_blocks: int | None = 64,
    seed: int = 0,
    eval_fraction: float = 0.1,
    batch_size: int = 8,
    text_field: str = "text",
    progress: bool = True,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Perplexity of a model (name/path or loaded model) on a corpus split; returns a JSON-ready summary.

    The defaults (eval split, 64 blocks of 128 tokens, seed 0) are the settings of the base perplexities in
    ``kappatune data`` / docs/data.md.
    """
    from . import data as _data
    from . import models as _models

    if isinstance(model_name_or_model, nn.Module):
        model, name = model_name_or_model, getattr(getattr(model_name_or_model, "config", None), "name_or_path", "model")
    else:
        name = str(model_name_or_model)
        model, tok = _models.load_model(name, trust_remote_code=trust_remote_code)
        tokenizer = tokenizer if tokenizer is not None else tok
    tokenizer = _data.get_tokenizer(tokenizer if tokenizer is not None else model)
    blocks = _data.build_blocks(
        data, tokenizer, block_size, split=split, seed=seed, eval_fraction=eval_fraction, max_blocks=max_blocks,
        text_field=text_field, progress=progress,
    )
    nll = mean_nll(model, blocks, batch_size=batch_size, progress=progress)
    ppl = _ppl(nll)
    return {
        "model": name, "data": str(getattr(data, "name", data)), "split": split, "block_size": block_size,
        "blocks": int(blocks.shape[0]), "tokens": int(blocks.shape[0] * (blocks.shape[1] - 1)), "seed": seed,
        "eval_fraction": eval_fraction, "nll": nll, "perplexity": ppl,
    }
