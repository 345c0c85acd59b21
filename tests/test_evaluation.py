"""Perplexity and accuracy: exact values on models with known output, determinism, token weighting, CLI."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kappatune import evaluation
from kappatune.cli import main
from kappatune.data import ByteTokenizer, build_blocks, make_corpus
from kappatune.errors import DataError
from kappatune.evaluation import accuracy, mean_nll, perplexity
from kappatune.models import build_tiny_llama

TOK = ByteTokenizer()


class FixedLogits(nn.Module):
    """A 'model' whose next-token logits are the same vector at every position (known perplexity)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(logits.clone())
        self.config = SimpleNamespace(vocab_size=logits.numel())

    def forward(self, input_ids, attention_mask=None):
        b, t = input_ids.shape
        return SimpleNamespace(logits=self.bias.expand(b, t, -1))


def _blocks(n: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (n, size), generator=g)


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    model = FixedLogits(torch.zeros(320))
    assert perplexity(model, _blocks(), progress=False) == pytest.approx(320.0, rel=1e-6)


def test_perplexity_matches_the_closed_form_for_a_fixed_distribution():
    logits = torch.randn(320, generator=torch.Generator().manual_seed(1))
    blocks = _blocks()
    logp = torch.log_softmax(logits.double(), 0)
    expected = math.exp(-float(logp[blocks[:, 1:]].mean()))
    assert perplexity(FixedLogits(logits), blocks, progress=False) == pytest.approx(expected, rel=1e-6)


def test_perplexity_matches_transformers_loss_on_a_real_architecture():
    model = build_tiny_llama()
    block = _blocks(1, 48)
    with torch.no_grad():
        hf = model(input_ids=block, labels=block).loss.item()
    assert perplexity(model, block, progress=False) == pytest.approx(math.exp(hf), rel=1e-5)


def test_perplexity_is_deterministic_and_batch_size_invariant():
    model = build_tiny_llama()
    blocks = _blocks(7)
    a = perplexity(model, blocks, batch_size=4, progress=False)
    assert a == perplexity(model, blocks, batch_size=4, progress=False)
    assert perplexity(model, blocks, batch_size=3, progress=False) == pytest.approx(a, rel=1e-5)
    assert math.isfinite(a) and a > 1


def test_perplexity_is_token_weighted():
    model = build_tiny_llama()
    small, large = _blocks(2, 16, seed=1), _blocks(6, 16, seed=2)
    n1, n2 = mean_nll(model, small, progress=False), mean_nll(model, large, progress=False)
    both = mean_nll(model, torch.cat([small, large]), progress=False)
    assert both == pytest.approx((2 * n1 + 6 * n2) / 8, rel=1e-6)
    assert both != pytest.approx((n1 + n2) / 2, rel=1e-6)  # not a mean of per-set means


def test_perplexity_restores_training_mode_and_leaves_no_gradients():
    model = build_tiny_llama().train()
    perplexity(model, _blocks(2), progress=False)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_bad_blocks_are_clear_errors():
    model = build_tiny_llama()
    with pytest.raises(DataError, match="shape"):
        perplexity(model, torch.arange(10), progress=False)
    with pytest.raises(DataError, match="vocabulary"):
        perplexity(model, torch.full((1, 8), 5000), progress=False)
    with pytest.raises(DataError, match="integer"):
        perplexity(model, torch.zeros(2, 8), progress=False)


def test_nan_model_gives_nan_not_a_number_that_looks_valid():
    model = FixedLogits(torch.full((320,), float("nan")))
    assert math.isnan(perplexity(model, _blocks(), progress=False))


def test_accuracy_ranks_labels_by_log_likelihood():
    logits = torch.zeros(320)
    logits[ord("a") + 3] = 5.0  # the model always prefers the byte 'a'
    model = FixedLogits(logits)
    pairs = [("q1", "a"), ("q2", "b"), ("q3", "a"), ("q4", "a")]
    assert accuracy(model, TOK, pairs, label_prefix="", progress=False) == pytest.approx(0.75)
    # with a space prefix both labels share the (equally likely) space token; 'a' still wins
    assert accuracy(model, TOK, pairs, progress=False) == pytest.approx(0.75)


def test_accuracy_matches_a_per_pair_computation_on_a_real_model():
    model = build_tiny_llama()
    pairs = [(f"review {i}:", lab) for i, lab in enumerate(["good", "bad", "fine", "good", "bad"])]
    got = accuracy(model, TOK, pairs, batch_size=2, progress=False)
    correct = 0
    with torch.no_grad():
        for prompt, gold in pairs:
            scores = {}
            for cand in ("bad", "fine", "good"):
                p, c = TOK.encode(prompt), TOK.encode(" " + cand)
                logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0].double(), -1)
                scores[cand] = sum(float(logp[len(p) + k - 1, tok]) for k, tok in enumerate(c))
            correct += max(scores, key=scores.get) == gold
    assert got == pytest.approx(correct / len(pairs))
    assert accuracy(model, TOK, pairs, batch_size=5, progress=False) == got


def test_accuracy_rejects_bad_pairs():
    model = build_tiny_llama()
    with pytest.raises(DataError):
        accuracy(model, TOK, [], progress=False)
    with pytest.raises(DataError, match="two candidate"):
        accuracy(model, TOK, [("x", "a")], progress=False)
    with pytest.raises(DataError, match="not among"):
        accuracy(model, TOK, [("x", "a"), ("y", "c")], labels=["a", "b"], progress=False)


def test_evaluate_summary_on_generated_text(tmp_path):
    p = tmp_path / "gen.txt"
    p.write_text("\n\n".join(f"Document {i} says hello to the tiny model." * 4 for i in range(40)), encoding="utf-8")
    res = evaluation.evaluate("tiny-llama", str(p), block_size=32, max_blocks=4, progress=False)
    assert res["blocks"] == 4 and res["tokens"] == 4 * 31
    blocks = build_blocks(str(p), TOK, 32, split="eval", max_blocks=4, progress=False)
    assert res["perplexity"] == pytest.approx(perplexity(build_tiny_llama(), blocks, progress=False), rel=1e-9)


def test_cli_eval_prints_perplexity(tmp_path, capsys):
    p = tmp_path / "gen.txt"
    p.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." * 3 for i in range(30)),
                 encoding="utf-8")
    assert main(["eval", "tiny-llama", "--data", str(p), "--block-size", "32", "--max-blocks", "3", "-q"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out
    value = float(out.rsplit("perplexity", 1)[1].strip())
    assert math.isfinite(value) and value > 1


def test_cli_eval_bad_file_is_one_line_error(tmp_path, capsys):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"\xff\xfe\x00bad")
    assert main(["eval", "tiny-llama", "--data", str(p), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kappatune: error:") and str(p) in err and "\n" not in err


def test_cli_models_and_data_listings(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "tiny-llama" in out
    assert main(["data"]) == 0
    out = capsys.readouterr().out
    for name in ("control", "shakespeare", "python-docs", "wordnet"):
        assert name in out
    assert main(["data", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in listing["corpora"]}
    assert all(1 < r["base_perplexity"] < 100 for r in rows.values())
    tasks = {r["name"]: r for r in listing["labelled_tasks"]}
    assert {"debian-section", "wordnet-noun", "shakespeare-genre", "gcide-pos", "gcide-field"} <= set(tasks)
    assert all(not r["cached"] and 0 < r["chance_accuracy"] < 1 for r in tasks.values())  # nothing built here
    assert rows["control"]["kind"] == "control"
