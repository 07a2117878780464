"""norm_add: the op ``gpukernels::norm_add_fwd`` (output spec and kernel contract), its
autograd, and the checked public functions ``layer_norm_add`` and ``rms_norm_add``: a
norm and the residual addition after it, as a post-norm transformer block writes them
(``h = residual + norm(attention(...))``: OLMo 2's and EXAONE 4's blocks, the norm after
each branch of Gemma's), in one pass over the rows.

The kernels see ``x`` and ``residual``, contiguous, of one shape whose last dim is ``D``,
as ``(rows, D)`` matrices. The rows of ``x`` are normalised exactly as ``layer_norm``
(``centered``) or ``rms_norm`` (not: with its ``offset`` and ``cast_before_weight``)
normalise them, in the statistics dtype, and rounded to the norm's result dtype (x's, or
kept in the statistics dtype: ``round_to_input``); ``out = residual + normed`` in the
dtype promoted from theirs, rounded once, as PyTorch's addition. Only ``out`` is written:
the norm's result never reaches memory.

Backward: the addition passes ``dout`` to the residual (cast to its dtype) and to the
norm, whose own backward kernels (``layer_norm_bwd``, ``rms_norm_bwd``) read it as it is,
in fp32 (fp64), with the saved x and statistics: where the sum is wider than the norm's
result (a bf16 branch output added to an fp32 residual stream), autograd would first cast
``dout`` to the norm's dtype, a pass that writes it rounded; here it is neither cast nor
rounded (x's gradient as from an fp32 norm result, within a rounding of autograd's).
Against PyTorch's norm then addition that saves, forward, the norm's write of its result
and the addition's read of it (and a launch); backward, that cast pass where there is one.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..errors import ArgumentError, ArgumentTypeError
from ._checks import autocast_enabled, check_norm_input, check_number, check_residual, contiguous_param
from ._op import dense, kernel_op, reshaped, row_count, stats_dtype
from .layer_norm import layer_norm_bwd
from .rms_norm import check_variant, rms_norm_bwd


@kernel_op("norm_add")
def norm_add_fwd(
    x: Tensor,
    residual: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    offset: float,
    centered: bool,
    cast_before_weight: bool,
    round_to_input: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Kernel: ``out = residual + n``, ``n`` the rows of ``x`` normalised as
    ``layer_norm_fwd`` (centred) or ``rms_norm_fwd`` normalise them, in the statistics
    dtype, rounded to x's dtype first when ``round_to_input``; ``out`` in the dtype
    promoted from n's and residual's; the statistics (centred: (2, rows) each row's mean,
    then each row's rstd; else (rows,) each row's rstd)."""
    statistics = stats_dtype(x.dtype)
    norm_dtype = x.dtype if round_to_input else statistics
    rows = row_count(x)
    stats = x.new_empty(size=(2, rows) if centered else (rows,), dtype=statistics)
    return torch.empty_like(x, dtype=torch.promote_types(norm_dtype, residual.dtype)), stats


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, _, offset, centered, cast_before_weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.dtypes = (residual.dtype, None if bias is None else bias.dtype)
    ctx.variant = (offset, centered, cast_before_weight)


def _backward(ctx, dout, _dstats):
    x, weight, stats = ctx.saved_tensors
    if ctx.relaid:
        x, weight, stats = dense(x, weight, stats)
    residual_dtype, bias_dtype = ctx.dtypes
    offset, centered, cast_before_weight = ctx.variant
    # the addition's backward: dout to each summand; the norm's kernels read it in its own dtype
    dnormed = dout.contiguous()
    dresidual = dout if dout.dtype == residual_dtype else dout.to(residual_dtype)
    if centered:
        dx, dweight, dbias = layer_norm_bwd.on(ctx.backend, dnormed, x, weight, stats, bias_dtype is not None)
        if bias_dtype is None:
            dbias = None
        elif dbias.dtype != bias_dtype:
            dbias = dbias.to(bias_dtype)
    else:
        (dx, dweight), dbias = rms_norm_bwd.on(ctx.backend, dnormed, x, weight, stats, offset, cast_before_weight), None
    return dx, dresidual, dweight if weight is not None else None, dbias, None, None, None, None, None


norm_add_fwd.register_autograd(_setup_context, _backward)


