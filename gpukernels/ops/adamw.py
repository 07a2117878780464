"""adamw: the multi-tensor op ``gpukernels::adamw_step_`` behind
``gpukernels.optim.AdamW`` (its output spec, which checks its tensor lists,
and kernel contract), and the checks of its hyperparameters.

One call updates every tensor of the lists in place, as a GPU multi-tensor
kernel does from a table of pointers, so an optimizer step costs one call per
(device, dtype) bucket rather than a handful of elementwise ops per param.
``lr`` is a 0-dim tensor, not a float, so that a tensor lr changed in place
(by a scheduler, or between replays of a captured CUDA graph) is read at each
call instead of being baked into it; it is fp64 because PyTorch computes
``lr * weight_decay`` and ``lr / (1 - beta1**t)`` in Python floats (double),
and an fp32 lr alone would put fp64 params 5e-8 relative off PyTorch's.

``grad_scale`` (None: no scaling) is a 0-dim fp64 tensor too, read on the
device: each gradient is multiplied by it as the kernel reads it, so gradient
clipping (``AdamW(max_grad_norm=...)``) or AMP's unscaling costs no pass of
its own over the gradients, nor a host sync. The product is formed in the
state dtype, the scale first rounded to it (as ``torch._foreach_mul_`` rounds
a scalar tensor to its opmath type): for fp32 and fp64 grads it is the grad
that ``_foreach_mul_`` would leave; for bf16/fp16 grads it is not rounded
back to the grad's dtype, as an in-place scaling must.

``found_inf`` (None: none) is a 0-dim fp32 tensor read on the device too:
nonzero, the call changes nothing (params, state and steps stay as they
were). It is AMP's ``GradScaler`` telling the step that the scaled gradients
overflowed, which skips the step without the host reading the flag.
"""

from __future__ import annotations

from itertools import chain
from operator import attrgetter
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

from .._backend import device_type
from ..errors import ArgumentError, ArgumentTypeError
from ._checks import FLOAT_DTYPES, PLAIN_TENSOR_TYPES, check_device, check_float, check_number, check_shape
from ._op import kernel_op, stats_dtype


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Optimizer state is in the statistics dtype: fp32 for fp32/bf16/fp16
    params (bf16 moments lose the small updates) and fp64 for fp64 params."""
    return stats_dtype(param_dtype)


def check_hyperparameters(
    lr: float | Tensor, betas: Sequence[float | Tensor], eps: float, weight_decay: float
) -> tuple[float, float]:
    """Reject what torch.optim.AdamW rejects, and non-finite values too;
    returns the betas as floats."""
    check_number("lr", lr, low=0.0)
    check_number("eps", eps, low=0.0)
    check_number("weight_decay", weight_decay, low=0.0)
    try:
        pair = tuple(betas)
    except TypeError:
        pair = ()
    if len(pair) != 2:
        raise ArgumentError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    return tuple(check_number(f"betas[{i}]", beta, low=0.0, high=1.0, high_open=True) for i, beta in enumerate(pair))


def _check_tensor(name: str, t: Tensor, param: Tensor, shape: Sequence[int], dtype: torch.dtype) -> None:
    check_device(name, t, param)
    check_shape(name, t, shape)
    if t.dtype != dtype:
        raise ArgumentTypeError(f"{name} must be {dtype}, got {t.dtype}")


_dtype, _shape = attrgetter("dtype"), attrgetter("shape")
_FLOAT_DTYPES = frozenset(FLOAT_DTYPES)
_OWN_STATE_DTYPES = frozenset(d for d in FLOAT_DTYPES if state_dtype(d) == d)
_is_cpu, _is_cuda = attrgetter("is_cpu"), attrgetter("is_cuda")


def _all_on(tensors: Iterable[Tensor], device: torch.device) -> bool:
    """Whether every tensor is on ``device``; on CPU and CUDA devices read from
    flags, which take a tenth of the time of making each tensor's torch.device."""
    kind = device_type(device)
    if kind == "cpu":
        return all(map(_is_cpu, tensors))
    if kind == "cuda":
        tensors = list(tensors)
        return all(map(_is_cuda, tensors)) and set(map(Tensor.get_device, tensors)) <= {device.index}
    return set(map(attrgetter("device"), tensors)) <= {device}


