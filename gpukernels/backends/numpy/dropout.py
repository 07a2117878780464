"""Inverted dropout on the flattened contiguous tensor, its mask drawn by
Philox4x32-10 from ``(seed, element index)``, eight elements to a call, each
kept or dropped by its 16-bit half (``philox.element_halves``) and the integer
test of ``keep_threshold`` (backends/_dropout.py), as the Triton and CUDA kernels do."""

from __future__ import annotations

import numpy as np
import torch

from .._dropout import keep_scale, keep_threshold
from ._arrays import as_array, write
from .philox import element_halves


def dropout_fwd(x: torch.Tensor, p: float, seed: torch.Tensor, y_out: torch.Tensor) -> None:
    a = as_array(x).reshape(-1)
    keep = element_halves(int(seed.item()), a.size).astype(np.int32) > keep_threshold(p)
    y = np.zeros_like(a)
    # only kept elements are multiplied: a dropped inf or nan gives 0, as in a Triton tl.where
    np.multiply(a, keep_scale(p, x.dtype), out=y, where=keep)
    write(y_out.view(-1), y)
