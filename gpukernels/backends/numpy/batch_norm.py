"""BatchNorm over an (N, C, L) tensor of any strides (a NumPy view of the
input, channels-last included): statistics per channel over the M = N*L
elements of axes 0 and 2."""

from __future__ import annotations

import numpy as np
import torch

from ._arrays import as_array, as_tensor

_OVER_CHANNEL = (0, 2)


def _per_channel(v: np.ndarray) -> np.ndarray:
    """A (C,) vector broadcast against (N, C, L)."""
    return v[None, :, None]


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _like(x: torch.Tensor, values: np.ndarray) -> torch.Tensor:
    """``values`` in a fresh tensor with ``x``'s dtype and strides, as
    torch.empty_like lays it out (so channels-last stays channels-last)."""
    return torch.empty_like(x).copy_(torch.from_numpy(values))


def _update_running(running: torch.Tensor, batch: np.ndarray, momentum: float) -> None:
    """running = (1-momentum)*running + momentum*batch, in place, in the compute dtype."""
    blended = momentum * batch + (1.0 - momentum) * as_array(running)
    running.copy_(torch.from_numpy(blended))


def batch_norm_fwd(x, weight, bias, running_mean, running_var, training, momentum, eps):
    a = as_array(x)
    if training:
        mean = a.mean(axis=_OVER_CHANNEL)
        centered = a - _per_channel(mean)
        var = np.square(centered).mean(axis=_OVER_CHANNEL)
        if running_mean is not None:
            count = a.shape[0] * a.shape[2]
            _update_running(running_mean, mean, momentum)
            _update_running(running_var, var * (count / (count - 1)), momentum)
    else:
        # a copy: the saved mean is an output, and outputs must not alias inputs
        mean = as_array(running_mean, x.dtype).copy()
        centered = a - _per_channel(mean)
        var = as_array(running_var, x.dtype)
    rstd = 1.0 / np.sqrt(var + eps)
    gain = rstd * as_array(weight, x.dtype) if weight is not None else rstd
    y = centered * _per_channel(gain)
    if bias is not None:
        y += _per_channel(as_array(bias, x.dtype))
    return _like(x, y), as_tensor(mean, _stats_dtype(x)), as_tensor(rstd, _stats_dtype(x))


def batch_norm_bwd(dy, x, weight, mean, rstd, training, has_bias):
    a, g = as_array(x), as_array(dy, x.dtype)
    mean, rstd = as_array(mean, x.dtype), as_array(rstd, x.dtype)
    xhat = (a - _per_channel(mean)) * _per_channel(rstd)
    sum_dy = g.sum(axis=_OVER_CHANNEL)
    sum_dy_xhat = (g * xhat).sum(axis=_OVER_CHANNEL)
    gain = rstd * as_array(weight, x.dtype) if weight is not None else rstd
    if training:
        # the batch statistics depend on x too: remove the mean and the xhat component of dy
        count = a.shape[0] * a.shape[2]
        g = g - _per_channel(sum_dy / count) - xhat * _per_channel(sum_dy_xhat / count)
    dx = g * _per_channel(gain)
    dweight = as_tensor(sum_dy_xhat, _stats_dtype(x)) if weight is not None else x.new_empty(0)
    dbias = as_tensor(sum_dy, _stats_dtype(x)) if has_bias else x.new_empty(0)
    return _like(x, dx), dweight, dbias
