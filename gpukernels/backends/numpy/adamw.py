"""AdamW over a list of tensors, updated in place.

Each tensor is updated with vectorised NumPy on views of its storage, in the
order of operations of torch.optim.AdamW's single-tensor path (lerp for the
first moment, mul + addcmul for the second, addcdiv with -step_size; scalars
in Python floats). fp64 results equal PyTorch's to ~1e-16; fp32 ones differ
by ulps, because PyTorch's CPU kernels fuse multiply-adds and its sqrt is
not correctly rounded (up to 0.75 ulp). The state (fp32, or fp64 for fp64
params) is always updated through views; a bf16/fp16 param is widened to fp32,
updated there and rounded once at the end. A ``grad_scale`` multiplies the
widened grad, in the compute dtype, before anything else reads it. A nonzero
``found_inf`` leaves everything as it is.
"""

from __future__ import annotations

import numpy as np
import torch

from ._arrays import as_array, compute_dtype


def _lerp_(start: np.ndarray, end: np.ndarray, weight: np.floating) -> None:
    """``start.lerp_(end, weight)`` with PyTorch's two formulas, each exact at
    its own end of the weight range."""
    if abs(weight) < 0.5:
        start += weight * (end - start)
    else:
        start[...] = end - (end - start) * (weight.dtype.type(1) - weight)


def _update_one(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    max_exp_avg_sq: torch.Tensor | None,
    step: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    grad_scale: float | None,
) -> None:
    scalar = compute_dtype(param.dtype).type
    step_view = step.numpy()
    step_view += 1
    t = float(step_view)
    p = as_array(param)  # a view for fp32/fp64 params, a widened copy otherwise
    g = as_array(grad, param.dtype)  # a view of an fp32/fp64 grad: not scaled in place
    if grad_scale is not None:
        g = g * scalar(grad_scale)
    if maximize:
        g = -g
    m, v = exp_avg.numpy(), exp_avg_sq.numpy()

    if weight_decay != 0:
        p *= scalar(1 - lr * weight_decay)
    _lerp_(m, g, scalar(1 - beta1))
    v *= scalar(beta2)
    v += scalar(1 - beta2) * g * g
    if max_exp_avg_sq is not None:
        v_max = max_exp_avg_sq.numpy()
        v = np.maximum(v_max, v, out=v_max)

    # Bias corrections and step size in Python floats (double), as PyTorch's.
    step_size = lr / (1 - beta1**t)
    denom = np.sqrt(v) / scalar((1 - beta2**t) ** 0.5) + scalar(eps)
    p += scalar(-step_size) * m / denom
    if param.dtype not in (torch.float32, torch.float64):
        param.copy_(torch.from_numpy(p))


def adamw_step_(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    steps,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    amsgrad,
    maximize,
    grad_scale=None,
    found_inf=None,
):
    if found_inf is not None and found_inf.item():
        return
    lr = lr.item()
    scale = None if grad_scale is None else grad_scale.item()
    max_sqs = max_exp_avg_sqs if amsgrad else [None] * len(params)
    for param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step in zip(
        params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, strict=True
    ):
        _update_one(
            param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, maximize, scale
        )
