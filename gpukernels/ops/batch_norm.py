"""batch_norm: the ops ``gpukernels::batch_norm_fwd/_bwd`` (output specs and
kernel contracts), their autograd, and the checked public function.

The kernels take ``x`` as it is, ``(N, C, *)`` of any strides whose dims after
C make one axis ``L`` (``ncl_strides``: NCHW and channels-last input alike;
other strides are copied first), and read it as ``(N, C, L)``; they write ``y``
and ``dx`` into outputs laid out as ``torch.empty_like(x)`` lays them out, so
channels-last in is channels-last out, and no view of the input is made
around the op (each an autograd node, with host time of its own). Statistics
are per channel over the ``M = N*L`` other elements, in the statistics dtype;
the forward returns the mean and rstd it normalised with (the batch's in
training, the running stats' in eval) for the backward, in one ``(2, C)``
tensor (one allocation and one saved tensor, not two).

``activation`` (one of linear_act's: none, relu, gelu, gelu_tanh, silu, quick_gelu, relu_squared) is
applied to the normalised output in the same pass, as ``act(batch_norm(x))``
would be to its output rounded to x's dtype, so that a BatchNorm and the
activation after it (a ResNet's BN + ReLU) read and write their
activation-sized tensors once each way instead of twice. The backward keeps
nothing more: it recomputes the normalised value from x and the statistics,
which it reads anyway, for the activation's derivative.

``residual`` (a tensor of the input's shape and dtype) is added before the
activation, ``act(batch_norm(x) + residual)``, as a ResNet block ends
(``x = bn3(x); x += shortcut; x = relu(x)``), with PyTorch's roundings: the
normalised value rounded to x's dtype, then the sum. Its activation is none or
relu; relu's backward reads the output (``y > 0`` where the sum is: the next
layer holds ``y`` anyway), turns dy into the sum's gradient, which is the
residual's, and hands that to the plain backward kernels: the bytes one fused
backward pass would move, and the forward saves the sum's write and read and
the activation's pass.
"""

from __future__ import annotations

import math
import operator
from typing import Optional, Sequence

import torch
from torch import Tensor

from .._backend import backend_for
from .._numerics import ncl_strides_of
from ..errors import ArgumentError, ArgumentTypeError
from ._checks import (
    FLOAT_DTYPES,
    PLAIN_TENSOR_TYPES,
    check_choice,
    check_device,
    check_float,
    check_number,
    check_optional_floats,
    contiguous_param,
    empty_grad,
)
from ._op import (
    DispatchEveryOp,
    eager_apply,
    kernel_op,
    legacy_batched,
    needs_dispatch,
    refuse_second_derivative,
    reshaped,
    stats_dtype,
    transform_function,
    under_func_transforms,
)
from .linear_act import ACTIVATIONS

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@kernel_op("batch_norm", mutates_args=("running_mean", "running_var"))
def batch_norm_fwd(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    residual: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
    activation: str,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Kernel: ``y`` = ``act(z)``, ``z = (x - mean) * rstd * weight + bias`` (weight
    and bias each optional) rounded to x's dtype, plus ``residual`` (x's shape and
    dtype, any strides; optional) rounded again when given, and
    ``stats``, the per-channel ``mean`` it normalised with, then the per-channel
    ``rstd``, in the statistics dtype. In training these are the
    batch's (nan for M == 0), and the running stats (when given) take
    ``momentum`` of the batch mean and of the unbiased (M/(M-1)) variance; in
    eval they are the running stats'."""
    return torch.empty_like(x), x.new_empty(2, x.shape[1], dtype=stats_dtype(x.dtype))


