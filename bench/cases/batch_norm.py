"""2d batch_norm in training of (n, c, hw, hw), fp32 weight, bias and running statistics:
bytes counted for x (read, written) and its gradient, as for layer_norm."""

import torch
import torch.nn.functional as F

import gpukernels as gk

from ..harness import Case, per_mode, providers

SHAPES = [(256, 64, 56), (256, 128, 28), (256, 256, 14), (256, 512, 7)]  # (n, c, hw)
QUICK_SHAPES = [(256, 256, 14)]
CPU_SHAPES = [(8, 16, 8), (16, 32, 14)]


def case(shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> Case:
    n, c, hw = shape
    x = torch.randn(n, c, hw, hw, device=device, dtype=dtype, requires_grad=True)
    w = torch.ones(c, device=device, requires_grad=True)
    b = torch.zeros(c, device=device, requires_grad=True)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    io = x.numel() * x.element_size()
    return Case(
        f"{n}x{c}x{hw}x{hw}",
        x.numel(),
        providers(
            lambda: gk.batch_norm(x, rm, rv, w, b, training=True),
            lambda: F.batch_norm(x, rm, rv, w, b, training=True),
            device,
            "batch_norm",
        ),
        [x, w, b],
        bytes=per_mode(2 * io, 3 * io),
    )
