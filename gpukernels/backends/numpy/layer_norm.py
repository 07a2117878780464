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


def layer_norm_bwd(dy, x, weight, stats, has_bias, dx_out, dweight_out, dbias_out):
    dy, x, dx_out = as_rows(dy), as_rows(x), as_rows(dx_out)
    a, g_out = as_array(x), as_array(dy, x.dtype)
    mean, rstd = as_array(stats, x.dtype)
    xhat = (a - mean[:, None]) * rstd[:, None]
    g = g_out * as_array(weight, x.dtype) if weight is not None else g_out
    dx = rstd[:, None] * (g - g.mean(axis=1, keepdims=True) - xhat * (g * xhat).mean(axis=1, keepdims=True))
    write(dx_out, dx)
    if weight is not None:
        write(dweight_out, (g_out * xhat).sum(axis=0))
    if has_bias:
        write(dbias_out, g_out.sum(axis=0))
