"""LayerNorm over the rows of a contiguous (rows, D) matrix.

Forward: one program per row. A row that fits in one block (``D <= 8192``)
is loaded once and kept in registers; a wider row is read in column blocks,
once for the mean, once for the variance (two-pass, for accuracy), once to
normalise.
Backward: a persistent grid; each program takes rows ``pid, pid + G, ...``,
writes their ``dx`` and keeps running sums of ``dy*xhat`` and ``dy`` for its
rows, stored as one row of a (G, D) partial buffer; ``partial_sums_kernel``
sums the partials afterwards (the two-stage reduction, with no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, num_programs, round_to, row_block, stats_dtype
from ._launch import jit


@jit
def layer_norm_fwd_kernel(
    X,
    W,
    B,
    Y,
    Mean,
    Rstd,
    D,
    eps,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACC: tl.constexpr,
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
        mean = tl.sum(x, axis=0) / D
        xc = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
        y = xc * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(ACC)
        if HAS_B:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(ACC)
        tl.store(Y + cols, round_to(y, Y.dtype.element_ty), mask=mask)
    else:
        total = tl.zeros([BLOCK_D], dtype=ACC)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            total += tl.load(X + cols, mask=cols < D, other=0.0).to(ACC)
        mean = tl.sum(total, axis=0) / D
        total = tl.zeros([BLOCK_D], dtype=ACC)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = cols < D
            xc = tl.where(mask, tl.load(X + cols, mask=mask, other=0.0).to(ACC) - mean, 0.0)
            total += xc * xc
        rstd = 1.0 / tl.sqrt(tl.sum(total, axis=0) / D + eps)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = cols < D
            y = (tl.load(X + cols, mask=mask, other=0.0).to(ACC) - mean) * rstd
            if HAS_W:
                y = y * tl.load(W + cols, mask=mask, other=0.0).to(ACC)
            if HAS_B:
                y = y + tl.load(B + cols, mask=mask, other=0.0).to(ACC)
            tl.store(Y + cols, round_to(y, Y.dtype.element_ty), mask=mask)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@jit
def layer_norm_bwd_kernel(
    DY,
    X,
    W,
    Mean,
    Rstd,
    DX,
    DW_partial,
    DB_partial,
    rows,
    D,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        w = tl.load(W + cols, mask=mask, other=0.0).to(ACC) if HAS_W else 1.0
        dw = tl.zeros([BLOCK_D], dtype=ACC)
        db = tl.zeros([BLOCK_D], dtype=ACC)
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
            mean = tl.load(Mean + row)
            rstd = tl.load(Rstd + row)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            g = dy * w
            dx = rstd * (g - tl.sum(g, axis=0) / D - xhat * (tl.sum(g * xhat, axis=0) / D))
            tl.store(DX + offs, round_to(dx, DX.dtype.element_ty), mask=mask)
            dw += dy * xhat
            db += dy
            offs += programs * D
        if HAS_W:
            tl.store(DW_partial + pid * D + cols, dw, mask=mask)
        if HAS_B:
            tl.store(DB_partial + pid * D + cols, db, mask=mask)
    else:
        for row in range(pid, rows, programs):
            base = tl.cast(row, tl.int64) * D
            mean = tl.load(Mean + row)
            rstd = tl.load(Rstd + row)
            sum_g = tl.zeros([BLOCK_D], dtype=ACC)
            sum_gx = tl.zeros([BLOCK_D], dtype=ACC)
            for start in range(0, D, BLOCK_D):
                cols = start + tl.arange(0, BLOCK_D)
                mask = cols < D
                dy = tl.load(DY + base + cols, mask=mask, other=0.0).to(ACC)
                xhat = tl.where(mask, (tl.load(X + base + cols, mask=mask, other=0.0).to(ACC) - mean) * rstd, 0.0)
                g = dy * tl.load(W + cols, mask=mask, other=0.0).to(ACC) if HAS_W else dy
                sum_g += g
                sum_gx += g * xhat
                # Each program owns one row of the partial buffers: no atomics.
                if HAS_W:
                    partial = DW_partial + pid * D + cols
                    tl.store(partial, tl.load(partial, mask=mask, other=0.0) + dy * xhat, mask=mask)
                if HAS_B:
                    partial = DB_partial + pid * D + cols
                    tl.store(partial, tl.load(partial, mask=mask, other=0.0) + dy, mask=mask)
            mean_g = tl.sum(sum_g, axis=0) / D
            mean_gx = tl.sum(sum_gx, axis=0) / D
            for start in range(0, D, BLOCK_D):
                cols = start + tl.arange(0, BLOCK_D)
                mask = cols < D
                dy = tl.load(DY + base + cols, mask=mask, other=0.0).to(ACC)
                xhat = (tl.load(X + base + cols, mask=mask, other=0.0).to(ACC) - mean) * rstd
                g = dy * tl.load(W + cols, mask=mask, other=0.0).to(ACC) if HAS_W else dy
                dx = rstd * (g - mean_g - xhat * mean_gx)
                tl.store(DX + base + cols, round_to(dx, DX.dtype.element_ty), mask=mask)


@jit
def partial_sums_kernel(
    Partial, DW, DB, programs, D, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr
):
    """DW, DB = the (programs, D) partials [0] and [1] summed over their rows, rounded to the params' dtype."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_in = cols < D
    dw = tl.zeros([BLOCK_P, BLOCK_D], dtype=Partial.dtype.element_ty)
    db = tl.zeros([BLOCK_P, BLOCK_D], dtype=Partial.dtype.element_ty)
    for start in range(0, programs, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        offsets = p[:, None] * D + cols[None, :]
        mask = (p < programs)[:, None] & col_in[None, :]
        if HAS_W:
            dw += tl.load(Partial + offsets, mask=mask, other=0.0)
        if HAS_B:
            db += tl.load(Partial + programs * D + offsets, mask=mask, other=0.0)
    if HAS_W:
        tl.store(DW + cols, round_to(tl.sum(dw, axis=0), DW.dtype.element_ty), mask=col_in)
    if HAS_B:
        tl.store(DB + cols, round_to(tl.sum(db, axis=0), DB.dtype.element_ty), mask=col_in)


PARTIAL_BLOCK_P, PARTIAL_BLOCK_D = 32, 64


def _blocks(d: int) -> tuple[int, bool]:
    block = row_block(d)
    return block, block >= d


def layer_norm_fwd(x, weight, bias, eps, y, mean, rstd):
    rows, d = x.shape
    if rows:
        block, one_block = _blocks(d)
        layer_norm_fwd_kernel[(rows,)](
            x,
            weight,
            bias,
            y,
            mean,
            rstd,
            d,
            eps,
            HAS_W=weight is not None,
            HAS_B=bias is not None,
            ACC=acc_dtype(x.dtype),
            BLOCK_D=block,
            ONE_BLOCK=one_block,
            num_warps=min(max(block // 256, 1), 16),
        )


def layer_norm_bwd(dy, x, weight, mean, rstd, has_bias, dx, dweight, dbias):
    rows, d = x.shape
    block, one_block = _blocks(d)
    # Two programs per SM: each adds a row of partial sums (two with a bias), 8 * D bytes
    # written and read again, which more programs would multiply.
    programs = num_programs(x.device, rows, per_sm=2)
    acc = stats_dtype(x.dtype)
    # [dweight, dbias] partials. The one-block variant writes every row of them
    # (programs with no rows write zeros); the looped variant keeps running sums
    # in them, which start from 0.
    partial = (torch.empty if one_block else torch.zeros)((2, programs, d), dtype=acc, device=x.device)
    if rows:
        layer_norm_bwd_kernel[(programs,)](
            dy,
            x,
            weight,
            mean,
            rstd,
            dx,
            partial[0],
            partial[1],
            rows,
            d,
            HAS_W=weight is not None,
            HAS_B=has_bias,
            ACC=acc_dtype(x.dtype),
            BLOCK_D=block,
            ONE_BLOCK=one_block,
            num_warps=min(max(block // 256, 1), 16),
            # fused, dy * w - mean(dy * w) keeps the product's rounding error
            # where the exact answer is 0 (D == 1), times rstd
            enable_fp_fusion=False,
        )
    elif one_block:
        partial.zero_()
    if d and (weight is not None or has_bias):
        partial_sums_kernel[(triton.cdiv(d, PARTIAL_BLOCK_D),)](
            partial,
            dweight,
            dbias,
            programs,
            d,
            HAS_W=weight is not None,
            HAS_B=has_bias,
            BLOCK_P=PARTIAL_BLOCK_P,
            BLOCK_D=PARTIAL_BLOCK_D,
            num_warps=4,
        )
