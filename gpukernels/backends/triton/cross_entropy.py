"""Cross-entropy over the rows of a (rows, C) logit matrix (its rows any stride apart, its columns adjacent).

Forward, ``cross_entropy_fwd_kernel``, one program per row: reads the row in column
blocks (``FWD_STAGES - 1`` blocks copied ahead into shared memory by Triton's software
pipeline while one is reduced; where it cannot copy them, rows whose length or stride
is not a multiple of 16, the next block loaded into registers) and keeps an online
log-sum-exp: the running max ``m`` and ``s = sum exp(x - m)``, rescaled when ``m`` grows; with label smoothing or
class-probability targets also, for the row's target weights ``q`` (``w`` for
the smoothing term of class indices, ``w * ((1-e) target + e/C)`` for
probabilities), ``mass = sum_c q[c]`` and ``d = sum_c q[c] (x[c] - m)``, re-based
the same way, so that no term is ever formed relative to 0 (a logit of 1e4
loses no digits):
  class indices:  loss = (1-e) w[t] (m - x[t] + log s) + (e/C) (sum(w) log s - d)
  probabilities:  loss = mass log s - d
It saves ``m`` and ``log s`` per row, kept apart so a large ``m`` costs the
gradient no digits (and ``mass`` for probabilities).
The program to finish last (each adds itself to a zeroed counter when its row
is done; it sets the counter back to 0) then sums the rows' losses, in a fixed
order (deterministic), into the reduced loss, divided by the mean's denominator
(``sum w[t_i]`` over kept rows, which it computes from the targets; the number
of rows for probabilities), and checks the targets: the forward, its reduction included, is one launch, and
nothing on the host waits.
Backward, ``cross_entropy_bwd_kernel``, a 2-D grid of (rows, column blocks): the
gradient from those statistics, ``scale * (a (p - onehot) + b (sum(w) p - w))``
(``scale * (mass p - q)`` for probabilities) with ``p = exp(x - m - log s)``,
the upstream gradient divided by the mean's denominator in the kernel: one read
of the logits and one write, and no logits-sized buffer but the gradient itself.

The fused linear + cross-entropy (``linear_cross_entropy.py``) runs these
kernels on its chunks of logits, with what only it has, each behind a
constexpr flag: a softcap (the row is read as ``cap * tanh(x / cap)``), a
z-loss (``z * lse**2`` per row) and vocabulary slices.

Float options reach the kernels as the bits of their fp64 value, in two int32
arguments each (``float_bits``, as every kernel's float options), so fp64 logits
see them exactly and no launch puts them in device memory.

A target outside ``[0, C)`` that is not ``ignore_index`` is never read: the
kernels clamp the index they load with, and the last program flags it.
On CPU tensors (the interpreter) the flag is an IndexError, as on the NumPy
backend; on CUDA it is ``torch._assert_async``, a device-side assert, as
PyTorch's own ``nll_loss`` reports it (it surfaces at a later synchronisation
and leaves the CUDA context unusable).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    acc_dtype,
    aligned,
    arrival_counter,
    as_float,
    cdiv,
    dtype_of,
    float_bits,
    launch_plan,
    launch_scratch,
    round_to,
    row_block,
)
from ._launch import jit

# Widest column block of the forward; vocabularies past it (up to 256k) are swept
# in blocks. Tests lower it to make small rows loop.
MAX_BLOCK_C = 8192
# Column blocks in the forward's pipeline (the block reduced and those loaded ahead), for
# rows of more than one block whose length and stride Triton knows to be multiples of 16.
FWD_STAGES = 3
# Columns per program of the gradient kernel: a 2-D grid of (rows, column blocks)
# fills the GPU however the logits are shaped.
GRAD_BLOCK_C = 2048


@triton.jit
def apply_softcap(x, cap):
    """``cap * tanh(x / cap)``, with tanh(u) = 2 sigmoid(2u) - 1 (the interpreter has no libdevice tanh)."""
    return (tl.sigmoid(x * 2.0 / cap) * 2.0 - 1.0) * cap


@triton.jit
def softcap_slope(x, cap):
    """d softcap / dx = 1 - tanh(x / cap)**2 = 4 sigmoid(2u) sigmoid(-2u), free of the
    cancellation 1 - tanh**2 suffers where tanh ~ 1."""
    u = x * 2.0 / cap
    return tl.sigmoid(u) * tl.sigmoid(-u) * 4.0


# Rows per step and warp of the forward's last program, which sums every row's loss.
FINISH_ROWS_PER_WARP = 256
# The arguments that take float_bits words.
FLOAT_OPTIONS = ["smoothing_hi", "smoothing_lo", "softcap_hi", "softcap_lo", "z_loss_hi", "z_loss_lo"]


@triton.jit
def finish_rows(
    RowLoss,
    T,
    W,
    Loss,
    Totals,
    Flags,
    rows,
    C,
    ignore_index,
    HAS_W: tl.constexpr,
    PROBS: tl.constexpr,
    REDUCE: tl.constexpr,
    MEAN: tl.constexpr,
    WEIGHT_SUM: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The work of the forward's last program, once every row's loss is in ``RowLoss``:
    ``Loss`` = their sum (``REDUCE``), over the mean's denominator (``MEAN``): the sum of
    ``w[t]`` over the rows whose target is kept and in range, the number of rows for
    ``PROBS``. For class indices also ``Totals[0]`` = that denominator, ``Totals[1]`` =
    ``sum(w)`` (C without weights) with ``WEIGHT_SUM``, and ``Flags[1]`` = 1 when every
    target is ``ignore_index`` or in ``[0, C)``. A fixed order: the same sum every run."""
    total = tl.zeros([BLOCK], dtype=ACC)
    counted = tl.zeros([BLOCK], dtype=ACC)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, rows, BLOCK):
        r = start + tl.arange(0, BLOCK)
        mask = r < rows
        if REDUCE:  # written by other programs, on other SMs: read around L1
            total += tl.load(RowLoss + r, mask=mask, other=0.0, cache_modifier=".cg").to(ACC)
        if not PROBS:
            t = tl.load(T + r, mask=mask, other=0).to(tl.int64)
            kept = mask & (t != ignore_index)
            in_range = (t >= 0) & (t < C)
            bad += (kept & ~in_range).to(tl.int32)
            if HAS_W:
                counted += tl.load(W + tl.where(in_range, t, 0), mask=kept & in_range, other=0.0).to(ACC)
            else:
                counted += (kept & in_range).to(ACC)
    # zeros + n: an int argument equal to 1 is a constexpr, which has no .to()
    denominator = tl.sum(counted, axis=0) if not PROBS else tl.zeros((), ACC) + rows
    if REDUCE:
        loss = tl.sum(total, axis=0)
        if MEAN:
            # nan when it is 0 (every row ignored, or of class weight 0), as in PyTorch: not the
            # inf of a smoothed loss's sum over 0
            loss = tl.where(denominator != 0, loss / denominator, float("nan"))
        tl.store(Loss, round_to(loss, Loss.dtype.element_ty))
    if not PROBS:
        tl.store(Totals, denominator)
        tl.store(Flags + 1, (tl.sum(bad, axis=0) == 0).to(tl.int32))
    if WEIGHT_SUM:
        if HAS_W:
            weights = tl.zeros([BLOCK], dtype=ACC)
            for start in range(0, C, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                weights += tl.load(W + cols, mask=cols < C, other=0.0).to(ACC)
            tl.store(Totals + 1, tl.sum(weights, axis=0))
        else:
            tl.store(Totals + 1, tl.zeros((), ACC) + C)


@triton.jit
def _lse_block(
    x,
    cols,
    m,
    shift,
    s,
    d,
    mass,
    W,
    T,
    row,
    C,
    cap,
    e,
    HAS_W: tl.constexpr,
    SMOOTH: tl.constexpr,
    SOFTCAP: tl.constexpr,
    PROBS: tl.constexpr,
    PADDED: tl.constexpr,
    ACC: tl.constexpr,
):
    """The forward's online sums ``(m, shift, s, d, mass)`` with the block ``x`` of logits
    (columns ``cols``; -inf past the row, or with ``PADDED`` anything) taken in."""
    neg_inf = -float("inf")
    mask = cols < C
    if SOFTCAP:  # -inf stays out of the padding, which the cap would make -cap
        x = tl.where(mask, apply_softcap(x, cap), neg_inf)
    elif PADDED:
        x = tl.where(mask, x, neg_inf)
    m = tl.maximum(m, tl.max(x, axis=0))
    new_shift = tl.where(m == neg_inf, 0.0, m)
    s = s * tl.exp(shift - new_shift) + tl.sum(tl.exp(x - new_shift), axis=0)
    if SMOOTH or PROBS:
        q = tl.load(W + cols, mask=mask, other=0.0).to(ACC) if HAS_W else tl.where(mask, 1.0, 0.0).to(ACC)
        if PROBS:
            t = tl.load(T + row * C + cols, mask=mask, other=0.0).to(ACC)
            q *= (1.0 - e) * t + e / C if SMOOTH else t
        d = d - mass * (new_shift - shift) + tl.sum(q * tl.where(mask, x - new_shift, 0.0), axis=0)
        mass += tl.sum(q, axis=0)
    return m, new_shift, s, d, mass


@jit(float_options=FLOAT_OPTIONS)
def cross_entropy_fwd_kernel(
    X,
    T,
    W,
    RowLoss,
    Stats,
    Loss,
    Flags,
    x_row_stride,
    row_offset,
    rows,
    C,
    ignore_index,
    smoothing_hi,
    smoothing_lo,
    softcap_hi,
    softcap_lo,
    z_loss_hi,
    z_loss_lo,
    HAS_W: tl.constexpr,
    SMOOTH: tl.constexpr,
    SOFTCAP: tl.constexpr,
    Z_LOSS: tl.constexpr,
    PROBS: tl.constexpr,
    FINISH: tl.constexpr,
    REDUCE: tl.constexpr,
    MEAN: tl.constexpr,
    WEIGHT_SUM: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    FINISH_BLOCK: tl.constexpr,
    STAGES: tl.constexpr,
    PADDED: tl.constexpr,
):
    """Program ``i`` takes row ``i`` of ``X`` (a chunk of the forward's ``rows`` rows, each
    ``x_row_stride`` elements after the last):
    row ``row_offset + i`` of ``T`` and ``RowLoss``, and of each part of ``Stats``
    (``row_stats``: each row's max, each row's log-sum, then the totals or each row's
    target mass). With ``FINISH``, the program to arrive last at the counter
    ``Flags[0]`` (zeroed by the caller), over every launch of the forward, does
    ``finish_rows``. With ``PADDED``, each row of ``X`` may be read up to its stride (its
    columns past ``C``, padding, hold anything): loads of whole 16-byte vectors."""
    program = tl.program_id(0).to(tl.int64)
    row = row_offset + program
    readable = x_row_stride if PADDED else C
    RowMax = Stats
    LogSum = Stats + rows
    Rest = Stats + 2 * rows  # the totals (class indices), or each row's target mass
    X += program * x_row_stride
    cap = as_float(softcap_hi, softcap_lo, ACC) if SOFTCAP else 1.0
    e = as_float(smoothing_hi, smoothing_lo, ACC) if SMOOTH else 0.0
    neg_inf = -float("inf")

    m = tl.full((), neg_inf, ACC)
    shift = tl.zeros((), ACC)  # m, or 0 while every logit so far is -inf (avoids -inf - -inf)
    s = tl.zeros((), ACC)
    d = tl.zeros((), ACC)
    mass = tl.zeros((), ACC)
    if STAGES > 1:
        # The pipeline issues the loads of the STAGES - 1 blocks after this one before
        # this one is reduced: their latency hides behind the reductions' barriers.
        for start in tl.range(0, C, BLOCK_C, num_stages=STAGES):
            cols = start + tl.arange(0, BLOCK_C)
            x = tl.load(X + cols, mask=cols < readable, other=neg_inf).to(ACC)
            m, shift, s, d, mass = _lse_block(
                x, cols, m, shift, s, d, mass, W, T, row, C, cap, e, HAS_W, SMOOTH, SOFTCAP, PROBS, PADDED, ACC
            )
    else:
        # Rows the pipeline cannot copy (see FWD_STAGES): each step loads the next block
        # into registers before reducing this one.
        cols = tl.arange(0, BLOCK_C)
        next_x = tl.load(X + cols, mask=cols < readable, other=neg_inf)
        for start in range(0, C, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            x = next_x.to(ACC)
            next_x = tl.load(X + BLOCK_C + cols, mask=cols + BLOCK_C < readable, other=neg_inf)
            m, shift, s, d, mass = _lse_block(
                x, cols, m, shift, s, d, mass, W, T, row, C, cap, e, HAS_W, SMOOTH, SOFTCAP, PROBS, PADDED, ACC
            )
    log_s = tl.log(s)

    if PROBS:
        loss = mass * log_s - d
        tl.store(Rest + row, mass)
    else:
        t = tl.load(T + row).to(tl.int64)
        # clamped: an out-of-range target is never read (finish_rows flags it)
        kept = (t != ignore_index) & (t >= 0) & (t < C)
        safe_t = tl.where(kept, t, 0)
        x_t = tl.load(X + safe_t).to(ACC)
        if SOFTCAP:
            x_t = apply_softcap(x_t, cap)
        w_t = tl.load(W + safe_t).to(ACC) if HAS_W else 1.0
        loss = (1.0 - e) * w_t * (shift - x_t + log_s)
        if SMOOTH:
            loss += (e / C) * (mass * log_s - d)
        if Z_LOSS:
            lse = shift + log_s
            loss += as_float(z_loss_hi, z_loss_lo, ACC) * lse * lse
        loss = tl.where(kept, loss, 0.0)
    tl.store(RowLoss + row, round_to(loss, RowLoss.dtype.element_ty))
    tl.store(RowMax + row, shift)
    tl.store(LogSum + row, log_s)
    if FINISH:
        # The counter's release publishes this program's stores, its acquire shows the
        # last program everyone's; the barrier puts every thread's stores before it.
        tl.debug_barrier()
        if tl.atomic_add(Flags, 1, sem="acq_rel") == rows - 1:
            finish_rows(
                RowLoss,
                T,
                W,
                Loss,
                Rest,
                Flags,
                rows,
                C,
                ignore_index,
                HAS_W,
                PROBS,
                REDUCE,
                MEAN,
                WEIGHT_SUM,
                ACC,
                FINISH_BLOCK,
            )
            tl.store(Flags, 0)  # the counter, for the next forward


@jit(float_options=FLOAT_OPTIONS)
def cross_entropy_bwd_kernel(
    X,
    T,
    W,
    Stats,
    GradLoss,
    grad_stride,
    Grad,
    TargetGrad,
    x_row_stride,
    grad_row_stride,
    row_offset,
    rows,
    width,
    col_offset,
    C,
    ignore_index,
    smoothing_hi,
    smoothing_lo,
    softcap_hi,
    softcap_lo,
    z_loss_hi,
    z_loss_lo,
    HAS_W: tl.constexpr,
    SMOOTH: tl.constexpr,
    SOFTCAP: tl.constexpr,
    Z_LOSS: tl.constexpr,
    PROBS: tl.constexpr,
    MEAN: tl.constexpr,
    TARGET_GRAD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PADDED: tl.constexpr,
):
    """``Grad[i, cols] = scale_row * d loss_row / d X[i, cols]`` for columns
    ``col_offset + cols`` of rows of ``C`` logits (``width`` of them here): row ``i`` of
    ``X`` and ``Grad`` (a chunk of the forward's ``rows`` rows) is row ``row = row_offset +
    i`` of ``T``, ``TargetGrad``, ``GradLoss`` and of each part of the forward's ``Stats``,
    whose ``m`` and ``log s`` it reads; ``scale_row`` is ``GradLoss[row * grad_stride]`` (a stride of 0 for one value),
    over the mean's denominator ``Totals[0]`` (``rows`` for probabilities). With
    ``TARGET_GRAD``, d loss / d target into ``TargetGrad``. Rows of ``X`` and ``Grad`` are
    ``x_row_stride`` and ``grad_row_stride`` elements apart. ``Grad`` may be ``X``: each
    program reads its block before writing it. With ``PADDED``, ``Grad`` is ``X``, each row
    read and written up to its stride (its columns past ``width``, padding, hold anything
    before and after): loads and stores of whole 16-byte vectors."""
    RowMax = Stats
    LogSum = Stats + rows
    Rest = Stats + 2 * rows  # the totals (class indices), or each row's target mass
    program = tl.program_id(0).to(tl.int64)
    row = row_offset + program
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < width
    scale = tl.load(GradLoss + row * grad_stride).to(ACC)
    if MEAN:
        if PROBS:
            scale = scale / rows
        else:
            denominator = tl.load(Rest)  # 0 when every row is ignored: no gradient
            scale = tl.where(denominator != 0, scale, 0.0) / tl.where(denominator != 0, denominator, 1.0)
    m = tl.load(RowMax + row)
    log_s = tl.load(LogSum + row)
    io = cols < x_row_stride if PADDED else mask
    raw = tl.load(X + program * x_row_stride + cols, mask=io, other=0.0).to(ACC)
    cap = as_float(softcap_hi, softcap_lo, ACC) if SOFTCAP else 1.0
    x = apply_softcap(raw, cap) if SOFTCAP else raw
    p = tl.exp(x - m - log_s)
    e = as_float(smoothing_hi, smoothing_lo, ACC) if SMOOTH else 0.0
    if PROBS:
        w = tl.load(W + cols, mask=mask, other=0.0).to(ACC) if HAS_W else 1.0
        t = tl.load(T + row * C + cols, mask=mask, other=0.0)
        q = w * ((1.0 - e) * t.to(ACC) + e / C) if SMOOTH else w * t.to(ACC)
        g = scale * (tl.load(Rest + row) * p - q)
        if TARGET_GRAD:
            target_grad = -scale * (1.0 - e) * w * (x - m - log_s)
            tl.store(TargetGrad + row * C + cols, round_to(target_grad, TargetGrad.dtype.element_ty), mask=mask)
    else:
        t = tl.load(T + row).to(tl.int64)
        scale = tl.where(t != ignore_index, scale, 0.0)
        # an out-of-range target is flagged by the forward; clamped, it is never read
        w_t = tl.load(W + tl.where((t >= 0) & (t < C), t, 0)).to(ACC) if HAS_W else 1.0
        # a (p - onehot) + b (sum(w) p - w): each term exactly 0 where p is the one-hot (C == 1)
        g = scale * (1.0 - e) * w_t * (p - tl.where(cols + col_offset == t, 1.0, 0.0))
        if SMOOTH:
            if HAS_W:
                w = tl.load(W + col_offset + cols, mask=mask, other=0.0).to(ACC)
                g += scale * (e / C) * (tl.load(Rest + 1) * p - w)
            else:
                g += scale * (e / C) * (C * p - 1.0)
        if Z_LOSS:
            g += scale * 2.0 * as_float(z_loss_hi, z_loss_lo, ACC) * (m + log_s) * p
    if SOFTCAP:
        g *= softcap_slope(raw, cap)
    tl.store(Grad + program * grad_row_stride + cols, round_to(g, Grad.dtype.element_ty), mask=io)


_NO_OPTIONS = (0,) * 6


def _options(label_smoothing: float, softcap: Optional[float], z_loss: float) -> tuple[int, ...]:
    """The kernels' float options, as ``float_bits``; in a launch key they stand for
    their values exactly. Without options (a zero, either sign, is none: its flag is off
    and the kernels never read it), all 0."""
    if softcap is None and not label_smoothing and not z_loss:
        return _NO_OPTIONS
    return (*float_bits(label_smoothing), *float_bits(softcap or 0.0), *float_bits(z_loss))


def _flags(
    logits: Tensor,
    weight: Optional[Tensor],
    label_smoothing: float,
    softcap: Optional[float],
    z_loss: float,
    probs: bool,
) -> dict:
    """The kernels' constexpr flags."""
    return dict(
        HAS_W=weight is not None,
        SMOOTH=label_smoothing > 0,
        SOFTCAP=softcap is not None,
        Z_LOSS=bool(z_loss),
        PROBS=probs,
        ACC=acc_dtype(logits.dtype),
    )


class Finish(NamedTuple):
    """What the forward's last program needs besides the reduced loss (``finish_rows``): the
    ``reduction``, whether the totals hold sum(w) too (``weight_sum``, class indices: after
    the rows' statistics, the mean's denominator, then sum(w)), and the target check's
    ``flags`` (int32 ``[arrival counter, ok]``, the counter zeroed: ``forward_setup``);
    ``ok`` is ``flags[1]``, which the device-side assert reads."""

    reduction: str
    weight_sum: bool
    flags: Tensor
    ok: Tensor


def forward_setup(reduction: str, loss: Tensor, stats: Tensor, rows: int, weight_sum: bool = False) -> tuple:
    """A forward's ``(last, reduced, row_loss)``: its ``Finish``, the flags the stream's
    arrival counter (set back to 0 by the last program of the forward's launches, between
    which this thread launches nothing else of ours on the stream) and an ``ok`` it writes;
    the loss the last program reduces the rows' losses into (None for ``none``); and where
    the programs write their rows' losses: ``loss`` itself for ``none``, else launch
    scratch of at least ``rows`` (the last program reads them, in the statistics dtype).
    All but the loss are a ``launch_plan``: one lookup."""
    device, dtype = stats.device, stats.dtype

    def make() -> tuple:
        flags = arrival_counter(device, results=1)
        scratch = launch_scratch("cross_entropy row losses", device, rows, dtype)
        return Finish(reduction, weight_sum, flags, flags[1]), scratch

    last, scratch = launch_plan(device, ("cross_entropy_fwd", rows, dtype, reduction, weight_sum), make)
    if reduction == "none":
        return last, None, loss
    return last, loss, scratch


def cross_entropy_rows(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    label_smoothing: float,
    row_loss: Tensor,
    stats: Tensor,
    total_rows: int,
    *,
    row_offset: int = 0,
    probs: bool = False,
    softcap: Optional[float] = None,
    z_loss: float = 0.0,
    last: Optional[Finish] = None,
    loss: Optional[Tensor] = None,
    padded: bool = False,
) -> None:
    """One launch over the rows of ``logits``, rows ``row_offset...`` of the forward's
    ``total_rows`` (of ``target``, ``row_loss``, which may be longer, and each part of
    ``stats``, ``row_stats``): writes each row's
    loss (0 on ignored rows; ``+ z_loss * lse**2`` with a z-loss; of ``softcap *
    tanh(logits / softcap)`` with a softcap) into ``row_loss`` (any float dtype), and the
    row max ``m`` and ``log sum exp(logit - m)``. With ``probs``, ``target`` holds class
    probabilities, and each row's ``sum_c q[c]`` follows in ``stats``. With ``last``, the
    program to finish last of all the forward's rows (over every launch with that
    ``last``) does its work, reducing the rows' losses into ``loss`` (None: no reduction).
    ``padded``: each row of ``logits`` may be read up to its stride (a view of a wider
    buffer, whose last row is whole too)."""
    rows, classes = logits.shape
    if not rows:
        return
    options = _options(label_smoothing, softcap, z_loss)
    row_stride = logits.stride()[0]  # stride() costs half of stride(0) (no argument to parse)
    key = (
        (logits.dtype, target.dtype, dtype_of(weight), row_loss.dtype, stats.dtype, probs, dtype_of(loss),
         row_offset, total_rows, classes, row_stride, ignore_index, options, softcap is not None,
         last is not None and last[:2], padded)  # (reduction, weight_sum)
        if aligned(logits, target, weight)
        else None
    )  # fmt: skip

    def constexprs() -> dict:
        block = row_block(classes, MAX_BLOCK_C)
        warps = min(max(block // 256, 1), 16)
        return dict(
            **_flags(logits, weight, label_smoothing, softcap, z_loss, probs),
            FINISH=last is not None,
            REDUCE=loss is not None,
            MEAN=last is not None and last.reduction == "mean",
            WEIGHT_SUM=last is not None and last.weight_sum,
            BLOCK_C=block,
            FINISH_BLOCK=FINISH_ROWS_PER_WARP * warps,
            # the pipeline copies only 16-byte vectors Triton knows to be aligned and wholly in or
            # out of what it reads of a row: a row stride and a row length (or padded) divisible by 16
            STAGES=FWD_STAGES if classes > block and (padded or classes % 16 == 0) and row_stride % 16 == 0 else 1,
            PADDED=padded,
            num_warps=warps,
        )

    cross_entropy_fwd_kernel.launch(
        (rows,),
        key,
        constexprs,
        logits,
        target,
        weight,
        row_loss,
        stats,
        loss,
        None if last is None else last.flags,
        row_stride,
        row_offset,
        total_rows,
        classes,
        ignore_index,
        *options,
    )


def check_targets(last: Finish, target: Tensor, ignore_index: int, classes: int) -> None:
    """The forward's target check, from ``last.flags``: with no host synchronisation on CUDA."""
    flags = last.flags
    if flags.is_cuda:
        torch._assert_async(
            last.ok, f"cross_entropy: a target is out of bounds for {classes} classes (and is not ignore_index)"
        )
    elif not flags.tolist()[1]:  # one read of the flags, not a view's
        bad = (target != ignore_index) & ((target < 0) | (target >= classes))
        raise IndexError(
            f"target {int(target[bad][0])} is out of bounds for {classes} classes (and is not ignore_index)"
        )


def finish_without_rows(
    last: Finish, loss: Optional[Tensor], totals: Optional[Tensor], weight: Optional[Tensor], classes: int
) -> None:
    """What the last program writes, for a forward with no rows (no programs): the reduced
    ``loss`` (None for ``none``), and ``totals`` (class indices: with no rows, all their
    ``stats``; None for probabilities)."""
    if loss is not None:
        loss.fill_(math.nan if last.reduction == "mean" else 0.0)
    if totals is not None:
        totals.zero_()
        if last.weight_sum:
            totals[1] = classes if weight is None else weight.sum()


def logits_grad(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    stats: Tensor,
    grad_loss: Tensor,
    grad: Tensor,
    *,
    classes: int,
    col_offset: int,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    probs: bool = False,
    target_grad: Optional[Tensor] = None,
    softcap: Optional[float] = None,
    z_loss: float = 0.0,
    row_offset: int = 0,
    total_rows: Optional[int] = None,
    padded: bool = False,
) -> None:
    """Into ``grad`` (which may be ``logits``), ``grad_loss`` (0-d, or one per row, any
    stride; over the mean's denominator for ``mean``) times the gradient of each row's
    loss with respect to ``logits``, columns ``[col_offset, col_offset + width)`` of rows
    of ``classes``, from the forward's ``stats`` (``row_stats``: the rows' ``m`` and ``log
    s``, then the totals for class indices, or with ``probs`` each row's target mass; and
    d/d target into ``target_grad``). The rows of ``logits`` and ``grad`` may be a chunk
    of the forward's ``total_rows`` (default: all of them), starting at ``row_offset`` (of
    ``target``, ``grad_loss``, ``stats``' parts, ``target_grad``). ``padded``: ``grad`` is
    ``logits``, each row of which may be read and written up to its stride (a view of a
    wider buffer, whose last row is whole too)."""
    chunk_rows, width = logits.shape
    if not chunk_rows or not width:
        return
    rows = chunk_rows if total_rows is None else total_rows
    block = row_block(width, GRAD_BLOCK_C)
    grad_stride = grad_loss.stride()[0] if grad_loss.dim() else 0
    x_row_stride, grad_row_stride = logits.stride()[0], grad.stride()[0]
    options = _options(label_smoothing, softcap, z_loss)
    key = (
        (logits.dtype, target.dtype, dtype_of(weight), stats.dtype, probs, grad_loss.dtype, grad_stride,
         grad.dtype, dtype_of(target_grad), x_row_stride, grad_row_stride, row_offset, rows, width, col_offset,
         classes, ignore_index, options, softcap is not None, reduction == "mean", padded)
        if aligned(logits, target, weight, stats, grad_loss)
        else None
    )  # fmt: skip
    cross_entropy_bwd_kernel.launch(
        (chunk_rows, cdiv(width, block)),
        key,
        lambda: dict(
            **_flags(logits, weight, label_smoothing, softcap, z_loss, probs),
            MEAN=reduction == "mean",
            TARGET_GRAD=target_grad is not None,
            BLOCK_C=block,
            PADDED=padded,
            num_warps=min(max(block // 256, 1), 4),
        ),
        logits,
        target,
        weight,
        stats,
        grad_loss,
        grad_stride,
        grad,
        target_grad,
        x_row_stride,
        grad_row_stride,
        row_offset,
        rows,
        width,
        col_offset,
        classes,
        ignore_index,
        *options,
    )


def cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing, reduction, loss_dtype, loss, stats):
    rows, classes = logits.shape
    last, reduced, row_loss = forward_setup(reduction, loss, stats, rows, weight_sum=True)
    if not rows:
        return finish_without_rows(last, reduced, stats, weight, classes)
    cross_entropy_rows(logits, target, weight, ignore_index, label_smoothing, row_loss, stats, rows, last=last,
                       loss=reduced)  # fmt: skip
    check_targets(last, target, ignore_index, classes)


def cross_entropy_bwd(grad_loss, logits, target, weight, stats, ignore_index, label_smoothing, reduction, grad):
    logits_grad(
        logits,
        target,
        weight,
        stats,
        grad_loss,
        grad,
        classes=logits.shape[1],
        col_offset=0,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )


def cross_entropy_probs_fwd(logits, target, weight, label_smoothing, reduction, loss_dtype, loss, stats):
    rows, classes = logits.shape
    if reduction == "none":  # each row's loss is all: no last program
        return cross_entropy_rows(logits, target, weight, -1, label_smoothing, loss, stats, rows, probs=True)
    last, reduced, row_loss = forward_setup(reduction, loss, stats, rows)
    if not rows:
        return finish_without_rows(last, reduced, None, weight, classes)
    cross_entropy_rows(logits, target, weight, -1, label_smoothing, row_loss, stats, rows, probs=True, last=last,
                       loss=reduced)  # fmt: skip


def cross_entropy_probs_bwd(
    grad_loss, logits, target, weight, stats, label_smoothing, reduction, grad_target, grad, target_grad
):
    logits_grad(
        logits,
        target,
        weight,
        stats,
        grad_loss,
        grad,
        classes=logits.shape[1],
        col_offset=0,
        ignore_index=-1,
        label_smoothing=label_smoothing,
        reduction=reduction,
        probs=True,
        target_grad=target_grad if grad_target else None,
    )
