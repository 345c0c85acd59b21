"""Data pipeline: corpora from files, seeded document splits, EOS-joined blocks, token cache, bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kappatune import data
from kappatune.data import ByteTokenizer, build_blocks, load_corpus, make_corpus, split_documents
from kappatune.errors import DataError
from kappatune.models import build_tiny_llama

TOK = ByteTokenizer()


def _docs(n: int, length: int = 40) -> list[str]:
    # each document carries a unique marker so its bytes can be traced into blocks; random letters so no two
    # blocks are alike
    rng = np.random.default_rng(n * 1000 + length)
    return [f"<doc{i:03d}>" + "".join(rng.choice(list("abcdefghij "), size=length)) for i in range(n)]


# ------------------------------------------------------------------------------------------ tokenizer
def test_byte_tokenizer_round_trip_and_ids_fit_tiny_models():
    text = "Héllo, wörld! \n\t ✓"
    ids = TOK.encode(text)
    assert TOK.decode(ids) == text
    assert min(ids) >= 3 and max(ids) < 259 < TOK.vocab_size
    cfg = build_tiny_llama().config
    assert (TOK.pad_token_id, TOK.bos_token_id, TOK.eos_token_id) == (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id)
    assert cfg.vocab_size == TOK.vocab_size
    assert TOK.encode("ab", add_special_tokens=True) == [1, ord("a") + 3, ord("b") + 3]


def test_get_tokenizer_for_tiny_models():
    assert isinstance(data.get_tokenizer("tiny-llama"), ByteTokenizer)
    assert isinstance(data.get_tokenizer(build_tiny_llama()), ByteTokenizer)
    tok = ByteTokenizer()
    assert data.get_tokenizer(tok) is tok


# ------------------------------------------------------------------------------------------ splits
@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 300), frac=st.floats(0.01, 0.99), seed=st.integers(0, 2**31 - 1))
def test_split_is_a_partition_and_deterministic(n, frac, seed):
    ev = split_documents(n, "eval", seed=seed, eval_fraction=frac)
    tr = split_documents(n, "train", seed=seed, eval_fraction=frac)
    assert not set(ev) & set(tr)
    assert sorted(set(ev) | set(tr)) == list(range(n))
    assert len(ev) == min(n - 1, max(1, round(frac * n)))
    assert np.array_equal(ev, split_documents(n, "eval", seed=seed, eval_fraction=frac))
    assert list(ev) == sorted(ev)


def test_split_depends_on_seed():
    a = split_documents(200, "eval", seed=0)
    b = split_documents(200, "eval", seed=1)
    assert not np.array_equal(a, b)
    assert split_documents(5, "all").tolist() == [0, 1, 2, 3, 4]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(3, 300), frac=st.floats(0.01, 0.45), vfrac=st.floats(0.01, 0.45), seed=st.integers(0, 2**31 - 1))
def test_three_way_split_is_a_partition_and_keeps_the_test_split(n, frac, vfrac, seed):
    parts = {s: split_documents(n, s, seed=seed, eval_fraction=frac, validation_fraction=vfrac)
             for s in ("train", "validation", "test")}
    assert all(len(v) for v in parts.values())  # every split non-empty
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(n))  # disjoint and complete
    assert np.array_equal(parts["test"], split_documents(n, "eval", seed=seed, eval_fraction=frac, validation_fraction=vfrac))
    if round(frac * n) <= n - 2:  # the test split is the two-way split's eval split: results stay comparable
        assert np.array_equal(parts["test"], split_documents(n, "eval", seed=seed, eval_fraction=frac))
        # and validation is carved out of the old train split only
        assert set(parts["validation"]) <= set(split_documents(n, "train", seed=seed, eval_fraction=frac))
    assert np.array_equal(parts["validation"], split_documents(n, "validation", seed=seed, eval_fraction=frac,
                                                               validation_fraction=vfrac))


def test_three_way_split_needs_three_documents_and_a_validation_fraction():
    with pytest.raises(DataError, match="at least 3 documents"):
        split_documents(2, "train", validation_fraction=0.1)
    with pytest.raises(DataError, match="no validation split"):
        split_documents(10, "validation")


@pytest.mark.parametrize("bad", [dict(split="dev"), dict(eval_fraction=0.0), dict(eval_fraction=1.0),
                                 dict(validation_fraction=0.9), dict(validation_fraction=-0.1)])
def test_split_rejects_bad_settings(bad):
    kwargs = dict(split="eval", seed=0, eval_fraction=0.1) | bad
    with pytest.raises(DataError):
        split_documents(10, kwargs.pop("split"), **kwargs)


def test_split_needs_two_documents():
    with pytest.raises(DataError, match="at least 2 documents"):
        split_documents(1, "eval")


# ------------------------------------------------------------------------------------------ blocks
def test_blocks_join_documents_with_eos_and_drop_the_tail():
    docs = ["aaaa", "bbbbbb", "cc"]
    corpus = make_corpus("t", docs)
    blocks = build_blocks(corpus, TOK, 4, split="all")
    stream = TOK.encode("aaaa") + [2] + TOK.encode("bbbbbb") + [2] + TOK.encode("cc")  # 14 tokens
    assert blocks.dtype == torch.long
    assert blocks.shape == (3, 4)
    assert blocks.reshape(-1).tolist() == stream[:12]


def test_eval_blocks_never_contain_train_documents():
    docs = _docs(60)
    corpus = make_corpus("t", docs)
    ev_idx = set(split_documents(len(docs), "eval", seed=3).tolist())
    ev_text = "".join(TOK.decode(b) for b in build_blocks(corpus, TOK, 16, split="eval", seed=3))
    tr_text = "".join(TOK.decode(b) for b in build_blocks(corpus, TOK, 16, split="train", seed=3))
    for i in range(len(docs)):
        marker = f"<doc{i:03d}>"
        if i in ev_idx:
            assert marker not in tr_text
        else:
            assert marker not in ev_text
    assert any(f"<doc{i:03d}>" in ev_text for i in ev_idx)


def test_max_blocks_is_an_evenly_spread_subset():
    corpus = make_corpus("t", _docs(40, 200))
    full = build_blocks(corpus, TOK, 32, split="train")
    sub = build_blocks(corpus, TOK, 32, split="train", max_blocks=5)
    assert sub.shape == (5, 32)
    rows = [next(i for i in range(len(full)) if torch.equal(full[i], s)) for s in sub]
    assert rows == sorted(rows) and rows[0] == 0 and rows[-1] >= len(full) // 2
    assert torch.equal(build_blocks(corpus, TOK, 32, split="train", max_blocks=10 ** 6), full)


def test_blocks_are_deterministic_and_cached(tmp_path):
    corpus = make_corpus("t", _docs(30))
    a = build_blocks(corpus, TOK, 16, split="eval", seed=5)
    files = list((Path(data.cache_dir("tokens"))).glob("*.safetensors"))
    assert len(files) == 1
    b = build_blocks(corpus, TOK, 16, split="eval", seed=5)
    assert torch.equal(a, b)
    # a changed corpus gets a different cache entry, never stale tokens
    build_blocks(make_corpus("t", _docs(31)), TOK, 16, split="eval", seed=5)
    assert len(list(Path(data.cache_dir("tokens")).glob("*.safetensors"))) == 2


def test_corrupt_token_cache_is_rebuilt():
    corpus = make_corpus("t", _docs(30))
    a = build_blocks(corpus, TOK, 16, split="train")
    (path,) = Path(data.cache_dir("tokens")).glob("*.safetensors")
    path.write_bytes(b"garbage")
    assert torch.equal(build_blocks(corpus, TOK, 16, split="train"), a)


def test_corpus_shorter_than_one_block_is_a_clear_error():
    with pytest.raises(DataError, match="fewer than one block"):
        build_blocks(make_corpus("short", ["tiny", "text"]), TOK, 64, split="all")


@pytest.mark.parametrize("bad", [0, 1, 2.5])
def test_bad_block_size(bad):
    with pytest.raises(DataError, match="block_size"):
        build_blocks(make_corpus("t", _docs(5)), TOK, bad)


# ------------------------------------------------------------------------------------------ files
def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("first doc\nline two\n\n\nsecond doc\n   \nthird\n", encoding="utf-8")
    c = load_corpus(p)
    assert c.documents == ["first doc\nline two", "second doc", "third"]
    assert c.name == "notes" and c.source == str(p)


def test_jsonl_csv_json_parquet_with_text_field(tmp_path):
    rows = [{"body": f"document number {i}", "id": i} for i in range(5)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "body"])
        w.writeheader()
        w.writerows(rows)
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": [r["body"] for r in rows], "id": [r["id"] for r in rows]}), tmp_path / "d.parquet")
    expected = [r["body"] for r in rows]
    for ext in ("jsonl", "csv", "json", "parquet"):
        assert load_corpus(tmp_path / f"d.{ext}", text_field="body").documents == expected, ext


@pytest.mark.parametrize("ext", ["jsonl", "csv", "parquet"])
def test_missing_text_field_names_the_file_and_the_fields(tmp_path, ext):
    p = tmp_path / f"d.{ext}"
    if ext == "jsonl":
        p.write_text('{"body": "x"}\n', encoding="utf-8")
    elif ext == "csv":
        p.write_text("body\nx\n", encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"body": ["x"]}), p)
    with pytest.raises(DataError) as err:
        load_corpus(p)
    msg = str(err.value)
    assert str(p) in msg and "'text'" in msg and "body" in msg


def test_user_files_go_through_datasets_with_precise_errors(tmp_path, monkeypatch):
    """Raw-text files are read by datasets' builders (a save_to_disk directory too); the one-line errors still name
    the line / row and field."""
    import datasets

    calls = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    (tmp_path / "a.txt").write_text("one doc\nsame doc\n  \nsecond doc\n\n\nthird\n", encoding="utf-8")
    assert load_corpus(tmp_path / "a.txt").documents == ["one doc\nsame doc", "second doc", "third"]
    (tmp_path / "n.csv").write_text("text,id\n007,1\nNA,2\n,3\n", encoding="utf-8")  # numbers and NA stay text
    assert load_corpus(tmp_path / "n.csv").documents == ["007", "NA"]
    assert calls[:2] == ["text", "csv"]
    # a record without the field (datasets fills it with None): its line is named
    (tmp_path / "m.jsonl").write_text('{"text": "a"}\n\n{"body": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"m\.jsonl line 3: no field 'text' \(fields: body\)"):
        load_corpus(tmp_path / "m.jsonl")
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n{"text": 5}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"t\.jsonl line 2: field 'text' is int, not text"):
        load_corpus(tmp_path / "t.jsonl")
    (tmp_path / "i.csv").write_text("text\n1\n2\n", encoding="utf-8")
    assert load_corpus(tmp_path / "i.csv").documents == ["1", "2"]
    (tmp_path / "s.json").write_text('["x y", "z"]', encoding="utf-8")  # a list of strings (read by hand)
    assert load_corpus(tmp_path / "s.json").documents == ["x y", "z"]
    datasets.Dataset.from_dict({"text": ["d1 words", "d2 words"], "n": [1, 2]}).save_to_disk(str(tmp_path / "saved"))
    assert load_corpus(tmp_path / "saved").documents == ["d1 words", "d2 words"]
    with pytest.raises(DataError, match="not a datasets save_to_disk directory"):
        load_corpus(tmp_path)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_bytes(b"")
    with pytest.raises(DataError, match="empty") as err:
        load_corpus(p)
    assert str(p) in str(err.value)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n   \n", encoding="utf-8")
    with pytest.raises(DataError, match="no text"):
        load_corpus(blank)


def test_non_utf8_file(tmp_path):
    p = tmp_path / "latin.txt"
    p.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8") as err:
        load_corpus(p)
    assert str(p) in str(err.value) and "iconv" in str(err.value)


def test_short_file_is_a_clear_error(tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("just a few words\n\nand some more\n", encoding="utf-8")
    with pytest.raises(DataError, match="fewer than one block") as err:
        build_blocks(p, TOK, 128, split="all")
    assert str(p) in str(err.value)


def test_invalid_jsonl_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2"):
        load_corpus(p)


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(tmp_path / "nope.txt")
    p = tmp_path / "d.xlsx"
    p.write_bytes(b"x")
    with pytest.raises(DataError, match="unsupported"):
        load_corpus(p)


def test_typo_of_a_builtin_name_suggests_it():
    with pytest.raises(DataError, match="did you mean 'control'"):
        load_corpus("contrl")


def test_hub_dataset_name_offline_is_a_clear_error(monkeypatch):
    import datasets
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="not a built-in corpus") as err:
        load_corpus("someone/some-dataset")
    assert "control" in str(err.value)


# ------------------------------------------------------------------------------------------ built-ins
def test_builtin_registry_has_a_control_and_three_tasks():
    kinds = [s.kind for s in data.BUILTIN_CORPORA.values()]
    assert kinds.count("control") == 1 and kinds.count("task") >= 3
    assert "control" in data.BUILTIN_CORPORA
    for spec in data.BUILTIN_CORPORA.values():
        assert spec.source and spec.license and spec.description
    rows = data.list_corpora()
    assert {r["name"] for r in rows} == set(data.BUILTIN_CORPORA)


def test_python_docs_corpus_needs_no_download():
    c = load_corpus("python-docs")
    assert len(c.documents) > 50 and c.num_chars > 200_000
    assert any("lambda" in d for d in c.documents)
    assert [r for r in data.list_corpora() if r["name"] == "python-docs"][0]["cached"]
    blocks = build_blocks("python-docs", TOK, 128, split="eval", max_blocks=8, progress=False)
    assert blocks.shape == (8, 128)


def test_missing_apt_names_the_debian_package(monkeypatch):
    from kappatune.data import sources

    monkeypatch.setattr(sources.shutil, "which", lambda name: None)  # the binding _debian_root looks up
    with pytest.raises(DataError, match="r-cran-janeaustenr") as err:
        data._debian_root("r-cran-janeaustenr", "usr/share/kappatune-test/does-not-exist")
    assert "apt-get is not available" in str(err.value)  # the patch took effect (not a real apt-get failure)
    assert "apt-get install r-cran-janeaustenr" in str(err.value)


def test_unknown_debian_package_is_a_clear_error():
    if shutil.which("apt-get") is None:
        pytest.skip("no apt-get here")
    with pytest.raises(DataError, match="kappatune-no-such-package"):
        data._debian_root("kappatune-no-such-package", "usr/share/kappatune-test/x")
    assert not any(data.cache_dir("debian").iterdir())  # nothing half-unpacked left behind


def test_byte_tokenizer_blocks_match_encode():
    corpus = make_corpus("t", ["héllo wörld", "second"])
    blocks = build_blocks(corpus, TOK, 4, split="all")
    stream = TOK.encode("héllo wörld") + [2] + TOK.encode("second")
    assert blocks.reshape(-1).tolist() == stream[: len(stream) // 4 * 4]


def test_r_serialization_reader_on_a_hand_made_string_vector():
    import struct

    def xdr_str(s: str) -> bytes:
        b = s.encode()
        return struct.pack(">ii", 0x00040009, len(b)) + b

    payload = b"X\n" + struct.pack(">iii", 2, 0x040000, 0x020300) + struct.pack(">ii", 16, 2) + xdr_str("Emma") + xdr_str("Woodhouse")
    assert data._RReader(payload).read() == ["Emma", "Woodhouse"]
