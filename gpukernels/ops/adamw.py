"""adamw: the multi-tensor custom op ``gpukernels::adamw_step_`` behind
``gpukernels.optim.AdamW``, its fake implementation, and the checks of its
hyperparameters and tensor lists.

One call updates every tensor of the lists in place, as a GPU multi-tensor
kernel does from a table of pointers, so an optimizer step costs one call per
(device, dtype) bucket rather than a handful of elementwise ops per param.
``lr`` is a 0-dim tensor, not a float, so that a tensor lr changed in place
(by a scheduler, or between replays of a captured CUDA graph) is read at each
call instead of being baked into it; it is fp64 because PyTorch computes
``lr * weight_decay`` and ``lr / (1 - beta1**t)`` in Python floats (double),
and an fp32 lr alone would put fp64 params 5e-8 relative off PyTorch's.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .._backend import get_kernel
from ._checks import check_device, check_float, check_number, check_shape
from ._eager import direct


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Optimizer state is fp32 for fp32/bf16/fp16 params (bf16 moments lose
    the small updates) and fp64 for fp64 params."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def check_hyperparameters(lr: float | Tensor, betas: Sequence[float | Tensor], eps: float,
                          weight_decay: float) -> tuple[float, float]:
    """Reject what torch.optim.AdamW rejects, and non-finite values too;
    returns the betas as floats."""
    check_number("lr", lr, low=0.0)
    check_number("eps", eps, low=0.0)
    check_number("weight_decay", weight_decay, low=0.0)
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    return tuple(check_number(f"betas[{i}]", beta, low=0.0, high=1.0, high_open=True)
                 for i, beta in enumerate(betas))


def _check_tensor(name: str, t: Tensor, param: Tensor, shape: Sequence[int], dtype: torch.dtype) -> None:
    check_device(name, t, param)
    check_shape(name, t, shape)
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")


def _check_lists(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 max_exp_avg_sqs: list[Tensor], steps: list[Tensor], lr: Tensor, amsgrad: bool) -> None:
    """One grad, state tensor and step per param, each on the param's device,
    the grad in the param's dtype and shape, the state in ``state_dtype``;
    ``max_exp_avg_sqs`` is read only with ``amsgrad``."""
    state = {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, **({"max_exp_avg_sqs": max_exp_avg_sqs} if amsgrad else {})}
    for name, tensors in {"grads": grads, "steps": steps, **state}.items():
        if len(tensors) != len(params):
            raise ValueError(f"{name} must hold one tensor per param ({len(params)}), got {len(tensors)}")
    for i, p in enumerate(params):
        check_float(f"params[{i}]", p)
        _check_tensor(f"grads[{i}]", grads[i], p, p.shape, p.dtype)
        _check_tensor(f"steps[{i}]", steps[i], p, (), torch.float32)
        for name, tensors in state.items():
            _check_tensor(f"{name}[{i}]", tensors[i], p, p.shape, state_dtype(p.dtype))
    if params:
        _check_tensor("lr", lr, params[0], (), torch.float64)


def _adamw_step_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 max_exp_avg_sqs: list[Tensor], steps: list[Tensor], lr: Tensor, beta1: float, beta2: float,
                 eps: float, weight_decay: float, amsgrad: bool, maximize: bool) -> None:
    """Increment each ``steps[i]``, then apply one AdamW update to
    ``params[i]`` and its state (SPEC.md), all in place."""
    _check_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, amsgrad)
    if params:
        get_kernel("adamw", "adamw_step_", params[0].device)(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr,
            beta1, beta2, eps, weight_decay, amsgrad, maximize)


adamw_step_ = torch.library.custom_op("gpukernels::adamw_step_", _adamw_step_,
                                      mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"))


@adamw_step_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay,
      amsgrad, maximize):
    _check_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, amsgrad)


call_adamw_step_ = direct(adamw_step_, _adamw_step_)  # what the optimizer calls
