"""RMSNorm over the rows of a contiguous tensor, read as a (rows, D) matrix."""

from __future__ import annotations

import numpy as np

from ._arrays import as_array, as_rows, rounded, write


def rms_norm_fwd(x, weight, eps, offset, cast_before_weight, out_dtype, y_out, rstd_out):
    x, y_out = as_rows(x), as_rows(y_out)
    a = as_array(x)
    rstd = 1.0 / np.sqrt((a * a).mean(axis=1) + eps)
    y = a * rstd[:, None]
    if weight is not None:
        if cast_before_weight:  # Llama's: the weight multiplies the normalised rows rounded to x's dtype
            y = rounded(y, x.dtype, y_out.dtype) * (offset + as_array(weight, y_out.dtype))
        else:
            y *= offset + as_array(weight, x.dtype)
    write(y_out, y)
    write(rstd_out, rstd)


def rms_norm_grads(dy, x, weight, rstd, offset, cast_before_weight):
    """``dx`` of the rows of ``x`` in its compute dtype, unrounded, and ``dweight`` (None
    without a weight)."""
    dy, x = as_rows(dy), as_rows(x)
    a, g_out, rstd = as_array(x), as_array(dy, x.dtype), as_array(rstd, x.dtype)
    h = a * rstd[:, None]
    g = g_out * (offset + as_array(weight, x.dtype)) if weight is not None else g_out
    dx = rstd[:, None] * (g - h * (g * h).mean(axis=1, keepdims=True))
    dweight = (g_out * (rounded(h, x.dtype) if cast_before_weight else h)).sum(axis=0) if weight is not None else None
    return dx, dweight


def rms_norm_bwd(dy, x, weight, rstd, offset, cast_before_weight, dx_out, dweight_out):
    dx, dweight = rms_norm_grads(dy, x, weight, rstd, offset, cast_before_weight)
    write(as_rows(dx_out), dx)
    if dweight is not None:
        write(dweight_out, dweight)
