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
    scale = keep_scale(p, x.dtype)
    # every element is multiplied, the dropped by 0: a dropped inf or nan gives nan, as in PyTorch
    y = a * np.where(keep, scale, type(scale)(0))
    write(y_out.view(-1), y)
