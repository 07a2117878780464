"""Cross-entropy over the rows of a contiguous (rows, C) logit matrix.

Forward, ``cross_entropy_kernel``, one program per row: reads the row in column
blocks and keeps an online log-sum-exp: the running max ``m`` and
``s = sum exp(x - m)``, rescaled when ``m`` grows; with label smoothing also
``d = sum_c w[c] (x[c] - m)``, re-based the same way, so that no term is ever
formed relative to 0 (a logit of 1e4 loses no digits):
  loss = (1-e) w[t] (m - x[t] + log s) + (e/C) (sum(w) log s - d),
and saves ``m`` and ``log s`` per row, kept apart so a large ``m`` costs the
gradient no digits.
Backward, ``logits_grad_kernel``, a 2-D grid of (rows, column blocks): the
gradient from those statistics, ``scale * (a (p - onehot) + b (sum(w) p - w))``
with ``p = exp(x - m - log s)``: one read of the logits and one write, and no
logits-sized buffer but the gradient itself. The mean's denominator
``sum w[t_i]`` over kept rows is a small torch reduction over ``target``, read
by the kernels from a device tensor, so nothing waits on the host.

The fused linear + cross-entropy (``linear_cross_entropy.py``) runs both kernels
on its chunks of logits, with what only it has, each behind a constexpr flag: a
softcap (the row is read as ``cap * tanh(x / cap)``), a z-loss
(``z * lse**2`` per row), per-row gradient scales and vocabulary slices.

A target outside ``[0, C)`` that is not ``ignore_index`` is never read: the
forward clamps the index it loads with and flags the row. On CPU tensors
(the interpreter) the flag is an IndexError, as on the NumPy backend; on CUDA
it is ``torch._assert_async``, a device-side assert, as PyTorch's own
``nll_loss`` reports it (it surfaces at a later synchronisation and leaves the
CUDA context unusable).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import acc_dtype, round_to, row_block, stats_dtype

# Widest column block of the forward; vocabularies past it (up to 256k) are swept
# in blocks. Tests lower it to make small rows loop.
MAX_BLOCK_C = 8192
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


@triton.jit
def cross_entropy_kernel(X, T, W, Smoothing, Softcap, ZLoss, Loss, RowMax, LogSum, Bad, C, ignore_index,
                         HAS_W: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr, Z_LOSS: tl.constexpr,
                         ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    X += row * C
    t = tl.load(T + row).to(tl.int64)
    kept = t != ignore_index
    in_range = (t >= 0) & (t < C)
    tl.store(Bad + row, kept & ~in_range)
    kept = kept & in_range
    safe_t = tl.where(kept, t, 0)
    cap = tl.load(Softcap).to(ACC) if SOFTCAP else 1.0
    x_t = tl.load(X + safe_t).to(ACC)
    if SOFTCAP:
        x_t = apply_softcap(x_t, cap)
    w_t = tl.load(W + safe_t).to(ACC) if HAS_W else 1.0
    e = tl.load(Smoothing).to(ACC) if SMOOTH else 0.0
    z = tl.load(ZLoss).to(ACC) if Z_LOSS else 0.0
    neg_inf = -float("inf")

    m = tl.full((), neg_inf, ACC)
    shift = tl.zeros((), ACC)  # m, or 0 while every logit so far is -inf (avoids -inf - -inf)
    s = tl.zeros((), ACC)
    d = tl.zeros((), ACC)
    sum_w = tl.zeros((), ACC)
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = cols < C
        x = tl.load(X + cols, mask=mask, other=neg_inf).to(ACC)
        if SOFTCAP:  # -inf stays out of the padding, which the cap would make -cap
            x = tl.where(mask, apply_softcap(x, cap), neg_inf)
        m = tl.maximum(m, tl.max(x, axis=0))
        new_shift = tl.where(m == neg_inf, 0.0, m)
        s = s * tl.exp(shift - new_shift) + tl.sum(tl.exp(x - new_shift), axis=0)
        if SMOOTH:
            w = tl.load(W + cols, mask=mask, other=0.0).to(ACC) if HAS_W else tl.where(mask, 1.0, 0.0).to(ACC)
            d = d - sum_w * (new_shift - shift) + tl.sum(w * tl.where(mask, x - new_shift, 0.0), axis=0)
            sum_w += tl.sum(w, axis=0)
        shift = new_shift
    log_s = tl.log(s)
    lse = shift + log_s

    loss = (1.0 - e) * w_t * (shift - x_t + log_s)
    if SMOOTH:
        loss += (e / C) * (sum_w * log_s - d)
    if Z_LOSS:
        loss += z * lse * lse
    tl.store(Loss + row, tl.where(kept, loss, 0.0))
    tl.store(RowMax + row, shift)
    tl.store(LogSum + row, log_s)


@triton.jit
def logits_grad_kernel(X, T, W, SumW, RowMax, LogSum, GradScale, Smoothing, Softcap, ZLoss, Grad, width, col_offset,
                       C, ignore_index, HAS_W: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr,
                       Z_LOSS: tl.constexpr, ROW_SCALE: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """``Grad[row, cols] = scale_row * d loss_row / d X[row, cols]`` for columns
    ``col_offset + cols`` of rows of ``C`` logits (``width`` of them here), from the
    row's ``m`` and ``log s``. ``Grad`` may be ``X``: each program reads its block
    before writing it."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < width
    t = tl.load(T + row).to(tl.int64)
    scale = tl.load(GradScale + row).to(ACC) if ROW_SCALE else tl.load(GradScale).to(ACC)
    scale = tl.where(t != ignore_index, scale, 0.0)
    m = tl.load(RowMax + row)
    log_s = tl.load(LogSum + row)
    raw = tl.load(X + row * width + cols, mask=mask, other=0.0).to(ACC)
    cap = tl.load(Softcap).to(ACC) if SOFTCAP else 1.0
    x = apply_softcap(raw, cap) if SOFTCAP else raw
    p = tl.exp(x - m - log_s)
    e = tl.load(Smoothing).to(ACC) if SMOOTH else 0.0
    # the forward has flagged a target out of range; clamped, it is never read
    w_t = tl.load(W + tl.where((t >= 0) & (t < C), t, 0)).to(ACC) if HAS_W else 1.0
    # a (p - onehot) + b (sum(w) p - w): each term exactly 0 where p is the one-hot (C == 1)
    g = scale * (1.0 - e) * w_t * (p - tl.where(cols + col_offset == t, 1.0, 0.0))
    if SMOOTH:
        if HAS_W:
            w = tl.load(W + col_offset + cols, mask=mask, other=0.0).to(ACC)
            g += scale * (e / C) * (tl.load(SumW).to(ACC) * p - w)
        else:
            g += scale * (e / C) * (C * p - 1.0)
    if Z_LOSS:
        g += scale * 2.0 * tl.load(ZLoss).to(ACC) * (m + log_s) * p
    if SOFTCAP:
        g *= softcap_slope(raw, cap)
    tl.store(Grad + row * width + cols, round_to(g, Grad.dtype.element_ty), mask=mask)


