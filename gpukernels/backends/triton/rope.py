"""Rotary position embedding of q and k, and its transpose (the backward), in
one launch: a program per (batch, time) position reads that position's cos and
sin once and rotates every head of q and of k there, so cos and sin are read
once per position, not once per head. Interleaved pairs are read as two
stride-2 loads of the same sectors (memory moves the same bytes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, aligned, next_power_of_2, round_to, stats_dtype
from ._launch import jit

# A program's heads at a time: (heads, pairs) and (heads, passed) tiles of at most this many elements.
TILE = 2048


@triton.jit
def _rotate_heads(X, Out, b, t, heads, sxb, sxt, sxh, sob, sot, soh, c1, c2, a, bb, first, second, pair_in,
                  rotated, head_dim, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):  # fmt: skip
    """Out's pairs ``x1 c1 + x2 a`` and ``x2 c2 + x1 bb`` for every head of X at (b, t), x1
    at columns ``first`` and x2 at ``second``; the columns from ``rotated`` to ``head_dim``
    copied."""
    x_at = X + b.to(tl.int64) * sxb + t.to(tl.int64) * sxt
    out_at = Out + b.to(tl.int64) * sob + t.to(tl.int64) * sot
    for h_start in range(0, heads, BLOCK_H):
        h = h_start + tl.arange(0, BLOCK_H)
        mask = (h < heads)[:, None] & pair_in[None, :]
        x_rows = x_at + h.to(tl.int64)[:, None] * sxh
        out_rows = out_at + h.to(tl.int64)[:, None] * soh
        x1 = tl.load(x_rows + first[None, :], mask=mask, other=0.0).to(c1.dtype)
        x2 = tl.load(x_rows + second[None, :], mask=mask, other=0.0).to(c1.dtype)
        y1 = x1 * c1[None, :] + x2 * a[None, :]
        y2 = x2 * c2[None, :] + x1 * bb[None, :]
        tl.store(out_rows + first[None, :], round_to(y1, Out.dtype.element_ty), mask=mask)
        tl.store(out_rows + second[None, :], round_to(y2, Out.dtype.element_ty), mask=mask)
        if BLOCK_P > 0:  # a partial rotary embedding: the rest of each head as it is
            passed = rotated + tl.arange(0, BLOCK_P)
            pass_mask = (h < heads)[:, None] & (passed < head_dim)[None, :]
            x = tl.load(x_rows + passed[None, :], mask=pass_mask, other=0.0)
            tl.store(out_rows + passed[None, :], x.to(Out.dtype.element_ty), mask=pass_mask)


@jit
def rope_kernel(
    Q, K, Cos, Sin, QOut, KOut, time, q_heads, k_heads,
    sqb, sqt, sqh, skb, skt, skh, sqob, sqot, sqoh, skob, skot, skoh, scb, sct, half, head_dim,
    TRANSPOSE: tl.constexpr, INTERLEAVED: tl.constexpr, ACC: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Program ``b * time + t`` rotates q and k at batch ``b``, position ``t``: each head's
    pairs (elements j and j + half of its first 2 half, or with INTERLEAVED 2j and 2j + 1)
    by that position's cos and sin at the same elements (c1, c2, s1, s2), or by the
    transpose; the elements past 2 half as they are."""
    position = tl.program_id(0)
    b = position // time
    t = position - b * time
    pairs = tl.arange(0, BLOCK_D)
    pair_in = pairs < half
    if INTERLEAVED:
        first = 2 * pairs
        second = first + 1
    else:
        first = pairs
        second = pairs + half
    at = b.to(tl.int64) * scb + t.to(tl.int64) * sct  # cos and sin share a layout
    c1 = tl.load(Cos + at + first, mask=pair_in, other=0.0).to(ACC)
    c2 = tl.load(Cos + at + second, mask=pair_in, other=0.0).to(ACC)
    s1 = tl.load(Sin + at + first, mask=pair_in, other=0.0).to(ACC)
    s2 = tl.load(Sin + at + second, mask=pair_in, other=0.0).to(ACC)
    if TRANSPOSE:
        a, bb = s2, -s1
    else:
        a, bb = -s1, s2
    _rotate_heads(Q, QOut, b, t, q_heads, sqb, sqt, sqh, sqob, sqot, sqoh, c1, c2, a, bb, first, second, pair_in,
                  2 * half, head_dim, BLOCK_H, BLOCK_P)  # fmt: skip
    _rotate_heads(K, KOut, b, t, k_heads, skb, skt, skh, skob, skot, skoh, c1, c2, a, bb, first, second, pair_in,
                  2 * half, head_dim, BLOCK_H, BLOCK_P)  # fmt: skip


def _batch_time_heads(t: torch.Tensor, heads_dim: int) -> tuple[int, int, int]:
    """``t``'s batch, time and heads strides."""
    stride = t.stride()
    return (stride[0], stride[2], stride[1]) if heads_dim == 1 else (stride[0], stride[1], stride[2])


def rope(q, k, cos, sin, heads_dim, transpose, interleaved, dtype, q_out, k_out):
    batch, time, head_dim = q.shape[0], q.shape[3 - heads_dim], q.shape[3]
    if not (batch and time and head_dim):
        return
    half = cos.shape[-1] // 2
    q_heads, k_heads = q.shape[heads_dim], k.shape[heads_dim]
    block_d = next_power_of_2(half)
    block_p = next_power_of_2(head_dim - 2 * half) if head_dim > 2 * half else 0
    widest = max(block_d, block_p)  # of a head's tiles: its pairs' halves, its elements passed through
    block_h = min(next_power_of_2(max(q_heads, k_heads, 1)), max(TILE // widest, 1))
    acc = acc_dtype(stats_dtype(torch.promote_types(q.dtype, cos.dtype)))
    ints = (
        time, q_heads, k_heads,
        *_batch_time_heads(q, heads_dim), *_batch_time_heads(k, heads_dim),
        *_batch_time_heads(q_out, heads_dim), *_batch_time_heads(k_out, heads_dim),
        0 if cos.shape[0] == 1 else cos.stride(0), cos.stride(1), half, head_dim,
    )  # fmt: skip
    rope_kernel.launch(
        (batch * time,),
        (q.dtype, k.dtype, cos.dtype, dtype, transpose, interleaved, *ints) if aligned(q, k, cos, sin) else None,
        lambda: dict(
            TRANSPOSE=transpose,
            INTERLEAVED=interleaved,
            ACC=acc,
            BLOCK_H=block_h,
            BLOCK_D=block_d,
            BLOCK_P=block_p,
            num_warps=min(max(block_h * widest // 256, 1), 8),
        ),
        q,
        k,
        cos,
        sin,
        q_out,
        k_out,
        *ints,
    )
