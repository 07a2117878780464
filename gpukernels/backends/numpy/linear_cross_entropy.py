"""The fused linear + cross-entropy's two passes (their loops are
``gpukernels.ops.linear_cross_entropy``'s), on NumPy in fp32 (fp64 for fp64):
a chunk of rows' loss and logsumexp statistics, and a slice of the vocabulary's
gradients from those statistics."""

from __future__ import annotations

from typing import Optional

import numpy as np
from torch import Tensor

from ._arrays import as_array, as_tensor
from .cross_entropy import logits_grad, row_statistics


def _logits(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x and weight as arrays, and ``x @ weight.T + bias``. bf16/fp16 weights are widened:
    a copy of ``weight``, the price of a reference path."""
    x_array, w = as_array(x), as_array(weight, x.dtype)
    logits = x_array @ w.T
    if bias is not None:
        logits += as_array(bias, x.dtype)
    return x_array, w, logits


def linear_cross_entropy_rows(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, *,
                              ignore_index: int, label_smoothing: float, z_loss: float, softcap: Optional[float],
                              loss: Tensor, row_max: Tensor, log_sum: Tensor) -> None:
    """Writes, for the rows of ``x`` (a chunk), each row's loss (0 on ignored rows), the max
    of its (softcapped) logits and the log of ``sum exp(logit - max)``."""
    _, _, logits = _logits(x, weight, bias)
    row_loss, row_m, row_log_sum = row_statistics(logits, target.numpy(), None, ignore_index, label_smoothing,
                                                  softcap, z_loss, overwrite=True)
    loss.numpy()[:], row_max.numpy()[:], log_sum.numpy()[:] = row_loss, row_m, row_log_sum


def linear_cross_entropy_slice(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, row_max: Tensor,
                               log_sum: Tensor, grad_scale: Tensor, *, vocab: int, col_offset: int,
                               ignore_index: int, label_smoothing: float, z_loss: float, softcap: Optional[float],
                               dx: Optional[Tensor], dweight: Optional[Tensor], dbias: Optional[Tensor]) -> None:
    """For the vocabulary slice ``weight`` (rows ``col_offset...`` of the whole weight, and
    ``bias`` its part), the gradient of ``sum_i grad_scale_i * loss_i`` over all rows of
    ``x``: written into ``dweight`` and ``dbias`` (that slice, in the input dtype), added
    into ``dx`` (an fp32 accumulator, fp64 for fp64)."""
    x_array, w, logits = _logits(x, weight, bias)
    grad = logits_grad(logits, target.numpy(), None, ignore_index, label_smoothing, as_array(row_max),
                       as_array(log_sum), as_array(grad_scale), vocab, col_offset, softcap, z_loss,
                       overwrite=True)
    if dx is not None:
        dx.numpy()[:] += grad @ w
    if dweight is not None:
        dweight.copy_(as_tensor(grad.T @ x_array, dweight.dtype))
    if dbias is not None:
        dbias.copy_(as_tensor(grad.sum(axis=0), dbias.dtype))
