"""Choice scoring with a shared prompt prefix (evaluation._score_choices; issue 13).

The fast path computes each example's prompt once (KV cache repeated per choice, logits only where a choice token
is predicted). Property: its scores are the per-choice full-pass log-likelihoods of exactly the tokens
``encode_example`` gives for prompt and choice -- with choices of different token lengths, a chat template on and
off, a BPE tokenizer that merges across the prompt/choice boundary, prompts cut by ``max_length``, padding
between examples of different lengths, a MoE model and a LoRA-wrapped model.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kappatune.data import ByteTokenizer
from kappatune.data.tasks import encode_example
from kappatune.evaluation import _score_choices, choice_accuracy
from kappatune.models import build_tiny_llama, build_tiny_moe

BYTES = ByteTokenizer()
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 2 threads on the shared CPU are far slower
WORDS = ["games", "game", "gamesmanship", "net", "network", "sound", "text", "science", "a", "the", "of", "admin"]


@pytest.fixture(scope="module")
def bpe():
    """A small byte-level BPE tokenizer with a ChatML template, trained in-process: its merges span spaces and
    word pieces, so the tokens of ``prompt + " " + choice`` differ from the prompt's and the choice's alone."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) + " Answer: games." for i in range(200)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHATML
    return fast


def _reference(model, tokenizer, ex, chat_template, max_length=None):
    """Per choice: one unbatched, unpadded full forward of the encoded prompt + choice; the choice tokens' log-prob."""
    out = []
    for c in ex["choices"]:
        p, r = encode_example(tokenizer, ex, chat_template=chat_template, add_eos=False, max_length=max_length, response=c)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + r])).logits[0].double(), -1)
        out.append(sum(float(logp[len(p) + j - 1, t]) for j, t in enumerate(r)))
    return out


def _examples(n, choices, start=0):
    return [{"prompt": f"Which section? {' '.join(WORDS[(i + k) % len(WORDS)] for k in range(i % 5 + 1))}\nAnswer:",
             "response": choices[i % len(choices)], "choices": list(choices)} for i in range(start, start + n)]


def _assert_scores_match(got, want, tol=2e-4):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=tol)


@pytest.mark.parametrize("chat_template", [True, False])
def test_shared_prefix_scores_equal_per_choice_full_passes_with_bpe_and_chat_template(bpe, chat_template):
    model = build_tiny_llama(seed=4, vocab_size=len(bpe), pad_token_id=bpe.pad_token_id, bos_token_id=1, eos_token_id=2)
    choices = ["games", "network", "gamesmanship of the net", "a"]  # 1 to several tokens each
    exs = _examples(5, choices)
    # the boundary matters here: the choice's tokens after the prompt are not the choice encoded alone
    p, r = encode_example(bpe, exs[0], chat_template=chat_template, add_eos=False, response="games")
    if not chat_template:
        assert bpe.decode(r) == " games" and r != bpe("games", add_special_tokens=False)["input_ids"]
    else:
        assert bpe.decode(r).startswith("games<|im_end|>")  # the assistant turn's end is scored too
    res = choice_accuracy(model, bpe, exs, chat_template=chat_template, batch_size=3, progress=False, return_scores=True)
    full = choice_accuracy(model, bpe, exs, chat_template=chat_template, batch_size=3, progress=False,
                           return_scores=True, reuse_prefix=False)
    for ex, s, f in zip(exs, res["scores"], full["scores"]):
        want = _reference(model, bpe, ex, chat_template)
        _assert_scores_match(s, want)
        _assert_scores_match(f, want)
    assert (res["accuracy"], res["accuracy_norm"]) == (full["accuracy"], full["accuracy_norm"])
    assert res["forward_tokens"] < full["forward_tokens"] / 2  # the prompt is fed once, not once per choice


