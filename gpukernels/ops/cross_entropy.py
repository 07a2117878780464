"""cross_entropy: custom op ``gpukernels::cross_entropy_fwd``, its fake
implementation and autograd, and the checked public function.

The kernel sees the logits as a contiguous ``(rows, C)`` matrix (class dim
last) and, when asked, returns the gradient of the reduced loss with respect
to the logits from the same pass over them. The backward then only scales that
gradient by the upstream one (a scalar for mean/sum, per row for none), so no
second pass over the logits and no saved softmax beyond the gradient itself.
The loss is computed in fp32 (fp64 for fp64 input) and returned in the input
dtype, as PyTorch returns it; the gradient is in the input dtype.
Double backward is not supported: the saved gradient is not differentiable.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._backend import get_kernel
from ._checks import check_choice, check_device, check_float, check_number, check_optional_float

REDUCTIONS = ("mean", "sum", "none")
TARGET_DTYPES = (torch.int64, torch.int32)


@torch.library.custom_op("gpukernels::cross_entropy_fwd", mutates_args=())
def cross_entropy_fwd(logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                      label_smoothing: float, reduction: str, compute_grad: bool) -> tuple[Tensor, Tensor]:
    return get_kernel("cross_entropy", "cross_entropy_fwd", logits.device)(
        logits, target, weight, ignore_index, label_smoothing, reduction, compute_grad)


@cross_entropy_fwd.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, reduction, compute_grad):
    loss_shape = (logits.shape[0],) if reduction == "none" else ()
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    return logits.new_empty(loss_shape), grad


def _setup_context(ctx, inputs, output):
    _, _, _, _, _, reduction, compute_grad = inputs
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.save_for_backward(grad)
    ctx.reduction = reduction
    ctx.compute_grad = compute_grad


def _backward(ctx, dloss, _dgrad):
    if not ctx.compute_grad:
        raise RuntimeError("cross_entropy_fwd was called with compute_grad=False, so it has no gradient to give; "
                           "call it with compute_grad=True (gpukernels.cross_entropy decides this itself)")
    (grad,) = ctx.saved_tensors
    upstream = dloss[:, None] if ctx.reduction == "none" else dloss
    return grad * upstream, None, None, None, None, None, None


cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


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

    logits = input.movedim(class_dim, -1).reshape(-1, classes).contiguous()
    compute_grad = input.requires_grad and torch.is_grad_enabled()
    loss, _ = cross_entropy_fwd(logits, target.reshape(-1).long(), weight, ignore_index,
                                label_smoothing, reduction, compute_grad)
    return loss.view(target.shape) if reduction == "none" else loss
