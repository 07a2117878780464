"""BatchNorm over an (N, C, *) tensor whose dims after C make one axis L (a
NumPy view of its (N, C, L) view, channels-last included): statistics per
channel over the M = N*L elements of axes 0 and 2."""

from __future__ import annotations

import numpy as np
import torch

from ._arrays import as_array, rounded, write
from .linear_act import activation_of, pre_activation_grad

_OVER_CHANNEL = (0, 2)
_COMPUTED_AS_IS = (torch.float32, torch.float64)  # the dtypes whose compute dtype is their own


def _per_channel(v: np.ndarray) -> np.ndarray:
    """A (C,) vector broadcast against (N, C, L)."""
    return v[None, :, None]


def _update_running(running, batch: np.ndarray, momentum: float) -> None:
    """running = (1-momentum)*running + momentum*batch, in place, in the compute dtype. Running
    stats made under inference_mode are updated too, as PyTorch's batch norm updates them (an
    in-place write to an inference tensor outside that mode is an error). Their version counter
    is left as it was, as PyTorch's batch norm and the Triton kernels leave it: non-reentrant
    checkpointing given the running stats as inputs checks it when it recomputes."""
    updated = momentum * batch + (1.0 - momentum) * as_array(running)
    if running.is_inference():
        with torch.inference_mode():
            return write(running, updated)
    with torch.autograd._unsafe_preserve_version_counter(running):
        write(running, updated)


def _ncl(t):
    """The (N, C, L) view of an (N, C, *) tensor: a view, so that writing it writes ``t``."""
    return t.view(t.shape[0], t.shape[1], -1) if t.dim() != 3 else t


def _normalized(centered: np.ndarray, rstd: np.ndarray, weight, bias, dtype, activation: str) -> np.ndarray:
    """z = (x - mean) * rstd * weight + bias, the output before the activation (rounded to
    x's ``dtype`` when there is one, as an unfused activation would read it), worked out
    the same way by the forward and by the backward (for the activation's derivative)."""
    gain = rstd * as_array(weight, dtype) if weight is not None else rstd
    z = centered * _per_channel(gain)
    if bias is not None:
        z += _per_channel(as_array(bias, dtype))
    if activation != "none" and dtype not in _COMPUTED_AS_IS:
        z = rounded(z, dtype)
    return z


def batch_norm_fwd(
    x, weight, bias, running_mean, running_var, residual, training, momentum, eps, activation, y_out, stats_out
):
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
    z = _normalized(centered, rstd, weight, bias, x.dtype, activation if residual is None else "none")
    if residual is not None:  # z rounded, plus the residual, rounded, as PyTorch's x += shortcut
        r = as_array(_ncl(residual))
        z = z + r if x.dtype in _COMPUTED_AS_IS else rounded(rounded(z, x.dtype) + r, x.dtype)
    write(y_out, activation_of(z, activation))
    write(stats_out, np.stack((mean, rstd)))


def batch_norm_bwd(dy, x, weight, bias, stats, training, activation, dx_out, dweight_out, dbias_out):
    dy, x, dx_out = _ncl(dy), _ncl(x), _ncl(dx_out)
    a, g = as_array(x), as_array(dy, x.dtype)
    mean, rstd = as_array(stats, x.dtype)
    centered = a - _per_channel(mean)
    if activation != "none":
        g = pre_activation_grad(g, _normalized(centered, rstd, weight, bias, x.dtype, activation), activation)
    xhat = centered * _per_channel(rstd)
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
    if bias is not None:
        write(dbias_out, sum_dy)
