"""add_norm: the ops ``gpukernels::add_norm_fwd/_bwd`` (output specs and kernel
contracts), their autograd, and the checked public functions ``add_layer_norm`` and
``add_rms_norm``: a residual addition and the norm of its sum, as a pre-norm
transformer block writes them (``h = residual + attention(...)``, then
``norm(h)``), in one pass over the rows.

The kernels see ``x`` and ``residual``, contiguous, of one shape whose last dim is
``D``, as ``(rows, D)`` matrices. ``summed = residual + x`` in the dtype promoted
from theirs (PyTorch's addition, rounded once to it), written for the caller (the
residual stream goes on) and saved for the backward; ``y`` is ``summed``'s rows
normalised exactly as ``layer_norm`` (``centered``) or ``rms_norm`` (not: with its
``offset`` and ``cast_before_weight``) normalise them, statistics saved as theirs.

Backward: the norm's ``dx`` of ``summed``, plus ``summed``'s own gradient (where
the residual stream reads it), summed in the statistics dtype and rounded once:
``dresidual`` in ``summed``'s dtype and, when x's dtype differs (a bf16 attention
output added to an fp32 residual stream under autocast), ``dinput`` in x's. Against
PyTorch's addition then norm, that saves a pass each way and the cast of the
gradient to x's dtype: the addition's read of both and write of the sum forward
(the norm's read of the sum is folded into it), and backward the sum of the two
gradients and its cast.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from ._checks import (
    autocast_enabled,
    check_norm_input,
    check_number,
    check_out_dtype,
    check_residual,
    contiguous_param,
    empty_grad,
)
from ._op import dense, kernel_op, reshaped, row_count, stats_dtype
from .rms_norm import check_variant


@kernel_op("add_norm")
def add_norm_fwd(
    x: Tensor,
    residual: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    offset: float,
    centered: bool,
    cast_before_weight: bool,
    out_dtype: Optional[torch.dtype],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Kernel: ``y``, the rows of ``summed`` normalised (``layer_norm_fwd``'s or
    ``rms_norm_fwd``'s ``y``); ``summed = residual + x``; the statistics (centred:
    (2, rows) each row's mean, then each row's rstd; else (rows,) each row's rstd)."""
    summed_dtype = torch.promote_types(x.dtype, residual.dtype)
    if out_dtype is not None:
        y_dtype = out_dtype
    elif cast_before_weight and weight is not None:
        y_dtype = torch.promote_types(weight.dtype, summed_dtype)
    else:
        y_dtype = summed_dtype
    rows = row_count(x)
    stats = x.new_empty(size=(2, rows) if centered else (rows,), dtype=stats_dtype(summed_dtype))
    return torch.empty_like(x, dtype=y_dtype), torch.empty_like(x, dtype=summed_dtype), stats


