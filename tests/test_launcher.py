"""The direct launcher (gpukernels/backends/triton/_launch.py) and what _common.py
does for host time.

A launch through ``Kernel`` must be the launch ``JITFunction.run`` makes for the
same arguments: the same compiled kernel (the stub driver hands each compiled
kernel its own function handle), grid, parameters and stream. That is checked
through Triton's real launch path against the stub libcuda of
bench/host_time.py, in a subprocess without the interpreter, under the Triton
of this environment and under Triton 3.6 when its environment
(``$GPUKERNELS_COMPAT_VENV``, default ``.venv-triton36``, made by
ci/test-triton-compat.sh) exists. Under the interpreter (this process),
``jit`` is Triton's interpreter and the results are checked against PyTorch.

    python tests/test_launcher.py          # the stub-driver checks, run in this process (no TRITON_INTERPRET)
"""

from __future__ import annotations

import ctypes
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from test_host_time import load_host_time
from triton.runtime.jit import JITFunction

from gpukernels.backends.triton import _common, _launch
from gpukernels.backends.triton._common import num_programs, round_to
from gpukernels.backends.triton._launch import JIT_OPTION_KNOBS, Kernel, LaunchKeyError, jit

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 16


def _axpy(X, Y, Out, n, limit, alpha, HAS_Y: tl.constexpr, BLOCK: tl.constexpr):
    """Out[i] = alpha * X[i] (+ Y[i]) for i < min(n, limit), rounded to Out's dtype."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = (offsets < n) & (offsets < limit)
    y = alpha * tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_Y:
        y += tl.load(Y + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + offsets, round_to(y, Out.dtype.element_ty), mask=mask)


axpy_kernel = jit(_axpy)


def _launch_cases(dtype=torch.float32):
    """(name, args, kwargs) of launches that must each get the specialization the JIT gives them."""
    base = torch.randn(65, dtype=dtype)
    x, y, out = base[:64], torch.randn(64, dtype=dtype), torch.empty(65, dtype=dtype)[:64]
    flags = dict(HAS_Y=True, BLOCK=BLOCK)
    return [
        ("aligned", (x, y, out, 64, 64, 2.0), flags),
        ("x misaligned by one element", (base[1:], y, out, 64, 64, 2.0), flags),
        ("out misaligned by one element", (x, y, torch.empty(65, dtype=dtype)[1:], 64, 64, 2.0), flags),
        ("n == 1", (x, y, out, 1, 64, 2.0), flags),
        ("n == 17", (x, y, out, 17, 64, 2.0), flags),
        ("limit == 2**31 + 16", (x, y, out, 64, 2**31 + 16, 2.0), flags),
        ("limit == 2**31 + 1", (x, y, out, 64, 2**31 + 1, 2.0), flags),
        ("limit == 2**32", (x, y, out, 64, 2**32, 2.0), flags),
        ("limit == -2**31 - 1", (x, y, out, 64, -(2**31) - 1, 2.0), flags),
        ("Y None", (x, None, out, 64, 64, 2.0), dict(flags, HAS_Y=False)),
        ("HAS_Y 1, not True", (x, y, out, 64, 64, 2.0), dict(flags, HAS_Y=1)),
        ("alpha an int", (x, y, out, 64, 64, 3), flags),
        ("num_warps=1", (x, y, out, 64, 64, 2.0), dict(flags, num_warps=1)),
        ("BLOCK=32", (x, y, out, 64, 64, 2.0), dict(flags, BLOCK=32)),
    ]


# ---------------------------------------------------------------- under the interpreter (this process)


@pytest.mark.skipif(not _common.INTERPRETING, reason="checks the interpreter fallback")
def test_jit_launches_on_the_interpreter_under_triton_interpret():
    assert isinstance(axpy_kernel, Kernel) and not axpy_kernel.compiled
    assert type(axpy_kernel.fn) is type(triton.jit(_axpy))
    assert axpy_kernel not in _launch.KERNELS  # nothing compiled to list for AOTAutograd


@pytest.mark.skipif(not _common.INTERPRETING, reason="runs kernels in the interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_results_under_interpreter(dtype):
    for name, (x, y, out, n, limit, alpha), kwargs in _launch_cases(dtype):
        out.fill_(7.0)
        axpy_kernel[(triton.cdiv(64, kwargs["BLOCK"]),)](x, y, out, n, limit, alpha, **kwargs)
        count = max(min(n, limit, 64), 0)
        expected = alpha * x[:count].float() + (y[:count].float() if kwargs["HAS_Y"] else 0)  # as the kernel: fp32
        torch.testing.assert_close(out[:count], expected.to(dtype), rtol=0, atol=0, msg=name)
        assert (out[count:] == 7.0).all(), name


@pytest.mark.skipif(not _common.INTERPRETING, reason="runs kernels in the interpreter")
def test_round_to_rounds_bf16_to_nearest_even_in_interpreter():
    # fp32 values at bf16 ties (to even: down, up), just above and below one, one rounding to inf, -inf, nan
    bits = torch.tensor(
        [0x3F808000, 0x3F818000, 0xBF808001, 0x3F807FFF, 0x7F7FFFFF, 0xFF800000, 0x7FC00001], dtype=torch.int64
    ).to(torch.int32)
    x = bits.view(torch.float32)
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    axpy_kernel[(1,)](x, None, out, x.numel(), x.numel(), 1.0, HAS_Y=False, BLOCK=BLOCK)
    expected = x.to(torch.bfloat16)  # PyTorch rounds to nearest even, as a GPU does
    assert torch.equal(out[:-1].view(torch.int16), expected[:-1].view(torch.int16))
    assert out[-1].isnan()


@triton.jit
def float_option_kernel(hi, lo, Out, ACC: tl.constexpr):
    tl.store(Out, _common.as_float(hi, lo, ACC))


# fp64 values no fp32 pair holds exactly: 53 significant bits, the extremes of the range, signed zero
FLOAT_OPTIONS = [1e-5, 1 / 3, -0.1, 0.0, -0.0, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 1.0]


@pytest.mark.skipif(not _common.INTERPRETING, reason="runs kernels in the interpreter")
@pytest.mark.parametrize("acc", [tl.float64, tl.float32], ids=str)
def test_float_options_reach_kernels_exactly(acc):
    """A float option (eps, momentum, label smoothing) is the kernels' as the host has
    it: ``float_bits``'s two int32 words read back in fp64, then rounded to the
    accumulation dtype as PyTorch rounds an fp64 (bits compared: signed zeros too)."""
    dtype, bits = (torch.float64, torch.int64) if acc == tl.float64 else (torch.float32, torch.int32)
    for value in FLOAT_OPTIONS:
        words = _common.float_bits(value)
        assert all(-(2**31) <= w < 2**31 for w in words)
        out = torch.empty(1, dtype=dtype)
        float_option_kernel[(1,)](*words, out, ACC=acc)
        expected = torch.tensor([value], dtype=torch.float64).to(dtype)
        assert torch.equal(out.view(bits), expected.view(bits)), value


def _option_scaled(X, Out, hi, lo, n, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    x = tl.load(X + cols, mask=cols < n)
    tl.store(Out + cols, x * _common.as_float(hi, lo, tl.float64), mask=cols < n)


@pytest.mark.skipif(not _common.INTERPRETING, reason="runs kernels in the interpreter")
def test_float_option_words_do_not_specialize(monkeypatch):
    """Words of ``jit(float_options=...)`` arguments are left out of a launch key: options
    whose words differ in value and alignment (1.0's low word is 0, a multiple of 16;
    1/3's is not) launch under one key, checked against the JIT's own."""
    monkeypatch.setattr(_launch, "CHECK_LAUNCH_KEYS", True)
    kernel = jit(_option_scaled, float_options=["hi", "lo"])
    x = torch.arange(1.0, 6.0, dtype=torch.float64)
    for value in (1.0, 1 / 3, 0.0, -2.5):
        out = torch.empty_like(x)
        kernel.launch((1,), "one key", lambda: dict(BLOCK=8), x, out, *_common.float_bits(value), x.numel())
        assert torch.equal(out, x * value), value


@pytest.mark.skipif(not _common.INTERPRETING, reason="runs kernels in the interpreter")
def test_launch_with_a_key_runs_the_kernel_and_checks_the_key(monkeypatch):
    monkeypatch.setattr(_launch, "CHECK_LAUNCH_KEYS", True)
    kernel = jit(_axpy)
    (_, (x, y, out, n, limit, alpha), flags), (_, (misaligned, *_), _) = _launch_cases()[:2]
    kernel.launch((4,), "aligned", lambda: flags, x, y, out, n, limit, alpha)
    torch.testing.assert_close(out, 2.0 * x + y, rtol=0, atol=0)
    kernel.launch((4,), "aligned", lambda: flags, x, y, out, 64, 32, 3.0)  # other values, one specialization
    kernel.launch((4,), "misaligned", lambda: flags, misaligned, y, out, n, limit, alpha)
    with pytest.raises(LaunchKeyError, match="_axpy: launch key 'aligned' was given to arguments that specialize"):
        kernel.launch((4,), "aligned", lambda: flags, misaligned, y, out, n, limit, alpha)
    for name, other_args, other_flags in [
        ("Y None", (x, None, out, n, limit, alpha), dict(flags, HAS_Y=False)),
        ("n == 1", (x, y, out, 1, limit, alpha), flags),
        ("BLOCK", (x, y, out, n, limit, alpha), dict(flags, BLOCK=32)),
        ("num_warps", (x, y, out, n, limit, alpha), dict(flags, num_warps=1)),
        ("fp16 out", (x, y, out.half(), n, limit, alpha), flags),
    ]:
        with pytest.raises(LaunchKeyError):
            kernel.launch((4,), "aligned", lambda: other_flags, *other_args)
        kernel.launch((4,), name, lambda: other_flags, *other_args)
    with pytest.raises(LaunchKeyError, match="by position"):
        kernel.launch((4,), "n by name", lambda: dict(flags, limit=limit, alpha=alpha, n=n), x, y, out)
    # None is no key: launches of any specialization, none checked against another
    kernel.launch((4,), None, lambda: flags, misaligned, y, out, n, limit, alpha)
    kernel.launch((4,), None, lambda: dict(flags, HAS_Y=False), x, None, out.half(), 1, limit, alpha)


def _keyed_ops_forward_backward() -> list[torch.Tensor]:
    """Forward and backward of the ops whose launchers give launch keys (and an AdamW step), on CUDA tensors."""
    import gpukernels as gk

    g = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(64, 96, device="cuda", generator=g).to(dtype).requires_grad_()
        w = torch.randn(96, device="cuda", generator=g).to(dtype).requires_grad_()
        b = torch.randn(96, device="cuda", generator=g).to(dtype).requires_grad_()
        images = torch.randn(4, 8, 5, 5, device="cuda", generator=g).to(dtype).requires_grad_()
        stats = torch.zeros(8, device="cuda", dtype=dtype), torch.ones(8, device="cuda", dtype=dtype)
        logits = torch.randn(16, 40, device="cuda", generator=g).to(dtype).requires_grad_()
        target = torch.randint(0, 40, (16,), device="cuda", generator=g)
        w_linear = torch.randn(40, 96, device="cuda", generator=g).to(dtype).requires_grad_()
        outputs = [
            gk.layer_norm(x, (96,), w, b),
            gk.rms_norm(x, (96,), w),
            gk.dropout(x, 0.25, seed=7),
            gk.batch_norm(images, *stats, w[:8], b[:8], training=True),
            gk.cross_entropy(logits, target, label_smoothing=0.1),
            gk.cross_entropy(logits, target, reduction="none"),
            gk.swiglu(x, x.flip(1)),
            gk.swiglu(x),  # packed: gate and up the halves of x's rows
            gk.geglu(*x.chunk(2, dim=1)),  # rows apart
            gk.linear_act(x, w_linear, b[:40], activation="gelu"),
        ]
        for out in outputs:
            out.backward(torch.ones_like(out))
        results += [out.detach() for out in outputs]
        results += [x.grad, w.grad, b.grad, images.grad, logits.grad, w_linear.grad, *stats]
        param = torch.randn(3000, device="cuda", generator=g).to(dtype).requires_grad_()
        param.grad = torch.randn(3000, device="cuda", generator=g).to(dtype)
        gk.optim.AdamW([param], lr=1e-2).step()
        results.append(param.detach())
    return results


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_keyed_hits_match_checked_launches_on_gpu(monkeypatch):
    """The tests check launch keys, so every keyed launch goes through ``kernel[grid]``;
    here the hits themselves run (the second round without the check) and must give
    the checked launches' results to the bit."""
    checked = _keyed_ops_forward_backward()
    monkeypatch.setattr(_launch, "CHECK_LAUNCH_KEYS", False)
    for _ in range(2):
        hits = _keyed_ops_forward_backward()
    assert any(kernel._keyed for kernel in _launch.KERNELS), "no keyed launch was cached"
    for one, other in zip(checked, hits):
        assert torch.equal(one, other)


def test_common_has_no_constexpr_global_for_kernels():
    """JITFunction.run compares each global a kernel reads on every launch."""
    assert not [name for name, value in vars(_common).items() if isinstance(value, tl.constexpr)]


def test_num_programs_reads_the_sm_count_once_per_device(monkeypatch):
    queried = []

    def properties(device):
        queried.append(device)
        return type("Properties", (), {"multi_processor_count": 132 if device == 0 else 66})()

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    _common._sm_count.cache_clear()
    try:
        for _ in range(3):
            assert num_programs(torch.device("cuda", 0), 10**6) == 132 * 4
            assert num_programs(torch.device("cuda", 1), 10**6, per_sm=2) == 66 * 2
            assert num_programs(torch.device("cuda"), 10**6) == 66 * 4  # the current device
        assert num_programs(torch.device("cuda", 0), 5) == 5
        assert sorted(queried) == [0, 1]
    finally:
        _common._sm_count.cache_clear()


def test_fitting_per_sm_lowers_a_cuda_grid_to_what_an_sm_holds():
    class Compiled:
        def __init__(self, fits):
            self.fits, self.asked = fits, []

        def programs_per_sm(self, key, constexprs, *args):
            self.asked.append((key, constexprs(), args))
            return self.fits

    cuda = torch.device("cuda", 0)
    for fits, expected in ((1, 1), (3, 3), (4, 4), (8, 4), (0, 4)):  # 0: cannot launch, which the launch says
        kernel = Compiled(fits)
        assert _common.fitting_per_sm(cuda, 4, kernel, "key", lambda: {"BLOCK": 8}, 1, None) == expected
        assert kernel.asked == [("key", {"BLOCK": 8}, (1, None))]
    interpreted = Compiled(1)  # no compiled kernel on the interpreter's CPU tensors: its grid as it is
    assert _common.fitting_per_sm(torch.device("cpu"), 4, interpreted, "key", dict) == 4 and not interpreted.asked


def test_key_has_every_knob_jit_run_adds_to_options():
    check_key_has_every_knob_jit_run_adds(None)


# ---------------------------------------------------------------- through the stub driver (subprocess)


def _pythons():
    venv = Path(os.environ.get("GPUKERNELS_COMPAT_VENV", ROOT / ".venv-triton36"))
    compat = venv / "bin" / "python"
    missing = f"no Triton 3.6 environment at {venv} (ci/test-triton-compat.sh makes it)"
    return [
        pytest.param(sys.executable, id=f"triton-{triton.__version__}"),
        pytest.param(str(compat), id="triton-3.6", marks=pytest.mark.skipif(not compat.exists(), reason=missing)),
    ]


@pytest.fixture(scope="module")
def stub_build():
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the stub libcuda")
    host_time = load_host_time()
    return host_time, host_time.build(host_time.DEFAULT_BUILD)


@pytest.mark.parametrize("python", _pythons())
def test_launches_match_jit_through_stub_driver(python, stub_build):
    host_time, build_dir = stub_build
    version = subprocess.run(
        [python, "-c", "import triton; print(triton.__version__)"], capture_output=True, text=True, check=True
    ).stdout.strip()
    env = host_time.stub_environment(build_dir, build_dir / f"triton-cache-{version}")
    run = subprocess.run([python, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(run.stdout.splitlines()[-1])
    assert results["triton"] == version
    failed = {name: error for name, error in results["checks"].items() if error}
    assert not failed, failed
    assert set(results["checks"]) == set(STUB_CHECKS)


class _Stub:
    """The stub libcuda's record of the last launch."""

    PARAMS = 5  # parameters of _axpy every case passes (X, Out, limit, alpha and Y or n; no constexprs)

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        ctypes.c_uint.in_dll(lib, "recorded_params").value = self.PARAMS

    def launches(self) -> int:
        return ctypes.c_uint64.in_dll(self.lib, "launches").value

    def last(self) -> dict:
        return {
            "grid": tuple((ctypes.c_uint * 4).in_dll(self.lib, "last_grid")),
            "params": tuple((ctypes.c_uint64 * 16).in_dll(self.lib, "last_params"))[: self.PARAMS],
            "function": ctypes.c_void_p.in_dll(self.lib, "last_f").value,
            "stream": ctypes.c_void_p.in_dll(self.lib, "last_stream").value,
        }


def _launched(stub: _Stub, launch) -> dict:
    before = stub.launches()
    launch()
    assert stub.launches() == before + 1, "not exactly one launch"
    return stub.last()


def check_each_launch_is_the_jits(stub: _Stub) -> None:
    """Every case, in an order where a wrong cache hit would show, then again from the cache."""
    fn = triton.jit(_axpy)
    kernel = Kernel(fn)
    cases = _launch_cases()
    grid = (4,)
    functions = set()
    for round_ in ("first", "cached"):
        for name, args, kwargs in cases:
            ours = _launched(stub, lambda: kernel[grid](*args, **kwargs))
            jits = _launched(stub, lambda: fn[grid](*args, **kwargs))
            assert ours == jits, f"{round_} launch, {name}: ours {ours} != JIT's {jits}"
            functions.add(jits["function"])
    # all distinct, told apart by the stub, but for three the JIT shares: 2**32 and 2**31 + 16 (i64,
    # divisible by 16), -2**31 - 1 and 2**31 + 1 (i64), HAS_Y=1 and HAS_Y=True (equal constexprs)
    assert len(functions) == len(cases) - 3, f"{len(functions)} kernels for {len(cases)} cases"


def check_hits_skip_the_jit(stub: _Stub) -> None:
    fn = triton.jit(_axpy)
    kernel = Kernel(fn)
    cases = _launch_cases()
    for _, args, kwargs in cases:
        kernel[(4,)](*args, **kwargs)
    jit_run, calls = fn.run, []
    fn.run = lambda *a, **k: calls.append(1) or jit_run(*a, **k)
    for _, args, kwargs in cases:
        kernel[(4,)](*args, **kwargs)
    assert not calls, f"{len(calls)} of {len(cases)} cached launches went through JITFunction.run"
    assert kernel.cache_size() == len(cases) - 3, kernel.cache_size()  # as above


def check_stream_is_read_on_every_launch(stub: _Stub) -> None:
    from triton.runtime.driver import driver

    kernel = Kernel(triton.jit(_axpy))
    _, args, kwargs = _launch_cases()[0]
    original = driver.active.get_current_stream
    try:
        for stream in (0x1230, 0x4560, 0x1230):
            driver.active.get_current_stream = lambda device=None, stream=stream: stream
            assert _launched(stub, lambda: kernel[(4,)](*args, **kwargs))["stream"] == stream
    finally:
        driver.active.get_current_stream = original


def check_grid_forms(stub: _Stub) -> None:
    fn = triton.jit(_axpy)
    kernel = Kernel(fn)
    _, args, kwargs = _launch_cases()[0]
    for grid in [(3,), (3, 2), (3, 2, 5), [7], lambda meta: (triton.cdiv(meta["n"], meta["BLOCK"]), 2)]:
        for _ in range(2):
            ours = _launched(stub, lambda: kernel[grid](*args, **kwargs))
            assert ours == _launched(stub, lambda: fn[grid](*args, **kwargs)), grid


def check_keyed_launches_are_the_jits(stub: _Stub) -> None:
    """A launch key, once launched under, launches what the JIT would, with nothing of the
    arguments read but their values; the stream and hooks are still read every time."""
    from triton import knobs
    from triton.runtime.driver import driver

    fn = triton.jit(_axpy)
    kernel = Kernel(fn)
    cases = _launch_cases()
    for round_ in ("first", "cached"):
        for name, args, kwargs in cases:
            ours = _launched(stub, lambda: kernel.launch((4,), name, lambda: kwargs, *args))
            assert ours == _launched(stub, lambda: fn[(4,)](*args, **kwargs)), f"{round_} launch, {name}"
    binder_calls = []
    for device, (binder, kernels) in list(kernel._devices.items()):
        kernel._devices[device] = (lambda *a, b=binder, **k: binder_calls.append(1) or b(*a, **k), kernels)
    jit_run, jit_calls = fn.run, []
    fn.run = lambda *a, **k: jit_calls.append(1) or jit_run(*a, **k)
    name, (x, y, out, n, limit, alpha), kwargs = cases[0]
    other = torch.randn(64)  # other addresses and values, the same specialization
    constexpr_calls = []
    hit = _launched(
        stub,
        lambda: kernel.launch(
            (4,), name, lambda: constexpr_calls.append(1) or kwargs, other, other, other, 48, 32, 0.5
        ),
    )
    assert not binder_calls and not jit_calls, "a keyed hit read the arguments' specialization"
    assert not constexpr_calls, "a keyed hit built its constexprs"
    assert hit == _launched(stub, lambda: jit_run(other, other, other, 48, 32, 0.5, grid=(4,), warmup=False, **kwargs))
    original = driver.active.get_current_stream
    try:
        driver.active.get_current_stream = lambda device=None: 0x7890
        assert _launched(stub, lambda: kernel.launch((4,), name, lambda: kwargs, *cases[0][1]))["stream"] == 0x7890
    finally:
        driver.active.get_current_stream = original
    # torch.cuda.current_device as the driver's (Triton <= 3.6): its C call instead, no lazy-init check
    asked = []
    python_device, c_device = (lambda: asked.append("python") or 0), (lambda: asked.append("C") or 0)
    saved = driver.active.get_current_device, _launch._torch_current_device, _launch._cuda_get_device
    driver.active.get_current_device, _launch._torch_current_device, _launch._cuda_get_device = (
        python_device,
        python_device,
        c_device,
    )
    try:
        keyed = _launched(stub, lambda: kernel.launch((4,), name, lambda: kwargs, *cases[0][1]))
    finally:
        driver.active.get_current_device, _launch._torch_current_device, _launch._cuda_get_device = saved
    assert asked == ["C"], asked
    assert keyed == _launched(stub, lambda: fn[(4,)](*cases[0][1], **kwargs))
    seen = []
    hook = lambda metadata: seen.append(metadata.get()["name"])  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        kernel.launch((4,), name, lambda: kwargs, *cases[0][1])
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert seen == ["_axpy"]


def check_keyless_launches_are_the_jits(stub: _Stub) -> None:
    """A key of None (a misaligned pointer, a traced launch) is no key: every such
    launch, of whatever specialization, is the JIT's, and none is cached under it."""
    fn = triton.jit(_axpy)
    kernel = Kernel(fn)
    for round_ in ("first", "cached"):
        for name, args, kwargs in _launch_cases() + _launch_cases(torch.float16):
            ours = _launched(stub, lambda: kernel.launch((4,), None, lambda: kwargs, *args))
            assert ours == _launched(stub, lambda: fn[(4,)](*args, **kwargs)), f"{round_} launch, {name}"
    assert not kernel._keyed


def check_launch_keys_are_bounded(stub: _Stub) -> None:
    """Past KEYED_LIMIT keys a kernel drops those it holds; a dropped key launches
    through the compiled kernels again, as the JIT would."""
    fn = triton.jit(_axpy)
    kernel = Kernel(fn)
    name, args, kwargs = _launch_cases()[0]
    limit = _launch.KEYED_LIMIT
    _launch.KEYED_LIMIT = 3
    try:
        for key in range(7):
            kernel.launch((4,), key, lambda: kwargs, *args)
            assert 1 <= len(kernel._keyed) <= 3
        assert set(key for _, key in kernel._keyed) == {6}
        assert _launched(stub, lambda: kernel.launch((4,), 0, lambda: kwargs, *args)) == _launched(
            stub, lambda: fn[(4,)](*args, **kwargs)
        )
    finally:
        _launch.KEYED_LIMIT = limit
    assert kernel.cache_size() == 1


def check_launch_hooks_see_each_launch(stub: _Stub) -> None:
    from triton import knobs

    kernel = Kernel(triton.jit(_axpy))
    _, args, kwargs = _launch_cases()[0]
    kernel[(4,)](*args, **kwargs)
    seen = []
    hook = lambda metadata: seen.append(metadata.get()["name"])  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        kernel[(4,)](*args, **kwargs)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    kernel[(4,)](*args, **kwargs)
    assert seen == ["_axpy"]
    chain = knobs.runtime.launch_enter_hook
    knobs.runtime.launch_enter_hook = hook  # a plain function in place of the chain: the JIT's launch
    try:
        kernel[(4,)](*args, **kwargs)
    finally:
        knobs.runtime.launch_enter_hook = chain
    assert seen == ["_axpy"] * 2


def check_bad_arguments_get_the_jits_errors(stub: _Stub) -> None:
    fn = triton.jit(_axpy)
    kernel = Kernel(fn)
    _, (x, y, out, n, limit, alpha), kwargs = _launch_cases()[0]
    kernel[(4,)](x, y, out, n, limit, alpha, **kwargs)
    for bad_args, bad_kwargs in [
        ((x, y, out, n, 2**64, alpha), kwargs),  # beyond 64 bits
        ((x, y, out, n, limit), kwargs),  # one missing
        ((x, y, out, n, limit, alpha), dict(kwargs, num_wraps=4)),
    ]:
        errors = []
        for launch in (kernel[(4,)], fn[(4,)]):
            try:
                launch(*bad_args, **bad_kwargs)
                errors.append(None)
            except Exception as e:
                errors.append((type(e), str(e)))
        assert errors[0] is not None and errors[0] == errors[1], errors


def check_kernels_read_no_globals(stub: _Stub) -> None:
    """round_to's interpreter switch is a default argument: nothing for JITFunction.run to compare."""
    fn = triton.jit(_axpy)
    _, args, kwargs = _launch_cases()[0]
    fn[(4,)](*args, **kwargs)
    assert fn.used_global_vals == {}, fn.used_global_vals


def check_key_has_every_knob_jit_run_adds(stub: _Stub | None) -> None:
    source = inspect.getsource(JITFunction.run)
    added = re.findall(r'kwargs\["(\w+)"\] = .*?knobs\.(\w+)\.(\w+)', source)
    assert added and sorted((group, name) for _, group, name in added) == sorted(JIT_OPTION_KNOBS), added


def check_programs_per_sm_compiles_without_a_launch(stub: _Stub) -> None:
    """The compiled kernel's own registers, threads and shared memory, read once per key;
    tensors given by their dtypes, no launch."""
    from gpukernels.backends.triton import _occupancy

    fn = triton.jit(_axpy)
    kernel = Kernel(fn)
    _, (x, y, out, n, limit, alpha), kwargs = _launch_cases()[0]
    warmups = []
    warmup = fn.warmup
    fn.warmup = lambda *args, **kw: warmups.append(args) or warmup(*args, **kw)
    _launch.device_limits = lambda device: _occupancy.SM90  # the stub's device 0 is an H100
    try:
        before = stub.launches()
        for key in ("f32", "f32", None):
            fits = kernel.programs_per_sm(key, lambda: dict(kwargs, num_warps=8), x, y, out.dtype, n, limit, alpha)
            compiled = fn.warmup(x.dtype, y.dtype, out.dtype, n, limit, alpha, grid=(1,), **kwargs, num_warps=8)
            compiled._init_handles()
            threads = compiled.metadata.num_warps * 32
            assert threads == 256
            assert fits == _occupancy.programs_per_sm(compiled.n_regs, threads, compiled.metadata.shared)[0] > 0
        assert stub.launches() == before
        assert len(warmups) == 2 + 3  # one for the key, one for no key; three checks
        assert warmups[0] == (torch.float32, torch.float32, torch.float32, n, limit, alpha)
    finally:
        del fn.warmup
        _launch.device_limits = _occupancy.device_limits


def check_jit_decorates_into_kernel(stub: _Stub) -> None:
    assert isinstance(jit(_axpy), Kernel) and isinstance(jit(do_not_specialize=["n"])(_axpy), Kernel)
    assert jit(do_not_specialize=["n"])(_axpy).fn.params[3].do_not_specialize


STUB_CHECKS = {name: check for name, check in globals().items() if name.startswith("check_")}


def _run_stub_checks() -> None:
    """In a process without the interpreter, against the stub libcuda: run every check, print the results."""
    stub = _Stub(load_host_time().install_stub_driver())
    results = {}
    for name, check in STUB_CHECKS.items():
        try:
            check(stub)
            results[name] = None
        except Exception as e:
            results[name] = f"{type(e).__name__}: {e}"
    print(json.dumps({"triton": triton.__version__, "checks": results}))


if __name__ == "__main__":
    if _common.INTERPRETING:
        sys.exit("run without TRITON_INTERPRET: these checks launch compiled kernels through the stub libcuda")
    _run_stub_checks()
