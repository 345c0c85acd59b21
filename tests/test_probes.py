"""The control-suite probes (kappatune.data.probes; issue 13): instruct-fidelity and next-sentence.

Fast tests use a generated stand-in for the Austen chapters (the parse itself is covered on a small real sample,
tests/data/austen_sample.txt) and the random tiny-llama; the real build is `slow`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from kappatune.data import probes as P
from kappatune.errors import ConfigError, DataError
from run_helpers import cli_error, make_corpora, tiny_run_config

SAMPLE = Path(__file__).resolve().parent / "data" / "austen_sample.txt"
VOCAB = ("the a of and to her his was had she he not be that it with for as but at by on all which so very "
         "Emma Harriet Elton Anne Wentworth Darcy Bingley Catherine").split()
# 2,000 generated long words, so that each is used a handful of times (as the dictionary words of Austen are)
_SYL = "ac qua in tance at ten tion un der stand ing cir cum res o lu par tic u lar re col lec con sid er".split()
_R = random.Random(1)
LONG = sorted({"".join(_R.choice(_SYL) for _ in range(4)) for _ in range(4000)})[:2000]


def _fake_chapters(n: int = 270) -> list[str]:
    """``n`` chapters of generated English-like paragraphs (sentences of 40-120 characters; some dialogue)."""
    rng = random.Random(0)
    chapters = []
    for c in range(n):
        paras = []
        for p in range(rng.randint(10, 14)):
            sents = []
            for _ in range(rng.randint(2, 6)):
                words = [rng.choice(VOCAB if rng.random() < 0.8 else LONG) for _ in range(rng.randint(7, 16))]
                sents.append(" ".join(words).capitalize() + rng.choice(".!?."))
            para = " ".join(sents)
            paras.append(f'"{para}"' if p % 3 == 2 else para)
        chapters.append("\n\n".join(paras))
    return chapters


@pytest.fixture
def fake_austen(monkeypatch):
    chapters = _fake_chapters()
    monkeypatch.setattr(P, "_austen_chapters", lambda probe: chapters)
    return chapters


def test_sentences_and_passages_of_a_real_austen_sample():
    text = SAMPLE.read_text("utf-8")
    first = text.split("\n\n")[0]
    sents = P.split_sentences(first)
    assert len(sents) == 5 and " ".join(sents) == first  # "Mr. Elton" does not end a sentence
    assert all(s.endswith(".") for s in sents)
    quoted = P.split_sentences(text.split("\n\n")[1])
    assert len(quoted) == 2 and quoted[0].startswith('"You have given') and quoted[1].endswith('nature."')
    cands, pool = P._candidates(text)
    assert cands, "the sample has passages"
    for ctx, target in cands:
        assert 100 <= len(ctx) <= 360 and 40 <= len(target) <= 160
        para = next(p for p in text.split("\n\n") if target in p)
        assert f"{ctx} {target}" in para  # the true next sentence follows the passage in its paragraph
    answers = [t for _, t in cands]
    assert not any(a in ctx for a in answers for ctx, _ in cands)  # no passage holds an earlier answer
    assert all(40 <= len(s) <= 160 for s in pool)


def test_partition_is_disjoint_and_skips_the_control_eval_chapters():
    from kappatune.data import split_documents

    part = P.austen_partition(270)
    assert part["control-eval"] == split_documents(270, "eval", seed=0, eval_fraction=0.1).tolist()
    used = [i for k, v in part.items() for i in v]
    assert sorted(used) == list(range(270))  # a partition: every chapter once
    assert part == P.austen_partition(270)  # deterministic


def test_next_sentence_splits_disjoint_balanced_cached(fake_austen):
    from kappatune.data import ByteTokenizer, format_example, load_task

    splits = P.next_sentence_splits()
    assert {k: len(v) for k, v in splits.items()} == P.NEXT_SENTENCE_SIZES
    part = P.austen_partition(len(fake_austen))
    for split, rows in splits.items():
        sentences = {s for i in part[split] for para in fake_austen[i].split("\n\n") for s in P.split_sentences(para)}
        for e in rows:
            assert len(e["choices"]) == 4 and len(set(e["choices"])) == 4
            assert e["choices"][int(e["label"])] == e["response"]
            assert e["chapter"] in part[split]
            assert f"{e['prompt']} {e['response']}" in fake_austen[e["chapter"]]
            assert all(c in sentences for c in e["choices"])  # distractors from the same split's chapters
        counts = [sum(e["label"] == str(k) for e in rows) for k in range(4)]
        assert max(counts) - min(counts) <= 1  # the gold slot is balanced
    prompts = {s: {e["prompt"] for e in rows} for s, rows in splits.items()}
    assert not prompts["test"] & prompts["validation"] and not prompts["test"] & prompts["train"]
    # cached with a checksum: a second call reads the file; a corrupt file is rebuilt to the same content
    path = next((Path(P.cache_dir("probes"))).glob("next-sentence-v*.json"))
    assert P.next_sentence_splits() == splits
    path.write_text(path.read_text()[:-50])
    assert P.next_sentence_splits() == splits
    # a built-in sft task: the prompt renders as plain text followed by each candidate
    task = load_task("next-sentence")
    e = task["test"][0]
    p, r = format_example(ByteTokenizer(), e, chat_template=False, response=e["choices"][1])
    assert p == e["prompt"] and r == " " + e["choices"][1]


def _tiny():
    """tiny-llama with sharpened logits (final norm x 30): a random model's near-uniform next-token distribution
    has no preferred answers to lose; a peaked one behaves like a trained model's greedy path."""
    from kappatune.data import ByteTokenizer
    from kappatune.models import build_tiny_llama

    model = build_tiny_llama(seed=0)
    with torch.no_grad():
        model.model.norm.weight.mul_(30.0)
    return model, ByteTokenizer()


