"""A residual addition and the norm of its sum, over the rows of contiguous tensors read as
(rows, D) matrices: the launchers of the row-normalisation kernels of ``_norm`` with a
residual (``R``, ``S``) forward and the sum's gradient (``DS``, ``DX_IN``) backward;
centred (LayerNorm) or not (RMSNorm).
"""

from __future__ import annotations

from ._common import aligned, cdiv, dtype_of, float_bits, rows_and_features
from ._norm import bwd_buffers, bwd_row_launch, norm_bwd_kernel, norm_fwd_kernel, offset_words, row_launch


def add_norm_fwd(x, residual, weight, bias, eps, offset, centered, cast_before_weight, out_dtype, y, summed, stats):
    rows, d = rows_and_features(x)
    if not rows:
        return
    key = (
        ("add_norm", x.dtype, residual.dtype, out_dtype, dtype_of(weight), dtype_of(bias), not offset, centered,
         cast_before_weight, d, rows >= 2**31)
        if aligned(x, residual, weight, bias)
        else None
    )  # fmt: skip
    launch = row_launch(d)
    norm_fwd_kernel.launch(
        (cdiv(rows, launch["ROWS"]),),
        key,
        lambda: dict(launch, CENTERED=centered, CAST_BEFORE_W=cast_before_weight),
        x,
        residual,
        weight,
        bias,
        y,
        summed,
        stats,
        rows,
        d,
        *float_bits(eps),
        *offset_words(offset),
    )


def add_norm_bwd(
    dy, dsummed, summed, weight, stats, offset, centered, has_bias, cast_before_weight, x_dtype, dresidual, dinput,
    dweight, dbias,
):  # fmt: skip
    rows, d = rows_and_features(summed)
    if not rows:
        dweight.zero_()  # empty when there is no weight
        dbias.zero_()
        return
    has_w = weight is not None
    variant = ("add_norm", summed.dtype, dy.dtype, dtype_of(dsummed), x_dtype, dtype_of(weight), not offset, centered,
               has_bias, cast_before_weight, rows, d)  # fmt: skip
    offset_args = offset_words(offset)

    def constexprs() -> dict:
        column_bytes = dy.element_size() + summed.element_size() + (0 if dsummed is None else dsummed.element_size())
        # layer_norm.py's rule against fp fusion, for the same reason
        options = dict(enable_fp_fusion=False) if centered else {}
        return dict(bwd_row_launch(d, column_bytes), CENTERED=centered, CAST_BEFORE_W=cast_before_weight, **options)

    grads = (dweight if has_w else None, dbias if has_bias else None)
    dx_in = dinput if x_dtype != summed.dtype else None
    partial_rows = 2 if has_bias else int(has_w)  # dbias's partials follow every program's dweight row
    programs, partial, counters = bwd_buffers(variant, constexprs, partial_rows, dy, summed, weight, stats, dsummed,
                                              dresidual, dx_in, *grads, rows, d, *offset_args)  # fmt: skip
    norm_bwd_kernel.launch(
        (programs,),
        variant if aligned(dy, dsummed, weight) else None,  # summed and stats: the forward's allocations
        constexprs,
        dy,
        summed,
        weight,
        stats,
        dsummed,
        dresidual,
        dx_in,
        partial,
        *grads,
        counters,
        rows,
        d,
        *offset_args,
    )
