"""Supervised (``sft``) tasks: prompt → response examples, their seeded three-way splits, tokenisation with
response-only labels, padding collation, and the registry of built-in supervised tasks.

An example is a plain dict (the contract shared with ``kappatune train`` and the built-in labelled tasks)::

    {"prompt": str, "response": str, "choices": list[str] (optional; the gold answer is "response")}

plus metadata keys that loaders keep and training ignores (``label``, ``id``, ``source``...). Chat data
(``messages_field``: a list of ``{role, content}`` with roles ``system``/``user``/``assistant``, ending with an
assistant turn) becomes ``prompt`` (the conversation before the last assistant turn, in the plain format below)
and ``response`` (that turn), with the turns kept under ``"messages"`` for the chat template.

Text format (docs/data.md): with a tokenizer that has a chat template (and ``chat_template=True``) the prompt is
``apply_chat_template(turns, add_generation_prompt=True)`` and the response is what the template adds for the
assistant turn. Otherwise the **plain format**: the prompt text as-is, then the response joined by one space
(the *delimiter*; none when the prompt is empty or ends in whitespace, or the response starts with whitespace —
lm-evaluation-harness's ``target_delimiter``), then EOS during training. Chat turns in the plain format read
``System: ...\\nUser: ...\\nAssistant:``.

Loading goes through ``datasets``: ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` / ``.txt`` files, a
``save_to_disk`` directory, a :class:`datasets.Dataset` / :class:`datasets.DatasetDict`, a list of dicts, a
hub name (``NAME``, ``NAME:SPLIT`` or ``NAME:CONFIG:SPLIT``), or a built-in task name (:func:`register_builtin_task`).
Every record is checked; problems are one :class:`~kappatune.errors.DataError` line naming the file, the record
(the line, for JSON lines) and the field.

Splits (:func:`split_examples`): a seeded permutation (``numpy.random.default_rng(seed)``); the first
``max(1, round(test_fraction · n))`` examples are ``test``, the next ``max(1, round(validation_fraction · n))``
``validation``, the rest ``train``; each keeps the original order. Data that already has ``train`` /
``validation`` / ``test`` splits (a ``DatasetDict``, a built-in task) keeps them; a missing validation split is
carved out of train the same way.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from ..errors import DataError
from ..storage import cache_dir
from .tokenizers import ByteTokenizer, _eos_id

__all__ = [
    "SFTTask",
    "TaskSpec",
    "BUILTIN_TASKS",
    "TASK_SPLITS",
    "ROLES",
    "register_builtin_task",
    "list_tasks",
    "load_examples",
    "load_task",
    "split_examples",
    "format_example",
    "encode_example",
    "tokenize_sft",
    "collate_sft",
    "pack_sft",
    "task_summary",
    "looks_like_sft",
]

TASK_SPLITS = ("train", "validation", "test")
ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # label of prompt and padding positions: ignored by the loss (torch's cross_entropy default)


# ---------------------------------------------------------------------------------------------------------------
# The task object and the registry of built-in supervised tasks.
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class SFTTask:
    """A supervised task: its examples per split (``train`` / ``validation`` / ``test``) and metadata."""

    name: str
    splits: dict[str, list[dict[str, Any]]]
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def has_choices(self) -> bool:
        """Every example has ``choices`` (what ``accuracy`` needs)."""
        exs = [e for s in self.splits.values() for e in s]
        return bool(exs) and all(e.get("choices") for e in exs)

    def __getitem__(self, split: str) -> list[dict[str, Any]]:
        if split not in self.splits:
            raise DataError(f"task {self.name!r} has no split {split!r}; splits: {', '.join(self.splits)}")
        return self.splits[split]

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
        return f"SFTTask(name={self.name!r}, {sizes}, source={self.source!r})"


@dataclass(frozen=True)
class TaskSpec:
    """A built-in supervised task: ``loader() -> {"train": [...], "validation": [...], "test": [...]}`` + metadata."""

    name: str
    loader: Callable[[], Mapping[str, list[dict[str, Any]]]] = field(repr=False, compare=False)
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


BUILTIN_TASKS: dict[str, TaskSpec] = {}


def register_builtin_task(name: str, loader: Callable[[], Mapping[str, list[dict[str, Any]]]], **meta: Any) -> TaskSpec:
    """Register a built-in supervised task (``kappatune data``, ``tasks: [NAME]`` with ``type: sft``).

    ``loader()`` returns the three splits as lists of example dicts; it runs (and may download) only when the task
    is used. ``meta``: what ``kappatune data NAME`` shows (``description``, ``source``, ``license``, ``labels``,
    ``chance_accuracy``, ``prompt_template``...). Registering a name again replaces it.
    """
    if not name or "/" in name or os.sep in name:
        raise ValueError(f"task name {name!r} must be a plain name")
    spec = TaskSpec(name, loader, dict(meta))
    BUILTIN_TASKS[name] = spec
    return spec


def list_tasks() -> list[dict[str, Any]]:
    """The registered built-in supervised tasks and their metadata (nothing is loaded)."""
    return [{"name": s.name, "kind": "sft", **{k: v for k, v in s.meta.items() if isinstance(v, (str, int, float, list, dict, type(None)))}}
            for s in BUILTIN_TASKS.values()]


# ---------------------------------------------------------------------------------------------------------------
# Records -> examples, with one precise message per problem.
# ---------------------------------------------------------------------------------------------------------------

def _plain_chat_prompt(turns: Sequence[Mapping[str, str]]) -> str:
    lines = [f"{t['role'].capitalize()}: {t['content']}" for t in turns]
    return "\n".join(lines + ["Assistant:"])


def _text_field(rec: Mapping[str, Any], key: str, where: str, *, hint: str) -> str:
    if key not in rec or rec[key] is None:
        keys = ", ".join(map(str, list(rec)[:10])) or "none"
        raise DataError(f"{where}: no field {key!r} (fields: {keys}); {hint}")
    value = rec[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} is {type(value).__name__}, not text")
    return value


def _example(rec: Any, where: str, *, prompt_field: str, response_field: str, messages_field: str | None,
             choices_field: str | None, choices_required: bool) -> dict[str, Any]:
    """One record as an example dict (see the module docstring); raises :class:`DataError` naming ``where``."""
    if not isinstance(rec, Mapping):
        raise DataError(f"{where}: expected an object with fields, got {type(rec).__name__}")
    used = set()
    ex: dict[str, Any]
    if messages_field:
        used.add(messages_field)
        turns = rec.get(messages_field)
        if turns is None:
            keys = ", ".join(map(str, list(rec)[:10])) or "none"
            raise DataError(f"{where}: no field {messages_field!r} (fields: {keys}); set messages_field to the chat column")
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: field {messages_field!r} must be a non-empty list of {{role, content}} messages")
        clean = []
        for i, t in enumerate(turns):
            if not isinstance(t, Mapping) or not isinstance(t.get("role"), str) or not isinstance(t.get("content"), str):
                raise DataError(f"{where}: {messages_field}[{i}] must be an object with string 'role' and 'content'")
            if t["role"] not in ROLES:
                raise DataError(f"{where}: {messages_field}[{i}] has unknown role {t['role']!r}; roles: {', '.join(ROLES)}")
            clean.append({"role": t["role"], "content": t["content"]})
        if clean[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message of {messages_field!r} must be the assistant's (the response), "
                            f"got role {clean[-1]['role']!r}")
        ex = {"prompt": _plain_chat_prompt(clean[:-1]), "response": clean[-1]["content"], "messages": clean}
    else:
        used.update((prompt_field, response_field))
        ex = {
            "prompt": _text_field(rec, prompt_field, where, hint="set prompt_field to the prompt column"),
            "response": _text_field(rec, response_field, where, hint="set response_field to the response column"),
        }
    if not ex["response"].strip():
        raise DataError(f"{where}: the response is empty (nothing to learn or score)")
    cf = choices_field or ("choices" if "choices" in rec else None)
    if cf is not None and (choices_field is not None or rec.get(cf) is not None):
        used.add(cf)
        ch = rec.get(cf)
        if ch is None:
            raise DataError(f"{where}: no field {cf!r} (the choices); set choices_field or leave it out")
        if not isinstance(ch, (list, tuple)) or len(ch) < 2 or not all(isinstance(c, str) for c in ch):
            raise DataError(f"{where}: field {cf!r} must be a list of at least two strings, got {ch!r:.80}")
        if ex["response"] not in ch:
            raise DataError(f"{where}: the response {ex['response']!r:.60} is not one of the choices {list(ch)!r:.120} "
                            "(the gold answer must be a choice)")
        ex["choices"] = list(ch)
    elif choices_required:
        raise DataError(f"{where}: no choices, but metric accuracy ranks choices (a task without choices); "
                        "set choices_field, or measure it with exact_match or ppl")
    for k, v in rec.items():  # metadata: kept, ignored by training
        if k not in used and k not in ex and v is not None:  # datasets fills a column missing in a record with None
            ex[k] = v
    return ex


_FIELD_DEFAULTS = dict(prompt_field="prompt", response_field="response", messages_field=None, choices_field=None,
                       choices_required=False)


def _examples(records: Iterable[Any], where: Callable[[int], str], **fields: Any) -> list[dict[str, Any]]:
    unknown = set(fields) - set(_FIELD_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown field option(s): {', '.join(sorted(unknown))}")
    fields = {**_FIELD_DEFAULTS, **fields}
    return [_example(r, where(i), **fields) for i, r in enumerate(records)]


# ---------------------------------------------------------------------------------------------------------------
# Sources, through `datasets`.
# ---------------------------------------------------------------------------------------------------------------

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text", ".text": "text"}


class _quiet_datasets:
    """Silence ``datasets``' progress bars and logging for the duration (they are per-process global switches)."""

    def __init__(self, progress: bool):
        self.progress = progress

    def __enter__(self) -> None:
        import datasets

        self.was = datasets.utils.logging.is_progress_bar_enabled()
        self.level = datasets.utils.logging.get_verbosity()
        if not self.progress:
            datasets.utils.logging.disable_progress_bar()
        datasets.utils.logging.set_verbosity(50)  # CRITICAL: a parse failure is reported by us, in one line

    def __exit__(self, *exc: Any) -> None:
        import datasets

        if self.was:
            datasets.utils.logging.enable_progress_bar()
        datasets.utils.logging.set_verbosity(self.level)


