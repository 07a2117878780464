"""Bytes saved for the backward by one forward under bf16 autocast (CPU), of a patched model."""
import sys, warnings
import torch
import gpukernels as gk

warnings.filterwarnings("ignore")
name = sys.argv[1]
torch.manual_seed(0)
if name == "convnext_tiny":
    import timm

    model = timm.create_model("convnext_tiny", num_classes=10)
    batch = dict(x=torch.randn(8, 3, 224, 224))
    run = lambda: model(batch["x"]).float().logsumexp(-1).mean()
else:
    import transformers

    common = dict(vocab_size=8192, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=512, head_dim=64, max_position_embeddings=512, pad_token_id=0, bos_token_id=0,
                  eos_token_id=0)
    if name == "olmo2":
        model = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**common))
    else:
        model = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(
            **common, global_head_dim=64, hidden_size_per_layer_input=64, vocab_size_per_layer_input=8192,
            layer_types=["sliding_attention", "full_attention"]))
    ids = torch.randint(0, 8192, (4, 256))
    run = lambda: model(input_ids=ids, labels=ids).loss
if "unpatched" not in sys.argv:
    gk.patch(model)
seen = {}


def keep(t):
    seen[id(t)] = t
    return t


with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
    loss = run()
storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in seen.values()}
print(name, "unpatched" if "unpatched" in sys.argv else gk.__file__)
print(f"  saved for the backward: {sum(storages.values()) / 2**20:.1f} MiB in {len(storages)} storages; loss {float(loss):.6f}")
