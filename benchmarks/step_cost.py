"""Training-step cost of every registered method, side by side, relative to LoRA.

For each model (tiny-llama always; smollm2-135m when it is already in the kappatune cache) and each method, one
fresh subprocess loads the model, prepares the method, builds an AdamW optimizer and runs ``--steps`` training
steps on a fixed random batch. It reports:

- ``trainable``: trainable parameters (exact, ``Method.num_trainable``);
- ``step ms``: median wall time of one step (forward + backward + optimizer step + zero_grad), after one warm-up;
- ``peak MiB``: peak resident-memory growth of the process during training, over what it held after
  ``prepare`` (Linux ``VmHWM`` is reset through ``/proc/self/clear_refs`` right before the first step, so the
  number covers activations, gradients, optimizer state and temporaries). CPU only: torch has no CPU allocator
  statistics, and ``tracemalloc`` does not see torch tensors, so process RSS is the honest measure here;
- ``opt MiB``: bytes held in optimizer state tensors (selective fine-tuning's must scale with its selection).

Methods other than LoRA and full fine-tuning are budget-matched to LoRA r=8 on all linear layers when they support
it (``Method.for_budget``), so times compare like with like. Usage::

    python benchmarks/step_cost.py                    # tiny-llama (+ smollm2-135m if cached), markdown table
    python benchmarks/step_cost.py --models tiny-llama --steps 10 --json step_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# (label, method name, config, budget-match to LoRA?)
SPECS: list[tuple[str, str, dict[str, Any], bool]] = [
    ("lora (all, r=8)", "lora", {"rank": 8}, False),
    ("full", "full", {}, False),
    ("selective kappa", "selective", {"policy": "kappa"}, True),
    ("selective random", "selective", {"policy": "random"}, True),
    ("selective snr", "selective", {"policy": "snr"}, True),
    ("κ-lora (top 50%)", "lora", {"policy": "kappa", "top_p": 0.5}, True),
    ("osf", "osf", {}, True),
    ("eigentune", "eigentune", {}, True),
    ("curlora", "curlora", {}, True),
]

SHAPES = {"tiny-llama": (4, 64), "smollm2-135m": (2, 128)}  # (batch, sequence length)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """Measure one (model, method) pair in this process; returns a JSON-able dict."""
    import torch

    from kappatune.methods import for_budget, get_method
    from kappatune.models import load_model

    # One intra-op thread: on a shared CPU, OpenMP threads spinning against other processes make step times
    # jump by 100× (measured: 21 ms with 1 thread vs 2.4 s with 2 threads under load); 1 thread is stable.
    torch.set_num_threads(job.get("threads", 1))
    torch.manual_seed(0)
    model, _ = load_model(job["model"])
    vocab = model.config.vocab_size
    if job.get("budget"):
        method = for_budget(job["method"], model, job["budget"], **job["config"])
    else:
        method = get_method(job["method"], job["config"])
    t0 = time.perf_counter()
    trained = method.prepare(model)
    prepare_s = time.perf_counter() - t0
    opt = method.make_optimizer(torch.optim.AdamW, lr=1e-5)
    batch, seq = job["shape"]
    x = torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    trained.train()

    def step() -> None:
        loss = trained(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rss0 = _rss_kib("VmRSS")
    peak_ok = _reset_peak()
    step()  # warm-up; creates the optimizer state
    times = []
    for _ in range(job["steps"]):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = (_rss_kib("VmHWM") - rss0) / 1024 if peak_ok else float("nan")
    opt_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                    if isinstance(v, torch.Tensor) and v.ndim > 0)
    report = method.budget_report
    return {
        "trainable": method.num_trainable(),
        "step_ms": 1000 * statistics.median(times),
        "step_ms_min": 1000 * min(times),
        "peak_mib": peak,
        "opt_mib": opt_bytes / 2**20,
        "prepare_s": prepare_s,
        "budget": report.to_dict() if report is not None else None,
    }


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`worker` in a fresh interpreter so allocator state and peak RSS do not leak between methods."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1", OMP_NUM_THREADS=str(job.get("threads", 1)))
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": err[:160]}
    return json.loads(lines[-1])


def _ratio(v: float, ref: float) -> str:
    return f"{v / ref:.2f}×" if ref and ref == ref and v == v else "–"


def table(model: str, rows: list[tuple[str, dict[str, Any]]]) -> str:
    ref = rows[0][1]
    out = [f"### {model}", "",
           "| method | trainable | ×LoRA | step ms (median / min) | ×LoRA | peak MiB | ×LoRA | opt-state MiB |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in rows:
        if "error" in r:
            out.append(f"| {label} | – | – | – | – | – | – | error: {r['error']} |")
            continue
        out.append(
            f"| {label} | {r['trainable']:,} | {_ratio(r['trainable'], ref.get('trainable', 0))} | {r['step_ms']:.1f} / {r['step_ms_min']:.1f} | "
            f"{_ratio(r['step_ms'], ref.get('step_ms', 0))} | {r['peak_mib']:.1f} | {_ratio(r['peak_mib'], ref.get('peak_mib', 0))} | "
            f"{r['opt_mib']:.2f} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny-llama", "smollm2-135m"])
    ap.add_argument("--methods", nargs="+", default=None, help="labels or method names to run (default: all)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per measurement (default 1)")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    from kappatune.methods import METHODS, _load_all

    _load_all()
    results: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for model in args.models:
        if model == "smollm2-135m":
            try:
                from kappatune.models import is_cached
            except ImportError:
                print("skipping smollm2-135m: this kappatune has no smollm2-135m built-in", file=sys.stderr)
                continue
            if not is_cached(model):
                print("skipping smollm2-135m: not in the kappatune cache (load it once with "
                      "kappatune.models.load_model('smollm2-135m') to include it)", file=sys.stderr)
                continue
        shape = SHAPES.get(model, (2, 128))
        rows: list[tuple[str, dict[str, Any]]] = []
        budget = None
        for label, name, config, match in SPECS:
            if name not in METHODS or (args.methods and label not in args.methods and name not in args.methods and rows):
                continue
            job = {"model": model, "method": name, "config": config, "steps": args.steps, "shape": shape,
                   "budget": budget if match else None, "threads": args.threads}
            print(f"[{model}] {label} ...", file=sys.stderr, flush=True)
            r = run_job(job)
            if match and "error" in r and budget:  # method cannot match the budget: measure its defaults instead
                print(f"  budget matching failed ({r['error']}); measuring its default config", file=sys.stderr)
                r = run_job({**job, "budget": None})
                if "error" not in r:
                    label += " (default config)"
            if budget is None and "trainable" in r:
                budget = r["trainable"]
            rows.append((label, r))
        results[model] = rows
        print(table(model, rows) + "\n", flush=True)
    if args.json:
        from kappatune.storage import atomic_write_json

        atomic_write_json(args.json, {m: [{"method": lbl, **r} for lbl, r in rows] for m, rows in results.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
