"""Inverted dropout on a flattened contiguous tensor, the mask drawn from
(seed, element index) by Philox4x32-10: nothing is stored, the backward
calls the same kernel on ``dy``.

One Philox call serves eight elements: element ``i`` takes the 16-bit half
``i % 2`` (low first) of output word ``(i % 8) // 2`` of counter
``(i // 8 lo, i // 8 hi, 0, 0)``, key ``seed`` (``numpy/philox.py``'s
``element_halves``, bit for bit), and is kept when that half is above the
integer ``keep_threshold(p)`` (backends/_dropout.py). A program's (calls, 8)
tile gives each thread a call's eight contiguous elements: one 16-byte load and
store of bf16.
"""

from __future__ import annotations

import functools

import torch
import triton.language as tl

from .._dropout import keep_scale, keep_threshold
from ._common import acc_dtype, aligned, cdiv, round_to
from ._launch import jit

BLOCK = 2048


@jit
def dropout_kernel(
    X, Y, Seed, scale, n, threshold, SCALE_IN_MEMORY: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr
):
    # (BLOCK // 8, 8): a row per Philox call, a column per 16-bit half of its words
    calls = tl.program_id(0).to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    lane = tl.arange(0, 8)[None, :]
    offsets = calls[:, None] * 8 + lane
    mask = offsets < n
    x = tl.load(X + offsets, mask=mask, other=0.0).to(ACC)
    zero = (calls * 0).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(
        tl.load(Seed), (calls & 0xFFFFFFFF).to(tl.uint32), (calls >> 32).to(tl.uint32), zero, zero
    )
    word = lane // 2
    bits = tl.where(
        word == 0, r0[:, None], tl.where(word == 1, r1[:, None], tl.where(word == 2, r2[:, None], r3[:, None]))
    )
    half = (bits >> ((lane % 2) * 16).to(tl.uint32)) & 0xFFFF
    keep = half.to(tl.int32) > threshold
    if SCALE_IN_MEMORY:
        scale = tl.load(scale)
    # times a zero scale, not a select of 0: a dropped inf or nan gives nan, as PyTorch's x * mask * scale
    # does (a diverging step stays visible to nan checks and loss scaling)
    tl.store(Y + offsets, round_to(x * tl.where(keep, scale, 0.0), Y.dtype.element_ty), mask=mask)


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
