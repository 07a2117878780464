"""Inverted dropout on a flattened contiguous tensor, the mask drawn from
(seed, element index) by Philox4x32-10: nothing is stored, the backward
calls the same kernel on ``dy``.

One Philox call serves four elements: element ``i`` takes output word ``i % 4``
of counter ``(i // 4 lo, i // 4 hi, 0, 0)``, key ``seed`` (``numpy/philox.py``'s
``element_words``, bit for bit), and is kept when the word, folded as Triton's
``uint_to_uniform_float`` folds it, is above the integer ``keep_threshold(p)``:
the same decision as that float's ``> p``, without the conversion. Ten rounds of
32-bit multiplies per element made the kernel compute-bound; per four elements
the generator costs about what moving the bytes does (measured figures:
bench/results/ and the README).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._dropout import keep_scale, keep_threshold
from ._common import acc_dtype, aligned, cdiv, round_to
from ._launch import jit

BLOCK = 2048


@triton.jit
def folded(bits):
    """uint32 words as the int32 in [0, 2**31) Triton's ``uint_to_uniform_float``
    scales (``backends/_dropout.py``'s ``folded``): ``~x`` for the negative half."""
    signed = bits.to(tl.int32, bitcast=True)
    return tl.where(signed < 0, -signed - 1, signed)


@jit
def dropout_kernel(
    X, Y, Seed, scale, n, threshold, SCALE_IN_MEMORY: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr
):
    # (BLOCK // 4, 4): a row per Philox call, a column per output word
    groups = tl.program_id(0).to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    word = tl.arange(0, 4)[None, :]
    offsets = groups[:, None] * 4 + word
    mask = offsets < n
    x = tl.load(X + offsets, mask=mask, other=0.0).to(ACC)
    zero = (groups * 0).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(
        tl.load(Seed), (groups & 0xFFFFFFFF).to(tl.uint32), (groups >> 32).to(tl.uint32), zero, zero
    )
    bits = tl.where(
        word == 0, r0[:, None], tl.where(word == 1, r1[:, None], tl.where(word == 2, r2[:, None], r3[:, None]))
    )
    keep = folded(bits) > threshold
    if SCALE_IN_MEMORY:
        scale = tl.load(scale)
    # tl.where, not a multiply by the mask: a dropped inf or nan gives 0.
    tl.store(Y + offsets, round_to(tl.where(keep, x * scale, 0.0), Y.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=256)
def _launch_options(p: float, dtype: torch.dtype) -> tuple[float, int, tl.dtype]:
    """The kernel's scale (as a Python float), keep threshold and compute dtype for ``p``
    and ``dtype``: worked out once per pair, not on every launch."""
    return float(keep_scale(p, dtype)), keep_threshold(p), acc_dtype(dtype)


def dropout_fwd(x: torch.Tensor, p: float, seed: torch.Tensor, y: torch.Tensor) -> None:
    n = x.numel()
    if n:
        scale, threshold, acc = _launch_options(p, x.dtype)
        in_memory = x.dtype == torch.float64  # float arguments reach a kernel as fp32
        if in_memory:
            scale = torch.full((), scale, dtype=torch.float64, device=x.device)
        dropout_kernel.launch(
            (cdiv(n, BLOCK),),
            (x.dtype, n, threshold) if aligned(x, seed) else None,
            lambda: dict(
                SCALE_IN_MEMORY=in_memory,
                ACC=acc,
                BLOCK=BLOCK,
                num_warps=8,
            ),
            x,
            y,
            seed,
            scale,
            n,
            threshold,
        )
