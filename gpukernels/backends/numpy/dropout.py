"""Inverted dropout on the flattened contiguous tensor, its mask drawn by
Philox4x32-10 from ``(seed, element index)``, four elements to a call
(``philox.element_words``), each word kept or dropped by the integer test
``keep_threshold`` (backends/_dropout.py) gives, as the Triton and CUDA kernels do."""

from __future__ import annotations

import numpy as np
import torch

from .._dropout import folded, keep_scale, keep_threshold
from ._arrays import as_array, write
from .philox import element_words


def dropout_fwd(x: torch.Tensor, p: float, seed: torch.Tensor, y_out: torch.Tensor) -> None:
    a = as_array(x).reshape(-1)
    keep = folded(element_words(int(seed.item()), a.size)) > keep_threshold(p)
    y = np.zeros_like(a)
    # only kept elements are multiplied: a dropped inf or nan gives 0, as in a Triton tl.where
    np.multiply(a, keep_scale(p, x.dtype), out=y, where=keep)
    write(y_out.view(-1), y)
