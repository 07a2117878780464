"""layer_norm: the ops ``gpukernels::layer_norm_fwd/_bwd`` (output specs and
kernel contracts), their autograd, and the checked public function.

The kernels see ``x`` as a contiguous ``(rows, D)`` matrix and save the
per-row ``mean`` and ``rstd`` (fp32, fp64 for fp64 input) for the backward.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..errors import ArgumentError
from ._checks import check_float, check_number, check_optional_float, empty_grad
from ._op import kernel_op, reshaped, stats_dtype


@kernel_op("layer_norm")
def layer_norm_fwd(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Kernel: ``y`` = rows of ``x`` normalised, times ``weight``, plus ``bias``
    (each optional); each row's ``mean`` and ``rstd`` in the statistics dtype."""
    rows = x.shape[0]
    return (
        torch.empty_like(x),
        x.new_empty(rows, dtype=stats_dtype(x.dtype)),
        x.new_empty(rows, dtype=stats_dtype(x.dtype)),
    )


@kernel_op("layer_norm")
def layer_norm_bwd(
    dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor, has_bias: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Kernel: ``dx``; ``dweight`` (in the weight's dtype) when there is a weight and
    ``dbias`` (in the weight's dtype, else x's) when ``has_bias``, else empty."""
    d = x.shape[1]
    param_dtype = weight.dtype if weight is not None else x.dtype
    dweight = x.new_empty(d, dtype=param_dtype) if weight is not None else empty_grad(x)
    dbias = x.new_empty(d, dtype=param_dtype) if has_bias else empty_grad(x)
    return torch.empty_like(x), dweight, dbias


def _setup_context(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = layer_norm_bwd.on(ctx.backend, dy.contiguous(), x, weight, mean, rstd, ctx.has_bias)
    return (dx, dweight if weight is not None else None, dbias.to(ctx.bias_dtype) if ctx.has_bias else None, None)


layer_norm_fwd.register_autograd(_setup_context, _backward)


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """``torch.nn.functional.layer_norm``: normalise over the trailing
    ``normalized_shape`` dims, statistics in fp32 (fp64 for fp64 input).
    Under autocast it runs in fp32, as PyTorch's does."""
    check_float("input", input)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not shape or any(not isinstance(s, int) or s < 1 for s in shape):
        raise ArgumentError(f"normalized_shape must be positive ints, got {normalized_shape!r}")
    if tuple(input.shape[input.dim() - len(shape) :]) != shape or input.dim() < len(shape):
        raise ArgumentError(
            f"normalized_shape {shape} does not match the trailing dims of input of shape {tuple(input.shape)}"
        )
    check_optional_float("weight", weight, input, shape)
    check_optional_float("bias", bias, input, shape)
    check_number("eps", eps, low=0.0)
    if torch.is_autocast_enabled(input.device.type) and input.dtype != torch.float64:
        input = input.float()
    d = 1
    for s in shape:
        d *= s
    flat_weight = None if weight is None else reshaped(weight, d)
    flat_bias = None if bias is None else reshaped(bias, d)
    y, _, _ = layer_norm_fwd(reshaped(input, input.numel() // d, d).contiguous(), flat_weight, flat_bias, float(eps))
    return reshaped(y, *input.shape)
