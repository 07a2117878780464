"""Sizes of each model: ``cpu`` (tiny, about a minute on 2 cores for every way)
and ``gpu`` (the real architectures, bf16 autocast, batches that fit 80 GB)."""

PRESETS = {
    "mlp": {  # scikit-learn's digits; 220 steps = 10 epochs of 22 batches
        "cpu": dict(hidden=256, blocks=1, dropout=0.0, steps=220, batch_size=64, lr=3e-3, dtype="float32"),
        "gpu": dict(hidden=4096, blocks=4, dropout=0.1, steps=20, batch_size=1024, lr=5e-4, dtype="bfloat16"),
    },
    "gpt2": {  # gpu: GPT-2 small (124M)
        "cpu": dict(
            vocab=2048,
            corpus_bytes=1_000_000,
            width=64,
            layers=2,
            heads=4,
            seq_len=64,
            batch_size=8,
            steps=30,
            lr=3e-3,
            dtype="float32",
        ),
        "gpu": dict(
            vocab=50257,
            corpus_bytes=None,
            width=768,
            layers=12,
            heads=12,
            seq_len=1024,
            batch_size=32,
            steps=100,
            lr=6e-4,
            dtype="bfloat16",
        ),
    },
    "llama": {  # gpu: Llama layout, 148M parameters (49M of them the untied 32k embeddings and head)
        "cpu": dict(
            vocab=2048,
            corpus_bytes=1_000_000,
            width=64,
            intermediate=176,
            layers=2,
            heads=4,
            kv_heads=2,
            seq_len=64,
            batch_size=8,
            steps=30,
            lr=3e-3,
            dtype="float32",
        ),
        "gpu": dict(
            vocab=32000,
            corpus_bytes=None,
            width=768,
            intermediate=2560,
            layers=12,
            heads=12,
            kv_heads=12,
            seq_len=2048,
            batch_size=16,
            steps=100,
            lr=6e-4,
            dtype="bfloat16",
        ),
    },
    "resnet50": {  # digits resized; cpu: a 4-block bottleneck ResNet of the same layout
        "cpu": dict(
            blocks=(1, 1, 1, 1),
            width=16,
            image_size=64,
            channels_last=False,
            steps=20,
            batch_size=16,
            lr=1e-3,
            dtype="float32",
        ),
        "gpu": dict(
            blocks=(3, 4, 6, 3),
            width=64,
            image_size=224,
            channels_last=True,
            steps=100,
            batch_size=256,
            lr=1e-3,
            dtype="bfloat16",
        ),
    },
}
# Qwen3's and Gemma 3's layouts at the Llama preset's sizes (gpu: Qwen3 148M; Gemma 3, its head tied to the
# embeddings, 123M)
PRESETS["qwen3"] = {preset: dict(cfg) for preset, cfg in PRESETS["llama"].items()}
PRESETS["gemma3"] = {preset: dict(cfg) for preset, cfg in PRESETS["llama"].items()}
