"""Compiling the CUDA sources with CuPy and launching their kernels.

The only module that touches cupy, and only inside ``launch``: the kernel
modules import without it, so that tests can run them on CPU tensors through
a host build of the same sources by replacing ``launch``.

Kernels take raw device pointers (``pointer``) and NumPy scalars, whose types
fix the C argument types: ``np.int64`` for ``i64``, ``np.int32`` for ``int``,
``np.float32`` / ``np.float64`` for ``float`` / ``double``. They run on
PyTorch's current stream of the tensors' device, so they are ordered with
the surrounding torch work without any synchronisation.

CuPy compiles with ``-ftz=true`` appended after the caller's options (so it
cannot be turned off; cupy/cupy#9576): fp32 subnormals flush to zero in these
kernels, unlike PyTorch's and NumPy's arithmetic. fp64 is not affected.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

SOURCE_DIR = Path(__file__).parent
# ``#include "x.cu"`` lines of a source, pasted in by ``source``.
_INCLUDE = re.compile(r'^#include "(\w+\.cu)"$', re.MULTILINE)

# The kernel-name suffix of each storage dtype (GK_FOR_EACH_DTYPE in _common.cu).
DTYPE_SUFFIX = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}

# Threads per block: a power of two, at most GK_MAX_THREADS of _common.cu.
MAX_THREADS = 512
MIN_THREADS = 32
# Blocks per launch; the kernels loop (grid-stride) over whatever is beyond.
MAX_BLOCKS = 2**31 - 1


def source(name: str) -> str:
    """The text of ``name`` (a .cu file here) with its includes pasted in, so
    NVRTC needs no include path and CuPy's compile cache, keyed by the text,
    sees a change to any file."""
    text = (SOURCE_DIR / name).read_text()
    return _INCLUDE.sub(lambda match: (SOURCE_DIR / match.group(1)).read_text(), text)


def kernel_name(base: str, dtype: torch.dtype) -> str:
    return f"{base}_{DTYPE_SUFFIX[dtype]}"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in: fp64 for fp64 tensors, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def acc_scalar(value: float, dtype: torch.dtype) -> np.floating:
    """``value`` as the ``acc_t<T>`` argument of a kernel on ``dtype`` storage."""
    return np.float64(value) if dtype == torch.float64 else np.float32(value)


def pointer(t: torch.Tensor | None) -> np.uint64:
    """The device address of ``t``'s data as a kernel argument (0 for None)."""
    return np.uint64(0 if t is None else t.data_ptr())


def row_threads(d: int) -> int:
    """Threads for a block that walks a row of ``d`` elements: about four
    elements each, a power of two in [MIN_THREADS, MAX_THREADS]."""
    quarter = (d + 3) // 4
    return min(MAX_THREADS, max(MIN_THREADS, 1 << max(quarter - 1, 0).bit_length()))


def persistent_blocks(device: torch.device, work_items: int, per_sm: int = 4) -> int:
    """A persistent grid: a few blocks per SM, never more than the work, at least one."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return max(1, min(work_items, sms * per_sm))


def check_launch(kernel: str, blocks: int, threads: int) -> None:
    """The shapes every kernel assumes: a grid CUDA accepts, and a power of two
    threads per block within what the block reductions' shared memory holds."""
    if not 0 < blocks <= MAX_BLOCKS:
        raise ValueError(f"{kernel}: {blocks} blocks is outside [1, {MAX_BLOCKS}]")
    if not MIN_THREADS <= threads <= MAX_THREADS or threads & (threads - 1):
        raise ValueError(
            f"{kernel}: {threads} threads per block is not a power of two in [{MIN_THREADS}, {MAX_THREADS}]"
        )


@functools.cache
def _module(name: str, options: tuple[str, ...]):
    import cupy

    return cupy.RawModule(code=source(name), options=("-std=c++17", *options))


@functools.cache
def _function(name: str, options: tuple[str, ...], kernel: str, device_index: int):
    import cupy

    with cupy.cuda.Device(device_index):
        return _module(name, options).get_function(kernel)


def launch(
    name: str,
    kernel: str,
    device: torch.device,
    blocks: int,
    threads: int,
    args: Sequence,
    options: tuple[str, ...] = (),
) -> None:
    """Run ``kernel`` of source ``name`` on ``blocks`` x ``threads`` threads,
    on the current torch stream of ``device``."""
    import cupy

    check_launch(kernel, blocks, threads)
    index = torch.cuda.current_device() if device.index is None else device.index
    function = _function(name, options, kernel, index)
    stream = torch.cuda.current_stream(index).cuda_stream
    with cupy.cuda.Device(index), cupy.cuda.ExternalStream(stream):
        function((blocks,), (threads,), tuple(args))
