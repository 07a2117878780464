"""The CuPy backend itself; its ops' math is checked by the op suites, whose
``device`` runs them on the CuPy kernels too (``cpu-cupy-host``: the host
build of tests/cupy_host.py, on CPU tensors; ``cuda-cupy`` on a GPU).

- Compile check: nvcc compiles every CUDA source, every dtype's kernels, within
  the registers and shared memory a launch of MAX_THREADS threads needs.
- Availability: a clear reason when CuPy or a GPU is missing, and a
  BackendError naming op, backend and device for CPU tensors.
- The host build's own checks: Philox at counters no tensor reaches, the
  bf16 rounding, one launch per dtype, and that it reports a barrier missing
  or not reached by every thread, and arguments of the wrong C types.
- What the op suites cannot reach: the kernels' saved statistics and results
  against the NumPy backend's (bit for bit where the arithmetic is the same),
  rows, tiles and groups beyond a grid shrunk by monkeypatching its limit,
  and the out-of-range target flag (``cupy_device``: the host build and CUDA).
- GPU only: the kernels against Triton's, and on torch's current stream.
"""

from __future__ import annotations

import ast
import ctypes
import importlib.util
import math
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gpukernels as gk
import gpukernels.backends.numpy.adamw as numpy_adamw
from cupy_host import HOST_TARGET, needs_gxx
from gpukernels._numerics import row_stats
from gpukernels.backends.cupy import _runtime
from gpukernels.backends.cupy import cross_entropy as cupy_cross_entropy
from gpukernels.backends.cupy import dropout as cupy_dropout
from gpukernels.backends.cupy import layer_norm as cupy_layer_norm
from gpukernels.backends.numpy import cross_entropy as numpy_cross_entropy
from gpukernels.backends.numpy import dropout as numpy_dropout
from gpukernels.backends.numpy import layer_norm as numpy_layer_norm
from gpukernels.backends.numpy.philox import element_halves, philox4x32
from gpukernels.ops.cross_entropy import cross_entropy_bwd, cross_entropy_fwd
from gpukernels.ops.dropout import dropout_fwd
from gpukernels.ops.layer_norm import layer_norm_bwd, layer_norm_fwd
from gpukernels.optim import AdamW
from helpers import TOLERANCES, assert_matches, run_kernel

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
SOURCES = sorted(_runtime.SOURCE_DIR.glob("*.cu"))
NVCC = shutil.which("nvcc")
HAS_CUDA_CUPY = torch.cuda.is_available() and gk.unavailable_reason("cupy") is None
# For tests of the host build only: conftest's cupy_device on its host target alone.
on_host_only = pytest.mark.parametrize("cupy_device", [HOST_TARGET], indirect=True)


# ---------------------------------------------------------------- compile check


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_nvcc_compiles_every_dtype(source, tmp_path):
    """-cubin runs ptxas too, which reports each kernel's registers and shared memory."""
    result = subprocess.run(
        [
            NVCC,
            "-cubin",
            "-arch=sm_90",
            "-std=c++17",
            "--Werror",
            "all-warnings",
            "--resource-usage",
            "-o",
            str(tmp_path / "out.cubin"),
            str(source),
        ],
        capture_output=True,
        text=True,
        cwd=source.parent,
    )
    assert result.returncode == 0, result.stderr
    kernels = re.findall(r"Compiling entry function '(\w+)'", result.stderr)
    suffixes = tuple(_runtime.DTYPE_SUFFIX.values())
    bases = {k.rsplit("_", 1)[0] for k in kernels}
    assert sorted(kernels) == sorted(f"{b}_{s}" for b in bases for s in suffixes), kernels
    assert bool(kernels) == (source.name != "_common.cu")
    registers = [int(r) for r in re.findall(r"Used (\d+) registers", result.stderr)]
    assert len(registers) == len(kernels) and all(r * _runtime.MAX_THREADS <= 65536 for r in registers)
    assert all(int(b) <= 48 * 1024 for b in re.findall(r"(\d+) bytes smem", result.stderr))


# ---------------------------------------------------------------- availability


def test_unavailable_reason_is_clear():
    reason = gk.unavailable_reason("cupy")
    if HAS_CUDA_CUPY:
        assert reason is None
    elif importlib.util.find_spec("cupy") is None:
        assert reason == "cupy is not installed (pip install gpukernels[cupy])"
    else:
        assert reason and ("CUDA" in reason or "device" in reason)


