"""LayerNorm over the rows of a contiguous (rows, D) matrix.

Forward: one program per row. A row that fits in one block (``D <= 8192``)
is loaded once and kept in registers; a wider row is read in column blocks,
once for the mean, once for the variance (two-pass, for accuracy), once to
normalise.
Backward: one launch of a persistent grid; each program takes rows
``pid, pid + G, ...``, writes their ``dx`` and keeps running sums of
``dy*xhat`` and ``dy`` for its rows, stored as one row of a (G, D) partial
buffer; the program to finish last (an arrival counter) sums the partials in
a fixed order (no float atomics: the same dweight on every run).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, num_programs, round_to, row_block, stats_dtype
from ._launch import jit

# The last program's tile of the partials: BLOCK_P programs by BLOCK_D columns.
PARTIAL_BLOCK_P, PARTIAL_BLOCK_D = 32, 64


@triton.jit
def zero_partial_row(Partial, D, BLOCK_D: tl.constexpr):
    """Row ``Partial[0:D]`` = 0: a looped backward's running sums start from it."""
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        tl.store(Partial + cols, tl.zeros([BLOCK_D], dtype=Partial.dtype.element_ty), mask=cols < D)


@triton.jit
def sum_partials(Partial, Out, programs, D, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """``Out`` = the (programs, D) ``Partial`` summed over its rows in a fixed order, in Out's dtype."""
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        col_in = cols < D
        total = tl.zeros([BLOCK_P, BLOCK_D], dtype=Partial.dtype.element_ty)
        for first in range(0, programs, BLOCK_P):
            p = first + tl.arange(0, BLOCK_P)
            mask = (p < programs)[:, None] & col_in[None, :]
            # written by other programs, on other SMs: read around L1
            total += tl.load(Partial + p[:, None] * D + cols[None, :], mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(Out + cols, round_to(tl.sum(total, axis=0), Out.dtype.element_ty), mask=col_in)


@triton.jit
def is_last_program(Counter, programs):
    """Whether this program arrives last at ``Counter``; that program then sees every program's stores."""
    # The counter's release publishes this program's stores, its acquire shows the last
    # program everyone's; the barrier puts every thread's stores before it.
    tl.debug_barrier()
    return tl.atomic_add(Counter, 1, sem="acq_rel") == programs - 1


_counters: dict = {}


def arrival_counter(device: torch.device) -> torch.Tensor:
    """A zeroed int32 arrival counter for one launch whose last program sets it back to 0.

    Cached per stream: launches on one stream run one after another, so they can share
    one; launches on other streams may overlap and get their own. A launch captured in a
    CUDA graph gets its own, zeroed in the graph (one fill): a replay may run beside any
    stream's work."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(1, dtype=torch.int32, device=device)
        stream = torch.cuda.current_stream(device)  # the default stream's handle is 0 on every device
        key = (device.type, stream.device_index, stream.cuda_stream)
    else:
        key = (device.type, device.index, None)
    counter = _counters.get(key)
    if counter is None:
        counter = _counters[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return counter


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
    DW,
    DB,
    Counter,
    rows,
    D,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr,
    SUM_BLOCK_D: tl.constexpr,
):
    """``DX`` for every row; ``DW``, ``DB`` from the programs' partial sums, by the last program."""
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
        if HAS_W:
            zero_partial_row(DW_partial + pid * D, D, BLOCK_D)
        if HAS_B:
            zero_partial_row(DB_partial + pid * D, D, BLOCK_D)
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
    if HAS_W or HAS_B:
        if is_last_program(Counter, programs):
            if HAS_W:
                sum_partials(DW_partial, DW, programs, D, BLOCK_P, SUM_BLOCK_D)
            if HAS_B:
                sum_partials(DB_partial, DB, programs, D, BLOCK_P, SUM_BLOCK_D)
            tl.store(Counter, 0)  # for the next launch


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
    has_w = weight is not None
    if not rows:
        dweight.zero_()  # empty when there is no weight
        dbias.zero_()
        return
    block, one_block = _blocks(d)
    # Two programs per SM: each adds a row of partial sums (two with a bias), 8 * D bytes
    # written and read again, which more programs would multiply.
    programs = num_programs(x.device, rows, per_sm=2)
    # [dweight, dbias] partials: every program writes its rows of them, so no zero fill
    partial = torch.empty((2, programs, d), dtype=stats_dtype(x.dtype), device=x.device)
    layer_norm_bwd_kernel[(programs,)](
        dy,
        x,
        weight,
        mean,
        rstd,
        dx,
        partial[0],
        partial[1],
        dweight,
        dbias,
        arrival_counter(x.device) if has_w or has_bias else None,
        rows,
        d,
        HAS_W=has_w,
        HAS_B=has_bias,
        ACC=acc_dtype(x.dtype),
        BLOCK_D=block,
        ONE_BLOCK=one_block,
        BLOCK_P=PARTIAL_BLOCK_P,
        SUM_BLOCK_D=PARTIAL_BLOCK_D,
        num_warps=min(max(block // 256, 1), 16),
        # fused, dy * w - mean(dy * w) keeps the product's rounding error
        # where the exact answer is 0 (D == 1), times rstd
        enable_fp_fusion=False,
    )
