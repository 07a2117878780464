"""Moving between torch tensors and the NumPy arrays the kernels compute on."""

from __future__ import annotations

import numpy as np
import torch


def compute_dtype(dtype: torch.dtype) -> np.dtype:
    """float64 for float64 tensors, float32 for every other floating dtype."""
    return np.dtype(np.float64) if dtype == torch.float64 else np.dtype(np.float32)


def _view(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor. Not ``t.numpy()``: that marks the
    tensor's storage non-resizable for good, and FSDP2 frees unsharded
    parameters by resizing their storage to 0."""
    return np.from_dlpack(t)


def as_array(t: torch.Tensor | None, dtype: torch.dtype | None = None) -> np.ndarray | None:
    """A NumPy view of ``t`` (a copy only when its dtype must be widened),
    in the compute dtype of ``dtype`` (default: ``t``'s own) if floating."""
    if t is None:
        return None
    t = t.detach()
    if not t.is_floating_point():
        return _view(t)
    want = compute_dtype(dtype or t.dtype)
    if t.dtype == torch.float64 or t.dtype == torch.float32:
        return _view(t).astype(want, copy=False)
    return _view(t.to(torch.float32)).astype(want, copy=False)


def as_tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A torch tensor of ``dtype`` holding ``a`` (no copy when already that dtype)."""
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


def rounded(a: np.ndarray, dtype: torch.dtype, compute_like: torch.dtype | None = None) -> np.ndarray:
    """``a`` rounded to ``dtype``, back in the compute dtype of ``compute_like`` (default:
    ``dtype``'s): what a kernel computing in fp32 reads of a value stored in bf16, say."""
    return as_array(as_tensor(a, dtype), compute_like)


def write(out: torch.Tensor, a: np.ndarray) -> None:
    """Store ``a`` into the output tensor ``out`` (rounded to its dtype)."""
    out.copy_(torch.from_numpy(np.ascontiguousarray(a)))


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A tensor whose rows have one stride (contiguous, or rows apart: ``row_stride``) read
    as a ``(rows, t.shape[-1])`` matrix, as row ops' kernels read theirs: a view, so that
    writing it writes ``t``. A 0-d tensor is one row of one element."""
    d = t.shape[-1] if t.dim() else 1
    return t.view(t.numel() // d if d else 0, d)
