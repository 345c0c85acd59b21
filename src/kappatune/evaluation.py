"""Evaluation: token-weighted perplexity over token blocks, and the metrics of supervised (``sft``) tasks.

* :func:`perplexity` / :func:`mean_nll` -- raw text in token blocks (``lm`` tasks).
* :func:`choice_accuracy` -- ``accuracy``: every choice is scored by the summed log-probability of its tokens
  after the prompt (lm-evaluation-harness's ``acc``); ``accuracy_norm`` divides each score by the choice's length
  in characters first (lm-eval's ``acc_norm``). The prompt is computed once per example (KV cache, repeated per
  choice) and then only the choices' tokens, with vocabulary logits only where a choice token is predicted; the
  scores equal one full pass per choice to float tolerance (``reuse_prefix=False`` keeps that reference).
* :func:`exact_match` -- greedy generation (at most ``max_new_tokens``; cut at the first stop string, after
  leading whitespace) compared with the response after SQuAD-style normalisation (:func:`normalize_answer`).
* :func:`response_perplexity` -- ``ppl`` of an sft task: token-weighted perplexity of the response tokens (and the
  EOS that ends them) given the prompt, exactly the tokens the training loss covers.
* :func:`evaluate_sft` / :func:`evaluate` -- several metrics at once; :func:`lm_eval_tasks` -- the bridge to
  lm-evaluation-harness (optional extra ``lm_eval``).

Everything runs under ``torch.no_grad()`` in eval mode (the model's training flag is restored afterwards), in a
fixed order with no sampling, so evaluating the same model on the same data twice gives the same number.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .errors import DataError

__all__ = [
    "perplexity", "mean_nll", "accuracy", "evaluate", "choice_accuracy", "exact_match", "response_perplexity",
    "evaluate_sft", "normalize_answer", "lm_eval_tasks", "SFT_METRICS",
]

SFT_METRICS = ("accuracy", "exact_match", "ppl")


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
    # per pair, per candidate: (prompt + candidate, index of the first candidate token)
    bos = getattr(tokenizer, "bos_token_id", None)
    start = [int(bos if bos is not None else _data._eos_id(tokenizer))]
    seqs = []
    for prompt, _ in pairs:
        p_ids = _encode(tokenizer, prompt) or start
        seqs.append([(p_ids + c, len(p_ids)) for c in cand_ids])
    scores = torch.tensor(_score_choices(model, seqs, pad, batch_size=batch_size, progress=progress)[0], dtype=torch.float64)
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
    allow_missing_weights: bool = False,
    validation_fraction: float = 0.0,
) -> dict[str, Any]:
    """Perplexity of a model (name/path or loaded model) on a corpus split; returns a JSON-ready summary.

    ``split``: ``eval`` / ``test`` (the same documents), ``validation`` (needs ``validation_fraction`` > 0, the
    runs' ``eval.validation_fraction``), ``train`` or ``all`` (:func:`kappatune.data.split_documents`).

    The defaults (eval split, 64 blocks of 128 tokens, seed 0) are the settings of the base perplexities in
    ``kappatune data`` / docs/data.md.
    """
    from . import data as _data
    from . import models as _models

    if isinstance(model_name_or_model, nn.Module):
        model, name = model_name_or_model, getattr(getattr(model_name_or_model, "config", None), "name_or_path", "model")
    else:
        name = str(model_name_or_model)
        model, tok = _models.load_model(name, trust_remote_code=trust_remote_code,
                                       allow_missing_weights=allow_missing_weights)
        tokenizer = tokenizer if tokenizer is not None else tok
    tokenizer = _data.get_tokenizer(tokenizer if tokenizer is not None else model)
    blocks = _data.build_blocks(
        data, tokenizer, block_size, split=split, seed=seed, eval_fraction=eval_fraction, max_blocks=max_blocks,
        validation_fraction=validation_fraction, text_field=text_field, progress=progress,
    )
    nll = mean_nll(model, blocks, batch_size=batch_size, progress=progress)
    ppl = _ppl(nll)
    return {
        "model": name, "data": str(getattr(data, "name", data)), "split": split, "block_size": block_size,
        "blocks": int(blocks.shape[0]), "tokens": int(blocks.shape[0] * (blocks.shape[1] - 1)), "seed": seed,
        "eval_fraction": eval_fraction, **({"validation_fraction": validation_fraction} if validation_fraction else {}),
        "nll": nll, "perplexity": ppl,
    }


# ---------------------------------------------------------------------------------------------------------------
# Supervised tasks.
# ---------------------------------------------------------------------------------------------------------------

def _pad_of(tokenizer: Any) -> int:
    from .data.tasks import _pad_id

    return _pad_id(tokenizer)


def _forward_rows(model: nn.Module, rows: Sequence[list[int]], pad: int, batch_size: int, progress: bool, desc: str,
                  consume: Any) -> None:
    """Run right-padded batches of ``rows`` (longest first, for even batches) and call ``consume(i, logp_row)``
    with each row's log-probabilities ``[len(row), vocab]`` (float32, CPU)."""
    from tqdm.auto import tqdm

    device = _device_of(model)
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))
    with _EvalMode(model):
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
            chunk = order[start:start + batch_size]
            width = max(len(rows[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, i in enumerate(chunk):  # right padding: the real tokens keep their positions
                ids[j, : len(rows[i])] = torch.tensor(rows[i])
                mask[j, : len(rows[i])] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            logp = torch.log_softmax(logits.float(), -1).cpu()
            for j, i in enumerate(chunk):
                consume(i, logp[j, : len(rows[i])])


# ---------------------------------------------------------------------------------------------------------------
# Scoring choices: the log-likelihood of each choice's tokens after its prompt.
# ---------------------------------------------------------------------------------------------------------------

#: one example's choices: ``(token ids of prompt + choice, index of the first choice token)`` per choice
Choices = Sequence[tuple[Sequence[int], int]]


def _prefix_cache_kwarg(model: nn.Module) -> str | None:
    """The keyword under which ``model``'s forward takes a KV cache (``cache`` in transformers >= 5.x,
    ``past_key_values`` before), or None when the shared-prefix scoring cannot be used: not a transformers model
    (e.g. a hand-written module), or a PEFT prompt-learning adapter (prefix tuning owns the cache itself)."""
    import inspect

    from transformers import PreTrainedModel

    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return None
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    if not isinstance(base, PreTrainedModel):
        return None
    params = inspect.signature(base.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def _takes_logits_to_keep(model: nn.Module) -> bool:
    import inspect

    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return n


def _scores_full(model: nn.Module, examples: Sequence[Choices], pad: int, batch_size: int,
                 progress: bool) -> tuple[list[list[float]], int]:
    """Reference scoring: one full forward pass of prompt + choice per choice (all logits), except that choices
    that are one token after a shared prefix are read from one pass. Used for models without a KV cache."""
    rows: list[list[int]] = []
    targets: list[list[tuple[int, int, int, list[int]]]] = []  # per row: (example, choice, first position, tokens)
    for e, choices in enumerate(examples):
        seqs = [list(s) for s, _ in choices]
        starts = [st for _, st in choices]
        lcp = _common_prefix(seqs)
        if len(set(starts)) == 1 and all(len(s) == lcp + 1 for s in seqs) and lcp >= starts[0]:
            rows.append(seqs[0][:-1])  # every choice is one token after the shared part: one pass reads them all
            targets.append([(e, k, starts[0] - 1, s[starts[0]:]) for k, s in enumerate(seqs)])
        else:
            for k, (s, st) in enumerate(zip(seqs, starts)):
                rows.append(s)
                targets.append([(e, k, st - 1, s[st:])])
    scores = [[0.0] * len(c) for c in examples]

    def consume(r: int, logp: torch.Tensor) -> None:
        for e, k, pos, cont in targets[r]:
            idx = torch.arange(pos, pos + len(cont))
            scores[e][k] = float(logp[idx, torch.tensor(cont)].double().sum())

    _forward_rows(model, rows, pad, batch_size, progress, "accuracy", consume)
    return scores, sum(len(r) for r in rows)


def _scores_shared_prefix(model: nn.Module, examples: Sequence[Choices], pad: int, batch_size: int, progress: bool,
                          cache_kw: str, extras: Sequence[tuple[Sequence[int], int] | None] | None = None,
                          ) -> tuple[list[list[float]], int, list[float | None]]:
    """The same scores as :func:`_scores_full` at a fraction of the cost (lm-evaluation-harness's idea, done with
    the KV cache): per batch of examples, one pass over each example's shared prefix (the prompt) keeps the KV
    cache and computes the vocabulary projection only at the positions that predict a choice token
    (``logits_to_keep``); the cache is then repeated once per choice and a second pass runs only the choices'
    tokens. Both passes are right padded with explicit ``position_ids``, so each real token sees exactly the
    positions and context it has in the full pass (padding is masked out).

    ``extras`` (optional, one per example or None): one more ``(sequence, start)`` per example, scored from the
    same prefix cache in a pass of its own after the choices' pass -- how :func:`evaluate_sft` gets the response
    perplexity (prompt + response + EOS) without a second pass over every prompt. The choices' passes are exactly
    the ones run without extras, so their scores are bitwise the same. An extra that does not continue its
    example's shared prefix (a prompt cut differently by ``max_length``) is left as None for the caller to score.
    Returns ``(scores, tokens fed for the choices, extra scores)``."""
    import copy

    from tqdm.auto import tqdm

    device = _device_of(model)
    keep_kw = _takes_logits_to_keep(model)
    order = sorted(range(len(examples)), key=lambda i: (-max(len(s) for s, _ in examples[i]), i))
    scores = [[0.0] * len(c) for c in examples]
    extra_scores: list[float | None] = [None] * len(examples)
    fed = 0
    with _EvalMode(model):
        for b0 in tqdm(range(0, len(order), batch_size), desc="accuracy", unit="batch", disable=not progress, leave=False):
            chunk = order[b0:b0 + batch_size]
            seqs = [[list(s) for s, _ in examples[e]] for e in chunk]
            starts = [[st for _, st in examples[e]] for e in chunk]
            # shared prefix of an example: common to all its choices and no longer than its shortest prompt, so
            # every scored token lies after it (the prediction of the first is the prefix's last position)
            plen = [min(_common_prefix(ss), min(st)) for ss, st in zip(seqs, starts)]
            width = max(plen)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for b, (ss, n) in enumerate(zip(seqs, plen)):
                ids[b, :n] = torch.tensor(ss[0][:n])
                mask[b, :n] = 1
            # prefix positions whose logits are needed: those predicting a choice token (normally only the last)
            keep = sorted({q for ss, st, n in zip(seqs, starts, plen) for s, a in zip(ss, st) for q in range(a - 1, min(len(s) - 1, n))})
            kw: dict[str, Any] = {"use_cache": True}
            if keep_kw:
                kw["logits_to_keep"] = torch.tensor(keep, device=device)
            fed += sum(plen)
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                        position_ids=torch.arange(width, device=device).expand(len(chunk), width), **kw)
            logits = out.logits if keep_kw else out.logits[:, keep]
            lp_prefix = torch.log_softmax(logits.float(), -1).cpu()
            col = {q: j for j, q in enumerate(keep)}
            # the continuation rows: one per choice with tokens past the prefix to feed (all but its last token)
            rows = [(b, k) for b, ss in enumerate(seqs) for k, s in enumerate(ss) if len(s) - 1 > plen[b]]
            # the extras scored here: those that continue the example's shared prefix and need no prefix logits
            # beyond the kept ones (so the passes above are unchanged by them)
            xs: dict[int, tuple[list[int], int]] = {}
            for b, e in enumerate(chunk):
                x = extras[e] if extras is not None else None
                if x is None:
                    continue
                xseq, xa = list(x[0]), int(x[1])
                n = plen[b]
                if (1 <= xa < len(xseq) and len(xseq) - 1 > n and xseq[:n] == seqs[b][0][:n]
                        and all(q in col for q in range(xa - 1, min(len(xseq) - 1, n)))):
                    xs[b] = (xseq, xa)
            lp_cont = None
            cache = cache_x = None
            if rows or xs:
                cache = getattr(out, "cache", None)
                if cache is None:
                    cache = getattr(out, "past_key_values", None)
                if not callable(getattr(cache, "batch_select_indices", None)):
                    raise _NoPrefixCache  # a legacy tuple cache or one that cannot repeat rows
                if xs:  # a choices' pass below extends the cache in place: then the extras start from a copy
                    cache_x = copy.deepcopy(cache) if rows else cache
            if rows:
                assert cache is not None
                lp_cont, n_fed = _continue_prefix(model, cache, cache_kw, mask, [b for b, _ in rows],
                                                  [seqs[b][k][plen[b]:-1] for b, k in rows], plen, pad, device)
                fed += n_fed
                del cache
            row_of = {bk: r for r, bk in enumerate(rows)}
            for b, e in enumerate(chunk):
                for k, (s, a) in enumerate(zip(seqs[b], starts[b])):
                    total = 0.0
                    for i in range(a, len(s)):  # token i is predicted at position i - 1
                        q = i - 1
                        if q < plen[b]:
                            total += float(lp_prefix[b, col[q], s[i]])
                        else:
                            assert lp_cont is not None
                            total += float(lp_cont[row_of[(b, k)], q - plen[b], s[i]])
                    scores[e][k] = total
            if xs:
                assert cache_x is not None
                xb = sorted(xs)
                lp_x, _ = _continue_prefix(model, cache_x, cache_kw, mask, xb, [xs[b][0][plen[b]:-1] for b in xb], plen,
                                           pad, device)
                del cache_x
                for r, b in enumerate(xb):
                    xseq, xa = xs[b]
                    total = 0.0
                    for i in range(xa, len(xseq)):
                        q = i - 1
                        total += float(lp_prefix[b, col[q], xseq[i]] if q < plen[b] else lp_x[r, q - plen[b], xseq[i]])
                    extra_scores[chunk[b]] = total
    return scores, fed, extra_scores


def _continue_prefix(model: nn.Module, cache: Any, cache_kw: str, prefix_mask: torch.Tensor, prefix_rows: list[int],
                     parts: list[list[int]], plen: list[int], pad: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """One pass feeding ``parts[r]`` after prefix row ``prefix_rows[r]`` of ``cache`` (repeated/reordered to
    those rows, in place): ``(log-probabilities [rows, width, vocab] on CPU, real tokens fed)``. Right padded,
    with explicit positions continuing each prefix; padding's positions are never read."""
    cache.batch_select_indices(torch.tensor(prefix_rows, device=device))
    cw = max(len(p) for p in parts)
    cids = torch.full((len(parts), cw), pad, dtype=torch.long)
    cmask = torch.zeros((len(parts), cw), dtype=torch.long)
    pos = torch.zeros((len(parts), cw), dtype=torch.long)
    for r, (b, part) in enumerate(zip(prefix_rows, parts)):
        cids[r, :len(part)] = torch.tensor(part)
        cmask[r, :len(part)] = 1
        pos[r] = plen[b] + torch.arange(cw)
    full_mask = torch.cat([prefix_mask[prefix_rows], cmask], dim=1)
    out = model(input_ids=cids.to(device), attention_mask=full_mask.to(device), position_ids=pos.to(device),
                **{cache_kw: cache, "use_cache": True})
    return torch.log_softmax(out.logits.float(), -1).cpu(), int(cmask.sum())


class _NoPrefixCache(Exception):
    """The model returned no cache whose rows can be repeated per choice: score with full passes instead."""


def _score_choices(model: nn.Module, examples: Sequence[Choices], pad: int, *, batch_size: int = 8, progress: bool = True,
                   reuse_prefix: bool = True) -> tuple[list[list[float]], int]:
    """``(scores, tokens fed to the model)``. Scores: per example, per choice: the summed log-probability (float64
    sum of float32 values) of the choice's tokens ``seq[start:]`` given the tokens before them. ``reuse_prefix``
    (default) computes each example's prompt once and only the choice tokens after it
    (:func:`_scores_shared_prefix`); models without a KV cache, and ``reuse_prefix=False``, take the full pass per
    choice. Both give the same numbers to float tolerance."""
    scores, fed, _ = _score_choices_and_extras(model, examples, pad, batch_size=batch_size, progress=progress,
                                               reuse_prefix=reuse_prefix)
    return scores, fed


@torch.no_grad()
def _score_choices_and_extras(model: nn.Module, examples: Sequence[Choices], pad: int, *, batch_size: int = 8,
                              progress: bool = True, reuse_prefix: bool = True,
                              extras: Sequence[tuple[Sequence[int], int] | None] | None = None,
                              ) -> tuple[list[list[float]], int, list[float | None]]:
    """:func:`_score_choices`, plus the score of one extra ``(sequence, start)`` per example where it can be read
    from the example's prefix cache (see :func:`_scores_shared_prefix`); None where it cannot (no cache, or a
    prompt cut differently): the caller scores those another way."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    for e, choices in enumerate(examples):
        for s, st in choices:
            if not 1 <= st < len(s):
                raise DataError(f"example {e + 1}: a choice has no tokens to score or no prompt before it")
    none: list[float | None] = [None] * len(examples)
    cache_kw = _prefix_cache_kwarg(model) if reuse_prefix else None
    if cache_kw is None:
        return (*_scores_full(model, examples, pad, batch_size, progress), none)
    # an example whose choices share no first token (prompts cut differently by max_length) has no prefix to
    # share: each of its choices is scored as an example of its own (and its extra is left to the caller)
    units: list[Choices] = []
    unit_extras: list[tuple[Sequence[int], int] | None] = []
    where: list[list[tuple[int, int]]] = []
    extra_unit: list[int | None] = []
    for e, choices in enumerate(examples):
        if _common_prefix([s for s, _ in choices]) > 0:
            where.append([(len(units), k) for k in range(len(choices))])
            extra_unit.append(len(units))
            units.append(choices)
            unit_extras.append(extras[e] if extras is not None else None)
        else:
            where.append([(len(units) + k, 0) for k in range(len(choices))])
            extra_unit.append(None)
            units.extend([c] for c in choices)
            unit_extras.extend([None] * len(choices))
    try:
        scores, fed, xscores = _scores_shared_prefix(model, units, pad, batch_size, progress, cache_kw,
                                                     extras=unit_extras if extras is not None else None)
    except _NoPrefixCache:
        return (*_scores_full(model, examples, pad, batch_size, progress), none)
    return [[scores[u][k] for u, k in w] for w in where], fed, [None if u is None else xscores[u] for u in extra_unit]


def _check_examples(examples: Sequence[Any], what: str) -> list[dict[str, Any]]:
    exs = list(examples)
    if not exs:
        raise DataError(f"{what} needs at least one example (an empty task)")
    return exs


@torch.no_grad()
def choice_accuracy(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[dict[str, Any]],
    *,
    chat_template: bool = True,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
    reuse_prefix: bool = True,
    return_scores: bool = False,
    with_response_nll: bool = False,
) -> dict[str, Any]:
    """``accuracy`` and ``accuracy_norm`` (fractions in [0, 1]) of examples with ``choices`` (module docstring).

    Ties go to the first choice. Prompts longer than ``max_length - len(choice)`` tokens are cut from the left.
    ``batch_size`` counts examples (all their choices go in one batch). ``reuse_prefix`` (default): the prompt is
    computed once per example and only the choice tokens after it (KV cache); ``False`` runs one full pass per
    choice -- the same scores, several times the cost (kept as the reference and for models without a cache).
    Also returns ``n`` and ``forward_tokens`` (token positions fed to the model, padding excluded), and with
    ``return_scores`` each example's per-choice log-likelihoods (``scores``, the raw ones ``accuracy`` ranks).
    ``with_response_nll`` also returns ``response_nll`` / ``response_tokens``: the mean NLL (nats) of the
    responses + EOS given their prompts and its token count, what :func:`response_nll` computes, here read from
    the prompts' KV cache of the accuracy pass (one more short pass per batch instead of a second full pass over
    every prompt: the ``ppl`` of an sft task at a fraction of its cost, equal to :func:`response_nll` to float
    tolerance; examples that cannot share the pass are scored by :func:`response_nll`).
    """
    from .data import get_tokenizer
    from .data.tasks import encode_example

    tokenizer = get_tokenizer(tokenizer)
    exs = _check_examples(examples, "accuracy")
    for i, ex in enumerate(exs):
        if not ex.get("choices"):
            raise DataError(f"accuracy needs choices, and example {i + 1} has none (metric accuracy on a task without choices)")
        if ex["response"] not in ex["choices"]:
            raise DataError(f"example {i + 1}: the response {ex['response']!r:.60} is not one of its choices")
    per_example = []
    for ex in exs:
        enc = [encode_example(tokenizer, ex, chat_template=chat_template, add_eos=False, max_length=max_length, response=c)
               for c in ex["choices"]]
        per_example.append([(p + c, len(p)) for p, c in enc])
    extras = None
    if with_response_nll:  # the ppl rows: prompt + response + EOS, exactly as response_nll encodes them
        extras = []
        for ex in exs:
            p, r = encode_example(tokenizer, ex, chat_template=chat_template, max_length=max_length)
            extras.append((p + r, len(p)))
    scores, fed, xscores = _score_choices_and_extras(model, per_example, _pad_of(tokenizer), batch_size=batch_size,
                                                     progress=progress, reuse_prefix=reuse_prefix, extras=extras)
    correct = correct_norm = 0
    for e, ex in enumerate(exs):
        gold = ex["choices"].index(ex["response"])
        raw = scores[e]
        norm = [s / max(1, len(c)) for s, c in zip(raw, ex["choices"])]
        correct += max(range(len(raw)), key=lambda k: (raw[k], -k)) == gold
        correct_norm += max(range(len(norm)), key=lambda k: (norm[k], -k)) == gold
    res: dict[str, Any] = {"accuracy": correct / len(exs), "accuracy_norm": correct_norm / len(exs), "n": len(exs),
                           "forward_tokens": fed}
    if return_scores:
        res["scores"] = scores
    if extras is not None:
        nll = -sum(float(x) for x in xscores if x is not None)
        tokens = sum(len(x[0]) - x[1] for x, sc in zip(extras, xscores) if sc is not None)
        rest = [ex for ex, sc in zip(exs, xscores) if sc is None]
        if rest:  # no shared pass for these (no KV cache, or a prompt cut differently): the full pass
            mean, n = response_nll(model, tokenizer, rest, chat_template=chat_template, batch_size=batch_size,
                                   max_length=max_length, progress=progress)
            nll, tokens = nll + mean * n, tokens + n
        res["response_nll"], res["response_tokens"] = nll / tokens, tokens
    return res


def normalize_answer(text: str) -> str:
    """SQuAD-style answer normalisation: lower case, no punctuation, no articles (a/an/the), single spaces."""
    import re
    import string

    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _cut(text: str, stop: Sequence[str]) -> str:
    text = text.lstrip()
    for s in stop:
        if s and s in text:
            text = text[: text.index(s)]
    return text


@torch.no_grad()
def exact_match(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[dict[str, Any]],
    *,
    max_new_tokens: int = 32,
    stop: Sequence[str] = ("\n",),
    chat_template: bool = True,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """``exact_match`` (fraction): greedy generation (``model.generate``, no sampling) from each prompt, cut at the
    first ``stop`` string, compared with the response after :func:`normalize_answer`."""
    from tqdm.auto import tqdm
    from transformers import StoppingCriteria, StoppingCriteriaList

    from .data import get_tokenizer
    from .data.tasks import _eos_id, encode_example

    tokenizer = get_tokenizer(tokenizer)
    exs = _check_examples(examples, "exact_match")
    if max_new_tokens < 1:
        raise DataError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts = [encode_example(tokenizer, ex, chat_template=chat_template, add_eos=False, max_length=max_length)[0] for ex in exs]
    if max_length is not None:
        prompts = [p[-max(1, max_length - max_new_tokens):] for p in prompts]
    stops = [s for s in stop if s]

    class _Stop(StoppingCriteria):  # per row: stop once the generated text holds a stop string
        def __init__(self, start: int):
            self.start = start

        def __call__(self, input_ids: torch.LongTensor, scores: Any, **kw: Any) -> torch.BoolTensor:
            done = [any(s in tokenizer.decode(row[self.start:].tolist(), skip_special_tokens=True).lstrip() for s in stops)
                    for row in input_ids]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    pad, eos = _pad_of(tokenizer), _eos_id(tokenizer)
    device = _device_of(model)
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    preds: list[str] = [""] * len(exs)
    with _EvalMode(model):
        for start in tqdm(range(0, len(order), batch_size), desc="exact_match", unit="batch", disable=not progress, leave=False):
            chunk = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, i in enumerate(chunk):  # left padding: generation continues every row from its last real token
                ids[j, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[j, width - len(prompts[i]):] = 1
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens, do_sample=False,
                num_beams=1, pad_token_id=pad, eos_token_id=eos, temperature=None, top_p=None, top_k=None,
                stopping_criteria=StoppingCriteriaList([_Stop(width)]) if stops else None,
            )
            for j, i in enumerate(chunk):
                preds[i] = _cut(tokenizer.decode(out[j, width:].tolist(), skip_special_tokens=True), stops)
    hits = [normalize_answer(p) == normalize_answer(ex["response"]) for p, ex in zip(preds, exs)]
    res: dict[str, Any] = {"exact_match": sum(hits) / len(exs), "n": len(exs)}
    if return_predictions:
        res["predictions"] = preds
    return res


@torch.no_grad()
def response_nll(model: nn.Module, tokenizer: Any, examples: Sequence[dict[str, Any]], *, chat_template: bool = True,
                 batch_size: int = 8, max_length: int | None = None, progress: bool = True) -> tuple[float, int]:
    """``(mean NLL in nats, token count)`` over the response tokens (+ EOS) of ``examples``, given their prompts."""
    from .data import get_tokenizer
    from .data.tasks import encode_example

    tokenizer = get_tokenizer(tokenizer)
    exs = _check_examples(examples, "ppl")
    rows, plens = [], []
    for ex in exs:
        p, r = encode_example(tokenizer, ex, chat_template=chat_template, max_length=max_length)
        rows.append(p + r)
        plens.append(len(p))
    acc = {"nll": 0.0, "n": 0}

    def consume(i: int, logp: torch.Tensor) -> None:
        row, pl = rows[i], plens[i]
        idx = torch.arange(pl - 1, len(row) - 1)
        acc["nll"] -= float(logp[idx, torch.tensor(row[pl:])].double().sum())
        acc["n"] += len(row) - pl

    _forward_rows(model, rows, _pad_of(tokenizer), batch_size, progress, "ppl", consume)
    return acc["nll"] / acc["n"], acc["n"]


def response_perplexity(model: nn.Module, tokenizer: Any, examples: Sequence[dict[str, Any]], **kw: Any) -> float:
    """Token-weighted perplexity of the responses given the prompts (``ppl`` of an sft task)."""
    return _ppl(response_nll(model, tokenizer, examples, **kw)[0])


def evaluate_sft(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[dict[str, Any]],
    metrics: Sequence[str] = ("accuracy",),
    *,
    chat_template: bool = True,
    batch_size: int = 8,
    max_length: int | None = None,
    max_new_tokens: int = 32,
    stop: Sequence[str] = ("\n",),
    progress: bool = True,
) -> dict[str, float]:
    """The requested ``metrics`` (``accuracy`` -- which adds ``accuracy_norm`` --, ``exact_match``, ``ppl``) of
    ``model`` on ``examples``; accuracy-like values are fractions in [0, 1]."""
    unknown = [m for m in metrics if m not in SFT_METRICS]
    if unknown:
        raise DataError(f"unknown metric {unknown[0]!r}; choose from {', '.join(SFT_METRICS)}")
    out: dict[str, float] = {}
    common = dict(chat_template=chat_template, batch_size=batch_size, max_length=max_length, progress=progress)
    # accuracy and ppl together: both read from one pass over the prompts (choice_accuracy's with_response_nll)
    fused = "accuracy" in metrics and "ppl" in metrics
    acc: dict[str, Any] | None = None
    for m in metrics:
        if m == "accuracy" or (m == "ppl" and fused):
            if acc is None:
                acc = choice_accuracy(model, tokenizer, examples, with_response_nll=fused, **common)
            if m == "accuracy":
                out.update(accuracy=acc["accuracy"], accuracy_norm=acc["accuracy_norm"])
            else:
                out["ppl"] = _ppl(acc["response_nll"])
        elif m == "exact_match":
            out["exact_match"] = exact_match(model, tokenizer, examples, max_new_tokens=max_new_tokens, stop=stop, **common)["exact_match"]
        else:
            out["ppl"] = response_perplexity(model, tokenizer, examples, **common)
    return out


def evaluate_task(
    model_name_or_model: Any,
    data: Any,
    *,
    metrics: Sequence[str] = ("accuracy",),
    split: str = "test",
    tokenizer: Any = None,
    max_examples: int | None = None,
    seed: int = 0,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    prompt_field: str = "prompt",
    response_field: str = "response",
    messages_field: str | None = None,
    choices_field: str | None = None,
    chat_template: bool = True,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    stop: Sequence[str] = ("\n",),
    progress: bool = True,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Metrics of a model (name/path or loaded model) on one split of a supervised task (a built-in task name, a
    file, a datasets object...; see :func:`kappatune.data.load_task`); returns a JSON-ready summary.

    ``split``: ``train`` / ``validation`` / ``test`` of the seeded split, or ``all``. ``max_examples`` keeps that
    many evenly spaced examples.
    """
    from . import data as _data
    from . import models as _models

    if isinstance(model_name_or_model, nn.Module):
        model, name = model_name_or_model, getattr(getattr(model_name_or_model, "config", None), "name_or_path", "model")
    else:
        name = str(model_name_or_model)
        model, tok = _models.load_model(name, trust_remote_code=trust_remote_code)
        tokenizer = tokenizer if tokenizer is not None else tok
    tokenizer = _data.get_tokenizer(tokenizer if tokenizer is not None else (name if name in ("tiny-llama", "tiny-moe") else model))
    task = _data.load_task(data, seed=seed, validation_fraction=validation_fraction, test_fraction=test_fraction,
                           prompt_field=prompt_field, response_field=response_field, messages_field=messages_field,
                           choices_field=choices_field, choices_required="accuracy" in metrics, progress=progress)
    if split == "all":
        exs = [e for s in ("train", "validation", "test") for e in task[s]]
    else:
        exs = task[split]
    if max_examples is not None and max_examples < len(exs):
        exs = [exs[(i * len(exs)) // max_examples] for i in range(max_examples)]
    values = evaluate_sft(model, tokenizer, exs, metrics, chat_template=chat_template, batch_size=batch_size,
                          max_new_tokens=max_new_tokens, stop=stop, progress=progress)
    return {"model": name, "data": task.name, "source": task.source, "split": split, "examples": len(exs),
            "chat_template": bool(chat_template and _data.tasks._has_template(tokenizer)), "seed": seed, **values}


# ---------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness bridge.
# ---------------------------------------------------------------------------------------------------------------

def _hf_tokenizer(tokenizer: Any) -> Any:
    """A ``transformers`` tokenizer for lm-eval: the byte tokenizer of the tiny models maps to ``ByT5Tokenizer``
    (the same ids for every byte: byte + 3), any other tokenizer is passed through."""
    from .data import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer(extra_ids=0)
    return tokenizer


def lm_eval_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    include_path: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
) -> dict[str, dict[str, float]]:
    """Run lm-evaluation-harness ``tasks`` on the in-memory ``model`` (``lm_eval.models.huggingface.HFLM``).

    ``include_path``: a directory of extra task YAMLs (local tasks, e.g. over a local jsonl). Returns
    ``{task: {metric: value}}`` with lm-eval's metric names (``acc``, ``acc_norm``, ...; fractions) and no
    ``_stderr`` entries. Needs the optional extra: ``pip install 'kappatune[lm_eval]'``.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise DataError(f"the lm-eval bridge needs lm-evaluation-harness: pip install 'kappatune[lm_eval]' ({exc.name} is missing)") from None
    if include_path is not None and not Path(include_path).is_dir():
        raise DataError(f"lm-eval include path {include_path} is not a directory of task YAMLs")
    # Indexing lm-eval's thousands of built-in task YAMLs takes a minute on a small CPU: skip it when every task
    # asked for is a local one.
    local = set()
    if include_path is not None:
        local = {m.group(1) for f in Path(include_path).rglob("*.y*ml")
                 for m in [__import__("re").search(r"(?m)^task:\s*['\"]?([\w.-]+)", f.read_text("utf-8", "replace"))] if m}
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None, verbosity="ERROR",
                          include_defaults=not set(tasks) <= local)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        import difflib

        hint = difflib.get_close_matches(unknown[0], manager.all_tasks, n=1)
        raise DataError(f"lm-eval has no task {unknown[0]!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                        + ("" if include_path else "; local task YAMLs need --lm-eval-include DIR"))
    lm = HFLM(pretrained=model, tokenizer=_hf_tokenizer(tokenizer), batch_size=batch_size)
    with _EvalMode(model):
        res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=False, verbosity="ERROR")
    out: dict[str, dict[str, float]] = {}
    for task, vals in (res or {}).get("results", {}).items():
        out[task] = {k.split(",")[0]: float(v) for k, v in vals.items()
                     if "_stderr" not in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out
