"""Numeric rules every op and backend follows, in one place."""

from __future__ import annotations

import torch


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of statistics and accumulators: fp64 for fp64 tensors, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
