"""RMSNorm over the rows of a contiguous tensor, read as a (rows, D) matrix:
``_norm``'s launchers, uncentred, without a residual or a bias.
"""

from __future__ import annotations

from ._norm import norm_bwd, norm_fwd


def rms_norm_fwd(x, weight, eps, offset, cast_before_weight, out_dtype, y, rstd):
    norm_fwd(x, None, weight, None, eps, offset, False, cast_before_weight, out_dtype, y, None, rstd)


def rms_norm_bwd(dy, x, weight, rstd, offset, cast_before_weight, dx, dweight):
    norm_bwd(dy, None, x, weight, rstd, offset, False, False, cast_before_weight, x.dtype, dx, None, dweight, None)
