"""layer_norm of (rows, d) with weight and bias: reads x, writes y; the backward reads dy and x, writes dx."""

from functools import partial

import torch
import torch.nn.functional as F

import gpukernels as gk

from ..harness import Case, per_mode, providers

SHAPES = [(8192, d) for d in (1024, 2048, 4096, 8192)]  # (rows, d)
QUICK_SHAPES = [(4096, 4096)]
CPU_SHAPES = [(256, 256), (256, 1024)]
TARGET_SHAPES = [(16384, d) for d in (1024, 2048, 4096, 8192)]
TARGETS = [
    ("fwd", "bandwidth", 0.85),
    ("bwd", "bandwidth", 0.85),
    ("fwd+bwd", "liger", 1.2),
    ("fwd+bwd", "quack", 1.0),
]
"""Issue 16's: forward and backward each at 85% of the copy bandwidth, 1.2x Liger-Kernel, 1.0x QuACK."""


class QuackLayerNorm(torch.autograd.Function):
    """QuACK's LayerNorm kernels (``quack.rmsnorm.layernorm_fwd`` and ``layernorm_bwd``,
    which it ships without an autograd function) as one op to time forward and backward.
    They take fp32 weight and bias: the call casts the case's to fp32 and their gradients
    back (four launches over ``d`` elements, timed with it: the same inputs and outputs as
    the other providers)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        from quack.rmsnorm import layernorm_fwd

        weight32 = weight.float()
        y, rstd, mean = layernorm_fwd(x, weight32, bias.float(), eps, return_rstd=True, return_mean=True)
        ctx.save_for_backward(x, weight32, rstd, mean)
        ctx.dtypes = weight.dtype, bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        from quack.rmsnorm import layernorm_bwd

        x, weight32, rstd, mean = ctx.saved_tensors
        dx, dweight, dbias = layernorm_bwd(x, weight32, dy.contiguous(), rstd, mean, has_bias=True)
        return dx, dweight.to(ctx.dtypes[0]), dbias.to(ctx.dtypes[1]), None


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
            lambda: gk.layer_norm(x, (d,), w, b),
            lambda: F.layer_norm(x, (d,), w, b),
            device,
            "layer_norm",
            liger,
            lambda: partial(QuackLayerNorm.apply, x, w, b, 1e-5),
        ),
        [x, w, b],
        bytes=per_mode(2 * io, 3 * io),
    )
