"""Gated activations ``y = act(gate) * up`` and their backward: one
elementwise pass each way. The backward recomputes ``act(gate)`` and
``act'(gate)`` (a few flops per element, against the bytes a saved activation
would cost) and writes ``dgate`` and ``dup`` together. The activations and their
derivatives are linear_act's.

The kernels read their tensors as ``(rows, D)`` matrices, each with its own row
stride: the halves of a chunked or packed gate-up projection are read (and their
gradients written) where they lie. Tensors all contiguous go as one row of every
element: a flat elementwise pass.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..._numerics import row_stride
from ._common import acc_dtype, aligned, cdiv, next_power_of_2, round_to
from ._launch import jit
from .linear_act import _activation, _activation_grad

# At most 4 warps of 8 elements a thread (16-byte accesses for 2-byte dtypes) a tile;
# a smaller tensor gets a smaller tile, down to one warp, rather than one mostly masked off.
MAX_TILE = 1024


@triton.jit
def _tile(rows, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's tile of a ``(rows, D)`` matrix: its rows (a column), its columns (a
    row) and their mask. int64: past 2**31 elements an int32 index would wrap."""
    column_blocks = tl.cdiv(D, BLOCK_D)
    program = tl.program_id(0)
    r = (program // column_blocks).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = (program % column_blocks).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    return r[:, None], c[None, :], (r < rows)[:, None] & (c < D)[None, :]


@triton.jit
def _up_column(D, PACKED: tl.constexpr):
    """Where up's columns start in its rows: packed, after gate's D."""
    if PACKED:
        return D
    return 0


@jit(do_not_specialize=["rows"])
def gated_act_fwd_kernel(
    Y, Gate, Up, rows, D, s_gate, s_up,
    PACKED: tl.constexpr, ACTIVATION: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    r, c, mask = _tile(rows, D, BLOCK_R, BLOCK_D)
    gate = tl.load(Gate + r * s_gate + c, mask=mask, other=0.0).to(ACC)
    up = tl.load(Up + _up_column(D, PACKED) + r * s_up + c, mask=mask, other=0.0).to(ACC)
    tl.store(Y + r * D + c, round_to(_activation(gate, ACTIVATION) * up, Y.dtype.element_ty), mask=mask)


@jit(do_not_specialize=["rows"])
def gated_act_bwd_kernel(
    DY, Gate, Up, DGate, DUp, rows, D, s_gate, s_up, s_dgate, s_dup,
    PACKED: tl.constexpr, ACTIVATION: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    r, c, mask = _tile(rows, D, BLOCK_R, BLOCK_D)
    dy = tl.load(DY + r * D + c, mask=mask, other=0.0).to(ACC)
    gate = tl.load(Gate + r * s_gate + c, mask=mask, other=0.0).to(ACC)
    up = tl.load(Up + _up_column(D, PACKED) + r * s_up + c, mask=mask, other=0.0).to(ACC)
    dgate = dy * up * _activation_grad(gate, ACTIVATION)
    tl.store(DGate + r * s_dgate + c, round_to(dgate, DGate.dtype.element_ty), mask=mask)
    dup = dy * _activation(gate, ACTIVATION)
    # packed: into DGate's rows after dgate (DUp is then unwritten: Inductor, seeing one tensor
    # written as two arguments, would copy it)
    if PACKED:
        tl.store(DGate + D + r * s_dgate + c, round_to(dup, DGate.dtype.element_ty), mask=mask)
    else:
        tl.store(DUp + r * s_dup + c, round_to(dup, DUp.dtype.element_ty), mask=mask)


def _launch(kernel, dense, rowed: tuple, packed: bool, flat: bool, key: tuple | None, activation: str) -> None:
    """``kernel`` over the elements of ``dense`` (contiguous: the output, or the upstream
    gradient) and of ``rowed`` (gate and up, then their gradients: each read or written as
    rows, of its own stride; ``packed``: up and its gradient in gate's and dgate's rows, from
    column D on; ``flat``: all contiguous, read as one row of every element). ``key``: the
    launch's specialization but for its sizes and strides (dtypes; None where a pointer is
    misaligned: ``Kernel.launch``)."""
    n = dense.numel()
    if n == 0:
        return
    if flat:
        rows, d, strides = 1, n, (n,) * len(rowed)
    else:
        d = dense.shape[-1]
        rows, strides = n // d, tuple(map(row_stride, rowed))
    block_d = min(next_power_of_2(d), MAX_TILE)
    block_r = min(next_power_of_2(rows), MAX_TILE // block_d)
    kernel.launch(
        (cdiv(rows, block_r) * cdiv(d, block_d),),
        None if key is None else (*key, packed, rows >= 2**31, d, block_r, *strides),  # block_r: of rows
        lambda: dict(
            PACKED=packed,
            BLOCK_R=block_r,
            BLOCK_D=block_d,
            num_warps=max(block_r * block_d // 256, 1),
            ACTIVATION=activation,
            ACC=acc_dtype(dense.dtype),
        ),
        dense,
        *rowed,
        rows,
        d,
        *strides,
    )


def gated_act_fwd(gate, up, activation, y):
    # packed: up is read in gate's rows (a view of its half would cost host time)
    packed = up is None
    up = gate if packed else up
    flat = not packed and gate.is_contiguous() and up.is_contiguous()
    key = (gate.dtype, up.dtype, y.dtype, activation) if aligned(gate, up) else None
    _launch(gated_act_fwd_kernel, y, (gate, up), packed, flat, key, activation)


def gated_act_bwd(dy, gate, up, activation, dgate, dup):
    # packed: up read in gate's rows, dup written in dgate's (dup: the spec's empty placeholder);
    # their addresses are gate's and dgate's (fresh) plus D elements, in the key
    packed = up is None
    up = gate if packed else up
    flat = not packed and gate.is_contiguous() and up.is_contiguous()  # dgate and dup: fresh, contiguous then
    key = (dy.dtype, gate.dtype, up.dtype, dgate.dtype, dup.dtype, activation) if aligned(dy, gate, up) else None
    _launch(gated_act_bwd_kernel, dy, (gate, up, dgate, dup), packed, flat, key, activation)
