"""What every Triton kernel module shares."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import interpreting

INTERPRETING = interpreting()


# One definition per mode, not a flag the kernel reads: JITFunction.run compares every
# global a kernel reads with its compile-time value on each launch, and Inductor compiles
# a kernel from the source of it and its callees (torch.compile), where a default value
# read from this module's globals would be undefined.
if INTERPRETING:

    @triton.jit
    def round_to(x, DTYPE: tl.constexpr):
        """``x.to(DTYPE)``, rounding to nearest even as a GPU does: the
        interpreter's own fp32 -> bf16 cast truncates, which would make the
        interpreter tier test a rounding the GPU never does."""
        if DTYPE == tl.bfloat16:
            x = x.to(tl.float32)
            bits = x.to(tl.uint32, bitcast=True)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            x = tl.where(x != x, x, rounded)  # a nan's low bits could carry it into inf
        return x.to(DTYPE)

else:

    @triton.jit
    def round_to(x, DTYPE: tl.constexpr):
        """``x.to(DTYPE)``, which rounds to nearest even on a GPU."""
        return x.to(DTYPE)


def acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """The dtype kernels accumulate in: fp64 for fp64 tensors, else fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of statistics and accumulators: fp64 for fp64 tensors, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def next_power_of_2(n: int) -> int:
    """The least power of two >= ``n`` (1 for ``n <= 1``): ``triton.next_power_of_2``
    without its constexpr wrapping, which costs host time on every launch."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints: ``triton.cdiv`` without its constexpr wrapping."""
    return -(-a // b)


def row_block(d: int, max_block: int = 8192) -> int:
    """Power-of-two block over a row of ``d`` features, at most ``max_block``."""
    return min(next_power_of_2(d), max_block)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


PROGRAMS_PER_SM = 4
"""A persistent grid's programs per SM, unless its launcher says otherwise."""


def num_programs(device: torch.device, work_items: int, per_sm: int = PROGRAMS_PER_SM) -> int:
    """A persistent grid: a few programs per SM, never more than the work."""
    if device.type == "cuda":
        # cached: get_device_properties costs more host time than a small kernel's launch
        sms = _sm_count(torch.cuda.current_device() if device.index is None else device.index)
    else:
        sms = 2  # the interpreter runs programs one after another
    return max(1, min(work_items, sms * per_sm))
