"""The documented recipe (examples/trainer_recipe.py): any kappatune method inside transformers.Trainer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from kappatune.models import build_tiny_llama

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _recipe():
    spec = importlib.util.spec_from_file_location("trainer_recipe", REPO / "examples" / "trainer_recipe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("method, options", [("selective", {"policy": "kappa", "top_p": 0.3}), ("lora", {"rank": 4})])
def test_trainer_recipe_trains_only_the_selected_tensors(tmp_path, method, options):
    torch.manual_seed(0)
    blocks = torch.randint(3, 259, (16, 32))
    base = {n: p.detach().clone() for n, p in build_tiny_llama().named_parameters()}
    m, trainer = _recipe().run_recipe(build_tiny_llama(), blocks, method=method, options=options, steps=3, lr=1e-2,
                                      output_dir=str(tmp_path))
    assert trainer.state.global_step == 3
    assert trainer.optimizer.optimizer is not None  # the Trainer used (wrapped) the method's optimizer
    trained = {id(p) for p in m.trainable_parameters()}
    if method == "selective":
        params = dict(m.model.named_parameters())
        for n, p in params.items():
            if id(p) in trained:
                assert not torch.equal(p, base[n]), f"{n} was selected but did not change"
            else:
                assert torch.equal(p, base[n]), f"{n} is frozen but changed"
        state = trainer.optimizer.optimizer.state  # optimizer state only for the selected tensors
        assert {id(p) for p in state} == trained
    else:  # LoRA: the base weights are bitwise frozen inside the adapter; the adapters moved
        for n, p in m.model.named_parameters():
            key = n.removeprefix("base_model.model.").replace(".base_layer", "")
            if "lora_" in n:
                continue
            assert torch.equal(p, base[key]), f"{n} is frozen but changed"
        assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in m.model.named_parameters() if "lora_B" in n)
    merged = m.merge()
    merged.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "config.json").is_file()
