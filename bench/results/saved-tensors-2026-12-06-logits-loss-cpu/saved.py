"""Bytes saved for the backward in one step of a patched GPT-2 (loss="logits", the default) under bf16 autocast."""
import sys, torch
import gpukernels as gk
from gpukernels.train.models import build_language_model
print(gk.__file__)
cfg = dict(vocab=8192, width=64, layers=2, heads=4, seq_len=256, batch_size=8)
torch.manual_seed(0)
model = build_language_model("gpt2", cfg)
gk.patch(model)
ids = torch.randint(0, cfg["vocab"], (cfg["batch_size"], cfg["seq_len"]))
seen = {}
def keep(t):
    seen[id(t)] = t
    return t
with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
    out = model(input_ids=ids, labels=ids)
storages = {}
for t in seen.values():
    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
logits = out.logits
print("logits", tuple(logits.shape), logits.dtype, f"{logits.numel() * logits.element_size() / 2**20:.1f} MiB")
print(f"saved for the backward: {sum(storages.values()) / 2**20:.1f} MiB in {len(storages)} storages; largest:",
      ", ".join(f"{n / 2**20:.1f}" for n in sorted(storages.values(), reverse=True)[:3]), "MiB")
out.loss.backward()
print("loss", out.loss.dtype, float(out.loss))