@pytest.mark.parametrize("build", [build_tiny_llama, build_tiny_moe])
def test_shared_prefix_scores_on_llama_and_moe_with_uneven_prompts_and_batches(build):
    model = build(seed=2)
    exs = _examples(6, ["x", "yy", "zzz zz", "a much longer choice"])
    want = [_reference(model, BYTES, ex, False) for ex in exs]
    for bs in (1, 4):  # padding between prompts of different lengths must not change any score
        got = choice_accuracy(model, BYTES, exs, chat_template=False, batch_size=bs, progress=False, return_scores=True)
        for s, w in zip(got["scores"], want):
            _assert_scores_match(s, w)


def test_prompts_cut_by_max_length_differ_per_choice_and_still_match():
    model = build_tiny_llama(seed=6)
    exs = _examples(4, ["no", "a rather long answer here"])
    # with max_length the prompt is cut more for the longer choice: the choices' prompts differ
    p_short, _ = encode_example(BYTES, exs[0], chat_template=False, add_eos=False, max_length=40, response="no")
    p_long, _ = encode_example(BYTES, exs[0], chat_template=False, add_eos=False, max_length=40, response=exs[0]["choices"][1])
    assert p_short != p_long
    got = choice_accuracy(model, BYTES, exs, chat_template=False, max_length=40, batch_size=2, progress=False,
                          return_scores=True)
    for ex, s in zip(exs, got["scores"]):
        _assert_scores_match(s, _reference(model, BYTES, ex, False, max_length=40))


def test_single_token_choices_read_from_the_prompt_pass_alone():
    model = build_tiny_llama(seed=2)
    calls = []
    h = model.register_forward_pre_hook(lambda mod, a, kw: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    exs = [{"prompt": f"item {i} is", "response": "xyz"[i % 3], "choices": list("xyz")} for i in range(9)]
    # plain format: " x" is two bytes, the shared space is part of each choice; the prompt pass ends before it
    res = choice_accuracy(model, BYTES, exs, chat_template=False, batch_size=9, progress=False, return_scores=True)
    h.remove()
    assert len(calls) == 2 and calls[1][0] == 27 and calls[1][1] == 1  # prompts, then one token per choice row
    for ex, s in zip(exs, res["scores"]):
        _assert_scores_match(s, _reference(model, BYTES, ex, False))
    # choices that are one token after the prompt: a single forward (the prompt's) scores them all
    calls.clear()
    h = model.register_forward_pre_hook(lambda mod, a, kw: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    seqs = [[([5, 6, 7, c], 3) for c in (10, 11, 12)] for _ in range(4)]
    scores, fed = _score_choices(model, seqs, 0, batch_size=8, progress=False)
    h.remove()
    assert len(calls) == 1 and fed == 12
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([[5, 6, 7]])).logits[0, -1].double(), -1)
    _assert_scores_match(scores[0], [float(lp[c]) for c in (10, 11, 12)])


def test_lora_wrapped_model_uses_the_shared_prefix_and_matches():
    peft = pytest.importorskip("peft")
    model = build_tiny_llama(seed=3)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    exs = _examples(5, ["games", "net work"])
    fast = choice_accuracy(model, BYTES, exs, chat_template=False, progress=False, return_scores=True)
    slow = choice_accuracy(model, BYTES, exs, chat_template=False, progress=False, return_scores=True, reuse_prefix=False)
    assert fast["forward_tokens"] < slow["forward_tokens"]
    for a, b in zip(fast["scores"], slow["scores"]):
        _assert_scores_match(a, b)


