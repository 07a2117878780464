"""RMSNorm over the rows of a contiguous (rows, D) matrix.

Forward: one program per row. A row that fits in one block (``D <= 8192``)
is loaded once and kept in registers; a wider row is read in column blocks,
once for the sum of squares, once to normalise.
Backward: one launch of a persistent grid; each program takes rows
``pid, pid + G, ...``, writes their ``dx`` and keeps a running sum of
``dy*h`` for its rows, stored as one row of a (G, D) partial buffer; with a
weight, the program to finish last (an arrival counter) sums the partials in
a fixed order (no float atomics: the same dweight on every run).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, num_programs, round_to, row_block, stats_dtype
from ._launch import jit
from .layer_norm import (
    PARTIAL_BLOCK_D,
    PARTIAL_BLOCK_P,
    arrival_counter,
    is_last_program,
    sum_partials,
    zero_partial_row,
)


@triton.jit
def _scaled(
    h, W, cols, mask, offset, X_DTYPE: tl.constexpr, MUL: tl.constexpr, HAS_W: tl.constexpr, CAST_BEFORE_W: tl.constexpr
):
    """``h * (offset + w)`` in MUL, with ``h`` first rounded to x's dtype under CAST_BEFORE_W."""
    if HAS_W:
        scale = offset + tl.load(W + cols, mask=mask, other=0.0).to(MUL)
        if CAST_BEFORE_W:
            h = round_to(h, X_DTYPE)
        h = h.to(MUL) * scale
    return h


