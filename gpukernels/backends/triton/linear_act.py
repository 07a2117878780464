"""Linear layer with a fused activation, ``y = act(x @ weight.T + bias)`` on a
contiguous ``(rows, in)`` matrix, and its backward.

One tiled matmul kernel computes all three products. It sees its operands as
logical matrices ``A (M, K)``, ``B (K, N)``, ``C (M, N)`` given by strides, so
``weight.T`` and ``dz.T`` are read in place, never copied:

- forward: ``A = x``, ``B = weight.T``; the epilogue adds the bias, stores
  ``z`` when the backward needs it and applies the activation.
- ``dx = dz @ weight``: ``A = dz``, ``B = weight``.
- ``dweight = dz.T @ x``: ``A = dz.T``, ``B = x``; every program also sums its
  rows of ``A`` over K, and those of the first column of tiles store the sums:
  that is ``dbias = dz.sum(0)``, with no pass of its own.

Where the backward's ``dz = dy * act'(z)`` comes from:
- ``none``: ``dz = dy``, read as it is.
- ``relu``: formed in the matmul's prologue, ``where(y > 0, dy, 0)`` on each
  ``A`` tile as it loads: a compare per element, no pass of its own.
- ``gelu``, ``gelu_tanh``, ``silu``: one elementwise kernel writes ``dz`` in the
  input dtype (as PyTorch's activation backward does). A prologue would
  evaluate ``act'`` (erf or exp, ~30 instructions) for every tile column of
  the product, ``in / BLOCK_N`` times per element of ``dz`` for ``dx``; on an
  H100 that CUDA-core arithmetic outweighs the tensor-core time of the tile,
  while the extra pass (read ``dy`` and ``z``, write ``dz``) costs a few per
  cent of the two matmuls (an estimate by instruction and byte counts, not yet
  measured).

Accumulation is in fp32 (fp64 for fp64 input). fp32 products use true fp32
(``input_precision="ieee"``), as PyTorch does, unless
``torch.backends.cuda.matmul.allow_tf32`` asks for TF32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import INTERPRETING, acc_dtype, round_to

_SQRT_HALF = tl.constexpr(math.sqrt(0.5))
_INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
_TANH_SCALE = tl.constexpr(math.sqrt(2.0 / math.pi))
_TANH_CUBIC = tl.constexpr(0.044715)

_TL_DTYPES = {torch.float64: tl.float64, torch.float32: tl.float32, torch.float16: tl.float16,
              torch.bfloat16: tl.bfloat16}


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
    return grad


@triton.jit
def _pre_activation_grad(dy, saved, ACTIVATION: tl.constexpr, ACC: tl.constexpr):
    """dz = dy * act'(z) in ACC; ``saved`` is y for relu (y > 0 exactly where z > 0), z otherwise."""
    dy = dy.to(ACC)
    if ACTIVATION == "relu":
        dz = tl.where(saved > 0, dy, 0.0)
    elif ACTIVATION == "none":
        dz = dy
    else:
        dz = dy * _activation_grad(saved.to(ACC), ACTIVATION)
    return dz


# ---- the matmul ----

def gpu_configs() -> list[triton.Config]:
    """Tile shapes for Hopper, largest first; the last is the small-problem tile."""
    shapes = [  # BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps
        (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4),
        (64, 256, 64, 4, 4), (64, 128, 64, 4, 4),
        (64, 64, 32, 4, 4),  # fp32 (ieee: CUDA cores) and fp64 (DMMA): the larger ones overflow shared memory
    ]
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8), num_stages=s, num_warps=w)
            for m, n, k, s, w in shapes]


def _configs() -> list[triton.Config]:
    """Autotuned per problem on a GPU; one fixed shape when interpreting (several
    configs need a GPU to benchmark them), small groups so that small test
    matrices already span several."""
    if INTERPRETING:
        return [triton.Config(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=2))]
    return gpu_configs()


SHARED_MEMORY_BYTES = 200 << 10  # of the H100's 227 KiB per block, with room for the epilogue


