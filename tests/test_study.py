"""The study machinery (issue 14, second edition): cells committed per (method, budget, order, seed), resume from
committed cells, a validation-only LR search, a pre-registered block that cannot change once cells exist, and
``bench --report`` rebuilding the tables from committed cells alone. Runs configs/study2_tiny.yaml on generated
sft tasks (tiny-llama, a few steps per cell)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from kappatune.config import config_from_dict, load_config
from kappatune.errors import ConfigError
from kappatune.harness import bench, bench_report, rerun_cell, study_rows
from run_helpers import cli_error, make_corpora, write_sft, write_yaml

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _tiny(tmp: Path, methods: list[str] | None = None) -> dict:
    """configs/study2_tiny.yaml on generated data (two sft tasks, a generated control) under ``tmp``."""
    data = tmp / "data"
    data.mkdir(exist_ok=True)
    corpora = make_corpora(data)
    sft = {k: write_sft(data / f"{k}.jsonl", k, 40) for k in ("alpha", "beta")}
    cfg = yaml.safe_load((CONFIGS / "study2_tiny.yaml").read_text())
    cfg["tasks"] = [{"corpus": sft["alpha"], "name": "a", "type": "sft"}, {"corpus": sft["beta"], "name": "b", "type": "sft"}]
    cfg["orders"] = [["a", "b"], ["b", "a"]]
    cfg["control"] = [{"corpus": corpora["ctrl"], "name": "ctrl"}]
    if methods is not None:
        cfg["methods"] = [m for m in cfg["methods"] if m["label"] in methods]
    cfg["output"]["cells_dir"] = str(tmp / "study" / "cells")
    cfg["output_dir"] = str(tmp / "runs")
    cfg["lr_search"]["per"] = "row"  # every row searched (per: method has its own test)
    return cfg


def _copied(tmp: Path, cfg: dict, dest: Path, drop: str | None = None) -> dict:
    """The config on a copy of the committed cells in ``dest/cells`` (less the cell ``drop``)."""
    part = dest / "cells"
    shutil.copytree(tmp / "study" / "cells", part)
    if drop:
        (part / f"{drop}.json").unlink()
    c = json.loads(json.dumps(cfg))
    c["output"]["cells_dir"] = str(part)
    return c


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    cfg = _tiny(tmp, ["full", "lora", "kappatune"])
    summary = bench(cfg)
    return tmp, cfg, summary


def test_study_rows_are_method_x_budget(ran):
    _, cfg, summary = ran
    rows = [r.label for r in study_rows(config_from_dict(cfg))]
    # full is not budget-matched, lora has its own budget: one row each; the others one row per budget
    assert rows == ["full", "lora", "kappatune@43k", "kappatune@86k"]
    assert [m["label"] for m in summary["methods"]] == rows


def test_every_cell_and_trial_is_committed_as_json(ran):
    tmp, cfg, summary = ran
    cells = tmp / "study" / "cells"
    got = sorted(str(p.relative_to(cells)) for p in cells.rglob("seed-*.json"))
    want = sorted(f"{r}/order-{o}/seed-0.json" for r in [m["label"] for m in summary["methods"]] for o in (0, 1))
    assert got == want
    trials = sorted(cells.rglob("lr-*.json"))
    assert len(trials) == 4 * 2  # every row gets the same grid size
    for p in cells.rglob("*.json"):
        if p.name in ("protocol.json", "validated.json"):
            continue
        res = json.loads(p.read_text())
        assert res["protocol_fingerprint"] == json.loads((cells / "protocol.json").read_text())["fingerprint"]
        assert res["status"] == "complete" and res["cell_cpu_time_s"] > 0
        assert res["cell_machine"]["device"] == "cpu" and res["cell_machine"]["torch_threads"] >= 1
    # the second order really runs the tasks in the other order
    r = json.loads((cells / "kappatune@43k" / "order-1" / "seed-0.json").read_text())
    assert r["tasks"] == ["b", "a"]


def test_lr_search_reads_validation_only_and_sets_the_cells_lr(ran):
    tmp, cfg, summary = ran
    lr = summary["study"]["lr_search"]
    assert lr["task"] == "a" and lr["split"] == "validation"
    cells = tmp / "study" / "cells"
    for label, row in lr["rows"].items():
        assert [t["factor"] for t in row["trials"]] == cfg["lr_search"]["factors"]
        best = max(t["value"] for t in row["trials"])
        assert row["chosen_lr"] == min(t["lr"] for t in row["trials"] if t["value"] == best)
        trial = json.loads((cells / f"{row['trials'][0]['cell']}.json").read_text())
        assert trial["config"]["eval"]["split"] == "validation" and trial["tasks"] == ["a"]
        assert trial["config"]["control"] is None
        cell = json.loads((cells / label / "order-0" / "seed-0.json").read_text())
        assert cell["config"]["method"]["lr"] == row["chosen_lr"]
        assert cell["config"]["eval"]["split"] == "test"
    # a choice at either end of the grid is flagged in the report (the best lr may lie outside the grid)
    factors = cfg["lr_search"]["factors"]
    edge = [lab for lab, r in lr["rows"].items() if r["chosen_factor"] in (min(factors), max(factors))]
    md = (tmp / "study" / "study.md").read_text()
    assert ("Chosen at an edge of the grid" in md) == bool(edge)
    assert all(f"{lab} (" in md.split("Chosen at an edge of the grid")[-1] for lab in edge)


def test_resume_skips_committed_cells_and_report_rebuilds_identical_tables(ran):
    tmp, cfg, summary = ran
    study_md = (tmp / "study" / "study.md").read_text()
    shutil.rmtree(tmp / "runs")  # only the committed cells are left
    again = bench(cfg)
    assert again["ran"] == [] and len(again["skipped"]) == 8 + 8
    assert (tmp / "study" / "study.md").read_text() == study_md
    rep = bench_report(cfg)
    assert not (tmp / "runs").exists() or not any((tmp / "runs").rglob("results.json"))
    assert (tmp / "study" / "study.md").read_text() == study_md
    assert json.loads((tmp / "study" / "study.json").read_text())["study"]["cells"]["present"] == 8
    assert rep["study"]["cells"]["missing"] == []
    assert "Pre-registered comparisons (primary)" in study_md and "Exploratory (not pre-registered)" in study_md
    assert "Paired differences against `full`" in study_md and "Paired differences against `lora`" in study_md
    # the pairs: every budgeted row against LoRA (one budget here) and against full, matched on (order, seed)
    paired = rep["study"]["paired"]["lora"]
    assert paired["baselines"]["kappatune@86k"] == "lora"
    d = paired["methods"]["kappatune@43k"]["acc"]
    assert set(d["differences"]) == {"o0-s0", "o1-s0"}
    # the accuracy matrix summary: per order, each task before → right after learning it → at the end
    assert "Accuracy matrix, order a → b" in study_md and "Accuracy matrix, order b → a" in study_md
    cell = json.loads((tmp / "study" / "cells" / "full" / "order-1" / "seed-0.json").read_text())
    acc = cell["matrix"]["accuracy"]  # order 1 trains b, then a
    mat = rep["study"]["accuracy_matrix"][1]
    assert mat["order"] == ["b", "a"] and mat["rows"]["full"]["cells"] == 1
    got = mat["rows"]["full"]["tasks"]["b"]
    assert [got[k]["mean"] for k in ("base", "learned", "final")] == pytest.approx([100 * acc[0][0], 100 * acc[1][0], 100 * acc[2][0]])


def test_primary_tests_are_corrected_for_multiplicity_over_the_whole_family(ran):
    tmp, cfg, summary = ran
    st = summary["study"]
    prim, paired = st["primary_metrics"], st["paired"]
    # the family: every (pair of rows, primary metric) once; full − lora and lora − full are one test
    pairs = {frozenset((lab, pr["baselines"][lab])) for pr in paired.values() for lab in pr["methods"]}
    assert st["multiplicity"]["method"] == "holm" and st["multiplicity"]["tests"] == len(pairs) * len(prim)
    for pr in paired.values():
        for lab, diffs in pr["methods"].items():
            for k in prim:
                d = diffs[k]
                assert (d["p"] is None or d["p_holm"] >= d["p"]) and d["significant_holm"] <= d["significant"]
            assert all("p_holm" not in d for k, d in diffs.items() if k not in prim)  # exploratory: uncorrected
    assert paired["full"]["methods"]["lora"]["acc"]["p_holm"] == paired["lora"]["methods"]["full"]["acc"]["p_holm"]
    assert "Holm's correction over the" in (tmp / "study" / "study.md").read_text()


def test_contrasts_are_a_separate_exploratory_family_and_leave_the_preregistered_one_alone(ran, tmp_path):
    tmp, cfg, _ = ran
    plain = bench_report(_copied(tmp, cfg, tmp_path / "plain"))["study"]
    c = _copied(tmp, cfg, tmp_path / "with")
    c["compare"] = {"contrasts": ["kappatune:lora", "lora:full"]}
    st = bench_report(c)["study"]  # report-only key: the committed cells are accepted as they are
    prim = st["primary_metrics"]
    assert st["paired"] == plain["paired"] and st["multiplicity"] == plain["multiplicity"]  # p_holm values included
    con = st["contrasts"]
    assert set(con["kappatune:lora"]["methods"]) == {"kappatune@43k", "kappatune@86k"}
    assert set(con["lora:full"]["methods"]) == {"lora"}
    # the same pairs as the reference tables, recomputed from the cell files: per (order, seed) row − control
    cells = tmp / "study" / "cells"
    for o in (0, 1):
        a = json.loads((cells / "kappatune@86k" / f"order-{o}" / "seed-0.json").read_text())["metrics"]["acc"]
        b = json.loads((cells / "lora" / f"order-{o}" / "seed-0.json").read_text())["metrics"]["acc"]
        assert con["kappatune:lora"]["methods"]["kappatune@86k"]["acc"]["differences"][f"o{o}-s0"] == pytest.approx(a - b)
    # Holm over the contrasts alone: 3 pairs of rows x the primary metrics
    assert st["contrast_multiplicity"]["tests"] == 3 * len(prim)
    for pr in con.values():
        for diffs in pr["methods"].values():
            assert set(diffs) == set(prim)
            for d in diffs.values():
                assert d["p"] is None or d["p_holm"] >= d["p"]
    md = (tmp_path / "with" / "study.md").read_text()
    assert "## Contrasts (exploratory, `compare.contrasts`)" in md and f"over these {3 * len(prim)} contrast tests" in md
    assert "## Contrasts" not in (tmp_path / "plain" / "study.md").read_text()


@pytest.mark.parametrize("contrasts, match", [
    (["kappatune-lora"], "must be 'ROW:CONTROL'"),
    (["kappatune:kappatune"], "two different method labels"),
    (["kappatune:lorra"], "'lorra' is not a method label.*did you mean 'lora'"),
    (["kappatune:lora", "kappatune:lora"], "lists a pair twice"),
])
def test_bad_contrasts_are_refused_by_name(tmp_path, contrasts, match):
    cfg = _tiny(tmp_path, ["full", "lora", "kappatune"])
    cfg["compare"] = {"contrasts": contrasts}
    with pytest.raises(ConfigError, match=match):
        config_from_dict(cfg)


def test_a_worker_restricted_to_some_rows_keeps_only_the_contrasts_among_them(tmp_path):
    import importlib

    cfg = _tiny(tmp_path, ["full", "lora", "kappatune"])
    cfg["compare"] = {"contrasts": ["kappatune:lora", "lora:full"]}
    only = importlib.import_module("kappatune.harness.bench")._select_only(config_from_dict(cfg), ["kappatune", "lora"])
    assert only.compare.contrasts == ["kappatune:lora"]


def test_contrasts_need_a_study(tmp_path):
    cfg = _tiny(tmp_path, ["full", "lora", "kappatune"])
    for k in ("budgets", "orders", "lr_search", "preregistered"):
        cfg.pop(k, None)
    cfg["output"].pop("cells_dir", None)
    cfg["compare"] = {"contrasts": ["kappatune:lora"]}
    with pytest.raises(ConfigError, match="compare.contrasts is for studies"):
        config_from_dict(cfg)


def test_changing_the_preregistered_block_is_refused_once_cells_exist(ran):
    tmp, cfg, _ = ran
    changed = json.loads(json.dumps(cfg))
    changed["preregistered"]["primary"] = ["acc"]
    with pytest.raises(ConfigError, match="preregistered block differs"):
        bench_report(changed)
    changed = json.loads(json.dumps(cfg))
    changed["lr_search"]["factors"] = [0.5, 2.0, 4.0]
    with pytest.raises(ConfigError, match="lr_search block differs"):
        bench(changed)


def test_a_committed_cell_from_another_config_is_refused(ran):
    tmp, cfg, _ = ran
    changed = json.loads(json.dumps(cfg))
    changed["training"]["max_grad_norm"] = 0.5
    with pytest.raises(ConfigError, match="was run with another config"):
        bench_report(changed)


def test_report_of_a_partial_study_lists_the_missing_cells(ran, tmp_path):
    tmp, cfg, _ = ran
    c = _copied(tmp, cfg, tmp_path, drop="kappatune@86k/order-1/seed-0")
    rep = bench_report(c)
    assert rep["study"]["cells"]["missing"] == ["kappatune@86k/order-1/seed-0"]
    assert "7 of 8 committed" in (tmp_path / "study.md").read_text()


def test_report_plots_accuracy_against_the_preregistered_forgetting_measures(ran, tmp_path):
    tmp, cfg, _ = ran
    c = _copied(tmp, cfg, tmp_path)
    c["output"]["plots"] = True
    rep = bench_report(c)
    # ACC (the pre-registered learning measure) against each pre-registered forgetting measure, not task ppl gain
    assert rep["study"]["plot"]["panels"] == [("probe_ctrl_ppl_change", "acc"), ("bwt_acc", "acc")]
    png = tmp_path / "pareto.png"
    assert png.is_file() and png.stat().st_size > 1000
    assert "![learning vs forgetting](pareto.png)" in (tmp_path / "study.md").read_text()


def test_time_and_memory_are_compared_only_between_cells_of_one_machine(ran, tmp_path):
    """Cells from a GPU and a CPU in one study: quality metrics pair across machines, time and memory never do
    (a GPU step is ~20x faster; averaging or pairing across machines would report the machine, not the method)."""
    tmp, cfg, _ = ran
    c = _copied(tmp, cfg, tmp_path)
    part = tmp_path / "cells"
    for f in part.rglob("order-1/seed-0.json"):  # order 1 "ran on a GPU", 10x faster
        res = json.loads(f.read_text())
        res["cell_machine"] = {**res["cell_machine"], "device": "Fake GPU"}
        res["metrics"]["sec_per_step"] /= 10
        f.write_text(json.dumps(res))
    st = bench_report(c)["study"]
    assert set(st["cost_by_machine"]) == {"Fake GPU", next(k for k in st["cost_by_machine"] if k.startswith("CPU "))}
    for mc, cost in st["cost_by_machine"].items():
        assert cost["cells"] == 4
        d = cost["paired"]["full"]["methods"]["kappatune@43k"]["sec_per_step"]
        assert set(d["differences"]) == ({"o1-s0"} if mc == "Fake GPU" else {"o0-s0"})
    quality = st["paired"]["full"]["methods"]["kappatune@43k"]
    assert set(quality["acc"]["differences"]) == {"o0-s0", "o1-s0"} and "sec_per_step" not in quality
    md = (tmp_path / "study.md").read_text()
    exploratory = md.split("## Exploratory")[1].split("## Time and memory")[0]
    assert "s / step" not in exploratory and "### Fake GPU (4 cells)" in md
    assert "| Fake GPU | 4 |" in md.split("## Compute")[1]


def test_rerun_of_a_committed_cell_reproduces_it_without_touching_the_cells(ran, tmp_path):
    tmp, cfg, _ = ran
    cell = tmp / "study" / "cells" / "kappatune@43k" / "order-1" / "seed-0.json"
    before = cell.read_bytes()
    out = rerun_cell(cfg, "kappatune@43k/order-1/seed-0", tmp_path / "check", progress=False)
    assert cell.read_bytes() == before
    assert out["committed_machine"] == out["rerun_machine"]
    m = out["metrics"]
    assert {"acc", "bwt_acc", "control_change_pct"} <= set(m) and "sec_per_step" not in m
    assert all(v["difference"] == 0.0 for v in m.values()), {k: v["difference"] for k, v in m.items()}  # same CPU: bitwise
    assert m["acc"]["row_cells"] == 2
    assert (tmp_path / "check" / "kappatune@43k" / "order-1" / "seed-0" / "rerun.md").is_file()
    with pytest.raises(ConfigError, match=r"no committed cell 'kappatune@43k/order-9/seed-0'.*look like"):
        rerun_cell(cfg, "kappatune@43k/order-9/seed-0", tmp_path / "check")
    from kappatune.cli import main

    assert main(["bench", str(write_yaml(tmp_path / "s.yaml", cfg)), "--rerun", "kappatune@43k/order-1/seed-0"]) == 2  # no -o


def test_stop_after_starts_no_new_cell_and_still_writes_the_report(ran, tmp_path):
    tmp, cfg, _ = ran
    c = _copied(tmp, cfg, tmp_path, drop="lora/order-1/seed-0")
    part = tmp_path / "cells"
    c["output_dir"] = str(tmp_path / "runs")
    summary = bench(c, stop_after=1e-6)  # already past: the missing cell is left for a later run
    assert summary["ran"] == [] and summary["study"]["cells"]["missing"] == ["lora/order-1/seed-0"]
    assert not (part / "lora" / "order-1" / "seed-0.json").exists()
    assert "7 of 8 committed" in (tmp_path / "study.md").read_text()
    with pytest.raises(ConfigError, match="stop_after must be a positive"):
        bench(c, stop_after=0)
    with pytest.raises(SystemExit):
        from kappatune.cli import main
        main(["bench", str(CONFIGS / "study2_tiny.yaml"), "--stop-after", "soon"])


def test_a_killed_workers_cell_resumes_exactly_and_is_recorded_as_untimed(ran, tmp_path):
    """A worker killed mid-cell (SIGKILL at the cell's second evaluation: after its first stage trained) leaves
    the cell's run directory; the next worker resumes it with exactly the committed metrics of an uninterrupted
    run, and records it as resumed and untimed (the killed part's time is unknown) rather than with a partial
    time. A cell run in one go keeps its times."""
    import os
    import sys

    tmp, cfg, _ = ran
    name = "kappatune@43k/order-0/seed-0"
    c = _copied(tmp, cfg, tmp_path, drop=name)
    c["output_dir"] = str(tmp_path / "runs")
    env = {**os.environ, "KAPPATUNE_FAULT": "eval:2", "PYTHONPATH": str(Path(bench.__code__.co_filename).parents[2])}
    proc = subprocess.run([sys.executable, "-m", "kappatune.cli", "bench", write_yaml(tmp_path / "s.yaml", c), "-q"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0  # killed by the fault point
    assert (tmp_path / "runs" / name / "state.json").is_file() and not (tmp_path / "cells" / f"{name}.json").exists()
    bench(c, progress=False)
    got = json.loads((tmp_path / "cells" / f"{name}.json").read_text())
    want = json.loads((tmp / "study" / "cells" / f"{name}.json").read_text())
    assert got["cell_resumed"] is True and got["cell_cpu_time_s"] is None and got["cell_wall_time_s"] is None
    assert got["cell_machine"] is not None
    assert want["cell_cpu_time_s"] > 0 and not want["cell_resumed"]
    for k in ("acc", "bwt_acc", "control_change_pct", "final_avg_task_ppl"):
        assert got["metrics"][k] == want["metrics"][k], k
    md = (tmp_path / "study.md").read_text()
    assert "(7 timed)" in md.split("## Compute")[1].splitlines()[2]  # the total counts the timed cells
    assert "| 8 | " in md and " (7 timed) |" in md  # so does the per-machine table


def test_cells_tokenized_differently_are_never_mixed(ran, tmp_path):
    """Every cell records its tokenizer's fingerprint; a study refuses to mix cells that disagree (a library version
    once changed SmolLM2's end token), and a machine whose tokenizer disagrees with the committed cells runs none."""
    tmp, cfg, _ = ran
    c = _copied(tmp, cfg, tmp_path, drop="lora/order-1/seed-0")
    part = tmp_path / "cells"
    c["output_dir"] = str(tmp_path / "runs")
    cells = sorted(part.rglob("seed-*.json")) + sorted(part.rglob("lr-*.json"))
    assert all(json.loads(f.read_text())["tokenizer_fingerprint"] for f in cells)

    def set_fp(files, fp):
        for f in files:
            res = json.loads(f.read_text())
            res["tokenizer_fingerprint"] = fp
            f.write_text(json.dumps(res))

    set_fp(cells[:1], "0" * 16)
    with pytest.raises(ConfigError, match="were tokenized differently"):
        bench_report(c)
    set_fp(cells, "0" * 16)  # all agree, but not with this machine: the missing cell must not run here
    assert bench_report(c)["study"]["cells"]["present"] == 7
    with pytest.raises(ConfigError, match="behaves differently from the one the committed cells used"):
        bench(c)
    assert not (part / "lora" / "order-1" / "seed-0.json").exists()


def test_report_of_a_study_still_in_its_lr_search_shows_the_search(ran, tmp_path):
    tmp, cfg, _ = ran
    part = tmp_path / "cells"
    part.mkdir()
    shutil.copy(tmp / "study" / "cells" / "protocol.json", part)
    shutil.copytree(tmp / "study" / "cells" / "lr_search", part / "lr_search")
    c = json.loads(json.dumps(cfg))
    c["output"]["cells_dir"] = str(part)
    rep = bench_report(c)
    assert rep["study"]["cells"]["present"] == 0 and len(rep["study"]["cells"]["missing"]) == 8
    md = (tmp_path / "study.md").read_text()
    assert "0 of 8 committed" in md and "Learning-rate search" in md and "No cell is committed yet" in md
    shutil.rmtree(part / "lr_search")
    with pytest.raises(ConfigError, match="no finished cell"):
        bench_report(c)


def test_commit_flag_git_commits_each_cell(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    for args in (["init", "-q"], ["config", "user.email", "t@example.com"], ["config", "user.name", "t"]):
        subprocess.run(["git", *args], cwd=repo, check=True)
    cfg = _tiny(tmp_path, ["full"])
    cfg["output"]["cells_dir"] = str(repo / "cells")
    cfg["lr_search"]["factors"] = [1.0]
    cfg["preregistered"]["reference"] = ["full"]
    bench(cfg, commit=True)
    log = subprocess.run(["git", "log", "--format=%s"], cwd=repo, check=True, capture_output=True, text=True).stdout
    assert log.splitlines() == ["study2_tiny: cell full/order-1/seed-0", "study2_tiny: cell full/order-0/seed-0",
                                "study2_tiny: cell lr_search/full/lr-0.003"]
    tracked = subprocess.run(["git", "ls-files"], cwd=repo, check=True, capture_output=True, text=True).stdout.split()
    assert "cells/protocol.json" in tracked and "cells/validated.json" in tracked and "cells/full/order-0/seed-0.json" in tracked


def test_per_method_lr_search_searches_each_method_once(tmp_path):
    """``lr_search.per: method``: one search per method, on its first budget; its other rows reuse that lr."""
    cfg = _tiny(tmp_path, ["full", "kappatune"])
    cfg["lr_search"]["per"] = "method"
    cfg["preregistered"]["reference"] = ["full"]
    summary = bench(cfg)
    cells = tmp_path / "study" / "cells"
    assert sorted(str(p.parent.relative_to(cells)) for p in cells.rglob("lr-*.json")) == [
        "lr_search/full", "lr_search/full", "lr_search/kappatune@43k", "lr_search/kappatune@43k"]
    rows = summary["study"]["lr_search"]["rows"]
    assert rows["kappatune@86k"]["searched_on"] == "kappatune@43k"
    assert rows["kappatune@86k"]["chosen_lr"] == rows["kappatune@43k"]["chosen_lr"]
    for o in (0, 1):
        res = json.loads((cells / "kappatune@86k" / f"order-{o}" / "seed-0.json").read_text())
        assert res["config"]["method"]["lr"] == rows["kappatune@43k"]["chosen_lr"]
    md = (tmp_path / "study" / "study.md").read_text()
    assert "kappatune@86k (from kappatune@43k)" in md
    # trials are counted once in the compute total
    assert summary["study"]["cpu_time_s"]["lr_search_trials"] == 4


def test_a_cell_claimed_by_another_worker_is_waited_for_then_taken(tmp_path, monkeypatch):
    """Several bench processes share a study through per-cell claims: a claimed cell is not run twice; once its
    claim is released (the holder finished, or died), the waiting worker takes what is left."""
    import importlib
    import threading

    bench_mod = importlib.import_module("kappatune.harness.bench")

    cfg = _tiny(tmp_path, ["full"])
    cfg["lr_search"]["factors"] = [1.0]
    cfg["preregistered"]["reference"] = ["full"]
    out = config_from_dict(cfg).out_dir()
    held = bench_mod._Claim(out, "full/order-1/seed-0")
    assert held.acquire()
    assert not bench_mod._Claim(out, "full/order-1/seed-0").acquire()  # exclusive, also within one process
    monkeypatch.setenv("KAPPATUNE_STUDY_POLL_S", "0.2")
    timer = threading.Timer(3.0, held.release)
    timer.start()
    try:
        summary = bench(cfg)
    finally:
        timer.cancel()
        held.release()
    assert summary["ran"] == ["lr_search/full/lr-0.003", "full/order-0/seed-0", "full/order-1/seed-0"]
    assert summary["study"]["cells"]["present"] == 2


def test_study_workers_validate_the_config_once_between_them(tmp_path, monkeypatch):
    """Validation (every row's budget matching: minutes on a real model) runs once per config and code: a later
    worker on the same study finds the marker the first one left beside the cells and skips it; another config,
    or the same on changed code, validates."""
    import importlib

    bench_mod = importlib.import_module("kappatune.harness.bench")
    cfg = _tiny(tmp_path, ["full"])
    cfg["lr_search"]["factors"] = [1.0]
    cfg["preregistered"]["reference"] = ["full"]
    bench(cfg)
    out = config_from_dict(cfg).out_dir()
    marker = json.loads((tmp_path / "study" / "cells" / "validated.json").read_text())
    assert set(marker) == {"config_fingerprint", "code_fingerprint"}
    (tmp_path / "study" / "cells" / "full" / "order-1" / "seed-0.json").unlink()
    shutil.rmtree(out / "full" / "order-1" / "seed-0")
    calls = []
    real = bench_mod.validate
    monkeypatch.setattr(bench_mod, "validate", lambda *a, **k: calls.append(1) or real(*a, **k))
    summary = bench(cfg)
    assert summary["ran"] == ["full/order-1/seed-0"] and calls == []
    other = json.loads(json.dumps(cfg))
    other["output"]["cells_dir"] = str(tmp_path / "other" / "cells")
    other["output_dir"] = str(tmp_path / "other" / "runs")
    other["seeds"] = [1]
    bench(other)
    assert calls == [1]
    # the same config on other code validates again
    (tmp_path / "study" / "cells" / "full" / "order-1" / "seed-0.json").unlink()
    shutil.rmtree(out / "full" / "order-1" / "seed-0")
    monkeypatch.setattr(bench_mod, "_code_fingerprint", lambda: "changed")
    bench(cfg)
    assert calls == [1, 1]


def test_validation_runs_at_the_configured_thread_count(tmp_path, monkeypatch):
    """A study worker's validation (minutes of SVDs on a real model) runs at ``num_threads`` like its cells, not at
    torch's default, which on a CPU shared by one worker per core oversubscribes the cores."""
    import importlib

    import torch

    from kappatune.harness import validate

    run_mod = importlib.import_module("kappatune.harness.run")
    cfg = _tiny(tmp_path, ["full", "lora"])
    cfg["num_threads"] = 1
    seen = []
    real = run_mod._load
    monkeypatch.setattr(run_mod, "_load", lambda c: seen.append(torch.get_num_threads()) or real(c))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        validate(cfg, command="bench")
    finally:
        torch.set_num_threads(before)
    assert seen == [1]


def test_two_worker_processes_run_every_cell_exactly_once(tmp_path):
    """Two ``kappatune bench`` processes on one study config: every trial and cell is committed once, none is run
    by both, and the report of the cells equals a single worker's."""
    import os
    import sys

    from run_helpers import subprocess_env

    cfg = _tiny(tmp_path, ["full"])
    cfg["lr_search"]["factors"] = [0.5, 1.0]
    cfg["preregistered"]["reference"] = ["full"]
    cfg["progress"] = True  # the "== cell" lines say which worker ran what
    path = write_yaml(tmp_path / "c.yaml", cfg)
    env = {**subprocess_env(), "KAPPATUNE_STUDY_POLL_S": "0.5", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "kappatune.cli", "bench", path], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    started = [ln.split()[1] for log in logs for ln in log.splitlines() if ln.startswith("== ")]
    cells = tmp_path / "study" / "cells"
    committed = sorted(str(p.relative_to(cells))[:-5] for p in cells.rglob("*.json") if p.name not in ("protocol.json", "validated.json"))
    assert sorted(started) == committed and len(committed) == 2 + 2  # 2 trials, 1 row x 2 orders
    assert os.path.isfile(tmp_path / "study" / "study.md")


def test_study_config_errors_name_the_key(tmp_path):
    base = _tiny(tmp_path)
    bad = [
        ({"orders": [["a", "a"]]}, "orders\\[0\\]"),
        ({"budget": 1000}, "budget \\(one\\) or budgets"),
        ({"lr_search": {"factors": []}}, "lr_search.factors"),
        ({"lr_search": {"per": "budget"}}, "lr_search.per"),
        ({"preregistered": {"reference": ["nope"]}}, "preregistered.reference 'nope'"),
        # every field naming a method label fails the same way, with the closest label offered
        ({"preregistered": {"target": {"reference": "ful"}}},
         "preregistered.target.reference 'ful' is not a method label of this config \\(did you mean 'full'\\?\\); labels: "),
        ({"eval": {**base["eval"], "curve_every": 0}}, "not a learning-curve point"),
        ({"preregistered": {"target": {"reference": "full", "fraction": 1.5}}}, "fraction must be in"),
        ({"eval": {**base["eval"], "split": "train"}}, "eval.split"),
    ]
    for over, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            config_from_dict({**base, **over})
    lm = {**base, "tasks": [{"corpus": base["control"][0]["corpus"], "name": "a"}, {"corpus": base["control"][0]["corpus"], "name": "b"}]}
    with pytest.raises(ConfigError, match="lr_search needs an sft task"):
        config_from_dict(lm)


def test_cli_report_needs_cells(tmp_path, capsys):
    cfg = _tiny(tmp_path)
    cfg["output"]["cells_dir"] = None
    path = write_yaml(tmp_path / "c.yaml", cfg)
    assert "output.cells_dir" in cli_error(capsys, "bench", path, "--report")


def test_study2_configs_load_and_follow_the_protocol():
    for name in ("study2", "study2_tiny"):
        cfg = load_config(CONFIGS / f"{name}.yaml")
        assert cfg.preregistered is not None and cfg.lr_search is not None and cfg.output.cells_dir
        assert len(cfg.budgets or []) == 2 and len(cfg.task_orders()) >= 2
        assert all(t.type == "sft" for t in cfg.tasks)
        labels = {m.display for m in cfg.method_specs()}
        assert {"full", "lora", "kappa-lora", "kappatune", "random-type", "spectrum-type", "spectrum", "osf"} <= labels
    cfg = load_config(CONFIGS / "study2.yaml")
    assert len(cfg.seed_list()) >= 3 and cfg.eval.max_examples is None  # full test split
    assert cfg.steps_per_stage() >= 150


@pytest.mark.slow
def test_study2_tiny_runs_as_shipped_on_the_labelled_tasks(tmp_path):
    """configs/study2_tiny.yaml itself (the real labelled tasks: needs them built or cached)."""
    ov = [f"output.cells_dir={tmp_path / 'cells'}", f"output_dir={tmp_path / 'runs'}"]
    summary = bench(CONFIGS / "study2_tiny.yaml", overrides=ov)
    assert summary["study"]["cells"]["present"] == summary["study"]["cells"]["expected"]
    before = (tmp_path / "study.md").read_text()
    shutil.rmtree(tmp_path / "runs")
    bench_report(CONFIGS / "study2_tiny.yaml", overrides=ov)
    assert (tmp_path / "study.md").read_text() == before


def test_a_worker_restricted_to_some_rows_keeps_the_whole_studys_validation_marker(tmp_path, monkeypatch):
    """`bench --only ROW` on a study: the marker left by validating every row covers the restricted worker (no
    second validation), and a restricted worker that must validate (other code) does not replace the whole
    study's marker with one for its own rows."""
    import importlib

    bench_mod = importlib.import_module("kappatune.harness.bench")
    cfg = _tiny(tmp_path, ["full", "kappatune"])
    cfg["lr_search"]["factors"] = [1.0]
    cfg["preregistered"]["reference"] = ["full"]
    cfg["orders"] = cfg["orders"][:1]
    bench(cfg)
    marker_path = tmp_path / "study" / "cells" / "validated.json"
    marker = marker_path.read_text()
    out = config_from_dict(cfg).out_dir()
    (tmp_path / "study" / "cells" / "kappatune@43k" / "seed-0.json").unlink()
    shutil.rmtree(out / "kappatune@43k" / "seed-0")
    calls = []
    real = bench_mod.validate
    monkeypatch.setattr(bench_mod, "validate", lambda *a, **k: calls.append(1) or real(*a, **k))
    summary = bench(cfg, only=["kappatune"])
    assert summary["ran"] == ["kappatune@43k/seed-0"] and calls == []
    (tmp_path / "study" / "cells" / "kappatune@43k" / "seed-0.json").unlink()
    shutil.rmtree(out / "kappatune@43k" / "seed-0")
    monkeypatch.setattr(bench_mod, "_code_fingerprint", lambda: "changed")
    bench(cfg, only=["kappatune"])
    assert calls == [1] and marker_path.read_text() == marker


def _benchmark_script(name: str):
    """A script of benchmarks/ (not a package) loaded as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, CONFIGS.parent / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _study2_readme():
    return _benchmark_script("study2_readme")


def test_committed_study2_summary_is_what_its_committed_cells_give(tmp_path):
    """benchmarks/results/study2/study.json (the README tables' source) is exactly what `--report` rebuilds from the
    committed cells: a cell added or changed without re-running the report fails here."""
    committed = CONFIGS.parent / "benchmarks" / "results" / "study2"
    shutil.copytree(committed / "cells", tmp_path / "cells")
    bench_report(CONFIGS / "study2.yaml", overrides=[f"output.cells_dir={tmp_path / 'cells'}"])
    rebuilt = json.loads((tmp_path / "study.json").read_text())
    want = json.loads((committed / "study.json").read_text())
    rebuilt["config"]["output"]["cells_dir"] = want["config"]["output"]["cells_dir"]
    assert rebuilt == want


def test_study2_readme_tables_come_from_the_summary_and_a_stale_block_is_caught(tmp_path, capsys):
    gen = _study2_readme()
    summary = json.loads((CONFIGS.parent / "benchmarks" / "results" / "study2" / "study.json").read_text())
    block = gen.tables(summary)
    st = summary["study"]
    # every row, and a pre-registered difference as the report computed it (one decimal), with its Holm mark
    for m in summary["methods"]:
        assert f"\n| {m['label']} | {len(m['seeds'])} | " in block
    d = st["paired"]["full"]["methods"]["kappatune@7.08M"]["acc"]
    cell = f"{d['mean']:.1f} [{d['ci'][0]:.1f}, {d['ci'][1]:.1f}]"
    assert (f"**{cell}**" if d["significant_holm"] else cell) in block
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{gen.BEGIN}\nold numbers\n{gen.END}\n\ntail\n")
    assert gen.main(["--check", str(readme)]) == 1
    assert gen.main(["--write", str(readme)]) == 0
    assert gen.main(["--check", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\n") and text.endswith("\n\ntail\n") and "old numbers" not in text and block in text
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="needs the two markers"):
        gen.main(["--check", str(readme)])


def test_readme_study2_tables_match_the_committed_summary():
    gen = _study2_readme()
    readme = CONFIGS.parent / "README.md"
    if gen.BEGIN not in readme.read_text():
        pytest.skip("the README has no study2 tables yet (they go in when the study's cells are complete)")
    assert gen.main(["--check", str(readme)]) == 0


def test_readme_learning_rate_check_matches_its_committed_trials():
    """The README's learning-rate check (hand-written around a small table) against the committed trials: every
    accuracy it prints is the committed trial's validation accuracy at that rate, and each row's bold cell is its
    best rate."""
    import re

    edge = _benchmark_script("study2_lr_edge")
    readme = (CONFIGS.parent / "README.md").read_text()
    start = readme.index("| row (3.54M) | 0.3× |")
    lines = readme[start:].split("\n\n")[0].splitlines()
    factors = [float(c.strip().rstrip("×")) for c in lines[0].strip("|").split("|")[1:]]
    names = {"full FT": "full", "KappaTune": "kappatune@3.54M", "Spectrum per type": "spectrum-type@3.54M",
             "type-matched random": "random-type@3.54M", "Spectrum global": "spectrum@3.54M"}
    seen = 0
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        row = next(v for k, v in names.items() if cells[0].startswith(k))
        acc, best, _ = edge.accuracy_by_factor(edge._trials(row))
        for f, cell in zip(factors, cells[1:]):
            if f not in acc:
                assert cell == "–", (row, f, cell)
                continue
            assert re.search(r"[\d.]+", cell).group(0) == f"{acc[f]:.1f}", (row, f, cell)
            assert cell.startswith("**") == (f == best), (row, f, cell)
            seen += 1
    assert seen >= 19  # 5 rows x 3 grid rates, and the extensions
