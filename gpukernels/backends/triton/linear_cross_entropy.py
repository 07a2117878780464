"""The fused linear + cross-entropy's two passes (their loops are
``gpukernels.ops.linear_cross_entropy``'s).

Logits always come from a torch matmul (cuBLAS on CUDA) in the input dtype, so
they round exactly as ``F.linear``'s do.

- ``linear_cross_entropy_rows`` (forward, a chunk of rows): the logits, then the
  row kernel of ``cross_entropy.py`` for each row's loss and the statistics of
  its logsumexp, ``m`` and ``log s``.
- ``linear_cross_entropy_slice`` (backward, a slice of the vocabulary over all
  rows): the logits again, ``logits_grad_kernel`` writing their gradient over
  them from the saved statistics, then ``dweight[slice] = g.T @ x`` and
  ``dbias[slice]`` in the input dtype and ``dx += g @ weight[slice]`` into an
  fp32 accumulator (fp64 for fp64). For bf16/fp16 that accumulation uses
  ``torch.addmm(..., out_dtype=torch.float32)`` in place where this build has
  it (CUDA builds that accept an fp32 addend); otherwise the slice's gradient
  and weight are widened to fp32 first, a copy bounded by the slice.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import acc_dtype, round_to, row_block
from .cross_entropy import apply_softcap, softcap_slope, cross_entropy_rows

# Columns per program of the gradient kernel: a 2-D grid of (rows, column blocks)
# fills the GPU however the slice is shaped.
MAX_BLOCK_C = 1024


@triton.jit
def logits_grad_kernel(X, T, RowMax, LogSum, GradScale, Smoothing, Softcap, ZLoss, Grad, width, col_offset, C,
                       ignore_index, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr, Z_LOSS: tl.constexpr,
                       ROW_SCALE: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """``Grad[row, cols] = scale_row * d loss_row / d X[row, cols]`` for columns
    ``col_offset + cols`` of rows of ``C`` logits, from the row's ``m`` and ``log s``."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < width
    t = tl.load(T + row)
    scale = tl.load(GradScale + row).to(ACC) if ROW_SCALE else tl.load(GradScale).to(ACC)
    scale = tl.where(t != ignore_index, scale, 0.0)
    m = tl.load(RowMax + row)
    log_s = tl.load(LogSum + row)
    raw = tl.load(X + row * width + cols, mask=mask, other=0.0).to(ACC)
    cap = tl.load(Softcap).to(ACC) if SOFTCAP else 1.0
    x = apply_softcap(raw, cap) if SOFTCAP else raw
    p = tl.exp(x - m - log_s)
    e = tl.load(Smoothing).to(ACC) if SMOOTH else 0.0
    # a (p - onehot) + b (C p - 1): each term exactly 0 where p is the one-hot (C == 1)
    g = scale * (1.0 - e) * (p - tl.where(cols + col_offset == t, 1.0, 0.0))
    if SMOOTH:
        g += scale * (e / C) * (C * p - 1.0)
    if Z_LOSS:
        g += scale * 2.0 * tl.load(ZLoss).to(ACC) * (m + log_s) * p
    if SOFTCAP:
        g *= softcap_slope(raw, cap)
    tl.store(Grad + row * width + cols, round_to(g, Grad.dtype.element_ty), mask=mask)


def _logits(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return x @ weight.T if bias is None else torch.addmm(bias, x, weight.T)


@functools.cache
def _has_mixed_addmm(device: torch.device) -> bool:
    """Whether ``acc += a @ b`` runs in place here with bf16 ``a``, ``b`` and an fp32 ``acc``."""
    if device.type != "cuda":
        return False
    acc = torch.ones(1, 1, device=device)
    one = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
    try:
        torch.addmm(acc, one, one, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return acc.item() == 2.0  # the product added to acc, not written over it


def _accumulate_product(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` with ``acc`` in fp32/fp64 and ``a``, ``b`` in the input dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif _has_mixed_addmm(acc.device):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def linear_cross_entropy_rows(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, *,
                              ignore_index: int, label_smoothing: float, z_loss: float, softcap: Optional[float],
                              loss: Tensor, row_max: Tensor, log_sum: Tensor) -> None:
    """The NumPy kernel's contract."""
    cross_entropy_rows(_logits(x, weight, bias), target, None, ignore_index, label_smoothing, loss,
                       stats=(row_max, log_sum), softcap=softcap, z_loss=z_loss)


def linear_cross_entropy_slice(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, row_max: Tensor,
                               log_sum: Tensor, grad_scale: Tensor, *, vocab: int, col_offset: int,
                               ignore_index: int, label_smoothing: float, z_loss: float, softcap: Optional[float],
                               dx: Optional[Tensor], dweight: Optional[Tensor], dbias: Optional[Tensor]) -> None:
    """The NumPy kernel's contract."""
    grad = _logits(x, weight, bias)
    rows, width = grad.shape
    acc = row_max.dtype

    def scalar(value: float) -> Tensor:  # a device tensor: a kernel's float arguments are fp32
        return torch.full((), value, dtype=acc, device=x.device)

    if rows:
        block = row_block(width, MAX_BLOCK_C)
        logits_grad_kernel[(rows, triton.cdiv(width, block))](
            grad, target, row_max, log_sum, grad_scale,
            scalar(label_smoothing) if label_smoothing > 0 else None,
            scalar(softcap) if softcap is not None else None,
            scalar(z_loss) if z_loss else None,
            grad, width, col_offset, vocab, ignore_index,
            SMOOTH=label_smoothing > 0, SOFTCAP=softcap is not None, Z_LOSS=bool(z_loss),
            ROW_SCALE=grad_scale.dim() == 1, ACC=acc_dtype(x.dtype), BLOCK_C=block,
            num_warps=min(max(block // 256, 1), 4))
    if dweight is not None:
        torch.mm(grad.T, x, out=dweight)
    if dbias is not None:
        dbias.copy_(grad.sum(dim=0, dtype=acc))
    if dx is not None:
        _accumulate_product(dx, grad, weight)
