"""gated_act: the gated-MLP activations ``swiglu(gate, up) = silu(gate) * up``
and ``geglu(gate, up) = gelu(gate) * up`` as one op family,
``gpukernels::gated_act_fwd/_bwd``, the activation an argument of both.

The kernels see ``gate`` and ``up`` as contiguous tensors of one shape, element
by element; math in fp32 (fp64 for fp64 input), each result rounded once to the
input dtype. Nothing but the inputs is saved: the backward recomputes
``act(gate)`` and its derivative and writes both gradients in one pass.

Autocast: PyTorch's ``F.silu(gate) * up`` and ``F.gelu(gate) * up`` are on no
autocast list, so they run in their inputs' dtype; so do these (bf16 gate and
up from autocast's linears give a bf16 result, fp32 inputs an fp32 one).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ArgumentError, ArgumentTypeError
from ._checks import check_choice, check_float, check_shape
from ._op import dense, kernel_op

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
_GELU_FOR_APPROXIMATE = {"none": "gelu", "tanh": "gelu_tanh"}


@kernel_op("gated_act")
def gated_act_fwd(gate: Tensor, up: Tensor, activation: str, backend: str) -> Tensor:
    """Kernel: ``y = act(gate) * up`` elementwise, ``act`` one of ACTIVATIONS."""
    return torch.empty_like(gate)


@kernel_op("gated_act")
def gated_act_bwd(dy: Tensor, gate: Tensor, up: Tensor, activation: str, backend: str) -> tuple[Tensor, Tensor]:
    """Kernel: ``dgate = dy * up * act'(gate)`` and ``dup = dy * act(gate)``, ``act``
    recomputed from ``gate``; ``dy``, ``gate`` and ``up`` contiguous, of one shape."""
    return torch.empty_like(gate), torch.empty_like(up)


def _setup_context(ctx, inputs, output):
    gate, up, activation = inputs
    ctx.save_for_backward(gate, up)
    ctx.activation = activation


def _backward(ctx, dy):
    gate, up = dense(*ctx.saved_tensors) if ctx.relaid else ctx.saved_tensors
    dgate, dup = gated_act_bwd.on(ctx.backend, dy.contiguous(), gate, up, ctx.activation)
    return dgate, dup, None


gated_act_fwd.register_autograd(_setup_context, _backward)


def _gated_act(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    check_float("gate", gate)
    check_float("up", up)
    if up.device != gate.device:
        raise ArgumentError(f"up is on {up.device} but gate is on {gate.device}; move them to one device")
    if up.dtype != gate.dtype:
        raise ArgumentTypeError(f"up has dtype {up.dtype} but gate has {gate.dtype}; cast them to one dtype")
    check_shape("up", up, gate.shape)
    return gated_act_fwd(gate.contiguous(), up.contiguous(), activation)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``F.silu(gate) * up``, the gated MLP of LLaMA-style models, in one kernel
    each way. ``gate`` and ``up`` must have one shape, dtype and device."""
    return _gated_act(gate, up, "silu")


def geglu(gate: Tensor, up: Tensor, approximate: str = "none") -> Tensor:
    """``F.gelu(gate, approximate=approximate) * up`` (``"none"``: the erf form,
    ``"tanh"``: the tanh approximation), in one kernel each way. ``gate`` and
    ``up`` must have one shape, dtype and device."""
    check_choice("approximate", approximate, tuple(_GELU_FOR_APPROXIMATE))
    return _gated_act(gate, up, _GELU_FOR_APPROXIMATE[approximate])
