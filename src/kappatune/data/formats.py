"""User data: local ``.txt`` / ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` files (read through
``datasets.load_dataset``, like supervised tasks), ``save_to_disk`` directories, Hugging Face datasets and
``datasets.Dataset`` objects, and :func:`load_corpus`, which resolves any of them or a built-in name to a
:class:`Corpus`."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..storage import cache_dir
from .corpora import BUILTIN_CORPORA, Corpus, _load_builtin

__all__ = ["load_corpus"]



# ----- user data
def _read_text_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 text (bad byte at offset {exc.start}); convert it, e.g. iconv -f latin1 -t utf-8"
        ) from exc


def _field(record: Any, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with a {text_field!r} field, got {type(record).__name__}")
    if text_field not in record:
        keys = ", ".join(map(str, list(record)[:8])) or "none"
        raise DataError(f"{where}: no field {text_field!r} (fields: {keys}); pass text_field=<name> / --text-field")
    value = record[text_field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {text_field!r} is {type(value).__name__}, not text")
    return value


_BUILDERS = {".txt": "text", ".md": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".csv": "csv",
             ".parquet": "parquet"}


def _load_file(path: Path, text_field: str) -> list[str]:
    """The documents of a local file, read through ``datasets.load_dataset`` (text / json / csv / parquet builders),
    with one precise :class:`DataError` line per problem (empty file, not UTF-8, invalid JSON line, missing or
    non-text field with its line / row).

    ``.txt`` / ``.md``: the ``text`` builder reads the whole file (``sample_by="document"``, BOM-tolerant) and
    documents are the pieces between blank lines (a line of only whitespace counts as blank; the builder's own
    ``paragraph`` mode splits on ``"\\n\\n"`` only, which would change the documents -- and the splits -- of
    existing corpora). A ``.json`` file that the json builder cannot read as a table (a list of strings, an
    object ``{"documents": [...]}``) is read with the json module.
    """
    suffix = path.suffix.lower()
    builder = _BUILDERS.get(suffix)
    if builder is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .txt, .jsonl, .json, .csv or .parquet")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty; give a file with text in it")
    if builder != "parquet":
        _read_text_file(path)  # a precise "not UTF-8 (bad byte at offset N)" before any parser sees the bytes
    import datasets

    from .tasks import _jsonl_line_numbers, _quiet_datasets

    kw: dict[str, Any] = {}
    if builder == "text":
        kw = {"sample_by": "document", "encoding": "utf-8-sig"}
    elif builder == "csv":
        kw = {"na_filter": False, "encoding": "utf-8-sig"}  # an empty cell is "", the text "NA" stays text
    try:
        with _quiet_datasets(False):
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=str(cache_dir("datasets")), **kw)
            if builder == "csv" and text_field in ds.column_names and ds.features[text_field].dtype != "string":
                # pandas guessed numbers: read every column as text instead (keeps "007" as written)
                feats = datasets.Features({c: datasets.Value("string") for c in ds.column_names})
                ds = datasets.load_dataset(builder, data_files=str(path), split="train",
                                           cache_dir=str(cache_dir("datasets")), features=feats, **kw)
    except Exception as exc:  # datasets/pyarrow raise many types; find the precise cause where we can
        if builder == "json":
            return _load_json_by_hand(path, suffix, text_field)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(f"{path} cannot be read as {builder} ({first})") from None
    if builder == "text":
        text = "".join(ds["text"]).replace("\r\n", "\n")
        return [d.strip() for d in re.split(r"\n\s*\n", text)]  # documents are separated by blank lines
    what = "column" if builder in ("csv", "parquet") else "field"
    if text_field not in ds.column_names:
        cols = ", ".join(ds.column_names) or "none"
        where = f"{path} line {_jsonl_line_numbers(path)[0]}" if suffix == ".jsonl" else str(path)
        raise DataError(f"{where}: no {what} {text_field!r} ({what}s: {cols}); pass text_field=<name> / --text-field")
    col = ds[text_field]
    for i, v in enumerate(col):
        if v is not None and not isinstance(v, str):
            raise DataError(f"{_where(path, suffix, i)}: {what} {text_field!r} is {type(v).__name__}, not text")
        if v is None and suffix == ".jsonl":  # datasets fills a field a record lacks with None: say which line
            line = _jsonl_line_numbers(path)[i]
            rec = json.loads(path.read_text("utf-8-sig").splitlines()[line - 1])
            if text_field not in rec:
                _field(rec, text_field, f"{path} line {line}")
    return [v or "" for v in col]


def _where(path: Path, suffix: str, i: int) -> str:
    """Record ``i`` (0-based) of a file, as a user finds it: a line of JSON lines, a row of CSV (header = row 1)."""
    if suffix == ".jsonl":
        from .tasks import _jsonl_line_numbers

        return f"{path} line {_jsonl_line_numbers(path)[i]}"
    if suffix == ".csv":
        return f"{path} row {i + 2}"
    return f"{path} record {i + 1}"


def _load_json_by_hand(path: Path, suffix: str, text_field: str) -> list[str]:
    """JSON the json builder cannot load as a table: invalid lines (named), records of clashing types (the bad one
    named), a list of strings or ``{"documents": [...]}``. Parsed with the json module, never executed."""
    text = _read_text_file(path)
    if suffix == ".jsonl":
        docs = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path} line {i} is not valid JSON ({exc.msg}); one JSON object per line") from None
            docs.append(_field(rec, text_field, f"{path} line {i}"))
        return docs
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise DataError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}); give a list of objects or strings") from None
    if isinstance(obj, dict) and isinstance(obj.get("documents"), list):
        obj = obj["documents"]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON list of objects (or strings), got {type(obj).__name__}")
    return [o if isinstance(o, str) else _field(o, text_field, f"{path} item {i}") for i, o in enumerate(obj)]


def _load_hf_dataset(name: str, text_field: str) -> list[str]:
    """A Hugging Face ``datasets`` name, ``NAME`` or ``NAME:SPLIT`` (default split ``train``); needs the hub."""
    ds_name, _, ds_split = name.partition(":")
    from ..models import hub_unreachable_reason

    offline = hub_unreachable_reason()
    if offline and not os.environ.get("HF_DATASETS_OFFLINE"):
        raise DataError(
            f"{name!r} is not a built-in corpus or a local file, and the Hugging Face hub is unavailable ({offline}) "
            f"to load it as a dataset. Built-in corpora: {', '.join(BUILTIN_CORPORA)}"
        )
    try:
        import datasets

        ds = datasets.load_dataset(ds_name, split=ds_split or "train")
    except Exception as exc:  # datasets raises many error types (ConnectionError, FileNotFoundError, HfHubHTTPError)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        known = ", ".join(BUILTIN_CORPORA)
        raise DataError(
            f"{name!r} is not a built-in corpus or a local file, and loading it as a Hugging Face dataset failed "
            f"({first}); the hub needs network access. Built-in corpora: {known}"
        ) from exc
    if text_field not in ds.column_names:
        raise DataError(f"dataset {name!r} has no column {text_field!r} (columns: {', '.join(ds.column_names)})")
    return [t or "" for t in ds[text_field]]


def _as_hf_dataset(obj: Any) -> Any:
    """``obj`` if it is a ``datasets.Dataset`` / ``DatasetDict`` (checked without importing ``datasets`` unless it is
    already loaded: an object of its type can only exist if it is), else ``None``."""
    import sys

    mod = sys.modules.get("datasets")
    if mod is not None and isinstance(obj, (mod.Dataset, mod.DatasetDict)):
        return obj
    return None


def _corpus_from_dataset(ds: Any, text_field: str) -> Corpus:
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"got a DatasetDict with splits {', '.join(ds)}; pass one split, e.g. ds['train']")
    if text_field not in ds.column_names:
        raise DataError(f"the dataset has no column {text_field!r} (columns: {', '.join(ds.column_names)}); pass text_field=<name>")
    col = ds[text_field]
    bad = next((v for v in col if v is not None and not isinstance(v, str)), None)
    if bad is not None:
        raise DataError(f"dataset column {text_field!r} holds {type(bad).__name__}, not text")
    docs = [v.strip() for v in col if v and v.strip()]
    if not docs:
        raise DataError(f"the dataset's column {text_field!r} holds no text")
    info = getattr(ds, "info", None)
    name = (getattr(info, "dataset_name", None) or getattr(ds, "split", None) and f"dataset-{ds.split}" or "dataset")
    return Corpus(str(name), docs, source=f"datasets.Dataset ({ds.num_rows} rows, fingerprint {getattr(ds, '_fingerprint', '?')})",
                  license=str(getattr(info, "license", "") or ""))


def load_corpus(name_or_path: Any, *, text_field: str = "text") -> Corpus:
    """Load a corpus: a built-in name, a local file (.txt/.jsonl/.json/.csv/.parquet), a ``datasets`` name, or an
    in-memory ``datasets.Dataset`` (its ``text_field`` column, one document per row).

    ``.txt`` files hold documents separated by blank lines; the structured formats take the text from
    ``text_field``. Problems (missing file, empty, not UTF-8, missing field) raise :class:`DataError`.
    """
    if isinstance(name_or_path, Corpus):
        return name_or_path
    ds = _as_hf_dataset(name_or_path)
    if ds is not None:
        return _corpus_from_dataset(ds, text_field)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise DataError(
            f"cannot use a {type(name_or_path).__name__} as a corpus; give a built-in name, a file path, a datasets "
            "name, a datasets.Dataset or a kappatune.data.Corpus"
        )
    name = str(name_or_path)
    if name in BUILTIN_CORPORA:
        return _load_builtin(BUILTIN_CORPORA[name])
    path = Path(name).expanduser()
    if path.is_dir():
        import datasets

        try:
            saved = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(f"{path} is a directory but not a datasets save_to_disk directory ({exc}); "
                            "give a .txt, .jsonl, .csv or .parquet file") from None
        if isinstance(saved, datasets.DatasetDict):
            if "train" not in saved:
                raise DataError(f"{path} holds splits {', '.join(saved)} but no 'train' split; save one split")
            saved = saved["train"]  # raw text is split by kappatune itself (split_documents)
        corpus = _corpus_from_dataset(saved, text_field)
        return Corpus(path.name, corpus.documents, source=str(path), license=corpus.license)
    if path.is_file():
        docs = [d.strip() for d in _load_file(path, text_field) if d and d.strip()]
        if not docs:
            raise DataError(f"{path} holds no text (every document is empty); give a file with text in it")
        return Corpus(path.stem, docs, source=str(path))
    if path.suffix.lower() in (".txt", ".jsonl", ".json", ".csv", ".parquet", ".md") or name.startswith((".", "/", "~")):
        raise DataError(f"data file {path} does not exist (built-in corpora: {', '.join(BUILTIN_CORPORA)})")
    import difflib

    close = difflib.get_close_matches(name.lower(), list(BUILTIN_CORPORA), n=1, cutoff=0.75)
    if close and "/" not in name:  # a typo of a built-in name: say so instead of asking the hub
        raise DataError(f"unknown corpus {name!r}; did you mean {close[0]!r}? (built-in: {', '.join(BUILTIN_CORPORA)})")
    return Corpus(name, [d.strip() for d in _load_hf_dataset(name, text_field) if d and d.strip()], source=f"datasets:{name}")
