"""A norm and a residual addition after it (LayerNorm centred, else RMSNorm), over the rows
of contiguous tensors read as (rows, D) matrices."""

from __future__ import annotations

import torch

from ..._numerics import stats_dtype
from ._arrays import as_array, write
from .layer_norm import layer_norm_fwd
from .rms_norm import rms_norm_fwd


def norm_add_fwd(x, residual, weight, bias, eps, offset, centered, cast_before_weight, round_to_input, out, stats_out):
    # the norm's result rounded to its dtype (as the norm alone returns it), then PyTorch's addition
    normed = torch.empty_like(x, dtype=x.dtype if round_to_input else stats_dtype(x.dtype))
    if centered:
        layer_norm_fwd(x, weight, bias, eps, normed.dtype, normed, stats_out)
    else:
        rms_norm_fwd(x, weight, eps, offset, cast_before_weight, normed.dtype, normed, stats_out)
    write(out, as_array(normed, out.dtype) + as_array(residual, out.dtype))
