"""Training-step time of supervised fine-tuning with the output layer on response positions only (what training
does: ``sft_loss_sum``) against the full vocabulary projection of every position (``all_logits=True``), measured
side by side on the same batches.

    python benchmarks/sft_step_speed.py [--task debian-section] [--steps 6] [--threads 2] [--method selective]

Loads smollm2-135m (cached), builds 4 x 128-token sft batches of a labelled task (plain prompt format) and times
forward + backward + AdamW steps, alternating the two variants step by step. Prints seconds per step and the
ratio (JSON).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="debian-section")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--method", default="selective", help="full or selective (kappa policy, 3.54M parameters)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from kappatune import data as kdata
    from kappatune.methods import get_method
    from kappatune.models import load_model
    from kappatune.training import _take_rows, sft_loss_sum

    model, tok = load_model("smollm2-135m")
    tokenizer = kdata.get_tokenizer(tok)
    task = kdata.load_task(args.task, name=args.task, seed=0, validation_fraction=0.1, test_fraction=0.1, progress=False)
    opts = {} if args.method == "full" else {"policy": "kappa", "param_budget": 3538944}
    method = get_method(args.method, opts)
    method.prepare(model)
    data = kdata.tokenize_sft(task["train"][:200], tokenizer, max_length=128, chat_template=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    times: dict[str, list[float]] = {"response_logits": [], "all_logits": []}
    for step in range(args.steps + 1):  # step 0 warms both up and is not counted
        batch = _take_rows(data, torch.arange(4 * step, 4 * step + 4) % data["input_ids"].shape[0])
        for variant in times:
            t0 = time.perf_counter()
            opt.zero_grad()
            sft_loss_sum(model, batch, all_logits=variant == "all_logits").backward()
            opt.step()
            if step:
                times[variant].append(time.perf_counter() - t0)
    out = {"task": args.task, "method": args.method, "threads": args.threads,
           "tokens_per_step": "4 x up to 128", **{k: sum(v) / len(v) for k, v in times.items()}}
    out["speedup"] = out["all_logits"] / out["response_logits"]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
