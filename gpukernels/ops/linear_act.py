"""linear_act: the ops ``gpukernels::linear_act_fwd/_bwd`` (output specs and
kernel contracts), their autograd, and the checked public function.

The kernels see ``x`` as a contiguous ``(rows, in)`` matrix, and ``weight`` in
any layout (their products are a matmul library's, which reads it as it is; a
``dweight`` laid out like it), and compute ``y = act(x @ weight.T + bias)`` in
fp32 (fp64 for fp64 input).

What the forward keeps for the backward, and its memory cost:
- ``gelu``, ``gelu_tanh``, ``silu``, ``quick_gelu`` (``z * sigmoid(1.702 z)``,
  CLIP's), ``relu_squared`` (``relu(z)**2``, Primer's, Nemotron's): the
  pre-activation ``z``, one extra
  ``(rows, out)`` tensor in the input dtype. This is what PyTorch's unfused
  ``act(F.linear(...))`` keeps too (the linear output saved by the
  activation); recomputing ``z`` instead would cost a second matmul.
- ``relu``: nothing extra. Its derivative is 0 where ``y <= 0``, else 1 (``y``
  is positive exactly where ``z``, rounded to the input dtype, is; PyTorch's
  relu sees that same rounded ``z``; a nan passes the gradient, as PyTorch's
  does), so the backward reads the output ``y``, which autograd holds by
  reference, not by copy.
- ``none``: nothing; ``dz = dy``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..errors import ArgumentError, ArgumentTypeError
from ._checks import (
    autocast_enabled,
    cast_as_autocast,
    check_choice,
    check_device,
    check_float,
    check_optional_float,
    empty_grad,
)
from ._op import dense, kernel_op, reshaped

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu", "quick_gelu", "relu_squared")
_KEEPS_PRE_ACTIVATION = ("gelu", "gelu_tanh", "silu", "quick_gelu", "relu_squared")


@kernel_op("linear_act")
def linear_act_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, backend: str
) -> tuple[Tensor, Tensor]:
    """Kernel: ``y = act(x @ weight.T + bias)`` (``bias`` optional), ``(rows, out)``
    in x's dtype; the pre-activation ``z``, the same shape, for the activations
    whose backward reads it (gelu, gelu_tanh, silu, quick_gelu, relu_squared), else empty."""
    y = x.new_empty(x.shape[0], weight.shape[0])
    return y, torch.empty_like(y) if activation in _KEEPS_PRE_ACTIVATION else empty_grad(x)


@kernel_op("linear_act")
def linear_act_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, saved: Tensor, activation: str, has_bias: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Kernel: with ``dz = dy * act'(z)`` (``saved`` is ``y`` for relu, ``z`` for
    the activations that keep it, unread for none): ``dx = dz @ weight``,
    ``dweight = dz.T @ x`` and, when ``has_bias``, ``dbias`` = the column sums of
    ``dz``, else empty; all in x's dtype."""
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
    x, weight, saved = dense(*ctx.saved_tensors) if ctx.relaid else ctx.saved_tensors
    dx, dweight, dbias = linear_act_bwd.on(ctx.backend, dy.contiguous(), x, weight, saved, ctx.activation, ctx.has_bias)
    return dx, dweight, dbias if ctx.has_bias else None, None


linear_act_fwd.register_autograd(_setup_context, _backward)


def _check_shapes(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if weight.dim() != 2:
        raise ArgumentError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ArgumentError(
            f"x of shape {tuple(x.shape)} and weight of shape {tuple(weight.shape)} do not fit: "
            f"x's last dim must equal weight's in_features {weight.shape[1]}"
        )
    check_optional_float("bias", bias, x, (weight.shape[0],))


def _check_dtypes(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise ArgumentTypeError(f"x and {name} must have the same dtype, got {x.dtype} and {t.dtype}")


def linear_act(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str = "none") -> Tensor:
    """``act(F.linear(x, weight, bias))`` as one op, not one kernel: the product
    is the vendor library's (cuBLAS on CUDA), the activation a kernel of ours
    after it. ``weight`` is ``(out_features, in_features)``, ``x`` is
    ``(..., in_features)``.
    Under autocast x, weight and bias (fp64 excepted) are cast to the
    autocast dtype, as ``F.linear`` does."""
    check_float("x", x)
    check_float("weight", weight)
    check_device("weight", weight, x)
    check_choice("activation", activation, ACTIVATIONS)
    _check_shapes(x, weight, bias)
    if autocast_enabled(x):
        x, weight, bias = cast_as_autocast(x, weight, bias)
    _check_dtypes(x, weight, bias)
    out_features, in_features = weight.shape
    # the weight as it is: the products take any layout, so a transposed one (transformers'
    # Conv1D gives weight.t()) costs no copy, which the backward would keep
    y, _ = linear_act_fwd(reshaped(x, math.prod(x.shape[:-1]), in_features).contiguous(), weight, bias, activation)
    return reshaped(y, *x.shape[:-1], out_features)
