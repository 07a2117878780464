"""Mean cross-entropy of (rows, vocab) logits under bf16 autocast, as a mixed-precision training step
computes its loss: PyTorch's autocast runs F.cross_entropy on an fp32 copy of bf16 logits (kept for
the backward, whose fp32 gradient it rounds back to bf16); ours reads the logits as they are and
returns the fp32 loss. Bytes: what ours moves, 3x the logits' (a read forward, a read and a write
backward)."""

from functools import partial

import torch
import torch.nn.functional as F

import gpukernels as gk

from ..harness import Case, per_mode, providers
from .cross_entropy import CPU_SHAPES, QUICK_SHAPES, SHAPES  # noqa: F401  (the plain op's shapes)


def _under_autocast(fn, device: torch.device):
    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn()

    return run


def case(shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> Case:
    rows, v = shape
    logits = torch.randn(rows, v, device=device, dtype=dtype, requires_grad=True)
    target = torch.randint(0, v, (rows,), device=device)
    io = rows * v * logits.element_size()
    return Case(
        f"{rows}x{v}",
        rows * v,
        providers(
            _under_autocast(lambda: gk.cross_entropy(logits, target), device),
            _under_autocast(lambda: F.cross_entropy(logits, target), device),
            device,
            "cross_entropy",
            lambda lg: _under_autocast(partial(lg.LigerCrossEntropyLoss(), logits, target), device),
        ),
        [logits],
        bytes=per_mode(io, 2 * io),
        uncapturable={"liger": "its cross_entropy copies from the host in each call (H200, 2026-12-04)"},
    )
