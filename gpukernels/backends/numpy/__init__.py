"""Reference kernels in NumPy: every op, forward and backward, on CPU tensors.

Floating inputs are computed in float64 when they are float64 and in float32
otherwise (bf16/fp16 are widened on the way in and rounded on the way out).
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np


def device_types() -> tuple[str, ...]:
    return ("cpu",)


def unavailable_reason() -> str | None:
    return None


def wrapped(kernel: Callable) -> Callable:
    """``kernel`` as the op layer calls it: with NumPy's floating-point warnings off, so
    that inf and nan flow through as IEEE arithmetic makes them, silently, as in PyTorch's
    CPU kernels (a diverging step's inf must not raise where warnings are errors)."""

    @functools.wraps(kernel)
    def run(*args):
        with np.errstate(all="ignore"):
            return kernel(*args)

    return run
