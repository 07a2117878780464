"""LayerNorm over the rows of a contiguous tensor, read as a (rows, D) matrix:
the launchers of the row-normalisation kernels of ``_norm``, centred (``CENTERED``).
"""

from __future__ import annotations

from ._common import aligned, cdiv, dtype_of, float_bits, rows_and_features
from ._norm import bwd_buffers, bwd_row_launch, norm_bwd_kernel, norm_fwd_kernel, row_launch


def layer_norm_fwd(x, weight, bias, eps, out_dtype, y, stats):
    rows, d = rows_and_features(x)
    if rows:
        no_offset = None, None  # the scale is the weight itself
        # rows is not specialized (the tile masks its last rows): its type, i32 or i64, is all that varies
        key = (
            ("layer_norm", x.dtype, out_dtype, dtype_of(weight), dtype_of(bias), d, rows >= 2**31)
            if aligned(x, weight, bias)
            else None
        )
        launch = row_launch(d)
        norm_fwd_kernel.launch(
            (cdiv(rows, launch["ROWS"]),),
            key,
            lambda: dict(launch, CENTERED=True, CAST_BEFORE_W=False),
            x,
            None,  # no residual
            weight,
            bias,
            y,
            None,
            stats,
            rows,
            d,
            *float_bits(eps),
            *no_offset,
        )


def layer_norm_bwd(dy, x, weight, stats, has_bias, dx, dweight, dbias):
    rows, d = rows_and_features(x)
    has_w = weight is not None
    if not rows:
        dweight.zero_()  # empty when there is no weight
        dbias.zero_()
        return
    sums = has_w or has_bias  # dweight's partials, then dbias's
    variant = ("layer_norm", x.dtype, dy.dtype, dtype_of(weight), has_bias, rows, d)

    def constexprs() -> dict:
        return dict(
            bwd_row_launch(d, 2 * x.element_size()),
            CENTERED=True,
            CAST_BEFORE_W=False,
            # fused, dy * w - mean(dy * w) keeps the product's rounding error
            # where the exact answer is 0 (D == 1), times rstd
            enable_fp_fusion=False,
        )

    no_offset = None, None
    no_sum = None  # no gradient of a sum to add, nor the input's dtype to write dx in again
    grads = (dweight if has_w else None, dbias if has_bias else None)
    programs, partial, counters = bwd_buffers(variant, constexprs, 2 * sums, dy, x, weight, stats, no_sum, dx, no_sum,
                                              *grads, rows, d, *no_offset)  # fmt: skip
    norm_bwd_kernel.launch(
        (programs,),
        variant if aligned(dy, x, weight, stats) else None,
        constexprs,
        dy,
        x,
        weight,
        stats,
        no_sum,
        dx,
        no_sum,
        partial,
        *grads,
        counters,
        rows,
        d,
        *no_offset,
    )
