"""cross_entropy: the ops ``gpukernels::cross_entropy_fwd/_bwd`` (class-index
targets) and ``gpukernels::cross_entropy_probs_fwd/_bwd`` (class-probability
targets), their output specs and kernel contracts, their autograd, and the
checked public function.

The kernels see the logits as a ``(rows, C)`` matrix (class dim last) whose
rows are contiguous, each ``logits.stride(0)`` elements after the last (a view
of a wider buffer, as a padded vocabulary's logits sliced to the real one, is
read where it is, not copied), class-probability targets as a contiguous
``(rows, C)`` matrix, class indices as a contiguous ``(rows,)`` vector. The
forward reads the logits once and saves, beside a reference to them, two
numbers per row: the max ``m`` and ``log sum exp(x - m)`` of the row's
logsumexp, in one ``stats`` tensor with what the backward needs besides
(``row_stats`` splits it); it reduces the rows' losses itself (``mean``,
``sum``), so the loss comes out of the kernels, in the logits' dtype or the one
asked for (``loss_dtype``). The backward reads the logits once more and writes the gradient
from those numbers, already scaled by the upstream gradient (and divided by the
mean's denominator): no logits-sized buffer but the gradient itself.
Statistics and sums are fp32 (fp64 for fp64 logits). Double backward is not
supported.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..errors import ArgumentError, ArgumentTypeError
from ._checks import (
    FLOAT_DTYPES,
    INT64_MAX,
    INT64_MIN,
    autocast_enabled,
    check_choice,
    check_device,
    check_float,
    check_ignore_index,
    check_number,
    check_optional_float,
    empty_grad,
)
from ._op import dense, kernel_op, reshaped, stats_dtype

REDUCTIONS = ("mean", "sum", "none")
TARGET_DTYPES = (torch.int64, torch.int32)


def _loss_and_stats(
    logits: Tensor, reduction: str, loss_dtype: Optional[torch.dtype], last: int
) -> tuple[Tensor, Tensor]:
    """The loss (one per row for ``none``) in ``loss_dtype`` (None: the logits'), then
    ``stats`` in the statistics dtype: each row's ``row_max``, each row's ``log_sum``, and
    ``last`` more values (``totals``; ``target_mass``)."""
    rows = logits.shape[0]
    return (
        logits.new_empty(size=(rows,) if reduction == "none" else (), dtype=loss_dtype or logits.dtype),
        logits.new_empty(2 * rows + last, dtype=stats_dtype(logits.dtype)),
    )


@kernel_op("cross_entropy")
def cross_entropy_fwd(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    loss_dtype: Optional[torch.dtype],
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Kernel, for class indices ``target`` (int64 or int32, one per row): per row
    ``-(1-e) w[t] logp[t] - (e/C) sum_c w[c] logp[c]`` (0 where ``t == ignore_index``),
    reduced by ``reduction`` (``mean`` divides by the sum of ``w[t]`` over the rows not
    ignored: nan when that is 0) into ``loss``, in ``loss_dtype`` (None: the
    logits'), rounded once from the statistics dtype; into ``stats``
    each row's ``row_max``, each row's ``log_sum`` (``lse = row_max + log_sum``), then the
    ``totals``: that denominator and ``sum(w)`` (C without weights). A target outside
    ``[0, C)`` that is not ``ignore_index`` is never read: an IndexError on CPU, a
    device-side assert on CUDA."""
    return _loss_and_stats(logits, reduction, loss_dtype, 2)


@kernel_op("cross_entropy")
def cross_entropy_bwd(
    grad_loss: Tensor,
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    stats: Tensor,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    backend: str,
) -> Tensor:
    """Kernel: d(loss)/d(logits) times ``grad_loss`` (0-d, or one per row for ``none``,
    any stride), from the forward's ``stats``:
    ``s_i ((1-e) w[t_i] (p - onehot(t_i)) + (e/C) (sum(w) p - w))``, 0 on ignored rows,
    with ``s_i`` the upstream gradient, divided by ``totals[0]`` for ``mean`` (0 when
    that is 0), in the logits' dtype."""
    return torch.empty_like(logits)


@kernel_op("cross_entropy")
def cross_entropy_probs_fwd(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    label_smoothing: float,
    reduction: str,
    loss_dtype: Optional[torch.dtype],
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Kernel, for class-probability ``target`` (the logits' shape and dtype): per row
    ``-sum_c q[c] logp[c]`` with ``q = w * ((1-e) target + e/C)``, reduced by
    ``reduction`` (``mean`` divides by the number of rows: nan when there are none) into
    ``loss``, in ``loss_dtype`` (None: the logits'); into ``stats`` each row's ``row_max``,
    each row's ``log_sum``, then each row's ``target_mass`` ``sum_c q[c]``."""
    return _loss_and_stats(logits, reduction, loss_dtype, logits.shape[0])


@kernel_op("cross_entropy")
def cross_entropy_probs_bwd(
    grad_loss: Tensor,
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    stats: Tensor,
    label_smoothing: float,
    reduction: str,
    grad_target: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Kernel: ``s_i (target_mass_i p - q)`` into ``grad`` (logits' dtype) and, when
    ``grad_target``, ``-s_i (1-e) w logp`` into ``target_grad`` (target's dtype; else
    empty), with ``s_i`` the upstream gradient (0-d, or one per row for ``none``, any
    stride), divided by the number of rows for ``mean``."""
    return torch.empty_like(logits), torch.empty_like(target) if grad_target else empty_grad(target)


def _setup_context(ctx, inputs, output):
    logits, target, weight, ignore_index, label_smoothing, reduction, _ = inputs
    stats = output[1]
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(logits, target, weight, stats)
    ctx.options = ignore_index, label_smoothing, reduction


def _backward(ctx, grad_loss, _grad_stats):
    saved = dense(*ctx.saved_tensors) if ctx.relaid else ctx.saved_tensors
    grad = cross_entropy_bwd.on(ctx.backend, grad_loss, *saved, *ctx.options)
    return grad, None, None, None, None, None, None


cross_entropy_fwd.register_autograd(_setup_context, _backward)


def _probs_setup_context(ctx, inputs, output):
    logits, target, weight, label_smoothing, reduction, _ = inputs
    stats = output[1]
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(logits, target, weight, stats)
    ctx.options = label_smoothing, reduction


def _probs_backward(ctx, grad_loss, _grad_stats):
    grad_target = ctx.needs_input_grad[1]
    saved = dense(*ctx.saved_tensors) if ctx.relaid else ctx.saved_tensors
    grad, target_grad = cross_entropy_probs_bwd.on(ctx.backend, grad_loss, *saved, *ctx.options, grad_target)
    return grad, target_grad if grad_target else None, None, None, None, None


cross_entropy_probs_fwd.register_autograd(_probs_setup_context, _probs_backward)


def _check_target(target: Tensor, input: Tensor, index_shape: Sequence[int]) -> bool:
    """Whether ``target`` holds class probabilities (else class indices of ``index_shape``)."""
    if not isinstance(target, Tensor):
        raise ArgumentTypeError(
            f"target must be a torch.Tensor of class indices or class probabilities, got {type(target).__name__}"
        )
    if target.device != input.device:
        check_device("target", target, input)
    if target.is_floating_point():
        if target.shape != input.shape:
            raise ArgumentError(
                f"target of class probabilities must have input's shape {tuple(input.shape)}, got "
                f"{tuple(target.shape)} (class indices: {tuple(index_shape)}, int64 or int32)"
            )
        return True
    if target.dtype not in TARGET_DTYPES:
        raise ArgumentTypeError(
            f"target must hold class indices as int64 (or int32), or class probabilities in input's "
            f"dtype, got {target.dtype}"
        )
    if target.shape != index_shape:
        raise ArgumentError(
            f"target must have shape {tuple(index_shape)} for input of shape {tuple(input.shape)}, got "
            f"{tuple(target.shape)}"
        )
    return False


def _check_weight(weight: Tensor, input: Tensor, classes: int) -> None:
    check_optional_float("weight", weight, input, (classes,))
    if weight.dtype != input.dtype:
        raise ArgumentTypeError(f"weight must have input's dtype {input.dtype}, got {weight.dtype}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ArgumentError("weight must not require grad: cross_entropy is not differentiable with respect to it")


def _class_last(t: Tensor, class_dim: int, classes: int) -> Tensor:
    """``t`` as a contiguous (rows, C) matrix, its class dim last."""
    t = t if class_dim == t.dim() - 1 else t.movedim(class_dim, -1)
    return reshaped(t, t.numel() // classes, classes).contiguous()


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """``torch.nn.functional.cross_entropy``: input ``(N, C)``, ``(N, C, d1, ...)`` or
    ``(C,)``; target class indices ``(N, d1, ...)`` (``()`` for 1-D input), int64 or
    int32, or class probabilities of input's shape and dtype (then ``ignore_index`` must
    be negative and does not apply, ``mean`` divides by the number of rows, and a target
    that requires grad gets one, as in PyTorch). Under autocast it computes in fp32 and
    returns an fp32 loss (fp64 stays fp64), as PyTorch's does; the kernels compute in
    fp32 whatever the logits' dtype, so with class indices and no class weights they
    read the logits as they are, where PyTorch's autocast makes (and keeps for the
    backward) an fp32 copy of them, and the gradient comes back in the logits' dtype,
    rounded once, as from that copy.

    ``out_dtype`` (float16, bfloat16, float32 or float64): the loss in that dtype,
    rounded once from the fp32 (fp64) sums: ``cross_entropy(logits.float(), ...)``'s
    loss from bf16 logits with ``torch.float32``, without the copy."""
    check_float("input", input)
    shape = input.shape  # read once: each read makes a new torch.Size (host time)
    if not shape:
        raise ArgumentError("input must have a class dimension, got a 0-d tensor")
    class_dim = 0 if len(shape) == 1 else 1
    classes = shape[class_dim]
    if classes == 0:
        raise ArgumentError(f"input must have at least one class, got shape {tuple(shape)}")
    batch_shape = shape[:class_dim] + shape[class_dim + 1 :]
    probabilities = _check_target(target, input, batch_shape)
    if not (type(ignore_index) is int and INT64_MIN <= ignore_index <= INT64_MAX):  # the usual call passes as is
        ignore_index = check_ignore_index(ignore_index)
    if probabilities and ignore_index >= 0:
        raise ArgumentError(
            f"ignore_index must be negative with class-probability targets (it does not apply to "
            f"them), got {ignore_index}"
        )
    if reduction not in REDUCTIONS:
        check_choice("reduction", reduction, REDUCTIONS)
    if not (type(label_smoothing) is float and 0.0 <= label_smoothing <= 1.0):  # the usual call passes as is
        label_smoothing = check_number("label_smoothing", label_smoothing, low=0.0, high=1.0)
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise ArgumentTypeError(
            f"out_dtype must be None or one of float16, bfloat16, float32 and float64, got {out_dtype!r}"
        )
    if autocast_enabled(input) and input.dtype != torch.float64:
        out_dtype = out_dtype or torch.float32
        if probabilities or weight is not None:  # theirs must be the logits' dtype: all in fp32, as autocast casts
            input = input.float()
            target = target.float() if probabilities else target
            weight = weight if weight is None or weight.dtype == torch.float64 else weight.float()
    if probabilities and target.dtype != input.dtype:
        raise ArgumentTypeError(
            f"target of class probabilities must have input's dtype {input.dtype}, got {target.dtype}"
        )
    if weight is not None:
        _check_weight(weight, input, classes)
        weight = weight.contiguous()

    if len(shape) == 2:  # (N, C): the rows as they are, wherever they start, if apart; no view (host time)
        strides = input.stride()
        logits = input if strides[1] == 1 and (strides[0] >= classes or shape[0] < 2) else input.contiguous()
        rows_target = target.contiguous()
    else:
        logits = _class_last(input, class_dim, classes)
        rows_target = (
            _class_last(target, class_dim, classes)
            if probabilities
            else reshaped(target, target.numel()).contiguous()  # a view may step over elements
        )
    if probabilities:
        loss, _ = cross_entropy_probs_fwd(logits, rows_target, weight, label_smoothing, reduction, out_dtype)
    else:
        loss, _ = cross_entropy_fwd(logits, rows_target, weight, ignore_index, label_smoothing, reduction, out_dtype)
    return reshaped(loss, *batch_shape) if reduction == "none" else loss
