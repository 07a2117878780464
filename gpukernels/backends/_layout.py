"""Memory layouts for the multi-tensor kernels (AdamW on Triton and CuPy),
which walk each param and its state as flat arrays side by side."""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def flat_strides(t: Tensor) -> tuple[int, ...] | None:
    """The strides of ``t``'s dims of size > 1 when its elements fill numel
    consecutive slots (contiguous, channels-last, transposed, ...), else None.
    Tensors of one shape and the same flat strides hold their elements in the
    same order, so a kernel can treat them as flat arrays side by side."""
    return _flat_strides(t.shape, t.stride())


@functools.lru_cache(maxsize=1024)  # a model has few shapes and layouts; an optimizer step asks of every param
def _flat_strides(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, ...] | None:
    dims = [(size, stride) for size, stride in zip(shape, strides) if size != 1]
    expected = 1
    for size, stride in sorted(dims, key=lambda dim: dim[1]):
        if stride != expected:
            return None
        expected *= size
    return tuple(stride for _, stride in dims)


def in_param_layout(columns: list[list[Tensor]]) -> list[list[Tensor]]:
    """``columns`` (params first) with each tensor replaced by a copy where
    it is not laid out in memory as its param (itself made contiguous if it
    does not fill its memory). The usual case, every tensor contiguous, copies
    nothing and returns ``columns`` itself."""
    if all(all(map(Tensor.is_contiguous, column)) for column in columns):
        return columns
    # every tensor with its param's strides, every param filling its memory (channels-last
    # conv weights and their state): nothing to copy either
    strides = list(map(Tensor.stride, columns[0]))
    if all(list(map(Tensor.stride, column)) == strides for column in columns[1:] if column) and None not in map(
        flat_strides, columns[0]
    ):
        return columns
    staged = [list(column) for column in columns]
    for i, param in enumerate(columns[0]):
        if param.numel() == 0:
            continue
        layout = flat_strides(param)
        if layout is None:
            staged[0][i] = param.contiguous()
            layout = flat_strides(staged[0][i])
        for column in staged[1:]:
            if column and flat_strides(column[i]) != layout:
                column[i] = torch.empty_like(staged[0][i], dtype=column[i].dtype).copy_(column[i])
    return staged


def copy_back(columns: list[list[Tensor]], staged: list[list[Tensor]], read_only: int) -> None:
    """Writes each staged copy back into its original; column ``read_only`` (the grads) is skipped."""
    if staged is columns:
        return
    for index, (column, staged_column) in enumerate(zip(columns, staged)):
        if index == read_only:
            continue
        for original, copy in zip(column, staged_column):
            if copy is not original:
                original.copy_(copy)
