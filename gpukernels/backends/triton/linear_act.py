"""Linear layer with an activation, ``y = act(x @ weight.T + bias)`` on a
contiguous ``(rows, in)`` matrix, and its backward.

The products go to the vendor library (cuBLAS on CUDA) through ``torch.addmm``
and ``torch.mm``; the kernels here do what the products leave:

- forward: ``z = addmm(bias, x, weight.T, out=...)`` in the input dtype, then
  ``linear_act_fwd_kernel`` writes ``y = act(z)``. Without a saved ``z`` (none,
  relu) the product is written into ``y`` itself, relu applied there in place.
- backward: ``linear_act_bwd_kernel`` writes ``dz = dy * act'(z)``
  (``relu``: 0 where ``y <= 0``, else ``dy``) and, in the same pass, the column sums of
  ``dz`` by tiles of rows, which make ``dbias``; then ``dx = dz @ weight`` and
  ``dweight = dz.T @ x``.

Why not one matmul kernel with the bias and activation in its epilogue: our
Triton matmul with a fused epilogue was measured slower than cuBLAS's product
alone, both ways (the figures are in bench/results/ and the README), and the
pass over ``z`` that fusing saves costs less than that gap.

The activation is applied to ``z`` rounded to the input dtype, as PyTorch's
unfused ``act(F.linear(...))`` applies it, in fp32 (fp64 for fp64 input).
fp32 products use TF32 exactly when ``torch.backends.cuda.matmul.allow_tf32`` asks for it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, aligned, cdiv, dtype_of, round_to, stats_dtype
from ._launch import jit

_SQRT_HALF = tl.constexpr(math.sqrt(0.5))
_INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
_TANH_SCALE = tl.constexpr(math.sqrt(2.0 / math.pi))
_TANH_CUBIC = tl.constexpr(0.044715)
_QUICK_GELU_SCALE = tl.constexpr(1.702)

# ---- activations and their derivatives, in the accumulation dtype ----
# No libdevice (the interpreter has none): tanh(u) = 2*sigmoid(2u) - 1, so
# 1 + tanh(u) = 2*sigmoid(2u) and tanh'(u) = 4*sigmoid(2u)*sigmoid(-2u), both
# free of the cancellation 1 - tanh(u)**2 suffers where tanh(u) ~ 1.
# The constants stand right of a tensor: under the interpreter, constexpr *
# tensor gives a constexpr wrapping the tensor, which tl.exp and friends refuse.


@triton.jit
def _normal_cdf(z):
    return 0.5 * (1.0 + tl.erf(z * _SQRT_HALF))


@triton.jit
def _tanh_argument(z):
    return (z + z * z * z * _TANH_CUBIC) * _TANH_SCALE


@triton.jit
def _activation(z, ACTIVATION: tl.constexpr):
    y = z
    if ACTIVATION == "relu":
        y = tl.where(z < 0, 0.0, z)  # not tl.maximum, which turns nan into 0
    elif ACTIVATION == "gelu":
        y = z * _normal_cdf(z)
    elif ACTIVATION == "gelu_tanh":
        y = z * tl.sigmoid(2.0 * _tanh_argument(z))
    elif ACTIVATION == "silu":
        y = z * tl.sigmoid(z)
    elif ACTIVATION == "quick_gelu":
        y = z * tl.sigmoid(z * _QUICK_GELU_SCALE)
    elif ACTIVATION == "relu_squared":
        r = tl.where(z < 0, 0.0, z)
        y = r * r
    return y


@triton.jit
def _activation_grad(z, ACTIVATION: tl.constexpr):
    """act'(z) for the activations that keep z."""
    if ACTIVATION == "gelu":
        grad = _normal_cdf(z) + z * _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    elif ACTIVATION == "gelu_tanh":
        two_u = 2.0 * _tanh_argument(z)
        s = tl.sigmoid(two_u)
        grad = s + 2.0 * z * s * tl.sigmoid(-two_u) * (1.0 + z * z * (3.0 * _TANH_CUBIC)) * _TANH_SCALE
    elif ACTIVATION == "silu":  # sigmoid(-z), not 1 - sigmoid(z), which cancels for large z
        grad = tl.sigmoid(z) * (1.0 + z * tl.sigmoid(-z))
    elif ACTIVATION == "quick_gelu":  # silu's, of a z: a z sigmoid(a z) / a
        az = z * _QUICK_GELU_SCALE
        grad = tl.sigmoid(az) * (1.0 + az * tl.sigmoid(-az))
    return grad


