"""cross_entropy: custom ops ``gpukernels::cross_entropy_fwd/_bwd``, their fake
implementations and autograd, and the checked public function.

The kernels see the logits as a contiguous ``(rows, C)`` matrix (class dim
last). The forward reads them once and saves, beside a reference to them, two
numbers per row: the max ``m`` and ``log sum exp(x - m)`` of the row's logsumexp.
The backward reads them once more and writes the gradient from those: no
logits-sized buffer but the gradient itself, and a gradient already scaled by
the upstream one (a scalar for mean/sum, per row for none).
The loss is computed in fp32 (fp64 for fp64 input) and returned in the input
dtype, as PyTorch returns it; the gradient is in the input dtype.
Double backward is not supported.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._backend import get_kernel
from ._checks import check_choice, check_device, check_float, check_number, check_optional_float
from ._eager import direct, reshaped, with_autograd

REDUCTIONS = ("mean", "sum", "none")
TARGET_DTYPES = (torch.int64, torch.int32)


def _stats_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _cross_entropy_fwd(logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                       label_smoothing: float, reduction: str) -> tuple[Tensor, Tensor, Tensor]:
    return get_kernel("cross_entropy", "cross_entropy_fwd", logits.device)(
        logits, target, weight, ignore_index, label_smoothing, reduction)


cross_entropy_fwd = torch.library.custom_op("gpukernels::cross_entropy_fwd", _cross_entropy_fwd, mutates_args=())


@cross_entropy_fwd.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, reduction):
    rows = logits.shape[0]
    loss_shape = (rows,) if reduction == "none" else ()
    return (logits.new_empty(loss_shape), logits.new_empty(rows, dtype=_stats_dtype(logits)),
            logits.new_empty(rows, dtype=_stats_dtype(logits)))


def _cross_entropy_bwd(grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor], row_max: Tensor,
                       log_sum: Tensor, ignore_index: int, label_smoothing: float, reduction: str) -> Tensor:
    return get_kernel("cross_entropy", "cross_entropy_bwd", logits.device)(
        grad_loss, logits, target, weight, row_max, log_sum, ignore_index, label_smoothing, reduction)


cross_entropy_bwd = torch.library.custom_op("gpukernels::cross_entropy_bwd", _cross_entropy_bwd, mutates_args=())


@cross_entropy_bwd.register_fake
def _(grad_loss, logits, target, weight, row_max, log_sum, ignore_index, label_smoothing, reduction):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, target, weight, ignore_index, label_smoothing, reduction = inputs
    _, row_max, log_sum = output
    ctx.mark_non_differentiable(row_max, log_sum)
    ctx.save_for_backward(logits, target, weight, row_max, log_sum)
    ctx.options = ignore_index, label_smoothing, reduction


def _backward(ctx, grad_loss, _grad_row_max, _grad_log_sum):
    logits, target, weight, row_max, log_sum = ctx.saved_tensors
    grad = _call_bwd(grad_loss.contiguous(), logits, target, weight, row_max, log_sum, *ctx.options)
    return grad, None, None, None, None, None


_call_bwd = direct(cross_entropy_bwd, _cross_entropy_bwd)
_call_fwd = with_autograd(cross_entropy_fwd, _cross_entropy_fwd, _setup_context, _backward)


def _check_target(target: Tensor, input: Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor of class indices, got {type(target).__name__}")
    if target.dtype not in TARGET_DTYPES:
        raise TypeError(f"target must hold class indices as int64 (or int32), got {target.dtype}; "
                        f"class-probability targets are not supported")
    check_device("target", target, input)
    if tuple(target.shape) != shape:
        raise ValueError(f"target must have shape {shape} for input of shape {tuple(input.shape)}, "
                         f"got {tuple(target.shape)}")


def _check_weight(weight: Tensor | None, input: Tensor, classes: int) -> None:
    check_optional_float("weight", weight, input, (classes,))
    if weight is None:
        return
    if weight.dtype != input.dtype:
        raise TypeError(f"weight must have input's dtype {input.dtype}, got {weight.dtype}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("weight must not require grad: cross_entropy is not differentiable with respect to it")


def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """``torch.nn.functional.cross_entropy`` with class-index targets: input
    ``(N, C)``, ``(N, C, d1, ...)`` or ``(C,)``; target ``(N, d1, ...)`` (``()``
    for 1-D input). Under autocast it runs in fp32 (fp64 stays fp64), as PyTorch's does."""
    check_float("input", input)
    if input.dim() == 0:
        raise ValueError("input must have a class dimension, got a 0-d tensor")
    class_dim = 0 if input.dim() == 1 else 1
    classes = input.shape[class_dim]
    if classes == 0:
        raise ValueError(f"input must have at least one class, got shape {tuple(input.shape)}")
    _check_target(target, input, tuple(input.shape[:class_dim] + input.shape[class_dim + 1:]))
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_choice("reduction", reduction, REDUCTIONS)
    label_smoothing = check_number("label_smoothing", label_smoothing, low=0.0, high=1.0)
    if torch.is_autocast_enabled(input.device.type) and input.dtype != torch.float64:
        input = input.float()
        weight = None if weight is None or weight.dtype == torch.float64 else weight.float()
    _check_weight(weight, input, classes)

    logits = input if class_dim == input.dim() - 1 else input.movedim(class_dim, -1)
    logits = reshaped(logits, input.numel() // classes, classes).contiguous()
    loss, _, _ = _call_fwd(logits, reshaped(target, target.numel()).long(), weight, ignore_index, label_smoothing,
                           reduction)
    return reshaped(loss, *target.shape) if reduction == "none" else loss
