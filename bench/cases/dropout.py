"""Dropout (p = 0.1) of n elements: each pass reads one tensor and writes one."""

import torch
import torch.nn.functional as F

import gpukernels as gk

from ..harness import Case, per_mode, providers

SHAPES = [2**24, 2**26, 2**28]  # elements
QUICK_SHAPES = [2**26]
CPU_SHAPES = [2**16, 2**20]
TARGET_SHAPES = [2**26, 2**28]
TARGETS = [("fwd", "bandwidth", 0.85), ("bwd", "bandwidth", 0.85), ("fwd+bwd", "eager", 1.3)]
"""Issue 16's: each pass at 85% of the copy bandwidth, 1.3x eager forward+backward."""


def case(n: int, device: torch.device, dtype: torch.dtype) -> Case:
    x = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
    io = n * x.element_size()
    return Case(
        f"{n}",
        n,
        providers(lambda: gk.dropout(x, 0.1, seed=1), lambda: F.dropout(x, 0.1), device, "dropout"),
        [x],
        bytes=per_mode(2 * io, 2 * io),
    )
