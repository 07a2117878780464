"""Rotary position embedding of q and k and its transpose (the backward), on
arrays: cos and sin broadcast over the heads."""

from __future__ import annotations

import numpy as np
import torch

from ..._numerics import stats_dtype
from ._arrays import as_array, write


def _pairs(x: np.ndarray, rotated: int, interleaved: bool) -> tuple[np.ndarray, np.ndarray]:
    """The two elements of each rotated pair: the halves of ``x[..., :rotated]``, or its
    even and odd elements."""
    if interleaved:
        return x[..., 0:rotated:2], x[..., 1:rotated:2]
    return x[..., : rotated // 2], x[..., rotated // 2 : rotated]


def rope(q, k, cos, sin, heads_dim, transpose, interleaved, dtype, q_out, k_out):
    wide = stats_dtype(torch.promote_types(q.dtype, cos.dtype))
    rotated = cos.shape[-1]
    c, s = (np.expand_dims(as_array(t, wide), heads_dim) for t in (cos, sin))
    (c1, c2), (s1, s2) = _pairs(c, rotated, interleaved), _pairs(s, rotated, interleaved)
    a, b = (s2, -s1) if transpose else (-s1, s2)
    for x, out in ((q, q_out), (k, k_out)):
        x = as_array(x, wide)
        x1, x2 = _pairs(x, rotated, interleaved)
        y = x.copy()  # the elements past ``rotated`` pass through
        y1, y2 = _pairs(y, rotated, interleaved)
        y1[...], y2[...] = x1 * c1 + x2 * a, x2 * c2 + x1 * b
        write(out, y)
