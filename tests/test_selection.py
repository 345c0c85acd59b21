"""Selection policies and budgets, and parity with PEFT's KappaTuneSelector."""

from __future__ import annotations

import math

import peft.helpers as peft_helpers
import pytest
import torch

from kappatune.analysis import analyze_model
from kappatune.errors import ConfigError
from kappatune.models import build_tiny_llama, build_tiny_moe
from kappatune.selection import KappaTuneSelector, find_kappa_target_modules, select_from_report, select_targets


@pytest.fixture(scope="module")
def llama():
    return build_tiny_llama(seed=3, num_hidden_layers=3)


@pytest.fixture(scope="module")
def moe():
    return build_tiny_moe(seed=5)


@pytest.mark.parametrize("builder", [build_tiny_llama, build_tiny_moe])
@pytest.mark.parametrize("kwargs", [dict(top_p=0.2), dict(top_p=0.5), dict(num_modules=4), dict(threshold=5.0), {}])
def test_selector_matches_peft_reference(builder, kwargs):
    model = builder(seed=11)
    ours = KappaTuneSelector(model, show_progress=False)
    ref = peft_helpers.KappaTuneSelector(model, show_progress=False)
    assert ours.get_best_targets(**kwargs) == ref.get_best_targets(**kwargs)
    assert ours.get_best_target_parameters(**kwargs) == ref.get_best_target_parameters(**kwargs)


@pytest.mark.parametrize("builder", [build_tiny_llama, build_tiny_moe])
def test_find_kappa_target_modules_matches_peft(builder):
    model = builder(seed=2)
    ours = find_kappa_target_modules(model, top_p=0.3, show_progress=False)
    ref = peft_helpers.find_kappa_target_modules(model, top_p=0.3, show_progress=False)
    assert ours == ref
    if builder is build_tiny_moe:
        assert ours["target_parameters"]  # fused experts were found and ranked
    else:
        assert ours["target_parameters"] is None


def test_kappa_policy_keeps_lowest_kappa(llama):
    rep = analyze_model(llama, progress=False)
    sel = select_from_report(rep, "kappa", num_modules=5)
    cands = sorted((r for r in rep.records if r.kind in ("linear", "moe")), key=lambda r: r.kappa)
    assert sel.parameter_names == [r.name for r in cands[:5]]
    assert list(sel.scores.values()) == sorted(sel.scores.values())
    assert sel.module_names == [n[: -len(".weight")] for n in sel.parameter_names]


def test_snr_policy_keeps_highest_snr(llama):
    rep = analyze_model(llama, progress=False)
    sel = select_from_report(rep, "snr", top_p=0.25)
    cands = [r for r in rep.records if r.kind == "linear"]
    k = int(len(cands) * 0.25)
    assert len(sel) == k
    assert min(sel.scores.values()) >= sorted((r.snr for r in cands), reverse=True)[k - 1]


def test_random_policy_is_seeded(llama):
    rep = analyze_model(llama, progress=False)
    a = select_from_report(rep, "random", num_modules=6, seed=1)
    b = select_from_report(rep, "random", num_modules=6, seed=1)
    c = select_from_report(rep, "random", num_modules=6, seed=2)
    assert a == b and a.parameter_names != c.parameter_names


def test_param_budget_is_respected_and_filled_greedily(llama):
    rep = analyze_model(llama, progress=False)
    budget = 30_000
    sel = select_from_report(rep, "kappa", param_budget=budget)
    assert sel.num_params <= budget
    params = dict(llama.named_parameters())
    assert sel.num_params == sum(params[n].numel() for n in sel.parameter_names)
    # nothing that was skipped would still have fit
    leftover = budget - sel.num_params
    skipped = [r for r in rep.records if r.kind == "linear" and r.name not in sel.parameter_names]
    first_selected_gap = [r for r in skipped if r.kappa < max(sel.scores.values())]
    assert all(r.numel > leftover for r in first_selected_gap)


def test_balance_types_gives_each_type_its_share(llama):
    rep = analyze_model(llama, progress=False)
    sel = select_from_report(rep, "kappa", top_p=1 / 3, balance_types=True)
    types = {}
    for n in sel.parameter_names:
        types.setdefault(n.split(".")[-2], 0)
        types[n.split(".")[-2]] += 1
    assert types == {t: 1 for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}


def test_moe_selection_reports_target_parameters(moe):
    sel = select_targets(moe, "kappa", progress=False)
    assert set(sel.moe_parameter_names) == {n for n, p in moe.named_parameters() if p.dim() == 3}
    assert not any(n.endswith("gate_up_proj") for n in sel.module_names)
    assert sel.num_params == sum(p.numel() for n, p in moe.named_parameters() if n in set(sel.parameter_names))