def _diagnose_json(path: Path) -> None:
    """Find the first line of a JSON-lines file (or the spot of a JSON file) that does not parse; raise on it."""
    text = path.read_bytes().decode("utf-8", "replace")
    if path.suffix.lower() == ".json":
        try:
            json.loads(text)
        except ValueError as exc:
            raise DataError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
        return
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path} line {i} is not valid JSON ({exc.msg}); one JSON object per line") from None


def _jsonl_line_numbers(path: Path) -> list[int]:
    text = path.read_bytes().decode("utf-8", "replace")
    return [i for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def _records_from_file(path: Path, progress: bool) -> tuple[list[dict[str, Any]], Callable[[int], str]]:
    import datasets

    suffix = path.suffix.lower()
    builder = _BUILDERS.get(suffix)
    if builder is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json, .csv, .parquet or .txt")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty; give a file with examples in it")
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        if builder != "parquet":
            raise DataError(f"{path} is not UTF-8 text (bad byte at offset {exc.start})") from None
    try:
        with _quiet_datasets(progress):
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=str(cache_dir("datasets")))
    except Exception as exc:  # datasets/pyarrow raise many types; find the precise cause where we can
        if builder == "json":
            _diagnose_json(path)
            lines = _jsonl_line_numbers(path) if suffix == ".jsonl" else []
            # Parses line by line: a type clash between records (e.g. a number where others have text)
            recs = [json.loads(x) for x in path.read_text("utf-8").splitlines() if x.strip()] if suffix == ".jsonl" else []
            return recs, (lambda i: f"{path} line {lines[i]}" if i < len(lines) else f"{path} record {i + 1}")
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(f"{path} cannot be read as {builder} ({first})") from None
    recs = ds.to_list()
    if suffix == ".jsonl":
        lines = _jsonl_line_numbers(path)
        return recs, (lambda i: f"{path} line {lines[i]}" if i < len(lines) else f"{path} record {i + 1}")
    if suffix == ".csv":
        return recs, (lambda i: f"{path} row {i + 2}")  # row 1 is the header
    return recs, (lambda i: f"{path} record {i + 1}")


