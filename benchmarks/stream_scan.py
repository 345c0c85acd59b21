"""Streaming scan of a checkpoint bigger than we care to load: peak RSS against model size, and GB/s of weights.

Writes a sharded Llama-shaped safetensors checkpoint (bf16, random weights with decaying spectra; the config says
``LlamaForCausalLM``) of about ``--gb`` GB under a temporary directory, then runs ``kappatune select PATH`` (the
streaming scan with the default full-spectrum numerics, no cache; ``--kappa-only`` adds that flag) in a child process and reads the child's peak RSS with
``os.wait4``. The checkpoint is deleted afterwards. Goal: peak RSS ≤ 25% of the
checkpoint's bytes. A second child that stops before the first tensor is read gives the baseline (imports, index,
meta skeleton), reported separately; each child's peak comes from its own ``wait4`` rusage.

Usage: ``PYTHONPATH=src python benchmarks/stream_scan.py [--gb 3] [--hidden 2048] [--out benchmarks/results/stream_scan.txt]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def write_checkpoint(d: Path, gb: float, hidden: int, inter: int, heads: int, kv: int, vocab: int) -> int:
    """Write the checkpoint one layer (one shard) at a time; returns the number of decoder layers."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    head = hidden // heads
    shapes = {
        "self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (kv * head, hidden),
        "self_attn.v_proj.weight": (kv * head, hidden), "self_attn.o_proj.weight": (hidden, hidden),
        "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    per_layer = sum(a * b for a, b in shapes.values()) * 2
    layers = max(1, int((gb * 1e9 - 2 * vocab * hidden * 2) // per_layer))
    LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False,
                architectures=["LlamaForCausalLM"]).save_pretrained(d)
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    n = layers + 1

    def save(tensors: dict, i: int) -> None:
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(d / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    for layer in range(layers):
        tensors = {}
        for j, (k, (o, i)) in enumerate(shapes.items()):
            decay = torch.logspace(0, -(1.0 + 0.2 * j), min(o, i))
            w = torch.randn(o, i, generator=g)
            w = w * decay[None, :] if o >= i else w * decay[:, None]
            tensors[f"model.layers.{layer}.{k}"] = w.to(torch.bfloat16)
        tensors[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        tensors[f"model.layers.{layer}.post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        save(tensors, layer)
    save({"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g).to(torch.bfloat16),
          "lm_head.weight": torch.randn(vocab, hidden, generator=g).to(torch.bfloat16),
          "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}, layers)
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return layers


# Runs a module as ``python -m`` would and reports the process's own peak RSS (VmHWM) on exit. Not ``ru_maxrss``:
# Linux carries the parent's high-water mark into a forked child's ``ru_maxrss`` (measured: a child of this
# benchmark, whose parent had just written the checkpoint, "peaked" at the parent's 0.66 GB before reading a tensor).
_WRAP = """
import runpy, sys
try:
    if sys.argv[1] == "-c":
        code, sys.argv = sys.argv[2], sys.argv[2:]
        exec(compile(code, "<probe>", "exec"), {"__name__": "__main__"})
    else:
        mod, sys.argv = sys.argv[2], sys.argv[2:]
        runpy.run_module(mod, run_name="__main__", alter_sys=True)
finally:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
    print("VMHWM_KB", hwm, file=sys.stderr, flush=True)
"""


def _run_peak(args: list[str]) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``python ARGS`` (``-m MODULE ...`` or ``-c CODE ...``); its output and its own peak RSS in bytes."""
    proc = subprocess.run([sys.executable, "-c", _WRAP, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"python {' '.join(args[:3])[:200]} failed: {proc.stderr[-2000:]}")
    kb = [line.split()[1] for line in proc.stderr.splitlines() if line.startswith("VMHWM_KB")][-1]
    return proc, int(kb) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=3.0, help="checkpoint size to generate (default 3 GB; keep ≤ 8)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--device", default=None, help="where the numerics run (default cpu)")
    ap.add_argument("--full", action="store_true", help="kappatune analyze (the report) instead of kappatune select")
    ap.add_argument("--kappa-only", action="store_true", help="pass --kappa-only (Cholesky + Lanczos numerics)")
    ap.add_argument("--dir", default=None, help="parent directory of the temporary checkpoint (default /tmp)")
    ap.add_argument("--out", default="benchmarks/results/stream_scan.txt")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kappatune-stream-", dir=args.dir))
    lines = []
    try:
        t0 = time.perf_counter()
        layers = write_checkpoint(tmp, args.gb, args.hidden, args.intermediate, heads=args.hidden // 64,
                                  kv=max(1, args.hidden // 256), vocab=args.vocab)
        nbytes = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        lines.append(f"checkpoint: {layers} Llama layers, hidden {args.hidden}, intermediate {args.intermediate}, "
                     f"bf16, {nbytes / 1e9:.2f} GB in {layers + 1} shards (written in {time.perf_counter() - t0:.0f} s)")
        # Drop the freshly written pages from the page cache where allowed, so the scan reads from disk like a cold
        # start (best effort: needs root; the RSS measurement does not depend on it).
        try:
            subprocess.run(["sync"], check=False)
            Path("/proc/sys/vm/drop_caches").write_text("1\n")
        except OSError:
            pass
        # The baseline: the same process up to the first tensor read (python + torch + transformers imports, the
        # checkpoint's index and the model skeleton on the meta device), in its own child.
        probe = ("import sys, kappatune.cli\nfrom kappatune.checkpoint import open_checkpoint, _stream_refs\n"
                 "_stream_refs(open_checkpoint(sys.argv[1]), trust_remote_code=False, filters={})\n")
        base = _run_peak(["-c", probe, str(tmp)])[1]
        cmd = [sys.executable, "-m", "kappatune.cli", "analyze" if args.full else "select", str(tmp), "--no-cache", "-q"]
        if not args.full:
            cmd += ["--top-p", "0.2"]
        if args.device:
            cmd += ["--device", args.device]
        if args.kappa_only:
            cmd += ["--kappa-only"]
        t0 = time.perf_counter()
        proc, peak = _run_peak(cmd[1:])
        wall = time.perf_counter() - t0
        # The bytes scanned: tensors the analysis reads (max_dim_size skips the 32000-row embedding and head).
        scanned = nbytes - 2 * args.vocab * args.hidden * 2
        largest = args.intermediate * args.hidden * 2
        lines.append(f"command: {' '.join(cmd[1:3])} {cmd[3]} CHECKPOINT {' '.join(cmd[5:])}")
        lines.append(f"scan: {wall:.1f} s for {scanned / 1e9:.2f} GB of analysed weights -> {scanned / 1e9 / wall:.3f} GB/s "
                     f"({torch.get_num_threads()} CPU threads{', device ' + args.device if args.device else ''})")
        lines.append(f"peak RSS of the scan process: {peak / 1e9:.3f} GB = {100 * peak / nbytes:.1f}% of the checkpoint's "
                     f"{nbytes / 1e9:.2f} GB (largest analysed tensor {largest / 1e9:.3f} GB in bf16, "
                     f"{4 * largest / 1e9:.3f} GB as float64); goal <= 25%: {'met' if peak <= 0.25 * nbytes else 'NOT met'}")
        lines.append(f"baseline RSS before the first tensor is read (imports, index, meta skeleton): {base / 1e9:.3f} GB; "
                     f"the scan's own peak on top of it: {(peak - base) / 1e9:.3f} GB = {100 * (peak - base) / nbytes:.1f}% "
                     f"of the checkpoint ({(peak - base) / largest:.1f}x the largest tensor in bf16)")
        try:
            load = os.getloadavg()
            lines.append(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
                         "(1/5/15 min) at the end")
        except OSError:
            pass
        lines.append(f"stream_peak_rss_fraction: {peak / nbytes:.4f}")
        lines.append(f"stream_gb_per_s: {scanned / 1e9 / wall:.4f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
