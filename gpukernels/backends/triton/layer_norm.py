"""LayerNorm over the rows of a contiguous (rows, D) matrix.

Forward: one program per row. A row that fits in one block (``D <= 8192``)
is loaded once and kept in registers; a wider row is read in column blocks,
once for the mean, once for the variance (two-pass, for accuracy), once to
normalise.
Backward: a persistent grid; each program takes rows ``pid, pid + G, ...``,
writes their ``dx`` and keeps running sums of ``dy*xhat`` and ``dy`` for its
rows, stored as one row of a (G, D) partial buffer; the partials are summed
afterwards (the two-stage reduction, with no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, num_programs, round_to, row_block


@triton.jit
def layer_norm_fwd_kernel(X, W, B, Y, Mean, Rstd, D, eps,
                          HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_D: tl.constexpr, ONE_BLOCK: tl.constexpr):
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


@triton.jit
def layer_norm_bwd_kernel(DY, X, W, Mean, Rstd, DX, DW_partial, DB_partial, rows, D,
                          HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_D: tl.constexpr, ONE_BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        w = tl.load(W + cols, mask=mask, other=0.0).to(ACC) if HAS_W else 1.0
        dw = tl.zeros([BLOCK_D], dtype=ACC)
        db = tl.zeros([BLOCK_D], dtype=ACC)
        for row in range(pid, rows, programs):
            offs = tl.cast(row, tl.int64) * D + cols
            mean = tl.load(Mean + row)
            rstd = tl.load(Rstd + row)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
            xhat = tl.where(mask, (tl.load(X + offs, mask=mask, other=0.0).to(ACC) - mean) * rstd, 0.0)
            g = dy * w
            dx = rstd * (g - tl.sum(g, axis=0) / D - xhat * (tl.sum(g * xhat, axis=0) / D))
            tl.store(DX + offs, round_to(dx, DX.dtype.element_ty), mask=mask)
            dw += dy * xhat
            db += dy
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


def _blocks(d: int) -> tuple[int, bool]:
    block = row_block(d)
    return block, block >= d


def layer_norm_fwd(x, weight, bias, eps):
    rows, d = x.shape
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.empty_like(x)
    mean = torch.empty(rows, dtype=stats_dtype, device=x.device)
    rstd = torch.empty(rows, dtype=stats_dtype, device=x.device)
    if rows:
        block, one_block = _blocks(d)
        layer_norm_fwd_kernel[(rows,)](x, weight, bias, y, mean, rstd, d, eps,
                                       HAS_W=weight is not None, HAS_B=bias is not None, ACC=acc_dtype(x.dtype),
                                       BLOCK_D=block, ONE_BLOCK=one_block, num_warps=min(max(block // 256, 1), 16))
    return y, mean, rstd


def layer_norm_bwd(dy, x, weight, mean, rstd, has_bias):
    rows, d = x.shape
    block, one_block = _blocks(d)
    programs = num_programs(x.device, rows)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    # Zeroed: programs with no rows, and the looped variant's running sums, start from 0.
    dw_partial = torch.zeros((programs, d), dtype=acc, device=x.device) if weight is not None else None
    db_partial = torch.zeros((programs, d), dtype=acc, device=x.device) if has_bias else None
    dx = torch.empty_like(x)
    if rows:
        layer_norm_bwd_kernel[(programs,)](dy, x, weight, mean, rstd, dx, dw_partial, db_partial, rows, d,
                                           HAS_W=weight is not None, HAS_B=has_bias, ACC=acc_dtype(x.dtype),
                                           BLOCK_D=block, ONE_BLOCK=one_block,
                                           num_warps=min(max(block // 256, 1), 16),
                                           # fused, dy * w - mean(dy * w) keeps the product's rounding error
                                           # where the exact answer is 0 (D == 1), times rstd
                                           enable_fp_fusion=False)
    param_dtype = weight.dtype if weight is not None else x.dtype
    dweight = dw_partial.sum(0).to(param_dtype) if weight is not None else x.new_empty(0)
    dbias = db_partial.sum(0).to(param_dtype) if has_bias else x.new_empty(0)
    return dx, dweight, dbias
