"""A Llama block's residual addition and the RMSNorm before its MLP, as they run under bf16
autocast: the attention's output (the case's dtype) added to the fp32 residual stream, the sum
normalised (Llama's RMSNorm: rounded before the weight) into the dtype the MLP's projections
read. Ours in one op (``add_rms_norm``), eager as the model writes it (the addition, then the
norm of the sum, cast for the projections). Bytes counted as the least the op can move: forward
the output and the stream read, the sum and the normalised rows written; backward the
normalised rows' and the sum's gradients and the sum read, the gradients of the stream (fp32)
and of the output (its dtype) written."""

import torch

import gpukernels as gk

from ..harness import Case, per_mode, providers

SHAPES = [(16384, d) for d in (768, 1024, 2048, 4096)]  # (rows, d): 768 is the gpu preset's Llama
QUICK_SHAPES = [(16384, 768)]
CPU_SHAPES = [(256, 256), (256, 1024)]
EPS = 1e-6


def case(shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> Case:
    rows, d = shape
    attention = torch.randn(rows, d, device=device, dtype=dtype, requires_grad=True)
    residual = torch.randn(rows, d, device=device, dtype=torch.float32, requires_grad=True)
    weight = torch.randn(d, device=device, dtype=torch.float32, requires_grad=True)

    def eager():
        summed = residual + attention
        h = summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + EPS)
        return (weight * h).to(dtype), summed

    def ours():
        return gk.add_rms_norm(attention, residual, (d,), weight, EPS, cast_before_weight=True, out_dtype=dtype)

    narrow, wide = dtype.itemsize, 4
    return Case(
        f"{rows}x{d}",
        rows * d,
        providers(ours, eager, device, "add_norm"),
        [attention, residual, weight],
        bytes=per_mode(rows * d * (narrow + wide + wide + narrow), rows * d * (narrow + 2 * wide + wide + narrow)),
    )
