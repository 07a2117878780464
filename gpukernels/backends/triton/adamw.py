"""AdamW over a list of tensors in ONE kernel launch per param dtype, whatever
the number of tensors (a multi-tensor kernel, as PyTorch's fused AdamW).

The launch reads its work from device-side tables instead of arguments:
- ``table``: one int64 row per tensor: the addresses (``data_ptr()``) of its
  param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq (0 without amsgrad) and
  step, its numel, and its first block;
- ``block_tensor``: for each program, the row of the tensor it updates; the
  program's block within that tensor is ``pid - first block``.
A program casts the addresses of its row to typed pointers, so the same
kernel serves any number of tensors of any sizes. The tables are cached per
list of tensors (keyed on the addresses and sizes), so a training loop builds
them once; new addresses (reallocated state, new grads) build new ones.
A tensor laid out in memory otherwise than its param (or a param that does
not fill its memory) goes through a copy, written back after the launch.

Nothing is read on the host: lr, the grad scale, each tensor's step and the
bias corrections are read or computed from device memory in the kernel, so a whole
``optimizer.step()`` can be captured in a CUDA graph and replayed, with an lr
tensor changed in place between replays. The float hyperparameters travel as
an fp64 tensor too (a kernel's float arguments are fp32, too coarse for fp64
params), cached per value so that a replay reads the same one. The tables and
that tensor are built on the host: a warm-up step must build them before the
capture, and those a capture uses are kept for good.

With ``found_inf`` given and nonzero (AMP's overflow flag), every load and
store of the launch is masked off: it reads the flag and changes nothing.

Each step tensor is incremented once, though every program of its tensor
reads it: each program reads the old step, then counts itself in on an
arrival counter; the last program of the tensor to arrive (all the others
have read the step by then) stores the new step and resets the counter to 0
for the next call.

Arithmetic: as the NumPy kernel (the order of operations of
torch.optim.AdamW), in fp32 for fp32/bf16/fp16 params and fp64 for fp64
params; the bias corrections and step size in fp64 from the fp64 lr; fp32
square roots and divisions correctly rounded (``sqrt_rn``/``div_rn``: the
plain forms are approximate on GPUs).

Under ``TRITON_INTERPRET=1`` the same pointer tables work on CPU tensors: the
interpreter dereferences raw addresses.
"""

from __future__ import annotations

import functools
from array import array
from collections import OrderedDict
from itertools import accumulate, repeat
from typing import Iterator, NamedTuple

import torch
import triton.language as tl
from torch import Tensor

from .._layout import copy_back, in_param_layout
from ._common import acc_dtype, aligned, cdiv, round_to
from ._launch import jit

BLOCK = 1024
TABLE_CACHE_SIZE = 32

# Columns of the per-tensor table.
PARAM = tl.constexpr(0)
GRAD = tl.constexpr(1)
EXP_AVG = tl.constexpr(2)
EXP_AVG_SQ = tl.constexpr(3)
MAX_EXP_AVG_SQ = tl.constexpr(4)
STEP = tl.constexpr(5)
NUMEL = tl.constexpr(6)
FIRST_BLOCK = tl.constexpr(7)
COLUMNS = tl.constexpr(8)

_TRITON_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


