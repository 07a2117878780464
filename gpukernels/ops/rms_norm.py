"""rms_norm: the ops ``gpukernels::rms_norm_fwd/_bwd`` (output specs and
kernel contracts), their autograd, and the checked public function.

The kernels see ``x``, contiguous and of any shape whose last dim is ``D``, as
a ``(rows, D)`` matrix (``row_count``) and save each
row's ``rstd`` (fp32, fp64 for fp64 input) for the backward. With
``h = x * rstd`` and the scale ``s = offset + weight``:

- default: ``y = h * s`` in the statistics dtype, rounded once to x's dtype
  (``torch.nn.functional.rms_norm``; Gemma's RMSNorm with ``offset=1``);
- ``cast_before_weight``: ``y = s * h.to(x.dtype)`` in the dtype promoted from
  the weight's and x's (Llama's RMSNorm).

With ``out_dtype``, ``y`` is rounded once to it instead (the backward then takes
``dy`` in that dtype and writes ``dx`` in x's).

Backward: ``g = dy * s``; ``dx = rstd * (g - h * mean(g * h))``;
``dweight = sum_rows(dy * h)``, with the rounded ``h`` under
``cast_before_weight`` (what multiplied the weight; the rounding itself
passes gradients through unchanged, as ``Tensor.to`` does).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..errors import ArgumentError, ArgumentTypeError
from ._checks import autocast_enabled, check_norm_input, check_number, check_out_dtype, contiguous_param, empty_grad
from ._op import dense, kernel_op, reshaped, row_count, stats_dtype


@kernel_op("rms_norm")
def rms_norm_fwd(
    x: Tensor,
    weight: Optional[Tensor],
    eps: float,
    offset: float,
    cast_before_weight: bool,
    out_dtype: Optional[torch.dtype],
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Kernel: ``y`` = rows of ``x`` times their ``rstd = 1/sqrt(mean(x^2) + eps)``,
    scaled by ``offset + weight`` when there is a weight (see the module doc for
    the rounding ``cast_before_weight`` adds and ``y``'s dtype); each row's ``rstd``
    in the statistics dtype."""
    if out_dtype is not None:
        y_dtype = out_dtype
    elif cast_before_weight and weight is not None:
        y_dtype = torch.promote_types(weight.dtype, x.dtype)
    else:
        y_dtype = x.dtype
    return torch.empty_like(x, dtype=y_dtype), x.new_empty(row_count(x), dtype=stats_dtype(x.dtype))


@kernel_op("rms_norm")
def rms_norm_bwd(
    dy: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor, offset: float, cast_before_weight: bool, backend: str
) -> tuple[Tensor, Tensor]:
    """Kernel: ``dx`` (x's dtype); ``dweight`` (the weight's dtype) when there is
    a weight, else empty."""
    dweight = torch.empty_like(weight) if weight is not None else empty_grad(x)  # weight: contiguous, (D,)
    return torch.empty_like(x), dweight


def _setup_context(ctx, inputs, output):
    x, weight, _, offset, cast_before_weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.offset = offset
    ctx.cast_before_weight = cast_before_weight


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    if ctx.relaid:
        x, weight, rstd = dense(x, weight, rstd)
    dx, dweight = rms_norm_bwd.on(ctx.backend, dy.contiguous(), x, weight, rstd, ctx.offset, ctx.cast_before_weight)
    return dx, dweight if weight is not None else None, None, None, None, None


rms_norm_fwd.register_autograd(_setup_context, _backward)


def check_variant(offset, cast_before_weight, weight: Tensor | None) -> float:
    """An RMSNorm variant's ``offset`` (returned, checked) and ``cast_before_weight``: an offset
    scales by ``offset + weight``, so it needs a weight."""
    if not (type(offset) is float and -math.inf < offset < math.inf):  # the usual call passes as is
        offset = check_number("offset", offset)
    if offset and weight is None:
        raise ArgumentError(f"offset={offset} scales by offset + weight: it needs a weight")
    if type(cast_before_weight) is not bool:
        raise ArgumentTypeError(f"cast_before_weight must be a bool, got {type(cast_before_weight).__name__}")
    return offset


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    offset: float = 0.0,
    cast_before_weight: bool = False,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """``torch.nn.functional.rms_norm``: normalise over the trailing
    ``normalized_shape`` dims by the root mean square, statistics in fp32 (fp64
    for fp64 input); ``eps=None`` is the epsilon of that statistics dtype, as in
    PyTorch. The result has input's dtype.

    ``offset=1.0`` scales by ``1 + weight`` (Gemma's RMSNorm). ``cast_before_weight``
    rounds the normalised value to input's dtype before the weight multiplies it,
    and the result has the dtype promoted from the weight's and input's (Llama's).

    Under autocast the plain op runs in fp32 (result fp32; a narrower input read as
    it is, as ``layer_norm``), as PyTorch's CUDA autocast runs ``rms_norm``; with ``offset`` or
    ``cast_before_weight`` it runs as without autocast, as the model code it
    reproduces does (its own explicit casts).

    ``out_dtype`` (float16, bfloat16 or float32; input not float64): the result in
    that dtype, rounded once, as ``rms_norm(...).to(out_dtype)`` but without the
    pass that casts, and without the result's wider copy (a norm whose output
    feeds only matmuls under autocast: ``gk.patch`` gives them the autocast dtype).
    Its gradient comes in that dtype too."""
    shape, d = check_norm_input(input, normalized_shape, ("weight",), (weight,))
    if eps is None:
        eps = torch.finfo(stats_dtype(input.dtype)).eps
    elif not (type(eps) is float and 0.0 <= eps < math.inf):  # the usual call passes as is
        eps = check_number("eps", eps, low=0.0)
    offset = check_variant(offset, cast_before_weight, weight)
    if out_dtype is not None:
        check_out_dtype(out_dtype, input)
    elif autocast_enabled(input) and input.dtype != torch.float64 and not offset and not cast_before_weight:
        out_dtype = torch.float32  # as layer_norm's: no cast up
    if len(shape) == 1:  # the kernels read the rows of input as it is
        y, _ = rms_norm_fwd(input.contiguous(), contiguous_param(weight), eps, offset, cast_before_weight, out_dtype)
        return y
    weight = None if weight is None else weight.reshape(d)
    rows = reshaped(input, input.numel() // d, d).contiguous()
    y, _ = rms_norm_fwd(rows, contiguous_param(weight), eps, offset, cast_before_weight, out_dtype)
    return reshaped(y, *input.shape)
