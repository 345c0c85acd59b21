"""Property tests for full fine-tuning, KappaTune selective fine-tuning, LoRA / κ-LoRA and budget matching."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kappatune.errors import CacheError, ConfigError
from kappatune.methods import METHODS, for_budget, get_method
from kappatune.methods.budget import match_budgets, selection_from_names
from kappatune.methods.lora import lora_params_per_rank
from kappatune.methods.selective import SelectiveOptimizer, selective_optimizer
from kappatune.models import build_tiny_llama, build_tiny_moe
from kappatune.selection import Selection


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # The spectral analysis caches by weight fingerprint; keep tests independent of the user's cache.
    monkeypatch.setenv("KAPPATUNE_CACHE", str(tmp_path / "cache"))


def _batch(seed: int = 0, n: int = 2, t: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (n, t), generator=g)


def _train(model, opt, steps: int = 3) -> None:
    model.train()
    for i in range(steps):
        x = _batch(i)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _linear_kappas(model) -> dict[str, float]:
    """Independent κ of every linear layer except the output head (reference for the κ-LoRA test)."""
    head = model.get_output_embeddings()
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and m is not head:
            s = torch.linalg.svdvals(m.weight.detach().double())
            out[name] = float(s[0] / s[-1])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Selective fine-tuning
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy, build", [("kappa", build_tiny_llama), ("random", build_tiny_llama),
                                           ("snr", build_tiny_llama), ("kappa", build_tiny_moe)])
def test_selective_non_selected_bitwise_frozen(policy, build):
    model = build()
    method = get_method("selective", {"policy": policy, "num_modules": 4, "seed": 3})
    method.prepare(model)
    before = _snapshot(model)
    # weight decay would move every parameter it sees: only selected ones may be seen
    opt = method.make_optimizer(torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    _train(model, opt, steps=4)
    chosen = set(method.selection.parameter_names)
    assert len(chosen) == 4
    for n, p in model.named_parameters():
        if n in chosen:
            assert not torch.equal(p, before[n]), f"selected {n} did not train"
        else:
            assert torch.equal(p, before[n]), f"non-selected {n} changed"
            assert p.grad is None and not p.requires_grad


def test_selective_state_only_for_selected_and_scales():
    sizes = {}
    for k in (2, 6):
        model = build_tiny_llama()
        method = get_method("selective", {"policy": "kappa", "num_modules": k})
        method.prepare(model)
        opt = method.make_optimizer(torch.optim.AdamW, lr=1e-3)
        _train(model, opt, steps=1)
        selected = {id(p) for p in method.trainable_parameters()}
        assert {id(p) for p in opt.state} == selected
        assert all(id(p) in selected for g in opt.param_groups for p in g["params"])
        # AdamW keeps two moments per trained weight: state is exactly 2 × the selection, not the model
        assert opt.state_numel() == 2 * method.num_trainable() == 2 * method.selection.num_params
        sizes[k] = opt.state_numel()
    assert sizes[6] > sizes[2]


@pytest.mark.parametrize(
    "cls, kwargs",
    [(torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.1)), (torch.optim.Adagrad, dict(lr=0.1)),
     (torch.optim.RMSprop, dict(lr=1e-2)), (torch.optim.Adam, dict(lr=1e-2, amsgrad=True))],
)
def test_selective_wraps_any_optimizer(cls, kwargs):
    model = build_tiny_llama()
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    before = _snapshot(model)
    opt = selective_optimizer(model, Selection("explicit", [], names), cls, **kwargs)
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt.optimizer, cls)
    _train(model, opt, steps=2)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n not in names), n


def test_selective_optimizer_filters_full_param_list_and_groups():
    model = build_tiny_llama()
    params = dict(model.named_parameters())
    sel = [params["model.layers.0.mlp.down_proj.weight"]]
    groups = [{"params": [p for n, p in params.items() if "mlp" in n], "weight_decay": 0.1},
              {"params": [p for n, p in params.items() if "mlp" not in n], "weight_decay": 0.0}]
    opt = SelectiveOptimizer(groups, torch.optim.AdamW, selected=sel, lr=1e-3)
    assert [len(g["params"]) for g in opt.param_groups] == [1]
    assert opt.param_groups[0]["weight_decay"] == 0.1
    # params added later are filtered too
    opt.add_param_group({"params": [params["model.norm.weight"]]})
    assert len(opt.param_groups) == 1
    with pytest.raises(ConfigError, match="empty selection"):
        SelectiveOptimizer(model.parameters(), torch.optim.AdamW, selected=[])
    with pytest.raises(ConfigError, match="Optimizer class"):
        SelectiveOptimizer(model.parameters(), object, selected=sel)  # type: ignore[arg-type]


def test_selective_state_dict_round_trip():
    def setup():
        model = build_tiny_llama()
        method = get_method("selective", {"policy": "kappa", "num_modules": 3})
        method.prepare(model)
        return model, method.make_optimizer(torch.optim.AdamW, lr=1e-2, weight_decay=0.05)

    model_a, opt_a = setup()
    _train(model_a, opt_a, steps=2)
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    model_b, opt_b = setup()
    model_b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["opt"])
    assert opt_b.state is opt_b.optimizer.state and opt_b.param_groups is opt_b.optimizer.param_groups
    # one more identical step on both: identical results only if moments and step counts were restored
    for m, o in ((model_a, opt_a), (model_b, opt_b)):
        x = _batch(9)
        m(input_ids=x, labels=x).loss.backward()
        o.step()
        o.zero_grad()
    for (n, pa), (_, pb) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert torch.equal(pa, pb), n

    # a state from another selection is refused clearly
    model_c = build_tiny_llama()
    method_c = get_method("selective", {"policy": "kappa", "num_modules": 5})
    method_c.prepare(model_c)
    with pytest.raises(ConfigError, match="same selection"):
        method_c.make_optimizer(lr=1e-3).load_state_dict(saved["opt"])


def test_selective_with_lr_scheduler_and_accelerate():
    from accelerate import Accelerator

    model = build_tiny_llama()
    method = get_method("selective", {"policy": "snr", "num_modules": 2})
    method.prepare(model)
    before = _snapshot(model)
    opt = method.make_optimizer(torch.optim.AdamW, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    acc = Accelerator(cpu=True)
    model_p, opt_p, sched_p = acc.prepare(model, opt, sched)
    model_p.train()
    for i in range(3):
        x = _batch(i)
        acc.backward(model_p(input_ids=x, labels=x).loss)
        opt_p.step()
        sched_p.step()
        opt_p.zero_grad()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 3)
    chosen = set(method.selection.parameter_names)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n not in chosen), n


def test_selective_as_trainer_optimizer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = build_tiny_llama()
    method = get_method("selective", {"policy": "kappa", "num_modules": 2})
    method.prepare(model)
    before = _snapshot(model)
    opt = method.make_optimizer(torch.optim.AdamW, lr=1e-2)
    data = [{"input_ids": x, "labels": x} for x in _batch(0, n=8)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    trainer.train()
    chosen = set(method.selection.parameter_names)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == chosen


def test_selective_save_load_and_refuse_other_base(tmp_path):
    model = build_tiny_llama()
    method = get_method("selective", {"policy": "kappa", "num_modules": 3})
    method.prepare(model)
    _train(model, method.make_optimizer(lr=1e-2), steps=2)
    path = method.save(tmp_path / "sel.safetensors")
    x = _batch(5)
    with torch.no_grad():
        want = model(input_ids=x).logits

    fresh = get_method("selective", {"policy": "kappa", "num_modules": 3})
    m2 = fresh.prepare(build_tiny_llama())
    fresh.load(path)
    with torch.no_grad():
        assert torch.equal(m2(input_ids=x).logits, want)

    other = get_method("selective", {"policy": "kappa", "num_modules": 3})
    other.prepare(build_tiny_llama(seed=1))
    with pytest.raises(CacheError, match="different base"):
        other.load(path)


def test_random_selection_is_seeded():
    def pick(seed):
        m = get_method("selective", {"policy": "random", "num_modules": 4, "seed": seed})
        m.prepare(build_tiny_llama())
        return m.selection.parameter_names

    assert pick(1) == pick(1)
    assert any(pick(1) != pick(s) for s in (2, 3, 4))


# ---------------------------------------------------------------------------------------------------------------
# LoRA / κ-LoRA
# ---------------------------------------------------------------------------------------------------------------
def _lora_modules(peft_model) -> set[str]:
    out = set()
    for n, m in peft_model.named_modules():
        if hasattr(m, "lora_A") and len(getattr(m, "lora_A", {})):
            out.add(n.removeprefix("base_model.model."))
    return out


def test_kappa_lora_keeps_lowest_kappa_modules():
    model = build_tiny_llama()
    kappas = _linear_kappas(model)
    k = 4
    method = get_method("lora", {"rank": 2, "policy": "kappa", "num_modules": k})
    peft_model = method.prepare(model)
    want = set(sorted(kappas, key=kappas.get)[:k])
    assert _lora_modules(peft_model) == want
    # and not an arbitrary subset: the kept modules all have lower κ than every module left out
    assert max(kappas[n] for n in want) < min(kappas[n] for n in kappas if n not in want)


@pytest.mark.parametrize("build, policy", [(build_tiny_llama, "all"), (build_tiny_llama, "kappa"), (build_tiny_moe, "all")])
def test_lora_identity_at_init_and_exact_count(build, policy):
    model = build()
    x = _batch(1)
    with torch.no_grad():
        base = model(input_ids=x).logits.clone()
    method = get_method("lora", {"rank": 4, "policy": policy, "top_p": None if policy == "all" else 0.5})
    peft_model = method.prepare(model)
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=x).logits, base)
    assert method.num_trainable() == 4 * lora_params_per_rank(method.target_shapes)
    names = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)


def test_lora_targets_fused_moe_parameters():
    model = build_tiny_moe()
    method = get_method("lora", {"rank": 2})
    method.prepare(model)
    assert len(method.selection.moe_parameter_names) == 4  # gate_up_proj and down_proj in both layers
    assert any("experts.lora_A" in n for n, _ in method.model.named_parameters())


@pytest.mark.parametrize("build", [build_tiny_llama, build_tiny_moe])
def test_lora_merge_equals_adapted(build, tmp_path):
    model = build()
    method = get_method("lora", {"rank": 4, "alpha": 8})
    peft_model = method.prepare(model)
    _train(peft_model, method.make_optimizer(lr=5e-2), steps=2)
    x = _batch(3)
    with torch.no_grad():
        adapted = peft_model(input_ids=x).logits.clone()
        merged = method.merge()
        assert type(merged).__name__.endswith("ForCausalLM") and not _lora_modules(merged)
        assert not any("lora" in n for n, _ in merged.named_parameters())
        out = merged(input_ids=x).logits
    assert not torch.equal(adapted, build()(input_ids=x).logits)  # training did change the function
    torch.testing.assert_close(out, adapted, atol=1e-5, rtol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="before merge"):
        method.save(tmp_path / "late.safetensors")


def test_lora_save_load_round_trip_and_refuse_other_base(tmp_path):
    cfg = {"rank": 3, "policy": "kappa", "top_p": 0.5}
    method = get_method("lora", cfg)
    peft_model = method.prepare(build_tiny_llama())
    _train(peft_model, method.make_optimizer(lr=5e-2), steps=2)
    path = method.save(tmp_path / "lora.safetensors")
    x = _batch(4)
    with torch.no_grad():
        want = peft_model(input_ids=x).logits

    again = get_method("lora", cfg)
    m2 = again.prepare(build_tiny_llama())
    again.load(path)
    with torch.no_grad():
        assert torch.equal(m2(input_ids=x).logits, want)

    other = get_method("lora", cfg)
    other.prepare(build_tiny_llama(seed=7))
    with pytest.raises(CacheError, match="different base"):
        other.load(path)
    sel = get_method("selective", {"policy": "all"})
    sel.prepare(build_tiny_llama())
    with pytest.raises(CacheError, match="method"):
        sel.load(path)
    bigger = get_method("lora", {**cfg, "rank": 4})
    bigger.prepare(build_tiny_llama())
    with pytest.raises(CacheError, match="shape mismatch"):
        bigger.load(path)


# ---------------------------------------------------------------------------------------------------------------
# Budget matching
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, config, budget",
    [("selective", {"policy": "kappa"}, 30000), ("selective", {"policy": "random", "seed": 1}, 30000),
     ("selective", {"policy": "snr"}, 50000), ("lora", {"policy": "all"}, 9000), ("lora", {"policy": "kappa", "top_p": 0.5}, 6000),
     ("lora", {"policy": "snr", "top_p": 0.5}, 6000),
     ("lora", {"policy": "all"}, 3000), ("lora", {"policy": "all"}, 5000)],  # between ranks: r+1 on some modules
)
def test_budget_matching_within_ten_percent(name, config, budget):
    model = build_tiny_llama()
    before = _snapshot(model)
    method = for_budget(name, model, budget, **config)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # matching does not touch the model
    r = method.budget_report
    assert abs(r.num_params - budget) <= 0.10 * budget
    method.prepare(model)
    assert method.num_trainable() == r.num_params  # the reported count is exact


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(budget=st.integers(2240, 14 * 2240))
def test_lora_any_budget_from_rank_one_up_is_reachable(budget):
    # between two uniform ranks, r+1 on some modules moves the count in steps of ≤ 224 (< 10% of 2240)
    model = build_tiny_llama()
    method = for_budget("lora", model, budget)
    assert abs(method.budget_report.relative_error) <= 0.10
    method.prepare(model)
    assert method.num_trainable() == method.budget_report.num_params


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(budget=st.integers(1, 120_000), policy=st.sampled_from(["kappa", "snr", "random"]))
def test_selective_budget_exact_or_clear_error(budget, policy):
    model = build_tiny_llama()
    try:
        method = for_budget("selective", model, budget, policy=policy)
    except ConfigError as exc:
        assert "closest" in str(exc) or "smaller than" in str(exc)
        return
    assert abs(method.budget_report.relative_error) <= 0.10
    method.prepare(model)
    assert method.num_trainable() == method.budget_report.num_params


def test_budget_via_config_and_moe():
    method = get_method("selective", {"policy": "kappa", "param_budget": 20000})
    method.prepare(build_tiny_moe())
    assert abs(method.num_trainable() - 20000) <= 2000 and method.budget_report.num_params == method.num_trainable()
    lora = get_method("lora", {"param_budget": 20000})
    lora.prepare(build_tiny_moe())
    assert abs(lora.num_trainable() - 20000) <= 2000 and lora.budget_report.knob == "rank"


def test_selective_budget_takes_the_policys_best_tensors():
    model = build_tiny_llama()
    kappas = _linear_kappas(model)
    order = sorted(kappas, key=kappas.get)
    sizes = {n: m.weight.numel() for n, m in model.named_modules() if n in kappas}
    budget = 25000
    method = for_budget("selective", model, budget, policy="kappa")
    chosen = [n.removesuffix(".weight") for n in method.default_targets.parameter_names]
    assert chosen[0] == order[0]
    assert chosen == [n for n in order if n in chosen]  # taken in ascending-κ order
    used = 0
    for n in order[: order.index(chosen[-1])]:
        if n in chosen:
            used += sizes[n]
        else:  # a lower-κ tensor was skipped only because it did not fit
            assert used + sizes[n] > budget


def test_match_budgets_table_and_unreachable_budget():
    model = build_tiny_llama()
    methods = match_budgets(model, 30000, [("selective", {"policy": "kappa"}), ("selective", {"policy": "random"}), ("lora", {})])
    assert set(methods) == {"selective[kappa]", "selective[random]", "lora"}
    assert all(abs(m.budget_report.relative_error) <= 0.10 for m in methods.values())
    with pytest.raises(ConfigError, match="closest"):
        for_budget("selective", model, 100)  # smaller than any single tensor
    with pytest.raises(ConfigError, match="full fine-tuning always trains"):
        for_budget("full", model, 1000)
    assert for_budget("full", model, sum(p.numel() for p in model.parameters())).budget_report.relative_error == 0


# ---------------------------------------------------------------------------------------------------------------
# Full fine-tuning and bad configs
# ---------------------------------------------------------------------------------------------------------------
def test_full_trains_everything():
    model = build_tiny_llama()
    method = get_method("full")
    method.prepare(model)
    assert method.num_trainable() == sum(p.numel() for p in model.parameters())
    frozen = get_method("full", {"freeze_embeddings": True})
    frozen.prepare(build_tiny_llama())
    assert frozen.num_trainable() == method.num_trainable() - 320 * 64


def test_bad_configs_give_clear_errors():
    with pytest.raises(ConfigError, match="unknown method 'lorra'.*did you mean 'lora'"):
        get_method("lorra")
    with pytest.raises(ConfigError, match="rank 40 is larger than the matrix.*k_proj.*rank ≤ 32"):
        get_method("lora", {"rank": 40}).prepare(build_tiny_llama())
    with pytest.raises(ConfigError, match="empty selection"):
        get_method("lora").prepare(build_tiny_llama(), [])
    with pytest.raises(ConfigError, match="empty selection"):
        get_method("selective").prepare(build_tiny_llama(), Selection("kappa", [], []))
    with pytest.raises(ConfigError, match="empty selection"):
        SelectiveOptimizer(build_tiny_llama().parameters(), selected=[])
    with pytest.raises(ConfigError, match="did you mean 'rank'"):
        get_method("lora", {"rnak": 4})
    with pytest.raises(ConfigError, match="policy: 'kapa' is not one of all, kappa, random, snr, snr_per_type, random_type_matched .did you mean 'kappa'"):
        get_method("selective", {"policy": "kapa"})
    with pytest.raises(ConfigError, match="method 'lora': rank must be ≥ 1, got 0"):
        get_method("lora", {"rank": 0})
    with pytest.raises(ConfigError, match="rank_pattern names 'lm_head'"):
        get_method("lora", {"rank_pattern": {"lm_head": 2}}).prepare(build_tiny_llama())
    with pytest.raises(ConfigError, match="must be an integer in \\[1, 32\\]"):
        get_method("lora", {"rank_pattern": {"model.layers.0.self_attn.k_proj": 33}}).prepare(build_tiny_llama())
    with pytest.raises(ConfigError, match="neither a module nor a parameter"):
        get_method("selective").prepare(build_tiny_llama(), ["model.layers.9.mlp.up_proj"])


def test_registry_names():
    get_method("full")  # loads all modules
    assert {"full", "selective", "lora"} <= set(METHODS)
    from kappatune import methods

    assert methods.SelectiveOptimizer is SelectiveOptimizer and methods.LoRA is METHODS["lora"]
    assert selection_from_names(build_tiny_llama(), ["lm_head"]).parameter_names == ["model.embed_tokens.weight"]


def test_methods_work_on_a_plain_module():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(5, 8)
    before = _snapshot(net)
    sel = get_method("selective")
    sel.prepare(net, ["2"])
    opt = sel.make_optimizer(torch.optim.SGD, lr=0.1, weight_decay=0.1)
    net(x).pow(2).sum().backward()
    opt.step()
    assert torch.equal(net[0].weight, before["0.weight"]) and torch.equal(net[0].bias, before["0.bias"])
    assert not torch.equal(net[2].weight, before["2.weight"])

    net2 = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    want = net2(x).detach()
    lora = get_method("lora", {"rank": 2})
    wrapped = lora.prepare(net2, ["0", "2"])
    assert torch.equal(wrapped(x), want) and lora.num_trainable() == 2 * (8 + 16) + 2 * (16 + 4)
