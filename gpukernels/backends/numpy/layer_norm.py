"""LayerNorm over the rows of a contiguous tensor, read as a (rows, D) matrix."""

from __future__ import annotations

import numpy as np

from ._arrays import as_array, as_rows, write


def layer_norm_fwd(x, weight, bias, eps, out_dtype, y_out, stats_out):
    x, y_out = as_rows(x), as_rows(y_out)
    a = as_array(x)
    mean = a.mean(axis=1)
    centered = a - mean[:, None]
    rstd = 1.0 / np.sqrt((centered * centered).mean(axis=1) + eps)
    y = centered * rstd[:, None]
    if weight is not None:
        y *= as_array(weight, x.dtype)
    if bias is not None:
        y += as_array(bias, x.dtype)
    write(y_out, y)
    write(stats_out, np.stack((mean, rstd)))


def layer_norm_grads(dy, x, weight, stats, has_bias):
    """``dx`` of the rows of ``x`` in its compute dtype, unrounded, ``dweight`` (None without a
    weight) and ``dbias`` (None unless ``has_bias``)."""
    dy, x = as_rows(dy), as_rows(x)
    a, g_out = as_array(x), as_array(dy, x.dtype)
    mean, rstd = as_array(stats, x.dtype)
    xhat = (a - mean[:, None]) * rstd[:, None]
    g = g_out * as_array(weight, x.dtype) if weight is not None else g_out
    dx = rstd[:, None] * (g - g.mean(axis=1, keepdims=True) - xhat * (g * xhat).mean(axis=1, keepdims=True))
    dweight = (g_out * xhat).sum(axis=0) if weight is not None else None
    return dx, dweight, g_out.sum(axis=0) if has_bias else None


def layer_norm_bwd(dy, x, weight, stats, has_bias, dx_out, dweight_out, dbias_out):
    dx, dweight, dbias = layer_norm_grads(dy, x, weight, stats, has_bias)
    write(as_rows(dx_out), dx)
    if dweight is not None:
        write(dweight_out, dweight)
    if dbias is not None:
        write(dbias_out, dbias)
