"""Numeric and layout rules every op and backend follows, in one place."""

from __future__ import annotations

from typing import Sequence

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


def rows_and_features(x: torch.Tensor) -> tuple[int, int]:
    """``(row_count(x), x.shape[-1])``, reading the shape once (each read makes a new
    torch.Size: host time)."""
    d = x.shape[-1]
    return x.numel() // d, d


def merged_stride(shape: Sequence[int], strides: Sequence[int]) -> int | None:
    """The stride of ``shape``'s dims read as one axis: its innermost dim's of more than
    one element (1 when there is none); None where they make no one axis (``reshape``
    would copy)."""
    inner, step = 1, None  # the axis's stride; the stride the next outer dim must have
    for size, stride in zip(reversed(shape), reversed(strides)):
        if size <= 1:  # no step through it
            continue
        if step is None:
            inner = stride
        elif stride != step:
            return None
        step = size * stride
    return inner


def ncl_strides(shape: Sequence[int], strides: Sequence[int]) -> tuple[int, int, int] | None:
    """The strides of the ``(N, C, L)`` view of an ``(N, C, *)`` tensor, ``L`` its dims
    after C as one axis (NCHW and channels-last input alike), for kernels that take
    such a tensor as it is (no view around the op: an autograd node, host time); None
    where those dims make no one axis."""
    inner = merged_stride(shape[2:], strides[2:])
    return None if inner is None else (strides[0], strides[1], inner)


def row_stride(t: torch.Tensor) -> int | None:
    """The stride between the rows of ``t`` read as a ``(rows, t.shape[-1])`` matrix whose
    rows may lie apart (the halves of a chunked projection, say): the stride of its
    leading dims as one axis, when its last dim is unit-strided; None otherwise. A
    contiguous tensor's is its last dim (1 for a 0-d one)."""
    if t.is_contiguous():
        return t.shape[-1] if t.dim() else 1
    shape, strides = t.shape, t.stride()
    if shape[-1] > 1 and strides[-1] != 1:
        return None
    return merged_stride(shape[:-1], strides[:-1])


_ncl_of_layouts: dict = {}


def ncl_strides_of(t: torch.Tensor) -> tuple[int, int, int] | None:
    """``ncl_strides`` of ``t``'s shape and strides, kept per layout: a dict lookup
    on later calls (host time: an op reads it forward and backward)."""
    key = (t.shape, t.stride())
    found = _ncl_of_layouts.get(key, key)  # key: none kept (None is an answer)
    if found is key:
        found = ncl_strides(*key)
        # not kept while Dynamo traces: inside an autograd.Function's backward (batch_norm's)
        # it refuses a write to module state, which failed a fullgraph compile
        if not torch.compiler.is_compiling():
            if len(_ncl_of_layouts) >= 1024:  # layouts grow with every new shape: start over
                _ncl_of_layouts.clear()
            _ncl_of_layouts[key] = found
    return found


def row_stats(stats: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The parts of a cross-entropy op's ``stats`` (one tensor: one allocation and one
    saved tensor, not three), as views: each of the ``rows`` rows' max ``m``, each row's
    ``log sum exp(logit - m)``, then what follows them (totals, or each row's target mass)."""
    return stats[:rows], stats[rows : 2 * rows], stats[2 * rows :]
