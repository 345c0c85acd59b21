"""The labelled continual-learning benchmark configs (configs/cl5.yaml, configs/cl5_tiny.yaml; issue 13).

The fast test reads both configs and their documented task orders (no model, no data). The end-to-end tests
build the real labelled tasks (needs the Debian/PyPI sources or the cache) and load models, so they are `slow`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kappatune.config import load_config
from kappatune.data.labelled import TASK_ORDER

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["cl5_tiny", "cl5"])
def test_cl5_configs_list_the_five_labelled_tasks_as_sft(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert [t.corpus for t in cfg.tasks] == list(TASK_ORDER)
    assert all(t.type == "sft" for t in cfg.tasks)
    controls = cfg.control if isinstance(cfg.control, list) else [cfg.control]
    assert [c.corpus for c in controls] == ["instruct-fidelity", "next-sentence", "control"]  # the control suite
    assert [c.type for c in controls] == ["sft", "sft", "lm"]
    assert cfg.eval.max_examples is not None and cfg.eval.max_examples <= 400


def test_cl5_documented_orders_are_permutations_of_the_tasks():
    text = (CONFIGS / "cl5.yaml").read_text()
    orders = re.findall(r"#\s+order \d: (.+)", text)
    assert len(orders) == 2
    for line in orders:
        seq = [s.strip() for s in line.split("->")]
        assert sorted(seq) == sorted(TASK_ORDER) and seq != list(TASK_ORDER)
    assert orders[0] != orders[1]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cl5_tiny", "cl5"])
def test_run_check_accepts_cl5_configs(name, capsys, shared_cache):
    from kappatune.cli import main

    assert main(["run", str(CONFIGS / f"{name}.yaml"), "--check", "-q"]) == 0
    assert "config OK" in capsys.readouterr().out


@pytest.mark.slow  # builds the five labelled tasks from their sources on a fresh machine (~1 min, once: shared cache), then ~20 s CPU
def test_cl5_tiny_runs_end_to_end_with_accuracy_matrices(tmp_path, shared_cache):
    from kappatune.cli import main

    out = tmp_path / "cl5_tiny"
    assert main(["run", str(CONFIGS / "cl5_tiny.yaml"), "-q", "--output-dir", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    T = len(TASK_ORDER)
    assert r["matrix"]["tasks"] == list(TASK_ORDER)
    for key in ("accuracy", "accuracy_norm"):
        A = r["matrix"][key]
        assert len(A) == T + 1 and all(len(row) == T for row in A)  # base + one row per stage
        assert all(0.0 <= a <= 1.0 for row in A for a in row)
    m = r["metrics"]
    A = r["matrix"]["accuracy"]
    assert m["acc"] == pytest.approx(100 * sum(A[T]) / T)
    assert m["bwt_acc"] == pytest.approx(100 * sum(A[T][j] - A[j + 1][j] for j in range(T - 1)) / (T - 1))
    assert "control_ppl" in r["matrix"] and len(r["matrix"]["control_ppl"]) == T + 1


def test_every_labelled_task_carries_its_measured_zero_shot_accuracy():
    from kappatune.data.labelled import LABELLED_TASKS, labelled_task_info

    for name, spec in LABELLED_TASKS.items():
        assert spec.zero_shot_examples and spec.zero_shot_examples > 0, name
        k = spec.zero_shot_accuracy * spec.zero_shot_examples  # a count of correct examples
        assert 0 <= k <= spec.zero_shot_examples and abs(k - round(k)) < 1e-9, name
        info = labelled_task_info(name, build=False)
        assert (info["zero_shot_accuracy"], info["zero_shot_examples"]) == (spec.zero_shot_accuracy, spec.zero_shot_examples)


@pytest.mark.parametrize("k", [2, 3])
def test_cl5_order_files_are_cl5_with_the_documented_order(k):
    """configs/cl5_order{2,3}.yaml: the orders documented in cl5.yaml, every other setting identical."""
    from dataclasses import asdict

    base = load_config(CONFIGS / "cl5.yaml")
    other = load_config(CONFIGS / f"cl5_order{k}.yaml")
    documented = re.findall(r"#\s+order \d: (.+)", (CONFIGS / "cl5.yaml").read_text())[k - 2]
    assert [t.corpus for t in other.tasks] == [s.strip() for s in documented.split("->")]
    assert sorted(map(str, map(asdict, other.tasks))) == sorted(map(str, map(asdict, base.tasks)))
    a, b = asdict(base), asdict(other)
    for key in ("name", "output_dir", "tasks"):
        a.pop(key), b.pop(key)
    assert a == b