def test_scoring_rejects_choices_without_tokens():
    from kappatune.errors import DataError

    with pytest.raises(DataError, match="no tokens to score"):
        _score_choices(build_tiny_llama(), [[([1, 2, 3], 3)]], 0, progress=False)
    with pytest.raises(DataError, match="batch_size"):
        _score_choices(build_tiny_llama(), [[([1, 2, 3], 2)]], 0, batch_size=0, progress=False)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_random_sequences_score_like_full_passes(data):
    """Random token sequences: per example any number of choices, prompts that may share only part of their
    tokens (``start`` differs per choice), any batch size."""
    model = build_tiny_llama(seed=1)
    n_ex = data.draw(st.integers(1, 4))
    examples = []
    for _ in range(n_ex):
        base = data.draw(st.lists(st.integers(3, 300), min_size=1, max_size=12))
        choices = []
        for _ in range(data.draw(st.integers(1, 4))):
            cut = data.draw(st.integers(1, len(base)))  # this choice's prompt: a prefix of base
            cont = data.draw(st.lists(st.integers(3, 300), min_size=1, max_size=5))
            choices.append((base[:cut] + cont, cut))
        examples.append(choices)
    bs = data.draw(st.integers(1, 5))
    got, _ = _score_choices(model, examples, 0, batch_size=bs, progress=False)
    for choices, scores in zip(examples, got):
        want = []
        for seq, start in choices:
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].double(), -1)
            want.append(sum(float(lp[i - 1, seq[i]]) for i in range(start, len(seq))))
        _assert_scores_match(scores, want)


