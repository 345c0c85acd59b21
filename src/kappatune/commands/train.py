"""``kappatune train``: fine-tune a model on your data and write a directory transformers loads."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..errors import ConfigError


def _options(items: list[str] | None) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option {item!r} must look like KEY=VALUE (e.g. --option rank=16)")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--option {item!r}: the value is not valid YAML") from None
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from ..finetune import train

    targets: Any = None
    if args.targets:
        targets = args.targets[0] if len(args.targets) == 1 and args.targets[0].startswith("re:") else args.targets
        if isinstance(targets, str):
            targets = targets[3:]  # one regex, matched against whole module names
        else:
            targets = [t for item in targets for t in item.split(",") if t.strip()]
    model, results = train(
        args.model, args.data, config=args.config, output_dir=args.output, method=args.method,
        method_options=_options(args.option), policy=args.policy, top_p=args.top_p, num_modules=args.num_modules,
        targets=targets, param_budget=args.param_budget, steps=args.steps, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, seq_len=args.seq_len, control=args.control, text_field=args.text_field,
        eval_every=args.eval_every, early_stopping=args.early_stopping, eval_blocks=args.eval_blocks,
        optimizer=args.optimizer, dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing or None,
        packing=args.packing or None,
        checkpoint_every=args.checkpoint_every, save=args.save, seed=args.seed, num_threads=args.threads,
        resume=args.resume, force=args.force, progress=not args.quiet, overrides=args.overrides,
        task_type=args.type, prompt_field=args.prompt_field, response_field=args.response_field,
        messages_field=args.messages_field, choices_field=args.choices_field, chat_template=not args.no_chat_template,
        metrics=args.metric,
    )
    if os.environ.get("RANK", "0") != "0":
        return 0
    m = results.get("metrics") or {}
    info = results["export"]
    task = results["tasks"][0]
    base = (results.get("base") or {}).get("task_ppl", {}).get(task)
    final = (m.get("final_task_ppl") or {}).get(task)
    print(f"trained {info['trainable_params']:,} of {info['total_params']:,} parameters ({results['method']['label']}), "
          f"{info['steps']} steps" + (" (stopped early)" if info.get("stopped_early") else ""))
    if base is not None and final is not None:
        print(f"held-out perplexity ({task}): {base:.3f} -> {final:.3f}")
    for metric in ("accuracy", "exact_match"):
        row = (results.get("matrix") or {}).get(metric)
        if row and row[0][0] is not None and row[-1][0] is not None:
            print(f"held-out {metric} ({task}): {100 * row[0][0]:.1f}% -> {100 * row[-1][0]:.1f}%")
    if results.get("control") is not None and m.get("control_ppl_base") is not None:
        print(f"control probe ({results['control']}): perplexity {m['control_ppl_base']:.3f} -> {m['control_ppl_final']:.3f} "
              f"({m['control_change_pct']:+.2f}%)")
    out = results["config"]["output_dir"]
    print(f"wrote {out}: {', '.join(info['files'])}, README.md (model card)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="fine-tune a model on your data (KappaTune by default); writes a model transformers loads",
        description="Fine-tune MODEL on DATA with a forgetting-aware method and write OUTPUT: the merged model with "
                    "its tokenizer (AutoModelForCausalLM/AutoTokenizer.from_pretrained load it), the trained tensors "
                    "alone (--save adapter|both) and a model card README.md. Or give a `kappatune run` config with "
                    "one task. Resumable after a crash (--resume).",
    )
    p.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="a run config with exactly one task (instead of --model/--data)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. training.lr=3e-4")
    p.add_argument("--model", help="built-in name (smollm2-135m, tiny-llama), local model directory or hub id")
    p.add_argument("--data", help="training data: .txt (blank-line separated documents), .jsonl/.json/.csv/.parquet "
                                  "(--text-field), a built-in corpus or a datasets name")
    p.add_argument("--text-field", default="text", help="text field/column of raw-text data (default: text)")
    p.add_argument("--type", choices=("lm", "sft"), help="raw text (lm) or prompt/response examples (sft); default: sft "
                                                          "for built-in tasks and files with a prompt field")
    p.add_argument("--prompt-field", default="prompt", help="sft: prompt field (default: prompt)")
    p.add_argument("--response-field", default="response", help="sft: response field (default: response)")
    p.add_argument("--messages-field", help="sft: chat field, a list of {role, content}")
    p.add_argument("--choices-field", help="sft: candidate responses (default: 'choices' when present)")
    p.add_argument("--no-chat-template", action="store_true", help="sft: plain prompt format")
    p.add_argument("--metric", action="append", choices=("ppl", "accuracy", "exact_match"),
                   help="sft: metrics on the held-out examples (default: accuracy with choices, else ppl); repeatable")
    p.add_argument("-o", "--output", metavar="DIR", help="output directory")
    p.add_argument("--method", default="selective",
                   help="selective (KappaTune, default), lora, osf, eigentune, curlora, full")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="a method option, e.g. rank=16; repeatable")
    p.add_argument("--policy", choices=("kappa", "snr", "random", "all"), help="which tensors (default kappa)")
    p.add_argument("--top-p", type=float, help="fraction of candidate tensors (default 0.2)")
    p.add_argument("--num-modules", type=int, help="number of tensors")
    p.add_argument("--targets", action="append", metavar="NAMES",
                   help="candidate modules as PEFT target_modules: names or suffixes, comma separated (q_proj,v_proj), "
                        "or re:REGEX matched against whole names")
    p.add_argument("--param-budget", type=int, help="trainable parameters wanted (matched within ±10%%)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=float, help="passes over the training data (default 1)")
    p.add_argument("--lr", type=float, help="learning rate (default 1e-4)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default 4)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 128)")
    p.add_argument("--optimizer", choices=("adamw", "adafactor", "sgd"), help="default adamw")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="weights' dtype (default float32)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    p.add_argument("--packing", action="store_true",
                   help="sft: pack several examples into each --seq-len row, each attending only to itself")
    p.add_argument("--control", metavar="CORPUS", help="a corpus whose perplexity change shows what the model forgot "
                                                       "(e.g. control: Jane Austen); printed at the end")
    p.add_argument("--eval-every", type=int, default=0, metavar="N", help="validation perplexity every N steps")
    p.add_argument("--early-stopping", type=int, default=0, metavar="K",
                   help="stop after K validations without improvement (needs --eval-every)")
    p.add_argument("--eval-blocks", type=int, help="validation blocks (default 32)")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps for --resume (default 50)")
    p.add_argument("--save", choices=("merged", "adapter", "both"), default="merged",
                   help="merged model (default), the trained tensors alone, or both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--resume", action="store_true", help="continue a run killed in the output directory")
    p.add_argument("--force", action="store_true", help="start over in a directory that holds a run")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or progress lines")
    p.set_defaults(handler=cmd_train)