@jit
def rms_norm_fwd_kernel(
    X,
    W,
    Y,
    Rstd,
    D,
    eps,
    offset,
    HAS_W: tl.constexpr,
    CAST_BEFORE_W: tl.constexpr,
    ACC: tl.constexpr,
    MUL: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    X += row * D
    Y += row * D
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        x = tl.load(X + cols, mask=mask, other=0.0).to(ACC)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        y = _scaled(x * rstd, W, cols, mask, offset, X.dtype.element_ty, MUL, HAS_W, CAST_BEFORE_W)
        tl.store(Y + cols, round_to(y, Y.dtype.element_ty), mask=mask)
    else:
        total = tl.zeros([BLOCK_D], dtype=ACC)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            x = tl.load(X + cols, mask=cols < D, other=0.0).to(ACC)
            total += x * x
        rstd = 1.0 / tl.sqrt(tl.sum(total, axis=0) / D + eps)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = cols < D
            x = tl.load(X + cols, mask=mask, other=0.0).to(ACC)
            y = _scaled(x * rstd, W, cols, mask, offset, X.dtype.element_ty, MUL, HAS_W, CAST_BEFORE_W)
            tl.store(Y + cols, round_to(y, Y.dtype.element_ty), mask=mask)
    tl.store(Rstd + row, rstd)


@triton.jit
def _weight_input(h, X_DTYPE: tl.constexpr, CAST_BEFORE_W: tl.constexpr):
    """What multiplied the weight in the forward: ``h``, rounded to x's dtype under CAST_BEFORE_W."""
    if CAST_BEFORE_W:
        h = round_to(h, X_DTYPE).to(h.dtype)
    return h


@jit
def rms_norm_bwd_kernel(
    DY,
    X,
    W,
    Rstd,
    DX,
    DW_partial,
    DW,
    Counter,
    rows,
    D,
    offset,
    HAS_W: tl.constexpr,
    CAST_BEFORE_W: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr,
    SUM_BLOCK_D: tl.constexpr,
):
    """``DX`` for every row; ``DW`` from the programs' partial sums, by the last program."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        scale = offset + tl.load(W + cols, mask=mask, other=0.0).to(ACC) if HAS_W else 1.0
        dw = tl.zeros([BLOCK_D], dtype=ACC)
        # Each step loads the next row before reducing this one: two rows in flight
        # per program, so the loads' latency hides behind the reductions.
        offs = tl.cast(pid, tl.int64) * D + cols
        first = cols < tl.where(pid < rows, D, 0)
        next_dy = tl.load(DY + offs, mask=first, other=0.0)
        next_x = tl.load(X + offs, mask=first, other=0.0)
        for row in range(pid, rows, programs):
            dy = next_dy.to(ACC)
            x = next_x.to(ACC)
            following = cols < tl.where(row + programs < rows, D, 0)
            next_dy = tl.load(DY + offs + programs * D, mask=following, other=0.0)
            next_x = tl.load(X + offs + programs * D, mask=following, other=0.0)
            rstd = tl.load(Rstd + row)
            h = x * rstd
            g = dy * scale
            dx = rstd * (g - h * (tl.sum(g * h, axis=0) / D))
            tl.store(DX + offs, round_to(dx, DX.dtype.element_ty), mask=mask)
            if HAS_W:
                dw += dy * _weight_input(h, X.dtype.element_ty, CAST_BEFORE_W)
            offs += programs * D
        if HAS_W:
            tl.store(DW_partial + pid * D + cols, dw, mask=mask)
    else:
        if HAS_W:
            zero_partial_row(DW_partial + pid * D, D, BLOCK_D)
        for row in range(pid, rows, programs):
            base = tl.cast(row, tl.int64) * D
            rstd = tl.load(Rstd + row)
            sum_gh = tl.zeros([BLOCK_D], dtype=ACC)
            for start in range(0, D, BLOCK_D):
                cols = start + tl.arange(0, BLOCK_D)
                mask = cols < D
                dy = tl.load(DY + base + cols, mask=mask, other=0.0).to(ACC)
                h = tl.load(X + base + cols, mask=mask, other=0.0).to(ACC) * rstd
                g = dy * (offset + tl.load(W + cols, mask=mask, other=0.0).to(ACC)) if HAS_W else dy
                sum_gh += g * h
                # Each program owns one row of the partial buffer: no atomics.
                if HAS_W:
                    partial = DW_partial + pid * D + cols
                    tl.store(
                        partial,
                        tl.load(partial, mask=mask, other=0.0)
                        + dy * _weight_input(h, X.dtype.element_ty, CAST_BEFORE_W),
                        mask=mask,
                    )
            mean_gh = tl.sum(sum_gh, axis=0) / D
            for start in range(0, D, BLOCK_D):
                cols = start + tl.arange(0, BLOCK_D)
                mask = cols < D
                dy = tl.load(DY + base + cols, mask=mask, other=0.0).to(ACC)
                h = tl.load(X + base + cols, mask=mask, other=0.0).to(ACC) * rstd
                g = dy * (offset + tl.load(W + cols, mask=mask, other=0.0).to(ACC)) if HAS_W else dy
                tl.store(DX + base + cols, round_to(rstd * (g - h * mean_gh), DX.dtype.element_ty), mask=mask)
    if HAS_W:
        if is_last_program(Counter, programs):
            sum_partials(DW_partial, DW, programs, D, BLOCK_P, SUM_BLOCK_D)
            tl.store(Counter, 0)  # for the next launch


def _blocks(d: int) -> tuple[int, bool]:
    block = row_block(d)
    return block, block >= d


def _warps(block: int) -> int:
    return min(max(block // 256, 1), 16)


def rms_norm_fwd(x, weight, eps, offset, cast_before_weight, y, rstd):
    rows, d = x.shape
    if rows:
        block, one_block = _blocks(d)
        # Llama's weight multiply runs in the output's (promoted) dtype, the plain one in x's statistics dtype
        multiply = acc_dtype(y.dtype if cast_before_weight else x.dtype)
        rms_norm_fwd_kernel[(rows,)](
            x,
            weight,
            y,
            rstd,
            d,
            eps,
            offset,
            HAS_W=weight is not None,
            CAST_BEFORE_W=cast_before_weight,
            ACC=acc_dtype(x.dtype),
            MUL=multiply,
            BLOCK_D=block,
            ONE_BLOCK=one_block,
            num_warps=_warps(block),
        )


def rms_norm_bwd(dy, x, weight, rstd, offset, cast_before_weight, dx, dweight):
    rows, d = x.shape
    if not rows:
        dweight.zero_()  # no rows: dweight is 0 (and empty when there is no weight)
        return
    block, one_block = _blocks(d)
    # Two programs per SM: each writes a row of partial sums, 4 * D bytes (fp32) written and
    # read again, which more programs would multiply. Every program gets a row (programs <= rows).
    programs = num_programs(x.device, rows, per_sm=2)
    has_w = weight is not None
    # Every program writes its row of the partials, so no zero fill.
    partial = torch.empty((programs, d), dtype=stats_dtype(x.dtype), device=x.device) if has_w else None
    rms_norm_bwd_kernel[(programs,)](
        dy,
        x,
        weight,
        rstd,
        dx,
        partial,
        dweight,
        arrival_counter(x.device) if has_w else None,
        rows,
        d,
        offset,
        HAS_W=has_w,
        CAST_BEFORE_W=cast_before_weight,
        ACC=acc_dtype(x.dtype),
        BLOCK_D=block,
        ONE_BLOCK=one_block,
        BLOCK_P=PARTIAL_BLOCK_P,
        SUM_BLOCK_D=PARTIAL_BLOCK_D,
        num_warps=_warps(block),
    )
