"""A residual addition and the norm of its sum (LayerNorm centred, else RMSNorm), over the
rows of contiguous tensors read as (rows, D) matrices."""

from __future__ import annotations

from ._arrays import as_array, as_rows, write
from .layer_norm import layer_norm_fwd, layer_norm_grads
from .rms_norm import rms_norm_fwd, rms_norm_grads


def add_norm_fwd(x, residual, weight, bias, eps, offset, centered, cast_before_weight, out_dtype, y_out, summed_out,
                 stats_out):  # fmt: skip
    # the sum rounded to its dtype (as PyTorch's addition), which the norm then reads
    write(summed_out, as_array(x, summed_out.dtype) + as_array(residual, summed_out.dtype))
    if centered:
        layer_norm_fwd(summed_out, weight, bias, eps, out_dtype, y_out, stats_out)
    else:
        rms_norm_fwd(summed_out, weight, eps, offset, cast_before_weight, out_dtype, y_out, stats_out)


def add_norm_bwd(dy, dsummed, summed, weight, stats, offset, centered, has_bias, cast_before_weight, x_dtype,
                 dresidual_out, dinput_out, dweight_out, dbias_out):  # fmt: skip
    if centered:
        dx, dweight, dbias = layer_norm_grads(dy, summed, weight, stats, has_bias)
    else:
        (dx, dweight), dbias = rms_norm_grads(dy, summed, weight, stats, offset, cast_before_weight), None
    if dsummed is not None:
        dx += as_array(as_rows(dsummed), summed.dtype)
    write(as_rows(dresidual_out), dx)
    if x_dtype != summed.dtype:
        write(as_rows(dinput_out), dx)
    if dweight is not None:
        write(dweight_out, dweight)
    if dbias is not None:
        write(dbias_out, dbias)