def _pass_every_check(
    params: list[Tensor], grads: list[Tensor], steps: list[Tensor], state: list[list[Tensor]]
) -> bool:
    """Whether the lists (of equal lengths, ``params`` not empty) pass every check of
    ``_check_lists`` on their tensors, found by passes over whole lists that run in C.
    Checked one tensor at a time, each by name, 200 params took 0.6 ms of CPU time,
    far more than the GPU takes to update them; these passes take a quarter of it."""
    kinds = set(map(type, params))
    if not (kinds <= PLAIN_TENSOR_TYPES or all(issubclass(kind, Tensor) for kind in kinds)):
        return False
    dtypes = list(map(_dtype, params))
    param_dtypes = set(dtypes)
    if not param_dtypes <= _FLOAT_DTYPES:
        return False
    # the state of fp32 and fp64 params is in their dtype
    state_dtypes = dtypes if param_dtypes <= _OWN_STATE_DTYPES else list(map(state_dtype, dtypes))
    shapes = list(map(_shape, params))
    return (
        _all_on(chain(params, grads, steps, *state), params[0].device)
        and list(map(_dtype, grads)) == dtypes
        and list(map(_shape, grads)) == shapes
        and all(list(map(_dtype, s)) == state_dtypes and list(map(_shape, s)) == shapes for s in state)
        and set(map(_dtype, steps)) == {torch.float32}
        and set(map(Tensor.dim, steps)) == {0}
    )


def _check_lists(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    lr: Tensor,
    amsgrad: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """Params on one device; one grad, state tensor and step per param, each on
    that device, the grad in the param's dtype and shape, the state in
    ``state_dtype``; ``max_exp_avg_sqs`` is read only with ``amsgrad``; ``lr``
    and ``grad_scale`` (if any) 0-dim fp64 on that device, ``found_inf`` (if
    any) 0-dim fp32."""
    state = {
        "exp_avgs": exp_avgs,
        "exp_avg_sqs": exp_avg_sqs,
        **({"max_exp_avg_sqs": max_exp_avg_sqs} if amsgrad else {}),
    }
    for name, tensors in {"grads": grads, "steps": steps, **state}.items():
        if len(tensors) != len(params):
            raise ArgumentError(f"{name} must hold one tensor per param ({len(params)}), got {len(tensors)}")
    if not params:
        return
    if not _pass_every_check(params, grads, steps, list(state.values())):
        for i, p in enumerate(params):  # the first tensor that fails, by name
            check_float(f"params[{i}]", p)
            if p.device != params[0].device:
                raise ArgumentError(
                    f"params[{i}] is on {p.device} but params[0] is on {params[0].device}: "
                    "one call updates the tensors of one device"
                )
            _check_tensor(f"grads[{i}]", grads[i], p, p.shape, p.dtype)
            _check_tensor(f"steps[{i}]", steps[i], p, (), torch.float32)
            for name, tensors in state.items():
                _check_tensor(f"{name}[{i}]", tensors[i], p, p.shape, state_dtype(p.dtype))
    _check_tensor("lr", lr, params[0], (), torch.float64)
    if grad_scale is not None:
        _check_tensor("grad_scale", grad_scale, params[0], (), torch.float64)
    if found_inf is not None:
        _check_tensor("found_inf", found_inf, params[0], (), torch.float32)


@kernel_op("adamw", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"))
def adamw_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    lr: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    grad_scale: Optional[Tensor],
    found_inf: Optional[Tensor],
    backend: str,
) -> None:
    """Kernel: increment each ``steps[i]``, then apply one AdamW update to
    ``params[i]`` and its state, all in place, for params of any float dtypes
    (one device), with the gradient ``grads[i] * grad_scale`` when a scale is
    given (the grads are only read); nothing at all where ``found_inf`` is given
    and not 0. No outputs: the spec checks the lists (``_check_lists``)."""
    _check_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, amsgrad, grad_scale, found_inf)
