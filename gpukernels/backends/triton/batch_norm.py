"""BatchNorm over an ``(N, C, L)`` view of any strides: statistics per channel
over the ``M = N*L`` elements of axes 0 and 2.

Layouts. Every kernel addresses element ``(n, c, l)`` of each tensor through
that tensor's own strides, so NCHW, channels-last and strided views run
without copies, and ``y``/``dx`` are laid out as ``torch.empty_like(x)``.
The launcher first folds ``n`` and ``l`` into one axis where every tensor
allows it (channels-last input is then a row-major ``(M, C)`` matrix, and so
is 2-D ``(N, C)`` input), then tiles ``(n, l, c)``:
- channel axis the contiguous one (channels-last, 2-D input): a program owns
  a block of up to 64 channels and reads tiles of (rows, channels), so its
  loads are coalesced along C;
- otherwise (NCHW): a program owns one channel and reads tiles of (n, l),
  coalesced along L.
Both tilings are correct for any strides; the choice only decides which
reads are coalesced. Offsets are int32 unless a tensor spans 2**31 elements.
Statistics accumulate in fp32 (fp64 for fp64 input), without atomics.

Forward, training (3 launches, 2 reads of x):
1. ``_stats_kernel``, grid (channel blocks, SPLIT): program ``s`` takes
   tiles ``s, s + SPLIT, ...`` of its channels, computes each tile's mean and
   M2 in registers (two-pass) and merges them into its partial
   (count, mean, M2) with Chan's formula.
2. ``_finalize_fwd_kernel``: merges the SPLIT partials of each channel, writes
   mean and rstd and updates the running stats in place. In eval it instead
   reads mean and rstd off the running stats (then 2 launches in all).
3. ``_normalize_kernel``: ``y = (x - mean) * rstd*w + b``.
SPLIT is chosen to give a few programs per SM over all channel blocks, and
is 1 when a channel is a single tile. The partials are merged in a fixed
order: results do not depend on scheduling.

Backward (at most 2 reads of x and dy): ``_bwd_reduce_kernel`` writes
per-program partial ``sum(dy)`` and ``sum(dy*xhat)`` (and, in eval, dx itself,
which needs no sums); ``_finalize_bwd_kernel`` adds the partials up into
dbias and dweight; in training ``_dx_kernel`` then writes
``dx = w*rstd * (dy - sum(dy)/M - xhat*sum(dy*xhat)/M)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from ._common import acc_dtype, num_programs, round_to, stats_dtype

TILE = 4096          # elements a program reads per step
CHANNEL_BLOCK = 64   # channels per program when C is the contiguous axis
FINALIZE_BLOCK = 1024
MAX_GRID_Y = 65535   # CUDA's limit on grid axis 1
INT32_OFFSETS_BELOW = 2**31  # element offsets up to here are computed in int32 (cheaper than int64)


# ---------------------------------------------------------------- helpers


@triton.jit
def _tile_indices(tile, c_start, N, L, C, l_tiles, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
                  BLOCK_C: tl.constexpr, IDX: tl.constexpr):
    """Broadcastable (n, l, c) indices of tile ``tile`` of the channels from
    ``c_start``, in the offset dtype, and the mask of elements inside the tensor."""
    n = (tile // l_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    l = (tile % l_tiles) * BLOCK_L + tl.arange(0, BLOCK_L)
    c = c_start + tl.arange(0, BLOCK_C)
    mask = (n < N)[:, None, None] & (l < L)[None, :, None] & (c < C)[None, None, :]
    return n.to(IDX)[:, None, None], l.to(IDX)[None, :, None], c.to(IDX)[None, None, :], mask


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
def _per_channel(Ptr, c_start, C, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """A per-channel vector for the program's channels, broadcastable against a tile."""
    c = c_start + tl.arange(0, BLOCK_C)
    return tl.load(Ptr + c, mask=c < C, other=0.0).to(ACC)[None, None, :]


@triton.jit
def _store_per_channel(Ptr, c_start, C, values, BLOCK_C: tl.constexpr):
    c = c_start + tl.arange(0, BLOCK_C)
    tl.store(Ptr + c, round_to(values, Ptr.dtype.element_ty), mask=c < C)


# ---------------------------------------------------------------- forward


