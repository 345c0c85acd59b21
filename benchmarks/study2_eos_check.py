"""The check behind benchmarks/results/study2/excluded_gpu_run/README.md: the base model's response NLL on the
shakespeare-genre validation split with each candidate end token (id 2 = <|im_end|>, the GGUF's; id 1 =
<|im_start|>, what transformers 5.17 set; id 0). The H100 trials' base perplexity, 39,181,100, matches id 1."""
import json, math, torch
torch.set_num_threads(1)
from kappatune.models import load_model
from kappatune.data.tasks import encode_example
from kappatune.storage import cache_dir
m = load_model("smollm2-135m")
model, tok = (m[0], m[1]) if isinstance(m, tuple) else (m.model, m.tokenizer)
exs = json.loads((cache_dir() / "labelled" / "shakespeare-genre-v1.json").read_text())["splits"]["validation"]
rows = [encode_example(tok, ex, chat_template=False) for ex in exs]
print("resp lens", sorted({len(r) for p, r in rows}), "last ids", sorted({r[-1] for p, r in rows}))
tot = {}
with torch.no_grad():
    for p, r in rows:
        ids = torch.tensor([p + r])
        lp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
        pl = len(p)
        lab = -float(lp[pl - 1, r[0]])
        for name, eid in (("eos2", r[-1]), ("eid0", 0), ("eid1", 1)):
            tot[name] = tot.get(name, 0.0) - float(lp[pl + len(r) - 2, eid])
        tot["label"] = tot.get("label", 0.0) + lab
n = len(rows)
print({k: v / n for k, v in tot.items()})
for name in ("eos2", "eid0", "eid1"):
    print(name, "mean nll over 2 tokens", (tot["label"] + tot[name]) / (2 * n), "ppl", math.exp((tot["label"] + tot[name]) / (2 * n)))
