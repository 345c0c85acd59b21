"""Analysis speed: kappatune vs PEFT's KappaTuneSelector vs kappaTune's per-tensor full-SVD loop.

All three analyse the same weights in one run, one after the other:

(a) a tiny-llama sized to take a few seconds;
(b) one Llama-3-8B-shaped decoder layer (q/o 4096×4096, k/v 1024×4096, gate/up 14336×4096, down 4096×14336),
    random weights with a decaying spectrum (timing does not depend on the values).

kappatune is timed twice: the full analysis (every figure) and the κ-only analysis that selection uses (what
PEFT's selector computes). Every tool is timed ``--repeats`` times and credited with its best time (the CPU may be
shared); PEFT on CPU also with one thread, credited with the faster. It checks that the tools rank the tensors
identically and ends with ``speedup_vs_peft: X.XX`` (best PEFT time / kappatune's default full analysis, on (b)) and
``speedup_vs_peft_smollm2: X.XX``. ``--device cuda`` runs both tools on the GPU; ``--out FILE`` also writes the
output there. Standalone from a checkout (needs torch, transformers, peft, safetensors):
``PYTHONPATH=src python benchmarks/analysis_speed.py --real --device cuda --out benchmarks/results/analysis_speed_gpu.txt``.
Without the cached SmolLM2-135M, ``--real`` uses a random model of SmolLM2-135M's shapes (said in the output).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
from torch import nn


def kappatune_reference_loop(model: nn.Module, max_dim_size: int = 16384) -> dict[str, float]:
    """The original kappaTune analysis, re-implemented: one full (thin) SVD per ≥2-D parameter, in a Python loop."""
    out = {}
    for name, p in model.named_parameters():
        if p.ndim < 2 or max(p.shape) > max_dim_size:
            continue
        w = p.data.float().view(p.size(0), -1)
        _, s, _ = torch.linalg.svd(w, full_matrices=False)
        out[name] = (s[0] / s[-1]).item()
    return out


def llama3_8b_layer(seed: int = 0) -> nn.Module:
    """One Llama-3-8B decoder layer's seven projections, each with its own decaying spectrum.

    Condition numbers land between ~30 and ~3000, the range real pretrained projections show (see the README);
    square matrices are an orthogonal factor times the decay (a square Gaussian would itself be ill-conditioned),
    rectangular ones a Gaussian times the decay (a 3.5:1 Gaussian has κ ≈ 3).
    """
    shapes = {
        "q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
        "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336),
    }
    g = torch.Generator().manual_seed(seed)
    layer = nn.Module()
    for i, (name, (out_f, in_f)) in enumerate(shapes.items()):
        lin = nn.Linear(in_f, out_f, bias=False)
        k = min(out_f, in_f)
        decay = torch.logspace(0, -(1.5 + 0.25 * i), k)
        with torch.no_grad():
            if out_f == in_f:
                q, _ = torch.linalg.qr(torch.randn(out_f, in_f, generator=g))
                lin.weight.copy_(q * decay)
            elif out_f > in_f:
                lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * decay)
            else:
                lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * decay[:, None])
        setattr(layer, name, lin)
    return layer


REPEATS = 3
PEFT_ONE_THREAD = True


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_it(fn, repeats: int | None = None):
    """Best wall time of ``repeats`` runs (and the last result)."""
    best, res = math.inf, None
    for _ in range(repeats or REPEATS):
        _sync()
        t0 = time.perf_counter()
        res = fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return best, res


def _peft_kappas(model: nn.Module):
    from peft.helpers import KappaTuneSelector as PeftSelector

    sel = PeftSelector(model, show_progress=False)
    sel._compute_kappas()
    return sel._condition_numbers


def compare(label: str, model: nn.Module, run_loop: bool, device: str = "cpu") -> float:
    from kappatune.analysis import analyze_model

    model = model.to(device)
    t_full, _ = time_it(lambda: analyze_model(model, cache=False, progress=False))
    t_ours, rep = time_it(lambda: analyze_model(model, cache=False, progress=False, kappa_only=True))
    ours = {}
    for r in rep.records:
        for m in r.modules:
            ours[m] = r.kappa
    t_peft_default, peft = time_it(lambda: _peft_kappas(model))
    threads = torch.get_num_threads()
    t_peft_1 = math.inf
    if device == "cpu" and PEFT_ONE_THREAD:  # MKL's threaded SVD can be much slower than one thread on a shared CPU: credit the better
        torch.set_num_threads(1)
        try:
            t_peft_1, _ = time_it(lambda: _peft_kappas(model))
        finally:
            torch.set_num_threads(threads)
    t_peft = min(t_peft_default, t_peft_1)
    where = f"{threads} threads" if device == "cpu" else device
    line = (f"[{label}] kappatune κ-only {t_ours:8.2f} s, full {t_full:8.2f} s | peft KappaTuneSelector "
            f"{t_peft_default:8.2f} s ({where})" + (f", {t_peft_1:8.2f} s (1 thread)" if device == "cpu" else "")
            + f" -> {t_peft / t_ours:5.2f}x (κ-only), {t_peft / t_full:5.2f}x (full)"
            + (f" [load average {os.getloadavg()[0]:.1f}]" if hasattr(os, "getloadavg") else ""))
    if run_loop:
        t_loop, loop = time_it(lambda: kappatune_reference_loop(model), 1)
        line += f" | kappaTune full-SVD loop {t_loop:8.2f} s ({t_loop / t_ours:5.2f}x)"
    print(line, flush=True)

    order_ours = sorted(ours, key=lambda k: ours[k])
    order_peft = sorted(peft, key=lambda k: peft[k])
    rel = max(abs(ours[k] - peft[k]) / peft[k] for k in peft if math.isfinite(ours[k]))
    print(f"[{label}] {len(ours)} linear tensors; same κ ranking as PEFT: {order_ours == order_peft}; "
          f"max relative κ difference vs PEFT (float32 svdvals): {rel:.2e}")
    if run_loop:
        loop_mod = {k[: -len(".weight")]: v for k, v in loop.items() if k[: -len(".weight")] in ours}
        common = [m for m in order_ours if m in loop_mod]
        print(f"[{label}] same κ ranking as kappaTune loop (on its {len(common)} shared tensors): "
              f"{sorted(common, key=loop_mod.get) == common}")
    if order_ours != order_peft:  # expected where κ values are closer than PEFT's float32 error (random init)
        print(f"[{label}] rankings differ: PEFT's float32 svdvals cannot separate κ values this close")
    return t_peft / t_full  # the default path (κ-only is opt-in: it measured slower)


def smollm2_shaped(seed: int = 0) -> nn.Module:
    """A random model with SmolLM2-135M's architecture (for machines without the converted checkpoint)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for st in self.streams:
            st.write(s)

    def flush(self):
        for st in self.streams:
            st.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both tools on the same device)")
    ap.add_argument("--out", help="also write the output to this file")
    ap.add_argument("--repeats", type=int, default=3, help="runs per tool; the best time counts (default 3)")
    ap.add_argument("--skip-8b", action="store_true", help="only the tiny-llama case")
    ap.add_argument("--skip-kappatune-loop", action="store_true", help="skip the (slowest) full-SVD baseline")
    ap.add_argument("--real", action="store_true", help="also time the pretrained smollm2-135m (downloads it once)")
    ap.add_argument("--skip-tiny", action="store_true", help="skip the tiny-llama case")
    ap.add_argument("--skip-peft-one-thread", action="store_true",
                    help="on CPU, time PEFT only with the default threads (drops a run that can only help PEFT)")
    args = ap.parse_args()
    global REPEATS, PEFT_ONE_THREAD
    REPEATS = args.repeats
    PEFT_ONE_THREAD = not args.skip_peft_one_thread
    import sys

    if args.out:
        from pathlib import Path

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        sys.stdout = _Tee(sys.__stdout__, open(args.out, "w", buffering=1))
    from kappatune.models import build_tiny_llama

    dev = args.device
    gpu = f", {torch.cuda.get_device_name()}" if dev.startswith("cuda") else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {dev}{gpu}; best of {REPEATS} runs per tool"
          + (f"; load average at start {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs" if hasattr(os, "getloadavg") else ""))
    tiny = build_tiny_llama(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=4, vocab_size=2048)
    if not args.skip_tiny:
        compare("tiny-llama (4 layers, d=512, random init)", tiny, not args.skip_kappatune_loop, dev)
    if args.real:
        from kappatune.models import is_cached, load_model

        if is_cached("smollm2-135m"):
            real, label = load_model("smollm2-135m")[0], "smollm2-135m (pretrained)"
        else:
            real, label = smollm2_shaped(), "smollm2-135m shapes (random init; checkpoint not cached here)"
        s2 = compare(label, real, not args.skip_kappatune_loop, dev)
        del real
    if not args.skip_8b:
        speedup = compare("Llama-3-8B layer", llama3_8b_layer(), not args.skip_kappatune_loop, dev)
    if args.real:
        print(f"speedup_vs_peft_smollm2: {s2:.2f}")
    if not args.skip_8b:
        print(f"speedup_vs_peft: {speedup:.2f}")


if __name__ == "__main__":
    main()
