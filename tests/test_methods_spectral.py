"""Property tests for the spectral methods: OSF (adaptive rank), EigenTune, CURLoRA."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from kappatune.errors import CacheError, ConfigError, DataError
from kappatune.methods import METHODS, get_method
from kappatune.models import build_tiny_llama
from kappatune.selection import Selection

TOKENS = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
CALIB = torch.randint(0, 320, (4, 24), generator=torch.Generator().manual_seed(1))
SOME = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj"]


def logits(model: nn.Module, x: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def train(method, model: nn.Module, steps: int = 4, lr: float = 1e-2) -> float:
    opt = method.make_optimizer(lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=TOKENS, labels=TOKENS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return float(loss.detach())


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_registered():
    from kappatune import methods

    get_method("osf"), get_method("eigentune"), get_method("curlora")
    assert {"osf", "eigentune", "curlora"} <= set(METHODS)
    assert (methods.OSF, methods.EigenTune, methods.CURLoRA) == (METHODS["osf"], METHODS["eigentune"], METHODS["curlora"])
    with pytest.raises(ConfigError, match="unknown method"):
        get_method("curlroa")


# ---------------------------------------------------------------------------------------------------------------
# CURLoRA
# ---------------------------------------------------------------------------------------------------------------
def test_curlora_identity_at_init_and_only_U_trainable():
    model = build_tiny_llama()
    ref = logits(model)
    m = get_method("curlora", {"rank": 4})
    pm = m.prepare(model, SOME)
    assert torch.equal(logits(pm), ref)
    names = trainable_names(pm)
    assert sorted(names) == sorted(f"{n}.U" for n in SOME)
    assert m.num_trainable() == len(SOME) * 16


def test_curlora_C_R_are_columns_and_rows_of_W():
    from kappatune.methods.curlora import CURLinear

    model = build_tiny_llama()
    m = get_method("curlora", {"rank": 5, "seed": 3})
    pm = m.prepare(model)  # all-linear
    layers = [mod for mod in pm.modules() if isinstance(mod, CURLinear)]
    assert len(layers) == 14
    for layer in layers:
        W = layer.base.weight
        assert torch.equal(layer.C, W[:, layer.col_idx]) and torch.equal(layer.R, W[layer.row_idx, :])
        for j, c in enumerate(layer.col_idx.tolist()):
            assert torch.equal(layer.C[:, j], W[:, c])


def test_curlora_low_importance_columns_sampled_more_often():
    from kappatune.methods.curlora import CURLinear, inverse_importance_probs

    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=False)
    scale = torch.logspace(-1, 1, 16)  # column norms spread over two decades
    with torch.no_grad():
        lin.weight.mul_(scale / lin.weight.norm(dim=0))
    counts = torch.zeros(16)
    seeds = 400
    for s in range(seeds):
        layer = CURLinear(lin, 4, generator=torch.Generator().manual_seed(s))
        counts += torch.bincount(layer.col_idx, minlength=16)
    freq = counts / counts.sum()
    low, high = freq[:8].sum(), freq[8:].sum()  # first half: smallest norms
    assert low > 0.8 and high < 0.2, (low, high)
    # frequencies follow the inverse-importance probabilities (the smallest column is the most frequent)
    p = inverse_importance_probs(lin.weight, 0)
    assert int(freq.argmax()) == 0 and torch.allclose(freq, p, atol=0.03)
    sq = lin.weight.pow(2).sum(0)
    assert torch.all(p[:-1] >= p[1:]) and torch.all(sq[:-1] <= sq[1:])


def test_curlora_merge_unmerge_exact_and_plain_model():
    from kappatune.methods.curlora import CURLinear

    model = build_tiny_llama()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = get_method("curlora", {"rank": 4})
    pm = m.prepare(model)
    train(m, pm)
    adapted = logits(pm)
    layer = next(mod for mod in pm.modules() if isinstance(mod, CURLinear))
    assert layer.U.abs().sum() > 0
    before = layer.base.weight.detach().clone()
    layer.merge()
    assert torch.allclose(layer.base.weight, before + layer.C @ layer.U @ layer.R, atol=1e-6)
    assert torch.allclose(logits(pm), adapted, atol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.base.weight, before)  # bitwise
    plain = m.merge()
    assert not any(isinstance(mod, CURLinear) for mod in plain.modules())
    assert sorted(n for n, _ in plain.named_parameters()) == sorted(w0)
    assert torch.allclose(logits(plain), adapted, atol=1e-5)


def test_curlora_conv1d_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=320, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    ref = logits(model)
    m = get_method("curlora", {"rank": 3})
    pm = m.prepare(model)  # c_attn, c_proj, c_fc, mlp.c_proj (Conv1D, weight [in, out])
    assert torch.equal(logits(pm), ref)
    train(m, pm)
    adapted = logits(pm)
    assert not torch.allclose(adapted, ref)
    assert torch.allclose(logits(m.merge()), adapted, atol=1e-5)


def test_curlora_save_load_roundtrip_and_wrong_base(tmp_path):
    model = build_tiny_llama()
    m = get_method("curlora", {"rank": 4, "seed": 7})
    pm = m.prepare(model, SOME)
    train(m, pm)
    want = logits(pm)
    path = m.save(tmp_path / "a.safetensors")
    m2 = get_method("curlora", {"rank": 4, "seed": 99})  # different sampling; indices come from the file
    pm2 = m2.prepare(build_tiny_llama(), SOME)
    m2.load(path)
    assert torch.equal(logits(pm2), want)
    m3 = get_method("curlora", {"rank": 4, "seed": 7})
    m3.prepare(build_tiny_llama(seed=1), SOME)
    with pytest.raises(CacheError, match="different base"):
        m3.load(path)


def test_curlora_bad_configs():
    with pytest.raises(ConfigError, match="larger than"):
        get_method("curlora", {"rank": 33}).prepare(build_tiny_llama(), ["model.layers.0.self_attn.k_proj"])  # 32 x 64
    with pytest.raises(ConfigError, match="empty selection"):
        get_method("curlora").prepare(build_tiny_llama(), Selection("kappa", [], []))
    with pytest.raises(ConfigError, match="not found"):
        get_method("curlora").prepare(build_tiny_llama(), ["model.nope"])
    with pytest.raises(ConfigError, match="unknown option"):
        get_method("curlora", {"rnak": 4})


# ---------------------------------------------------------------------------------------------------------------
# EigenTune
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,per_layer", [("diagonal", 4), ("spectral_core", 16)])
def test_eigentune_identity_only_delta_and_exact_merge(variant, per_layer):
    import eigentune

    model = build_tiny_llama()
    ref = logits(model)
    sel = Selection("kappa", SOME, [f"{n}.weight" for n in SOME])  # a κ selection: only these layers
    m = get_method("eigentune", {"rank": 4, "variant": variant})
    pm = m.prepare(model, sel)
    assert torch.equal(logits(pm), ref)
    suffix = "delta" if variant == "diagonal" else "core"
    assert sorted(trainable_names(pm)) == sorted(f"{n}.{suffix}" for n in SOME)
    assert m.num_trainable() == len(SOME) * per_layer
    assert set(m.layers()) == set(SOME)
    w_before = {n: l.base.weight.detach().clone() for n, l in m.layers().items()}
    expected = {}
    train(m, pm)
    for n, l in m.layers().items():
        d = l.trainable().detach()
        assert d.abs().sum() > 0
        core = torch.diag(d) if variant == "diagonal" else d
        expected[n] = w_before[n] + l.U @ core @ l.Vh
    adapted = logits(pm)
    plain = m.merge()
    assert not any(isinstance(mod, eigentune.EigenTuneLinear) for mod in plain.modules())
    for n in SOME:
        assert torch.allclose(plain.get_submodule(n).weight, expected[n], atol=1e-6)
    assert torch.allclose(logits(plain), adapted, atol=1e-5)


def test_eigentune_save_load_and_errors(tmp_path):
    m = get_method("eigentune", {"rank": 3})
    pm = m.prepare(build_tiny_llama())
    train(m, pm)
    want = logits(pm)
    path = m.save(tmp_path / "e.safetensors")
    m2 = get_method("eigentune", {"rank": 3})
    pm2 = m2.prepare(build_tiny_llama())
    m2.load(path)
    assert torch.equal(logits(pm2), want)
    m3 = get_method("eigentune", {"rank": 3})
    m3.prepare(build_tiny_llama(seed=2))
    with pytest.raises(CacheError):
        m3.load(path)
    with pytest.raises(ConfigError, match="larger than"):
        get_method("eigentune", {"rank": 40}).prepare(build_tiny_llama(), ["model.layers.0.self_attn.k_proj"])
    with pytest.raises(ConfigError, match="variant"):
        get_method("eigentune", {"variant": "full"}).prepare(build_tiny_llama())
    with pytest.raises(ConfigError, match="empty selection"):
        get_method("eigentune").prepare(build_tiny_llama(), [])


# ---------------------------------------------------------------------------------------------------------------
# OSF
# ---------------------------------------------------------------------------------------------------------------
def _osf(calib: bool = True, **cfg) -> tuple:
    model = build_tiny_llama()
    m = get_method("osf", {"progress": False, **cfg})
    if calib:
        m.set_calibration(CALIB)
    return model, m


def test_osf_importance_to_rank_pattern():
    from kappatune.methods.osf import layer_importance, preserved_ranks

    model, m = _osf()
    scores = layer_importance(model, CALIB, "model.layers", progress=False)
    assert len(scores) == 2 and all(0.0 <= s <= 2.0 for s in scores)
    ref = logits(model)
    pm = m.prepare(model)
    assert torch.allclose(logits(pm), ref, atol=1e-5)  # identity at init (up to SVD round-off)
    hi, lo = (1, 0) if scores[1] > scores[0] else (0, 1)
    # PEFT got the per-module rank: the most important layer preserves max_retention, the least min_retention
    for name, layer in m.layers().items():
        k = layer.effective_rank["default"]
        assert k == m.ranks[name]
        d = min(layer.get_base_layer().weight.shape)
        frac = 0.9 if f"layers.{hi}." in name else 0.1
        assert k == round(frac * d)
        assert layer.osf_svd_params["default"]["U_low"].shape[1] == d - k
    assert preserved_ranks({"a": (64, 64)}, {"a": 0.5}, 0.2, 0.6) == {"a": round(0.4 * 64)}
    assert preserved_ranks({"a": (8, 64)}, {"a": 1.0}, 0.5, 1.0) == {"a": 7}  # clamped: at least one trainable


@pytest.mark.parametrize("opt_cls,lr", [(torch.optim.AdamW, 1e-2), (torch.optim.SGD, 1.0)])
def test_osf_update_has_no_component_in_preserved_subspace(opt_cls, lr):
    model, m = _osf()
    pm = m.prepare(model)
    opt = m.make_optimizer(opt_cls, lr=lr)
    for _ in range(5):
        pm(input_ids=TOKENS, labels=TOKENS).loss.backward()
        opt.step()
        opt.zero_grad()
    bases = m.preserved_bases()
    for name, dW in m.delta_weights().items():
        PU, PV = bases[name]
        assert dW.norm() > 1e-4, name  # it did train
        assert (PU.T @ dW).norm() <= 1e-4 * dW.norm() + 1e-6, name  # U_k^T dW = 0 (PEFT alone + AdamW: ~0.2)
        assert (dW @ PV.T).norm() <= 1e-4 * dW.norm() + 1e-6, name  # dW V_k = 0
        # the preserved directions are the top singular directions of the base weight
        W = m.layers()[name].get_base_layer().weight
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        k = PU.shape[1]
        assert torch.allclose((PU.T @ U[:, :k]).abs().det().abs(), torch.tensor(1.0), atol=1e-4)


def test_osf_guarantee_holds_through_accelerate_with_weight_decay():
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model, m = _osf()
    pm = m.prepare(model)
    wrapped, opt = acc.prepare(pm, m.make_optimizer(lr=1e-2, weight_decay=0.1))
    for _ in range(5):
        acc.backward(wrapped(input_ids=TOKENS, labels=TOKENS).loss)
        opt.step()
        opt.zero_grad()
    bases = m.preserved_bases()
    for name, dW in m.delta_weights().items():
        PU, PV = bases[name]
        assert dW.norm() > 1e-4
        assert (PU.T @ dW).norm() <= 1e-4 * dW.norm() and (dW @ PV.T).norm() <= 1e-4 * dW.norm()


def test_osf_dense_forward_matches_peft_factored_forward():
    model, m = _osf(effective_rank=0.25)
    pm = m.prepare(model, SOME)
    train(m, pm, steps=2)  # non-trivial factors
    layer = m.layers()[SOME[1]]  # down_proj: 64 x 160, dense path once tokens > 64*160/224 ~ 46
    x = torch.randn(4, 32, 160, requires_grad=True)
    y_dense = layer(x)
    y_peft = type(layer).forward(layer, x)
    assert torch.allclose(y_dense, y_peft, atol=1e-5)
    params = list(layer.osf_svd_params["default"].values())
    g_dense = torch.autograd.grad(y_dense.square().sum(), params + [x])
    g_peft = torch.autograd.grad(y_peft.square().sum(), params + [x])
    for a, b in zip(g_dense, g_peft):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_osf_sequential_tasks_keep_earlier_task_directions():
    model, m = _osf(task_energy=0.9)
    pm = m.prepare(model)
    train(m, pm, lr=1e-3)
    dW1 = m.delta_weights()
    k_before = {n: b[0].shape[1] for n, b in m.preserved_bases().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ranks = m.next_task()
    assert all(ranks[n] > k_before[n] for n in ranks)  # task 1's directions were added
    assert all(d.abs().max() == 0 for d in m.delta_weights().values())  # task 2 starts at identity
    W_after_1 = {n: l.get_base_layer().weight.detach().clone() for n, l in m.layers().items()}
    before2 = logits(pm)
    train(m, pm, lr=1e-3)  # a fresh optimizer over the new factors
    assert not torch.allclose(logits(pm), before2)
    bases = m.preserved_bases()
    for name, dW2 in m.delta_weights().items():
        PU, PV = bases[name]
        assert (PU.T @ dW2).norm() <= 1e-5 * dW2.norm() + 1e-6
        assert (dW2 @ PV.T).norm() <= 1e-5 * dW2.norm() + 1e-6
        # task 1's main update directions: W restricted to them is unchanged by task 2
        U1, S1, V1h = torch.linalg.svd(dW1[name], full_matrices=False)
        k = min(3, ranks[name] - k_before[name])  # a nearly full layer may have had room for fewer
        assert k >= 1
        W2 = W_after_1[name] + dW2
        assert torch.allclose(U1[:, :k].T @ W2 @ V1h[:k].T, U1[:, :k].T @ W_after_1[name] @ V1h[:k].T, atol=1e-5)


def test_osf_save_load_after_next_task(tmp_path):
    """A file saved during task 2 takes the *original* base to the task-2 state (merged task-1 weights included),
    which is what resuming a multi-stage run needs."""
    model, m = _osf()
    pm = m.prepare(model, SOME)
    train(m, pm, lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.next_task()
    train(m, pm, lr=1e-3)
    want = logits(pm)
    path = m.save(tmp_path / "t2.safetensors")
    _, m2 = _osf()
    pm2 = m2.prepare(build_tiny_llama(), SOME)  # the original base
    m2.load(path)  # restores merged weights, task-2 preserved bases and factors (other ranks than a fresh prepare)
    assert m2.task == 1
    assert torch.allclose(logits(pm2), want, atol=1e-5)
    assert {n: b[0].shape for n, b in m2.preserved_bases().items()} == {n: b[0].shape for n, b in m.preserved_bases().items()}
    for n in SOME:
        assert torch.equal(m2.layers()[n].get_base_layer().weight, m.layers()[n].get_base_layer().weight)
    assert torch.allclose(logits(m2.merge()), want, atol=1e-5)
    _, m3 = _osf()
    m3.prepare(build_tiny_llama(seed=3), SOME)
    with pytest.raises(CacheError, match="different base"):
        m3.load(path)


@pytest.mark.parametrize("name", ["osf", "eigentune", "curlora"])
def test_moe_model_and_fused_expert_selection(name):
    from kappatune.models import build_tiny_moe

    model = build_tiny_moe()
    ref = logits(model)
    attn = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj"]
    sel = Selection("kappa", attn, [f"{n}.weight" for n in attn] + ["model.layers.0.mlp.experts.down_proj"],
                    moe_parameter_names=["model.layers.0.mlp.experts.down_proj"])
    m = get_method(name, {"rank": 4} if name != "osf" else {"progress": False})
    with pytest.warns(UserWarning, match="fused MoE"):
        pm = m.prepare(model, sel)
    assert torch.allclose(logits(pm), ref, atol=1e-5)
    assert all(any(f"{a}." in t for a in attn) for t in trainable_names(pm))  # PEFT adds a prefix
    only_moe = Selection("kappa", [], ["model.layers.0.mlp.experts.down_proj"], moe_parameter_names=["model.layers.0.mlp.experts.down_proj"])
    with pytest.raises(ConfigError, match="only fused MoE"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_method(name).prepare(build_tiny_moe(), only_moe)


def test_osf_uniform_fallback_fixed_rank_and_errors():
    model, m = _osf(calib=False)
    with pytest.warns(UserWarning, match="no calibration"):
        m.prepare(model)
    for name, layer in m.layers().items():
        assert layer.effective_rank["default"] == round(0.5 * min(layer.get_base_layer().weight.shape))
    model, m = _osf(calib=False, effective_rank=40)
    with pytest.raises(ConfigError, match="preserves all"):
        m.prepare(model, ["model.layers.0.self_attn.k_proj"])  # min dim 32
    with pytest.raises(ConfigError, match="min_retention"):
        _osf(min_retention=0.8, max_retention=0.2)[1].prepare(build_tiny_llama())
    with pytest.raises(ConfigError, match="empty selection"):
        _osf()[1].prepare(build_tiny_llama(), Selection("kappa", [], []))
    with pytest.raises(DataError):
        get_method("osf").set_calibration(torch.rand(2, 3))
    with pytest.raises(DataError, match="token ids must lie"):
        get_method("osf", {"progress": False}).set_calibration(torch.full((2, 8), 999)).prepare(build_tiny_llama())


def test_osf_merge_save_load(tmp_path):
    model, m = _osf(effective_rank=0.5)
    pm = m.prepare(model, SOME)
    assert set(m.layers()) == set(SOME)
    train(m, pm, lr=1e-3)
    want = logits(pm)
    path = m.save(tmp_path / "o.safetensors")
    _, m2 = _osf(effective_rank=0.5)
    pm2 = m2.prepare(build_tiny_llama(), SOME)
    m2.load(path)
    assert torch.allclose(logits(pm2), want, atol=1e-6)
    plain = m2.merge()
    assert type(plain.get_submodule(SOME[0])) is nn.Linear
    assert torch.allclose(logits(plain), want, atol=1e-5)
    _, m3 = _osf(effective_rank=0.5)
    m3.prepare(build_tiny_llama(seed=3), SOME)
    with pytest.raises(CacheError, match="different base"):
        m3.load(path)


# ---------------------------------------------------------------------------------------------------------------
# Budget matching
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,budget,config", [
    ("curlora", 500, {}),
    ("eigentune", 300, {}),
    ("eigentune", 2000, {"variant": "spectral_core"}),
    ("eigentune", 17920, {"variant": "spectral_core"}),  # LoRA r=8 on tiny-llama: needs rank > 32 (k/v are 32 x 64)
    ("curlora", 17920, {}),
    ("osf", 30000, {"progress": False}),
    ("osf", 100000, {"progress": False}),  # scale c > 1/(1 - mrr): the least important layers train everything
    ("osf", 30000, {"progress": False, "effective_rank": 8}),
])
def test_for_budget_lands_within_ten_percent(name, budget, config):
    from kappatune.methods import for_budget

    kw = {"calibration": CALIB} if name == "osf" and "effective_rank" not in config else {}
    m = for_budget(name, build_tiny_llama(), budget, "all-linear", **kw, **config)
    assert abs(m.budget_report.num_params - budget) <= 0.1 * budget
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.prepare(build_tiny_llama())
    assert m.num_trainable() == m.budget_report.num_params


def test_osf_budget_holds_when_calibration_comes_after_for_budget():
    """The harness matches the budget first and sets calibration data before prepare()."""
    from kappatune.methods import for_budget

    m = for_budget("osf", build_tiny_llama(), 30000, progress=False)  # uniform importance at this point
    m.set_calibration(CALIB)
    m.prepare(build_tiny_llama())
    assert m.num_trainable() == m.budget_report.num_params
    assert abs(m.num_trainable() - 30000) <= 3000
    per_layer = {i: [m.ranks[n] / min(m.layers()[n].get_base_layer().weight.shape) for n in m.ranks if f"layers.{i}." in n]
                 for i in (0, 1)}
    assert min(per_layer[0]) != min(per_layer[1])  # the calibration made the layers differ


def test_for_budget_impossible_budget_is_a_config_error():
    from kappatune.methods import for_budget

    with pytest.raises(ConfigError, match="cannot land"):
        for_budget("eigentune", build_tiny_llama(), 10**7)


@pytest.mark.parametrize("name,config", [("curlora", {"rank": 4}), ("eigentune", {"rank": 4}), ("osf", {"progress": False})])
def test_plain_nn_module(name, config):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    x, y = torch.randn(64, 16), torch.randn(64, 8)
    ref = net(x).detach()
    m = get_method(name, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # OSF: no calibration
        pm = m.prepare(net)
    assert torch.allclose(pm(x), ref, atol=1e-5)
    opt = m.make_optimizer(lr=1e-2)
    for _ in range(5):
        ((pm(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    out = pm(x).detach()
    assert not torch.allclose(out, ref, atol=1e-4)
    plain = m.merge()
    assert [type(c) for c in plain] == [nn.Linear, nn.ReLU, nn.Linear]
    assert torch.allclose(plain(x), out, atol=1e-5)


@pytest.mark.parametrize("name,config", [("curlora", {"rank": 4}), ("eigentune", {"rank": 4}), ("osf", {"progress": False})])
def test_kappa_selected_targets(name, config):
    """A real κ selection (lowest-κ half of the linear weights) adapts exactly the selected modules."""
    from kappatune.selection import select_targets

    model = build_tiny_llama()
    sel = select_targets(model, "kappa", top_p=0.5, progress=False)
    assert sel.module_names
    m = get_method(name, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = m.prepare(model, sel)

    def module_of(param: str) -> str:  # "<module>.U" / "<module>.delta" / "base_model.model.<module>.osf_svd_params..."
        param = param.removeprefix("base_model.model.")
        return param.split(".osf_svd_params")[0] if ".osf_svd_params" in param else param.rsplit(".", 1)[0]

    assert {module_of(n) for n in trainable_names(pm)} == set(sel.module_names)


def test_osf_energy_rank_is_the_smallest_k_reaching_the_energy():
    from kappatune.methods.osf import _energy_rank

    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14: cumulative 0.643, 0.929, 1
    assert [_energy_rank(s, e) for e in (0.5, 0.643, 0.9, 0.95, 1.0)] == [1, 2, 2, 3, 3]
    assert _energy_rank(torch.zeros(3), 0.9) == 0
    assert isinstance(_energy_rank(s.float(), 0.5), int)
