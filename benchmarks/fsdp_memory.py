"""Memory per process of one training stage, one process vs FSDP2 over N processes (random Llama, random tokens).

One process (plain):
    python benchmarks/fsdp_memory.py --size mid --method selective
N processes, sharded:
    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 benchmarks/fsdp_memory.py --size mid --method selective

Prints one JSON line per process: peak RSS during the stage, bytes of this process's parameters (its shards
under FSDP) and of its optimizer state. Uses the harness's own training loop
(:func:`kappatune.training.train_stage`) and sharding (:func:`kappatune.training.shard_model`).
"""

from __future__ import annotations

import argparse
import json

import torch

SIZES = {  # random Llama configs
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=320),
    "mid": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4, vocab_size=32000),
}


def _local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SIZES), default="mid")
    ap.add_argument("--method", default="selective", help="full | selective (KappaTune, top 25%% by κ) | lora")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from kappatune.methods import get_method
    from kappatune.training import PeakMemory, fsdp_requested, make_accelerator, per_rank, shard_model, train_stage

    torch.set_num_threads(1)
    acc = make_accelerator()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SIZES[args.size], tie_word_embeddings=False))
    opts = {"full": {}, "selective": {"policy": "kappa", "top_p": 0.25}, "lora": {"rank": 16}}[args.method]
    method = get_method(args.method, opts)
    method.prepare(model)
    sharded = fsdp_requested()
    if sharded:
        shard_model(method, acc)
    blocks = torch.randint(0, model.config.vocab_size, (64, args.seq_len))
    with PeakMemory() as mem:
        res = train_stage(method, blocks, accelerator=acc, steps=args.steps, batch_size=args.batch_size, lr=1e-4,
                          seed=0, stage=1, progress=False)
    row = {
        "size": args.size, "method": args.method, "processes": acc.num_processes, "fsdp": sharded,
        "rank": acc.process_index, "total_params": sum(p.numel() for p in method.model.parameters()),
        "trainable_params": method.num_trainable(),
        "param_mib": round(_local_bytes(method.model.parameters()) / 2**20, 1),
        "optimizer_state_mib": round(res.optimizer_state_bytes[acc.process_index] / 2**20, 1),
        "peak_rss_mib": mem.to_dict()["peak_rss_mb"],
        "final_loss": res.losses[-1],
    }
    rows = per_rank(acc, row)
    if acc.is_main_process:
        for r in rows:
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