@pytest.mark.parametrize("op", ["dropout", "layer_norm", "cross_entropy", "adamw"])
def test_cpu_tensor_is_a_backend_error_naming_op_backend_and_device(op):
    x = torch.randn(4, 3, requires_grad=op == "adamw")
    calls = {
        "dropout": lambda: gk.dropout(x, 0.5, seed=1),
        "layer_norm": lambda: gk.layer_norm(x, (3,)),
        "cross_entropy": lambda: gk.cross_entropy(x, torch.tensor([0, 1, 2, 0])),
        "adamw": lambda: _one_adamw_step(x),
    }
    with gk.use_backend("cupy"), pytest.raises(gk.BackendError, match=rf"op '{op}' on backend 'cupy' for device cpu"):
        calls[op]()


def _one_adamw_step(param: torch.Tensor) -> None:
    param.grad = torch.ones_like(param)
    AdamW([param]).step()


def test_no_module_imports_cupy_at_import_time():
    """Importing gpukernels (and dispatch importing a kernel module) must work without cupy."""
    for path in _runtime.SOURCE_DIR.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n.split(".")[0] == "cupy" for n in names), f"{path.name} imports cupy at import time"


@pytest.mark.parametrize("d", [1, 3, 17, 128, 129, 1000, 4097, 10**6])
def test_row_threads_is_a_power_of_two_within_the_launch_limits(d):
    threads = _runtime.row_threads(d)
    assert threads & (threads - 1) == 0 and _runtime.MIN_THREADS <= threads <= _runtime.MAX_THREADS
    assert threads * 4 >= d or threads == _runtime.MAX_THREADS