def fitting_configs(configs: list[triton.Config], named_args: dict, **_) -> list[triton.Config]:
    """The configs whose pipelined A and B tiles fit in shared memory for these operands'
    dtype: for fp32 and fp64 most do not, and compiling them only to fail costs seconds."""
    itemsize = named_args["A"].element_size()
    fitting = [c for c in configs
               if (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * itemsize * c.num_stages
               <= SHARED_MEMORY_BYTES]
    return fitting or configs[-1:]


# Below this many multiply-adds a matmul takes microseconds: timing every tile
# shape would cost far more than the best one saves, so the last (smallest)
# runs untuned.
AUTOTUNE_MIN_MACS = 1 << 27
SMALL_PROBLEM_CONFIG = gpu_configs()[-1]


@triton.jit
def _tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row, column) of program ``pid``'s tile, in groups of GROUP_M tile rows
    swept column by column, so consecutive programs share B tiles in L2."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.maximum(tl.cdiv(N, BLOCK_N), 1)  # N == 0 still has a column: the dbias sums
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m


@triton.autotune(configs=_configs(), key=["M", "N", "K", "stride_ak", "stride_bk", "PROLOGUE", "ACTIVATION",
                                          "HAS_BIAS", "ROW_SUM"],  # the strides: which operands are transposed
                 prune_configs_by={"early_config_prune": fitting_configs})
@triton.jit
def linear_kernel(A, Saved, B, C, Z, Bias, RowSum, M, N, K,
                  stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                  PROLOGUE: tl.constexpr, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr,
                  SAVE_Z: tl.constexpr, ROW_SUM: tl.constexpr, ACC: tl.constexpr, DOT_DTYPE: tl.constexpr,
                  PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr):
    """C = act(A' @ B + Bias), A' = _pre_activation_grad(A, Saved, PROLOGUE)
    (Saved strided as A); Z = A' @ B + Bias when SAVE_Z; RowSum = A'.sum(1)
    when ROW_SUM."""
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_in, col_in = rows < M, cols < N
    # int64: rows * stride and cols * stride can pass 2**31 on large matrices
    a_offsets = rows.to(tl.int64)[:, None] * stride_am + ks[None, :] * stride_ak
    b_offsets = ks[:, None] * stride_bk + cols.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    row_sum = tl.zeros((BLOCK_M,), dtype=ACC)
    for k_start in range(0, K, BLOCK_K):
        k_in = ks < K - k_start
        a_mask = row_in[:, None] & k_in[None, :]
        a = tl.load(A + a_offsets, mask=a_mask, other=0.0)
        if PROLOGUE != "none":
            a = _pre_activation_grad(a, tl.load(Saved + a_offsets, mask=a_mask, other=0.0), PROLOGUE, ACC)
        a = a.to(DOT_DTYPE)
        if ROW_SUM:
            row_sum += tl.sum(a.to(ACC), axis=1)
        b = tl.load(B + b_offsets, mask=k_in[:, None] & col_in[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
        a_offsets += BLOCK_K * stride_ak
        b_offsets += BLOCK_K * stride_bk
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=col_in, other=0.0).to(ACC)[None, :]
    c_offsets = rows.to(tl.int64)[:, None] * stride_cm + cols[None, :] * stride_cn
    c_mask = row_in[:, None] & col_in[None, :]
    if SAVE_Z:
        tl.store(Z + c_offsets, round_to(acc, Z.dtype.element_ty), mask=c_mask)
    tl.store(C + c_offsets, round_to(_activation(acc, ACTIVATION), C.dtype.element_ty), mask=c_mask)
    if ROW_SUM:
        if pid_n == 0:
            tl.store(RowSum + rows, round_to(row_sum, RowSum.dtype.element_ty), mask=row_in)


def _dot_dtype(dtype: torch.dtype) -> tl.dtype:
    # The interpreter's tl.dot multiplies bf16's raw bits: give it fp32 (exact for bf16 values).
    return tl.float32 if INTERPRETING and dtype == torch.bfloat16 else _TL_DTYPES[dtype]


def _precision(dtype: torch.dtype) -> str:
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, activation: str = "none",
            bias: torch.Tensor | None = None, z: torch.Tensor | None = None, prologue: str = "none",
            saved: torch.Tensor | None = None, row_sum: torch.Tensor | None = None) -> None:
    """``c = act(a' @ b + bias)`` with ``a' = dz(a, saved)`` for ``prologue``
    (``saved`` strided as ``a``), ``z`` (strided as ``c``) the pre-activation,
    ``row_sum = a'.sum(1)``. ``a``, ``b`` may be any strided views."""
    (M, K), N = a.shape, c.shape[1]
    if M == 0 or (N == 0 and row_sum is None):
        return

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * max(triton.cdiv(N, meta["BLOCK_N"]), 1),)

    args = (a, saved, b, c, z, bias, row_sum, M, N, K, *a.stride(), *b.stride(), *c.stride())
    options = dict(PROLOGUE=prologue, ACTIVATION=activation, HAS_BIAS=bias is not None, SAVE_Z=z is not None,
                   ROW_SUM=row_sum is not None, ACC=acc_dtype(c.dtype), DOT_DTYPE=_dot_dtype(c.dtype),
                   PRECISION=_precision(c.dtype))
    if INTERPRETING or M * N * K >= AUTOTUNE_MIN_MACS:
        linear_kernel[grid](*args, **options)
    else:
        linear_kernel.fn[grid](*args, **options, **SMALL_PROBLEM_CONFIG.all_kwargs())


