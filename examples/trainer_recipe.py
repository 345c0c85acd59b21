"""Any kappatune method inside a ``transformers.Trainer``: prepare the model with the method, hand the Trainer the
method's optimizer, train as usual, then merge and save.

    python examples/trainer_recipe.py [MODEL] [--method selective|lora|osf|eigentune|curlora] [--steps N]

The method decides what trains: ``method.prepare(model)`` freezes (or wraps) the model, and
``method.make_optimizer`` builds an optimizer over the selected tensors only (for KappaTune, a
:class:`~kappatune.methods.selective.SelectiveOptimizer`: optimizer state for the selected tensors alone, every
other tensor bitwise frozen). The Trainer gets that optimizer through ``optimizers=(optimizer, None)`` (it builds
its own LR schedule around it) and never sees a frozen parameter in the optimizer. ``method.merge()`` returns a
plain transformers model for ``save_pretrained``.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch


def run_recipe(model: torch.nn.Module, blocks: torch.Tensor, *, method: str = "selective", options: dict[str, Any] | None = None,
               steps: int = 2, lr: float = 1e-3, batch_size: int = 4, output_dir: str = "trainer-out") -> tuple[Any, Any]:
    """Train ``model`` on token ``blocks`` ``[N, seq_len]`` with ``transformers.Trainer``; returns (method, trainer)."""
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    from kappatune.methods import get_method

    class Blocks(Dataset):  # a causal-LM dataset: labels are the inputs (the model shifts them)
        def __len__(self) -> int:
            return blocks.shape[0]

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": blocks[i], "labels": blocks[i]}

    m = get_method(method, options if options is not None else {"policy": "kappa", "top_p": 0.2})
    trainable_model = m.prepare(model)
    optimizer = m.make_optimizer(torch.optim.AdamW, lr=lr, weight_decay=0.01)
    args = TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=trainable_model, args=args, train_dataset=Blocks(), optimizers=(optimizer, None))
    trainer.train()
    return m, trainer


def main() -> None:
    from kappatune.data import build_blocks, get_tokenizer
    from kappatune.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="tiny-llama")
    ap.add_argument("--data", default="shakespeare")
    ap.add_argument("--method", default="selective")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--output", default="trainer-out")
    a = ap.parse_args()
    model, tok = load_model(a.model)
    blocks = build_blocks(a.data, get_tokenizer(tok if tok is not None else a.model), 128, split="train", max_blocks=256)
    options = {"policy": "kappa", "top_p": 0.2} if a.method in ("selective", "lora") else {}
    method, _ = run_recipe(model, blocks, method=a.method, options=options, steps=a.steps, output_dir=a.output)
    method.merge().save_pretrained(f"{a.output}/model")
    print(f"trained {method.num_trainable():,} parameters with {a.method}; saved {a.output}/model")


if __name__ == "__main__":
    main()