def _randn(shape, dtype, seed, device, scale=1.0, shift=0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(device, dtype)


def _grads(fn, inputs: list, dy: torch.Tensor) -> list[torch.Tensor]:
    """fn's output, then the gradient of (dy . output) for each input that is not None."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    y = fn(*leaves)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves if t is not None]


def _as_double(ts):
    return [t.double() if t is not None else None for t in ts]


# ---------------------------------------------------------------- layer_norm


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_kernels_match_numpy(cupy_device, dtype):
    """The saved statistics, and dweight/dbias summed from more rows than blocks."""
    device = cupy_device
    x, dy = _randn((37, 19), dtype, 0, device, scale=2), _randn((37, 19), dtype, 1, device)
    w, b = _randn(19, dtype, 2, device), _randn(19, dtype, 3, device)
    ours_fwd = run_kernel(cupy_layer_norm, layer_norm_fwd, x, w, b, 1e-5, None)
    numpy_fwd = run_kernel(numpy_layer_norm, layer_norm_fwd, *(t.cpu() for t in (x, w, b)), 1e-5, None)
    ours_bwd = run_kernel(cupy_layer_norm, layer_norm_bwd, dy, x, w, *ours_fwd[1:], True)
    numpy_bwd = run_kernel(numpy_layer_norm, layer_norm_bwd, *(t.cpu() for t in (dy, x, w, *numpy_fwd[1:])), True)
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    for ours, theirs in zip((*ours_fwd, *ours_bwd), (*numpy_fwd, *numpy_bwd)):
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours.cpu(), theirs, rtol=tolerance, atol=tolerance)


def test_layer_norm_rows_beyond_the_grid(cupy_device, monkeypatch):
    monkeypatch.setattr(cupy_layer_norm, "MAX_BLOCKS", 3)
    x = _randn((10, 7), torch.float64, 0, cupy_device)
    torch.testing.assert_close(gk.layer_norm(x, (7,)), F.layer_norm(x, (7,)), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- cross_entropy


def _ce_inputs(rows, classes, dtype, device, ignored=(2,)):
    x = _randn((rows, classes), dtype, 0, device, scale=3)
    target = torch.randint(0, classes, (rows,), generator=torch.Generator().manual_seed(1))
    target[list(ignored)] = -100
    return x, target.to(device)


def _ce_upstream(reduction, rows, dtype, device):
    """A gradient of the loss: per row for ``none``, else a scalar."""
    return _randn(rows, dtype, 5, device) if reduction == "none" else torch.tensor(0.7, device=device).to(dtype)


def _ce_kernels(
    x, target, weight, upstream, ignore_index=-100, label_smoothing=0.0, reduction="mean", module=cupy_cross_entropy
):
    """A backend's loss, row statistics and totals, and the gradient its backward gives from them."""
    options = (ignore_index, label_smoothing, reduction)
    loss, stats = run_kernel(module, cross_entropy_fwd, x, target, weight, *options, None)
    grad = run_kernel(module, cross_entropy_bwd, upstream, x, target, weight, stats, *options)
    return (loss, *row_stats(stats, x.shape[0]), grad)


def _ce_torch(x, target, weight, upstream, **options):
    """PyTorch's loss and the gradient autograd gives for it."""
    return _grads(lambda x: F.cross_entropy(x, target, weight, **options), [x], upstream.to(x.dtype))


def _ce_compare(x, target, weight, upstream, **options):
    """Loss and gradient against PyTorch's (and float64's), the row statistics and totals
    against float64."""
    loss, row_max, log_sum, totals, grad = _ce_kernels(x, target, weight, upstream, **options)
    theirs = _ce_torch(x, target, weight, upstream, **options)
    x64 = x.double()
    reference = _ce_torch(x64, target, None if weight is None else weight.double(), upstream.double(), **options)
    for o, t, r in zip((loss, grad), theirs, reference):
        assert_matches(o, t, r)
    acc = _runtime.acc_dtype(x.dtype)
    assert row_max.dtype == log_sum.dtype == acc and row_max.shape == log_sum.shape == x.shape[:1]
    m = x64.amax(1, keepdim=True)
    torch.testing.assert_close(row_max, m[:, 0].to(acc), rtol=0, atol=0)
    torch.testing.assert_close(log_sum, (x64 - m).exp().sum(1).log().to(acc), **TOLERANCES[acc])
    w64 = torch.ones(x.shape[1], dtype=torch.float64) if weight is None else weight.cpu().double()
    kept = target.cpu() != options.get("ignore_index", -100)
    torch.testing.assert_close(
        totals.cpu(), torch.stack([w64[target.cpu()[kept]].sum(), w64.sum()]).to(acc), **TOLERANCES[acc]
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_kernels_match_numpy(cupy_device, dtype, reduction):
    """The NumPy backend's arithmetic, but for the order of the sums over a row."""
    device = cupy_device
    x, target = _ce_inputs(7, 300, dtype, device, ignored=(2, 5))
    weight = _randn(300, dtype, 4, device, scale=0.2, shift=1)
    upstream = _ce_upstream(reduction, 7, dtype, device)
    options = (-100, 0.1, reduction)
    ours = _ce_kernels(x, target, weight, upstream, *options)
    theirs = _ce_kernels(*(t.cpu() for t in (x, target, weight, upstream)), *options, module=numpy_cross_entropy)
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    for o, t in zip(ours, theirs):
        assert o.dtype == t.dtype and o.shape == t.shape
        torch.testing.assert_close(o.cpu(), t, rtol=tolerance, atol=tolerance)


def _ce_probs(rows, classes, dtype, device):
    """Rows of class probabilities, a fifth of them exactly 0."""
    logits = _randn((rows, classes), torch.float64, 7, "cpu", scale=2)
    logits[_randn((rows, classes), torch.float64, 8, "cpu") > 0.85] = -math.inf
    return torch.softmax(logits, 1).nan_to_num(1.0 / classes).to(device, dtype)


def test_cross_entropy_rows_and_tiles_beyond_the_grid(cupy_device, monkeypatch):
    """3 blocks for 5 rows forward, and for 5 x 3 tiles of 4097 columns backward: class
    indices, then class probabilities (whose backward writes the target's gradient too)."""
    monkeypatch.setattr(cupy_cross_entropy, "MAX_BLOCKS", 3)
    device = cupy_device
    x, target = _ce_inputs(5, 4097, torch.float32, device)
    weight = _randn(4097, torch.float32, 4, device, scale=0.2, shift=1)
    upstream = _ce_upstream("none", 5, torch.float32, device)
    _ce_compare(x, target, weight, upstream, reduction="none", label_smoothing=0.1)

    def run(fn, x, probs, weight):
        return _grads(lambda x, y: fn(x, y, weight, reduction="none", label_smoothing=0.1), [x, probs], upstream)

    probs = _ce_probs(5, 4097, torch.float32, device)
    reference = run(F.cross_entropy, *_as_double((x, probs, weight)))
    for o, t, r in zip(run(gk.cross_entropy, x, probs, weight), run(F.cross_entropy, x, probs, weight), reference):
        assert_matches(o, t, r)


@on_host_only
@pytest.mark.parametrize("target", [[0, 1, 4], [0, -3, 1], [-100, 7, -100], [2, 10**12, -100]])
def test_cross_entropy_out_of_range_target_is_flagged_not_read(cupy_device, target, monkeypatch):
    """10**12 classes past the row: a read through it would fault. Host build only: on
    CUDA the flag is a device-side assert, which ends the CUDA context; on CPU tensors
    torch._assert_async raises at once (the op suites' IndexError is the other backends')."""
    x, target = _randn((3, 4), torch.float32, 0, cupy_device), torch.tensor(target)
    weight = _randn(4, torch.float32, 1, cupy_device, scale=0.2, shift=1)
    with pytest.raises(RuntimeError, match="out of bounds for 4 classes"):
        run_kernel(cupy_cross_entropy, cross_entropy_fwd, x, target, weight, -100, 0.1, "mean", None)
    # the kernels themselves: the bad rows' loss is nan and gradient 0, the others as PyTorch's
    monkeypatch.setattr(torch, "_assert_async", lambda *args: None)
    upstream = torch.ones(3)
    loss, _, _, _, grad = _ce_kernels(x, target, weight, upstream, reduction="none", label_smoothing=0.1)
    bad = (target != -100) & ((target < 0) | (target >= 4))
    assert torch.equal(loss.isnan(), bad) and torch.equal(grad[bad], torch.zeros_like(grad[bad]))
    theirs = _ce_torch(x[~bad], target[~bad], weight, upstream[~bad], reduction="none", label_smoothing=0.1)
    for o, t in zip((loss[~bad], grad[~bad]), theirs):
        assert_matches(o, t)


# ---------------------------------------------------------------- dropout


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", [0, 1234, 2**32 + 17, -5])
@pytest.mark.parametrize("shape", [(3,), (3, 333), (5, 517)], ids=str)
def test_dropout_equals_numpy_bit_for_bit(cupy_device, dtype, seed, shape, monkeypatch):
    """Same mask (eight elements to a Philox call, the last group partial: n % 8
    is 3, 7 and 1) and same rounding of x * scale. On 1 block of 256 threads,
    the 324 groups of (5, 517) take the grid-stride loop. The last p is an
    element's own uniform: the keep test at its threshold."""
    monkeypatch.setattr(cupy_dropout, "MAX_BLOCKS", 1)
    device = cupy_device
    x = _randn(shape, dtype, 0, device)
    seed_tensor = torch.tensor(seed, dtype=torch.int64, device=device)
    for p in (0.3, 0.9, int(element_halves(seed, 3)[2]) / 2**16):
        ours = run_kernel(cupy_dropout, dropout_fwd, x, p, seed_tensor)
        theirs = run_kernel(numpy_dropout, dropout_fwd, x.cpu(), p, seed_tensor.cpu())
        assert torch.equal(ours.cpu(), theirs)


def test_dropout_grid_stride_and_autograd(cupy_device, monkeypatch):
    monkeypatch.setattr(cupy_dropout, "MAX_BLOCKS", 2)  # 1001 groups of eight elements on 2 x 256 threads
    x = _randn(8003, torch.float32, 0, cupy_device, shift=5).requires_grad_()
    y = gk.dropout(x, 0.4, seed=99)
    y.backward(torch.ones_like(y))
    mask = torch.from_numpy(element_halves(99, 8003) / 2**16 >= 0.4)
    assert torch.equal(y.detach().cpu() != 0, mask)
    assert torch.equal(x.grad.cpu(), mask * (1 / (1 - torch.tensor(0.4))))


@pytest.mark.cupy_host
@needs_gxx
def test_philox_matches_numpy_at_high_indices(cupy_host_kernels):
    """All four output words, and the counter's high word: counters past 2**32
    (elements past 2**34), beyond any tensor a test can make."""
    library = cupy_host_kernels.library("dropout.cu")
    library.philox_words.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint32)]
    library.philox_words.restype = None
    counters = [0, 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 3, 2**62 + 7]
    got = (ctypes.c_uint32 * 4)()
    for seed in (0, 123456789, 2**62 - 1, -5):
        for counter in counters:
            library.philox_words(seed % 2**64, counter, got)
            assert list(got) == [int(w) for w in philox4x32(seed, counter & 0xFFFFFFFF, counter >> 32)]


