"""Inverted dropout (dropout.cu): the mask drawn by Philox4x32-10 from
(seed, element index), eight elements to a call, and kept by the integer test
of ``backends/_dropout.py``'s ``keep_threshold``, bit for bit as the NumPy and
Triton backends draw and keep it."""

from __future__ import annotations

import numpy as np
import torch

from .._dropout import keep_scale, keep_threshold
from . import _runtime
from ._runtime import acc_scalar, kernel_name, pointer

THREADS = 256
# Enough blocks to fill any GPU; the kernel's grid-stride loop covers the rest.
MAX_BLOCKS = 65536


def dropout_fwd(x: torch.Tensor, p: float, seed: torch.Tensor, y: torch.Tensor) -> None:
    n = x.numel()
    if n:
        groups = -(-n // 8)  # a thread per eight elements
        blocks = min(-(-groups // THREADS), MAX_BLOCKS)
        _runtime.launch(
            "dropout.cu",
            kernel_name("dropout", x.dtype),
            x.device,
            blocks,
            THREADS,
            (
                pointer(x),
                pointer(y),
                np.int64(n),
                pointer(seed),
                np.int32(keep_threshold(p)),
                acc_scalar(keep_scale(p, x.dtype), x.dtype),
            ),
        )
