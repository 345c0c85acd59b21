"""The measured inputs of configs/study2.yaml's CPU-time estimate: one training step and one accuracy example.

    python benchmarks/study2_cost.py [--steps 3] [--examples 6] [--threads 1] [--task wordnet-noun]

Loads smollm2-135m (cached), trains full fine-tuning for ``--steps`` steps on 4 x 128-token sft batches of a
labelled task and scores ``--examples`` test examples by accuracy. Prints process CPU time and wall time per
step and per example (JSON). CPU time is the study's unit (the bench records each cell's process CPU time).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--examples", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--task", default="wordnet-noun")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from kappatune import data as kdata
    from kappatune.evaluation import evaluate_sft
    from kappatune.methods import get_method
    from kappatune.models import load_model
    from kappatune.training import make_accelerator, train_stage

    model, tok = load_model("smollm2-135m")
    tokenizer = kdata.get_tokenizer(tok)
    task = kdata.load_task(args.task, name=args.task, seed=0, validation_fraction=0.1, test_fraction=0.1, progress=False)
    out: dict = {"threads": args.threads, "task": args.task}
    method = get_method("full", {})
    method.prepare(model)
    train = kdata.tokenize_sft(task["train"][:200], tokenizer, max_length=128)
    c0, w0 = time.process_time(), time.perf_counter()
    train_stage(method, train, accelerator=make_accelerator(), steps=args.steps, batch_size=4, lr=1e-5,
                schedule="constant", seed=0, stage=1, progress=False)
    out["full_step"] = {"cpu_s": (time.process_time() - c0) / args.steps, "wall_s": (time.perf_counter() - w0) / args.steps}
    exs = task["test"][: args.examples]
    c0, w0 = time.process_time(), time.perf_counter()
    evaluate_sft(method.model, tokenizer, exs, ["accuracy"], batch_size=8, max_length=128, progress=False)
    out["accuracy_example"] = {"cpu_s": (time.process_time() - c0) / len(exs), "wall_s": (time.perf_counter() - w0) / len(exs)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