@triton.jit
def _stats_kernel(X, Partial, N, L, C, sxn, sxl, sxc, tiles, l_tiles,
                  ACC: tl.constexpr, IDX: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """Partial (count, mean, M2) of this program's tiles, at Partial[k, split, c] for k = 0, 1, 2."""
    c_start = tl.program_id(0) * BLOCK_C
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    count = tl.zeros([BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for tile in range(split, tiles, splits):
        n, l, c, mask = _tile_indices(tile, c_start, N, L, C, l_tiles, BLOCK_N, BLOCK_L, BLOCK_C, IDX)
        x = tl.load(X + n * sxn + l * sxl + c * sxc, mask=mask, other=0.0).to(ACC)
        tile_count = _tile_count(tile, N, L, l_tiles, BLOCK_N, BLOCK_L).to(ACC)
        tile_mean = _channel_sum(x) / tile_count
        centered = tl.where(mask, x - tile_mean[None, None, :], 0.0)
        total = count + tile_count
        delta = tile_mean - mean
        share = tile_count / total
        mean += delta * share
        m2 += _channel_sum(centered * centered) + delta * delta * (count * share)
        count = total
    partial = Partial + split * C
    _store_per_channel(partial, c_start, C, count, BLOCK_C)
    _store_per_channel(partial + splits * C, c_start, C, mean, BLOCK_C)
    _store_per_channel(partial + 2 * splits * C, c_start, C, m2, BLOCK_C)


@triton.jit
def _finalize_fwd_kernel(Partial, splits, M, RunningMean, RunningVar, Mean, Rstd, C,
                         momentum_hi, momentum_lo, eps_hi, eps_lo,
                         TRAINING: tl.constexpr, UPDATE_RUNNING: tl.constexpr, ACC: tl.constexpr,
                         BLOCK: tl.constexpr):
    """Mean and rstd per channel: the merged partials' in training (then the
    running stats are updated), the running stats' in eval."""
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = c < C
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    if TRAINING:
        count_of = Partial
        mean_of = Partial + splits * C
        m2_of = Partial + 2 * splits * C
        m = tl.cast(M, ACC)
        # Two passes over the partials: the count-weighted mean, then M2 about it.
        weighted = tl.zeros([BLOCK], dtype=ACC)
        for s in range(0, splits):
            weighted += tl.load(count_of + s * C + c, mask=mask, other=0.0) * \
                tl.load(mean_of + s * C + c, mask=mask, other=0.0)
        mean = weighted / m
        m2 = tl.zeros([BLOCK], dtype=ACC)
        for s in range(0, splits):
            delta = tl.load(mean_of + s * C + c, mask=mask, other=0.0) - mean
            m2 += tl.load(m2_of + s * C + c, mask=mask, other=0.0) + \
                tl.load(count_of + s * C + c, mask=mask, other=0.0) * delta * delta
        var = m2 / m
        if UPDATE_RUNNING:
            momentum = tl.cast(momentum_hi, ACC) + tl.cast(momentum_lo, ACC)
            running_mean = tl.load(RunningMean + c, mask=mask, other=0.0).to(ACC)
            running_var = tl.load(RunningVar + c, mask=mask, other=0.0).to(ACC)
            unbiased = var * (m / (m - 1.0))
            tl.store(RunningMean + c, (momentum * mean + (1.0 - momentum) * running_mean)
                     .to(RunningMean.dtype.element_ty), mask=mask)
            tl.store(RunningVar + c, (momentum * unbiased + (1.0 - momentum) * running_var)
                     .to(RunningVar.dtype.element_ty), mask=mask)
    else:
        mean = tl.load(RunningMean + c, mask=mask, other=0.0).to(ACC)
        var = tl.load(RunningVar + c, mask=mask, other=1.0).to(ACC)
    tl.store(Mean + c, mean, mask=mask)
    tl.store(Rstd + c, 1.0 / tl.sqrt(var + eps), mask=mask)


@triton.jit
def _normalize_kernel(X, Y, Mean, Rstd, W, B, N, L, C, sxn, sxl, sxc, syn, syl, syc, tiles, l_tiles,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    c_start = tl.program_id(0) * BLOCK_C
    mean = _per_channel(Mean, c_start, C, ACC, BLOCK_C)
    gain = _per_channel(Rstd, c_start, C, ACC, BLOCK_C)
    if HAS_W:
        gain = gain * _per_channel(W, c_start, C, ACC, BLOCK_C)
    if HAS_B:
        shift = _per_channel(B, c_start, C, ACC, BLOCK_C)
    for tile in range(tl.program_id(1), tiles, tl.num_programs(1)):
        n, l, c, mask = _tile_indices(tile, c_start, N, L, C, l_tiles, BLOCK_N, BLOCK_L, BLOCK_C, IDX)
        x = tl.load(X + n * sxn + l * sxl + c * sxc, mask=mask, other=0.0).to(ACC)
        y = (x - mean) * gain
        if HAS_B:
            y += shift
        tl.store(Y + n * syn + l * syl + c * syc, round_to(y, Y.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- backward


@triton.jit
def _bwd_reduce_kernel(X, DY, DX, Mean, Rstd, W, Partial, N, L, C, sxn, sxl, sxc, sdn, sdl, sdc,
                       sgn, sgl, sgc, tiles, l_tiles,
                       TRAINING: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """Partial sum(dy) and sum(dy*(x - mean)) at Partial[k, split, c] for k = 0, 1; in
    eval also dx = dy*w*rstd (strides sgn, sgl, sgc), which needs no sums."""
    c_start = tl.program_id(0) * BLOCK_C
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    mean = _per_channel(Mean, c_start, C, ACC, BLOCK_C)
    if not TRAINING:
        gain = _per_channel(Rstd, c_start, C, ACC, BLOCK_C)
        if HAS_W:
            gain = gain * _per_channel(W, c_start, C, ACC, BLOCK_C)
    # tile-shaped sums, reduced once at the end
    sum_dy = tl.zeros([BLOCK_N, BLOCK_L, BLOCK_C], dtype=ACC)
    sum_dy_xc = tl.zeros([BLOCK_N, BLOCK_L, BLOCK_C], dtype=ACC)
    for tile in range(split, tiles, splits):
        n, l, c, mask = _tile_indices(tile, c_start, N, L, C, l_tiles, BLOCK_N, BLOCK_L, BLOCK_C, IDX)
        dy = tl.load(DY + n * sdn + l * sdl + c * sdc, mask=mask, other=0.0).to(ACC)
        x = tl.load(X + n * sxn + l * sxl + c * sxc, mask=mask, other=0.0).to(ACC)
        sum_dy += dy
        sum_dy_xc += dy * (x - mean)
        if not TRAINING:
            tl.store(DX + n * sgn + l * sgl + c * sgc, round_to(dy * gain, DX.dtype.element_ty), mask=mask)
    partial = Partial + split * C
    _store_per_channel(partial, c_start, C, _channel_sum(sum_dy), BLOCK_C)
    _store_per_channel(partial + splits * C, c_start, C, _channel_sum(sum_dy_xc), BLOCK_C)


@triton.jit
def _finalize_bwd_kernel(Partial, splits, Rstd, C, SumDy, SumDyXhat, ACC: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = c < C
    sum_dy = tl.zeros([BLOCK], dtype=ACC)
    sum_dy_xc = tl.zeros([BLOCK], dtype=ACC)
    for s in range(0, splits):
        sum_dy += tl.load(Partial + s * C + c, mask=mask, other=0.0)
        sum_dy_xc += tl.load(Partial + (splits + s) * C + c, mask=mask, other=0.0)
    tl.store(SumDy + c, sum_dy, mask=mask)
    tl.store(SumDyXhat + c, sum_dy_xc * tl.load(Rstd + c, mask=mask, other=0.0).to(ACC), mask=mask)


@triton.jit
def _dx_kernel(X, DY, DX, Mean, Rstd, W, SumDy, SumDyXhat, M, N, L, C, sxn, sxl, sxc, sdn, sdl, sdc,
               sgn, sgl, sgc, tiles, l_tiles,
               HAS_W: tl.constexpr, ACC: tl.constexpr, IDX: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """Training dx: the batch mean and variance depend on x too, so dy loses
    its mean and its component along xhat."""
    c_start = tl.program_id(0) * BLOCK_C
    m = tl.cast(M, ACC)
    mean = _per_channel(Mean, c_start, C, ACC, BLOCK_C)
    rstd = _per_channel(Rstd, c_start, C, ACC, BLOCK_C)
    gain = rstd * _per_channel(W, c_start, C, ACC, BLOCK_C) if HAS_W else rstd
    mean_dy = _per_channel(SumDy, c_start, C, ACC, BLOCK_C) / m
    # xhat * sum(dy*xhat)/M == (x - mean) * along_xc
    along_xc = _per_channel(SumDyXhat, c_start, C, ACC, BLOCK_C) * rstd / m
    for tile in range(tl.program_id(1), tiles, tl.num_programs(1)):
        n, l, c, mask = _tile_indices(tile, c_start, N, L, C, l_tiles, BLOCK_N, BLOCK_L, BLOCK_C, IDX)
        dy = tl.load(DY + n * sdn + l * sdl + c * sdc, mask=mask, other=0.0).to(ACC)
        x = tl.load(X + n * sxn + l * sxl + c * sxc, mask=mask, other=0.0).to(ACC)
        dx = gain * (dy - mean_dy - (x - mean) * along_xc)
        tl.store(DX + n * sgn + l * sgl + c * sgc, round_to(dx, DX.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- launchers


@dataclass(frozen=True)
class _Tiling:
    """How the kernels walk an (N, C, L) problem: sizes after folding n and l,
    each tensor's (n, l, c) strides, block sizes and grid."""
    n: int
    l: int
    c: int
    strides: tuple[tuple[int, int, int], ...]
    block_n: int
    block_l: int
    block_c: int
    l_tiles: int
    tiles: int            # tiles per channel block
    channel_blocks: int
    offset_dtype: tl.dtype
    num_warps: int

    def args(self, *tensor_indices: int) -> list[int]:
        """N, L, C and the (n, l, c) strides of the tensors at these positions
        in the ``_tiling`` call, as the kernels take them."""
        return [self.n, self.l, self.c] + [s for i in tensor_indices for s in self.strides[i]]

    def walk(self) -> list[int]:
        return [self.tiles, self.l_tiles]

    def meta(self, acc: tl.dtype) -> dict:
        return dict(ACC=acc, IDX=self.offset_dtype, BLOCK_N=self.block_n, BLOCK_L=self.block_l,
                    BLOCK_C=self.block_c, num_warps=self.num_warps)

    def reduction_grid(self, device: torch.device) -> tuple[int, int]:
        """(channel blocks, SPLIT): a few programs per SM in all, at least one tile each."""
        programs = num_programs(device, self.channel_blocks * self.tiles)
        return self.channel_blocks, max(1, min(self.tiles, programs // self.channel_blocks))

    def elementwise_grid(self) -> tuple[int, int]:
        return self.channel_blocks, min(self.tiles, MAX_GRID_Y)


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
    return triton.next_power_of_2(max(size, 1))


def _tiling(x: torch.Tensor, *others: torch.Tensor) -> _Tiling:
    """The tiling for x and the same-shape tensors read or written beside it
    (their strides may differ); x's layout picks which axis is coalesced."""
    return _tiling_of(tuple(x.shape), tuple((t.stride(0), t.stride(2), t.stride(1)) for t in (x, *others)))


@functools.lru_cache(maxsize=256)  # worked out once per shape and layout: host time on every call otherwise
def _tiling_of(shape: tuple[int, int, int], tensor_strides: tuple[tuple[int, int, int], ...]) -> _Tiling:
    n0, c, l0 = shape
    n, l, strides = _fold(n0, l0, list(tensor_strides))
    _, sl, sc = strides[0]
    channels_inner = c > 1 and sc < sl
    block_c = min(_pow2_at_least(c), CHANNEL_BLOCK) if channels_inner else 1
    block_l = min(_pow2_at_least(l), TILE // block_c)
    block_n = min(_pow2_at_least(n), TILE // (block_c * block_l))
    l_tiles = triton.cdiv(l, block_l)
    n_tiles = triton.cdiv(n, block_n)
    channel_blocks = triton.cdiv(c, block_c)
    # masked lanes of edge tiles form offsets too: bound them with the padded sizes
    padded = (n_tiles * block_n, l_tiles * block_l, channel_blocks * block_c)
    span = max(sum((size - 1) * stride for size, stride in zip(padded, s)) for s in strides)
    return _Tiling(n=n, l=l, c=c, strides=tuple(strides), block_n=block_n, block_l=block_l, block_c=block_c,
                   l_tiles=l_tiles, tiles=n_tiles * l_tiles, channel_blocks=channel_blocks,
                   offset_dtype=tl.int32 if span < INT32_OFFSETS_BELOW else tl.int64,
                   num_warps=min(max(block_n * block_l * block_c // 512, 1), 8))


def _fp32_pair(value: float) -> tuple[float, float]:
    """``value`` as hi + lo, each exact in fp32: float kernel arguments arrive
    as fp32, which would round fp64 momentum and eps."""
    hi = float(np.float32(value))
    return hi, float(np.float32(value - hi))


def _channel_grid(channels: int) -> tuple[int]:
    return (triton.cdiv(channels, FINALIZE_BLOCK),)


def batch_norm_fwd(x, weight, bias, running_mean, running_var, training, momentum, eps):
    n, channels, length = x.shape
    stats = stats_dtype(x.dtype)
    acc = acc_dtype(x.dtype)
    y = torch.empty_like(x)
    mean = torch.empty(channels, dtype=stats, device=x.device)
    rstd = torch.empty(channels, dtype=stats, device=x.device)
    if channels == 0:
        return y, mean, rstd
    tiling = _tiling(x, y)
    partial, splits = None, 0
    if training:
        grid = tiling.reduction_grid(x.device) if tiling.tiles else (0, 0)
        splits = grid[1]
        # room for one split even with none: a pointer argument must point somewhere
        partial = torch.empty((3, max(splits, 1), channels), dtype=stats, device=x.device)
        if splits:
            _stats_kernel[grid](x, partial, *tiling.args(0), *tiling.walk(), **tiling.meta(acc))
    _finalize_fwd_kernel[_channel_grid(channels)](
        partial, splits, n * length, running_mean, running_var, mean, rstd, channels,
        *_fp32_pair(momentum), *_fp32_pair(eps),
        TRAINING=training, UPDATE_RUNNING=running_mean is not None, ACC=acc, BLOCK=FINALIZE_BLOCK)
    if tiling.tiles:
        _normalize_kernel[tiling.elementwise_grid()](
            x, y, mean, rstd, weight, bias, *tiling.args(0, 1), *tiling.walk(),
            HAS_W=weight is not None, HAS_B=bias is not None, **tiling.meta(acc))
    return y, mean, rstd


def batch_norm_bwd(dy, x, weight, mean, rstd, training, has_bias):
    n, channels, length = x.shape
    stats = stats_dtype(x.dtype)
    acc = acc_dtype(x.dtype)
    dx = torch.empty_like(x)
    tiling = _tiling(x, dy, dx)
    reduce = channels and tiling.tiles
    new_sums = torch.empty if reduce else torch.zeros  # with nothing to reduce, sums of no terms
    sum_dy = new_sums(channels, dtype=stats, device=x.device)
    sum_dy_xhat = new_sums(channels, dtype=stats, device=x.device)
    if reduce:
        grid = tiling.reduction_grid(x.device)
        partial = torch.empty((2, grid[1], channels), dtype=stats, device=x.device)
        _bwd_reduce_kernel[grid](x, dy, dx, mean, rstd, weight, partial, *tiling.args(0, 1, 2), *tiling.walk(),
                                 TRAINING=training, HAS_W=weight is not None, **tiling.meta(acc))
        _finalize_bwd_kernel[_channel_grid(channels)](partial, grid[1], rstd, channels, sum_dy, sum_dy_xhat,
                                                      ACC=acc, BLOCK=FINALIZE_BLOCK)
        if training:
            _dx_kernel[tiling.elementwise_grid()](
                x, dy, dx, mean, rstd, weight, sum_dy, sum_dy_xhat, n * length, *tiling.args(0, 1, 2),
                *tiling.walk(), HAS_W=weight is not None, **tiling.meta(acc))
    dweight = sum_dy_xhat if weight is not None else x.new_empty(0)
    dbias = sum_dy if has_bias else x.new_empty(0)
    return dx, dweight, dbias
