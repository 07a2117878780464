"""BatchNorm over an (N, C, *) tensor whose dims after C make one axis L (a
NumPy view of its (N, C, L) view, channels-last included): statistics per
channel over the M = N*L elements of axes 0 and 2."""

from __future__ import annotations

import numpy as np

from ._arrays import as_array, write

_OVER_CHANNEL = (0, 2)


def _per_channel(v: np.ndarray) -> np.ndarray:
    """A (C,) vector broadcast against (N, C, L)."""
    return v[None, :, None]


def _update_running(running, batch: np.ndarray, momentum: float) -> None:
    """running = (1-momentum)*running + momentum*batch, in place, in the compute dtype."""
    write(running, momentum * batch + (1.0 - momentum) * as_array(running))


def _ncl(t):
    """The (N, C, L) view of an (N, C, *) tensor: a view, so that writing it writes ``t``."""
    return t.view(t.shape[0], t.shape[1], -1) if t.dim() != 3 else t


def batch_norm_fwd(x, weight, bias, running_mean, running_var, training, momentum, eps, y_out, stats_out):
    x, y_out = _ncl(x), _ncl(y_out)
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
        mean = as_array(running_mean, x.dtype)
        centered = a - _per_channel(mean)
        var = as_array(running_var, x.dtype)
    rstd = 1.0 / np.sqrt(var + eps)
    gain = rstd * as_array(weight, x.dtype) if weight is not None else rstd
    y = centered * _per_channel(gain)
    if bias is not None:
        y += _per_channel(as_array(bias, x.dtype))
    write(y_out, y)
    write(stats_out, np.stack((mean, rstd)))


def batch_norm_bwd(dy, x, weight, stats, training, has_bias, dx_out, dweight_out, dbias_out):
    dy, x, dx_out = _ncl(dy), _ncl(x), _ncl(dx_out)
    a, g = as_array(x), as_array(dy, x.dtype)
    mean, rstd = as_array(stats, x.dtype)
    xhat = (a - _per_channel(mean)) * _per_channel(rstd)
    sum_dy = g.sum(axis=_OVER_CHANNEL)
    sum_dy_xhat = (g * xhat).sum(axis=_OVER_CHANNEL)
    gain = rstd * as_array(weight, x.dtype) if weight is not None else rstd
    if training:
        # the batch statistics depend on x too: remove the mean and the xhat component of dy
        count = a.shape[0] * a.shape[2]
        g = g - _per_channel(sum_dy / count) - xhat * _per_channel(sum_dy_xhat / count)
    write(dx_out, g * _per_channel(gain))
    if weight is not None:
        write(dweight_out, sum_dy_xhat)
    if has_bias:
        write(dbias_out, sum_dy)