def _dataset_splits(obj: Any) -> dict[str, list[dict[str, Any]]] | list[dict[str, Any]]:
    import datasets

    if isinstance(obj, datasets.DatasetDict):
        return {k: v.to_list() for k, v in obj.items()}
    if isinstance(obj, datasets.Dataset):
        return obj.to_list()
    raise DataError(f"not a datasets.Dataset or DatasetDict: {type(obj).__name__}")


def _hub(name: str, progress: bool) -> Any:
    import datasets

    from ..models import hub_unreachable_reason

    parts = name.split(":")
    if len(parts) > 3:
        raise DataError(f"{name!r}: a hub dataset is NAME, NAME:SPLIT or NAME:CONFIG:SPLIT")
    ds_name = parts[0]
    config = parts[1] if len(parts) == 3 else None
    split = parts[-1] if len(parts) >= 2 else None
    offline = hub_unreachable_reason()
    if offline and not os.environ.get("HF_DATASETS_OFFLINE"):
        raise DataError(f"{name!r} is not a built-in task or a local file, and the Hugging Face hub is unavailable "
                        f"({offline}); built-in tasks: {', '.join(BUILTIN_TASKS) or 'none registered'}")
    try:
        with _quiet_datasets(progress):
            return datasets.load_dataset(ds_name, config, split=split or None)
    except Exception as exc:  # ConnectionError, FileNotFoundError, HfHubHTTPError, ValueError (bad split)...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(f"{name!r} is not a built-in task or a local file, and loading it from the hub failed ({first})") from None


