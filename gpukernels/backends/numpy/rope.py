"""Rotary position embedding of q and k and its transpose (the backward), on
arrays: cos and sin broadcast over the heads."""

from __future__ import annotations

import numpy as np
import torch

from ..._numerics import stats_dtype
from ._arrays import as_array, write


def _rotate(x: np.ndarray, c1, c2, a, b) -> np.ndarray:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * c1 + x2 * a, x2 * c2 + x1 * b], axis=-1)


def rope(q, k, cos, sin, heads_dim, transpose, dtype, q_out, k_out):
    wide = stats_dtype(torch.promote_types(q.dtype, cos.dtype))
    half = q.shape[-1] // 2
    c, s = (np.expand_dims(as_array(t, wide), heads_dim) for t in (cos, sin))
    c1, c2, s1, s2 = c[..., :half], c[..., half:], s[..., :half], s[..., half:]
    a, b = (s2, -s1) if transpose else (-s1, s2)
    for x, out in ((q, q_out), (k, k_out)):
        write(out, _rotate(as_array(x, wide), c1, c2, a, b))
