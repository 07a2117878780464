"""A norm and a residual addition after it, over the rows of contiguous tensors read as
(rows, D) matrices: ``_norm``'s forward launch with the residual added after the norm
(``add_after``); centred (LayerNorm) or not (RMSNorm). The backward is the norm's own
(``layer_norm_bwd``, ``rms_norm_bwd``).
"""

from __future__ import annotations

from ._norm import norm_fwd


def norm_add_fwd(x, residual, weight, bias, eps, offset, centered, cast_before_weight, round_to_input, out, stats):
    norm_fwd(x, residual, weight, bias, eps, offset, centered, cast_before_weight, None, out, None, stats,
             add_after=True, round_to_x=round_to_input)  # fmt: skip
