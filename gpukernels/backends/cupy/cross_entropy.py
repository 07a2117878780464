"""Cross-entropy over the rows of a contiguous (rows, C) logit matrix
(cross_entropy.cu): one block per row computes the row's loss and, when
asked, the gradient of the reduced loss, in the same pass over the logits.

What depends on every row (the mean's denominator, the sum of the class
weights) is reduced beforehand by torch ops and read by the kernel from
device memory; the per-row losses are reduced afterwards, also by torch. An
out-of-range target is never read: the kernel flags it, and the flag fails a
``torch._assert_async`` (on CUDA a device-side assert, as PyTorch's own
cross_entropy reports it, with no host synchronisation).
"""

from __future__ import annotations

import numpy as np
import torch

from . import _runtime
from ._runtime import MAX_BLOCKS, acc_dtype, kernel_name, pointer, row_threads


def _row_stats(target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int, classes: int,
               dtype: torch.dtype) -> torch.Tensor:
    """[sum of the counted rows' target weights (the mean's denominator), sum of
    the class weights], in ``dtype``; out-of-range targets are not looked up."""
    counted = (target != ignore_index) & (target >= 0) & (target < classes)
    w = weight.to(dtype) if weight is not None else torch.ones(classes, dtype=dtype, device=target.device)
    target_weight = torch.where(counted, w[torch.where(counted, target, 0)], 0)
    return torch.stack((target_weight.sum(), w.sum()))


def _reduce(row_loss: torch.Tensor, denominator: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return row_loss
    total = row_loss.sum()
    return total / denominator if reduction == "mean" else total


def cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing, reduction, compute_grad):
    rows, classes = logits.shape
    acc = acc_dtype(logits.dtype)
    target = target.to(torch.int64).contiguous()
    stats = _row_stats(target, weight, ignore_index, classes, acc)
    row_loss = torch.empty(rows, dtype=acc, device=logits.device)
    grad = torch.empty_like(logits) if compute_grad else None
    bad_target = torch.zeros((), dtype=torch.int32, device=logits.device)
    if rows:
        weight = None if weight is None else weight.to(logits.dtype).contiguous()
        _runtime.launch("cross_entropy.cu", kernel_name("cross_entropy", logits.dtype), logits.device,
                        min(rows, MAX_BLOCKS), row_threads(classes),
                        (pointer(logits), pointer(target), pointer(weight), pointer(stats), pointer(row_loss),
                         pointer(grad), pointer(bad_target), np.int64(rows), np.int64(classes),
                         np.int64(ignore_index), np.float64(label_smoothing), np.int32(reduction == "mean")))
    torch._assert_async(bad_target == 0, f"cross_entropy: a target is out of bounds for {classes} classes "
                                         f"(and is not ignore_index {ignore_index})")
    loss = _reduce(row_loss, stats[0], reduction).to(logits.dtype)
    return loss, grad if compute_grad else logits.new_empty(0)
