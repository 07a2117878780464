"""Inverted dropout on the flattened contiguous tensor, its mask drawn by
Philox4x32-10 from ``(seed, element index)``, four elements to a call
(``philox.element_words``), each word kept or dropped by the integer test
``philox.keep_threshold`` gives, as the Triton and CUDA kernels do."""

from __future__ import annotations

import numpy as np
import torch

from ._arrays import as_array, compute_dtype, write
from .philox import element_words, folded, keep_threshold


def keep_scale(p: float, dtype: torch.dtype) -> np.floating:
    """``1/(1-p)`` worked out in the compute dtype of ``dtype``, ``p`` included:
    float32 for fp32/bf16/fp16, the float64 ``p`` for fp64 (so fp64 results
    equal PyTorch's ``x * (1/(1-p))`` to the bit). 0 when ``p`` rounds to 1 in
    float32, where no element is kept (uniforms are < 1)."""
    real = compute_dtype(dtype).type
    if np.float32(p) >= 1:
        return real(0)
    return real(1) / (real(1) - real(p))


def dropout_fwd(x: torch.Tensor, p: float, seed: torch.Tensor, y_out: torch.Tensor) -> None:
    a = as_array(x).reshape(-1)
    keep = folded(element_words(int(seed.item()), a.size)) > keep_threshold(p)
    y = np.zeros_like(a)
    # only kept elements are multiplied: a dropped inf or nan gives 0, as in a Triton tl.where
    np.multiply(a, keep_scale(p, x.dtype), out=y, where=keep)
    write(y_out.view(-1), y)
