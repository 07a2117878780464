"""Gated activations ``y = act(gate) * up`` on flat contiguous tensors, and
their backward: one elementwise pass each way. The backward recomputes
``act(gate)`` and ``act'(gate)`` (a few flops per element, against the bytes a
saved activation would cost) and writes ``dgate`` and ``dup`` together. The
activations and their derivatives are linear_act's.

``launch_elementwise`` and ``elementwise_offsets`` are the two halves of an
elementwise kernel's launch, kept apart from this op's math.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import acc_dtype, aligned, cdiv, next_power_of_2, round_to
from ._launch import jit
from .linear_act import _activation, _activation_grad

# A full block: 4 warps of 8 elements a thread, 16-byte accesses for 2-byte dtypes.
# A smaller tensor gets a smaller block, down to one warp, rather than a block mostly masked off.
MIN_BLOCK, MAX_BLOCK = 128, 1024


@triton.jit
def elementwise_offsets(n, BLOCK: tl.constexpr):
    """This program's ``BLOCK`` element offsets and their mask. int64: past 2**31
    elements, an int32 ``program_id * BLOCK`` would wrap."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offsets, offsets < n


def launch_elementwise(kernel, n: int, key: tuple | None, *args, **constexprs) -> None:
    """``kernel[grid](*args, n, BLOCK=..., **constexprs)`` over ``n`` elements: the
    block a power of two from ``n`` (MIN_BLOCK to MAX_BLOCK), one program a block,
    no launch for 0 elements. The kernel takes its offsets from ``elementwise_offsets``.
    ``key``: what decides the launch's specialization besides ``n`` (dtypes, constexprs),
    None where a pointer is misaligned (``Kernel.launch``)."""
    if n == 0:
        return
    block = min(max(next_power_of_2(n), MIN_BLOCK), MAX_BLOCK)
    kernel.launch(
        (cdiv(n, block),),
        None if key is None else (*key, n),
        lambda: dict(BLOCK=block, num_warps=max(block // 256, 1), **constexprs),
        *args,
        n,
    )


@jit
def gated_act_fwd_kernel(Gate, Up, Y, n, ACTIVATION: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offsets, mask = elementwise_offsets(n, BLOCK)
    gate = tl.load(Gate + offsets, mask=mask, other=0.0).to(ACC)
    up = tl.load(Up + offsets, mask=mask, other=0.0).to(ACC)
    tl.store(Y + offsets, round_to(_activation(gate, ACTIVATION) * up, Y.dtype.element_ty), mask=mask)


@jit
def gated_act_bwd_kernel(DY, Gate, Up, DGate, DUp, n, ACTIVATION: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offsets, mask = elementwise_offsets(n, BLOCK)
    dy = tl.load(DY + offsets, mask=mask, other=0.0).to(ACC)
    gate = tl.load(Gate + offsets, mask=mask, other=0.0).to(ACC)
    up = tl.load(Up + offsets, mask=mask, other=0.0).to(ACC)
    tl.store(DGate + offsets, round_to(dy * up * _activation_grad(gate, ACTIVATION), DGate.dtype.element_ty), mask=mask)
    tl.store(DUp + offsets, round_to(dy * _activation(gate, ACTIVATION), DUp.dtype.element_ty), mask=mask)


def gated_act_fwd(gate, up, activation, y):
    key = (gate.dtype, up.dtype, y.dtype, activation) if aligned(gate, up) else None
    launch_elementwise(
        gated_act_fwd_kernel, gate.numel(), key, gate, up, y, ACTIVATION=activation, ACC=acc_dtype(gate.dtype)
    )


def gated_act_bwd(dy, gate, up, activation, dgate, dup):
    key = (dy.dtype, gate.dtype, up.dtype, dgate.dtype, dup.dtype, activation) if aligned(dy, gate, up) else None
    launch_elementwise(
        gated_act_bwd_kernel,
        gate.numel(),
        key,
        dy,
        gate,
        up,
        dgate,
        dup,
        ACTIVATION=activation,
        ACC=acc_dtype(gate.dtype),
    )
