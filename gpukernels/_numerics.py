"""Numeric and layout rules every op and backend follows, in one place."""

from __future__ import annotations

import torch


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of statistics and accumulators: fp64 for fp64 tensors, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_count(x: torch.Tensor) -> int:
    """Rows of a contiguous ``x`` read as a ``(rows, x.shape[-1])`` matrix: the
    kernels of row ops (norms) take ``x`` of any shape, so that the public
    functions make no view of it (each a node of the autograd graph, with host
    time of its own). The last dim is at least 1."""
    return x.numel() // x.shape[-1]