@kernel_op("batch_norm")
def batch_norm_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    stats: Tensor,
    training: bool,
    activation: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Kernel: ``dx``, from the forward's ``stats`` (in training the batch
    statistics' dependence on x included), for the gradient ``dz = dy * act'(z)``
    of the normalised value ``z`` (recomputed from x, stats, weight and bias, and
    rounded to x's dtype, as the forward did; ``dz = dy`` for none);
    ``dweight = sum(dz * xhat)`` in the weight's dtype when there is a weight,
    and ``dbias = sum(dz)`` when there is a bias, in the weight's dtype (the bias
    shares it) or else the statistics dtype; empty when not wanted."""
    # empty_like of the weight (contiguous, (C,)) parses fewer arguments than new_empty(C, dtype=): host time
    dweight = torch.empty_like(weight) if weight is not None else empty_grad(x)
    if bias is None:
        dbias = empty_grad(x)
    else:
        dbias = torch.empty_like(weight) if weight is not None else x.new_empty(x.shape[1], dtype=stats_dtype(x.dtype))
    return torch.empty_like(x), dweight, dbias


class _BatchNormFunction(torch.autograd.Function):
    """Autograd around the forward op: custom_op's register_autograd refuses
    ops that mutate inputs (here the running stats), an autograd.Function
    does not, and torch.compile traces it without a graph break. The backend
    is chosen once, by the caller, so the backward runs on the forward's."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        residual: Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
        activation: str,
        backend: str,
        dispatch: bool,
    ) -> Tensor:
        run = batch_norm_fwd.on if dispatch else batch_norm_fwd.eagerly  # the caller's needs_dispatch
        args = (x, weight, bias, running_mean, running_var, residual, training, momentum, eps, activation)
        y, stats = run(backend, *args)
        _save(ctx, x, weight, bias, residual, training, activation, backend, y, stats)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        if legacy_batched(dy):  # batched gradients (DispatchEveryOp)
            with DispatchEveryOp():
                return _BatchNormFunction._backward(ctx, dy)
        return _BatchNormFunction._backward(ctx, dy)

    @staticmethod
    @refuse_second_derivative("batch_norm")
    def _backward(ctx, dy: Tensor):
        x, weight, bias, stats, relu_output = ctx.saved_tensors
        # a saved_tensors_hooks unpack may lay them out anew (same values): dense then
        if x.stride() != ctx.x_strides:
            x = x.contiguous()
        stats = stats.contiguous()
        activation, dresidual = ctx.activation, None
        if ctx.has_residual:  # dy becomes the gradient of the sum, the residual's too
            if relu_output is not None:
                dy = torch.ops.aten.threshold_backward(dy, relu_output, 0)
            activation, dresidual = "none", dy
        if dy.dim() > 3 and not ncl_strides_of(dy):  # the kernels read dy as (N, C, L) too
            dy = dy.contiguous()
        dx, dweight, dbias = batch_norm_bwd.on(ctx.backend, dy, x, weight, bias, stats, ctx.training, activation)
        return (
            dx,
            dweight if weight is not None else None,
            (dbias if dbias.dtype == bias.dtype else dbias.to(bias.dtype)) if bias is not None else None,
            None,
            None,
            dresidual,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


_apply_eagerly = eager_apply(_BatchNormFunction)


def _save(ctx, x, weight, bias, residual, training, activation, backend, y, stats) -> None:
    # with a residual, relu's mask is read off the output (the sum is not kept); none needs nothing
    relu_output = y if residual is not None and activation == "relu" else None
    ctx.save_for_backward(x, weight, bias, stats, relu_output)
    ctx.x_strides = x.stride()
    ctx.training, ctx.activation, ctx.backend = training, activation, backend
    ctx.has_residual = residual is not None


def _setup_context_for_transforms(ctx, inputs, output):
    x, weight, bias, _, _, residual, training, _, _, activation, backend = inputs
    _save(ctx, x, weight, bias, residual, training, activation, backend, *output)


# the forward's statistics are an output here (setup_context saves them): no gradient of theirs
_apply_under_transforms = transform_function(
    "batch_norm",
    lambda *args: batch_norm_fwd.on(args[-1], *args[:-1]),
    _setup_context_for_transforms,
    lambda ctx, dy, _dstats: _BatchNormFunction.backward(ctx, dy)[:-1],
).apply


PARAM_NAMES = ("weight", "bias", "running_mean", "running_var")
_CHECK_ORDER = (2, 3, 0, 1)  # running stats first: their errors come before the affine parameters'


def check_params(input: Tensor, params: Sequence[Tensor | None], training: bool = True) -> None:
    """The parameters and running stats (``PARAM_NAMES``), each optional: running
    stats both given or both not (and given in eval), floating, on input's device,
    of shape (C,), with dtypes as ``check_param_dtypes`` says. The usual call (plain
    tensors, all four given, of one allowed dtype) passes in one pass of reads (host
    time); anything else goes through the checks that name what fails."""
    first = params[0]
    if type(first) in PLAIN_TENSOR_TYPES and first.dtype in _ALLOWED_PARAM_DTYPES[input.dtype]:
        shape, device, dtype = (input.shape[1],), input.device, first.dtype
        for t in params:  # None among them fails the type check
            if not (type(t) in PLAIN_TENSOR_TYPES and t.dtype == dtype and t.shape == shape and t.device == device):
                break
        else:
            return
    running_mean, running_var = params[2:]
    if (running_mean is None) != (running_var is None):
        raise ArgumentError("running_mean and running_var must either both be None or neither be None")
    if running_mean is None and not training:
        raise ArgumentError("running_mean and running_var must be given when training=False (they normalise the input)")
    ordered = operator.itemgetter(*_CHECK_ORDER)
    check_optional_floats(ordered(PARAM_NAMES), ordered(params), input, (input.shape[1],))
    check_param_dtypes(input, params)


# a dict, not a cached function: torch.compile warns of every lru_cache it traces through
_ALLOWED_PARAM_DTYPES = {
    dtype: frozenset((dtype, torch.float32) if dtype in _LOW_PRECISION else (dtype,)) for dtype in FLOAT_DTYPES
}


def check_param_dtypes(input: Tensor, params: Sequence[Tensor | None]) -> None:
    """As PyTorch's mixed-precision BatchNorm: the parameters and running stats
    (``PARAM_NAMES``) share one dtype, which is input's, or float32 for bf16/fp16 input."""
    allowed = _ALLOWED_PARAM_DTYPES[input.dtype]  # input is floating: checked first
    dtypes = {t.dtype for t in params if t is not None}
    if len(dtypes) <= 1 and dtypes <= allowed:
        return
    shared = None  # (name, dtype) of the first one given
    for name, t in zip(PARAM_NAMES, params):
        if t is None:
            continue
        if t.dtype not in allowed:
            raise ArgumentTypeError(
                f"{name} must have dtype {' or '.join(sorted(map(str, allowed)))} "
                f"for {input.dtype} input, got {t.dtype}"
            )
        if shared is None:
            shared = (name, t.dtype)
        elif t.dtype != shared[1]:
            raise ArgumentTypeError(
                f"{name} has dtype {t.dtype} but {shared[0]} has {shared[1]}; "
                f"parameters and running stats must share one dtype"
            )


def _check_residual(input: Tensor, residual: Tensor, activation: str) -> None:
    if not isinstance(residual, Tensor):
        raise ArgumentTypeError(f"residual must be a Tensor or None, got {type(residual).__name__}")
    if residual.shape != input.shape:
        raise ArgumentError(f"residual must have the input's shape {tuple(input.shape)}, got {tuple(residual.shape)}")
    if residual.dtype != input.dtype:
        raise ArgumentTypeError(f"residual must have the input's dtype {input.dtype}, got {residual.dtype}")
    check_device("residual", residual, input)
    if activation not in ("none", "relu"):
        raise ArgumentError(f"activation with a residual must be 'none' or 'relu', got {activation!r}")


def _empty_batch(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """What PyTorch returns for an input with no elements: a fresh empty
    output still connected to weight and bias (zero gradients); running
    stats untouched. (Any activation of no elements is that too.)"""
    y = x.clone()
    if weight is not None:
        y = y * weight.view(1, -1, 1)
    if bias is not None:
        y = y + bias.view(1, -1, 1)
    return y.to(x.dtype)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str = "none",
    residual: Tensor | None = None,
) -> Tensor:
    """``torch.nn.functional.batch_norm`` for ``(N, C, *)`` input: per-channel
    statistics over the other dims; in training, ``running_mean`` and
    ``running_var`` (when given) are updated in place with the unbiased
    batch variance. ``activation`` (none, relu, gelu, gelu_tanh, silu, quick_gelu, relu_squared) is
    applied to the output in the same kernels: ``act(batch_norm(...))``;
    ``residual``, of the input's shape and dtype, is added before it
    (``act(batch_norm(...) + residual)``, activation none or relu)."""
    check_float("input", input)
    shape = input.shape  # read once: each read makes a new torch.Size (host time)
    dims = len(shape)
    if dims < 2:
        raise ArgumentError(f"input must have shape (N, C), (N, C, L) or (N, C, H, W), got {tuple(shape)}")
    training = bool(training)
    n, channels = shape[0], shape[1]
    check_params(input, (weight, bias, running_mean, running_var), training)
    if not (type(eps) is float and 0.0 < eps < math.inf):  # the usual call passes as is
        eps = check_number("eps", eps, low=0.0, low_open=training)
    if not (type(momentum) is float and -math.inf < momentum < math.inf):
        momentum = check_number("momentum", momentum)
    if activation not in ACTIVATIONS:
        check_choice("activation", activation, ACTIVATIONS)
    if residual is not None:
        _check_residual(input, residual, activation)
    numel = input.numel()
    length = numel // (n * channels) if numel else math.prod(shape[2:])
    if training and n * length == 1:
        raise ArgumentError(f"Expected more than 1 value per channel when training, got input of shape {tuple(shape)}")
    if numel == 0:
        y = _empty_batch(reshaped(input, n, channels, length), weight, bias).view(size=shape)
        return y if residual is None else y + residual
    # as it is, NCHW and channels-last alike; a copy only for strides no (N, C, L) view can express
    x = input if dims <= 3 or ncl_strides_of(input) else input.reshape(n, channels, length)
    if residual is not None and residual.dim() > 3:  # read as (N, C, L) too, as x is
        if x is not input:
            residual = residual.reshape(shape=x.shape)
        elif not ncl_strides_of(residual):
            residual = residual.contiguous()
    # the kernels read the parameters and update the running stats element after element: a
    # view that steps over elements goes through a contiguous copy (the stats copied back)
    running = running_mean, running_var
    if running_mean is not None:
        running_mean, running_var = running_mean.contiguous(), running_var.contiguous()
    weight, bias = contiguous_param(weight), contiguous_param(bias)
    args = (x, weight, bias, running_mean, running_var, residual, training, momentum, eps, activation, backend_for(x))
    # Function.apply's Python layer serves torch.compile and modes, and torch.func's transforms a
    # Function of the form they take; on plain tensors, outside them, its C apply (host time), and
    # with grad mode off no Function at all
    if needs_dispatch(args):
        y = _apply_under_transforms(*args)[0] if under_func_transforms() else _BatchNormFunction.apply(*args, True)
    elif torch.is_grad_enabled():
        y = _apply_eagerly(*args, False)
    else:
        y, _ = batch_norm_fwd.eagerly(args[-1], *args[:-1])
    if training:
        for given, updated in zip(running, (running_mean, running_var)):
            if updated is not given:
                given.copy_(updated)
    return y if x is input else y.view(size=shape)
