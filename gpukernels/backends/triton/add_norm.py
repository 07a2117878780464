"""A residual addition and the norm of its sum, over the rows of contiguous tensors read as
(rows, D) matrices: ``_norm``'s launchers with a residual (``R``, ``S``) forward and the
sum's gradient (``DS``, ``DX_IN``) backward; centred (LayerNorm) or not (RMSNorm). The
op's kernel contract is the launchers' own.
"""

from __future__ import annotations

from ._norm import norm_bwd as add_norm_bwd
from ._norm import norm_fwd as add_norm_fwd

__all__ = ["add_norm_fwd", "add_norm_bwd"]