def load_examples(
    source: Any,
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    messages_field: str | None = None,
    choices_field: str | None = None,
    choices_required: bool = False,
    progress: bool = False,
) -> dict[str, list[dict[str, Any]]] | list[dict[str, Any]]:
    """Examples from ``source`` (see the module docstring): a list, or ``{split: list}`` when the source has splits.

    ``choices_field`` None: a ``choices`` field is used when records have one. ``choices_required``: every record
    must have choices (``accuracy``). Raises :class:`DataError` on the first bad record.
    """
    fields = dict(prompt_field=prompt_field, response_field=response_field, messages_field=messages_field,
                  choices_field=choices_field, choices_required=choices_required)
    label = None
    if isinstance(source, (list, tuple)):
        raw: Any = list(source)
        label = "example"
    elif isinstance(source, (str, os.PathLike)) and Path(str(source)).expanduser().exists():
        path = Path(str(source)).expanduser()
        if path.is_dir():
            import datasets

            try:
                raw = _dataset_splits(datasets.load_from_disk(str(path)))
            except (FileNotFoundError, ValueError) as exc:
                raise DataError(f"{path} is a directory but not a datasets save_to_disk directory ({exc}); "
                                "give a .jsonl/.json/.csv/.parquet file") from None
            label = str(path)
        else:
            recs, where = _records_from_file(path, progress)
            exs = _examples(recs, where, **fields)
            if not exs:
                raise DataError(f"{path} holds no examples")
            return exs
    elif isinstance(source, str):
        if Path(source).suffix.lower() in _BUILDERS or source.startswith((".", "/", "~")):
            raise DataError(f"data file {source} does not exist")
        raw = _dataset_splits(_hub(source, progress))
        label = f"dataset {source!r}"
    else:
        raw = _dataset_splits(source)
        label = "dataset"
    if isinstance(raw, dict):
        out = {}
        for split, recs in raw.items():
            out[split] = _examples(recs, lambda i, s=split: f"{label} split {s!r} record {i + 1}", **fields)
        if not any(out.values()):
            raise DataError(f"{label} holds no examples")
        return out
    exs = _examples(raw, lambda i: f"{label} {i + 1}" if label == "example" else f"{label} record {i + 1}", **fields)
    if not exs:
        raise DataError(f"{label if label != 'example' else 'the example list'} holds no examples (an empty task)")
    return exs


