"""Rotary position embedding of q and k, and its transpose (the backward), in
one launch: a program per (batch, time) position reads that position's cos and
sin once and rotates every head of q and of k there, so cos and sin are read
once per position, not once per head.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, aligned, next_power_of_2, round_to, stats_dtype
from ._launch import jit

# A program's heads at a time: a (heads, half) tile of at most this many elements per half.
TILE = 2048


@triton.jit
def _rotate_heads(X, Out, b, t, heads, sxb, sxt, sxh, sob, sot, soh, c1, c2, a, bb, cols, col_in, half,
                  BLOCK_H: tl.constexpr):  # fmt: skip
    """Out's halves ``x1 c1 + x2 a`` and ``x2 c2 + x1 bb`` for every head of X at (b, t)."""
    x_at = X + b.to(tl.int64) * sxb + t.to(tl.int64) * sxt
    out_at = Out + b.to(tl.int64) * sob + t.to(tl.int64) * sot
    for h_start in range(0, heads, BLOCK_H):
        h = h_start + tl.arange(0, BLOCK_H)
        mask = (h < heads)[:, None] & col_in[None, :]
        x_rows = x_at + h.to(tl.int64)[:, None] * sxh + cols[None, :]
        out_rows = out_at + h.to(tl.int64)[:, None] * soh + cols[None, :]
        x1 = tl.load(x_rows, mask=mask, other=0.0).to(c1.dtype)
        x2 = tl.load(x_rows + half, mask=mask, other=0.0).to(c1.dtype)
        tl.store(out_rows, round_to(x1 * c1[None, :] + x2 * a[None, :], Out.dtype.element_ty), mask=mask)
        tl.store(out_rows + half, round_to(x2 * c2[None, :] + x1 * bb[None, :], Out.dtype.element_ty), mask=mask)


@jit
def rope_kernel(
    Q, K, Cos, Sin, QOut, KOut, time, q_heads, k_heads,
    sqb, sqt, sqh, skb, skt, skh, sqob, sqot, sqoh, skob, skot, skoh, scb, sct, half,
    TRANSPOSE: tl.constexpr, ACC: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program ``b * time + t`` rotates q and k at batch ``b``, position ``t``: each head's
    halves by that position's cos and sin halves (c1, c2, s1, s2), or by the transpose."""
    position = tl.program_id(0)
    b = position // time
    t = position - b * time
    cols = tl.arange(0, BLOCK_D)
    col_in = cols < half
    trig = b.to(tl.int64) * scb + t.to(tl.int64) * sct + cols
    c1 = tl.load(Cos + trig, mask=col_in, other=0.0).to(ACC)
    c2 = tl.load(Cos + trig + half, mask=col_in, other=0.0).to(ACC)
    s1 = tl.load(Sin + trig, mask=col_in, other=0.0).to(ACC)
    s2 = tl.load(Sin + trig + half, mask=col_in, other=0.0).to(ACC)
    if TRANSPOSE:
        a, bb = s2, -s1
    else:
        a, bb = -s1, s2
    _rotate_heads(Q, QOut, b, t, q_heads, sqb, sqt, sqh, sqob, sqot, sqoh, c1, c2, a, bb, cols, col_in, half, BLOCK_H)
    _rotate_heads(K, KOut, b, t, k_heads, skb, skt, skh, skob, skot, skoh, c1, c2, a, bb, cols, col_in, half, BLOCK_H)


def _batch_time_heads(t: torch.Tensor, heads_dim: int) -> tuple[int, int, int]:
    """``t``'s batch, time and heads strides."""
    stride = t.stride()
    return (stride[0], stride[2], stride[1]) if heads_dim == 1 else (stride[0], stride[1], stride[2])


def rope(q, k, cos, sin, heads_dim, transpose, dtype, q_out, k_out):
    batch, time, half = q.shape[0], q.shape[3 - heads_dim], q.shape[3] // 2
    if not (batch and time and half):
        return
    q_heads, k_heads = q.shape[heads_dim], k.shape[heads_dim]
    block_d = next_power_of_2(half)
    block_h = min(next_power_of_2(max(q_heads, k_heads, 1)), max(TILE // block_d, 1))
    acc = acc_dtype(stats_dtype(torch.promote_types(q.dtype, cos.dtype)))
    ints = (
        time, q_heads, k_heads,
        *_batch_time_heads(q, heads_dim), *_batch_time_heads(k, heads_dim),
        *_batch_time_heads(q_out, heads_dim), *_batch_time_heads(k_out, heads_dim),
        0 if cos.shape[0] == 1 else cos.stride(0), cos.stride(1), half,
    )  # fmt: skip
    rope_kernel.launch(
        (batch * time,),
        (q.dtype, k.dtype, cos.dtype, dtype, transpose, *ints) if aligned(q, k, cos, sin) else None,
        lambda: dict(
            TRANSPOSE=transpose,
            ACC=acc,
            BLOCK_H=block_h,
            BLOCK_D=block_d,
            num_warps=min(max(block_h * block_d // 256, 1), 8),
        ),
        q,
        k,
        cos,
        sin,
        q_out,
        k_out,
        *ints,
    )
