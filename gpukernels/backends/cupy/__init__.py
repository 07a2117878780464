"""CuPy kernels: CUDA C sources (``*.cu`` beside this file) compiled at run
time by CuPy's NVRTC and launched on PyTorch's current stream, zero-copy on
the tensors' memory. Selected with ``gpukernels.use_backend("cupy")``.

Importing gpukernels never imports cupy: this module looks for it only when
asked whether the backend can run, and the kernel modules import it only
when they launch.
"""

from __future__ import annotations

import functools
import importlib.util


def device_types() -> tuple[str, ...]:
    return ("cuda",)


@functools.cache
def unavailable_reason() -> str | None:
    if importlib.util.find_spec("cupy") is None:
        return "cupy is not installed (pip install gpukernels[cupy])"
    try:
        import cupy

        devices = cupy.cuda.runtime.getDeviceCount()
    # CuPy reports a missing driver or CUDA library as a RuntimeError
    # (CUDARuntimeError) or, for its own shared libraries, an ImportError.
    except (ImportError, RuntimeError) as e:
        return f"cupy cannot use CUDA here: {type(e).__name__}: {e}"
    if devices == 0:
        return "cupy sees no CUDA device"
    return None
