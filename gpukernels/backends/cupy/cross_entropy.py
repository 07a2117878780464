"""Cross-entropy over the rows of a contiguous (rows, C) logit matrix
(cross_entropy.cu). The forward, a block per row, gives each row's loss and its
log-sum-exp statistics (max and log-sum); the backward computes the gradient
elementwise from those, one read of the logits and one write of the gradient.

What depends on every row (the mean's denominator) and the sum of the class
weights are reduced by torch ops and read by the kernels from device memory;
the per-row losses are reduced afterwards, also by torch. An out-of-range
target is never read: the forward flags it, and the flag fails a
``torch._assert_async`` (on CUDA a device-side assert, as PyTorch's own
cross_entropy reports it, with no host synchronisation).
"""

from __future__ import annotations

import numpy as np
import torch

from . import _runtime
from ._runtime import MAX_BLOCKS, acc_dtype, kernel_name, pointer, row_threads

# Columns of a row per backward block, per thread.
COLUMNS_PER_THREAD = 4


def _denominator(target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int, classes: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """The mean's denominator: the sum of the counted rows' target weights, in
    ``dtype``; out-of-range targets are not looked up."""
    counted = (target != ignore_index) & (target >= 0) & (target < classes)
    if weight is None:
        return counted.sum().to(dtype)
    return torch.where(counted, weight.to(dtype)[torch.where(counted, target, 0)], 0).sum()


def _inputs(logits, target, weight, label_smoothing):
    """The int64 target, the weights in the logits' dtype, and sum(w) in the
    accumulation dtype where a kernel reads it (weights and smoothing), else None."""
    target = target.to(torch.int64).contiguous()
    weight = None if weight is None else weight.to(logits.dtype).contiguous()
    weight_sum = weight.to(acc_dtype(logits.dtype)).sum() if weight is not None and label_smoothing > 0 else None
    return target, weight, weight_sum


def cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing, reduction):
    rows, classes = logits.shape
    acc = acc_dtype(logits.dtype)
    target, weight, weight_sum = _inputs(logits, target, weight, label_smoothing)
    row_loss, row_max, log_sum = (torch.empty(rows, dtype=acc, device=logits.device) for _ in range(3))
    bad_target = torch.zeros((), dtype=torch.int32, device=logits.device)
    if rows:
        _runtime.launch("cross_entropy.cu", kernel_name("cross_entropy_fwd", logits.dtype), logits.device,
                        min(rows, MAX_BLOCKS), row_threads(classes),
                        (pointer(logits), pointer(target), pointer(weight), pointer(weight_sum), pointer(row_loss),
                         pointer(row_max), pointer(log_sum), pointer(bad_target), np.int64(rows), np.int64(classes),
                         np.int64(ignore_index), np.float64(label_smoothing)))
    torch._assert_async(bad_target == 0, f"cross_entropy: a target is out of bounds for {classes} classes "
                                         f"(and is not ignore_index {ignore_index})")
    if reduction == "none":
        loss = row_loss
    elif reduction == "sum":
        loss = row_loss.sum()
    else:  # nan when every row is ignored, as in PyTorch
        loss = row_loss.sum() / _denominator(target, weight, ignore_index, classes, acc)
    return loss.to(logits.dtype), row_max, log_sum


def cross_entropy_bwd(grad_loss, logits, target, weight, row_max, log_sum, ignore_index, label_smoothing,
                      reduction):
    rows, classes = logits.shape
    acc = acc_dtype(logits.dtype)
    target, weight, weight_sum = _inputs(logits, target, weight, label_smoothing)
    grad = torch.empty_like(logits)
    if not rows:
        return grad
    # the upstream gradient of each row (none) or all rows (mean, sum, a stride of 0)
    scale = grad_loss.to(acc).contiguous()
    if reduction == "mean":
        denominator = _denominator(target, weight, ignore_index, classes, acc)
        scale = torch.where(denominator != 0, scale / denominator, 0)  # no gradient when every row is ignored
    row_max, log_sum = row_max.contiguous(), log_sum.contiguous()
    threads = row_threads(classes)
    chunk = threads * COLUMNS_PER_THREAD
    tiles = rows * -(-classes // chunk)
    _runtime.launch("cross_entropy.cu", kernel_name("cross_entropy_bwd", logits.dtype), logits.device,
                    min(tiles, MAX_BLOCKS), threads,
                    (pointer(logits), pointer(target), pointer(weight), pointer(weight_sum),
                     pointer(row_max), pointer(log_sum), pointer(scale),
                     np.int64(1 if reduction == "none" else 0), pointer(grad), np.int64(rows), np.int64(classes),
                     np.int64(chunk), np.int64(ignore_index), np.float64(label_smoothing)))
    return grad
