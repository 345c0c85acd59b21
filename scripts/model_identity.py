"""Is the converted SmolLM2-135M on this machine the one the study's other cells ran on?

Prints the content hash of the weights (every tensor of model.safetensors, by name: independent of the file's
metadata or tensor order, which can change with the transformers version that converted it) and of the
tokenizer: its special-token ids, and the exact token ids (prompt, response, end token) of every example of the
study's three tasks, plus the chat template. With --expect
(the default), exits 4 on any difference: a cell from a different model or tokenizer would not pair with the rest.
Used by scripts/study2_device.sh before any GPU cell runs.
"""
from __future__ import annotations

import hashlib
import json
import sys

from safetensors import safe_open
from transformers import AutoTokenizer

from kappatune.data.tasks import encode_example
from kappatune.models import prepare_smollm2
from kappatune.storage import cache_dir

TASKS = ("shakespeare-genre", "gcide-pos", "debian-section")
EXPECTED = {"weights": "3ac0c172da6bdd046b558c2f12d0adaa20eba5c9bd3bd656ecf4f7a2e6d30912",
            "tokenizer": "c0041add8678cf009ee31e9c5ad152891a4d7e31ab457980bb3c859448ae1d7b"}


def identity() -> dict[str, str]:
    d = prepare_smollm2(progress=False)
    h = hashlib.sha256()
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    tok = AutoTokenizer.from_pretrained(d)
    g = hashlib.sha256()
    # the special tokens (the end token is appended to every response: transformers 5.17 set another one)
    g.update(json.dumps([tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id, len(tok)]).encode())
    for task in TASKS:
        data = json.loads((cache_dir() / "labelled" / f"{task}-v1.json").read_text("utf-8"))
        for split in ("train", "validation", "test"):
            for i, ex in enumerate(data["splits"].get(split, [])):
                # exactly the ids a cell trains and scores on (plain format), and the chat format on a sample
                g.update(json.dumps(encode_example(tok, ex, chat_template=False)).encode())
                if i < 50:
                    g.update(json.dumps(encode_example(tok, ex, chat_template=True)).encode())
    g.update((tok.chat_template or "").encode())
    return {"weights": h.hexdigest(), "tokenizer": g.hexdigest()}


if __name__ == "__main__":
    got = identity()
    print(json.dumps(got))
    if "--print" in sys.argv:
        sys.exit(0)
    bad = [k for k, v in EXPECTED.items() if got[k] != v]
    print("model identity", "OK" if not bad else f"MISMATCH in {', '.join(bad)} (want {EXPECTED})")
    sys.exit(4 if bad else 0)
