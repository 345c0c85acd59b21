"""`kappatune analyze` / `kappatune select` from the command line, including bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kappatune.cli import main
from run_helpers import cli_error


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kappatune.cli", *args], capture_output=True, text=True, timeout=120)


def test_analyze_tiny_llama_prints_table_sorted_by_kappa(capsys):
    assert main(["analyze", "tiny-llama", "-q", "--top", "0"]) == 0
    out = capsys.readouterr().out
    rows = [l.split() for l in out.splitlines() if l[:4].strip().isdigit()]
    kappas = [float(r[4]) for r in rows]
    assert len(rows) == 15 and kappas == sorted(kappas)


def test_analyze_tiny_moe_json_and_plot(tmp_path, capsys):
    assert main(["analyze", "tiny-moe", "-q", "--json", str(tmp_path / "out.json"), "--plot", str(tmp_path / "k.png")]) == 0
    data = json.loads((tmp_path / "out.json").read_text())
    moe = [r for r in data["records"] if r["kind"] == "moe"]
    assert len(moe) == 4 and all(len(r["experts"]) == 4 for r in moe)
    assert {"kappa", "sigma_max", "sigma_min", "stable_rank", "entropy", "snr"} <= set(data["records"][0])
    assert (tmp_path / "k.png").stat().st_size > 1000


def test_select_writes_json(tmp_path, capsys):
    assert main(["select", "tiny-llama", "-q", "--policy", "snr", "--param-budget", "40000", "--json", str(tmp_path / "s.json")]) == 0
    sel = json.loads((tmp_path / "s.json").read_text())
    assert 0 < sel["num_params"] <= 40000 and sel["policy"] == "snr"


@pytest.mark.parametrize(
    "args, message",
    [
        (["analyze", "/no/such/model"], "does not exist"),
        (["analyze", "./not-a-model-dir"], "does not exist"),
        (["select", "tiny-llama", "--param-budget", "999999999"], "larger than all candidate"),
        (["select", "tiny-llama", "--threshold", "0.001"], "empty selection"),
        (["select", "tiny-llama", "--top-p", "2"], "top_p must be in"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args, message, capsys):
    err = cli_error(capsys, *args, "-q")  # exit 2, exactly one `kappatune: error:` line, no traceback
    assert message in err, err


def test_bad_input_from_a_real_process_is_one_line_on_stderr():
    """One of the cases above through ``python -m kappatune.cli`` (exit status, nothing else on stderr — no
    warning or log line either; the rest run in-process, a start-up of torch each being the expensive part)."""
    proc = run_cli("select", "tiny-llama", "--top-p", "2", "-q")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("kappatune: error: ") and "top_p must be in" in lines[0], proc.stderr
