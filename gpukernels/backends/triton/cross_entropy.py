"""Cross-entropy over the rows of a contiguous (rows, C) logit matrix: loss and
gradient of the reduced loss in one launch, one program per row.

Sweep 1 reads the row in column blocks and keeps an online log-sum-exp: the
running max ``m`` and ``s = sum exp(x - m)``, rescaled when ``m`` grows; with
label smoothing also ``d = sum_c w[c] (x[c] - m)``, re-based the same way, so
that no term is ever formed relative to 0 (a logit of 1e4 loses no digits):
  loss = (1-e) w[t] (m - x[t] + log s) + (e/C) (sum(w) log s - d).
Sweep 2 (when the gradient is wanted) reads the row again and writes
``scale * (a p - q)`` as the NumPy kernel spells it out, ``p = exp(x - m - log s)``.
The mean's denominator ``sum w[t_i]`` over kept rows is a small torch reduction
over ``target`` made before the launch and read by the kernel from a device
tensor, so nothing waits on the host.

For the fused linear + cross-entropy's forward (``linear_cross_entropy.py``,
whose backward has a kernel of its own) the same kernel also takes, each behind
a constexpr flag: a softcap (the row is read as ``cap * tanh(x / cap)``), a
z-loss (``z * lse**2`` per row), and outputs for the logsumexp's statistics
``m`` and ``log s`` per row.

A target outside ``[0, C)`` that is not ``ignore_index`` is never read: the
kernel clamps the index it loads with and flags the row. On CPU tensors
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

from ._common import acc_dtype, round_to, row_block

# Widest column block; vocabularies past it (up to 256k) are swept in blocks.
# Tests lower it to make small rows loop.
MAX_BLOCK_C = 8192


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
def cross_entropy_kernel(X, T, W, Smoothing, Softcap, ZLoss, GradScale, Loss, RowMax, LogSum, Grad, Bad, C,
                         ignore_index, HAS_W: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr,
                         Z_LOSS: tl.constexpr, STORE_STATS: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
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
    if STORE_STATS:
        tl.store(RowMax + row, shift)
        tl.store(LogSum + row, log_s)

    if COMPUTE_GRAD:
        Grad += row * C
        scale = tl.load(GradScale).to(ACC)
        a = scale * (1.0 - e) * w_t
        b = scale * (e / C)
        for start in range(0, C, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            mask = cols < C
            x = tl.load(X + cols, mask=mask, other=0.0).to(ACC)
            p = tl.exp(x - shift - log_s)
            # a (p - onehot) + b (sum(w) p - w), not (a + b sum(w)) p - q: each term is
            # exactly 0 where p is the one-hot (C == 1)
            g = a * (p - tl.where(cols == safe_t, 1.0, 0.0))
            if SMOOTH:
                w = tl.load(W + cols, mask=mask, other=0.0).to(ACC) if HAS_W else 1.0
                g += b * (sum_w * p - w)
            tl.store(Grad + cols, round_to(tl.where(kept, g, 0.0), Grad.dtype.element_ty), mask=mask)


def _gradient_scale(target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str,
                    acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """The mean's denominator ``sum w[t_i]`` over kept rows (1 for sum/none) and the
    factor each row's gradient is scaled by: its reciprocal, or 0 with every row
    ignored (the loss is then nan, as in PyTorch, but the gradient zero)."""
    if reduction != "mean":
        one = torch.ones((), dtype=acc, device=target.device)
        return one, one
    kept = target != ignore_index
    if weight is None:
        denominator = kept.sum(dtype=acc)
    else:  # clamped: an out-of-range target is the kernel's to report, never a bad index here
        denominator = torch.where(kept, weight.to(acc)[target.clamp(0, weight.numel() - 1)], 0).sum()
    return denominator, torch.where(denominator != 0, 1 / denominator, 0)


def _check_targets(target: Tensor, bad: Tensor, classes: int) -> None:
    if bad.device.type == "cuda":
        torch._assert_async(~bad.any(), f"cross_entropy: a target is out of bounds for {classes} classes "
                                        f"(and is not ignore_index)")
    elif bad.any():
        raise IndexError(f"target {int(target[bad][0])} is out of bounds for {classes} classes "
                         f"(and is not ignore_index)")


def cross_entropy_rows(logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                       label_smoothing: float, loss: Tensor, grad: Optional[Tensor] = None,
                       grad_scale: Optional[Tensor] = None, *, stats: Optional[tuple[Tensor, Tensor]] = None,
                       softcap: Optional[float] = None, z_loss: float = 0.0) -> None:
    """One launch over the rows of ``logits``: writes each row's loss (0 on ignored
    rows; ``+ z_loss * lse**2`` with a z-loss; of ``softcap * tanh(logits / softcap)``
    with a softcap) into ``loss`` (fp32, fp64 for fp64 logits); when ``stats`` is given,
    into its two tensors the row max ``m`` and ``log sum exp(logit - m)``; and into
    ``grad`` when given (only without softcap and z-loss) ``grad_scale`` times the
    gradient of the row's loss with respect to its logits.
    ``grad`` may be ``logits`` itself: each program reads a column block before
    overwriting it, and only its own row."""
    rows, classes = logits.shape
    if grad is not None and (softcap is not None or z_loss):
        raise ValueError("cross_entropy_rows computes a gradient only without softcap and z-loss")
    if not rows:
        return
    acc = loss.dtype

    def scalar(value: float) -> Tensor:  # a device tensor: a kernel's float arguments are fp32
        return torch.full((), value, dtype=acc, device=logits.device)

    bad = torch.empty(rows, dtype=torch.bool, device=logits.device)
    block = row_block(classes, MAX_BLOCK_C)
    cross_entropy_kernel[(rows,)](
        logits, target, weight,
        scalar(label_smoothing) if label_smoothing > 0 else None,
        scalar(softcap) if softcap is not None else None,
        scalar(z_loss) if z_loss else None,
        grad_scale, loss, *(stats or (None, None)), grad, bad, classes, ignore_index,
        HAS_W=weight is not None, SMOOTH=label_smoothing > 0, SOFTCAP=softcap is not None, Z_LOSS=bool(z_loss),
        STORE_STATS=stats is not None, COMPUTE_GRAD=grad is not None, ACC=acc_dtype(logits.dtype), BLOCK_C=block,
        num_warps=min(max(block // 256, 1), 16))
    _check_targets(target, bad, classes)


def cross_entropy_fwd(logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                      label_smoothing: float, reduction: str, compute_grad: bool,
                      inplace_grad: bool = False) -> tuple[Tensor, Tensor]:
    """The NumPy kernel's contract. ``inplace_grad=True`` writes the gradient over
    ``logits`` and returns that buffer: a (rows, C) buffer less at a large
    vocabulary, for callers that no longer need the logits."""
    rows, classes = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    denominator, grad_scale = _gradient_scale(target, weight, ignore_index, reduction, acc)
    loss = torch.empty(rows, dtype=acc, device=logits.device)
    grad = None
    if compute_grad:
        grad = logits if inplace_grad else torch.empty_like(logits)
    cross_entropy_rows(logits, target, weight, ignore_index, label_smoothing, loss, grad, grad_scale)
    if grad is None:
        grad = logits.new_empty(0)
    if reduction == "none":
        return loss.to(logits.dtype), grad
    total = loss.sum()
    return (total if reduction == "sum" else total / denominator).to(logits.dtype), grad
