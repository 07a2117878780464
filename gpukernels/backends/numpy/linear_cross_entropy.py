"""The fused linear + cross-entropy on NumPy, in fp32 (fp64 for fp64): the
forward by chunks of rows (each chunk's loss and logsumexp statistics), the
backward by slices of the vocabulary (each slice's gradients from those
statistics)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..._numerics import row_stats
from ._arrays import as_array, compute_dtype, write
from .cross_entropy import logits_grad, reduced, row_statistics, write_loss


def _logits(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x and weight as arrays, and ``x @ weight.T + bias``. bf16/fp16 weights are widened:
    a copy of ``weight``, the price of a reference path."""
    x_array, w = as_array(x), as_array(weight, x.dtype)
    logits = x_array @ w.T
    if bias is not None:
        logits += as_array(bias, x.dtype)
    return x_array, w, logits


def linear_cross_entropy_fwd(
    x,
    weight,
    bias,
    target,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    reduction,
    chunk_rows,
    loss_dtype,
    loss_out,
    stats_out,
):
    """Each chunk of ``chunk_rows`` rows: its logits, then each row's loss (0 on ignored rows),
    the max of its (softcapped) logits and the log of ``sum exp(logit - max)``. One chunk's
    logits at a time: each is a temporary of ``row_statistics``' call, gone when it returns."""
    rows, t = x.shape[0], as_array(target)
    loss, row_max, log_sum = (np.empty(rows, compute_dtype(x.dtype)) for _ in range(3))
    for start in range(0, rows, chunk_rows):
        part = slice(start, start + chunk_rows)
        loss[part], row_max[part], log_sum[part] = row_statistics(
            _logits(x[part], weight, bias)[2],
            t[part],
            None,
            ignore_index,
            label_smoothing,
            softcap,
            z_loss,
            overwrite=True,
        )
    kept_rows = np.count_nonzero(t != ignore_index)
    write_loss(loss_out, reduced(loss, reduction, kept_rows))
    write(stats_out, np.concatenate((row_max, log_sum, [kept_rows])))


def _slice_grads(
    x,
    weight,
    bias,
    target,
    row_max,
    log_sum,
    scale,
    vocab,
    col_offset,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    dx,
    dweight_out,
    dbias_out,
):
    """One vocabulary slice (``weight``, ``bias``): its logits' gradient, written over them,
    then that slice of ``dweight`` and ``dbias`` (each when given), and its share of ``dx``
    added into the accumulator (when given)."""
    x_array, w, logits = _logits(x, weight, bias)
    grad = logits_grad(
        logits,
        target,
        None,
        ignore_index,
        label_smoothing,
        row_max,
        log_sum,
        scale,
        vocab,
        col_offset,
        softcap,
        z_loss,
        overwrite=True,
    )
    if dx is not None:
        dx += grad @ w
    if dweight_out is not None:
        write(dweight_out, grad.T @ x_array)
    if dbias_out is not None:
        write(dbias_out, grad.sum(axis=0))


def linear_cross_entropy_bwd(
    grad_loss,
    x,
    weight,
    bias,
    target,
    stats,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    reduction,
    slice_columns,
    grad_x,
    grad_weight,
    grad_bias,
    dx_out,
    dweight_out,
    dbias_out,
):
    """Each slice of ``slice_columns`` vocabulary entries: its logits for all rows again, their
    gradient written over them, then that slice of ``dweight`` and ``dbias``, and its share of
    ``dx`` added into an fp32 (fp64) accumulator."""
    vocab = weight.shape[0]
    row_max, log_sum, kept_rows = row_stats(stats, x.shape[0])
    scale = as_array(grad_loss, stats.dtype)
    if reduction == "mean":
        kept = kept_rows.item()
        scale = scale / kept if kept else np.zeros_like(scale)
    dx = np.zeros(x.shape, compute_dtype(x.dtype)) if grad_x else None
    for start in range(0, vocab, slice_columns):
        part = slice(start, start + slice_columns)
        _slice_grads(
            x,
            weight[part],
            None if bias is None else bias[part],
            as_array(target),
            as_array(row_max),
            as_array(log_sum),
            scale,
            vocab,
            start,
            ignore_index,
            label_smoothing,
            z_loss,
            softcap,
            dx,
            dweight_out[part] if grad_weight else None,
            dbias_out[part] if grad_bias else None,
        )
    if grad_x:
        write(dx_out, dx)


def linear_cross_entropy_grads_fwd(
    x,
    weight,
    bias,
    target,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    reduction,
    chunk_rows,
    slice_columns,
    loss_dtype,
    grad_x,
    grad_weight,
    grad_bias,
    loss_out,
    stats_out,
    dx_out,
    dweight_out,
    dbias_out,
):
    """The forward, then the backward's slices for an upstream gradient of 1: the
    reference takes the logits twice, with each pass's memory bound."""
    linear_cross_entropy_fwd(
        x,
        weight,
        bias,
        target,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        reduction,
        chunk_rows,
        loss_dtype,
        loss_out,
        stats_out,
    )
    linear_cross_entropy_bwd(
        torch.ones((), dtype=stats_out.dtype),
        x,
        weight,
        bias,
        target,
        stats_out,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        reduction,
        slice_columns,
        grad_x,
        grad_weight,
        grad_bias,
        dx_out,
        dweight_out,
        dbias_out,
    )
