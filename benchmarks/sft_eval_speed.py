"""Evaluation time of an sft task's ``ppl`` + ``accuracy`` (what every study cell measures on every task after
every stage): read from one pass over the prompts (``evaluate_sft``'s fused path: the response perplexity
comes from the accuracy pass's KV cache) against the reference, a separate full forward pass for ``ppl``
(``response_nll``) next to ``choice_accuracy``; measured side by side on the same examples, same model.

    python benchmarks/sft_eval_speed.py [--tasks gcide-pos debian-section shakespeare-genre] [--n 400] [--threads 1]

Loads smollm2-135m (cached), takes the first ``n`` test examples of each labelled task (plain prompt format,
max_length 128, batch 8: the study's settings) and prints, per task, the seconds per example of both, their
ratio, and the agreement: accuracy must be identical (the choices' passes are the same), ppl equal to float
tolerance (relative difference printed). JSON lines, then a total.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["gcide-pos", "debian-section", "shakespeare-genre"])
    ap.add_argument("--n", type=int, default=400, help="test examples per task (the full split is ~400)")
    ap.add_argument("--threads", type=int, default=1, help="1: how a study worker runs (one per core)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from kappatune import data as kdata
    from kappatune.evaluation import choice_accuracy, evaluate_sft, response_nll
    from kappatune.models import load_model

    model, tok = load_model("smollm2-135m")
    tokenizer = kdata.get_tokenizer(tok)
    common = dict(chat_template=False, batch_size=8, max_length=128, progress=False)
    totals = {"fused_s": 0.0, "reference_s": 0.0, "examples": 0}
    for name in args.tasks:
        exs = kdata.load_task(name, seed=0, progress=False)["test"][: args.n]
        t0 = time.perf_counter()
        fused = evaluate_sft(model, tokenizer, exs, ["ppl", "accuracy"], **common)
        t1 = time.perf_counter()
        mean, _ = response_nll(model, tokenizer, exs, **common)
        acc = choice_accuracy(model, tokenizer, exs, **common)
        t2 = time.perf_counter()
        ref_ppl = float(torch.tensor(mean, dtype=torch.float64).exp())
        row = {"task": name, "examples": len(exs),
               "fused_s_per_example": round((t1 - t0) / len(exs), 4), "reference_s_per_example": round((t2 - t1) / len(exs), 4),
               "reference_over_fused": round((t2 - t1) / (t1 - t0), 2),
               "accuracy_identical": fused["accuracy"] == acc["accuracy"] and fused["accuracy_norm"] == acc["accuracy_norm"],
               "accuracy": fused["accuracy"], "ppl_fused": fused["ppl"], "ppl_reference": ref_ppl,
               "ppl_relative_difference": abs(fused["ppl"] - ref_ppl) / ref_ppl}
        print(json.dumps(row), flush=True)
        totals["fused_s"] += t1 - t0
        totals["reference_s"] += t2 - t1
        totals["examples"] += len(exs)
    totals["reference_over_fused"] = round(totals["reference_s"] / totals["fused_s"], 2)
    totals["threads"] = args.threads
    print(json.dumps({"total": totals}), flush=True)


if __name__ == "__main__":
    main()
