"""gated_act: the gated-MLP activations ``swiglu(gate, up) = silu(gate) * up``
and ``geglu(gate, up) = gelu(gate) * up`` as one op family,
``gpukernels::gated_act_fwd/_bwd``, the activation an argument of both.

The kernels see ``gate`` and ``up`` as ``(rows, D)`` matrices of one shape whose
rows may lie apart (``row_stride``: the halves of a chunked projection are read
where they are, not copied), element by element; math in fp32 (fp64 for fp64
input), each result rounded once to the input dtype. Without ``up``, ``gate``
holds gate and up side by side in its last dim, ``2 * D`` wide (a fused gate-up
projection's output), and the backward writes both gradients into one tensor of
its shape: no concatenation of two. Nothing but the inputs is saved: the backward
recomputes ``act(gate)`` and its derivative and writes both gradients in one pass.

Autocast: PyTorch's ``F.silu(gate) * up`` and ``F.gelu(gate) * up`` are on no
autocast list, so they run in their inputs' dtype; so do these (bf16 gate and
up from autocast's linears give a bf16 result, fp32 inputs an fp32 one).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._numerics import row_stride
from ..errors import ArgumentError, ArgumentTypeError
from ._checks import check_choice, check_float, check_shape, empty_grad
from ._op import dense, kernel_op

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
_GELU_FOR_APPROXIMATE = {"none": "gelu", "tanh": "gelu_tanh"}


@kernel_op("gated_act")
def gated_act_fwd(gate: Tensor, up: Optional[Tensor], activation: str, backend: str) -> Tensor:
    """Kernel: ``y = act(gate) * up`` elementwise, ``act`` one of ACTIVATIONS, ``y``
    contiguous; without ``up``, the first and second halves of ``gate``'s last dim
    are gate and up, and ``y`` has half its last dim. ``gate`` and ``up`` are read
    as rows (``row_stride``)."""
    if up is None:
        return gate.new_empty(size=(*gate.shape[:-1], gate.shape[-1] // 2))
    return torch.empty_like(gate)  # contiguous: rows apart are not dense


@kernel_op("gated_act")
def gated_act_bwd(
    dy: Tensor, gate: Tensor, up: Optional[Tensor], activation: str, backend: str
) -> tuple[Tensor, Tensor]:
    """Kernel: ``dgate = dy * up * act'(gate)`` and ``dup = dy * act(gate)``, ``act``
    recomputed from ``gate``; ``dy`` contiguous, ``gate`` and ``up`` as the forward's.
    Without ``up``, ``dgate`` holds both side by side, as ``gate`` does, and ``dup`` is empty."""
    if up is None:
        return torch.empty_like(gate), empty_grad(gate)
    return torch.empty_like(gate), torch.empty_like(up)


def _setup_context(ctx, inputs, output):
    gate, up, activation = inputs
    ctx.save_for_backward(gate, up)
    ctx.activation = activation


def _backward(ctx, dy):
    gate, up = dense(*ctx.saved_tensors) if ctx.relaid else ctx.saved_tensors
    dgate, dup = gated_act_bwd.on(ctx.backend, dy.contiguous(), gate, up, ctx.activation)
    return dgate, None if up is None else dup, None


gated_act_fwd.register_autograd(_setup_context, _backward)


def _as_rows(t: Tensor) -> Tensor:
    """``t`` as the kernels read it: itself when its rows have one stride, else a contiguous copy."""
    return t if row_stride(t) is not None else t.contiguous()


def _gated_act(gate: Tensor, up: Tensor | None, activation: str) -> Tensor:
    check_float("gate", gate)
    if up is None:
        if gate.dim() == 0 or gate.shape[-1] % 2:
            raise ArgumentError(
                f"gate without up must hold gate and up side by side in its last dim, of even size, "
                f"got shape {tuple(gate.shape)}"
            )
        return gated_act_fwd(_as_rows(gate), None, activation)
    check_float("up", up)
    if up.device != gate.device:
        raise ArgumentError(f"up is on {up.device} but gate is on {gate.device}; move them to one device")
    if up.dtype != gate.dtype:
        raise ArgumentTypeError(f"up has dtype {up.dtype} but gate has {gate.dtype}; cast them to one dtype")
    check_shape("up", up, gate.shape)
    # contiguous: as they are, without the calls (host time)
    gate = gate if gate.is_contiguous() else _as_rows(gate)
    return gated_act_fwd(gate, up if up.is_contiguous() else _as_rows(up), activation)


def swiglu(gate: Tensor, up: Tensor | None = None) -> Tensor:
    """``F.silu(gate) * up``, the gated MLP of LLaMA-style models, in one kernel
    each way. ``gate`` and ``up`` must have one shape, dtype and device. Without
    ``up``, ``gate`` holds gate then up in its last dim (a fused gate-up projection's
    output, as Phi-3's): ``swiglu(*x.chunk(2, dim=-1))``, with one gradient for ``x``
    written whole, not concatenated from two."""
    return _gated_act(gate, up, "silu")


def geglu(gate: Tensor, up: Tensor | None = None, approximate: str = "none") -> Tensor:
    """``F.gelu(gate, approximate=approximate) * up`` (``"none"``: the erf form,
    ``"tanh"``: the tanh approximation), in one kernel each way. ``gate`` and
    ``up`` must have one shape, dtype and device; without ``up``, as ``swiglu``'s."""
    check_choice("approximate", approximate, tuple(_GELU_FOR_APPROXIMATE))
    return _gated_act(gate, up, _GELU_FOR_APPROXIMATE[approximate])