def test_fidelity_answers_are_the_base_models_greedy_output_cached_per_weights(fake_austen, monkeypatch, one_thread):
    import kappatune.evaluation as ev
    from kappatune.evaluation import evaluate_sft

    model, tok = _tiny()
    task = P.fidelity_task(model, tok, max_new_tokens=8)
    exs = task["test"]
    assert len(exs) == P.FIDELITY_SIZE == 56
    assert [e["prompt"] for e in exs] == [x["prompt"] for x in P.fidelity_instructions()]
    # the response is the model's own greedy continuation of the prompt (trimmed to a sentence end at most)
    e = exs[3]
    ids = torch.tensor([tok.encode(e["prompt"])])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         pad_token_id=0, eos_token_id=2)
    greedy = tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    assert greedy.startswith(e["response"]) or greedy.rstrip() == e["response"]
    # cached: the same weights never generate again; other weights do
    calls = []
    real = ev.exact_match
    monkeypatch.setattr(ev, "exact_match", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert P.fidelity_task(model, tok, max_new_tokens=8)["test"] == exs and not calls
    perturbed, _ = _tiny()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in perturbed.parameters():
            p.add_(0.2 * p.std() * torch.randn(p.shape, generator=g))
    P.fidelity_task(perturbed, tok, max_new_tokens=8)
    assert calls == [1]
    # the probe's metric: the base scores its own answers identically every time (change exactly 0); the perturbed
    # model finds them less likely (a positive NLL change)
    some = exs[::4]  # one of each four (every kind of instruction): the property, at a quarter of the cost
    base1 = evaluate_sft(model, tok, some, ["ppl"], progress=False)["ppl"]
    base2 = evaluate_sft(model, tok, some, ["ppl"], progress=False)["ppl"]
    moved = evaluate_sft(perturbed, tok, some, ["ppl"], progress=False)["ppl"]
    assert base1 == base2
    assert moved > base1


def test_fidelity_cache_corruption_regenerates(fake_austen, one_thread):
    model, tok = _tiny()
    exs = P.fidelity_task(model, tok, max_new_tokens=4)["test"]
    path = next(Path(P.cache_dir("probes")).glob("instruct-fidelity-*.json"))
    obj = json.loads(path.read_text())
    obj["examples"][0]["response"] = "tampered"
    path.write_text(json.dumps(obj))
    assert P.fidelity_task(model, tok, max_new_tokens=4)["test"] == exs


def test_yaml_shorthand_gives_probe_defaults_and_refuses_fidelity_as_a_task(tmp_path):
    from kappatune.config import config_from_dict as load_config

    corpora = make_corpora(tmp_path)
    cfg = tiny_run_config(corpora, tmp_path / "out", name="p", training={"steps": 1}, eval={}, output={})
    cfg["control"] = ["instruct-fidelity", {"corpus": "next-sentence", "max_examples": 16}, "control"]
    c = load_config(cfg)
    fid, ns, ctrl = c.control
    assert (fid.type, fid.metrics, fid.chat_template) == ("sft", ["ppl"], True)
    assert (ns.type, ns.metrics, ns.chat_template, ns.max_examples) == ("sft", ["accuracy"], False, 16)
    assert ctrl.type == "lm"
    bad = dict(cfg, tasks=[{"corpus": "instruct-fidelity"}], control="control")
    with pytest.raises(ConfigError, match="control probe"):
        load_config(bad)
    with pytest.raises(ConfigError, match="max_examples"):
        load_config(dict(cfg, control=[{"corpus": "next-sentence", "max_examples": 0}]))


def test_missing_source_is_one_line_naming_probe_and_package(monkeypatch, tmp_path, capsys):
    import kappatune.data.corpora as C

    monkeypatch.setattr(C, "_debian_root", lambda package, probe: tmp_path)  # unpacked, but its data file is gone
    with pytest.raises(DataError) as exc:
        P.next_sentence_splits()
    msg = str(exc.value)
    assert "'next-sentence'" in msg and "r-cran-janeaustenr" in msg and "\n" not in msg
    err = cli_error(capsys, "data", "next-sentence")
    assert "next-sentence" in err and "r-cran-janeaustenr" in err
    err = cli_error(capsys, "data", "instruct-fidelity")
    assert "base model" in err


def test_run_with_the_probe_suite_reports_each_change(fake_austen, tmp_path, one_thread):
    from kappatune.harness import run

    corpora = make_corpora(tmp_path)
    cfg = tiny_run_config(corpora, tmp_path / "out", name="probes",
                          training={"steps": 2, "batch_size": 2, "seq_len": 32, "lr": 3e-3, "warmup_steps": 1},
                          eval={"max_blocks": 2, "batch_size": 8}, output={"plots": False, "spectrum_plot": False})
    cfg["tasks"] = cfg["tasks"][:1]
    cfg["control"] = ["instruct-fidelity", {"corpus": "next-sentence", "max_examples": 8}, {"corpus": corpora["ctrl"], "name": "ctrl"}]
    r = run(cfg)
    suite = r["metrics"]["control_suite"]
    assert set(suite) == {"instruct-fidelity", "next-sentence", "ctrl"}
    assert suite["instruct-fidelity"]["ppl"]["unit"] == "%"
    assert set(suite["next-sentence"]) >= {"accuracy", "accuracy_norm"}
    assert r["base"]["probes"]["next-sentence"]["accuracy"] in {k / 8 for k in range(9)}


@pytest.mark.slow
def test_real_probes_build_from_austen_disjoint_from_control_blocks_and_labelled_tasks(monkeypatch):
    """The real build from r-cran-janeaustenr (shared cache; the package is fetched once)."""
    import os

    from kappatune.data import load_corpus, split_documents
    from kappatune.data.labelled import TASK_ORDER, _cache_path, LABELLED_TASKS

    monkeypatch.delenv("KAPPATUNE_CACHE")
    if os.environ.get("XDG_CACHE_HOME"):
        monkeypatch.delenv("XDG_CACHE_HOME")
    docs = load_corpus("control").documents
    splits = P.next_sentence_splits()
    assert {k: len(v) for k, v in splits.items()} == P.NEXT_SENTENCE_SIZES
    control_eval = "\n\n".join(docs[i] for i in split_documents(len(docs), "eval", seed=0, eval_fraction=0.1))
    texts = [t for rows in splits.values() for e in rows for t in [e["prompt"], *e["choices"]]]
    fid = [x["prompt"].split("\n\n", 1)[-1] for x in P.fidelity_instructions() if x["kind"] in ("continue", "summarise")]
    assert not any(t in control_eval for t in texts + fid)  # nothing from the control perplexity chapters
    for name in TASK_ORDER:  # the labelled tasks (when built) share no input with the probes
        path = _cache_path(LABELLED_TASKS[name])
        if path.is_file():
            import json as _json

            inputs = {e["input"] for rows in _json.loads(path.read_text())["splits"].values() for e in rows}
            assert not inputs & set(texts + fid), name
