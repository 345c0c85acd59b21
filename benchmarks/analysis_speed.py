"""Analysis speed: kappatune vs PEFT's KappaTuneSelector vs kappaTune's per-tensor full-SVD loop.

All three analyse the same weights in one run, one after the other:

(a) a tiny-llama sized to take a few seconds;
(b) one Llama-3-8B-shaped decoder layer (q/o 4096×4096, k/v 1024×4096, gate/up 14336×4096, down 4096×14336),
    random weights with a decaying spectrum (timing does not depend on the values).

PEFT is timed with torch's default thread count and with one thread, and credited with the faster of the two
(MKL's threaded SVD can be several times slower than one thread on a shared CPU). It checks that the three rank
the tensors identically and ends with ``speedup_vs_peft: X.XX`` (best PEFT time / ours, on (b)).
Usage: ``python benchmarks/analysis_speed.py [--real] [--skip-8b] [--skip-kappatune-loop]``.
"""

from __future__ import annotations

import argparse
import math
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


def time_it(fn):
    t0 = time.perf_counter()
    res = fn()
    return time.perf_counter() - t0, res


def compare(label: str, model: nn.Module, run_loop: bool) -> float:
    from peft.helpers import KappaTuneSelector as PeftSelector

    from kappatune.analysis import analyze_model

    t_ours, rep = time_it(lambda: analyze_model(model, cache=False, progress=False))
    ours = {}
    for r in rep.records:
        for m in r.modules:
            ours[m] = r.kappa
    sel = PeftSelector(model, show_progress=False)
    t_peft_default, _ = time_it(sel._compute_kappas)
    peft = sel._condition_numbers
    # MKL's threaded SVD can be much slower than one thread on a shared CPU; PEFT is credited with its better time.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sel1 = PeftSelector(model, show_progress=False)
        t_peft_1, _ = time_it(sel1._compute_kappas)
    finally:
        torch.set_num_threads(threads)
    t_peft = min(t_peft_default, t_peft_1)
    line = (f"[{label}] kappatune {t_ours:8.2f} s | peft KappaTuneSelector {t_peft_default:8.2f} s ({threads} threads), "
            f"{t_peft_1:8.2f} s (1 thread) -> best {t_peft / t_ours:5.2f}x")
    if run_loop:
        t_loop, loop = time_it(lambda: kappatune_reference_loop(model))
        line += f" | kappaTune full-SVD loop {t_loop:8.2f} s ({t_loop / t_ours:5.2f}x)"
    print(line)

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
    if order_ours != order_peft:
        raise SystemExit(f"[{label}] selections disagree")
    return t_peft / t_ours


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-8b", action="store_true", help="only the tiny-llama case")
    ap.add_argument("--skip-kappatune-loop", action="store_true", help="skip the (slowest) full-SVD baseline")
    ap.add_argument("--real", action="store_true", help="also time the pretrained smollm2-135m (downloads it once)")
    args = ap.parse_args()
    from kappatune.models import build_tiny_llama

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    tiny = build_tiny_llama(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=4, vocab_size=2048)
    compare("tiny-llama (4 layers, d=512, random init)", tiny, not args.skip_kappatune_loop)
    try:
        from kappatune.models import load_model

        if args.real:
            real, _ = load_model("smollm2-135m")
            compare("smollm2-135m (pretrained)", real, not args.skip_kappatune_loop)
    except Exception as exc:  # the real model is optional here
        print(f"[smollm2-135m] skipped: {exc}")
    if args.skip_8b:
        return
    speedup = compare("Llama-3-8B layer", llama3_8b_layer(), not args.skip_kappatune_loop)
    print(f"speedup_vs_peft: {speedup:.2f}")


if __name__ == "__main__":
    main()