def _norm_add(
    input: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float | None,
    offset: float,
    centered: bool,
    cast_before_weight: bool,
    norm_dtype: torch.dtype | None,
    autocast_to_fp32: bool,
) -> Tensor:
    """The public functions' checks and call: ``residual + norm(input)``."""
    names = ("weight", "bias") if centered else ("weight",)
    shape, d = check_norm_input(input, normalized_shape, names, (weight, bias) if centered else (weight,))
    check_residual(residual, input)
    statistics = stats_dtype(input.dtype)
    if eps is None:  # the epsilon of the statistics dtype, as rms_norm's
        eps = torch.finfo(statistics).eps
    if norm_dtype is None:  # what the norm alone returns
        if cast_before_weight and weight is not None:
            norm_dtype = torch.promote_types(weight.dtype, input.dtype)
        elif autocast_to_fp32 and statistics == torch.float32 and autocast_enabled(input):
            norm_dtype = torch.float32
        else:
            norm_dtype = input.dtype
    elif not isinstance(norm_dtype, torch.dtype):
        raise ArgumentTypeError(f"norm_dtype must be a torch.dtype or None, got {type(norm_dtype).__name__}")
    if norm_dtype != input.dtype and norm_dtype != statistics:
        raise ArgumentError(
            f"norm_dtype must be input's dtype {input.dtype} or the statistics dtype {statistics} (the norm's "
            f"result is rounded to it before the addition), got {norm_dtype}"
            + (f" (from a {weight.dtype} weight with cast_before_weight)" if cast_before_weight else "")
        )
    round_to_input = norm_dtype == input.dtype
    if len(shape) == 1:  # the kernels read the rows of input as it is
        out, _ = norm_add_fwd(
            input.contiguous(), residual.contiguous(), contiguous_param(weight), contiguous_param(bias), eps, offset,
            centered, cast_before_weight, round_to_input,
        )  # fmt: skip
        return out
    weight = None if weight is None else weight.reshape(d)
    bias = None if bias is None else bias.reshape(d)
    rows = input.numel() // d
    out, _ = norm_add_fwd(
        reshaped(input, rows, d).contiguous(), reshaped(residual, rows, d).contiguous(), contiguous_param(weight),
        contiguous_param(bias), eps, offset, centered, cast_before_weight, round_to_input,
    )  # fmt: skip
    return reshaped(out, *input.shape)


def layer_norm_add(
    input: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    norm_dtype: torch.dtype | None = None,
) -> Tensor:
    """``residual + layer_norm(input, ...)`` in one op: input normalised as ``gk.layer_norm``
    normalises it (fp32 under autocast, as there), its result rounded to ``norm_dtype``
    (None: the dtype ``gk.layer_norm`` returns; else input's dtype, or fp32 for input that is
    not fp64), then added to ``residual`` (of input's shape, any floating dtype) in the
    dtype promoted from both, as PyTorch's addition. Gradients flow to input, residual,
    weight and bias."""
    if not (type(eps) is float and 0.0 <= eps < math.inf):
        eps = check_number("eps", eps, low=0.0)
    return _norm_add(input, residual, normalized_shape, weight, bias, eps, 0.0, True, False, norm_dtype, True)


def rms_norm_add(
    input: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    offset: float = 0.0,
    cast_before_weight: bool = False,
    norm_dtype: torch.dtype | None = None,
) -> Tensor:
    """``residual + rms_norm(input, ...)`` in one op: input normalised as ``gk.rms_norm``
    normalises it (``eps=None``, ``offset``, ``cast_before_weight`` and autocast as there),
    its result rounded to ``norm_dtype`` (None: the dtype ``gk.rms_norm`` returns; else
    input's dtype, or fp32 for input that is not fp64; OLMo 2's norm rounds back to its
    input's dtype under autocast too), then added to ``residual`` (of input's shape, any
    floating dtype) in the dtype promoted from both, as PyTorch's addition. Gradients
    flow to input, residual and weight."""
    if eps is not None and not (type(eps) is float and 0.0 <= eps < math.inf):  # the usual call passes as is
        eps = check_number("eps", eps, low=0.0)
    offset = check_variant(offset, cast_before_weight, weight)
    autocast_to_fp32 = not offset and not cast_before_weight  # as rms_norm: the model code's own casts otherwise
    return _norm_add(
        input, residual, normalized_shape, weight, None, eps, offset, False, cast_before_weight, norm_dtype,
        autocast_to_fp32,
    )  # fmt: skip
