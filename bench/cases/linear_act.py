"""gelu(x @ w.T + b) of (m, k) by (n, k): counted in FLOPs; on CUDA also against cuBLAS
(its fused addmm + gelu, and the bare matmul)."""

import math

import torch
import torch.nn.functional as F

import gpukernels as gk

from ..harness import Case, per_mode, providers

SHAPES = [(4096, 4096, 4096), (8192, 4096, 4096), (8192, 4096, 16384)]  # (m, k, n)
QUICK_SHAPES = [(8192, 4096, 4096)]
CPU_SHAPES = [(128, 256, 256)]


def case(shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> Case:
    m, k, n = shape
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(n, k, device=device, dtype=dtype) / math.sqrt(k)).requires_grad_()
    b = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
    compared = providers(
        lambda: gk.linear_act(x, w, b, "gelu"), lambda: F.gelu(F.linear(x, w, b)), device, "linear_act"
    )
    if device.type == "cuda":
        compared["cublas-addmm-gelu"] = lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True)
        compared["cublas-matmul"] = lambda: x @ w.t()
    flops = 2 * m * n * k
    return Case(f"{m}x{k}x{n}", m * n * k, compared, [x, w, b], flops=per_mode(flops, 2 * flops))
