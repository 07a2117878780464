"""Gradient clipping by the global L2 norm and one AdamW step, over the parameters of
``adamw.py``'s cases: ours with the clip inside the step (``max_grad_norm``: one read of
the gradients for the norm, the factor applied as the update reads them: 8 fp32 accesses
per parameter) against a clip pass that scales every gradient in place first (10
accesses), ours and PyTorch's (``clip_grad_norm_(foreach=True)`` + fused AdamW on CUDA)."""

import torch

import gpukernels as gk

from ..harness import Case
from . import adamw

SHAPES, QUICK_SHAPES, CPU_SHAPES = adamw.SHAPES, adamw.QUICK_SHAPES, adamw.CPU_SHAPES
COMPILE_SKIP_REASON = adamw.COMPILE_SKIP_REASON
MAX_NORM = 1.0


def _clipped(clip, optimizer):
    def step():
        clip()
        optimizer.step()

    return step


def case(total: int, device: torch.device, dtype: torch.dtype) -> Case:
    # grads of a norm of about sqrt(total): every step clips
    params = adamw.parameters(total, device)
    steps = {"gpukernels": gk.optim.AdamW(params, lr=1e-3, max_grad_norm=MAX_NORM).step}
    unfused_params = adamw.parameters(total, device)
    steps["gpukernels-unfused"] = _clipped(
        lambda: gk.optim.clip_grad_norm_(unfused_params, MAX_NORM), gk.optim.AdamW(unfused_params, lr=1e-3)
    )
    torch_params = adamw.parameters(total, device)
    fused = device.type == "cuda"
    steps["torch-fused" if fused else "torch-foreach"] = _clipped(
        lambda: torch.nn.utils.clip_grad_norm_(torch_params, MAX_NORM, foreach=True),
        torch.optim.AdamW(torch_params, lr=1e-3, **({"fused": True} if fused else {"foreach": True})),
    )
    return Case(f"{total / 1e6:g}M params", total, steps, bytes={"step": 8 * 4 * total}, modes=("step",))
