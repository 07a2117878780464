"""Inverted dropout (dropout.cu): the mask drawn by Philox4x32-10 from
(seed, element index), four elements to a call, bit for bit as the NumPy and
Triton backends draw it."""

from __future__ import annotations

import numpy as np
import torch

from ..numpy.dropout import keep_scale  # the one definition of the scale's rounding
from . import _runtime
from ._runtime import acc_scalar, kernel_name, pointer

THREADS = 256
# Enough blocks to fill any GPU; the kernel's grid-stride loop covers the rest.
MAX_BLOCKS = 65536


def dropout_fwd(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        groups = -(-n // 4)  # a thread per four elements
        blocks = min(-(-groups // THREADS), MAX_BLOCKS)
        _runtime.launch("dropout.cu", kernel_name("dropout", x.dtype), x.device, blocks, THREADS,
                        (pointer(x), pointer(y), np.int64(n), pointer(seed), np.float32(p),
                         acc_scalar(keep_scale(p, x.dtype), x.dtype)))
    return y