@pytest.mark.cupy_host
@needs_gxx
def test_bf16_rounding_is_pytorchs(cupy_host_kernels):
    """The hand-written float -> bfloat16 conversion (the same code on the
    device): round to nearest even, on random bit patterns, exact ties
    both ways, infinities, overflow, subnormals and nan."""
    library = cupy_host_kernels.library("dropout.cu")
    library.to_bf16.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64]
    random_bits = torch.randint(0, 2**32, (1 << 16,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    ties = torch.tensor([0x3F808000, 0x3F818000, 0x7F7F8000, 0x7F7FFFFF, 0x00008000, 0x00018000, 0xBF808000])
    values = torch.cat((random_bits, ties)).to(torch.int32).view(torch.float32)
    values = torch.cat((values, torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-40, 3.4e38])))
    ours = torch.empty(values.shape, dtype=torch.int16)
    library.to_bf16(values.data_ptr(), ours.data_ptr(), values.numel())
    theirs = values.to(torch.bfloat16)
    nan = theirs.isnan()
    assert torch.equal(ours.view(torch.bfloat16).isnan(), nan)
    assert torch.equal(ours[~nan], theirs.view(torch.int16)[~nan])


# Kernels that get their barriers wrong, for the host build's own checks.
BARRIERS = r"""
extern "C" __global__ void wait_below(long long waiting) {
  if (threadIdx.x < waiting) __syncthreads();
}
extern "C" __global__ void broadcast(long long* out, int synchronise) {
  __shared__ long long value;
  if (threadIdx.x == 0) value = blockIdx.x + 1;
  if (synchronise) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = value;
}
"""


