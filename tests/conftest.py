import importlib.util
import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when @triton.jit decorates, so it must be set
# before any kernel module is imported. With no GPU, the interpreter is the
# only way the Triton kernels run at all.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import gpukernels as gk  # noqa: E402  (after TRITON_INTERPRET)
from helpers import SMALL_BLOCK  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_reason(device: str) -> str:
    return gk.unavailable_reason("triton") or ("" if device == "cuda" or INTERPRETING else "not interpreting")


# (device, backend) pairs an op test runs on. CPU/NumPy always; Triton on CPU
# tensors through the interpreter (CI); CUDA pairs only where a GPU is.
TARGETS = [
    pytest.param(("cpu", "numpy"), id="cpu-numpy"),
    pytest.param(
        ("cpu", "triton"),
        id="cpu-triton",
        marks=[
            pytest.mark.interpreter,
            pytest.mark.skipif(HAS_CUDA or not INTERPRETING, reason="Triton interpreter tier: CPU only"),
        ],
    ),
    pytest.param(
        ("cuda", "triton"),
        id="cuda-triton",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")],
    ),
    pytest.param(
        ("cuda", "cupy"),
        id="cuda-cupy",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")],
    ),
]


def pytest_runtest_logreport(report):
    """With GPUKERNELS_FAILURE_LOG set, each failure's traceback (and each test slower
    than 10 s) is appended to that file as it happens: a GPU run cut off by its time
    limit still says what failed. Written by the controlling process only under xdist."""
    path = os.environ.get("GPUKERNELS_FAILURE_LOG")
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    with open(path, "a") as log:
        if report.failed:
            log.write(f"=== FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n")
        elif report.when == "call" and report.duration > 10:
            log.write(f"=== SLOW {report.nodeid}: {report.duration:.0f} s\n")


@pytest.fixture(params=TARGETS)
def device(request):
    """The device to make tensors on, with the backend under test selected.
    A test module names the op families it runs in ``OP`` (a name or a
    tuple); a backend without those kernels is skipped (the CuPy backend has
    only some ops)."""
    device, backend = request.param
    ops = getattr(request.module, "OP", ())
    for op in (ops,) if isinstance(ops, str) else ops:
        if importlib.util.find_spec(f"gpukernels.backends.{backend}.{op}") is None:
            pytest.skip(f"backend {backend!r} has no {op} kernels")
    if device == "cuda" and gk.unavailable_reason(backend):
        pytest.skip(gk.unavailable_reason(backend))
    with gk.use_backend(backend):
        yield torch.device(device)


@pytest.fixture
def small_blocks(device, monkeypatch):
    """The Triton cross-entropy module with its column block shrunk, so short
    rows loop over blocks (Triton targets only)."""
    if gk.backend_name(device) != "triton":
        pytest.skip("column blocks are the Triton kernel's")
    from gpukernels.backends.triton import cross_entropy as kernels

    monkeypatch.setattr(kernels, "MAX_BLOCK_C", SMALL_BLOCK)
    monkeypatch.setattr(kernels, "GRAD_BLOCK_C", SMALL_BLOCK)
    return kernels