@jit
def adamw_kernel(
    Table,
    BlockTensor,
    Arrivals,
    Lr,
    Hyper,
    GradScale,
    FoundInf,
    PARAM_TY: tl.constexpr,
    ACC: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    tensor = tl.load(BlockTensor + pid)
    row = Table + tensor.to(tl.int64) * COLUMNS
    numel = tl.load(row + NUMEL)
    offsets = (pid - tl.load(row + FIRST_BLOCK)) * BLOCK + tl.arange(0, BLOCK)
    update = True
    if HAS_FOUND_INF:
        update = tl.load(FoundInf) == 0.0
    mask = offsets < tl.where(update, numel, 0)  # flagged, a program covers no elements
    param_ptr = tl.load(row + PARAM).to(tl.pointer_type(PARAM_TY)) + offsets
    grad_ptr = tl.load(row + GRAD).to(tl.pointer_type(PARAM_TY)) + offsets
    exp_avg_ptr = tl.load(row + EXP_AVG).to(tl.pointer_type(ACC)) + offsets
    exp_avg_sq_ptr = tl.load(row + EXP_AVG_SQ).to(tl.pointer_type(ACC)) + offsets
    step_ptr = tl.load(row + STEP).to(tl.pointer_type(tl.float32))
    t = tl.load(step_ptr) + 1.0

    lr = tl.load(Lr)
    beta1 = tl.load(Hyper)
    beta2 = tl.load(Hyper + 1)
    eps = tl.load(Hyper + 2).to(ACC)
    weight_decay = tl.load(Hyper + 3)
    # beta1**t and beta2**t by squaring: tl has no pow, and libdevice's does
    # not run in the interpreter. (Written out here rather than in a helper:
    # each call of a jit function costs the interpreter milliseconds.)
    power1 = lr * 0.0 + 1.0
    power2 = power1
    # int64: a step count loaded from a checkpoint may pass 2**31; past 2**62 every beta < 1 of
    # fp64 has a power of 0, as from the clamp
    base1, base2, exponent = beta1, beta2, tl.minimum(t, 4.0e18).to(tl.int64)
    while exponent > 0:
        if exponent % 2 == 1:
            power1 = power1 * base1
            power2 = power2 * base2
        base1 = base1 * base1
        base2 = base2 * base2
        exponent = exponent // 2
    # fp64 scalars, rounded to ACC once, as the NumPy kernel's Python floats.
    neg_step_size = (-lr / (1.0 - power1)).to(ACC)
    bias_correction2_sqrt = tl.sqrt(1.0 - power2).to(ACC)
    decay = (1.0 - lr * weight_decay).to(ACC)
    weight1 = (1.0 - beta1).to(ACC)
    weight2 = (1.0 - beta2).to(ACC)

    p = tl.load(param_ptr, mask=mask, other=0.0).to(ACC)
    g = tl.load(grad_ptr, mask=mask, other=0.0).to(ACC)
    if HAS_GRAD_SCALE:
        g = g * tl.load(GradScale).to(ACC)
    if MAXIMIZE:
        g = -g
    m = tl.load(exp_avg_ptr, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq_ptr, mask=mask, other=0.0)

    p = p * decay
    # PyTorch's lerp: two formulas, each exact at its own end of the weight range.
    if weight1 < 0.5:
        m = m + weight1 * (g - m)
    else:
        m = g - (g - m) * (1.0 - weight1)
    v = v * beta2.to(ACC) + weight2 * g * g
    second = v
    if AMSGRAD:
        max_ptr = tl.load(row + MAX_EXP_AVG_SQ).to(tl.pointer_type(ACC)) + offsets
        second = tl.maximum(tl.load(max_ptr, mask=mask, other=0.0), v, propagate_nan=tl.PropagateNan.ALL)
        tl.store(max_ptr, second, mask=mask)
    # fp32 tl.sqrt and / are approximate on GPUs: the _rn forms round as
    # NumPy and PyTorch do (fp64 ones are always IEEE).
    if ACC == tl.float32:
        p = p + tl.div_rn(neg_step_size * m, tl.div_rn(tl.sqrt_rn(second), bias_correction2_sqrt) + eps)
    else:
        p = p + neg_step_size * m / (tl.sqrt(second) / bias_correction2_sqrt + eps)

    tl.store(param_ptr, round_to(p, PARAM_TY), mask=mask)
    tl.store(exp_avg_ptr, m, mask=mask)
    tl.store(exp_avg_sq_ptr, v, mask=mask)

    # Every program of this tensor has read the old step before counting
    # itself in, so the last to arrive may store the new one. The barrier:
    # every thread of this program has read it, not only the one that counts.
    tl.debug_barrier()
    blocks = tl.maximum((numel + BLOCK - 1) // BLOCK, 1)
    if tl.atomic_add(Arrivals + tensor, 1) == blocks - 1:
        tl.store(step_ptr, t, mask=update)
        tl.store(Arrivals + tensor, 0)


class _Tables(NamedTuple):
    table: Tensor  # (tensors, COLUMNS) int64
    block_tensor: Tensor  # (programs,) int32
    arrivals: Tensor  # (tensors,) int32, zero between calls


_tables_cache: OrderedDict[tuple, _Tables] = OrderedDict()
# Device tensors a captured CUDA graph reads at each replay: never freed.
_kept_for_graphs: list[Tensor] = []


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _built_outside_capture(device: torch.device, what: str) -> None:
    """Tables and hyperparameters are copied from the host, which a CUDA
    graph cannot capture: they must exist before (from a warm-up step)."""
    if _capturing(device):
        raise RuntimeError(
            f"adamw_step_: no {what} for these tensors yet while capturing a CUDA graph; "
            "run one step before capturing (the usual warm-up), with the same tensors"
        )


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``, without waiting for the GPU: from pinned memory,
    a copy to a CUDA device is asynchronous (and the pinned buffer is not
    reused before the copy is done)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _tables(device: torch.device, dtype: torch.dtype, columns: list[list[Tensor]], steps: list[Tensor]) -> _Tables:
    """The launch's tables for these tensors, built on first use and kept
    (least recently used first out) while their addresses stay the same."""
    # a column's addresses read in one pass (C), as the key: rows are built on a miss only
    addresses = [tuple(map(Tensor.data_ptr, column)) for column in (*columns, steps)]
    numels = tuple(map(Tensor.numel, columns[0]))
    key = (device, dtype, numels, *addresses)
    tables = _tables_cache.get(key)
    if tables is not None:
        _tables_cache.move_to_end(key)
        return tables
    _built_outside_capture(device, "tables of addresses")
    # built a column at a time (C loops), not a row at a time in Python (twice the host
    # time): a model's grads move whenever the allocator hands them other memory
    count = len(numels)
    blocks = [max(cdiv(numel, BLOCK), 1) for numel in numels]  # one even when empty: it increments the step
    flat = array("q")
    for column in addresses:
        flat.extend(column or repeat(0, count))
    flat.extend(numels)
    flat.extend(accumulate(blocks[:-1], initial=0))
    table = torch.frombuffer(flat, dtype=torch.int64).view(-1, count).t().contiguous()  # a row per tensor
    # each block's tensor: i repeated blocks[i] times (given the output size: no count read back)
    block_tensor = torch.repeat_interleave(torch.tensor(blocks, dtype=torch.int32), output_size=sum(blocks))
    tables = _Tables(
        _to_device(table, device),
        _to_device(block_tensor, device),
        torch.zeros(count, dtype=torch.int32, device=device),
    )
    _tables_cache[key] = tables
    if len(_tables_cache) > TABLE_CACHE_SIZE:
        _tables_cache.popitem(last=False)
    return tables


@functools.lru_cache(maxsize=64)
def _hyperparameters(device: torch.device, beta1: float, beta2: float, eps: float, weight_decay: float) -> Tensor:
    """``beta1, beta2, eps, weight_decay`` as an fp64 tensor on ``device``."""
    _built_outside_capture(device, "hyperparameter tensor")
    return torch.tensor([beta1, beta2, eps, weight_decay], dtype=torch.float64, device=device)


def _by_dtype(
    columns: list[list[Tensor]], steps: list[Tensor]
) -> Iterator[tuple[torch.dtype, list[list[Tensor]], list[Tensor]]]:
    """(dtype, columns, steps) for each param dtype, in order of first appearance."""
    dtypes = [p.dtype for p in columns[0]]
    if len(set(dtypes)) == 1:
        yield dtypes[0], columns, steps
        return
    for dtype in dict.fromkeys(dtypes):
        chosen = [i for i, d in enumerate(dtypes) if d == dtype]
        yield dtype, [[column[i] for i in chosen] if column else [] for column in columns], [steps[i] for i in chosen]


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
    device = params[0].device
    hyperparameters = _hyperparameters(device, beta1, beta2, eps, weight_decay)
    # Column order: PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ (empty: no column).
    for dtype, columns, dtype_steps in _by_dtype(
        [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else []], steps
    ):
        staged = in_param_layout(columns)
        tables = _tables(device, dtype, staged, dtype_steps)
        if _capturing(device):  # evicted from the caches, they would be freed under the graph
            _kept_for_graphs.extend((*tables, hyperparameters))
        table, block_tensor, arrivals = tables
        key = (
            (dtype, grad_scale is not None, found_inf is not None, amsgrad, maximize)
            if aligned(lr, grad_scale, found_inf)
            else None
        )
        adamw_kernel.launch(
            (block_tensor.numel(),),
            key,
            lambda: dict(
                PARAM_TY=_TRITON_DTYPES[dtype],
                ACC=acc_dtype(dtype),
                HAS_GRAD_SCALE=grad_scale is not None,
                HAS_FOUND_INF=found_inf is not None,
                AMSGRAD=amsgrad,
                MAXIMIZE=maximize,
                BLOCK=BLOCK,
            ),
            table,
            block_tensor,
            arrivals,
            lr,
            hyperparameters,
            grad_scale,
            found_inf,
        )
        copy_back(columns, staged, read_only=1)