@triton.jit
def _pre_activation_grad(dy, saved, ACTIVATION: tl.constexpr, ACC: tl.constexpr):
    """dz = dy * act'(z) in ACC; ``saved`` is y for relu (y > 0 exactly where z > 0), z otherwise.
    relu's passes dy where not ``saved <= 0``, as PyTorch's threshold_backward: a nan's too;
    relu_squared's is 0 there too whatever dy (PyTorch's relu backward after square's)."""
    dy = dy.to(ACC)
    if ACTIVATION == "relu":
        dz = tl.where(saved <= 0, 0.0, dy)
    elif ACTIVATION == "relu_squared":
        z = saved.to(ACC)
        dz = tl.where(z <= 0, 0.0, dy * (2.0 * z))
    elif ACTIVATION == "none":
        dz = dy
    else:
        dz = dy * _activation_grad(saved.to(ACC), ACTIVATION)
    return dz


# ---- the kernels ----

BLOCK = 1024
# Tile of the backward pass: BLOCK_ROWS rows give one row of column sums
BLOCK_ROWS, BLOCK_COLS = 32, 128


@jit
def linear_act_fwd_kernel(Z, Y, n, ACTIVATION: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    z = tl.load(Z + offsets, mask=mask, other=0.0).to(ACC)
    tl.store(Y + offsets, round_to(_activation(z, ACTIVATION), Y.dtype.element_ty), mask=mask)


@jit
def linear_act_bwd_kernel(
    DY,
    Saved,
    DZ,
    BiasPartial,
    M,
    N,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """DZ = dy * act'(saved) on a (BLOCK_ROWS, BLOCK_COLS) tile, and the tile's column
    sums of dz (unrounded, fp32) into row ``program_id(0)`` of BiasPartial."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
    dy = tl.load(DY + offsets, mask=mask, other=0.0)
    saved = tl.load(Saved + offsets, mask=mask, other=0.0)
    dz = tl.where(mask, _pre_activation_grad(dy, saved, ACTIVATION, ACC), 0.0)
    tl.store(DZ + offsets, round_to(dz, DZ.dtype.element_ty), mask=mask)
    if HAS_BIAS:
        tl.store(BiasPartial + tl.program_id(0).to(tl.int64) * N + cols, tl.sum(dz, axis=0), mask=cols < N)


def linear_act_fwd(x, weight, bias, activation, y, z):
    # relu's backward reads y (held by autograd anyway) and none's reads nothing: their
    # product goes straight into y, where relu is applied in place
    product = y if activation in ("none", "relu") else z
    if bias is None:
        torch.mm(x, weight.t(), out=product)
    else:
        torch.addmm(bias, x, weight.t(), out=product)
    n = product.numel()
    if activation != "none" and n:
        # both pointers are this op's outputs: aligned (aligned() is False only while tracing)
        key = (product.dtype, y.dtype, activation, n) if aligned() else None
        linear_act_fwd_kernel.launch(
            (cdiv(n, BLOCK),),
            key,
            lambda: dict(ACTIVATION=activation, ACC=acc_dtype(y.dtype), BLOCK=BLOCK, num_warps=4),
            product,
            y,
            n,
        )


def _dz_and_dbias(dy: torch.Tensor, saved: torch.Tensor, activation: str, dbias: torch.Tensor | None) -> torch.Tensor:
    """dz; and into ``dbias``, when given, its column sums (fp32, fp64 for fp64, then rounded)."""
    m, n = dy.shape
    acc = stats_dtype(dy.dtype)
    if activation == "none":
        if dbias is not None:
            dbias.copy_(dy.sum(0, dtype=acc))
        return dy
    dz = torch.empty_like(dy)
    tiles = cdiv(m, BLOCK_ROWS)
    partial = torch.empty(tiles, n, dtype=acc, device=dy.device) if dbias is not None else None
    if dy.numel():
        key = (dy.dtype, saved.dtype, dz.dtype, dtype_of(partial), activation, m, n) if aligned(dy, saved) else None
        linear_act_bwd_kernel.launch(
            (tiles, cdiv(n, BLOCK_COLS)),
            key,
            lambda: dict(
                ACTIVATION=activation,
                HAS_BIAS=dbias is not None,
                ACC=acc_dtype(dy.dtype),
                BLOCK_ROWS=BLOCK_ROWS,
                BLOCK_COLS=BLOCK_COLS,
                num_warps=4,
            ),
            dy,
            saved,
            dz,
            partial,
            m,
            n,
        )
    if dbias is not None:
        dbias.copy_(partial.sum(0))
    return dz


def linear_act_bwd(dy, x, weight, saved, activation, has_bias, dx, dweight, dbias):
    dz = _dz_and_dbias(dy, saved, activation, dbias if has_bias else None)
    torch.mm(dz, weight, out=dx)
    torch.mm(dz.t(), x, out=dweight)
