"""linear_act: custom ops ``gpukernels::linear_act_fwd/_bwd``, their fake
implementations and autograd, and the checked public function.

The kernels see ``x`` as a contiguous ``(rows, in)`` matrix and compute
``y = act(x @ weight.T + bias)`` in fp32 (fp64 for fp64 input).

What the forward keeps for the backward, and its memory cost:
- ``gelu``, ``gelu_tanh``, ``silu``: the pre-activation ``z``, one extra
  ``(rows, out)`` tensor in the input dtype. This is what PyTorch's unfused
  ``act(F.linear(...))`` keeps too (the linear output saved by the
  activation); recomputing ``z`` instead would cost a second matmul.
- ``relu``: nothing extra. Its derivative is ``y > 0`` (``y`` is positive
  exactly where ``z``, rounded to the input dtype, is; PyTorch's relu sees
  that same rounded ``z``), so the backward reads the output ``y``, which
  autograd holds by reference, not by copy.
- ``none``: nothing; ``dz = dy``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .._backend import get_kernel
from ._checks import check_choice, check_device, check_float, check_optional_float, empty_grad
from ._eager import direct, reshaped, with_autograd

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")
_KEEPS_PRE_ACTIVATION = ("gelu", "gelu_tanh", "silu")


def _linear_act_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str) -> tuple[Tensor, Tensor]:
    return get_kernel("linear_act", "linear_act_fwd", x.device)(x, weight, bias, activation)


linear_act_fwd = torch.library.custom_op("gpukernels::linear_act_fwd", _linear_act_fwd, mutates_args=())


@linear_act_fwd.register_fake
def _(x, weight, bias, activation):
    y = x.new_empty(x.shape[0], weight.shape[0])
    return y, torch.empty_like(y) if activation in _KEEPS_PRE_ACTIVATION else empty_grad(x)


def _linear_act_bwd(dy: Tensor, x: Tensor, weight: Tensor, y_or_z: Tensor, activation: str,
                    has_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    return get_kernel("linear_act", "linear_act_bwd", x.device)(dy, x, weight, y_or_z, activation, has_bias)


linear_act_bwd = torch.library.custom_op("gpukernels::linear_act_bwd", _linear_act_bwd, mutates_args=())


@linear_act_bwd.register_fake
def _(dy, x, weight, y_or_z, activation, has_bias):
    dbias = x.new_empty(weight.shape[0]) if has_bias else empty_grad(x)
    return torch.empty_like(x), torch.empty_like(weight), dbias


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation = inputs
    y, z = output
    ctx.mark_non_differentiable(z)
    ctx.save_for_backward(x, weight, y if activation == "relu" else z)
    ctx.activation = activation
    ctx.has_bias = bias is not None


def _backward(ctx, dy, _dz):
    x, weight, y_or_z = ctx.saved_tensors
    dx, dweight, dbias = _call_bwd(dy.contiguous(), x, weight, y_or_z, ctx.activation, ctx.has_bias)
    return dx, dweight, dbias if ctx.has_bias else None, None


_call_bwd = direct(linear_act_bwd, _linear_act_bwd)
_call_fwd = with_autograd(linear_act_fwd, _linear_act_fwd, _setup_context, _backward)


def _check_shapes(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x of shape {tuple(x.shape)} and weight of shape {tuple(weight.shape)} do not fit: "
                         f"x's last dim must equal weight's in_features {weight.shape[1]}")
    check_optional_float("bias", bias, x, (weight.shape[0],))


def _check_dtypes(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise RuntimeError(f"x and {name} must have the same dtype, got {x.dtype} and {t.dtype}")


def _autocast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """As autocast casts: every floating tensor but fp64."""
    return t if t is None or t.dtype == torch.float64 else t.to(dtype)


def linear_act(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str = "none") -> Tensor:
    """``act(F.linear(x, weight, bias))`` in one op: ``weight`` is
    ``(out_features, in_features)``, ``x`` is ``(..., in_features)``.
    Under autocast x, weight and bias (fp64 excepted) are cast to the
    autocast dtype, as ``F.linear`` does."""
    check_float("x", x)
    check_float("weight", weight)
    check_device("weight", weight, x)
    check_choice("activation", activation, ACTIVATIONS)
    _check_shapes(x, weight, bias)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight, bias = _autocast(x, dtype), _autocast(weight, dtype), _autocast(bias, dtype)
    _check_dtypes(x, weight, bias)
    out_features, in_features = weight.shape
    y, _ = _call_fwd(reshaped(x, math.prod(x.shape[:-1]), in_features).contiguous(), weight.contiguous(), bias,
                     activation)
    return reshaped(y, *x.shape[:-1], out_features)
