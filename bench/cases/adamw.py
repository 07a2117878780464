"""One AdamW step over fp32 parameters (whatever ``--dtype``) in 4096x4096 matrices and one
remainder, against torch.optim.AdamW (fused on CUDA, foreach): 7 fp32 reads and writes per
parameter (param, grad, two moments read; param, two moments written)."""

import torch

import gpukernels as gk

from ..harness import Case

SHAPES = [10**7, 10**8, 10**9]  # parameters
QUICK_SHAPES = [10**8]
CPU_SHAPES = [10**5, 10**6]
COMPILE_SKIP_REASON = "the step stays one opaque op under torch.compile: no kernel of Inductor's to compare with"
OPTIMIZERS = {
    "gpukernels": lambda params: gk.optim.AdamW(params, lr=1e-3),
    "torch-fused": lambda params: torch.optim.AdamW(params, lr=1e-3, fused=True),
    "torch-foreach": lambda params: torch.optim.AdamW(params, lr=1e-3, foreach=True),
}


def parameters(total: int, device: torch.device) -> list[torch.nn.Parameter]:
    """``total`` fp32 parameters in 4096x4096 matrices and one remainder, each with a random
    grad (finite, of norm about sqrt(its size))."""
    chunk = min(4096 * 4096, total)
    sizes = [chunk] * (total // chunk) + ([total % chunk] if total % chunk else [])
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def optimizers(device: torch.device) -> dict:
    """``OPTIMIZERS`` that run on ``device`` (PyTorch's fused AdamW: CUDA only here)."""
    return {name: make for name, make in OPTIMIZERS.items() if name != "torch-fused" or device.type == "cuda"}


def case(total: int, device: torch.device, dtype: torch.dtype) -> Case:
    steps = {name: make(parameters(total, device)).step for name, make in optimizers(device).items()}
    return Case(f"{total / 1e6:g}M params", total, steps, bytes={"step": 7 * 4 * total}, modes=("step",))
