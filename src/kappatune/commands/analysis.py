"""``kappatune analyze`` and ``kappatune select``."""

from __future__ import annotations

import argparse
import math

from ..errors import ConfigError
from . import add_json_arg, emit_json, json_only


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="built-in name (tiny-llama, tiny-moe, smollm2-135m), local directory or hub id")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code (off by default)")
    p.add_argument("--allow-missing-weights", action="store_true",
                   help="load a checkpoint that lacks weights of its architecture (new ones seeded) instead of refusing it")
    p.add_argument("--max-dim", type=int, default=16384, help="skip tensors with a dimension above this (default 16384)")
    p.add_argument("--include", action="append", default=None, metavar="PATTERN", help="analyse only matching tensor names (glob, substring or re:REGEX); repeatable")
    p.add_argument("--exclude", action="append", default=None, metavar="PATTERN", help="skip matching tensor names; repeatable")
    p.add_argument("--no-cache", action="store_true", help="recompute even if a cached analysis of these weights exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--kappa-only", action="store_true",
                   help="κ, σ_max, σ_min and stable rank only (no entropy/SNR), by Cholesky + Lanczos on the Gram "
                        "matrix; measured slower than the default path so far (benchmarks/results/analysis_speed_gpu*.txt)")
    p.add_argument("--load", action="store_true",
                   help="load the whole model instead of streaming a local checkpoint one tensor at a time")
    p.add_argument("--device", default=None, help="where the numerics run (cpu, cuda; default: cpu, or the model's device)")


def _analyze(args: argparse.Namespace, kappa_only: bool = False):
    """Stream a local checkpoint (safetensors directory or .gguf) tensor by tensor; load anything else."""
    from ..analysis import analyze_model
    from ..checkpoint import analyze_checkpoint, is_checkpoint_path
    from ..models import BUILTIN_MODELS, load_model

    kw = dict(max_dim_size=args.max_dim, include=args.include, exclude=args.exclude, cache=not args.no_cache,
              progress=not args.quiet, kappa_only=kappa_only, device=args.device)
    # --allow-missing-weights needs the built model (transformers initialises what the files lack), so it loads
    streaming = not (args.load or args.allow_missing_weights)
    if args.model not in BUILTIN_MODELS and streaming and is_checkpoint_path(args.model):
        return analyze_checkpoint(args.model, trust_remote_code=args.trust_remote_code, **kw)
    model, _ = load_model(args.model, trust_remote_code=args.trust_remote_code,
                          allow_missing_weights=args.allow_missing_weights)
    return analyze_model(model, **kw)


def cmd_analyze(args: argparse.Namespace) -> int:
    report = _analyze(args, kappa_only=args.kappa_only)
    if not json_only(args):
        print(report.table(top=args.top or None))
        src = "cache" if report.from_cache else "computed"
        print(f"{len(report)} tensors analysed in {report.seconds:.2f} s ({src}); fingerprint {report.fingerprint or '-'}")
    emit_json(args, report.to_json_dict())
    if args.plot:
        report.plot(args.plot)
        print(f"wrote {args.plot}")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from ..selection import select_from_report

    if args.policy != "all" and all(v is None for v in (args.top_p, args.num, args.threshold, args.param_budget)):
        raise ConfigError(f"select --policy {args.policy} needs exactly one budget: --top-p, --num, --threshold or "
                          "--param-budget (--policy all selects every tensor without one)")
    report = _analyze(args, kappa_only=args.kappa_only)  # opt-in: measured slower than the full Gram path
    sel = select_from_report(report, args.policy, top_p=args.top_p, num_modules=args.num, threshold=args.threshold,
                             param_budget=args.param_budget, balance_types=args.balance_types, seed=args.seed)
    total = sum(r.numel for r in report.records if r.kind in ("linear", "conv1d", "moe"))
    if json_only(args):
        emit_json(args, sel.to_dict())
        return 0
    print(f"policy {sel.policy}: {len(sel)} tensors, {sel.num_params:,} parameters ({100 * sel.num_params / max(total, 1):.2f}% of candidate weights)")
    for name, score in sel.scores.items():
        s = "inf" if math.isinf(score) else f"{score:.4g}"
        print(f"  {name:<60} {s:>10}")
    print("target_modules =", sel.module_names)
    if sel.moe_parameter_names:
        print("target_parameters =", sel.moe_parameter_names)
    emit_json(args, sel.to_dict())
    if args.peft_config:
        from ..checkpoint import peft_config_fragment
        from ..storage import atomic_write_json

        atomic_write_json(args.peft_config, peft_config_fragment(sel))
        print(f"wrote {args.peft_config} (merge into a peft LoraConfig)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="spectral analysis (κ, σ, stable rank, entropy, SNR) of every weight tensor",
                       description="Analyse every weight tensor of MODEL and print a table sorted by condition number κ.")
    _add_model_args(p)
    p.add_argument("--top", type=int, default=30, help="rows to print (0 = all; default 30)")
    add_json_arg(p, "all per-tensor figures")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of κ per layer and module type")
    p.set_defaults(handler=cmd_analyze)

    p = sub.add_parser("select", help="select tensors to adapt (κ, SNR, random) under a budget",
                       description="Select adaptation targets of MODEL. Give exactly one budget (--policy all needs none).")
    _add_model_args(p)
    p.add_argument("--policy", choices=("kappa", "snr", "random", "all"), default="kappa")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--top-p", type=float, help="fraction of candidate tensors, in (0, 1]")
    budget.add_argument("--num", type=int, help="number of tensors")
    budget.add_argument("--threshold", type=float, help="κ ≤ T (kappa) or SNR ≥ T (snr)")
    budget.add_argument("--param-budget", type=int, help="trainable-parameter count to fill")
    p.add_argument("--balance-types", action="store_true", help="same share of every module type (q/k/v/o/up/down...)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random policy")
    add_json_arg(p, "the selection")
    p.add_argument("--peft-config", metavar="PATH",
                   help="write a PEFT LoRA config fragment (target_modules / target_parameters) as JSON")
    p.set_defaults(handler=cmd_select)
