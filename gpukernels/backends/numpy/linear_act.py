"""Linear layer and its activation on a contiguous (rows, in) matrix."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ._arrays import as_array, write


def _erf(a: np.ndarray) -> np.ndarray:
    # NumPy has no erf and scipy is not a dependency: torch's vectorised erf
    # runs on a zero-copy view of the array (math.erf per element is ~100x slower).
    return torch.special.erf(torch.from_numpy(a)).numpy()


_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_SCALE = math.sqrt(2.0 / math.pi)
_TANH_CUBIC = 0.044715
_QUICK_GELU_SCALE = 1.702


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))  # exp(-z) -> inf for very negative z gives the right limit 0


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + _erf(z * _SQRT_HALF))


def _tanh_argument(z: np.ndarray) -> np.ndarray:
    return _TANH_SCALE * (z + _TANH_CUBIC * (z * z * z))  # not z**3: NumPy's pow, 100x slower


def _gelu_tanh_grad(z: np.ndarray) -> np.ndarray:
    u = _tanh_argument(z)
    # not 1 - tanh(u)**2, which cancels where tanh(u) ~ 1; cosh(u) -> inf gives the right limit 0
    sech_squared = 1.0 / np.cosh(u) ** 2
    return 0.5 * (1.0 + np.tanh(u)) + 0.5 * z * sech_squared * _TANH_SCALE * (1.0 + 3.0 * _TANH_CUBIC * z * z)


def _silu_grad(z: np.ndarray) -> np.ndarray:
    # sigmoid(-z), not 1 - sigmoid(z), which cancels for large z
    return _sigmoid(z) * (1.0 + z * _sigmoid(-z))


# activation -> (act(z), act'(z)); none, relu and relu_squared are handled apart (see ops/linear_act.py)
_ACTIVATIONS: dict[str, tuple[Callable, Callable]] = {
    "gelu": (lambda z: z * _normal_cdf(z), lambda z: _normal_cdf(z) + z * _INV_SQRT_2PI * np.exp(-0.5 * z * z)),
    "gelu_tanh": (lambda z: 0.5 * z * (1.0 + np.tanh(_tanh_argument(z))), _gelu_tanh_grad),
    "silu": (lambda z: z * _sigmoid(z), _silu_grad),
    # z sigmoid(a z) = silu(a z) / a
    "quick_gelu": (lambda z: z * _sigmoid(_QUICK_GELU_SCALE * z), lambda z: _silu_grad(_QUICK_GELU_SCALE * z)),
}


def linear_act_fwd(x, weight, bias, activation, y_out, z_out):
    z = as_array(x) @ as_array(weight, x.dtype).T
    if bias is not None:
        z += as_array(bias, x.dtype)
    write(y_out, activation_of(z, activation))
    if activation not in ("none", "relu"):
        write(z_out, z)


def activation_of(z: np.ndarray, activation: str) -> np.ndarray:
    """act(z), for every activation (none: z itself)."""
    if activation == "none":
        return z
    if activation == "relu":
        return np.maximum(z, 0)
    if activation == "relu_squared":
        return np.maximum(z, 0) ** 2
    act, _ = _ACTIVATIONS[activation]
    return act(z)


def pre_activation_grad(dy: np.ndarray, saved: np.ndarray, activation: str) -> np.ndarray:
    """dz = dy * act'(z); ``saved`` is z, or for relu y or z (y > 0 exactly where z > 0).
    relu's passes dy where not ``saved <= 0``, as PyTorch's threshold_backward: a nan's too;
    relu_squared's is 0 there too whatever dy (PyTorch's relu backward after square's)."""
    if activation == "none":
        return dy
    if activation == "relu":
        return np.where(saved <= 0, 0, dy)
    if activation == "relu_squared":
        return np.where(saved <= 0, 0, dy * (2 * saved))
    _, act_grad = _ACTIVATIONS[activation]
    return dy * act_grad(saved)


def linear_act_bwd(dy, x, weight, saved, activation, has_bias, dx_out, dweight_out, dbias_out):
    dz = pre_activation_grad(as_array(dy, x.dtype), as_array(saved, x.dtype), activation)
    write(dx_out, dz @ as_array(weight, x.dtype))
    write(dweight_out, dz.T @ as_array(x))
    if has_bias:
        write(dbias_out, dz.sum(axis=0))
