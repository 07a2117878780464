"""An OLMo 2 block's norm after a branch and the residual addition after it, as they run under
bf16 autocast: the branch's output (the case's dtype) normalised (OLMo 2's RMSNorm: times the
weight in fp32, rounded back to the output's dtype) and added to the fp32 residual stream. Ours in
one op (``rms_norm_add``), eager as the model writes it (the norm, then the addition). Bytes counted
as the least the op can move: forward the output and the stream read, the sum written; backward
the sum's gradient and the output read, the output's gradient written (the stream's gradient is the
sum's itself: nothing to write)."""

import torch

import gpukernels as gk

from ..harness import Case, per_mode, providers

SHAPES = [(16384, d) for d in (768, 1024, 2048, 4096)]  # (rows, d), as add_rms_norm's
QUICK_SHAPES = [(16384, 2048)]  # OLMo 2 1B's width
CPU_SHAPES = [(256, 256), (256, 1024)]
EPS = 1e-6


def case(shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> Case:
    rows, d = shape
    branch = torch.randn(rows, d, device=device, dtype=dtype, requires_grad=True)
    residual = torch.randn(rows, d, device=device, dtype=torch.float32, requires_grad=True)
    weight = torch.randn(d, device=device, dtype=torch.float32, requires_grad=True)

    def eager():
        h = branch.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
        return residual + (weight * h).to(dtype)

    def ours():
        return gk.rms_norm_add(branch, residual, (d,), weight, EPS, norm_dtype=dtype)

    narrow, wide = dtype.itemsize, 4
    return Case(
        f"{rows}x{d}",
        rows * d,
        providers(ours, eager, device, "norm_add"),
        [branch, residual, weight],
        bytes=per_mode(rows * d * (narrow + wide + wide), rows * d * (wide + narrow + narrow)),
    )
