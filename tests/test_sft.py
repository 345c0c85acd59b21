"""Supervised (sft) tasks: loading through datasets with precise errors, splits, response-only labels, collation,
accuracy / exact match / response perplexity, the harness's accuracy matrices and control suite, SIGKILL resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kappatune.cli import main as cli_main
from kappatune.config import config_fingerprint, config_from_dict
from kappatune.data import ByteTokenizer, load_examples, load_task, split_examples, tokenize_sft
from kappatune.data.tasks import BUILTIN_TASKS, collate_sft, encode_example, register_builtin_task
from kappatune.errors import ConfigError, DataError
from kappatune.evaluation import choice_accuracy, evaluate_sft, exact_match, normalize_answer, response_nll
from kappatune.harness import run
from kappatune.harness.bench import paired_against
from kappatune.harness.metrics import compute_score_metrics
from kappatune.models import build_tiny_llama
from kappatune.training import sft_loss_sum
from run_helpers import make_corpora, tiny_sft_config, write_sft

REPO = Path(__file__).resolve().parents[1]
TOK = ByteTokenizer()


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _write(path: Path, lines: list) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return str(path)


MC = [{"prompt": f"Q{i}: warm?", "response": "yes" if i % 3 else "no", "choices": ["yes", "no"], "id": i} for i in range(12)]


# ------------------------------------------------------------------------------------------------------- loading
def test_every_source_gives_the_same_examples(tmp_path):
    import datasets

    jsonl = _write(tmp_path / "mc.jsonl", MC)
    recs = load_examples(jsonl)
    assert recs == MC
    datasets.Dataset.from_list(MC).to_parquet(str(tmp_path / "mc.parquet"))
    assert load_examples(str(tmp_path / "mc.parquet")) == MC
    assert load_examples(datasets.Dataset.from_list(MC)) == MC
    assert load_examples(list(MC)) == MC
    (tmp_path / "pr.csv").write_text("prompt,response\nhi,there\n\"a, b\",c\n", encoding="utf-8")
    assert load_examples(str(tmp_path / "pr.csv")) == [{"prompt": "hi", "response": "there"}, {"prompt": "a, b", "response": "c"}]
    # a DatasetDict / save_to_disk directory with its own splits keeps them (validation carved out of train)
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(MC[:10]), "test": datasets.Dataset.from_list(MC[10:])})
    dd.save_to_disk(str(tmp_path / "saved"))
    for src in (dd, str(tmp_path / "saved")):
        t = load_task(src, validation_fraction=0.2)
        assert t["test"] == MC[10:]
        assert len(t["validation"]) == 2 and len(t["train"]) == 8
        assert sorted(e["id"] for e in t["train"] + t["validation"]) == list(range(10))


def test_chat_messages_become_prompt_and_response():
    rec = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                        {"role": "assistant", "content": "Hello."}]}
    (ex,) = load_examples([rec], messages_field="messages")
    assert ex["prompt"] == "System: Be brief.\nUser: Hi?\nAssistant:" and ex["response"] == "Hello."
    p, r = encode_example(TOK, ex)
    assert TOK.decode(p) == ex["prompt"] and TOK.decode(r) == " Hello."


@pytest.mark.parametrize("lines,kwargs,message", [
    ([{"question": "a", "response": "b"}], {}, "line 1: no field 'prompt' (fields: question, response)"),
    ([{"prompt": "a"}], {}, "line 1: no field 'response'"),
    ([{"prompt": "a", "response": "b"}, {"prompt": "a", "response": 5}], {}, "line 2: field 'response' is int, not text"),
    ([{"prompt": "a", "response": "b"}, '{"prompt": "a" "response": "b"}'], {}, "line 2 is not valid JSON"),
    ([{"prompt": "a", "response": "b", "choices": ["c", "d"]}], {}, "is not one of the choices"),
    ([{"m": [{"role": "bot", "content": "x"}]}], {"messages_field": "m"}, "m[0] has unknown role 'bot'"),
    ([{"m": [{"role": "user", "content": "x"}]}], {"messages_field": "m"}, "must be the assistant's"),
    ([{"prompt": "a", "response": "b"}], {"choices_required": True}, "no choices, but metric accuracy ranks choices"),
])
def test_bad_records_get_one_precise_line(tmp_path, lines, kwargs, message):
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as exc:
        load_examples(path, **kwargs)
    assert message in str(exc.value) and "\n" not in str(exc.value)
    assert str(path) in str(exc.value) or "bad.jsonl" in str(exc.value)


def test_empty_inputs(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_examples(str(tmp_path / "e.jsonl"))
    with pytest.raises(DataError, match="no examples"):
        load_examples([])
    with pytest.raises(DataError, match="does not exist"):
        load_examples(str(tmp_path / "missing.jsonl"))


def test_seeded_three_way_split():
    a = split_examples(MC, seed=3, validation_fraction=0.25, test_fraction=0.25)
    assert a == split_examples(MC, seed=3, validation_fraction=0.25, test_fraction=0.25)
    assert a != split_examples(MC, seed=4, validation_fraction=0.25, test_fraction=0.25)
    ids = [[e["id"] for e in a[s]] for s in ("train", "validation", "test")]
    assert sorted(sum(ids, [])) == list(range(12)) and [len(x) for x in ids] == [6, 3, 3]
    assert all(x == sorted(x) for x in ids)  # original order within a split


def test_builtin_task_registry():
    register_builtin_task("_kt_test_task", lambda: {"train": MC[:8], "validation": MC[8:10], "test": MC[10:]},
                          description="test", license="CC0")
    try:
        t = load_task("_kt_test_task")
        assert t["test"] == MC[10:] and t.has_choices and t.meta["license"] == "CC0"
    finally:
        BUILTIN_TASKS.pop("_kt_test_task")


# ------------------------------------------------------------------------------------------- tokens and the loss
def test_labels_cover_the_response_and_eos_only():
    exs = [{"prompt": "abc", "response": "xy"}, {"prompt": "", "response": "long answer"}]
    b = tokenize_sft(exs, TOK)
    ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
    assert ids.shape == labels.shape == mask.shape
    # row 0: "abc" | " xy" EOS, then padding
    assert labels[0].tolist()[:3] == [-100] * 3 and labels[0].tolist()[3:7] == TOK.encode(" xy") + [TOK.eos_token_id]
    assert mask[0].tolist() == [1] * 7 + [0] * (ids.shape[1] - 7) and (labels[0, 7:] == -100).all()
    # row 1: an empty prompt becomes BOS (the response needs a context); no delimiter
    assert ids[1, 0] == TOK.bos_token_id and labels[1, 0] == -100 and TOK.decode(labels[1, 1:-1].tolist()) == "long answer"
    # cut to max_length: the prompt's end and the whole response survive
    p, r = encode_example(TOK, {"prompt": "0123456789", "response": "ab"}, max_length=6)
    assert TOK.decode(p) == "89" and TOK.decode(r) == " ab"


def test_padding_lets_no_example_see_another():
    model = build_tiny_llama(seed=1).eval()
    exs = [{"prompt": "short", "response": "a"}, {"prompt": "a much longer prompt here", "response": "bcd"}]
    b = tokenize_sft(exs, TOK)
    with torch.no_grad():
        both = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        for i, ex in enumerate(exs):
            alone = tokenize_sft([ex], TOK)
            n = int(alone["attention_mask"].sum())
            torch.testing.assert_close(both[i, :n], model(input_ids=alone["input_ids"]).logits[0, :n], atol=1e-5, rtol=1e-4)
    b2 = collate_sft([{"input_ids": [5, 6], "labels": [-100, 6]}], pad_id=0)
    assert b2["attention_mask"].tolist() == [[1, 1]]


def _grads(model, batch):
    model.zero_grad()
    sft_loss_sum(model, batch).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone()


@pytest.mark.parametrize("arch,impl", [("llama", "eager"), ("llama", "sdpa"), ("moe", "sdpa")])
def test_packed_batch_has_the_loss_and_gradients_of_the_padded_one(arch, impl):
    """Packing (several examples per row, block-diagonal causal attention from per-example position ids) changes
    nothing but the layout: in float64 the summed response loss and every gradient equal the padded batch's."""
    import random

    from kappatune.data.tasks import pack_sft  # noqa: F401  (the public helper behind packing=True)
    from kappatune.models import build_tiny_moe

    rng = random.Random(arch)
    exs = [{"prompt": "".join(rng.choice("abcde ") for _ in range(rng.randint(0, 30))),
            "response": "".join(rng.choice("xyz") for _ in range(rng.randint(1, 10)))} for _ in range(12)]
    # float64 where the model runs in it (the MoE's grouped matmul is float32-only: a float32 tolerance there)
    model = build_tiny_llama(seed=0).double() if arch == "llama" else build_tiny_moe(seed=0)
    tol = 1e-6 if arch == "llama" else 1e-4
    model.config._attn_implementation = impl
    padded = tokenize_sft(exs, TOK, max_length=64)
    packed = tokenize_sft(exs, TOK, max_length=64, packing=True)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # several examples share a row
    assert int((packed["position_ids"] == 0).sum()) >= len(exs)  # positions restart per example
    assert torch.equal(packed["labels"][packed["labels"] != -100], padded["labels"][padded["labels"] != -100])

    def loss_and_grads(batch):
        model.zero_grad()
        loss = sft_loss_sum(model, batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    l1, g1 = loss_and_grads(padded)
    l2, g2 = loss_and_grads(packed)
    assert float(l2) == pytest.approx(float(l1), rel=tol)
    worst = max(float((a - b).abs().max() / (a.abs().max() + 1e-30)) for a, b in zip(g1, g2))
    assert len(g1) == len(g2) and worst < tol, worst
    # without the restarting positions (one sequence per row) the examples would attend to one another
    leaky = {k: v for k, v in packed.items() if k != "position_ids"}
    if arch == "llama":
        assert float(sft_loss_sum(model, leaky)) != pytest.approx(float(l1), rel=1e-6)


@pytest.mark.parametrize("wrap", ["plain", "lora", "packed"])
def test_loss_on_kept_logits_equals_the_full_projection(wrap):
    """Training projects only the positions that predict a response token (``logits_to_keep``): in float64 the loss
    and every gradient equal the all-positions computation, for a plain model, a PEFT LoRA model and packed rows;
    and the kept set really is smaller than the sequence."""
    import random

    rng = random.Random(wrap)
    exs = [{"prompt": "".join(rng.choice("abcde ") for _ in range(rng.randint(5, 40))),
            "response": "".join(rng.choice("xyz") for _ in range(rng.randint(1, 6)))} for _ in range(6)]
    model = build_tiny_llama(seed=0)
    if wrap == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model = model.double()
    batch = tokenize_sft(exs, TOK, max_length=64, packing=wrap == "packed")
    kept = int((batch["labels"][:, 1:] != -100).any(0).sum())
    assert 0 < kept < batch["input_ids"].shape[1] - 1

    def loss_and_grads(all_logits):
        model.zero_grad()
        loss = sft_loss_sum(model, batch, all_logits=all_logits)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    l1, g1 = loss_and_grads(True)
    l2, g2 = loss_and_grads(False)
    # (the cross-entropy itself runs in float32, as in training: a float32 tolerance)
    assert float(l2) == pytest.approx(float(l1), rel=1e-6)
    assert len(g1) == len(g2) > 0
    worst = max(float((a - b).abs().max() / (a.abs().max() + 1e-30)) for a, b in zip(g1, g2))
    assert worst < 1e-6, worst


def test_packing_rejects_an_example_longer_than_a_row():
    from kappatune.data.tasks import pack_sft

    with pytest.raises(DataError, match="does not fit a packed row of 4"):
        pack_sft([{"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, 4, 5]}], 4, 0)
    with pytest.raises(DataError, match="packing needs a row length"):
        tokenize_sft([{"prompt": "a", "response": "b"}], TOK, packing=True)


def test_prompt_labels_contribute_no_gradient():
    """The training loss reads labels only at response positions: rewriting the labels of prompt positions (here to
    the real next tokens, what an unmasked LM loss would train on) changes no gradient while they stay masked, and
    unmasking even one of them does."""
    torch.manual_seed(0)
    model = build_tiny_llama(seed=0)
    b = tokenize_sft([{"prompt": "the prompt text", "response": "answer"}], TOK)
    g = _grads(model, b)
    prompt_pos = (b["labels"][0] == -100).nonzero().flatten()[1:4]
    # a different prompt (same length, same response) gives the same labels: only response positions carry any
    other = tokenize_sft([{"prompt": "THE PROMPT TEXT", "response": "answer"}], TOK)
    assert torch.equal(other["labels"], b["labels"])
    unmasked = {k: v.clone() for k, v in b.items()}
    unmasked["labels"][0, prompt_pos[1]] = b["input_ids"][0, prompt_pos[1]]
    assert not torch.allclose(_grads(model, unmasked), g)
    # and the loss is exactly the response tokens' NLL
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=b["input_ids"]).logits[0].float(), -1)
        ids = b["input_ids"][0].tolist()
        resp = [i for i in range(len(ids)) if b["labels"][0, i] != -100]
        manual = -sum(logp[i - 1, ids[i]] for i in resp)
        assert float(sft_loss_sum(model, b)) == pytest.approx(float(manual), rel=1e-5)


# -------------------------------------------------------------------------------------------------- evaluation
def _count_rows(model):
    n = [0]
    h = model.register_forward_pre_hook(lambda mod, a, kw: n.__setitem__(0, n[0] + kw["input_ids"].shape[0]), with_kwargs=True)
    return n, h


def _brute_accuracy(model, exs):
    hits = []
    for ex in exs:
        scores = []
        for c in ex["choices"]:
            p = TOK.encode(ex["prompt"])
            ids = TOK.encode(ex["prompt"] + " " + c)
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            scores.append(sum(float(lp[j - 1, ids[j]]) for j in range(len(p), len(ids))))
        hits.append(scores.index(max(scores)) == ex["choices"].index(ex["response"]))
    return sum(hits) / len(hits)


def test_accuracy_feeds_each_prompt_once_and_matches_per_choice_scoring():
    model = build_tiny_llama(seed=2)
    n, h = _count_rows(model)
    exs = [{"prompt": f"item {i} is", "response": "xyz"[i % 3], "choices": list("xyz")} for i in range(9)]
    res = choice_accuracy(model, TOK, exs, batch_size=4, progress=False)
    h.remove()
    prompt_tokens = sum(len(TOK.encode(ex["prompt"])) for ex in exs)
    # each prompt once, then per choice only the shared space (the choice byte is read at the last position)
    assert res["forward_tokens"] == prompt_tokens + 27 and n[0] == 9 + 27
    assert res["accuracy"] == pytest.approx(_brute_accuracy(model, exs))
    full = choice_accuracy(model, TOK, exs, batch_size=4, progress=False, reuse_prefix=False)
    assert full["forward_tokens"] == prompt_tokens + 9 and full["accuracy"] == res["accuracy"]  # one-token case
    multi = [{"prompt": f"item {i} is", "response": ["red", "blue"][i % 2], "choices": ["red", "blue"]} for i in range(6)]
    res = choice_accuracy(model, TOK, multi, batch_size=5, progress=False)
    assert res["accuracy"] == pytest.approx(_brute_accuracy(model, multi))


def _greedy(model, prompt_ids, n):
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return TOK.decode(ids[len(prompt_ids):])


def test_exact_match_is_greedy_generation_compared_after_normalisation():
    model = build_tiny_llama(seed=3)
    prompts = ["hello", "a longer prompt", "x"]
    outs = [_greedy(model, TOK.encode(p), 4) for p in prompts]
    exs = [{"prompt": p, "response": o.strip().upper() + "."} for p, o in zip(prompts, outs)]
    res = exact_match(model, TOK, exs, max_new_tokens=4, stop=[], batch_size=2, progress=False, return_predictions=True)
    assert res["predictions"] == [o.lstrip() for o in outs]  # left padding does not change a row's generation
    assert res["exact_match"] == 1.0
    wrong = [dict(e, response=e["response"] + "zz") for e in exs]
    assert exact_match(model, TOK, wrong, max_new_tokens=4, stop=[], progress=False)["exact_match"] == 0.0
    assert normalize_answer("  The  Answer, is: 42! ") == "answer is 42"


def test_response_ppl_is_over_response_tokens_only():
    model = build_tiny_llama(seed=4)
    exs = [{"prompt": "p one", "response": "r"}, {"prompt": "prompt two", "response": "resp"}]
    nll, n = response_nll(model, TOK, exs, batch_size=2, progress=False)
    assert n == (2 + 1) + (5 + 1)  # " r" EOS, " resp" EOS
    b = tokenize_sft(exs, TOK)
    with torch.no_grad():
        assert nll == pytest.approx(float(sft_loss_sum(model, b)) / n, rel=1e-5)
    assert set(evaluate_sft(model, TOK, MC[:4], ["accuracy", "ppl"], progress=False)) == {"accuracy", "accuracy_norm", "ppl"}


def test_score_metrics_on_a_known_matrix():
    R = [[0.5, 0.2, 0.3], [0.9, 0.25, 0.3], [0.7, 0.8, 0.4], [0.6, 0.6, 0.9]]
    m = compute_score_metrics(R, ["a", "b", "c"], "acc")
    assert m["acc"] == pytest.approx(100 * (0.6 + 0.6 + 0.9) / 3)
    assert m["bwt_acc"] == pytest.approx(100 * ((0.6 - 0.9) + (0.6 - 0.8)) / 2)
    assert m["fwt_acc"] == pytest.approx(100 * ((0.25 - 0.2) + (0.4 - 0.3)) / 2)
    assert m["forgetting_acc_per_task"] == pytest.approx({"a": 30.0, "b": 20.0})
    partial = compute_score_metrics(R[:2], ["a", "b", "c"], "acc")  # after stage 1 of 3
    assert partial["acc"] == pytest.approx(90.0) and "bwt_acc" not in partial
    assert compute_score_metrics([[None], [None]], ["a"], "acc") == {}


def test_paired_differences_against_a_baseline():
    def cell(acc):
        return {"metrics": {"acc": acc, "control_change_pct": 1.0}}

    cells = {"ref": {0: cell(50.0), 1: cell(60.0), 2: cell(55.0)}, "new": {0: cell(52.0), 1: cell(63.0), 2: cell(56.0)}}
    pr = paired_against(cells, "ref")
    d = pr["methods"]["new"]["acc"]
    assert d["differences"] == {0: 2.0, 1: 3.0, 2: 1.0} and d["mean"] == pytest.approx(2.0)
    assert d["ci"][0] < 2.0 < d["ci"][1] and d["n"] == 3


# ---------------------------------------------------------------------------------------------------- config
def test_config_checks_for_sft(tmp_path):
    base = {"model": "tiny-llama", "method": "full", "training": {"steps": 1}}
    with pytest.raises(ConfigError, match=r"tasks\[0\]: metric 'accuracy' needs a supervised task"):
        config_from_dict({**base, "tasks": [{"corpus": "x.txt", "metrics": ["accuracy"]}]})
    with pytest.raises(ConfigError, match=r"unknown metric 'acuracy' \(did you mean 'accuracy'\?\)"):
        config_from_dict({**base, "tasks": [{"corpus": "x.jsonl", "type": "sft", "metrics": ["acuracy"]}]})
    with pytest.raises(ConfigError, match=r"unknown key 'control.nmae'"):
        config_from_dict({**base, "tasks": ["a"], "control": {"corpus": "c", "nmae": "x"}})
    cfg = config_from_dict({**base, "tasks": ["a"], "control": ["control", {"corpus": "d/mc.jsonl", "type": "sft"}]})
    assert [c.label for c in cfg.control_suite()] == ["control", "mc"]
    assert config_from_dict({**base, "tasks": ["a"], "control": "control"}).control_suite()[0].corpus == "control"


def test_builtin_supervised_task_is_detected_as_sft():
    """A built-in labelled task needs no `type: sft`; anything else stays lm unless typed; the fingerprint of a
    config is the same whether the type is written out or detected (run directories stay resumable)."""
    base = {"model": "tiny-llama", "method": "full", "training": {"steps": 1}}
    detected = config_from_dict({**base, "tasks": [{"corpus": "debian-section"}, "shakespeare", "notes.txt"],
                                 "control": ["control", "gcide-pos"]})
    assert [t.type for t in detected.tasks] == ["sft", "lm", "lm"]
    assert [c.type for c in detected.control_suite()] == ["lm", "sft"]
    typed = config_from_dict({**base, "tasks": [{"corpus": "debian-section", "type": "sft"},
                                                {"corpus": "shakespeare", "type": "lm"}, "notes.txt"],
                              "control": ["control", {"corpus": "gcide-pos", "type": "sft"}]})
    assert config_fingerprint(detected) == config_fingerprint(typed)
    # an explicit type still wins, and a wrong one is named
    assert config_from_dict({**base, "tasks": [{"corpus": "debian-section", "type": "lm"}]}).tasks[0].type == "lm"
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.type must be one of lm, sft"):
        config_from_dict({**base, "tasks": [{"corpus": "debian-section", "type": "stf"}]})


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    path = _write(tmp_path / "nochoice.jsonl", [{"prompt": "a", "response": "b"}] * 5)
    assert cli_main(["eval", "tiny-llama", "--data", path, "--metric", "accuracy", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kappatune: error:") and "no choices" in err and "\n" not in err
    (tmp_path / "empty.jsonl").write_text("")
    assert cli_main(["eval", "tiny-llama", "--data", str(tmp_path / "empty.jsonl"), "--type", "sft", "-q"]) == 2
    assert "is empty" in capsys.readouterr().err


def test_cli_eval_and_data_report_accuracy(tmp_path, capsys):
    path = _write(tmp_path / "mc.jsonl", MC)
    assert cli_main(["eval", "tiny-llama", "--data", path, "--split", "all", "--json", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["examples"] == 12 and out["accuracy"] == pytest.approx(_brute_accuracy(build_tiny_llama(), MC))
    assert cli_main(["data", path]) == 0
    text = capsys.readouterr().out
    assert "train 10, validation 1, test 1 examples" in text and "'yes'" in text


def test_lm_eval_missing_gives_a_clear_error(monkeypatch):
    import builtins

    from kappatune.evaluation import lm_eval_tasks

    real = builtins.__import__

    def no_lm_eval(name, *a, **kw):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("no lm_eval", name="lm_eval")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(DataError, match=r"pip install 'kappatune\[lm_eval\]'"):
        lm_eval_tasks(build_tiny_llama(), TOK, ["x"])


@pytest.mark.slow
def test_lm_eval_bridge_matches_kappatune_accuracy(tmp_path):
    pytest.importorskip("lm_eval")
    from kappatune.evaluation import lm_eval_tasks

    exs = [{"prompt": f"Item {i}: the colour is", "response": ["red", "blue", "green"][(i * 7) % 3],
            "choices": ["red", "blue", "green"]} for i in range(30)]
    path = _write(tmp_path / "mc.jsonl", exs)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "kt_mc.yaml").write_text(yaml.safe_dump({
        "task": "kt_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": path}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{prompt}}", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{choices.index(response)}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    }))
    model = build_tiny_llama(seed=5)
    ours = choice_accuracy(model, TOK, exs, progress=False)
    theirs = lm_eval_tasks(model, TOK, ["kt_mc"], include_path=tmp_path / "tasks")["kt_mc"]
    assert abs(theirs["acc"] - ours["accuracy"]) <= 0.01 and abs(theirs["acc_norm"] - ours["accuracy_norm"]) <= 0.01


# ------------------------------------------------------------------------------------------------------ harness
@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    corpora = make_corpora(d, n_docs=20)
    sft = {k: write_sft(d / f"{k}.jsonl", k, 40) for k in ("alpha", "beta", "ctrl")}
    return corpora, sft


@pytest.fixture(scope="module")
def sft_reference(sft_data, tmp_path_factory):
    corpora, sft = sft_data
    out = tmp_path_factory.mktemp("ref") / "run"
    cfg = tiny_sft_config(corpora, sft, out, control=[{"corpus": corpora["ctrl"], "name": "ctrl"},
                                                     {"corpus": sft["ctrl"], "name": "ctrl-mc", "type": "sft"}],
                          eval__curve_every=2, eval__curve_stages=[2])
    return cfg, run(cfg)


def test_sft_run_with_packing_trains_on_fewer_rows(sft_data, tmp_path):
    """training.packing: the same examples in fewer rows; the masked loss trains and the run reports as usual."""
    corpora, sft = sft_data
    cfg = tiny_sft_config(corpora, sft, tmp_path / "packed", training__packing=True,
                          method={"name": "lora", "options": {"rank": 2}})
    res = run(cfg)
    info = res["corpora"]["alpha"]
    assert info["train_rows"] < info["train_examples"] == info["examples"]["train"]
    assert all(s["losses"][-1] < s["losses"][0] for s in res["stages"])
    assert len(res["matrix"]["accuracy"]) == 3


def test_sft_run_reports_accuracy_per_stage(sft_reference):
    cfg, res = sft_reference
    m = res["matrix"]
    assert len(m["accuracy"]) == 3 and all(len(r) == 2 for r in m["accuracy"])
    assert m["exact_match"][0][0] is None and m["exact_match"][0][1] is not None  # only beta asks for it
    met = res["metrics"]
    assert met["acc"] == pytest.approx(100 * sum(m["accuracy"][-1]) / 2)
    assert met["bwt_acc"] == pytest.approx(100 * (m["accuracy"][2][0] - m["accuracy"][1][0]))
    assert set(met["control_suite"]) == {"ctrl", "ctrl-mc"} and "accuracy" in met["control_suite"]["ctrl-mc"]
    assert met["probe_ctrl_ppl_change"] == pytest.approx(met["control_change_pct"])
    assert all(s["losses"][-1] < s["losses"][0] for s in res["stages"])  # the masked loss trains
    curve = res["stages"][1]["curve"]
    assert [p["step"] for p in curve] == [0, 2, 4] and "task_accuracy" in curve[0] and "task_exact_match" in curve[0]
    # the curve scores the validation examples, the stage-end result the test examples (on k examples an accuracy
    # is a multiple of 1/k)
    k = res["corpora"]["beta"]["validation_examples"]
    assert k == res["corpora"]["beta"]["examples"]["validation"]
    assert all(abs(k * p["task_accuracy"] - round(k * p["task_accuracy"])) < 1e-9 for p in curve)
    md = (Path(cfg["output_dir"]) / "results.md").read_text()
    assert "Forgetting matrix (accuracy" in md and "ACC (accuracy, pts)" in md


def test_sft_run_resumes_after_sigkill_to_identical_metrics(sft_data, sft_reference, tmp_path):
    corpora, sft = sft_data
    ref_cfg, ref = sft_reference
    out = tmp_path / "run"
    cfg = dict(ref_cfg, output_dir=str(out))
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               KAPPATUNE_FAULT="train_step:7")  # stage 2, after its mid-stage checkpoint at step 2
    cmd = [sys.executable, "-m", "kappatune.cli", "run", str(cfg_path), "-q"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    got = run(cfg, resume=True)  # in-process: the kill was real, the resume needs no second interpreter start-up
    assert got["stages"][1]["resumed_from_step"] == 6 - 4  # from the mid-stage checkpoint of stage 2
    assert got["matrix"] == ref["matrix"]
    assert [s["losses"] for s in got["stages"]] == [s["losses"] for s in ref["stages"]]
    keys = [k for k in ref["metrics"] if "acc" in k or "em" in k or k.startswith(("probe_", "control_suite", "bwt"))]
    assert {k: got["metrics"][k] for k in keys} == {k: ref["metrics"][k] for k in keys}


EASY = [
    ("The capital of France is", "Paris", ["Paris", "London", "Tokyo"]),
    ("Two plus two equals", "four", ["four", "seven", "ten"]),
    ("The sky on a clear day is", "blue", ["blue", "green", "red"]),
    ("Water freezes at zero degrees", "Celsius", ["Celsius", "Kelvin", "Newton"]),
    ("The opposite of hot is", "cold", ["cold", "tall", "loud"]),
    ("A week has seven", "days", ["days", "apples", "wheels"]),
    ("The largest planet in our solar system is", "Jupiter", ["Jupiter", "Mercury", "Pluto"]),
    ("Cats are animals that say", "meow", ["meow", "moo", "quack"]),
    ("The first month of the year is", "January", ["January", "June", "October"]),
    ("Bees make", "honey", ["honey", "steel", "paper"]),
]


@pytest.mark.slow
def test_smollm2_accuracy_on_a_local_multiple_choice_file_matches_lm_eval(tmp_path, monkeypatch, capsys):
    """``kappatune eval smollm2-135m --data mc.jsonl`` and the lm-eval bridge on the same examples (real model;
    uses the shared model cache, fetching the model if it is not there)."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("KAPPATUNE_CACHE", os.path.expanduser("~/.cache/kappatune"))
    exs = [{"prompt": p, "response": r, "choices": c} for p, r, c in EASY]
    path = _write(tmp_path / "mc.jsonl", exs)
    assert cli_main(["eval", "smollm2-135m", "--data", path, "--split", "all", "--no-chat-template", "--json", "-q"]) == 0
    ours = json.loads(capsys.readouterr().out)
    assert ours["examples"] == 10 and ours["accuracy"] >= 0.7  # easy facts: far above chance (1/3)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "kt_easy.yaml").write_text(yaml.safe_dump({
        "task": "kt_easy", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": path}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{prompt}}", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{choices.index(response)}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }))
    assert cli_main(["eval", "smollm2-135m", "--lm-eval", "kt_easy", "--lm-eval-include", str(tmp_path / "tasks"), "--json", "-q"]) == 0
    out = capsys.readouterr().out
    theirs = json.loads(out[out.index("{"):])["kt_easy"]
    assert abs(theirs["acc"] - ours["accuracy"]) <= 0.01