@pytest.mark.cupy_host
@needs_gxx
def test_host_build_reports_wrong_barriers_and_argument_types(cupy_host_kernels):
    """A barrier some threads of a block skip (a deadlock on a GPU) is an error; a
    missing one gives another result than the kernel with it; an argument must have
    the C type of its parameter (CuPy would pass the wrong bytes)."""
    cupy_host_kernels.build("barriers.cu", BARRIERS)
    cpu = torch.device("cpu")
    cupy_host_kernels.launch("barriers.cu", "wait_below", cpu, 2, 64, (np.int64(64),))
    for waiting in (1, 63):
        with pytest.raises(AssertionError, match="__syncthreads reached by some threads of a block, not all"):
            cupy_host_kernels.launch("barriers.cu", "wait_below", cpu, 2, 64, (np.int64(waiting),))
    with pytest.raises(AssertionError, match="arguments of C types 'i' for parameters 'q'"):
        cupy_host_kernels.launch("barriers.cu", "wait_below", cpu, 1, 32, (np.int32(64),))
    for synchronise in (1, 0):
        out = torch.zeros(2 * 32, dtype=torch.int64)
        cupy_host_kernels.launch("barriers.cu", "broadcast", cpu, 2, 32, (_runtime.pointer(out), np.int32(synchronise)))
        assert torch.equal(out, torch.tensor([1, 2]).repeat_interleave(32)) == bool(synchronise)


# ---------------------------------------------------------------- adamw

ADAMW_CONFIGS = {
    "default": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False),
    "amsgrad_maximize": dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1, amsgrad=True, maximize=True),
    "small_beta1_no_decay": dict(
        lr=1e-2, betas=(0.3, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False
    ),
}
# Sizes across the kernel's chunk boundary, and an empty tensor.
ADAMW_SIZES = [1, 3, 17, 0, 8193]


def _adamw_lists(dtypes, device, amsgrad):
    g = torch.Generator().manual_seed(0)
    params = [
        torch.randn(n, generator=g, dtype=torch.float64).to(device, dtype) for n, dtype in zip(ADAMW_SIZES, dtypes)
    ]
    state = [torch.zeros_like(p, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32) for p in params]
    return dict(
        params=params,
        exp_avgs=state,
        exp_avg_sqs=[s.clone() for s in state],
        max_exp_avg_sqs=[s.clone() for s in state] if amsgrad else [],
        steps=[torch.zeros((), device=device) for _ in params],
    )


def _adamw_steps(kernel, lists, config, steps, device):
    g = torch.Generator().manual_seed(1)
    lr = torch.tensor(config["lr"], dtype=torch.float64, device=device)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(device, p.dtype) for p in lists["params"]]
        kernel(
            lists["params"],
            grads,
            lists["exp_avgs"],
            lists["exp_avg_sqs"],
            lists["max_exp_avg_sqs"],
            lists["steps"],
            lr,
            *config["betas"],
            config["eps"],
            config["weight_decay"],
            config["amsgrad"],
            config["maximize"],
        )


