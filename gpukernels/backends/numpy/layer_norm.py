"""LayerNorm over the rows of a contiguous (rows, D) matrix."""

from __future__ import annotations

import numpy as np
import torch

from ._arrays import as_array, as_tensor


def layer_norm_fwd(x, weight, bias, eps):
    a = as_array(x)
    mean = a.mean(axis=1)
    centered = a - mean[:, None]
    rstd = 1.0 / np.sqrt((centered * centered).mean(axis=1) + eps)
    y = centered * rstd[:, None]
    if weight is not None:
        y *= as_array(weight, x.dtype)
    if bias is not None:
        y += as_array(bias, x.dtype)
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return as_tensor(y, x.dtype), as_tensor(mean, stats_dtype), as_tensor(rstd, stats_dtype)


def layer_norm_bwd(dy, x, weight, mean, rstd, has_bias):
    a, g_out = as_array(x), as_array(dy, x.dtype)
    mean, rstd = as_array(mean, x.dtype), as_array(rstd, x.dtype)
    xhat = (a - mean[:, None]) * rstd[:, None]
    g = g_out * as_array(weight, x.dtype) if weight is not None else g_out
    dx = rstd[:, None] * (g - g.mean(axis=1, keepdims=True) - xhat * (g * xhat).mean(axis=1, keepdims=True))
    param_dtype = weight.dtype if weight is not None else x.dtype
    dweight = as_tensor((g_out * xhat).sum(axis=0), param_dtype) if weight is not None else x.new_empty(0)
    dbias = as_tensor(g_out.sum(axis=0), param_dtype) if has_bias else x.new_empty(0)
    return as_tensor(dx, x.dtype), dweight, dbias
