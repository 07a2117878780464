"""layer_norm: the ops ``gpukernels::layer_norm_fwd/_bwd`` (output specs and
kernel contracts), their autograd, and the checked public function.

The kernels see ``x``, contiguous and of any shape whose last dim is ``D``, as
a ``(rows, D)`` matrix (``row_count``) and save the
per-row ``mean`` and ``rstd`` (fp32, fp64 for fp64 input) for the backward, in
one ``(2, rows)`` tensor: one allocation and one saved tensor, not two. ``y`` is rounded once from
the statistics dtype to x's dtype, or to ``out_dtype`` when one is given
(the backward then takes ``dy`` in that dtype and writes ``dx`` in x's).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from ._checks import autocast_enabled, check_norm_input, check_number, check_out_dtype, contiguous_param, empty_grad
from ._op import dense, kernel_op, reshaped, row_count, stats_dtype


@kernel_op("layer_norm")
def layer_norm_fwd(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    out_dtype: Optional[torch.dtype],
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Kernel: ``y`` (in ``out_dtype``, default x's) = rows of ``x`` normalised, times
    ``weight``, plus ``bias`` (each optional); ``stats``, each row's mean, then each
    row's rstd, in the statistics dtype."""
    y = torch.empty_like(x) if out_dtype is None else torch.empty_like(x, dtype=out_dtype)
    return y, x.new_empty(2, row_count(x), dtype=stats_dtype(x.dtype))


@kernel_op("layer_norm")
def layer_norm_bwd(
    dy: Tensor, x: Tensor, weight: Optional[Tensor], stats: Tensor, has_bias: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Kernel: ``dx``; ``dweight`` (in the weight's dtype) when there is a weight and
    ``dbias`` (in the weight's dtype, else x's) when ``has_bias``, else empty."""
    # empty_like of the weight (contiguous, (D,)) parses fewer arguments than new_empty(D, dtype=): host time
    dweight = torch.empty_like(weight) if weight is not None else empty_grad(x)
    if not has_bias:
        dbias = empty_grad(x)
    else:
        dbias = torch.empty_like(weight) if weight is not None else x.new_empty(x.shape[-1])
    return torch.empty_like(x), dweight, dbias


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, _ = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy, _dstats):
    x, weight, stats = ctx.saved_tensors
    if ctx.relaid:
        x, weight, stats = dense(x, weight, stats)
    bias_dtype = ctx.bias_dtype
    has_bias = bias_dtype is not None
    dx, dweight, dbias = layer_norm_bwd.on(ctx.backend, dy.contiguous(), x, weight, stats, has_bias)
    if has_bias and dbias.dtype != bias_dtype:
        dbias = dbias.to(bias_dtype)
    return dx, dweight if weight is not None else None, dbias if has_bias else None, None, None


layer_norm_fwd.register_autograd(_setup_context, _backward)


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """``torch.nn.functional.layer_norm``: normalise over the trailing
    ``normalized_shape`` dims, statistics in fp32 (fp64 for fp64 input).
    Under autocast it runs in fp32 (result fp32), as PyTorch's CUDA autocast runs
    ``layer_norm``, on every device (CPU autocast leaves PyTorch's in input's dtype);
    a narrower input is read as it is, where autocast would cast it up (a copy, which
    its backward would keep), and its gradient comes in its dtype, as through that cast.

    ``out_dtype`` (float16, bfloat16 or float32; input not float64): the result
    in that dtype, rounded once, as ``layer_norm(...).to(out_dtype)`` but without
    the pass that casts, and without the result's wider copy (a norm whose output
    feeds only matmuls under autocast: ``gk.patch`` gives them the autocast dtype).
    Its gradient comes in that dtype too."""
    shape, d = check_norm_input(input, normalized_shape, ("weight", "bias"), (weight, bias))
    if not (type(eps) is float and 0.0 <= eps < math.inf):  # the usual call passes as is
        eps = check_number("eps", eps, low=0.0)
    if out_dtype is not None:
        check_out_dtype(out_dtype, input)
    elif autocast_enabled(input) and input.dtype != torch.float64:
        out_dtype = torch.float32  # the kernels compute in fp32 from any input dtype: no cast up
    if len(shape) == 1:  # the kernels read the rows of input as it is
        y, _ = layer_norm_fwd(input.contiguous(), contiguous_param(weight), contiguous_param(bias), eps, out_dtype)
        return y
    weight = None if weight is None else weight.reshape(d)
    bias = None if bias is None else bias.reshape(d)
    rows = reshaped(input, input.numel() // d, d).contiguous()
    y, _ = layer_norm_fwd(rows, contiguous_param(weight), contiguous_param(bias), eps, out_dtype)
    return reshaped(y, *input.shape)
