"""Every method on a CUDA device: prepare, train, the next sequential task, save and load, and one two-task run
through the harness. Skipped without a GPU (CI has none); run on a lent GPU machine, where the first study run
found a CPU-only tensor in OSF's ``next_task`` that the CPU suite could not see."""

from __future__ import annotations

import warnings

import pytest
import torch

from kappatune.methods import get_method
from kappatune.models import build_tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TARGETS = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj"]
CONFIGS = {
    "full": {},
    "selective": {"policy": "kappa", "num_modules": 3},
    "lora": {"rank": 4},
    "osf": {"progress": False},
    "eigentune": {"rank": 3},
    "curlora": {"rank": 4},
}


def _tokens(seed: int, shape=(2, 16)) -> torch.Tensor:
    return torch.randint(0, 320, shape, generator=torch.Generator().manual_seed(seed)).cuda()


def _train(method, model, steps: int = 3) -> None:
    opt = method.make_optimizer(lr=1e-2)
    x = _tokens(0)
    model.train()
    for _ in range(steps):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _prepared(name: str, model):
    """The method ``name`` set up on ``model`` (OSF with its calibration ids, which may come from the CPU data
    pipeline), and the prepared model."""
    m = get_method(name, CONFIGS[name])
    if name == "osf":
        m.set_calibration(_tokens(2, (4, 24)).cpu())
    return m, m.prepare(model, None if name == "full" else TARGETS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_method_lifecycle_on_cuda(name, tmp_path):
    if name == "eigentune":
        pytest.importorskip("eigentune")  # its reference package (a kappatune dependency, absent from bare images)
    model = build_tiny_llama().cuda()
    x = _tokens(1)
    with torch.no_grad():
        before = model(input_ids=x).logits.clone()
    m, pm = _prepared(name, model)
    assert all(p.device.type == "cuda" for p in pm.parameters())
    _train(m, pm)
    if hasattr(m, "next_task"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m.next_task()
        _train(m, pm)
    with torch.no_grad():
        after = pm(input_ids=x).logits
    assert torch.isfinite(after).all() and not torch.equal(after, before)
    path = m.save(tmp_path / "adapter.safetensors")
    m2, pm2 = _prepared(name, build_tiny_llama().cuda())
    m2.load(path)
    with torch.no_grad():
        assert torch.allclose(pm2(input_ids=x).logits, after, atol=1e-4)


@pytest.mark.parametrize("method", [{"name": "osf"}, {"name": "selective", "options": {"policy": "kappa", "top_p": 0.5}}])
def test_two_task_sft_run_on_cuda(method, tmp_path):
    """The harness end to end on the GPU (accelerate places the model): both stages, evaluation, next_task."""
    pytest.importorskip("datasets")  # reads the jsonl files (a kappatune dependency, absent from bare images)
    from kappatune.harness import run
    from run_helpers import make_corpora, tiny_sft_config, write_sft

    (tmp_path / "data").mkdir()
    corpora = make_corpora(tmp_path / "data")
    sft = {k: write_sft(tmp_path / "data" / f"{k}.jsonl", k, 30) for k in ("alpha", "beta")}
    cfg = tiny_sft_config(corpora, sft, tmp_path / "run", method=method)
    res = run(cfg)
    acc = res["matrix"]["accuracy"]
    assert len(acc) == 3 and all(v is not None for v in acc[-1])