def test_head_and_embeddings_excluded_by_default_but_available(llama):
    sel = select_targets(llama, "all", progress=False)
    assert not any("embed" in n or "lm_head" in n for n in sel.parameter_names)
    sel = select_targets(llama, "all", kinds=("linear", "head"), progress=False)
    assert "model.embed_tokens.weight" in sel.parameter_names and "lm_head" in sel.module_names


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_p=0.0), "top_p must be in"),
        (dict(top_p=1.5), "top_p must be in"),
        (dict(num_modules=0), "num_modules must be a positive"),
        (dict(param_budget=-5), "param_budget must be a positive"),
        (dict(param_budget=10**12), "larger than all candidate"),
        (dict(param_budget=10), "smaller than the smallest"),
        (dict(threshold=1e-3), "empty selection"),
        (dict(top_p=0.1, num_modules=2), "give one budget"),
        (dict(policy="entropy"), "unknown selection policy"),
    ],
)
def test_bad_budgets_are_clear_errors(llama, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        select_targets(llama, progress=False, **kwargs)


def test_selection_is_deterministic(llama):
    a = select_targets(build_tiny_llama(seed=3, num_hidden_layers=3), param_budget=50_000, progress=False)
    b = select_targets(llama, param_budget=50_000, progress=False)
    assert a == b


# --- the controls that separate κ from tensor type (study, second edition) ------------------------------------
def _types(names):
    from collections import Counter

    return Counter(n.rsplit(".", 2)[-2] for n in names)


@pytest.mark.parametrize("knob", [dict(param_budget=60_000), dict(top_p=0.3), dict(num_modules=5)])
def test_random_type_matched_has_kappas_type_counts(knob):
    model = build_tiny_llama(seed=3, num_hidden_layers=6)
    report = analyze_model(model, progress=False)
    kappa = select_from_report(report, "kappa", **knob)
    picks = [select_from_report(report, "random_type_matched", seed=s, **knob) for s in range(4)]
    for sel in picks:
        assert _types(sel.parameter_names) == _types(kappa.parameter_names)  # the same types, the same counts
        assert sel.num_params == kappa.num_params  # tensors of one type have one shape here: the same budget
    assert picks[0].parameter_names == select_from_report(report, "random_type_matched", seed=0, **knob).parameter_names
    assert len({tuple(sorted(p.parameter_names)) for p in picks}) > 1  # seeded, not κ's pick in disguise


def test_snr_per_type_picks_the_top_snr_fraction_within_each_type():
    model = build_tiny_llama(seed=4, num_hidden_layers=6)
    report = analyze_model(model, progress=False)
    sel = select_from_report(report, "snr_per_type", top_p=0.5)
    by_type: dict[str, list] = {}
    for r in report.records:
        if r.kind == "linear":
            by_type.setdefault(r.module_type, []).append(r)
    assert len(by_type) == 7
    for mtype, recs in by_type.items():
        want = sorted(recs, key=lambda r: -r.snr)[: int(len(recs) * 0.5)]
        got = [n for n in sel.parameter_names if n.rsplit(".", 2)[-2] == mtype]
        assert sorted(got) == sorted(r.name for r in want), mtype
    # the global SNR rule at the same count is a different selection (it ignores type)
    glob = select_from_report(report, "snr", num_modules=len(sel))
    assert _types(glob.parameter_names) != _types(sel.parameter_names)


def test_per_type_policies_meet_a_param_budget_like_kappa():
    from kappatune.methods import for_budget

    model = build_tiny_llama(seed=3, num_hidden_layers=6)
    one_of_each = sum(p.numel() for n, p in model.named_parameters() if ".layers.0." in n and n.endswith("proj.weight"))
    budget = 2 * one_of_each
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    counts = {}
    for policy in ("kappa", "random_type_matched", "snr_per_type", "snr"):
        m = for_budget("selective", model, budget, None, policy=policy, seed=1)
        names = m.default_targets.parameter_names
        counts[policy] = sum(sizes[n] for n in names)
        assert abs(counts[policy] - budget) <= 0.1 * budget, policy
        if policy == "snr_per_type":
            assert set(_types(names).values()) == {2}  # two per type: Spectrum's per-type rule
        if policy == "random_type_matched":
            kappa_names = for_budget("selective", model, budget, None, policy="kappa").default_targets.parameter_names
            assert _types(names) == _types(kappa_names)
    assert counts["random_type_matched"] == counts["kappa"]
    with pytest.raises(ConfigError, match="one tensor of every module type"):
        for_budget("selective", model, one_of_each // 2, None, policy="snr_per_type")


def test_every_policy_list_agrees():
    from kappatune import config, selection
    from kappatune.methods import budget

    assert set(config.POLICIES) == set(selection.POLICIES) == set(budget.POLICIES)
