"""Inverted dropout on a flattened contiguous tensor, the mask drawn from
(seed, element index) by Philox4x32-10: nothing is stored, the backward
calls the same kernel on ``dy``.

One Philox call serves four elements: element ``i`` takes output word ``i % 4``
of counter ``(i // 4 lo, i // 4 hi, 0, 0)``, key ``seed``, mapped to a float as
Triton's ``uint_to_uniform_float`` maps it (``numpy/philox.py``'s
``element_uniforms``, bit for bit). Ten rounds of 32-bit multiplies per element
made the kernel compute-bound (0.32 ms forward for 2^26 bf16 on an H100); per
four, the generator costs about what moving the bytes does (0.09 ms on an H200,
72% of its copy bandwidth).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, round_to

BLOCK = 2048


@triton.jit
def uniform_from_bits(bits):
    """Triton's ``uint_to_uniform_float`` for uint32: a float32 in [0, 1)."""
    signed = bits.to(tl.int32, bitcast=True)
    # ~x maps the negative half onto [0, 2**31) so the sign bit is not wasted
    nonnegative = tl.where(signed < 0, -signed - 1, signed)
    return nonnegative.to(tl.float32) * 4.6566127342e-10


@triton.jit
def dropout_kernel(X, Y, Seed, scale, n, p, SCALE_IN_MEMORY: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # (BLOCK // 4, 4): a row per Philox call, a column per output word
    groups = tl.program_id(0).to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    word = tl.arange(0, 4)[None, :]
    offsets = groups[:, None] * 4 + word
    mask = offsets < n
    x = tl.load(X + offsets, mask=mask, other=0.0).to(ACC)
    zero = (groups * 0).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(tl.load(Seed), (groups & 0xFFFFFFFF).to(tl.uint32), (groups >> 32).to(tl.uint32),
                               zero, zero)
    bits = tl.where(word == 0, r0[:, None],
                    tl.where(word == 1, r1[:, None], tl.where(word == 2, r2[:, None], r3[:, None])))
    keep = uniform_from_bits(bits) > p
    if SCALE_IN_MEMORY:
        scale = tl.load(scale)
    # tl.where, not a multiply by the mask: a dropped inf or nan gives 0.
    tl.store(Y + offsets, round_to(tl.where(keep, x * scale, 0.0), Y.dtype.element_ty), mask=mask)


def dropout_fwd(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    from ..numpy.dropout import keep_scale  # the one definition of the scale's rounding

    y = torch.empty_like(x)
    n = x.numel()
    if n:
        scale = float(keep_scale(p, x.dtype))
        if x.dtype == torch.float64:  # float arguments reach a kernel as fp32
            scale = torch.full((), scale, dtype=torch.float64, device=x.device)
        dropout_kernel[(triton.cdiv(n, BLOCK),)](x, y, seed, scale, n, p, SCALE_IN_MEMORY=x.dtype == torch.float64,
                                                  ACC=acc_dtype(x.dtype), BLOCK=BLOCK, num_warps=8)
    return y
