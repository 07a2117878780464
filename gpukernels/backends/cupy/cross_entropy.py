"""Cross-entropy over the rows of a (rows, C) logit matrix, each row contiguous
and ``logits.stride(0)`` elements after the last (cross_entropy.cu), with
class-index or class-probability targets (contiguous), the gradient written
contiguous. The forward, a block per row, gives each row's loss and its
log-sum-exp statistics (max and log-sum); then one block reduces the rows'
losses (in a fixed order, in fp32, fp64 for fp64 logits, rounded once to the
loss's dtype where that is another) and, for class indices, the mean's
denominator and the sum of the class weights, and checks the targets. The
backward computes the gradient elementwise from those, one read of the logits
and one write of the gradient, dividing the upstream gradient by the mean's
denominator itself.

An out-of-range target is never read: the total kernel flags it, and the flag
fails a ``torch._assert_async`` (on CUDA a device-side assert, as PyTorch's own
cross_entropy reports it, with no host synchronisation).
"""

from __future__ import annotations

import numpy as np
import torch

from ..._numerics import row_stats
from . import _runtime
from ._runtime import MAX_BLOCKS, acc_dtype, kernel_name, pointer, row_threads

# Columns of a row per backward block, per thread.
COLUMNS_PER_THREAD = 4
REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2}


def _forward(
    logits, target, probs, weight, ignore_index, label_smoothing, reduction, loss, row_max, log_sum, target_mass, totals
):
    """The row kernel, then the total kernel (and the target check, for class indices)."""
    rows, classes = logits.shape
    # the kernels write losses in the accumulation dtype: into the loss itself when it has that
    # dtype, else into buffers rounded once into it
    acc = acc_dtype(logits.dtype)
    direct = loss.dtype == acc
    row_loss = loss if direct and reduction == "none" else loss.new_empty(rows, dtype=acc)
    reduced = loss if direct and reduction != "none" else row_loss.new_empty(())
    ok = None if target is None else torch.empty((), dtype=torch.bool, device=logits.device)
    if rows:
        _runtime.launch(
            "cross_entropy.cu",
            kernel_name("cross_entropy_fwd", logits.dtype),
            logits.device,
            min(rows, MAX_BLOCKS),
            row_threads(classes),
            (
                pointer(logits),
                pointer(target),
                pointer(probs),
                pointer(weight),
                pointer(row_loss),
                pointer(row_max),
                pointer(log_sum),
                pointer(target_mass),
                np.int64(rows),
                np.int64(classes),
                np.int64(logits.stride(0)),
                np.int64(ignore_index),
                np.float64(label_smoothing),
            ),
        )
    _runtime.launch(
        "cross_entropy.cu",
        kernel_name("cross_entropy_total", logits.dtype),
        logits.device,
        1,
        row_threads(rows),
        (
            pointer(row_loss),
            pointer(target),
            pointer(weight),
            pointer(reduced),
            pointer(totals),
            pointer(ok),
            np.int64(rows),
            np.int64(classes),
            np.int64(ignore_index),
            np.int64(REDUCTION_CODES[reduction]),
            np.int64(target is None),
        ),
    )
    if not direct:
        loss.copy_(row_loss if reduction == "none" else reduced)  # rounded once, to the loss's dtype
    if ok is not None:
        torch._assert_async(
            ok,
            f"cross_entropy: a target is out of bounds for {classes} classes (and is not ignore_index {ignore_index})",
        )


def _backward(
    grad_loss,
    logits,
    target,
    probs,
    weight,
    row_max,
    log_sum,
    target_mass,
    totals,
    ignore_index,
    label_smoothing,
    reduction,
    grad,
    target_grad,
):
    rows, classes = logits.shape
    if not rows:
        return
    grad_loss = grad_loss.to(acc_dtype(logits.dtype))  # not rounded to the logits' dtype first
    threads = row_threads(classes)
    chunk = threads * COLUMNS_PER_THREAD
    tiles = rows * -(-classes // chunk)
    _runtime.launch(
        "cross_entropy.cu",
        kernel_name("cross_entropy_bwd", logits.dtype),
        logits.device,
        min(tiles, MAX_BLOCKS),
        threads,
        (
            pointer(logits),
            pointer(target),
            pointer(probs),
            pointer(weight),
            pointer(row_max),
            pointer(log_sum),
            pointer(target_mass),
            pointer(totals),
            pointer(grad_loss),
            np.int64(grad_loss.stride(0) if grad_loss.dim() else 0),
            np.int64(reduction == "mean"),
            pointer(grad),
            pointer(target_grad),
            np.int64(rows),
            np.int64(classes),
            np.int64(logits.stride(0)),
            np.int64(chunk),
            np.int64(ignore_index),
            np.float64(label_smoothing),
        ),
    )


def cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing, reduction, loss_dtype, loss, stats):
    row_max, log_sum, totals = row_stats(stats, logits.shape[0])
    _forward(
        logits,
        target.to(torch.int64),
        None,
        weight,
        ignore_index,
        label_smoothing,
        reduction,
        loss,
        row_max,
        log_sum,
        None,
        totals,
    )


def cross_entropy_bwd(grad_loss, logits, target, weight, stats, ignore_index, label_smoothing, reduction, grad):
    row_max, log_sum, totals = row_stats(stats, logits.shape[0])
    _backward(
        grad_loss,
        logits,
        target.to(torch.int64),
        None,
        weight,
        row_max,
        log_sum,
        None,
        totals,
        ignore_index,
        label_smoothing,
        reduction,
        grad,
        None,
    )


def cross_entropy_probs_fwd(logits, target, weight, label_smoothing, reduction, loss_dtype, loss, stats):
    row_max, log_sum, target_mass = row_stats(stats, logits.shape[0])
    _forward(logits, None, target, weight, -1, label_smoothing, reduction, loss, row_max, log_sum, target_mass, None)


def cross_entropy_probs_bwd(
    grad_loss, logits, target, weight, stats, label_smoothing, reduction, grad_target, grad, target_grad
):
    row_max, log_sum, target_mass = row_stats(stats, logits.shape[0])
    _backward(
        grad_loss,
        logits,
        None,
        target,
        weight,
        row_max,
        log_sum,
        target_mass,
        None,
        -1,
        label_smoothing,
        reduction,
        grad,
        target_grad if grad_target else None,
    )
