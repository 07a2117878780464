"""RMSNorm over the rows of a contiguous tensor, read as a (rows, D) matrix:
the launchers of the row-normalisation kernels of ``_norm``, uncentred (``CENTERED`` false).
"""

from __future__ import annotations

from ._common import aligned, cdiv, dtype_of, float_bits, rows_and_features
from ._norm import bwd_buffers, bwd_row_launch, norm_bwd_kernel, norm_fwd_kernel, offset_words, row_launch


def rms_norm_fwd(x, weight, eps, offset, cast_before_weight, out_dtype, y, rstd):
    rows, d = rows_and_features(x)
    if rows:
        no_bias = None
        key = (
            ("rms_norm", x.dtype, out_dtype, dtype_of(weight), not offset, cast_before_weight, d, rows >= 2**31)
            if aligned(x, weight)
            else None
        )
        launch = row_launch(d)
        norm_fwd_kernel.launch(
            (cdiv(rows, launch["ROWS"]),),
            key,
            lambda: dict(launch, CENTERED=False, CAST_BEFORE_W=cast_before_weight),
            x,
            None,  # no residual
            weight,
            no_bias,
            y,
            None,
            rstd,
            rows,
            d,
            *float_bits(eps),
            *offset_words(offset),
        )


def rms_norm_bwd(dy, x, weight, rstd, offset, cast_before_weight, dx, dweight):
    rows, d = rows_and_features(x)
    if not rows:
        dweight.zero_()  # no rows: dweight is 0 (and empty when there is no weight)
        return
    has_w = weight is not None
    variant = ("rms_norm", x.dtype, dy.dtype, dtype_of(weight), not offset, cast_before_weight, rows, d)
    offset_args = offset_words(offset)

    def constexprs() -> dict:
        return dict(bwd_row_launch(d, 2 * x.element_size()), CENTERED=False, CAST_BEFORE_W=cast_before_weight)

    grads = (dweight if has_w else None, None)  # no dbias
    no_sum = None  # no gradient of a sum to add, nor the input's dtype to write dx in again
    programs, partial, counters = bwd_buffers(variant, constexprs, int(has_w), dy, x, weight, rstd, no_sum, dx, no_sum,
                                              *grads, rows, d, *offset_args)  # fmt: skip
    norm_bwd_kernel.launch(
        (programs,),
        variant if aligned(dy, x, weight, rstd) else None,
        constexprs,
        dy,
        x,
        weight,
        rstd,
        no_sum,
        dx,
        no_sum,
        partial,
        *grads,
        counters,
        rows,
        d,
        *offset_args,
    )