def test_a_model_without_a_usable_cache_falls_back_to_full_passes(monkeypatch):
    """A transformers model whose outputs carry no repeatable cache is scored the reference way, same numbers."""
    model = build_tiny_llama(seed=8)
    exs = _examples(3, ["red", "blue green"])
    want = choice_accuracy(model, BYTES, exs, chat_template=False, progress=False, return_scores=True, reuse_prefix=False)
    forward = model.forward

    def no_cache(*a, **kw):
        out = forward(*a, **kw)
        out["cache"] = None  # as if the model kept no (repeatable) cache
        return out

    monkeypatch.setattr(model, "forward", no_cache)
    got = choice_accuracy(model, BYTES, exs, chat_template=False, progress=False, return_scores=True)
    assert got["forward_tokens"] == want["forward_tokens"]
    for a, b in zip(got["scores"], want["scores"]):
        _assert_scores_match(a, b, tol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# accuracy and ppl from one pass over the prompts (choice_accuracy's with_response_nll, used by evaluate_sft)
# ---------------------------------------------------------------------------------------------------------------

def _count_prompt_tokens(model):
    fed = []
    h = model.register_forward_pre_hook(lambda mod, a, kw: fed.append(int(kw["input_ids"].numel())), with_kwargs=True)
    return fed, h


@pytest.mark.parametrize("chat_template", [True, False])
def test_fused_ppl_equals_the_separate_full_pass_and_accuracy_is_bitwise_unchanged(bpe, chat_template):
    from kappatune.evaluation import evaluate_sft, response_nll

    model = build_tiny_llama(seed=5, vocab_size=len(bpe), pad_token_id=bpe.pad_token_id, bos_token_id=1, eos_token_id=2)
    exs = _examples(7, ["games", "network", "gamesmanship of the net", "a"])
    alone = choice_accuracy(model, bpe, exs, chat_template=chat_template, batch_size=3, progress=False, return_scores=True)
    both = choice_accuracy(model, bpe, exs, chat_template=chat_template, batch_size=3, progress=False, return_scores=True,
                           with_response_nll=True)
    assert both["scores"] == alone["scores"]  # bitwise: the extra pass runs after the choices' passes
    assert both["forward_tokens"] == alone["forward_tokens"]
    mean, n = response_nll(model, bpe, exs, chat_template=chat_template, batch_size=3, progress=False)
    assert both["response_tokens"] == n
    assert both["response_nll"] == pytest.approx(mean, rel=1e-5)
    # evaluate_sft: the same metrics as measuring each alone, with the prompts fed once instead of twice
    fed, h = _count_prompt_tokens(model)
    fused = evaluate_sft(model, bpe, exs, ["ppl", "accuracy"], chat_template=chat_template, batch_size=3, progress=False)
    h.remove()
    fed_fused = sum(fed)
    fed.clear()
    fed, h = _count_prompt_tokens(model)
    separate = {**evaluate_sft(model, bpe, exs, ["ppl"], chat_template=chat_template, batch_size=3, progress=False),
                **evaluate_sft(model, bpe, exs, ["accuracy"], chat_template=chat_template, batch_size=3, progress=False)}
    h.remove()
    assert list(fused) == ["ppl", "accuracy", "accuracy_norm"]
    assert (fused["accuracy"], fused["accuracy_norm"]) == (separate["accuracy"], separate["accuracy_norm"])
    assert fused["ppl"] == pytest.approx(separate["ppl"], rel=1e-5)
    assert fed_fused < 0.75 * sum(fed)


def test_fused_ppl_falls_back_per_example_where_the_prompt_is_cut_differently_or_there_is_no_cache(monkeypatch):
    from kappatune.evaluation import response_nll

    from kappatune.evaluation import _score_choices_and_extras

    model = build_tiny_llama(seed=6)
    for choices, max_length in ((["no", "a rather long answer here"], 40), (["no", "ok"], 46)):
        exs = _examples(5, choices)
        # the ppl row (response + EOS) is one token longer, so its prompt is cut differently from the choices'
        # rows in some examples (and in the first case the choices' own prompts differ): those fall back
        per_example, extras = [], []
        for ex in exs:
            enc = [encode_example(BYTES, ex, chat_template=False, add_eos=False, max_length=max_length, response=c)
                   for c in ex["choices"]]
            per_example.append([(p + c, len(p)) for p, c in enc])
            p, r = encode_example(BYTES, ex, chat_template=False, max_length=max_length)
            extras.append((p + r, len(p)))
        shared = [x is not None for x in _score_choices_and_extras(model, per_example, 0, batch_size=2, progress=False,
                                                                   extras=extras)[2]]
        assert not all(shared) and (any(shared) or max_length == 40)
        mean, n = response_nll(model, BYTES, exs, chat_template=False, max_length=max_length, progress=False)
        got = choice_accuracy(model, BYTES, exs, chat_template=False, max_length=max_length, batch_size=2, progress=False,
                              with_response_nll=True)
        assert got["response_tokens"] == n and got["response_nll"] == pytest.approx(mean, rel=1e-5)
    # no KV cache: every example through response_nll's full pass, the same numbers
    forward = model.forward

    def no_cache(*a, **kw):
        out = forward(*a, **kw)
        out["cache"] = None
        return out

    monkeypatch.setattr(model, "forward", no_cache)
    got = choice_accuracy(model, BYTES, exs, chat_template=False, progress=False, with_response_nll=True)
    mean, n = response_nll(model, BYTES, exs, chat_template=False, progress=False)
    assert got["response_tokens"] == n and got["response_nll"] == pytest.approx(mean, rel=1e-6)


def test_fused_ppl_is_read_from_the_prompt_cache_even_when_each_choice_is_one_token():
    """Single-token choices need no choice pass; the ppl rows (response + EOS, two tokens) still get theirs."""
    from kappatune.evaluation import response_nll

    model = build_tiny_llama(seed=2)
    exs = [{"prompt": f"item {i} is ", "response": "xyz"[i % 3], "choices": list("xyz")} for i in range(6)]
    calls = []
    h = model.register_forward_pre_hook(lambda mod, a, kw: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    got = choice_accuracy(model, BYTES, exs, chat_template=False, batch_size=6, progress=False, with_response_nll=True)
    h.remove()
    assert len(calls) == 2 and calls[1] == (6, 1)  # the prompts, then each response's token (its EOS is predicted)
    mean, n = response_nll(model, BYTES, exs, chat_template=False, progress=False)
    assert got["response_tokens"] == n == 12 and got["response_nll"] == pytest.approx(mean, rel=1e-5)