def split_examples(examples: Sequence[dict[str, Any]], *, seed: int = 0, validation_fraction: float = 0.1,
                   test_fraction: float = 0.1) -> dict[str, list[dict[str, Any]]]:
    """The seeded three-way split (module docstring); every split non-empty, original order kept within each."""
    for name, f in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < f < 1.0:
            raise DataError(f"{name} must be between 0 and 1 (exclusive), got {f}")
    n = len(examples)
    if n < 3:
        raise DataError(f"a train/validation/test split needs at least 3 examples, got {n}")
    n_test = min(n - 2, max(1, round(test_fraction * n)))
    n_val = min(n - n_test - 1, max(1, round(validation_fraction * n)))
    perm = np.random.default_rng(seed).permutation(n)
    parts = {"test": perm[:n_test], "validation": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
    return {k: [examples[i] for i in np.sort(parts[k])] for k in TASK_SPLITS}


def _carve(examples: Sequence[dict[str, Any]], fraction: float, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split off ``max(1, round(fraction · n))`` seeded examples: ``(rest, carved)``, both in original order."""
    n = len(examples)
    if n < 2:
        raise DataError(f"cannot carve a split out of {n} training example(s); give more examples")
    k = min(n - 1, max(1, round(fraction * n)))
    perm = np.random.default_rng(seed).permutation(n)
    chosen = set(perm[:k].tolist())
    return [e for i, e in enumerate(examples) if i not in chosen], [e for i, e in enumerate(examples) if i in chosen]


def load_task(
    source: Any,
    *,
    name: str | None = None,
    seed: int = 0,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    progress: bool = False,
    **fields: Any,
) -> SFTTask:
    """A supervised task with ``train`` / ``validation`` / ``test`` splits from any source :func:`load_examples`
    takes, or a built-in task name. ``fields``: ``prompt_field``, ``response_field``, ``messages_field``,
    ``choices_field``, ``choices_required``. The split is seeded (``seed``) unless the source has its own splits."""
    if isinstance(source, SFTTask):
        return source
    split_kw = dict(seed=seed, validation_fraction=validation_fraction, test_fraction=test_fraction)
    if isinstance(source, str) and source in BUILTIN_TASKS:
        spec = BUILTIN_TASKS[source]
        got = spec.loader()
        missing = [s for s in TASK_SPLITS if s not in got]
        if missing:
            raise DataError(f"built-in task {source!r}: its loader gave no {missing[0]!r} split (report this as a bug)")
        splits = {s: _examples(got[s], lambda i, s=s: f"task {source!r} split {s!r} example {i + 1}", **fields) for s in TASK_SPLITS}
        for s in TASK_SPLITS:
            if not splits[s]:
                raise DataError(f"built-in task {source!r} has an empty {s!r} split")
        return SFTTask(name or source, splits, source=str(spec.meta.get("source", f"built-in:{source}")), meta=dict(spec.meta))
    got = load_examples(source, progress=progress, **fields)
    label = name or (Path(str(source)).stem if isinstance(source, (str, os.PathLike)) else "task")
    src = str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
    if isinstance(got, list):
        return SFTTask(label, split_examples(got, **split_kw), source=src)
    # the source has splits: keep train/validation/test, carve what is missing out of train
    aliases = {"valid": "validation", "val": "validation", "dev": "validation", "eval": "test"}
    have = {aliases.get(k, k): v for k, v in got.items()}
    if "train" not in have:
        raise DataError(f"{src} has splits {', '.join(got)} but no 'train' split")
    if "test" in have and "validation" in have:
        splits = {"train": have["train"], "validation": have["validation"], "test": have["test"]}
    elif "test" in have or "validation" in have:  # carve the missing one out of train
        other = "test" if "test" in have else "validation"
        missing = "validation" if other == "test" else "test"
        rest, carved = _carve(have["train"], validation_fraction if missing == "validation" else test_fraction, seed)
        splits = {"train": rest, other: have[other], missing: carved}
    else:
        splits = split_examples(have["train"], **split_kw)
    for s in TASK_SPLITS:
        if not splits.get(s):
            raise DataError(f"{src}: the {s!r} split is empty (an empty task)")
    return SFTTask(label, {s: splits[s] for s in TASK_SPLITS}, source=src)


def task_summary(task: SFTTask) -> dict[str, Any]:
    """Sizes per split and, for tasks with choices, the gold-answer counts per split (label balance)."""
    out: dict[str, Any] = {"name": task.name, "kind": "sft", "source": task.source, "choices": task.has_choices,
                           "sizes": {s: len(v) for s, v in task.splits.items()}}
    if task.has_choices:
        key = task.meta.get("label_field", "response")  # e.g. next-sentence: the gold slot, not the sentence itself
        out["label_counts"] = {s: dict(sorted(Counter(str(e.get(key, e["response"])) for e in v).items()))
                               for s, v in task.splits.items()}
        out["chance_accuracy"] = float(np.mean([1.0 / len(e["choices"]) for e in task["test"]]))
    out.update({k: v for k, v in task.meta.items() if k not in out})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Text and tokens.
# ---------------------------------------------------------------------------------------------------------------

def _has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) and callable(getattr(tokenizer, "apply_chat_template", None))


def delimiter(prompt: str, response: str) -> str:
    """The plain format's separator: one space unless the prompt is empty or ends in whitespace or the response
    starts with whitespace (lm-evaluation-harness's ``target_delimiter``)."""
    if not prompt or prompt[-1].isspace() or (response and response[0].isspace()):
        return ""
    return " "


def format_example(tokenizer: Any, example: Mapping[str, Any], *, chat_template: bool = True,
                   response: str | None = None) -> tuple[str, str]:
    """``(prompt_text, response_text)`` of an example (``response``: score another candidate instead).

    The two concatenated are the training text (before EOS); see the module docstring for both formats.
    """
    resp = example["response"] if response is None else response
    if chat_template and _has_template(tokenizer):
        turns = list(example.get("messages") or [{"role": "user", "content": example["prompt"]}])
        if turns and turns[-1]["role"] == "assistant":
            turns = turns[:-1]
        prompt = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": resp}], tokenize=False)
        return prompt, (full[len(prompt):] if full.startswith(prompt) else resp)
    prompt = example["prompt"]
    return prompt, delimiter(prompt, resp) + resp


def _encode(tokenizer: Any, text: str) -> list[int]:
    if not text:
        return []
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _start_id(tokenizer: Any) -> int:
    bos = getattr(tokenizer, "bos_token_id", None)
    return int(bos if bos is not None else _eos_id(tokenizer))


def encode_example(tokenizer: Any, example: Mapping[str, Any], *, chat_template: bool = True, add_eos: bool = True,
                   max_length: int | None = None, response: str | None = None) -> tuple[list[int], list[int]]:
    """``(prompt_ids, response_ids)``: prompt and response tokenised separately (so the boundary is exact).

    An empty prompt becomes BOS (the first response token needs a context). ``add_eos`` appends EOS to the
    response (what teaches the model to stop) unless the chat template already ended the turn with it. Over
    ``max_length`` tokens, the prompt is cut from the left (its end, next to the response, is kept); a response
    longer than ``max_length - 1`` is cut from the right.
    """
    p_text, r_text = format_example(tokenizer, example, chat_template=chat_template, response=response)
    p_ids = _encode(tokenizer, p_text) or [_start_id(tokenizer)]
    r_ids = _encode(tokenizer, r_text)
    if add_eos:
        eos = _eos_id(tokenizer)
        if not r_ids or r_ids[-1] != eos:
            r_ids.append(eos)
    if max_length is not None and len(p_ids) + len(r_ids) > max_length:
        r_ids = r_ids[: max_length - 1]
        p_ids = p_ids[len(p_ids) - (max_length - len(r_ids)):]
    return p_ids, r_ids


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else _eos_id(tokenizer)


def collate_sft(features: Sequence[Mapping[str, Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``[{input_ids, labels}]`` into ``input_ids`` / ``attention_mask`` / ``labels`` tensors.

    Padding gets attention 0 and label -100; each row is one example, so no example attends to another (no
    packing). Written by hand because ``transformers.DataCollatorForSeq2Seq`` needs a tokenizer with ``.pad``,
    which the byte tokenizer of the tiny models does not have.
    """
    if not features:
        raise DataError("collate_sft needs at least one example")
    width = max(len(f["input_ids"]) for f in features)
    n = len(features)
    ids = torch.full((n, width), int(pad_id), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, f in enumerate(features):
        k = len(f["input_ids"])
        ids[i, :k] = torch.as_tensor(list(f["input_ids"]), dtype=torch.long)
        labels[i, :k] = torch.as_tensor(list(f["labels"]), dtype=torch.long)
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack_sft(features: Sequence[Mapping[str, Sequence[int]]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Pack ``[{input_ids, labels}]`` several to a row of ``seq_len`` tokens, without one attending to another.

    Examples are placed in order, each in the current row while it fits (else a new row starts; none is split).
    ``position_ids`` restart at 0 with every example, which is how transformers (>= 4.5x, ``masking_utils.
    find_packed_sequence_indices``) marks packed sequences: a model called with ``position_ids`` and **no**
    ``attention_mask`` builds a block-diagonal causal mask (eager / sdpa / flex) or uses the varlen kernels
    (flash-attention), so each example sees only itself, exactly as when padded to its own row. The row's padding
    tail is one more "sequence" (positions from 0, label -100) that nothing real attends to. ``labels`` keep -100
    on prompts, so the next-token loss across a boundary (an example's last token predicting the next example's
    first, a prompt token) is ignored. ``attention_mask`` marks the real tokens (it is not passed to the model
    for packed rows; :func:`kappatune.training.sft_loss_sum` sees ``position_ids`` and leaves it out).
    """
    if not features:
        raise DataError("pack_sft needs at least one example")
    rows: list[list[Mapping[str, Sequence[int]]]] = [[]]
    used = 0
    for f in features:
        k = len(f["input_ids"])
        if k > seq_len:
            raise DataError(f"an example of {k} tokens does not fit a packed row of {seq_len}; cut it first (max_length)")
        if used + k > seq_len and rows[-1]:
            rows.append([])
            used = 0
        rows[-1].append(f)
        used += k
    n = len(rows)
    width = max(sum(len(f["input_ids"]) for f in r) for r in rows)
    ids = torch.full((n, width), int(pad_id), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    pos = torch.zeros((n, width), dtype=torch.long)
    for i, r in enumerate(rows):
        at = 0
        for f in r:
            k = len(f["input_ids"])
            ids[i, at:at + k] = torch.as_tensor(list(f["input_ids"]), dtype=torch.long)
            labels[i, at:at + k] = torch.as_tensor(list(f["labels"]), dtype=torch.long)
            mask[i, at:at + k] = 1
            pos[i, at:at + k] = torch.arange(k)
            at += k
        pos[i, at:] = torch.arange(width - at)  # the padding tail: a sequence of its own
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": pos}


def tokenize_sft(examples: Sequence[Mapping[str, Any]], tokenizer: Any, *, max_length: int | None = None,
                 chat_template: bool = True, packing: bool = False) -> dict[str, torch.Tensor]:
    """Training tensors of ``examples`` (``[N, L]``, L = the longest example): labels are the response tokens and
    EOS, -100 on the prompt and padding; see :func:`encode_example` and :func:`collate_sft`.

    ``packing`` (needs ``max_length``, the row length): several examples per row, each attending only to itself
    (:func:`pack_sft`); fewer rows, no compute spent on padding."""
    if not examples:
        raise DataError("no examples to tokenize (an empty task)")
    feats = []
    for ex in examples:
        p, r = encode_example(tokenizer, ex, chat_template=chat_template, max_length=max_length)
        feats.append({"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r})
    if packing:
        if max_length is None:
            raise DataError("packing needs a row length (max_length / training.seq_len)")
        return pack_sft(feats, max_length, _pad_id(tokenizer))
    return collate_sft(feats, _pad_id(tokenizer))


def looks_like_sft(data: str, prompt_field: str = "prompt", messages_field: str | None = None) -> bool:
    """Whether ``data`` (a name or path) holds supervised examples when the user did not say: a built-in sft task,
    a ``messages_field`` given, or a .jsonl/.json/.csv file whose first records have the prompt field; a built-in
    corpus or anything else is raw text. Shared by ``kappatune train`` and ``kappatune eval``/``data``."""
    from .corpora import BUILTIN_CORPORA

    if messages_field or data in BUILTIN_TASKS:
        return True
    if data in BUILTIN_CORPORA:
        return False
    path = Path(data)
    if path.is_file() and path.suffix.lower() in (".jsonl", ".json", ".csv"):
        head = path.read_text("utf-8", "replace")[:4096]
        return f'"{prompt_field}"' in head or prompt_field in head.split("\n", 1)[0].split(",")
    return False
