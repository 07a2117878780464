"""BatchNorm over an ``(N, C, *)`` tensor whose dims after C make one axis ``L``
(``ncl_strides``), read as ``(N, C, L)``, of any strides: statistics per
channel over the ``M = N*L`` elements of axes 0 and 2.

Layouts. Every kernel addresses element ``(n, c, l)`` of each tensor through
that tensor's own strides, so NCHW, channels-last and strided views run
without copies, and ``y``/``dx`` are laid out as ``torch.empty_like(x)``.
The launcher first folds ``n`` and ``l`` into one axis where every tensor
allows it (channels-last input is then a row-major ``(M, C)`` matrix, its rows
the n axis and L = 1, and so is 2-D ``(N, C)`` input), then tiles ``(n, l, c)``:
- channel axis the contiguous one (channels-last, 2-D input): a program owns
  a block of up to 64 channels and reads tiles of (rows, channels), so its
  loads are coalesced along C;
- otherwise (NCHW): a program owns one channel and reads tiles of (n, l),
  coalesced along L; where L and every tensor's n and c strides are multiples
  of 8, 4 or 2 (``VEC``: 14x14 = 196 is a multiple of 4), the offsets are
  written so that the compiler sees runs of that many, and loads and stores
  them as vectors (Triton's specialisation of the strides sees multiples of 16
  only: 196 would otherwise be read one element at a time).
Both tilings are correct for any strides; the choice only decides which
reads are coalesced. Offsets are int32 unless a tensor spans 2**31 elements.
Statistics accumulate in fp32 (fp64 for fp64 input), without atomics.

Forward (2 launches in training, 1 in eval; 2 reads of x in training):
1. ``batch_norm_stats_kernel``, grid (channel blocks, SPLIT): program ``s`` takes
   tiles ``s, s + SPLIT, ...`` of its channels and adds up, in tile-shaped
   registers, each element's difference from a shift (its channel's mean over
   one of its tiles: ``_tiles_moments``) and its square, the next tile loading
   meanwhile; it reduces them across the tile once, into its partial (count,
   mean, M2). Training only.
2. ``batch_norm_normalize_kernel``: each program first merges the SPLIT
   partials of its channels (a block of splits at a time, ``PARTIALS_TILE``),
   in split order, into the batch mean and rstd (in
   eval: reads them off the running stats); the first program of each channel
   block writes them out and updates the running stats; then every program
   writes ``y = act(z)``, ``z = (x - mean) * rstd*w + b`` (plus a residual, read
   beside x) for its tiles.
Backward (2 launches, at most 2 reads of x and dy), for ``dz = dy * act'(z)`` with
z recomputed from x (a residual's sum is not: ops/batch_norm.py reads relu's mask
off the output first):
``batch_norm_bwd_reduce_kernel`` writes per-program partial ``sum(dy)`` and
``sum(dy*(x - mean))`` (and, in eval, dx itself, which needs no sums); in
training ``batch_norm_dx_kernel`` adds up the partials of its channels and
writes ``dx = w*rstd * (dy - sum(dy)/M - xhat*sum(dy*xhat)/M)``, its first
program per channel block dweight and dbias; in eval
``batch_norm_param_grads_kernel`` adds them up into dweight and dbias.

Every program of the elementwise kernels reads all SPLIT partials of its
channels, so SPLIT and those kernels' grids are chosen together: a few
programs per SM, and few enough partials that reading them is a small part of
a program's traffic (``PARTIAL_SHARE``). Partials are merged and added in a
fixed order, by every program the same way: results do not depend on
scheduling, and there are no atomics.

One split (``SPLIT == 1``: a channel block's data is a few tiles, or there are
channel blocks enough to fill the GPU with one program each): training's
forward and backward are one launch each. ``batch_norm_normalize_kernel``
(``OWN_STATS``) and ``batch_norm_dx_kernel`` (``OWN_SUMS``) run a program per
channel block that first reduces all its tiles, as the reduction kernel's one
program would, and then writes them: no partials, no second launch, and the
second read of a small channel block's data comes from cache.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from ..._numerics import ncl_strides
from ._common import (
    PROGRAMS_PER_SM,
    acc_dtype,
    aligned,
    as_float,
    cdiv,
    dtype_of,
    fitting_per_sm,
    float_bits,
    launch_scratch,
    next_power_of_2,
    num_programs,
    round_to,
)
from ._launch import jit
from .linear_act import _activation, _pre_activation_grad

TILE = 4096  # elements a program reads per step
CHANNEL_BLOCK = 64  # channels per program when C is the contiguous axis
PARAM_GRADS_BLOCK = 1024
PARTIALS_TILE = 1024  # partials (splits x channels) a program merging them reads at once
MAX_GRID_Y = 65535  # CUDA's limit on grid axis 1
# An elementwise program reads at most 1/PARTIAL_SHARE as many partials as it reads elements of x.
PARTIAL_SHARE = 8
INT32_OFFSETS_BELOW = 2**31  # element offsets up to here are computed in int32 (cheaper than int64)


# ---------------------------------------------------------------- helpers


@triton.jit
def _tile_indices(
    tile,
    c_start,
    N,
    L,
    C,
    l_tiles,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
    IDX: tl.constexpr,
    VEC: tl.constexpr,
):
    """Broadcastable (n, l, c) indices of tile ``tile`` of the channels from
    ``c_start``, in the offset dtype, and the mask of elements inside the tensor
    (with ``VEC``, constant over runs of VEC along l: see ``_offsets``)."""
    if VEC > 1:
        L = L // VEC * VEC  # L itself, in a form the compiler knows is a multiple of VEC
    n = (tile // l_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    l = (tile % l_tiles) * BLOCK_L + tl.arange(0, BLOCK_L)
    c = c_start + tl.arange(0, BLOCK_C)
    mask = (n < N)[:, None, None] & (l < L)[None, :, None] & (c < C)[None, None, :]
    return n.to(IDX)[:, None, None], l.to(IDX)[None, :, None], c.to(IDX)[None, None, :], mask


@triton.jit
def _offsets(n, l, c, sn, sl, sc, VEC: tl.constexpr):
    """``n*sn + l*sl + c*sc``. ``VEC`` > 1 says that l is every tensor's contiguous axis
    (``sl == 1``) and that L and the n and c strides are multiples of VEC: the offsets then
    come in aligned runs of VEC along l, in a form the compiler sees, so that it loads
    and stores them as vectors."""
    if VEC > 1:
        return n * (sn // VEC * VEC) + l + c * (sc // VEC * VEC)
    return n * sn + l * sl + c * sc


@triton.jit
def _load_tile(
    X,
    tile,
    c_start,
    N,
    L,
    C,
    sn,
    sl,
    sc,
    l_tiles,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
    IDX: tl.constexpr,
    VEC: tl.constexpr,
):
    """Tile ``tile`` of ``X`` (strides sn, sl, sc), in X's dtype: 0 outside the tensor, all 0
    past the last tile (whose rows start at N or beyond)."""
    n, l, c, mask = _tile_indices(tile, c_start, N, L, C, l_tiles, BLOCK_N, BLOCK_L, BLOCK_C, IDX, VEC)
    return tl.load(X + _offsets(n, l, c, sn, sl, sc, VEC), mask=mask, other=0.0)


@triton.jit
def _tile_count(tile, N, L, l_tiles, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    """Elements per channel in tile ``tile`` (fewer than a full tile at the edges)."""
    rows = tl.minimum(N - (tile // l_tiles) * BLOCK_N, BLOCK_N)
    cols = tl.minimum(L - (tile % l_tiles) * BLOCK_L, BLOCK_L)
    return rows * cols


@triton.jit
def _channel_sum(t):
    """(BLOCK_N, BLOCK_L, BLOCK_C) -> (BLOCK_C,)"""
    return tl.sum(tl.sum(t, axis=1), axis=0)


@triton.jit
def _channel_vector(Ptr, c_start, C, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """The program's channels of a per-channel vector."""
    c = c_start + tl.arange(0, BLOCK_C)
    return tl.load(Ptr + c, mask=c < C, other=0.0).to(ACC)


