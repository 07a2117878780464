"""Dropout's host-side rules, shared by every backend: which 16 bits of which
Philox word an element draws, the integer keep test, and the scale of the kept
elements. The kernels (NumPy, Triton, CUDA) apply them to the words they draw.

Element ``i`` draws the 16-bit half ``i % 2`` (the low half first) of output word
``(i % 8) // 2`` of the Philox4x32-10 call on counter ``i // 8``: one call serves
eight elements, a quarter of the generator's work per element that 32-bit
uniforms would cost (with four elements a call, Philox's multiplies made the
kernel issue-bound: about 32 instructions an element on sm_90, 22 with eight).
That half ``h`` is the uniform ``h / 2**16``; the element is kept when it is at
least ``p``, so ``p`` takes effect rounded up to a multiple of ``2**-16``."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

HALVES = 1 << 16
"""Values of an element's 16-bit uniform: ``h / HALVES`` is in [0, 1)."""


@functools.lru_cache(maxsize=256)
def keep_threshold(p: float) -> int:
    """The integer form of the keep test ``h / 2**16 >= p`` for an element's 16-bit half
    ``h``: kept exactly when ``h > keep_threshold(p)``, ``ceil(p * 2**16) - 1`` (exact:
    a float64 times a power of two). -1 keeps every element (``p = 0``), ``2**16 - 1``
    none (``p`` above ``1 - 2**-16``); the drop probability is ``ceil(p * 2**16) / 2**16``."""
    return math.ceil(p * HALVES) - 1


@functools.lru_cache(maxsize=256)
def keep_scale(p: float, dtype: torch.dtype) -> np.floating:
    """``1/(1-p)`` worked out in the compute dtype of ``dtype``, ``p`` included:
    float32 for fp32/bf16/fp16, the float64 ``p`` for fp64 (so fp64 results
    equal PyTorch's ``x * (1/(1-p))`` to the bit). 0 when ``p`` rounds to 1 in
    float32, where no element is kept."""
    real = np.float64 if dtype == torch.float64 else np.float32
    if np.float32(p) >= 1:
        return real(0)
    return real(1) / (real(1) - real(p))
