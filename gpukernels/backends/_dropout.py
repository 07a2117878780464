"""Dropout's host-side rules, shared by every backend: how a Philox word becomes
a uniform, the integer keep test equivalent to ``uniform > p``, and the scale
of the kept elements. The kernels (NumPy, Triton, CUDA) apply them to the words
they draw."""

from __future__ import annotations

import functools

import numpy as np
import torch

# Largest float32 s with (2**31 - 1) * s < 1 after rounding: uniforms stay below 1.
_UNIFORM_SCALE = np.float32(4.6566127342e-10)


def folded(bits: np.ndarray) -> np.ndarray:
    """uint32 words as the int32 in [0, 2**31) that ``uint_to_uniform_float``
    scales: ``~x`` maps the negative half onto the positive one, so the sign
    bit is not wasted."""
    signed = np.asarray(bits, dtype=np.uint32).view(np.int32)
    return np.where(signed < 0, ~signed, signed)


def uint_to_uniform_float(bits: np.ndarray) -> np.ndarray:
    """Triton's ``uint_to_uniform_float`` for 32-bit words: float32 in [0, 1)."""
    return folded(bits).astype(np.float32) * _UNIFORM_SCALE


@functools.lru_cache(maxsize=256)
def keep_threshold(p: float) -> int:
    """The integer form of the test ``uniform > float32(p)``: a word is kept
    exactly when ``folded(word) > keep_threshold(p)``.

    The uniform of a word is ``fl(fl(k) * s)`` for ``k = folded(word)``, each
    step rounded to nearest: both steps are non-decreasing in ``k``, so the
    folded words whose uniform is above ``p`` are all those above the largest
    ``k`` whose uniform is not, found here by bisection over ``[0, 2**31)``
    with the float rule itself. -1 keeps every word, ``2**31 - 1`` none."""
    p32 = np.float32(p)
    not_above, above = -1, 2**31  # uniform(not_above) <= p32 < uniform(above), the ends taken as -inf, +inf
    while above - not_above > 1:
        middle = (not_above + above) // 2
        if uint_to_uniform_float(np.uint32(middle)) <= p32:
            not_above = middle
        else:
            above = middle
    return not_above


@functools.lru_cache(maxsize=256)
def keep_scale(p: float, dtype: torch.dtype) -> np.floating:
    """``1/(1-p)`` worked out in the compute dtype of ``dtype``, ``p`` included:
    float32 for fp32/bf16/fp16, the float64 ``p`` for fp64 (so fp64 results
    equal PyTorch's ``x * (1/(1-p))`` to the bit). 0 when ``p`` rounds to 1 in
    float32, where no element is kept (uniforms are < 1)."""
    real = np.float64 if dtype == torch.float64 else np.float32
    if np.float32(p) >= 1:
        return real(0)
    return real(1) / (real(1) - real(p))