# ---- dz for the activations whose derivative is costly ----

ELEMENTWISE_BLOCK = 1024


@triton.jit
def pre_activation_grad_kernel(DY, Z, DZ, n, ACTIVATION: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    dy = tl.load(DY + offsets, mask=mask, other=0.0)
    z = tl.load(Z + offsets, mask=mask, other=0.0)
    tl.store(DZ + offsets, round_to(_pre_activation_grad(dy, z, ACTIVATION, ACC), DZ.dtype.element_ty), mask=mask)


def _pre_activation_grad_tensor(dy: torch.Tensor, z: torch.Tensor, activation: str) -> torch.Tensor:
    dz = torch.empty_like(dy)
    n = dy.numel()
    if n:
        pre_activation_grad_kernel[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](
            dy, z, dz, n, ACTIVATION=activation, ACC=acc_dtype(dy.dtype), BLOCK=ELEMENTWISE_BLOCK)
    return dz


# ---- the kernels the op calls ----

_KEEPS_PRE_ACTIVATION = ("gelu", "gelu_tanh", "silu")  # the op's contract: the forward saves z for these
_FORMED_IN_PROLOGUE = ("none", "relu")  # dz = dy, or dy where y > 0: cheaper per tile than a pass of its own


def linear_act_fwd(x, weight, bias, activation):
    y = x.new_empty(x.shape[0], weight.shape[0])
    z = torch.empty_like(y) if activation in _KEEPS_PRE_ACTIVATION else None
    _matmul(x, weight.t(), y, activation=activation, bias=bias, z=z)
    return y, z if z is not None else x.new_empty(0)


def linear_act_bwd(dy, x, weight, saved, activation, has_bias):
    if activation in _FORMED_IN_PROLOGUE:  # the matmuls read dy (and y for relu) and form dz per tile
        a, prologue, a_saved = dy, activation, saved if activation == "relu" else None
    else:
        a, prologue, a_saved = _pre_activation_grad_tensor(dy, saved, activation), "none", None
    dx = torch.empty_like(x)
    dweight = torch.empty_like(weight)
    dbias = x.new_empty(weight.shape[0]) if has_bias else None
    _matmul(a, weight, dx, prologue=prologue, saved=a_saved)
    _matmul(a.t(), x, dweight, prologue=prologue, saved=None if a_saved is None else a_saved.t(), row_sum=dbias)
    return dx, dweight, dbias if has_bias else x.new_empty(0)