@triton.jit
def _per_channel(Ptr, c_start, C, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """A per-channel vector for the program's channels, broadcastable against a tile."""
    return _channel_vector(Ptr, c_start, C, ACC, BLOCK_C)[None, None, :]


@triton.jit
def _store_per_channel(Ptr, c_start, C, values, BLOCK_C: tl.constexpr):
    c = c_start + tl.arange(0, BLOCK_C)
    tl.store(Ptr + c, round_to(values, Ptr.dtype.element_ty), mask=c < C)


@triton.jit
def _partials_block(Ptr, start, splits, c, C, ACC: tl.constexpr, SPLIT_BLOCK: tl.constexpr):
    """Rows ``start, ..., start + SPLIT_BLOCK - 1`` of a (splits, C) array of partials at the
    program's channels ``c``, all loaded at once (a row a step would wait on a load per
    split): 0 past the splits and past C."""
    s = start + tl.arange(0, SPLIT_BLOCK)
    mask = (s < splits)[:, None] & (c < C)[None, :]
    return tl.load(Ptr + s[:, None] * C + c[None, :], mask=mask, other=0.0).to(ACC)


@triton.jit
def _split_sums(
    Partial, splits, c_start, C, ACC: tl.constexpr, BLOCK_C: tl.constexpr, SPLIT_BLOCK: tl.constexpr
):  # fmt: skip
    """The (2, splits, C) partials summed over the splits: (sum of [0], sum of [1]), read
    SPLIT_BLOCK splits at a time and added in the same order by every program."""
    first = tl.zeros([BLOCK_C], dtype=ACC)
    second = tl.zeros([BLOCK_C], dtype=ACC)
    c = c_start + tl.arange(0, BLOCK_C)
    for start in range(0, splits, SPLIT_BLOCK):
        first += tl.sum(_partials_block(Partial, start, splits, c, C, ACC, SPLIT_BLOCK), axis=0)
        second += tl.sum(_partials_block(Partial + splits * C, start, splits, c, C, ACC, SPLIT_BLOCK), axis=0)
    return first, second


# ---------------------------------------------------------------- forward


@triton.jit
def _tiles_moments(
    X,
    N,
    L,
    C,
    sxn,
    sxl,
    sxc,
    c_start,
    first,
    tiles,
    step,
    l_tiles,
    ACC: tl.constexpr,
    IDX: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
    VEC: tl.constexpr,
):
    """(count, mean, M2) per channel of tiles ``first, first + step, ...`` of the channels
    from ``c_start``. The loop adds each element's ``d = x - shift`` and ``d*d`` into
    tile-shaped sums, reduced once at the end (a merge tile by tile reduced each tile
    twice, with barriers between, and kept the GPU's memory a fifth busy); ``shift`` is
    each channel's mean over one of the tiles, so that ``M2 = sum(d*d) - sum(d)**2 / count``
    cancels little: a tile holding ``shift_count`` of the ``count`` values has a mean at
    most ``sqrt(count / shift_count)`` standard deviations from theirs (the variance
    between it and the rest is part of theirs), and the subtraction loses at most
    ``log2(1 + count / shift_count)`` bits. The tile is the first, or the second where the
    first is a row's last columns (NCHW rows longer than a tile; maybe one column)."""
    next_x = _load_tile(X, first, c_start, N, L, C, sxn, sxl, sxc, l_tiles, BLOCK_N, BLOCK_L, BLOCK_C, IDX, VEC)
    shift_tile = first
    shift_x = next_x
    if (l_tiles > 1) & (first % l_tiles == l_tiles - 1) & (first + step < tiles):
        # the first tile is a row's last columns, maybe one: the shift from the next
        shift_tile = first + step
        shift_x = _load_tile(X, shift_tile, c_start, N, L, C, sxn, sxl, sxc, l_tiles, BLOCK_N, BLOCK_L, BLOCK_C, IDX,
                             VEC)  # fmt: skip
    shift_count = _tile_count(shift_tile, N, L, l_tiles, BLOCK_N, BLOCK_L).to(ACC)
    shift = _channel_sum(shift_x.to(ACC)) / tl.maximum(shift_count, 1.0)
    count = tl.zeros([], dtype=ACC)
    sum_d = tl.zeros([BLOCK_N, BLOCK_L, BLOCK_C], dtype=ACC)
    sum_d2 = tl.zeros([BLOCK_N, BLOCK_L, BLOCK_C], dtype=ACC)
    # Each step loads the next tile before adding this one: two tiles in flight per program.
    for tile in range(first, tiles, step):
        n, l, _, _ = _tile_indices(tile, c_start, N, L, C, l_tiles, BLOCK_N, BLOCK_L, BLOCK_C, IDX, VEC)
        x = next_x.to(ACC)
        next_x = _load_tile(
            X, tile + step, c_start, N, L, C, sxn, sxl, sxc, l_tiles, BLOCK_N, BLOCK_L, BLOCK_C, IDX, VEC
        )
        # elements outside the tensor add 0; channels past C add anything (never stored)
        d = tl.where((n < N) & (l < L), x - shift[None, None, :], 0.0)
        sum_d += d
        sum_d2 += d * d
        count += _tile_count(tile, N, L, l_tiles, BLOCK_N, BLOCK_L).to(ACC)
    total_d = _channel_sum(sum_d)
    mean_d = total_d / tl.maximum(count, 1.0)
    # clamped at 0 against rounding; a nan (a nan or inf in x) kept, as PyTorch's variance keeps it
    m2 = tl.maximum(_channel_sum(sum_d2) - total_d * mean_d, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return count, shift + mean_d, m2


@jit
def batch_norm_stats_kernel(
    X,
    Partial,
    N,
    L,
    C,
    sxn,
    sxl,
    sxc,
    tiles,
    l_tiles,
    ACC: tl.constexpr,
    IDX: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
    VEC: tl.constexpr,
):
    """This program's partial (count, mean, M2): the count, the same for every
    channel, at Partial[split], mean and M2 at Partial[splits + (k * splits + split) * C + c]
    for k = 0, 1 (see ``_merged_moments``)."""
    c_start = tl.program_id(0) * BLOCK_C
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    count, mean, m2 = _tiles_moments(
        X, N, L, C, sxn, sxl, sxc, c_start, split, tiles, splits, l_tiles, ACC, IDX, BLOCK_N, BLOCK_L, BLOCK_C, VEC
    )
    if tl.program_id(0) == 0:
        tl.store(Partial + split, count)
    moments = Partial + splits
    _store_per_channel(moments + split * C, c_start, C, mean, BLOCK_C)
    _store_per_channel(moments + (splits + split) * C, c_start, C, m2, BLOCK_C)


@triton.jit
def _merged_moments(
    Partial, splits, M, c_start, C, ACC: tl.constexpr, BLOCK_C: tl.constexpr, SPLIT_BLOCK: tl.constexpr
):  # fmt: skip
    """Mean and biased variance per channel: the splits' partials merged in split order,
    SPLIT_BLOCK at a time (their loads all in flight at once; see ``_split_sums``), each
    block's (count, mean, M2) worked out in two passes over it and merged into the running
    ones with Chan's formula (nan for M == 0, as a mean of nothing)."""
    count = tl.zeros([], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    moments = Partial + splits
    c = c_start + tl.arange(0, BLOCK_C)
    for start in range(0, splits, SPLIT_BLOCK):
        s = start + tl.arange(0, SPLIT_BLOCK)
        split_count = tl.load(Partial + s, mask=s < splits, other=0.0).to(ACC)
        split_mean = _partials_block(moments, start, splits, c, C, ACC, SPLIT_BLOCK)
        split_m2 = _partials_block(moments + splits * C, start, splits, c, C, ACC, SPLIT_BLOCK)
        block_count = tl.sum(split_count, axis=0)  # > 0: every split of the block holds a tile or more
        block_mean = tl.sum(split_count[:, None] * split_mean, axis=0) / block_count
        centered = split_mean - block_mean[None, :]
        block_m2 = tl.sum(split_m2 + split_count[:, None] * centered * centered, axis=0)
        total = count + block_count
        delta = block_mean - mean
        share = block_count / total
        mean += delta * share
        m2 += block_m2 + delta * delta * (count * share)
        count = total
    m = tl.cast(M, ACC)
    return tl.where(m > 0, mean, float("nan")), m2 / m


@jit(float_options=["momentum_hi", "momentum_lo", "eps_hi", "eps_lo"])
def batch_norm_normalize_kernel(
    X,
    Y,
    R,
    Partial,
    splits,
    RunningMean,
    RunningVar,
    Stats,
    W,
    B,
    M,
    N,
    L,
    C,
    sxn,
    sxl,
    sxc,
    syn,
    syl,
    syc,
    srn,
    srl,
    src,
    tiles,
    l_tiles,
    momentum_hi,
    momentum_lo,
    eps_hi,
    eps_lo,
    TRAINING: tl.constexpr,
    OWN_STATS: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,
    ACC: tl.constexpr,
    IDX: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
    VEC: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
):
    """y = act(z) (with ``HAS_RESIDUAL``: act(z rounded + r)) for this program's tiles, z
    normalised with the batch's statistics (in training, merged from the partials, or
    with ``OWN_STATS`` worked out from the program's own tiles: all of its channels')
    or the running stats' (in eval). The first program of each channel block writes them into Stats (the mean, then
    rstd, of each channel) and, in training, updates the running stats, which no
    other program reads then."""
    c_start = tl.program_id(0) * BLOCK_C
    first = tl.program_id(1) == 0
    eps = as_float(eps_hi, eps_lo, ACC)
    if TRAINING:
        if OWN_STATS:
            _, mean, m2 = _tiles_moments(
                X, N, L, C, sxn, sxl, sxc, c_start, 0, tiles, 1, l_tiles, ACC, IDX, BLOCK_N, BLOCK_L, BLOCK_C, VEC
            )
            var = m2 / tl.cast(M, ACC)
        else:
            mean, var = _merged_moments(Partial, splits, M, c_start, C, ACC, BLOCK_C, SPLIT_BLOCK)
        if UPDATE_RUNNING:
            if first:
                momentum = as_float(momentum_hi, momentum_lo, ACC)
                m = tl.cast(M, ACC)
                running_mean = _channel_vector(RunningMean, c_start, C, ACC, BLOCK_C)
                running_var = _channel_vector(RunningVar, c_start, C, ACC, BLOCK_C)
                _store_per_channel(RunningMean, c_start, C, momentum * mean + (1.0 - momentum) * running_mean, BLOCK_C)
                _store_per_channel(
                    RunningVar, c_start, C, momentum * (var * (m / (m - 1.0))) + (1.0 - momentum) * running_var, BLOCK_C
                )
    else:
        mean = _channel_vector(RunningMean, c_start, C, ACC, BLOCK_C)
        var = _channel_vector(RunningVar, c_start, C, ACC, BLOCK_C)
    rstd = 1.0 / tl.sqrt(var + eps)
    if first:
        _store_per_channel(Stats, c_start, C, mean, BLOCK_C)
        _store_per_channel(Stats + C, c_start, C, rstd, BLOCK_C)
    gain = rstd * _channel_vector(W, c_start, C, ACC, BLOCK_C) if HAS_W else rstd
    if HAS_B:
        shift = _per_channel(B, c_start, C, ACC, BLOCK_C)
    # Each step loads the next tile (and residual tile) before writing this one: two in flight.
    step = tl.num_programs(1)
    next_x = _load_tile(X, tl.program_id(1), c_start, N, L, C, sxn, sxl, sxc, l_tiles, BLOCK_N, BLOCK_L, BLOCK_C,
                        IDX, VEC)  # fmt: skip
    next_r = next_x  # unread without a residual
    if HAS_RESIDUAL:
        next_r = _load_tile(R, tl.program_id(1), c_start, N, L, C, srn, srl, src, l_tiles, BLOCK_N, BLOCK_L,
                            BLOCK_C, IDX, VEC)  # fmt: skip
    for tile in range(tl.program_id(1), tiles, step):
        n, l, c, mask = _tile_indices(tile, c_start, N, L, C, l_tiles, BLOCK_N, BLOCK_L, BLOCK_C, IDX, VEC)
        x = next_x.to(ACC)
        next_x = _load_tile(X, tile + step, c_start, N, L, C, sxn, sxl, sxc, l_tiles, BLOCK_N, BLOCK_L, BLOCK_C,
                            IDX, VEC)  # fmt: skip
        y = (x - mean[None, None, :]) * gain[None, None, :]
        if HAS_B:
            y += shift
        if HAS_RESIDUAL:  # z rounded, then the sum (rounded below), as PyTorch's x += shortcut after the norm
            r = next_r.to(ACC)
            next_r = _load_tile(R, tile + step, c_start, N, L, C, srn, srl, src, l_tiles, BLOCK_N, BLOCK_L,
                                BLOCK_C, IDX, VEC)  # fmt: skip
            y = round_to(y, Y.dtype.element_ty).to(ACC) + r
        if ACTIVATION != "none":  # on z rounded to y's dtype, as an activation after the norm reads it
            y = _activation(round_to(y, Y.dtype.element_ty).to(ACC), ACTIVATION)
        tl.store(Y + _offsets(n, l, c, syn, syl, syc, VEC), round_to(y, Y.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- backward


@triton.jit
def _normalized_grad(dy, x, mean, z_gain, z_shift, Z_DTYPE: tl.constexpr, ACTIVATION: tl.constexpr, ACC: tl.constexpr):
    """dz = dy * act'(z), the gradient of the forward's output before its activation:
    z = (x - mean) * z_gain + z_shift worked out as the forward did, rounded to x's
    dtype as the forward rounded it (``z_shift`` is 0.0 without a bias: a product
    plus 0.0 is that product, fused or not)."""
    if ACTIVATION == "none":
        return dy
    z = round_to((x - mean) * z_gain + z_shift, Z_DTYPE).to(ACC)
    return _pre_activation_grad(dy, z, ACTIVATION, ACC)


@triton.jit
def _activation_params(Stats, W, B, c_start, C, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_C: tl.constexpr):  # fmt: skip
    """(z_gain, z_shift) per channel, broadcastable against a tile: rstd * weight and
    the bias (0.0 without one), what the forward made its output of."""
    z_gain = _channel_vector(Stats + C, c_start, C, ACC, BLOCK_C)
    if HAS_W:
        z_gain = z_gain * _channel_vector(W, c_start, C, ACC, BLOCK_C)
    z_shift = _per_channel(B, c_start, C, ACC, BLOCK_C) if HAS_B else 0.0
    return z_gain[None, None, :], z_shift


@triton.jit
def _tiles_grad_sums(
    X,
    DY,
    DX,
    Mean,
    gain,
    z_gain,
    z_shift,
    N,
    L,
    C,
    sxn,
    sxl,
    sxc,
    sdn,
    sdl,
    sdc,
    sgn,
    sgl,
    sgc,
    c_start,
    first,
    tiles,
    step,
    l_tiles,
    STORE_DX: tl.constexpr,
    ACTIVATION: tl.constexpr,
    ACC: tl.constexpr,
    IDX: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
    VEC: tl.constexpr,
):
    """sum(dz) and sum(dz*(x - mean)) per channel over tiles ``first, first + step, ...``
    of the channels from ``c_start``, dz = dy * act'(z) (``_normalized_grad``); with
    ``STORE_DX`` (eval, where dx needs no sums) also dx = dz*gain (strides sgn, sgl, sgc)."""
    mean = _per_channel(Mean, c_start, C, ACC, BLOCK_C)
    # tile-shaped sums, reduced once at the end
    sum_dy = tl.zeros([BLOCK_N, BLOCK_L, BLOCK_C], dtype=ACC)
    sum_dy_xc = tl.zeros([BLOCK_N, BLOCK_L, BLOCK_C], dtype=ACC)
    for tile in range(first, tiles, step):
        n, l, c, mask = _tile_indices(tile, c_start, N, L, C, l_tiles, BLOCK_N, BLOCK_L, BLOCK_C, IDX, VEC)
        dy = tl.load(DY + _offsets(n, l, c, sdn, sdl, sdc, VEC), mask=mask, other=0.0).to(ACC)
        x = tl.load(X + _offsets(n, l, c, sxn, sxl, sxc, VEC), mask=mask, other=0.0).to(ACC)
        dy = _normalized_grad(dy, x, mean, z_gain, z_shift, X.dtype.element_ty, ACTIVATION, ACC)
        sum_dy += dy
        sum_dy_xc += dy * (x - mean)
        if STORE_DX:
            tl.store(DX + _offsets(n, l, c, sgn, sgl, sgc, VEC), round_to(dy * gain, DX.dtype.element_ty), mask=mask)
    return _channel_sum(sum_dy), _channel_sum(sum_dy_xc)


@jit
def batch_norm_bwd_reduce_kernel(
    X,
    DY,
    DX,
    Stats,
    W,
    B,
    Partial,
    N,
    L,
    C,
    sxn,
    sxl,
    sxc,
    sdn,
    sdl,
    sdc,
    sgn,
    sgl,
    sgc,
    tiles,
    l_tiles,
    TRAINING: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACTIVATION: tl.constexpr,
    ACC: tl.constexpr,
    IDX: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
    VEC: tl.constexpr,
):
    """Partial sum(dz) and sum(dz*(x - mean)) at Partial[k, split, c] for k = 0, 1; in
    eval also dx = dz*w*rstd (strides sgn, sgl, sgc), which needs no sums."""
    c_start = tl.program_id(0) * BLOCK_C
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    z_gain, z_shift = 1.0, 0.0  # unread without an activation
    if ACTIVATION != "none":
        z_gain, z_shift = _activation_params(Stats, W, B, c_start, C, HAS_W, HAS_B, ACC, BLOCK_C)
    if TRAINING:
        gain = 1.0  # unread: training's dx needs the sums (batch_norm_dx_kernel)
    else:
        gain = _per_channel(Stats + C, c_start, C, ACC, BLOCK_C)
        if HAS_W:
            gain = gain * _per_channel(W, c_start, C, ACC, BLOCK_C)
    # fmt: off
    sum_dy, sum_dy_xc = _tiles_grad_sums(
        X, DY, DX, Stats, gain, z_gain, z_shift, N, L, C, sxn, sxl, sxc, sdn, sdl, sdc, sgn, sgl, sgc, c_start, split,
        tiles, splits, l_tiles, not TRAINING, ACTIVATION, ACC, IDX, BLOCK_N, BLOCK_L, BLOCK_C, VEC,
    )
    # fmt: on
    partial = Partial + split * C
    _store_per_channel(partial, c_start, C, sum_dy, BLOCK_C)
    _store_per_channel(partial + splits * C, c_start, C, sum_dy_xc, BLOCK_C)


@triton.jit
def _store_param_grads(
    DW, DB, rstd, sum_dy, sum_dy_xc, c_start, C, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_C: tl.constexpr
):
    """dweight = sum(dy*xhat) = sum(dy*(x - mean))*rstd and dbias = sum(dy), in their dtype."""
    if HAS_W:
        _store_per_channel(DW, c_start, C, sum_dy_xc * rstd, BLOCK_C)
    if HAS_B:
        _store_per_channel(DB, c_start, C, sum_dy, BLOCK_C)


@jit
def batch_norm_param_grads_kernel(
    Partial,
    splits,
    Stats,
    DW,
    DB,
    C,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
):
    """Eval: dweight and dbias from the partials (dx needs no sums then)."""
    c_start = tl.program_id(0) * BLOCK
    sum_dy, sum_dy_xc = _split_sums(Partial, splits, c_start, C, ACC, BLOCK, SPLIT_BLOCK)
    rstd = _channel_vector(Stats + C, c_start, C, ACC, BLOCK)
    _store_param_grads(DW, DB, rstd, sum_dy, sum_dy_xc, c_start, C, HAS_W, HAS_B, BLOCK)


@jit
def batch_norm_dx_kernel(
    X,
    DY,
    DX,
    Stats,
    W,
    B,
    Partial,
    splits,
    DW,
    DB,
    M,
    N,
    L,
    C,
    sxn,
    sxl,
    sxc,
    sdn,
    sdl,
    sdc,
    sgn,
    sgl,
    sgc,
    tiles,
    l_tiles,
    OWN_SUMS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACTIVATION: tl.constexpr,
    ACC: tl.constexpr,
    IDX: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
    VEC: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
):
    """Training dx: the batch mean and variance depend on x too, so dy loses
    its mean and its component along xhat. Each program adds up the partial
    sums of its channels (with ``OWN_SUMS`` works them out from its own tiles:
    all of its channels'); the first of each channel block writes dweight and dbias."""
    c_start = tl.program_id(0) * BLOCK_C
    m = tl.cast(M, ACC)
    z_gain, z_shift = 1.0, 0.0  # unread without an activation
    if ACTIVATION != "none":
        z_gain, z_shift = _activation_params(Stats, W, B, c_start, C, HAS_W, HAS_B, ACC, BLOCK_C)
    if OWN_SUMS:
        # fmt: off
        sum_dy, sum_dy_xc = _tiles_grad_sums(
            X, DY, DX, Stats, 1.0, z_gain, z_shift, N, L, C, sxn, sxl, sxc, sdn, sdl, sdc, sgn, sgl, sgc, c_start, 0,
            tiles, 1, l_tiles, False, ACTIVATION, ACC, IDX, BLOCK_N, BLOCK_L, BLOCK_C, VEC,
        )
        # fmt: on
    else:
        sum_dy, sum_dy_xc = _split_sums(Partial, splits, c_start, C, ACC, BLOCK_C, SPLIT_BLOCK)
    mean = _per_channel(Stats, c_start, C, ACC, BLOCK_C)
    rstd = _channel_vector(Stats + C, c_start, C, ACC, BLOCK_C)
    if tl.program_id(1) == 0:
        _store_param_grads(DW, DB, rstd, sum_dy, sum_dy_xc, c_start, C, HAS_W, HAS_B, BLOCK_C)
    gain = rstd * _channel_vector(W, c_start, C, ACC, BLOCK_C) if HAS_W else rstd
    mean_dy = (sum_dy / m)[None, None, :]
    # xhat * sum(dy*xhat)/M == (x - mean) * along_xc
    along_xc = (sum_dy_xc * rstd * rstd / m)[None, None, :]
    for tile in range(tl.program_id(1), tiles, tl.num_programs(1)):
        n, l, c, mask = _tile_indices(tile, c_start, N, L, C, l_tiles, BLOCK_N, BLOCK_L, BLOCK_C, IDX, VEC)
        dy = tl.load(DY + _offsets(n, l, c, sdn, sdl, sdc, VEC), mask=mask, other=0.0).to(ACC)
        x = tl.load(X + _offsets(n, l, c, sxn, sxl, sxc, VEC), mask=mask, other=0.0).to(ACC)
        dz = _normalized_grad(dy, x, mean, z_gain, z_shift, X.dtype.element_ty, ACTIVATION, ACC)
        dx = gain[None, None, :] * (dz - mean_dy - (x - mean) * along_xc)
        tl.store(DX + _offsets(n, l, c, sgn, sgl, sgc, VEC), round_to(dx, DX.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- launchers


@dataclass(frozen=True, eq=False)
class _Tiling:
    """How the kernels walk an (N, C, L) problem: sizes after folding n and l,
    each tensor's (n, l, c) strides, block sizes and grids. Equal and hashed by
    identity (one per shape, layout and device: ``_tiling_of``), so that it can
    stand in a launch key for everything it decides, at no cost."""

    n: int
    l: int
    c: int
    strides: tuple[tuple[int, int, int], ...]
    block_n: int
    block_l: int
    block_c: int
    l_tiles: int
    tiles: int  # tiles per channel block
    channel_blocks: int
    splits: int  # reduction programs per channel block, each writing a partial
    programs: int  # elementwise programs per channel block
    offset_dtype: tl.dtype
    num_warps: int
    vec: int  # the kernels' VEC (``_offsets``): 1, or the runs of l every tensor's offsets come in
    device: torch.device
    # Made from the above, once (a property would cost host time on every launch):
    m: int = field(init=False)  # elements per channel
    one_split: bool = field(init=False)
    """Whether one reduction program per channel block takes all its tiles (a few tiles,
    or channel blocks enough to fill the GPU): then the training kernels that would
    read that program's partials reduce the tiles themselves, one launch instead of
    two, on ``own_grid``."""
    split_block: int = field(init=False)
    """Splits whose partials a program reads at once (``_merged_moments``, ``_split_sums``)."""
    reduction_grid: tuple[int, int] = field(init=False)
    elementwise_grid: tuple[int, int] = field(init=False)
    own_grid: tuple[int, int] = field(init=False)
    """A program per channel block, reducing its tiles and then writing them."""

    def args(self, tensors: int) -> tuple[int, ...]:
        """N, L, C and the (n, l, c) strides of the first ``tensors`` tensors of the
        ``_tiling`` call, as the kernels take them, then ``tiles`` and ``l_tiles``."""
        return self._args[tensors]

    def meta(self, dtype: torch.dtype) -> dict:
        """The kernels' block constexprs and launch options, with ``ACC`` for ``dtype``."""
        return self._metas[acc_dtype(dtype)]

    def __post_init__(self):
        # what each launch passes, made once: building them costs host time on every call
        flat = [s for strides in self.strides for s in strides]
        args = {t: (self.n, self.l, self.c, *flat[: 3 * t], self.tiles, self.l_tiles) for t in (1, 2, 3)}
        blocks = dict(
            IDX=self.offset_dtype, BLOCK_N=self.block_n, BLOCK_L=self.block_l, BLOCK_C=self.block_c, VEC=self.vec
        )
        metas = {acc: dict(ACC=acc, **blocks, num_warps=self.num_warps) for acc in (tl.float32, tl.float64)}
        object.__setattr__(self, "_args", args)
        object.__setattr__(self, "_metas", metas)
        object.__setattr__(self, "m", self.n * self.l)
        object.__setattr__(self, "one_split", self.splits == 1 and self.tiles > 0)
        object.__setattr__(self, "split_block", _split_block(self.splits, self.block_c))
        object.__setattr__(self, "reduction_grid", (self.channel_blocks, self.splits))
        object.__setattr__(self, "elementwise_grid", (self.channel_blocks, self.programs))
        object.__setattr__(self, "own_grid", (self.channel_blocks, 1))


def _split_block(splits: int, block_c: int) -> int:
    """The splits whose partials a program of ``block_c`` channels reads at once: all of
    them, up to PARTIALS_TILE partials."""
    return min(next_power_of_2(splits), max(1, PARTIALS_TILE // block_c))


def _fold(n: int, l: int, strides: list[tuple[int, int, int]]) -> tuple[int, int, list[tuple[int, int, int]]]:
    """(n, l) folded into one axis of n*l when every tensor steps through them
    as one; the sizes and (n, l, c) strides that result."""
    if l == 1:
        return 1, n, [(0, sn, sc) for sn, _, sc in strides]
    if n == 1 or all(sn == l * sl for sn, sl, _ in strides):
        return 1, n * l, [(0, sl, sc) for _, sl, sc in strides]
    return n, l, strides


def _pow2_at_least(size: int) -> int:
    """A block's length for ``size`` elements (1 for none: a block is never empty)."""
    return next_power_of_2(size)


def _tiling(x: torch.Tensor, *others: torch.Tensor, per_sm: int = PROGRAMS_PER_SM) -> _Tiling:
    """The tiling for x, (N, C, *), and the same-shape tensors read or written beside
    it (their strides may differ); x's layout picks which axis is coalesced. Its
    reduction grid has ``per_sm`` programs an SM in all (``_fitted``)."""
    return _tiling_of(x.shape, tuple(map(torch.Tensor.stride, (x, *others))), x.device, per_sm)


_fitted_tilings: dict = {}


def _fitted(tiling: _Tiling, kernel, key: tuple, constexprs, tensors: tuple, args) -> _Tiling:
    """``tiling``, or the tiling of ``tensors`` (as given to ``_tiling``) with fewer
    reduction programs an SM where an SM holds fewer of ``kernel``'s, launched with
    ``constexprs()`` and ``args()`` (``key`` standing for them with the tiling); kept per
    tiling and key, a dict lookup on later calls (host time)."""
    fitted_key = (tiling, *key)
    fitted = _fitted_tilings.get(fitted_key)
    if fitted is None:
        per_sm = fitting_per_sm(tiling.device, PROGRAMS_PER_SM, kernel, fitted_key, constexprs, *args())
        fitted = tiling if per_sm == PROGRAMS_PER_SM else _tiling(*tensors, per_sm=per_sm)
        if len(_fitted_tilings) >= 256:  # as many as _tiling_of keeps
            _fitted_tilings.clear()
        _fitted_tilings[fitted_key] = fitted
    return fitted


@functools.lru_cache(maxsize=256)  # worked out once per shape, layout and device: host time on every call otherwise
def _tiling_of(
    shape: tuple[int, ...], tensor_strides: tuple[tuple[int, ...], ...], device: torch.device, per_sm: int
) -> _Tiling:
    n0, c, l0 = shape[0], shape[1], math.prod(shape[2:])
    ncl = [ncl_strides(shape, strides) for strides in tensor_strides]
    if None in ncl:
        raise ValueError(f"batch_norm kernels: the dims after C of a tensor of shape {tuple(shape)} make no one axis")
    n, l, strides = _fold(n0, l0, [(sn, sl, sc) for sn, sc, sl in ncl])
    _, sl, sc = strides[0]
    channels_inner = c > 1 and sc < sl
    if channels_inner and n == 1:
        # the folded rows as n, with L = 1: a tile's (n, l) block is then the tile itself,
        # where a runtime l_tiles would cost every tile an integer division (L == 1 and
        # l_tiles == 1 are constants to the JIT)
        n, l, strides = l, 1, [(s_l, 0, s_c) for _, s_l, s_c in strides]
    block_c = min(_pow2_at_least(c), CHANNEL_BLOCK) if channels_inner else 1
    block_l = min(_pow2_at_least(l), TILE // block_c)
    block_n = min(_pow2_at_least(n), TILE // (block_c * block_l))
    l_tiles = cdiv(l, block_l)
    n_tiles = cdiv(n, block_n)
    tiles = n_tiles * l_tiles
    channel_blocks = cdiv(c, block_c)
    # Reduction programs (splits per channel block): a few per SM in all, at
    # least a tile each, and at most `balanced`, with which as many elementwise
    # programs as splits keep to their share of partial reads. Elementwise
    # programs: each takes tiles enough that the splits * block_c partials it
    # reads are at most 1/PARTIAL_SHARE of its elements (splits <= balanced
    # leaves at least one such program).
    balanced = math.isqrt(tiles * TILE // (PARTIAL_SHARE * block_c))
    splits = max(1, min(tiles, num_programs(device, channel_blocks * tiles, per_sm) // channel_blocks, balanced))
    tiles_per_program = cdiv(splits * block_c * PARTIAL_SHARE, TILE)
    # l contiguous in every tensor (NCHW): runs of the largest power of two, up to 16 bytes of
    # bf16, that L and every n and c stride are multiples of, for vector loads and stores
    vec = 1
    if not channels_inner and all(s_l == 1 for _, s_l, _ in strides):
        multiples = (l, *(s for s_n, _, s_c in strides for s in (s_n, s_c)))
        vec = next((v for v in (8, 4, 2) if all(m % v == 0 for m in multiples)), 1)
    # masked lanes of edge tiles form offsets too: bound them with the padded sizes
    padded = (n_tiles * block_n, l_tiles * block_l, channel_blocks * block_c)
    span = max(sum((size - 1) * stride for size, stride in zip(padded, s)) for s in strides)
    return _Tiling(
        n=n,
        l=l,
        c=c,
        strides=tuple(strides),
        block_n=block_n,
        block_l=block_l,
        block_c=block_c,
        l_tiles=l_tiles,
        tiles=tiles,
        channel_blocks=channel_blocks,
        splits=splits,
        programs=max(1, min(tiles // tiles_per_program, MAX_GRID_Y)),
        offset_dtype=tl.int32 if span < INT32_OFFSETS_BELOW else tl.int64,
        num_warps=min(max(block_n * block_l * block_c // 512, 1), 8),
        vec=vec,
        device=device,
    )


def batch_norm_fwd(x, weight, bias, running_mean, running_var, residual, training, momentum, eps, activation, y, stats):
    channels = x.shape[1]
    if channels == 0:
        return
    tensors = (x, y, y if residual is None else residual)  # y again: the kernel's residual strides, unread
    tiling = _tiling(*tensors)
    if training and not tiling.one_split:
        tiling = _fitted(
            tiling, batch_norm_stats_kernel, (x.dtype, stats.dtype), lambda: tiling.meta(x.dtype), tensors,
            lambda: (x, stats.dtype, *tiling.args(1)),
        )  # fmt: skip
    own_stats = training and tiling.one_split
    partial, splits = None, 0
    if training and not own_stats:
        splits = tiling.splits if tiling.tiles else 0
        # the count of each split, then its mean and M2 per channel (room for one split even with none)
        partial = launch_scratch(
            "batch_norm_stats partials", tiling.device, max(splits, 1) * (1 + 2 * channels), stats.dtype
        )
        if splits:
            batch_norm_stats_kernel.launch(
                tiling.reduction_grid,
                (tiling, x.dtype, partial.dtype) if aligned(x) else None,
                lambda: tiling.meta(x.dtype),
                x,
                partial,
                *tiling.args(1),
            )
    params = (running_mean, running_var, stats, weight, bias)
    batch_norm_normalize_kernel.launch(
        tiling.own_grid if own_stats else tiling.elementwise_grid,
        (tiling, x.dtype, y.dtype, training, splits, activation, dtype_of(residual), *map(dtype_of, params))
        if aligned(x, running_mean, running_var, weight, bias, residual)
        else None,
        lambda: dict(
            TRAINING=training,
            OWN_STATS=own_stats,
            UPDATE_RUNNING=running_mean is not None,
            HAS_W=weight is not None,
            HAS_B=bias is not None,
            HAS_RESIDUAL=residual is not None,
            ACTIVATION=activation,
            SPLIT_BLOCK=tiling.split_block,
            **tiling.meta(x.dtype),
        ),
        x,
        y,
        residual,
        partial,
        splits,
        *params,
        tiling.m,
        *tiling.args(3),
        *float_bits(momentum),
        *float_bits(eps),
    )


def _reduce_constexprs(tiling: _Tiling, x, weight, bias, training: bool, activation: str) -> dict:
    """The backward's reduction kernel's constexprs and launch options."""
    return dict(
        TRAINING=training,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        ACTIVATION=activation,
        **tiling.meta(x.dtype),
    )


def batch_norm_bwd(dy, x, weight, bias, stats, training, activation, dx, dweight, dbias):
    channels = x.shape[1]
    if x.numel() == 0:  # dx is empty; dweight and dbias are sums of no terms
        dweight.zero_()
        dbias.zero_()
        return
    tiling = _tiling(x, dy, dx)
    if not (training and tiling.one_split):
        variant = (x.dtype, dy.dtype, dx.dtype, stats.dtype, dtype_of(weight), dtype_of(bias), training, activation)
        tiling = _fitted(
            tiling, batch_norm_bwd_reduce_kernel, variant,
            lambda: _reduce_constexprs(tiling, x, weight, bias, training, activation),
            (x, dy, dx), lambda: (x, dy, dx, stats, weight, bias, stats.dtype, *tiling.args(3)),
        )  # fmt: skip
    own_sums = training and tiling.one_split
    # (2, splits, channels): every split's sums of dy and dy * xhat
    partial = (
        None
        if own_sums
        else launch_scratch("batch_norm_bwd partials", tiling.device, 2 * tiling.splits * channels, stats.dtype)
    )
    # one alignment check for the tensors every launch here is given
    dtypes = (
        (tiling, x.dtype, dy.dtype, dx.dtype, stats.dtype, dtype_of(weight), dtype_of(bias), training, activation)
        if aligned(x, dy, stats, weight, bias)
        else None
    )
    if not own_sums:
        batch_norm_bwd_reduce_kernel.launch(
            tiling.reduction_grid,
            dtypes,
            lambda: _reduce_constexprs(tiling, x, weight, bias, training, activation),
            x,
            dy,
            dx,
            stats,
            weight,
            bias,
            partial,
            *tiling.args(3),
        )
    has_bias = bias is not None
    grads_key = None if dtypes is None else (*dtypes, dweight.dtype, dbias.dtype)
    if training:
        batch_norm_dx_kernel.launch(
            tiling.own_grid if own_sums else tiling.elementwise_grid,
            grads_key,
            lambda: dict(
                OWN_SUMS=own_sums,
                HAS_W=weight is not None,
                HAS_B=has_bias,
                ACTIVATION=activation,
                SPLIT_BLOCK=tiling.split_block,
                **tiling.meta(x.dtype),
            ),
            x,
            dy,
            dx,
            stats,
            weight,
            bias,
            partial,
            tiling.splits,
            dweight,
            dbias,
            tiling.m,
            *tiling.args(3),
        )
    elif weight is not None or has_bias:
        batch_norm_param_grads_kernel.launch(
            (cdiv(channels, PARAM_GRADS_BLOCK),),
            grads_key,
            lambda: dict(
                HAS_W=weight is not None,
                HAS_B=has_bias,
                ACC=acc_dtype(x.dtype),
                BLOCK=PARAM_GRADS_BLOCK,
                SPLIT_BLOCK=_split_block(tiling.splits, PARAM_GRADS_BLOCK),
            ),
            partial,
            tiling.splits,
            stats,
            dweight,
            dbias,
            channels,
        )
