"""Where patched GPT-2's loss curve leaves eager's under bf16 autocast: each way's distance
from the same model trained in fp32 (no autocast), on CPU.

    python bench/results/loss-gap-2026-12-06-gpt2-bf16-cpu/loss_gap.py [SEEDS...]

A 4-layer GPT-2 (width 128, vocabulary 2048, 8 x 128 random tokens a step, 8 steps, lr 3e-3:
the loss rises, as the gpu preset's does at its step-4 spike), the same initial weights and
batches for every way: eager in fp32 (the reference), eager in bf16, patched in bf16
(gk.patch(loss="fused"), gk.optim.AdamW with the clip in its step), and patched with
fuse_linear_act=False (GPT-2's NewGELUActivation module left: eager's chain of bf16 ops).
"""

import copy
import sys

import torch

import gpukernels as gk
from gpukernels.train.models import build_language_model

STEPS = 8


def losses(base, batches, way: str, autocast: bool, **options) -> list[float]:
    torch.manual_seed(0)
    model = copy.deepcopy(base)
    if way == "eager":
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    else:
        gk.patch(model, loss="fused", **options)
        optimizer = gk.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, max_grad_norm=1.0)
    out = []
    for ids in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if way == "eager":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        out.append(loss.item())
    return out


def main(seeds: list[int]) -> None:
    print("| seed | way (bf16 autocast) | max \\|loss - fp32 eager's\\| over 8 steps | max \\|loss - bf16 eager's\\| |")
    print("|--:|---|--:|--:|")
    for seed in seeds:
        torch.manual_seed(seed)
        base = build_language_model("gpt2", dict(vocab=2048, width=128, layers=4, heads=4, seq_len=128))
        g = torch.Generator().manual_seed(seed)
        batches = [torch.randint(0, 2048, (8, 128), generator=g) for _ in range(STEPS)]
        reference = losses(base, batches, "eager", autocast=False)
        eager = losses(base, batches, "eager", autocast=True)
        ways = {
            "eager": eager,
            "patched": losses(base, batches, "patched", autocast=True),
            "patched, GELU module unfused": losses(base, batches, "patched", autocast=True, fuse_linear_act=False),
        }
        for name, curve in ways.items():
            to_fp32 = max(abs(a - b) for a, b in zip(curve, reference))
            to_eager = max(abs(a - b) for a, b in zip(curve, eager))
            print(f"| {seed} | {name} | {to_fp32:.5f} | {to_eager:.5f} |", flush=True)


if __name__ == "__main__":
    main([int(s) for s in sys.argv[1:]] or [0, 1, 2])
