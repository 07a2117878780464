"""Moving between torch tensors and the NumPy arrays the kernels compute on."""

from __future__ import annotations

import numpy as np
import torch


def compute_dtype(dtype: torch.dtype) -> np.dtype:
    """float64 for float64 tensors, float32 for every other floating dtype."""
    return np.dtype(np.float64) if dtype == torch.float64 else np.dtype(np.float32)


def as_array(t: torch.Tensor | None, dtype: torch.dtype | None = None) -> np.ndarray | None:
    """A NumPy view of ``t`` (a copy only when its dtype must be widened),
    in the compute dtype of ``dtype`` (default: ``t``'s own) if floating."""
    if t is None:
        return None
    t = t.detach()
    if not t.is_floating_point():
        return t.numpy()
    want = compute_dtype(dtype or t.dtype)
    if t.dtype == torch.float64 or t.dtype == torch.float32:
        return t.numpy().astype(want, copy=False)
    return t.to(torch.float32).numpy().astype(want, copy=False)


def as_tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A torch tensor of ``dtype`` holding ``a`` (no copy when already that dtype)."""
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)