@kernel_op("add_norm")
def add_norm_bwd(
    dy: Tensor,
    dsummed: Optional[Tensor],
    summed: Tensor,
    weight: Optional[Tensor],
    stats: Tensor,
    offset: float,
    centered: bool,
    has_bias: bool,
    cast_before_weight: bool,
    x_dtype: torch.dtype,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Kernel: ``dresidual``, the norm's dx plus ``dsummed`` (when given), in summed's
    dtype; ``dinput``, the same in ``x_dtype`` when that is not summed's, else empty;
    ``dweight`` (the weight's dtype) when there is a weight, else empty; ``dbias`` (the
    weight's dtype, else summed's) when ``has_bias``, else empty."""
    dinput = torch.empty_like(summed, dtype=x_dtype) if x_dtype != summed.dtype else empty_grad(summed)
    dweight = torch.empty_like(weight) if weight is not None else empty_grad(summed)
    if not has_bias:
        dbias = empty_grad(summed)
    else:
        dbias = torch.empty_like(weight) if weight is not None else summed.new_empty(summed.shape[-1])
    return torch.empty_like(summed), dinput, dweight, dbias


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, _, offset, centered, cast_before_weight, _ = inputs
    ctx.save_for_backward(output[1], weight, output[2])
    ctx.dtypes = (x.dtype, residual.dtype, None if bias is None else bias.dtype)
    ctx.offset = offset
    ctx.centered = centered
    ctx.cast_before_weight = cast_before_weight


def _backward(ctx, dy, dsummed, _dstats):
    summed, weight, stats = ctx.saved_tensors
    if ctx.relaid:
        summed, weight, stats = dense(summed, weight, stats)
    x_dtype, residual_dtype, bias_dtype = ctx.dtypes
    has_bias = bias_dtype is not None
    if dy is None:  # only the sum was read: its gradient passes to both inputs
        dresidual, dinput, dweight, dbias = dsummed, dsummed.to(x_dtype), None, None
    else:
        dresidual, dinput, dweight, dbias = add_norm_bwd.on(
            ctx.backend,
            dy.contiguous(),
            None if dsummed is None else dsummed.contiguous(),
            summed,
            weight,
            stats,
            ctx.offset,
            ctx.centered,
            has_bias,
            ctx.cast_before_weight,
            x_dtype,
        )
        if x_dtype == summed.dtype:
            dinput = dresidual
        if has_bias and dbias.dtype != bias_dtype:
            dbias = dbias.to(bias_dtype)
    if residual_dtype != summed.dtype:  # both inputs narrower than their sum (float16 + bfloat16)
        dresidual = dresidual.to(residual_dtype)
    return (
        dinput,
        dresidual,
        dweight if weight is not None else None,
        dbias if has_bias else None,
        None,
        None,
        None,
        None,
        None,
    )


add_norm_fwd.register_autograd(_setup_context, _backward, differentiable_outputs=2)


def _add_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float | None,
    offset: float,
    centered: bool,
    cast_before_weight: bool,
    out_dtype: torch.dtype | None,
    autocast_to_fp32: bool,
) -> tuple[Tensor, Tensor]:
    """The public functions' checks and call: ``(norm(residual + input), residual + input)``."""
    names = ("weight", "bias") if centered else ("weight",)
    shape, d = check_norm_input(input, normalized_shape, names, (weight, bias) if centered else (weight,))
    check_residual(residual, input)
    summed_dtype = torch.promote_types(input.dtype, residual.dtype)
    if eps is None:  # the epsilon of the statistics dtype, as rms_norm's
        eps = torch.finfo(stats_dtype(summed_dtype)).eps
    if out_dtype is not None:
        check_out_dtype(out_dtype, input if summed_dtype == input.dtype else residual)
    # autocast runs the norm of the (unchanged) sum in fp32, as it runs the norm alone
    elif autocast_to_fp32 and summed_dtype != torch.float64 and autocast_enabled(input):
        out_dtype = torch.float32
    if len(shape) == 1:  # the kernels read the rows of input as it is
        y, summed, _ = add_norm_fwd(
            input.contiguous(), residual.contiguous(), contiguous_param(weight), contiguous_param(bias), eps, offset,
            centered, cast_before_weight, out_dtype,
        )  # fmt: skip
        return y, summed
    weight = None if weight is None else weight.reshape(d)
    bias = None if bias is None else bias.reshape(d)
    rows = input.numel() // d
    y, summed, _ = add_norm_fwd(
        reshaped(input, rows, d).contiguous(), reshaped(residual, rows, d).contiguous(), contiguous_param(weight),
        contiguous_param(bias), eps, offset, centered, cast_before_weight, out_dtype,
    )  # fmt: skip
    return reshaped(y, *input.shape), reshaped(summed, *input.shape)


def add_layer_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """``(layer_norm(residual + input, ...), residual + input)`` in one op: the sum in the
    dtype promoted from input's and residual's (of one shape), rounded as PyTorch's
    addition rounds it, then normalised as ``gk.layer_norm`` normalises it (its autocast
    and ``out_dtype`` rules included). Gradients flow through both results."""
    if not (type(eps) is float and 0.0 <= eps < math.inf):
        eps = check_number("eps", eps, low=0.0)
    return _add_norm(input, residual, normalized_shape, weight, bias, eps, 0.0, True, False, out_dtype, True)


def add_rms_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    offset: float = 0.0,
    cast_before_weight: bool = False,
    out_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """``(rms_norm(residual + input, ...), residual + input)`` in one op: the sum in the
    dtype promoted from input's and residual's (of one shape), rounded as PyTorch's
    addition rounds it, then normalised as ``gk.rms_norm`` normalises it (``eps=None``,
    ``offset``, ``cast_before_weight``, autocast and ``out_dtype`` as there). Gradients
    flow through both results."""
    if eps is not None and not (type(eps) is float and 0.0 <= eps < math.inf):  # the usual call passes as is
        eps = check_number("eps", eps, low=0.0)
    offset = check_variant(offset, cast_before_weight, weight)
    autocast_to_fp32 = not offset and not cast_before_weight  # as rms_norm: the model code's own casts otherwise
    return _add_norm(
        input, residual, normalized_shape, weight, None, eps, offset, False, cast_before_weight, out_dtype,
        autocast_to_fp32,
    )  # fmt: skip