@pytest.mark.parametrize(
    "dtypes",
    [
        [torch.float32] * 5,
        [torch.float64] * 5,
        [torch.bfloat16, torch.float32, torch.float16, torch.bfloat16, torch.float16],
    ],
    ids=["fp32", "fp64", "mixed_low_precision"],
)
@pytest.mark.parametrize("config", ADAMW_CONFIGS.values(), ids=ADAMW_CONFIGS.keys())
def test_adamw_kernel_equals_numpy(cupy_device, dtypes, config):
    """Op for op the NumPy update: bit for bit on the host (the same libm pow);
    on a GPU within an ulp (its pow may differ in the last bit)."""
    from gpukernels.backends.cupy.adamw import adamw_step_

    device = cupy_device
    ours, theirs = _adamw_lists(dtypes, device, config["amsgrad"]), _adamw_lists(dtypes, "cpu", config["amsgrad"])
    _adamw_steps(adamw_step_, ours, config, 3, device)
    _adamw_steps(numpy_adamw.adamw_step_, theirs, config, 3, "cpu")
    for key in ours:
        for o, t in zip(ours[key], theirs[key]):
            if device.type == "cpu":
                assert torch.equal(o, t), key
            else:
                torch.testing.assert_close(o.cpu(), t, rtol=2 * torch.finfo(o.dtype).eps, atol=0)


@on_host_only
def test_adamw_one_launch_per_dtype(cupy_device, cupy_host_kernels):
    from gpukernels.backends.cupy.adamw import CHUNK, adamw_step_

    cupy_host_kernels.launches.clear()
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float32, torch.bfloat16]
    lists = _adamw_lists(dtypes, cupy_device, False)
    _adamw_steps(adamw_step_, lists, ADAMW_CONFIGS["default"], 1, cupy_device)
    # fp32: sizes 1, 17 and 0; bf16: 3 and 8193 (over a chunk)
    assert cupy_host_kernels.launches == [("adamw_f32", 2, 256), ("adamw_bf16", 1 + math.ceil(8193 / CHUNK), 256)]
    assert all(s.item() == 1 for s in lists["steps"])


# ---------------------------------------------------------------- GPU only: Triton, streams


def _triton_has(op: str) -> bool:
    return importlib.util.find_spec(f"gpukernels.backends.triton.{op}") is not None


def _all_ops(x: torch.Tensor, seed: int = 7) -> list[torch.Tensor]:
    """Every op forward and backward on x (rows, 64): outputs and input gradients."""
    target = torch.arange(x.shape[0], device=x.device) % x.shape[1]
    outs = []
    for fn in (
        lambda t: gk.layer_norm(t, (x.shape[1],)),
        lambda t: gk.cross_entropy(t, target, label_smoothing=0.1),
        lambda t: gk.dropout(t, 0.3, seed=seed),
    ):
        leaf = x.detach().clone().requires_grad_()
        y = fn(leaf)
        y.backward(torch.ones_like(y))
        outs += [y.detach(), leaf.grad]
    return outs


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_CUPY, reason="needs a CUDA GPU and cupy")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["layer_norm", "cross_entropy", "dropout"])
def test_matches_triton(op, dtype):
    if not _triton_has(op):
        pytest.skip(f"the triton backend has no {op} yet")
    x = _randn((33, 1000), dtype, 0, "cuda", scale=2)
    index = {"layer_norm": 0, "cross_entropy": 2, "dropout": 4}[op]
    with gk.use_backend("cupy"):
        ours = _all_ops(x)[index : index + 2]
    with gk.use_backend("triton"):
        theirs = _all_ops(x)[index : index + 2]
    tolerance = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 2e-2)
    for o, t in zip(ours, theirs):
        if op == "dropout":
            assert torch.equal(o, t)
        else:
            torch.testing.assert_close(o, t, rtol=tolerance, atol=tolerance)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_CUPY, reason="needs a CUDA GPU and cupy")
def test_runs_on_the_current_torch_stream():
    """Inputs made on a side stream and used at once there: the kernels must be
    ordered on that stream (launched on the default one, they would race)."""
    with gk.use_backend("cupy"):
        x = _randn((64, 4096), torch.float32, 0, "cuda")
        expected = _all_ops(x)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            torch.cuda._sleep(10**7)  # keeps the side stream busy, so a race would show
            side_x = x * 1.0
            got = _all_ops(side_x)
            params = [side_x[:7].clone().requires_grad_()]
            params[0].grad = torch.ones_like(params[0])
            AdamW(params, lr=0.1).step()
        torch.cuda.synchronize()
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    # first step from zero state with grad 1: decay by lr * weight_decay, then a step of lr
    torch.testing.assert_close(params[0].detach(), x[:7] * (1 - 0.1 * 1e-2) - 0.1, rtol=1e-5, atol=1e-5)
