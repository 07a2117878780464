"""The row-normalisation kernels LayerNorm and RMSNorm share, over the rows
of a contiguous (rows, D) matrix. With ``CENTERED`` the row is centred
(LayerNorm: its mean is subtracted, and saved beside its rstd in one
``(2, rows)`` statistics tensor), else not (RMSNorm: ``(rows,)`` rstd). The
pointers given choose the rest: ``W`` scales the row (by ``offset + W`` when
an ``offset`` is given, as ``float_bits`` words: RMSNorm's), ``B`` shifts it.
``CAST_BEFORE_W`` rounds the normalised row to x's dtype before the weight
multiplies it (Llama's RMSNorm).

Forward: rows that fit in one block (``D <= 8192``) are loaded once and
kept in registers, ``ROWS`` of them a program: one tile of ``FWD_TILE``
elements where the rows are narrower (down to 256 features). A wider row,
one a program, is read in column blocks, once for the mean (centred only),
once for the sum of squares (two-pass, for accuracy), once to normalise.
Backward: one launch of a persistent grid; each program takes rows
``pid, pid + G, ...``, writes their ``dx`` and keeps running sums of
``dy*xhat`` (and ``dy`` for a bias) for its rows, stored as its rows of a
(2, G, D) partial buffer. Rows that fit in one block are loaded ``STAGES - 1``
rows ahead of the one being worked on (``dy``, ``x`` and the statistics,
copied asynchronously into shared memory by Triton's software pipeline:
about ``AHEAD_BYTES`` in flight a program, where registers would hold one
row; one row ahead, in registers, where the pipeline cannot copy them), and
a row's two sums, ``sum(g)`` and ``sum(g*xhat)``, are one reduction (one
pass through shared memory: half the barriers of two). The
partial rows are then summed in a tree over the programs, ``FAN_IN``
children a node: the last program to arrive at a node (an arrival counter per
node) sums its children's rows, and the one that sums the root writes dweight
(and dbias). Each sum is in a fixed order (no float
atomics: the same dweight on every run), no program waits for another, and
the work after the last program's rows is a few node sums (``log_FAN_IN G``
levels) rather than all ``G x D`` partials summed by one program, which on a
GPU would take longer than the rows themselves.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import triton
import triton.language as tl

from ._common import (
    aligned,
    arrival_counter,
    as_float,
    cdiv,
    dtype_of,
    fitting_per_sm,
    float_bits,
    launch_plan,
    launch_scratch,
    num_programs,
    round_to,
    row_block,
    rows_and_features,
    stats_dtype,
)
from ._launch import jit

BWD_PROGRAMS_PER_SM = 2
"""The backward's persistent grid, at most: each program writes a row of partial sums (two
with a bias), which the tree over the programs sums again, and more programs would
multiply. Fewer where an SM holds fewer (wide rows: one at 4096 features and up on sm_90),
where more would only run as a second wave, with partials of its own."""

FAN_IN = 8
"""Children of a node of the backward's tree over the programs' partial rows: G programs
take ceil(log8 G) levels (3 for two programs on each of 132 SMs)."""


FWD_TILE = 4096
"""Elements of the forward's tile: rows narrower than this go ``FWD_TILE // BLOCK_D`` to
a program (at most ``MAX_FWD_ROWS``). The H200 run of 2026-12-04 timed the forward, then
a row a program, at 87% and 86% of the copy bandwidth at 4096 and 8192 bf16 features
(8 and 16 warps) but at 73% and 65% at 2048 and 1024 (8 and 4 warps: 32 KB of rows in
flight an SM against 48 KB)."""

MAX_FWD_ROWS = 16
"""Rows of the forward's tile, at the most: on sm_90, 128 rows of 32 features took 80
registers a thread (and spilled in fp64) where 16 rows took 56."""


NO_OFFSET = (None, None)
"""The kernels' offset words for an ``offset`` of 0, which adds nothing (LayerNorm, the
usual RMSNorm); another offset reaches them as its ``float_bits`` (a float argument would
arrive as fp32)."""


@functools.cache  # one entry per row width: a dict lookup instead of the arithmetic, on a new launch key
def row_launch(d: int) -> dict:
    """The forward's ``BLOCK_D``, ``ONE_BLOCK``, ``ROWS`` (rows a program) and ``num_warps``
    for rows of ``d`` features, by name: a warp per 256 elements of the tile (at least
    one), at most 8 warps below 8192 (Liger-Kernel's 8-warp forward took 20 us against
    24 us for our 16 warps at 4096 x 4096 bf16 on the H200,
    bench/results/NVIDIA-H200-2026-11-26-cudagraph.md)."""
    block = row_block(d)
    one_block = block >= d
    rows = min(max(FWD_TILE // block, 1), MAX_FWD_ROWS) if one_block else 1
    tile = rows * block
    warps = min(max(tile // 256, 1), 8 if tile < 8192 else 16)
    return dict(BLOCK_D=block, ONE_BLOCK=one_block, ROWS=rows, num_warps=warps)


AHEAD_BYTES = 48 * 1024
"""What the backward's row loop keeps loading ahead of the row it works on, a program, at
the least (but ``MAX_STAGES``): a streaming kernel reaches the copy bandwidth only with
tens of KB of loads in flight on each SM. The H200 run of 2026-12-04 timed the backward,
which then held the next row in registers (4 KB to 32 KB a program, one or two programs
an SM), at 40%, 61%, 67% and 77% of it at 1024, 2048, 4096 and 8192 bf16 features."""

MAX_STAGES = 8
"""The most rows the backward's pipeline holds (the row worked on and those ahead)."""


