import importlib.util
import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when @triton.jit decorates, so it must be set
# before any kernel module is imported. With no GPU, the interpreter is the
# only way the Triton kernels run at all.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every launch with a launch key checks that the key determines the kernel's
# specialization (gpukernels/backends/triton/_launch.py), read at import.
os.environ.setdefault("GPUKERNELS_CHECK_LAUNCH_KEYS", "1")

pytest.register_assert_rewrite("cupy_host")  # imported here, before pytest_plugins loads it
import gpukernels as gk  # noqa: E402  (after TRITON_INTERPRET)
from cupy_host import HOST_TARGET, use_host_build  # noqa: E402
from helpers import SMALL_BLOCK  # noqa: E402

# cupy_host's fixture cupy_host_kernels: the CuPy kernels built for the host
pytest_plugins = ["cupy_host"]

HAS_CUDA = torch.cuda.is_available()
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# (device, backend) pairs an op test runs on. CPU/NumPy always; Triton on CPU
# tensors through the interpreter (CI); CuPy's kernels on CPU tensors through
# their host build (CI, tests/cupy_host.py); CUDA pairs only where a GPU is.
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
    HOST_TARGET,
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
CUPY_TARGETS = [target for target in TARGETS if target.values[0][1] == "cupy"]


def _target_of(nodeid: str) -> str | None:
    for target in TARGETS:
        if f"[{target.id}" in nodeid or f"-{target.id}" in nodeid:
            return target.id
    return None


def pytest_terminal_summary(terminalreporter):
    """The outcome counts per backend target (how many cases ran on each), for the log."""
    counts: dict[str, dict[str, int]] = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            target = _target_of(getattr(report, "nodeid", ""))
            if target is not None and (outcome != "passed" or report.when == "call"):
                counts.setdefault(target, {}).setdefault(outcome, 0)
                counts[target][outcome] += 1
    if counts:
        terminalreporter.section("cases per backend target")
        for target in (t.id for t in TARGETS if t.id in counts):
            terminalreporter.write_line(
                f"{target}: " + ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts[target].items()))
            )


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


def _on_target(request, monkeypatch, families):
    """The target's device with its backend selected; skipped where the backend
    has no kernels of ``families`` or cannot run."""
    device, backend = request.param
    for family in families:
        if importlib.util.find_spec(f"gpukernels.backends.{backend}.{family}") is None:
            pytest.skip(f"backend {backend!r} has no {family} kernels")
    if device == "cuda" and gk.unavailable_reason(backend):
        pytest.skip(gk.unavailable_reason(backend))
    if HOST_TARGET.values[0] == (device, backend):
        use_host_build(monkeypatch, request.getfixturevalue("cupy_host_kernels"))
    with gk.use_backend(backend):
        yield torch.device(device)


def _families(request) -> tuple[str, ...]:
    """The op families of the test's ``family`` marker (its module's
    ``pytestmark = pytest.mark.family("layer_norm", ...)``)."""
    marker = request.node.get_closest_marker("family")
    if marker is None or not marker.args:
        pytest.fail(
            f"{request.node.nodeid} takes the device fixture but names no op family: give its module "
            f'pytestmark = pytest.mark.family("<family>", ...) (a module of gpukernels/backends/numpy/)',
            pytrace=False,
        )
    for family in marker.args:
        if importlib.util.find_spec(f"gpukernels.backends.numpy.{family}") is None:
            pytest.fail(f"{request.node.nodeid}: no op family {family!r} (gpukernels/backends/numpy/)", pytrace=False)
    return marker.args


@pytest.fixture(autouse=True)
def dynamo_caches_per_test():
    """Dynamo's caches do not outlive a test that compiled: its recompile limit (8 compiles
    a code object, some of which, as the wrapper it runs compiled modules in, every
    compiled model shares) would count the compiles of the tests run before in the same
    worker, and fail a fullgraph compile by the order tests happen to run in."""
    from torch._dynamo.utils import counters

    frames = counters["frames"]["total"]
    yield
    if counters["frames"]["total"] != frames:
        torch._dynamo.reset()


@pytest.fixture(params=TARGETS)
def device(request, monkeypatch):
    """The device to make tensors on, with the backend under test selected.
    A backend without kernels of the test's op families (its ``family``
    marker) is skipped: the CuPy backend has only some."""
    yield from _on_target(request, monkeypatch, _families(request))


@pytest.fixture(params=CUPY_TARGETS)
def cupy_device(request, monkeypatch):
    """``device`` on the CuPy targets only: tests of the CuPy backend itself."""
    yield from _on_target(request, monkeypatch, ())


@pytest.fixture
def small_blocks(device, monkeypatch):
    """The Triton cross-entropy module with its column block shrunk, so short
    rows loop over blocks (Triton targets only)."""
    if gk.backend_name(device) != "triton":
        pytest.skip("column blocks are the Triton kernel's")
    from gpukernels.backends.triton import cross_entropy as kernels

    monkeypatch.setattr(kernels, "MAX_BLOCK_C", SMALL_BLOCK)
    monkeypatch.setattr(kernels, "GRAD_BLOCK_C", SMALL_BLOCK)
    # launch keys stand for the block sizes these constants give: kept apart while they are
    # shrunk (the kernels cached for keys, and the keys' check under CHECK_LAUNCH_KEYS)
    for kernel in (kernels.cross_entropy_fwd_kernel, kernels.cross_entropy_bwd_kernel):
        monkeypatch.setattr(kernel, "_keyed", {})
        monkeypatch.setattr(kernel, "_keys_seen", {})
    return kernels