def _check_targets(target: Tensor, bad: Tensor, classes: int) -> None:
    if bad.device.type == "cuda":
        torch._assert_async(~bad.any(), f"cross_entropy: a target is out of bounds for {classes} classes "
                                        f"(and is not ignore_index)")
    elif bad.any():
        raise IndexError(f"target {int(target[bad][0])} is out of bounds for {classes} classes "
                         f"(and is not ignore_index)")


def _scalar(value: float, like: Tensor) -> Tensor:
    """``value`` as a 0-d device tensor in ``like``'s dtype: a kernel's float arguments are fp32."""
    return torch.full((), value, dtype=like.dtype, device=like.device)


def cross_entropy_rows(logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                       label_smoothing: float, loss: Tensor, row_max: Tensor, log_sum: Tensor, *,
                       softcap: Optional[float] = None, z_loss: float = 0.0) -> None:
    """One launch over the rows of ``logits``: writes each row's loss (0 on ignored
    rows; ``+ z_loss * lse**2`` with a z-loss; of ``softcap * tanh(logits / softcap)``
    with a softcap) into ``loss`` (fp32, fp64 for fp64 logits), and into ``row_max`` and
    ``log_sum`` the row max ``m`` and ``log sum exp(logit - m)``."""
    rows, classes = logits.shape
    if not rows:
        return
    bad = torch.empty(rows, dtype=torch.bool, device=logits.device)
    block = row_block(classes, MAX_BLOCK_C)
    cross_entropy_kernel[(rows,)](
        logits, target, weight,
        _scalar(label_smoothing, loss) if label_smoothing > 0 else None,
        _scalar(softcap, loss) if softcap is not None else None,
        _scalar(z_loss, loss) if z_loss else None,
        loss, row_max, log_sum, bad, classes, ignore_index,
        HAS_W=weight is not None, SMOOTH=label_smoothing > 0, SOFTCAP=softcap is not None, Z_LOSS=bool(z_loss),
        ACC=acc_dtype(logits.dtype), BLOCK_C=block, num_warps=min(max(block // 256, 1), 16))
    _check_targets(target, bad, classes)


def logits_grad(logits: Tensor, target: Tensor, weight: Optional[Tensor], row_max: Tensor, log_sum: Tensor,
                grad_scale: Tensor, grad: Tensor, *, classes: int, col_offset: int, ignore_index: int,
                label_smoothing: float, softcap: Optional[float] = None, z_loss: float = 0.0) -> None:
    """Into ``grad`` (which may be ``logits``), ``grad_scale`` (0-d, or one per row)
    times the gradient of each row's loss with respect to ``logits``, columns
    ``[col_offset, col_offset + width)`` of rows of ``classes``, from the forward's
    ``row_max`` and ``log_sum``."""
    rows, width = logits.shape
    if not rows or not width:
        return
    block = row_block(width, GRAD_BLOCK_C)
    logits_grad_kernel[(rows, triton.cdiv(width, block))](
        logits, target, weight, weight.sum(dtype=row_max.dtype) if weight is not None else None,
        row_max, log_sum, grad_scale,
        _scalar(label_smoothing, row_max) if label_smoothing > 0 else None,
        _scalar(softcap, row_max) if softcap is not None else None,
        _scalar(z_loss, row_max) if z_loss else None,
        grad, width, col_offset, classes, ignore_index,
        HAS_W=weight is not None, SMOOTH=label_smoothing > 0, SOFTCAP=softcap is not None, Z_LOSS=bool(z_loss),
        ROW_SCALE=grad_scale.dim() == 1, ACC=acc_dtype(logits.dtype), BLOCK_C=block,
        num_warps=min(max(block // 256, 1), 4))


def _denominator(target: Tensor, weight: Optional[Tensor], ignore_index: int, acc: torch.dtype) -> Tensor:
    """The mean's denominator: the sum of the kept rows' target weights."""
    kept = target != ignore_index
    if weight is None:
        return kept.sum(dtype=acc)
    # clamped: an out-of-range target is the forward kernel's to report, never a bad index here
    return torch.where(kept, weight.to(acc)[target.clamp(0, weight.numel() - 1)], 0).sum()


def cross_entropy_fwd(logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                      label_smoothing: float, reduction: str) -> tuple[Tensor, Tensor, Tensor]:
    """The NumPy kernel's contract."""
    rows = logits.shape[0]
    acc = stats_dtype(logits.dtype)
    loss, row_max, log_sum = (torch.empty(rows, dtype=acc, device=logits.device) for _ in range(3))
    cross_entropy_rows(logits, target, weight, ignore_index, label_smoothing, loss, row_max, log_sum)
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / _denominator(target, weight, ignore_index, acc)
    return loss.to(logits.dtype), row_max, log_sum


def cross_entropy_bwd(grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor], row_max: Tensor,
                      log_sum: Tensor, ignore_index: int, label_smoothing: float, reduction: str) -> Tensor:
    """The NumPy kernel's contract."""
    scale = grad_loss.to(row_max.dtype)
    if reduction == "mean":
        denominator = _denominator(target, weight, ignore_index, row_max.dtype)
        # every row ignored: the loss is nan, as in PyTorch, but the gradient zero
        scale = torch.where(denominator != 0, scale / denominator, 0)
    grad = torch.empty_like(logits)
    logits_grad(logits, target, weight, row_max, log_sum, scale.contiguous(), grad, classes=logits.shape[1],
                col_offset=0, ignore_index=ignore_index, label_smoothing=label_smoothing)
    return grad
