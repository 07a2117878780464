"""Mean cross-entropy of (rows, vocab) logits: the forward reads them, the backward reads them again and writes
their gradient (3x the logits' bytes in all)."""

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

import gpukernels as gk

from ..harness import Case, per_mode, providers

SHAPES = [(8192, v) for v in (32768, 131072, 262144)]  # (rows, vocab)
QUICK_SHAPES = [(4096, 131072)]
CPU_SHAPES = [(64, 1000), (64, 4096)]
TARGET_SHAPES = SHAPES
TARGETS = [("fwd+bwd", "bandwidth", 0.85), ("fwd+bwd", "liger", 1.5)]
"""Issue 16's: forward+backward at 85% of the copy bandwidth on its 3 passes over the logits, 1.5x Liger-Kernel."""


def case(
    shape: tuple[int, int], device: torch.device, dtype: torch.dtype, wrap: Callable[[Callable], Callable] = lambda f: f
) -> Case:
    """``wrap``: what each provider's call runs in (``cross_entropy_amp``: under autocast)."""
    rows, v = shape
    logits = torch.randn(rows, v, device=device, dtype=dtype, requires_grad=True)
    target = torch.randint(0, v, (rows,), device=device)
    io = rows * v * logits.element_size()
    return Case(
        f"{rows}x{v}",
        rows * v,
        providers(
            wrap(lambda: gk.cross_entropy(logits, target)),
            wrap(lambda: F.cross_entropy(logits, target)),
            device,
            "cross_entropy",
            lambda lg: wrap(partial(lg.LigerCrossEntropyLoss(), logits, target)),
        ),
        [logits],
        bytes=per_mode(io, 2 * io),
        uncapturable={"liger": "its cross_entropy copies from the host in each call (H200, 2026-12-04)"},
    )
