"""What every Triton kernel module shares."""

from __future__ import annotations

import functools
import struct
from threading import get_ident
from typing import Any, Callable

import torch
import triton
import triton.language as tl

from ..._backend import device_type
from ..._numerics import row_count, rows_and_features, stats_dtype  # noqa: F401  (the launchers' rules for statistics and rows)
from . import interpreting
from ._launch import tracing

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


def next_power_of_2(n: int) -> int:
    """The least power of two >= ``n`` (1 for ``n <= 1``): ``triton.next_power_of_2``
    without its constexpr wrapping, which costs host time on every launch."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def aligned(*tensors: torch.Tensor | None) -> bool:
    """Whether every tensor given (None skipped) starts at a 16-byte aligned address: a
    launcher's launch key stands for aligned pointers only (``Kernel.launch``). False
    while launches are traced (torch.compile), where tensors have no addresses and
    launches become graph nodes, keyed by nothing.

    Launchers pass the tensors they are given to read (and running statistics they
    update), not the outputs their op's spec allocated nor their launch scratch: those
    are fresh allocations, which PyTorch's allocators align to 64 bytes (CPU) or 512
    (CUDA), and reading their addresses costs host time on every launch. (The tests'
    ``GPUKERNELS_CHECK_LAUNCH_KEYS`` checks every launch's key against every pointer.)"""
    if tracing():
        return False
    bits = 0
    for t in tensors:
        if t is not None:
            bits |= t.data_ptr()
    return bits & 15 == 0


_FP64 = struct.Struct("<d")
_INT32_PAIR = struct.Struct("<ii")  # little-endian: the low word first


def float_bits(value: float) -> tuple[int, int]:
    """The bits of ``value`` as an fp64, as two int32 kernel arguments, the high word
    and the low (``as_float`` reads them back): how float options (eps, momentum, label
    smoothing, ...) reach the kernels. A Python float argument arrives as fp32, which
    would round an fp64 option; an int beyond 32 bits fails torch 2.11's Inductor,
    which launches the kernels under torch.compile. Kernels name these arguments in
    ``jit(float_options=...)``: neither their values nor their alignment specialize a
    launch. Not cached: a cache would hand -0.0 the bits of 0.0, which it equals."""
    return _INT32_PAIR.unpack(_FP64.pack(value))[::-1]


@triton.jit
def as_float(hi, lo, ACC: tl.constexpr):
    """A ``float_bits`` pair as a float of dtype ``ACC``. ``tl.cast``, not ``hi.to``:
    torch 2.11's mutation analysis of a kernel inside torch.compile makes every int
    argument a constexpr, a Python int without ``.to``."""
    bits = (tl.cast(hi, tl.int64) << 32) | (tl.cast(lo, tl.int64) & 0xFFFFFFFF)
    return bits.to(tl.float64, bitcast=True).to(ACC)


def dtype_of(t: torch.Tensor | None) -> torch.dtype | None:
    """``t.dtype``, None for None: an optional operand's share of a launch key."""
    return None if t is None else t.dtype


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints: ``triton.cdiv`` without its constexpr wrapping."""
    return -(-a // b)


@functools.cache  # a dict lookup on every launch instead of the arithmetic
def row_block(d: int, max_block: int = 8192) -> int:
    """Power-of-two block over a row of ``d`` features, at most ``max_block``."""
    return min(next_power_of_2(d), max_block)


def _stream_key(device: torch.device) -> tuple | None:
    """Which stream of ``device`` launches go to now, as a key for buffers kept per
    stream; None where a launch needs fresh buffers: captured in a CUDA graph (a replay
    may run beside any stream's work) or traced into one (torch.compile: a graph holds
    no tensor kept from outside it)."""
    if tracing():
        return None
    if device_type(device) == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return None
        index = torch.cuda.current_device() if device.index is None else device.index
        return index, torch._C._cuda_getCurrentRawStream(index)  # the default stream's handle is 0 on every device
    return (device,)


_scratch: dict = {}


def launch_scratch(purpose: str, device: torch.device, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """At least ``numel`` elements of ``dtype`` on ``device``: scratch space for
    ``purpose`` that a launch (or a few, one after another) writes before reading,
    kept for the next use on the current stream and thread instead of allocated on
    each (host time); fresh where ``_stream_key`` says so.

    Launches on one stream run one after another, so they can share it; launches on
    other streams may overlap and get their own, and so do other threads, whose
    launches could fall between two that share it."""
    stream = _stream_key(device)
    if stream is None:
        return torch.empty(numel, dtype=dtype, device=device)
    key = (purpose, dtype, *stream, get_ident())
    buffer = _scratch.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = _scratch[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer


_counters: dict = {}


def arrival_counter(device: torch.device, results: int = 0, counters: int = 1) -> torch.Tensor:
    """``counters`` int32 arrival counters for one launch, each set back to 0 by the program
    that arrives last at it, zeroed, then ``results`` int32 elements the launch writes before
    the host reads them (a check's outcome); kept per stream and thread (one launch at a
    time uses them, and what a launch wrote is read, on the host or by a device-side assert
    queued behind it, before the thread's next launch on the stream writes it); fresh,
    zeroed, where ``_stream_key`` says so."""
    key = _stream_key(device)
    if key is None:
        return torch.zeros(counters + results, dtype=torch.int32, device=device)
    key += (counters, results, get_ident())
    counter = _counters.get(key)
    if counter is None:
        counter = _counters[key] = torch.zeros(counters + results, dtype=torch.int32, device=device)
    return counter


_plans: dict = {}
PLAN_LIMIT = 256
"""At most this many launch plans are kept: past it they are dropped (each is made again once)."""


def launch_plan(device: torch.device, key: tuple, make: Callable[[], Any]) -> Any:
    """``make()``, kept for the next launch on the current stream and thread with an equal
    ``key``: what a launcher works out before a launch from the shapes alone (a grid, its
    ``launch_scratch`` and ``arrival_counter`` buffers, which are kept per stream and
    thread too), in one dict lookup instead of a few calls (host time); made anew where
    ``_stream_key`` says launches need fresh buffers. ``key`` must hold whatever ``make``
    reads."""
    stream = _stream_key(device)
    if stream is None:
        return make()
    key = (*key, *stream, get_ident())
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= PLAN_LIMIT:  # keys holding sizes grow with every new shape: start over
            _plans.clear()
        plan = _plans[key] = make()
    return plan


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


PROGRAMS_PER_SM = 4
"""A persistent grid's programs per SM, unless its launcher says otherwise."""


def num_programs(device: torch.device, work_items: int, per_sm: int = PROGRAMS_PER_SM) -> int:
    """A persistent grid: a few programs per SM, never more than the work (``per_sm`` at
    most what ``fitting_per_sm`` says fits, or the grid runs in waves)."""
    if device_type(device) == "cuda":
        # cached: get_device_properties costs more host time than a small kernel's launch
        sms = _sm_count(torch.cuda.current_device() if device.index is None else device.index)
    else:
        sms = 2  # the interpreter runs programs one after another
    return max(1, min(work_items, sms * per_sm))


def fitting_per_sm(device: torch.device, per_sm: int, kernel, key: Any, constexprs: Callable[[], dict], *args) -> int:
    """``per_sm``, or fewer where an SM holds fewer programs of the compiled ``kernel``
    launched with ``constexprs()`` and ``args`` (``Kernel.programs_per_sm``, which keeps
    the answer for ``key``): a persistent grid's programs per SM on a CUDA device; the
    interpreter's grid (no compiled kernel) as it is."""
    if device_type(device) != "cuda":
        return per_sm
    fits = kernel.programs_per_sm(key, constexprs, *args)
    return min(per_sm, fits) if fits else per_sm  # 0: it cannot launch, which its launch will say
