"""layer_norm of (rows, d) with weight and bias: reads x, writes y; the backward reads dy and x, writes dx."""

import torch
import torch.nn.functional as F

import gpukernels as gk

from ..harness import Case, per_mode, providers

SHAPES = [(8192, d) for d in (1024, 2048, 4096, 8192)]  # (rows, d)
QUICK_SHAPES = [(4096, 4096)]
CPU_SHAPES = [(256, 256), (256, 1024)]
TARGET_SHAPES = [(16384, d) for d in (1024, 2048, 4096, 8192)]
TARGETS = [("fwd", "bandwidth", 0.85), ("bwd", "bandwidth", 0.85), ("fwd+bwd", "liger", 1.2)]
"""Issue 16's: forward and backward each at 85% of the copy bandwidth, 1.2x Liger-Kernel."""


def case(shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> Case:
    rows, d = shape
    x = torch.randn(rows, d, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(d, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(d, device=device, dtype=dtype, requires_grad=True)

    def liger(lg):
        norm = lg.LigerLayerNorm(d).to(device, dtype)
        return lambda: norm(x)

    io = rows * d * x.element_size()
    return Case(
        f"{rows}x{d}",
        rows * d,
        providers(
            lambda: gk.layer_norm(x, (d,), w, b), lambda: F.layer_norm(x, (d,), w, b), device, "layer_norm", liger
        ),
        [x, w, b],
        bytes=per_mode(2 * io, 3 * io),
    )