@functools.cache
def bwd_row_launch(d: int, column_bytes: int) -> dict:
    """The backward's, for rows of ``d`` features whose operands read a row (dy and x, and
    the sum's gradient where there is one) take ``column_bytes`` a column: ``BLOCK_D`` and
    ``ONE_BLOCK`` as the forward's, a warp per 256 columns up to 16 warps (each thread
    holds a row's dy and x and the dw/db sums), its ``FAN_IN``, and ``STAGES``: rows of
    those operands in its pipeline, enough for ``AHEAD_BYTES`` ahead (rows that fit in one
    block only). Triton's pipeline
    copies only 16-byte vectors it knows to be aligned and wholly in or out of the row:
    for ``d`` not a multiple of 16 (the only divisibility Triton specializes an int on),
    ``STAGES`` is 1, for the loop that keeps the next row in registers."""
    block = row_block(d)
    rows_ahead = -(-AHEAD_BYTES // (block * column_bytes))
    return dict(
        BLOCK_D=block,
        ONE_BLOCK=block >= d,
        num_warps=min(max(block // 256, 1), 16),
        FAN_IN=FAN_IN,
        STAGES=min(1 + rows_ahead, MAX_STAGES) if d % 16 == 0 else 1,
    )


@functools.cache
def tree_counters(programs: int) -> int:
    """How many arrival counters the backward's tree over ``programs`` needs: one a node
    above the leaves (one for a single program, whose own row is the root's only child)."""
    nodes, size = 0, programs
    while True:
        size = -(-size // FAN_IN)
        nodes += size
        if size == 1:
            return nodes


def bwd_buffers(variant: tuple, constexprs: Callable[[], dict], partial_rows: int, *args) -> tuple:
    """The backward's grid (at most ``BWD_PROGRAMS_PER_SM`` programs an SM, fewer where
    fewer fit, at most a program a row), its partial sums (``partial_rows`` rows of ``d``
    per program, in the statistics dtype) and its tree's arrival counters, as
    ``(programs, partial, counters)``; no partials nor counters (None) for
    ``partial_rows`` 0. ``args`` are ``norm_bwd_kernel``'s arguments but the partials and
    the counters, ``constexprs`` its launch's, and ``variant`` a key equal only for
    launches that compile alike and have the same rows, features and dtypes. A ``launch_plan``."""
    device = args[1].device

    def make() -> tuple:
        dy, x, weight, stats, ds, dx, dx_in, dw, db, rows, d, offset_hi, offset_lo = args
        partial_dtype = stats_dtype(x.dtype)
        buffers = (partial_dtype, torch.int32) if partial_rows else (None, None)
        per_sm = fitting_per_sm(
            device, BWD_PROGRAMS_PER_SM, norm_bwd_kernel, variant, constexprs,
            dy, x, weight, stats, ds, dx, dx_in, buffers[0], dw, db, buffers[1], rows, d, offset_hi, offset_lo,
        )  # fmt: skip
        programs = num_programs(device, rows, per_sm)
        if not partial_rows:
            return programs, None, None
        # every program writes its rows of the partials, so no zero fill
        partial = launch_scratch("norm_bwd partials", device, partial_rows * programs * d, partial_dtype)
        return programs, partial, arrival_counter(device, counters=tree_counters(programs))

    return launch_plan(device, variant, make)


@triton.jit
def zero_partial_row(Partial, D, BLOCK_D: tl.constexpr):
    """Row ``Partial[0:D]`` = 0: a looped backward's running sums start from it."""
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        tl.store(Partial + cols, tl.zeros([BLOCK_D], dtype=Partial.dtype.element_ty), mask=cols < D)


@triton.jit
def add_to_partial_row(Partial, cols, mask, value):
    """``Partial[cols] += value``: each program owns its row of a partial buffer, so no atomics."""
    tl.store(Partial + cols, tl.load(Partial + cols, mask=mask, other=0.0) + value, mask=mask)


@triton.jit
def sum_node(Partial, first, stride, children, D, Out, ROOT, FAN_IN: tl.constexpr, BLOCK_D: tl.constexpr):
    """The (rows, D) ``Partial``'s rows ``(first + k) * stride`` for ``k < children`` summed
    in a fixed order, into row ``first * stride`` (the node's row: its first child's), or,
    at the ``ROOT``, into ``Out`` in Out's dtype."""
    node = Partial + first.to(tl.int64) * stride * D
    child_step = stride.to(tl.int64) * D
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        col_in = cols < D
        # Written by other programs, on other SMs: read around L1. The children's loads are
        # unrolled, so all are in flight together.
        total = tl.load(node + cols, mask=col_in, other=0.0, cache_modifier=".cg")
        for k in tl.static_range(1, FAN_IN):
            child_cols = cols < tl.where(children > k, D, 0)  # none past the last child
            total += tl.load(node + k * child_step + cols, mask=child_cols, other=0.0, cache_modifier=".cg")
        if ROOT:
            tl.store(Out + cols, round_to(total, Out.dtype.element_ty), mask=col_in)
        else:
            tl.store(node + cols, total, mask=col_in)


@triton.jit
def sum_partial_rows(Partial, DW, DB, Counters, programs, D, FAN_IN: tl.constexpr, BLOCK_D: tl.constexpr):
    """Once this program has written its rows of ``Partial`` (dweight's ``programs`` rows,
    then dbias's): its part of the tree that sums them into ``DW`` and ``DB`` (each if
    given). At each level the program to arrive last at its node (``Counters``: one a
    node, level after level, each set back to 0 by that program for the next launch) sums
    the node's children and goes up a level; the others are done."""
    node = tl.program_id(0)
    size = programs  # nodes on this level
    stride = tl.full((), 1, tl.int32)  # partial rows from one node of this level to the next
    counters = Counters  # this level's
    going = size > 0  # true: a tensor, as the loop makes it
    while going:
        parent = node // FAN_IN
        first = parent * FAN_IN
        children = tl.minimum(size - first, FAN_IN)
        counter = counters + parent
        # The counter's release publishes this program's stores, its acquire shows the last
        # program the children's; the barrier puts every thread's stores before it.
        tl.debug_barrier()
        last = tl.atomic_add(counter, 1, sem="acq_rel") == children - 1
        size = (size + FAN_IN - 1) // FAN_IN
        counters += size  # the next level's counters follow this level's
        if last:
            tl.store(counter, 0)  # for the next launch
            if DW is not None:
                sum_node(Partial, first, stride, children, D, DW, size == 1, FAN_IN, BLOCK_D)
            if DB is not None:
                sum_node(Partial + programs * D, first, stride, children, D, DB, size == 1, FAN_IN, BLOCK_D)
        node = parent
        stride *= FAN_IN
        going = last & (size > 1)


@triton.jit
def _row_stats(Stats, row, rows, CENTERED: tl.constexpr):
    """Row ``row``'s ``(mean, rstd)`` from the forward's ``Stats`` (centred: each row's mean, then
    each row's rstd; else each row's rstd, and a mean of 0); zeros past the last row."""
    exists = row < rows
    rstd = tl.load(Stats + (row + rows if CENTERED else row), mask=exists, other=0.0)
    mean = tl.load(Stats + row, mask=exists, other=0.0) if CENTERED else tl.zeros_like(rstd)
    return mean, rstd


@triton.jit
def _normalised(x, mean, rstd, mask, CENTERED: tl.constexpr):
    """``xhat``: ``(x - mean) * rstd`` under CENTERED, else ``x * rstd``. Given a ``mask``, 0 off the
    row, for sums over it (uncentred, ``x`` is loaded as 0 there)."""
    if CENTERED:
        xhat = (x - mean) * rstd
        if mask is not None:
            xhat = tl.where(mask, xhat, 0.0)
    else:
        xhat = x * rstd
    return xhat


@triton.jit
def _scale(W, cols, mask, offset, DTYPE: tl.constexpr):
    """What multiplies ``xhat``: ``W`` in DTYPE, plus ``offset`` when there is one (RMSNorm)."""
    w = tl.load(W + cols, mask=mask, other=0.0).to(DTYPE)
    if offset is not None:
        w = offset + w
    return w


@triton.jit
def _weight_input(xhat, X_DTYPE: tl.constexpr, CAST_BEFORE_W: tl.constexpr):
    """What multiplied the weight in the forward: ``xhat``, rounded to x's dtype under CAST_BEFORE_W."""
    if CAST_BEFORE_W:
        xhat = round_to(xhat, X_DTYPE).to(xhat.dtype)
    return xhat


@triton.jit
def _output(xhat, W, B, cols, mask, offset, X_DTYPE: tl.constexpr, MUL: tl.constexpr, CAST_BEFORE_W: tl.constexpr):
    """``xhat * scale + B`` in MUL (each if given), with ``xhat`` first rounded to x's dtype under CAST_BEFORE_W."""
    y = xhat
    if W is not None:
        if CAST_BEFORE_W:
            y = round_to(y, X_DTYPE)
        y = y.to(MUL) * _scale(W, cols, mask, offset, MUL)
    if B is not None:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(MUL)
    return y


@triton.jit
def _row_means(g, gxhat, D, CENTERED: tl.constexpr):
    """``mean(g)`` (0 unless CENTERED) and ``mean(gxhat)`` over the row (its last axis), the two
    sums in one reduction of the pair: across warps it goes through shared memory once, so a
    row costs one set of barriers, not two. (A ``tl.reduce`` with a combine function of two
    values is one reduction too, but the interpreter runs such a function element by element.)"""
    if CENTERED:
        sum_g, sum_gxhat = tl.split(tl.sum(tl.join(g, gxhat), axis=0))
    else:
        sum_gxhat = tl.sum(gxhat, axis=0)
        sum_g = tl.zeros_like(sum_gxhat)
    return sum_g / D, sum_gxhat / D


@triton.jit
def _dx(g, xhat, rstd, mean_g, mean_gxhat, CENTERED: tl.constexpr):
    """``rstd * (g - mean(g) - xhat * mean(g * xhat))``, without the ``mean(g)`` term unless CENTERED."""
    if CENTERED:
        g = g - mean_g
    return rstd * (g - xhat * mean_gxhat)


@triton.jit
def _store_dx(dx, DS, DX, DX_IN, offs, mask):
    """Stores ``dx`` (plus, given the sum's gradient ``DS``, its: the rows normalised were a
    sum the caller also reads) at ``DX + offs``, and, given ``DX_IN``, in its dtype there too."""
    if DS is not None:
        dx += tl.load(DS + offs, mask=mask, other=0.0).to(dx.dtype)
    tl.store(DX + offs, round_to(dx, DX.dtype.element_ty), mask=mask)
    if DX_IN is not None:
        tl.store(DX_IN + offs, round_to(dx, DX_IN.dtype.element_ty), mask=mask)


@triton.jit
def _row_grads(
    dy,
    x,
    mean,
    rstd,
    scale,
    DS,
    DX,
    DX_IN,
    offs,
    mask,
    dw,
    db,
    D,
    X_DTYPE: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    CENTERED: tl.constexpr,
    CAST_BEFORE_W: tl.constexpr,
):
    """A row that fits in one block: its ``dx`` stored (``_store_dx``), and the running
    sums ``dw`` (of ``dy * xhat``, with a weight) and ``db`` (of ``dy``, with a bias) with
    its terms added."""
    xhat = _normalised(x, mean, rstd, mask, CENTERED)
    g = dy * scale
    mean_g, mean_gxhat = _row_means(g, g * xhat, D, CENTERED)
    _store_dx(_dx(g, xhat, rstd, mean_g, mean_gxhat, CENTERED), DS, DX, DX_IN, offs, mask)
    if HAS_W:
        dw += dy * _weight_input(xhat, X_DTYPE, CAST_BEFORE_W)
    if HAS_B:
        db += dy
    return dw, db


@triton.jit
def _plus_residual(y, R, offs, mask, X_DTYPE: tl.constexpr, ROUND_TO_X: tl.constexpr, SUM: tl.constexpr):
    """``R + y`` in SUM (PyTorch's addition of the norm's result to the residual stream), ``y``
    rounded to x's dtype first under ROUND_TO_X (the norm's result in x's dtype), else as it is
    (in the statistics dtype)."""
    if ROUND_TO_X:
        y = round_to(y, X_DTYPE)
    return y.to(SUM) + tl.load(R + offs, mask=mask, other=0.0).to(SUM)


@triton.jit
def _load_rows(X, R, S, offs, mask, ACC: tl.constexpr):
    """The rows to normalise at ``offs``, in ACC: ``X``'s, or with a residual ``R`` their sum
    ``X + R``, rounded to S's dtype (as PyTorch's addition rounds it) and stored in ``S``."""
    x = tl.load(X + offs, mask=mask, other=0.0)
    if R is not None:
        x = round_to(x.to(ACC) + tl.load(R + offs, mask=mask, other=0.0).to(ACC), S.dtype.element_ty)
        tl.store(S + offs, x, mask=mask)
    return x.to(ACC)


@jit(float_options=["eps_hi", "eps_lo", "offset_hi", "offset_lo"], do_not_specialize=["rows"])
def norm_fwd_kernel(
    X,
    R,
    W,
    B,
    Y,
    S,
    Stats,
    rows,
    D,
    eps_hi,
    eps_lo,
    offset_hi,
    offset_lo,
    CENTERED: tl.constexpr,
    CAST_BEFORE_W: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    ADD_AFTER: tl.constexpr = False,
    ROUND_TO_X: tl.constexpr = False,
):
    """``Y`` for ``ROWS`` rows a program, and their statistics into ``Stats``: centred,
    (2, rows) each row's mean, then each row's rstd; else (rows,) each row's rstd. With a
    residual ``R``, the rows normalised are ``X + R``, stored in ``S`` (S's dtype); under
    ADD_AFTER, ``Y`` is ``R`` plus the rows of ``X`` normalised (``_plus_residual``), no ``S``."""
    # The dtypes from the pointers', not from constexpr arguments: each argument adds
    # to the host time of every launch. X_DTYPE: the normalised rows'.
    if R is None or ADD_AFTER:
        X_DTYPE: tl.constexpr = X.dtype.element_ty
    else:
        X_DTYPE: tl.constexpr = S.dtype.element_ty
    ACC: tl.constexpr = tl.float64 if X_DTYPE == tl.float64 else tl.float32
    # y's statistics dtype: with CAST_BEFORE_W, y has the dtype promoted from w's and x's; Y is
    # the sum's under ADD_AFTER, whose norm computes in the statistics dtype
    SUM: tl.constexpr = tl.float64 if Y.dtype.element_ty == tl.float64 else tl.float32
    MUL: tl.constexpr = ACC if ADD_AFTER else SUM
    eps = as_float(eps_hi, eps_lo, ACC)
    offset = None  # the scale is the weight itself
    if offset_hi is not None:
        offset = as_float(offset_hi, offset_lo, MUL)
    first = tl.program_id(0).to(tl.int64) * ROWS
    X += first * D
    Y += first * D
    Stats += first
    if R is not None:
        R += first * D
        if not ADD_AFTER:
            S += first * D
    BEFORE = None if ADD_AFTER else R  # the residual added to the rows before the norm
    if ONE_BLOCK:
        row = tl.arange(0, ROWS)  # of this program's
        row_in = row < rows - first
        cols = tl.arange(0, BLOCK_D)
        col_in = cols < D
        mask = row_in[:, None] & col_in[None, :]
        offs = row[:, None] * D + cols[None, :]  # below ROWS * BLOCK_D
        x = _load_rows(X, BEFORE, S, offs, mask, ACC)
        if CENTERED:
            mean = tl.sum(x, axis=1) / D
            x = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        y = _output(x * rstd[:, None], W, B, cols, col_in, offset, X_DTYPE, MUL, CAST_BEFORE_W)
        if ADD_AFTER:
            y = _plus_residual(y, R, offs, mask, X_DTYPE, ROUND_TO_X, SUM)
        tl.store(Y + offs, round_to(y, Y.dtype.element_ty), mask=mask)
    else:
        row, row_in = 0, None  # the program's one row
        if BEFORE is not None:
            # the sum first, into S, which the passes below read as the rows (each thread
            # reads back what it stored; the barrier orders the block's stores before all)
            for start in range(0, D, BLOCK_D):
                cols = start + tl.arange(0, BLOCK_D)
                _load_rows(X, BEFORE, S, cols, cols < D, ACC)
            tl.debug_barrier()
            X = S
        if CENTERED:
            total = tl.zeros([BLOCK_D], dtype=ACC)
            for start in range(0, D, BLOCK_D):
                cols = start + tl.arange(0, BLOCK_D)
                total += tl.load(X + cols, mask=cols < D, other=0.0).to(ACC)
            mean = tl.sum(total, axis=0) / D
        total = tl.zeros([BLOCK_D], dtype=ACC)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = cols < D
            x = tl.load(X + cols, mask=mask, other=0.0).to(ACC)
            if CENTERED:
                x = tl.where(mask, x - mean, 0.0)
            total += x * x
        rstd = 1.0 / tl.sqrt(tl.sum(total, axis=0) / D + eps)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = cols < D
            x = tl.load(X + cols, mask=mask, other=0.0).to(ACC)
            if CENTERED:
                x = x - mean
            y = _output(x * rstd, W, B, cols, mask, offset, X_DTYPE, MUL, CAST_BEFORE_W)
            if ADD_AFTER:
                y = _plus_residual(y, R, cols, mask, X_DTYPE, ROUND_TO_X, SUM)
            tl.store(Y + cols, round_to(y, Y.dtype.element_ty), mask=mask)
    if CENTERED:
        tl.store(Stats + row, mean, mask=row_in)
        tl.store(Stats + rows + row, rstd, mask=row_in)
    else:
        tl.store(Stats + row, rstd, mask=row_in)


@jit(float_options=["offset_hi", "offset_lo"])
def norm_bwd_kernel(
    DY,
    X,
    W,
    Stats,
    DS,
    DX,
    DX_IN,
    Partial,
    DW,
    DB,
    Counters,
    rows,
    D,
    offset_hi,
    offset_lo,
    CENTERED: tl.constexpr,
    CAST_BEFORE_W: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    FAN_IN: tl.constexpr,
    STAGES: tl.constexpr,
):
    """``DX`` for every row, from the forward's ``Stats``; ``DW`` (and ``DB``) from the
    programs' partial sums, through the tree over the programs (``Counters``: its arrival counters).
    Where the rows were a sum of two inputs (the forward's residual), ``DS``, the gradient
    of the sum as the caller read it, adds to ``DX``, and ``DX_IN`` takes it too in the
    other input's dtype."""
    # As in the forward: the variant from the pointers given, the dtype from x's.
    HAS_W: tl.constexpr = W is not None
    HAS_B: tl.constexpr = DB is not None
    ACC: tl.constexpr = tl.float64 if X.dtype.element_ty == tl.float64 else tl.float32
    offset = None
    if offset_hi is not None:
        offset = as_float(offset_hi, offset_lo, ACC)
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    x_dtype = X.dtype.element_ty
    if HAS_W or HAS_B:
        # This program's rows of the partial sums: dweight's, and dbias's after every program's dweight rows.
        partial_dw = Partial + pid * D
        partial_db = partial_dw + programs * D
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        scale = _scale(W, cols, mask, offset, ACC) if HAS_W else 1.0
        dw = tl.zeros([BLOCK_D], dtype=ACC)
        db = tl.zeros([BLOCK_D], dtype=ACC)
        if STAGES > 1:
            # The pipeline issues the loads of the STAGES - 1 rows after this one before
            # this one is reduced: their latency hides behind the rows in between.
            for row in tl.range(pid, rows, programs, num_stages=STAGES):
                offs = tl.cast(row, tl.int64) * D + cols
                dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
                x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
                mean, rstd = _row_stats(Stats, row, rows, CENTERED)
                dw, db = _row_grads(
                    dy, x, mean, rstd, scale, DS, DX, DX_IN, offs, mask, dw, db, D,
                    x_dtype, HAS_W, HAS_B, CENTERED, CAST_BEFORE_W,
                )  # fmt: skip
        else:
            # Rows the pipeline cannot copy (see bwd_row_launch): each step loads the next
            # row and its statistics into registers before reducing this one.
            offs = tl.cast(pid, tl.int64) * D + cols
            first = cols < tl.where(pid < rows, D, 0)
            next_dy = tl.load(DY + offs, mask=first, other=0.0)
            next_x = tl.load(X + offs, mask=first, other=0.0)
            next_mean, next_rstd = _row_stats(Stats, pid, rows, CENTERED)
            for row in range(pid, rows, programs):
                dy = next_dy.to(ACC)
                x = next_x.to(ACC)
                mean, rstd = next_mean, next_rstd
                following = cols < tl.where(row + programs < rows, D, 0)
                next_dy = tl.load(DY + offs + programs * D, mask=following, other=0.0)
                next_x = tl.load(X + offs + programs * D, mask=following, other=0.0)
                next_mean, next_rstd = _row_stats(Stats, row + programs, rows, CENTERED)
                dw, db = _row_grads(
                    dy, x, mean, rstd, scale, DS, DX, DX_IN, offs, mask, dw, db, D,
                    x_dtype, HAS_W, HAS_B, CENTERED, CAST_BEFORE_W,
                )  # fmt: skip
                offs += programs * D
        if HAS_W:
            tl.store(partial_dw + cols, dw, mask=mask)
        if HAS_B:
            tl.store(partial_db + cols, db, mask=mask)
    else:
        if HAS_W:
            zero_partial_row(partial_dw, D, BLOCK_D)
        if HAS_B:
            zero_partial_row(partial_db, D, BLOCK_D)
        for row in range(pid, rows, programs):
            base = tl.cast(row, tl.int64) * D
            mean, rstd = _row_stats(Stats, row, rows, CENTERED)
            sum_g = tl.zeros([BLOCK_D], dtype=ACC)
            sum_gxhat = tl.zeros([BLOCK_D], dtype=ACC)
            for start in range(0, D, BLOCK_D):
                cols = start + tl.arange(0, BLOCK_D)
                mask = cols < D
                dy = tl.load(DY + base + cols, mask=mask, other=0.0).to(ACC)
                xhat = _normalised(tl.load(X + base + cols, mask=mask, other=0.0).to(ACC), mean, rstd, mask, CENTERED)
                g = dy * _scale(W, cols, mask, offset, ACC) if HAS_W else dy
                if CENTERED:
                    sum_g += g
                sum_gxhat += g * xhat
                if HAS_W:
                    add_to_partial_row(partial_dw, cols, mask, dy * _weight_input(xhat, x_dtype, CAST_BEFORE_W))
                if HAS_B:
                    add_to_partial_row(partial_db, cols, mask, dy)
            mean_g, mean_gxhat = _row_means(sum_g, sum_gxhat, D, CENTERED)
            for start in range(0, D, BLOCK_D):
                cols = start + tl.arange(0, BLOCK_D)
                mask = cols < D
                dy = tl.load(DY + base + cols, mask=mask, other=0.0).to(ACC)
                # only stored: no sum over the row
                xhat = _normalised(tl.load(X + base + cols, mask=mask, other=0.0).to(ACC), mean, rstd, None, CENTERED)
                g = dy * _scale(W, cols, mask, offset, ACC) if HAS_W else dy
                _store_dx(_dx(g, xhat, rstd, mean_g, mean_gxhat, CENTERED), DS, DX, DX_IN, base + cols, mask)
    if HAS_W or HAS_B:
        sum_partial_rows(Partial, DW, DB, Counters, programs, D, FAN_IN, BLOCK_D)


def norm_fwd(
    x, residual, weight, bias, eps, offset, centered, cast_before_weight, out_dtype, y, summed, stats,
    *, add_after=False, round_to_x=False,
):  # fmt: skip
    """The forward's launch, for every op over it (``layer_norm``, ``rms_norm``, ``add_norm``
    and ``norm_add`` name only what they use): ``y``, the rows of ``x`` (of ``summed =
    residual + x`` with a residual) normalised, and their ``stats``. ``add_after``
    (``norm_add``'s): ``y`` is ``residual`` plus the rows of ``x`` normalised, rounded to
    x's dtype first where ``round_to_x``."""
    rows, d = rows_and_features(x)
    if not rows:
        return
    # rows is not specialized (the tile masks its last rows): its type, i32 or i64, is all that varies
    key = (
        (x.dtype, dtype_of(residual), out_dtype, dtype_of(weight), dtype_of(bias), not offset, centered,
         cast_before_weight, d, rows >= 2**31, add_after, round_to_x)
        if aligned(x, residual, weight, bias)
        else None
    )  # fmt: skip
    launch = row_launch(d)
    norm_fwd_kernel.launch(
        (cdiv(rows, launch["ROWS"]),),
        key,
        lambda: dict(
            launch, CENTERED=centered, CAST_BEFORE_W=cast_before_weight, ADD_AFTER=add_after, ROUND_TO_X=round_to_x
        ),
        x,
        residual,
        weight,
        bias,
        y,
        summed,
        stats,
        rows,
        d,
        *float_bits(eps),
        *(float_bits(offset) if offset else NO_OFFSET),
    )


def norm_bwd(dy, dsummed, x, weight, stats, offset, centered, has_bias, cast_before_weight, x_dtype, dx, dx_in, dw, db):
    """The backward's launch, for every op over it: ``dx`` (with ``dsummed``, the
    gradient of a forward's ``summed`` as the caller read it, added), and the same in
    ``dx_in`` when ``x_dtype`` (the forward's input's, with a residual) is not x's
    (else ``dx_in`` is left as it is); ``dw`` with a weight, ``db`` when ``has_bias``
    (each left as it is otherwise). ``x`` is the forward's input, or its ``summed``."""
    rows, d = rows_and_features(x)
    if not rows:
        dw.zero_()  # empty when there is no weight
        if db is not None:
            db.zero_()
        return
    has_w = weight is not None
    variant = ("norm_bwd", x.dtype, dy.dtype, dtype_of(dsummed), x_dtype, dtype_of(weight), not offset, centered,
               has_bias, cast_before_weight, rows, d)  # fmt: skip
    offset_args = float_bits(offset) if offset else NO_OFFSET

    def constexprs() -> dict:
        # Without the sum's gradient dy is counted at x's size: an out_dtype's bf16 dy on fp32
        # rows of 1024 features would otherwise take an eighth stage, which spills.
        x_bytes = x.element_size()
        column_bytes = 2 * x_bytes if dsummed is None else dy.element_size() + x_bytes + dsummed.element_size()
        # fused, dy * w - mean(dy * w) keeps the product's rounding error where the exact
        # answer is 0 (D == 1), times rstd
        options = dict(enable_fp_fusion=False) if centered else {}
        return dict(bwd_row_launch(d, column_bytes), CENTERED=centered, CAST_BEFORE_W=cast_before_weight, **options)

    grads = (dw if has_w else None, db if has_bias else None)
    dx_in = dx_in if x_dtype != x.dtype else None
    partial_rows = 2 if has_bias else int(has_w)  # dbias's partials follow every program's dweight row
    programs, partial, counters = bwd_buffers(variant, constexprs, partial_rows, dy, x, weight, stats, dsummed, dx,
                                              dx_in, *grads, rows, d, *offset_args)  # fmt: skip
    norm_bwd_kernel.launch(
        (programs,),
        variant if aligned(dy, dsummed, x, weight) else None,  # stats: the forward's allocation
        constexprs,
        dy,
        x,
        weight,
        stats,
        dsummed,
        dx,
        dx_in,
        partial,
        *grads,
        counters,
        rows,
        d,
        *offset_args,
    )
