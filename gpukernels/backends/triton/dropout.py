"""Inverted dropout on a flattened contiguous tensor, the mask drawn from
(seed, element index) by Philox4x32-10: nothing is stored, the backward
calls the same kernel on ``dy``.

The counter layout and the uint32 -> float mapping are spelled out here
(rather than left to ``tl.rand``) so the masks equal the NumPy backend's bit
for bit on every Triton version: counter ``(index lo, index hi, 0, 0)``, key
``seed``, first output word mapped as Triton's ``uint_to_uniform_float``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, round_to

BLOCK = 1024


@triton.jit
def uniform_from_index(seed, index):
    """Uniform float32 in [0, 1) for int64 ``index`` under 64-bit ``seed``."""
    lo = (index & 0xFFFFFFFF).to(tl.uint32)
    hi = (index >> 32).to(tl.uint32)
    zero = lo * 0
    bits, _, _, _ = tl.philox(seed, lo, hi, zero, zero)
    signed = bits.to(tl.int32, bitcast=True)
    # ~x maps the negative half onto [0, 2**31) so the sign bit is not wasted
    nonnegative = tl.where(signed < 0, -signed - 1, signed)
    return nonnegative.to(tl.float32) * 4.6566127342e-10


@triton.jit
def dropout_kernel(X, Y, Seed, Scale, n, p, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(X + offsets, mask=mask, other=0.0).to(ACC)
    keep = uniform_from_index(tl.load(Seed), offsets) > p
    scale = tl.load(Scale)
    # tl.where, not a multiply by the mask: a dropped inf or nan gives 0.
    tl.store(Y + offsets, round_to(tl.where(keep, x * scale, 0.0), Y.dtype.element_ty), mask=mask)


def dropout_fwd(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    from ..numpy.dropout import keep_scale  # the one definition of the scale's rounding

    y = torch.empty_like(x)
    n = x.numel()
    if n:
        # Float arguments reach a kernel as fp32, so the (fp64 for fp64 input)
        # scale travels in a one-element tensor.
        scale_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        scale = torch.full((), float(keep_scale(p, x.dtype)), dtype=scale_dtype, device=x.device)
        dropout_kernel[(triton.cdiv(n, BLOCK),)](x, y, seed, scale, n, p, ACC=acc_dtype(x.dtype), BLOCK=BLOCK)
    return y
