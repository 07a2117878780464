"""Host instructions per call of each op, forward and backward, ours against
PyTorch's equivalent, through Triton's real launch path on a machine without
a GPU.

    python -m bench.host_time --out DIR [--ops layer_norm,dropout] [--calls 20] [--setup FILE]

Our ops run their Triton kernels on CPU tensors: JITFunction.run (or our
direct launcher) -> CompiledKernel -> Triton's C launcher -> libcuda, where
libcuda is a stub built here (every call succeeds, no kernel runs; kernels
are compiled for sm_90 by Triton's own compiler). PyTorch's ops run on the
same CPU tensors (their CPU kernels: shapes are tiny so that the arithmetic
hardly counts). callgrind counts the host instructions of each call,
deterministically; ratios of ours to PyTorch's from the same run are the
figures to trust. Not measured: the real driver, the CUDA caching allocator,
autograd's device thread, CUDA-only branches of our launchers (on the SM
count, CUDA graphs), overlap with the GPU.

Each op is measured standalone (one call and its backward) and inside a
chain of four calls with one backward (the chain's count / 4); the norms also
standalone on input of the rank models give them (layer_norm: batch, tokens,
features; batch_norm: N, C, H, W), which 2-D input does not show (a view of the
input around the op would cost as much as a launch). AdamW: one optimizer
step, against torch.optim.AdamW(fused=True), on the same params.

``--ops resnet50_step,llama_step,gpt2_step`` (not by default) counts a whole
training step of a model instead: ResNet-50's layout, and GPT-2's and the
Llama preset's 12 layers, at widths where the CPU arithmetic of the layers
both ways run on PyTorch stays small; eager (torch layers, torch.optim.AdamW
and clip_grad_norm_, foreach) against patched (gk.patch, gk.optim.AdamW with
the clip in its step), the whole step and its forward and backward alone.
Both columns include that arithmetic: their difference is what patching
changes in a step's host time.

``--bytecodes N`` says where the time goes instead: for one call of each case
(after the warm-up), the N Python functions that execute the most bytecodes
(``sys.settrace``'s opcode events), ours and PyTorch's; no valgrind needed.
A bytecode is roughly 100 host instructions here, more where it calls into C.

Needs gcc and valgrind (callgrind headers). Kernels are compiled once, before
the count, into ``--cache-dir``. ``--setup FILE`` runs a Python file in the
counting process first: a way to measure a change without editing the tree.
Writes ``host_time.json`` and ``host_time.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import glob
import json
import os
import platform
import runpy
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUILD = Path(tempfile.gettempdir()) / "gpukernels-hosttime"
CHAIN = 4

# A stand-in for libcuda.so.1: every call succeeds, no kernel runs. The last
# launch's grid, stream, function and first ``recorded_params`` parameters (low
# 32 bits; the stub cannot know how many a kernel has, so the caller says) are
# kept for tests that compare two launch paths.
STUB_LIBCUDA = r"""
#include <stdint.h>
#include <stddef.h>
typedef int CUresult;
static void *the_ctx = (void *)0x1;
volatile uint64_t launches = 0;
unsigned recorded_params = 0;
uint64_t last_params[16]; unsigned last_grid[4]; void *last_f; void *last_stream;
typedef struct { unsigned gx, gy, gz, bx, by, bz, smem; void *stream; void *attrs; unsigned nattrs; } LaunchConfig;
CUresult cuLaunchKernelEx(const void *config, void *f, void **params, void **extra) {
  const LaunchConfig *c = (const LaunchConfig *)config; launches++;
  last_grid[0] = c->gx; last_grid[1] = c->gy; last_grid[2] = c->gz; last_grid[3] = c->bx;
  last_f = f; last_stream = c->stream;
  for (unsigned i = 0; i < recorded_params && i < 16; i++) last_params[i] = *(uint32_t *)params[i];
  return 0; }
CUresult cuLaunchKernel(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned smem, void *stream, void **params, void **extra) { launches++; return 0; }
CUresult cuCtxGetCurrent(void **pctx) { *pctx = the_ctx; return 0; }
CUresult cuCtxSetCurrent(void *ctx) { return 0; }
CUresult cuDeviceGet(int *d, int ordinal) { *d = 0; return 0; }
CUresult cuDevicePrimaryCtxRetain(void **pctx, int d) { *pctx = the_ctx; return 0; }
CUresult cuPointerGetAttribute(void *data, int attribute, uint64_t ptr) { *(uint64_t *)data = ptr; return 0; }
CUresult cuPointerGetAttributes(unsigned n, int *attrs, void **data, uint64_t ptr) { return 0; }
CUresult cuGetErrorString(CUresult e, const char **s) { *s = "stub"; return 0; }
CUresult cuFuncSetAttribute(void *f, int a, int v) { return 0; }
CUresult cuOccupancyMaxActiveClusters(int *n, void *f, const void *cfg) { *n = 1; return 0; }
CUresult cuInit(unsigned flags) { return 0; }
CUresult cuDriverGetVersion(int *v) { *v = 13000; return 0; }
CUresult cuCtxGetDevice(int *d) { *d = 0; return 0; }
CUresult cuCtxGetLimit(size_t *v, int l) { *v = 0; return 0; }
CUresult cuCtxSetLimit(int l, size_t v) { return 0; }
CUresult cuDeviceGetAttribute(int *v, int a, int d) { *v = 0; return 0; }
CUresult cuFuncGetAttribute(int *v, int a, void *f) { *v = 0; return 0; }
CUresult cuFuncSetCacheConfig(void *f, int c) { return 0; }
CUresult cuModuleGetFunction(void **f, void *m, const char *n) { *f = (void *)0x2000; return 0; }
CUresult cuModuleLoadData(void **m, const void *img) { *m = (void *)0x1000; return 0; }
CUresult cuModuleUnload(void *m) { return 0; }
CUresult cuStreamIsCapturing(void *s, int *st) { *st = 0; return 0; }
CUresult cuTensorMapEncodeIm2col() { return 0; }
CUresult cuTensorMapEncodeTiled() { return 0; }
"""

# Start and stop callgrind's counting from Python, so that only the calls measured count.
CALLGRIND_MARKS = r"""
#include <valgrind/callgrind.h>
void cg_start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void cg_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; CALLGRIND_DUMP_STATS; }
"""

H100_PROPERTIES = {
    "max_shared_mem": 232448,
    "multiprocessor_count": 132,
    "sm_clock_rate": 1980000,
    "mem_clock_rate": 2619000,
    "mem_bus_width": 5120,
    "max_num_regs": 65536,
    "warpSize": 32,
}


def missing_tools() -> str | None:
    """What this machine lacks to count instructions, or None."""
    for tool in ("gcc", "valgrind"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {tool})"
    if not Path("/usr/include/valgrind/callgrind.h").exists():
        return "valgrind's headers are missing (apt-get install valgrind)"
    return None


def build(directory: Path) -> Path:
    """Compile the stub libcuda (and, with valgrind's headers, the callgrind marks) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, source in (("libcuda.so.1", STUB_LIBCUDA), ("libcallgrind_marks.so", CALLGRIND_MARKS)):
        if name == "libcallgrind_marks.so" and not Path("/usr/include/valgrind/callgrind.h").exists():
            continue
        c_file = directory / (name.split(".")[0] + ".c")
        if not (directory / name).exists() or not c_file.exists() or c_file.read_text() != source:
            c_file.write_text(source)
            subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(directory / name), str(c_file)], check=True)
    if not (directory / "libcuda.so").exists():
        (directory / "libcuda.so").symlink_to("libcuda.so.1")
    return directory


def stub_environment(directory: Path, cache_dir: Path | None = None) -> dict[str, str]:
    """The environment of a process that launches through the stub in ``directory``:
    compiled kernels, not the interpreter; the default backend selection; launch keys
    trusted, as in use (not checked, as in the tests)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TRITON_INTERPRET", "GPUKERNELS_BACKEND", "GPUKERNELS_CHECK_LAUNCH_KEYS")
    }
    env.update(
        TRITON_LIBCUDA_PATH=str(directory),
        LD_LIBRARY_PATH=str(directory),
        PYTHONHASHSEED="0",
        TRITON_CACHE_DIR=str(cache_dir or directory / "triton-cache"),
    )
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def install_stub_driver() -> ctypes.CDLL:
    """Make Triton launch through the stub libcuda (found on ``TRITON_LIBCUDA_PATH``)
    from now on: an H100 (sm_90) target, device 0, stream 0. Each compiled kernel
    gets its own function handle, so the stub's ``last_f`` says which one ran.
    Returns the stub, for its ``last_*`` records."""
    import itertools

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.backends.nvidia import driver as nvidia
    from triton.runtime.driver import driver

    handles = itertools.count(0x10000, 0x10)

    class Utils:
        def get_device_properties(self, device):
            return dict(H100_PROPERTIES)

        def load_binary(self, name, kernel, shared, device):
            return 0x1000, next(handles), 32, 0, 1024  # module, function, registers, spills, max threads

        def unload_module(self, module):
            pass

    class StubCudaDriver(DriverBase):
        def __init__(self):
            self.utils = Utils()
            if tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 7):
                real = nvidia.CudaUtils()  # one launcher module for every kernel (driver.c), built against the stub
                for name in ("launch", "build_signature_metadata", "is_stream_capturing"):
                    if hasattr(real, name):
                        setattr(self.utils, name, getattr(real, name))
            self.launcher_cls = nvidia.CudaLauncher
            # C calls, as the real driver's are (torch's device query, _cuda_getCurrentRawStream):
            # a Python function here would count frames no GPU launch runs
            self.get_current_device = int  # device 0
            self.get_current_stream = (0).__mul__  # stream 0 of every device
            self.set_current_device = lambda device: None
            self.get_device_capability = lambda device=None: (9, 0)

        @staticmethod
        def is_active():
            return True

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_interface(self):
            return torch.cuda

        def map_python_to_cpp_type(self, ty):
            return nvidia.ty_to_cpp(ty)

        def get_benchmarker(self):
            raise NotImplementedError("no GPU: nothing to time")

        def get_empty_cache_for_benchmark(self):
            raise NotImplementedError("no GPU")

        def clear_cache(self, cache):
            pass

    driver.set_active(StubCudaDriver())
    return ctypes.CDLL(str(Path(os.environ["TRITON_LIBCUDA_PATH"]) / "libcuda.so.1"))


def route_cpu_tensors_to_triton() -> None:
    """Our ops on CPU tensors run the Triton backend's compiled kernels (through the stub),
    as its default, so that what is counted is the path of a user who selects no backend."""
    from gpukernels import _backend
    from gpukernels.backends import triton as backend

    backend.device_types = lambda: ("cuda", "cpu")
    backend.unavailable_reason = lambda: None
    _backend._DEFAULT_FOR_DEVICE["cpu"] = "triton"


def flags_as_kernels_would_write() -> None:
    """No kernel runs under the stub, so a flag that a kernel writes and the host reads
    back on CPU tensors (on CUDA it feeds a device-side assert instead) keeps its initial
    value. cross_entropy's target check reads the forward's ``ok`` flag, kept per stream
    and thread beside its arrival counter: set it, as the kernel would."""
    import torch

    from gpukernels.backends.triton._common import arrival_counter

    arrival_counter(torch.device("cpu"), results=1)[1] = 1


# ---- the ops: {mode: (ours, PyTorch's)}, each callable a forward and its backward ----
# Tiny shapes: PyTorch's CPU arithmetic hardly counts.


def _leaf(*shape):
    import torch

    return torch.randn(*shape, requires_grad=True)


def _standalone(ours, pytorch, x) -> tuple:
    """One call on ``x`` and its backward, ours and PyTorch's."""
    return (lambda: ours(x).sum().backward()), (lambda: pytorch(x).sum().backward())


def _fwd_bwd(ours, pytorch, x) -> dict:
    """Standalone: one call and its backward; chain: CHAIN calls, each on the last's output, one backward."""

    def chain(op):
        def run():
            y = x
            for _ in range(CHAIN):
                y = op(y)
            y.sum().backward()

        return run

    return {"standalone": _standalone(ours, pytorch, x), "chain": (chain(ours), chain(pytorch))}


def _layer_norm():
    import torch.nn.functional as F

    import gpukernels as gk

    x, w, b = _leaf(8, 64), _leaf(64), _leaf(64)

    def ours(t):
        return gk.layer_norm(t, (64,), w, b)

    def pytorch(t):
        return F.layer_norm(t, (64,), w, b)

    tokens = _leaf(2, 4, 64)
    return {**_fwd_bwd(ours, pytorch, x), "tokens": _standalone(ours, pytorch, tokens)}


def _add_rms_norm():
    """A Llama block's residual addition and its RMSNorm: ours in one op, PyTorch's an addition
    and F.rms_norm; both outputs' gradients back (the residual stream reads the sum)."""
    import torch.nn.functional as F

    import gpukernels as gk

    x, residual, w = _leaf(8, 64), _leaf(8, 64), _leaf(64)

    def ours():
        y, summed = gk.add_rms_norm(x, residual, (64,), w)
        (y.sum() + summed.sum()).backward()

    def pytorch():
        summed = residual + x
        (F.rms_norm(summed, (64,), w).sum() + summed.sum()).backward()

    return {"standalone": (ours, pytorch)}


def _gated_act():
    """A gated MLP's SwiGLU: of two projections' outputs (Llama's), and of one packed gate-up
    projection's (Phi-3's); PyTorch's ``F.silu(gate) * up`` of them (of the packed one's chunks)."""
    import torch.nn.functional as F

    import gpukernels as gk

    gate, up, gate_up = _leaf(8, 64), _leaf(8, 64), _leaf(8, 128)

    def packed_pytorch():
        gate, up = gate_up.chunk(2, dim=-1)
        (F.silu(gate) * up).sum().backward()

    return {
        "standalone": (
            lambda: gk.swiglu(gate, up).sum().backward(),
            lambda: (F.silu(gate) * up).sum().backward(),
        ),
        "packed": (lambda: gk.swiglu(gate_up).sum().backward(), packed_pytorch),
    }


def _batch_norm():
    import torch
    import torch.nn.functional as F

    import gpukernels as gk

    x, w, b = _leaf(8, 16), _leaf(16), _leaf(16)
    ours_stats, their_stats = [(torch.zeros(16), torch.ones(16)) for _ in range(2)]

    def ours(t):
        return gk.batch_norm(t, *ours_stats, w, b, training=True, momentum=0.1)

    def pytorch(t):
        return F.batch_norm(t, *their_stats, w, b, training=True, momentum=0.1)

    images = _leaf(2, 16, 2, 2)
    return {**_fwd_bwd(ours, pytorch, x), "images": _standalone(ours, pytorch, images)}


def _dropout():
    import torch.nn.functional as F

    import gpukernels as gk

    return _fwd_bwd(
        lambda t: gk.dropout(t, p=0.1, training=True), lambda t: F.dropout(t, p=0.1, training=True), _leaf(8, 64)
    )


def _cross_entropy():
    """A loss has no output to chain: the chain is CHAIN losses summed, one backward."""
    import torch
    import torch.nn.functional as F

    import gpukernels as gk

    logits, target = _leaf(8, 32), torch.randint(0, 32, (8,))

    def standalone(loss):
        return lambda: loss(logits, target).backward()

    def chain(loss):
        return lambda: sum(loss(logits, target) for _ in range(CHAIN)).backward()

    return {
        "standalone": (standalone(gk.cross_entropy), standalone(F.cross_entropy)),
        "chain": (chain(gk.cross_entropy), chain(F.cross_entropy)),
    }


def _linear_act():
    import torch.nn.functional as F

    import gpukernels as gk

    x, w, b = _leaf(8, 32), _leaf(32, 32), _leaf(32)
    return _fwd_bwd(lambda t: gk.linear_act(t, w, b, activation="gelu"), lambda t: F.gelu(F.linear(t, w, b)), x)


def _adamw():
    """One step over the same params, against torch.optim.AdamW(fused=True)."""
    import torch

    import gpukernels as gk

    shapes = [(32, 32), (32,), (64, 16), (16,)]
    ours, theirs = [[torch.randn(s, requires_grad=True) for s in shapes] for _ in range(2)]
    for p, q in zip(ours, theirs):
        p.grad = torch.randn(p.shape)
        q.grad = p.grad.clone()
    return {"step": (gk.optim.AdamW(ours, lr=1e-3).step, torch.optim.AdamW(theirs, lr=1e-3, fused=True).step)}


# ---- whole training steps: a model's forward, backward and optimizer step, eager against patched ----
# The real model's layers (so its launches and Python), at widths where the CPU arithmetic
# of the layers both ways run on PyTorch (convolutions, matmuls, attention) stays small:
# the difference of the two counts is what patching adds to or takes from a step's host time.


def _step(loss_of, optimizer, clip, batch, update: bool = True):
    """A training step's closure, returning its loss; ``update=False``: forward and backward only."""

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(*batch)
        loss.backward()
        if update:
            clip()
            optimizer.step()
        return loss

    return step


def _steps_of(build, loss_of, patched_loss_of, batch) -> dict:
    """Eager: torch layers, torch.optim.AdamW and clip_grad_norm_ (foreach, as on CUDA by
    default); patched: ``patched_loss_of`` on gk.patch's layers and gk.optim.AdamW with the
    clip in its step. Same initial weights. The whole step, and its forward and backward
    alone (torch's foreach ops on CPU tensors loop over the tensors in C++, where on CUDA
    they launch a kernel per chunk of tensors: the optimizer's count is CPU's, not CUDA's)."""
    import copy

    import torch

    import gpukernels as gk

    model = build()
    plain, patched = model, copy.deepcopy(model)
    patched_loss = patched_loss_of(patched)
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-3, weight_decay=0.01, foreach=True)

    def clip():
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0, foreach=True)

    ours = gk.optim.AdamW(patched.parameters(), lr=1e-3, weight_decay=0.01, max_grad_norm=1.0)
    plain_loss = loss_of(plain)
    return {
        mode: (
            _step(patched_loss, ours, lambda: None, batch, update),
            _step(plain_loss, optimizer, clip, batch, update),
        )
        for mode, update in (("train_step", True), ("train_fwd_bwd", False))
    }


def _resnet50_step():
    """ResNet-50's layout (3, 4, 6, 3 bottlenecks: 53 BatchNorms), width 2, 2 images of
    32x32, channels-last as the gpu preset trains it."""
    import torch

    import gpukernels as gk
    from gpukernels.train.models import ResNet

    def build():
        return ResNet((3, 4, 6, 3), width=2, classes=10).to(memory_format=torch.channels_last)

    images = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (2,))

    def loss_of(model):
        return lambda x, y: torch.nn.functional.cross_entropy(model(x), y)

    def patched_loss_of(model):
        gk.patch(model)
        return lambda x, y: gk.cross_entropy(model(x), y)

    return _steps_of(build, loss_of, patched_loss_of, (images, labels))


def _language_model_step(kind: str):
    """The gpu preset's 12 layers (Llama: its 32k vocabulary's head through the fused loss
    too) at width 64, 16 tokens of one sequence, vocabulary 256."""
    import torch

    import gpukernels as gk
    from gpukernels.train.models import build_language_model

    cfg = dict(vocab=256, width=64, intermediate=176, layers=12, heads=4, kv_heads=4, seq_len=16)
    ids = torch.randint(0, 256, (1, 16))

    def loss_of(model):
        return lambda ids: model(input_ids=ids, labels=ids).loss

    def patched_loss_of(model):
        gk.patch(model, loss="fused")
        return loss_of(model)

    return _steps_of(lambda: build_language_model(kind, cfg), loss_of, patched_loss_of, (ids,))


STEPS = {
    "resnet50_step": _resnet50_step,
    "llama_step": lambda: _language_model_step("llama"),
    "gpt2_step": lambda: _language_model_step("gpt2"),
}
"""Counted when named in ``--ops`` (not by default: a step is tens of millions of instructions)."""


CASES = {
    "layer_norm": _layer_norm,
    "add_rms_norm": _add_rms_norm,
    "batch_norm": _batch_norm,
    "dropout": _dropout,
    "gated_act": _gated_act,
    "cross_entropy": _cross_entropy,
    "linear_act": _linear_act,
    "adamw": _adamw,
}
OPS = tuple(CASES)
CASES |= STEPS


WARM_UP = 20  # calls before counting: Python specialises a function's bytecode after a few calls


def _count(fn, calls: int, marks: ctypes.CDLL | None, out_dir: str) -> float | None:
    """Host instructions per call of ``fn`` over ``calls`` calls after WARM_UP calls,
    counted by callgrind; None outside callgrind (the warm-up compiles the kernels)."""
    import gc

    for _ in range(WARM_UP):
        fn()
    if marks is None:
        return None
    gc.collect()
    gc.disable()
    try:
        before = set(glob.glob(os.path.join(out_dir, "cg.*")))
        marks.cg_start()
        for _ in range(calls):
            fn()
        marks.cg_stop()
    finally:
        gc.enable()
    dump = max(set(glob.glob(os.path.join(out_dir, "cg.*"))) - before, key=os.path.getmtime)
    totals = [int(line.split()[1]) for line in open(dump) if line.startswith("totals:")]
    if not totals:
        raise RuntimeError(f"no totals in {dump}")
    return totals[-1] / calls


def bytecodes_by_function(fn) -> collections.Counter:
    """How many bytecodes each Python function (``file:line name``) executes in one call
    of ``fn``, counted per code object: sys.monitoring's instruction events from Python
    3.12 (whose sys.settrace, built on them, delivers no opcode events: 3.12.1 counted
    nothing), sys.settrace's opcode events before."""
    counts = collections.Counter()
    prefixes = sorted({str(ROOT) + os.sep, *(p + os.sep for p in sys.path if p)}, key=len, reverse=True)

    def where(code) -> str:
        name = code.co_filename
        short = next((name[len(p) :] for p in prefixes if name.startswith(p)), name)
        return f"{short}:{code.co_firstlineno} {code.co_name}"

    if sys.version_info >= (3, 12):
        monitoring, tool, own = sys.monitoring, sys.monitoring.OPTIMIZER_ID, sys._getframe().f_code
        instruction = monitoring.events.INSTRUCTION

        def count(code, offset):
            if code is not own:  # this function's call of fn
                counts[where(code)] += 1

        monitoring.use_tool_id(tool, "bench.host_time --bytecodes")
        monitoring.register_callback(tool, instruction, count)
        monitoring.set_events(tool, instruction)
        try:
            fn()
        finally:
            monitoring.set_events(tool, 0)
            monitoring.register_callback(tool, instruction, None)
            monitoring.free_tool_id(tool)
        return counts

    def trace(frame, event, arg):
        frame.f_trace_opcodes = True
        if event == "opcode":
            counts[where(frame.f_code)] += 1
        return trace

    sys.settrace(trace)
    try:
        fn()
    finally:
        sys.settrace(None)
    return counts


def _bytecodes(fn, top: int) -> dict:
    for _ in range(WARM_UP):
        fn()
    counts = bytecodes_by_function(fn)
    return {"total": sum(counts.values()), "top": counts.most_common(top)}


def _worker(args) -> None:
    """In the counting process (or, outside callgrind, the one that compiles the kernels
    first): launch through the stub, count each case, write the raw counts."""
    import warnings

    warnings.simplefilter("ignore")
    install_stub_driver()
    if args.setup:
        runpy.run_path(str(args.setup), run_name="__setup__")
    route_cpu_tensors_to_triton()
    flags_as_kernels_would_write()
    import torch

    torch.set_num_threads(1)
    under_callgrind = any("vgpreload" in line for line in open("/proc/self/maps"))
    marks = ctypes.CDLL(str(args.build_dir / "libcallgrind_marks.so")) if under_callgrind else None
    counts, errors = {}, {}
    for op in args.ops:
        try:
            torch.manual_seed(0)
            cases = CASES[op]()
            if args.bytecodes:
                counts[op] = {
                    mode: {"ours": _bytecodes(ours, args.bytecodes), "pytorch": _bytecodes(pytorch, args.bytecodes)}
                    for mode, (ours, pytorch) in cases.items()
                }
                continue
            counts[op] = {
                mode: {
                    "ours": _count(ours, args.calls, marks, str(args.cg_dir)),
                    "pytorch": _count(pytorch, args.calls, marks, str(args.cg_dir)),
                }
                for mode, (ours, pytorch) in cases.items()
            }
        except Exception as e:  # a family being converted may be broken for a while: count the others
            errors[op] = f"{type(e).__name__}: {e}"
    Path(args.worker).write_text(json.dumps({"counts": counts, "errors": errors}))


def _run_worker(args, under_valgrind: bool) -> dict:
    raw = args.cg_dir / "raw.json"
    command = [
        sys.executable,
        __file__,
        "--worker",
        str(raw),
        "--build-dir",
        str(args.build_dir),
        "--ops",
        ",".join(args.ops),
        "--calls",
        str(args.calls),
        "--cg-dir",
        str(args.cg_dir),
    ]
    if args.setup:
        command += ["--setup", str(args.setup)]
    if args.bytecodes:
        command += ["--bytecodes", str(args.bytecodes)]
    if under_valgrind:
        command = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            "--quiet",
            f"--callgrind-out-file={args.cg_dir}/cg.%p",
            *command,
        ]
    subprocess.run(command, env=stub_environment(args.build_dir, args.cache_dir), check=True)
    return json.loads(raw.read_text())


def rows_of(counts: dict) -> list[dict]:
    """One row per (op, mode), per call: ours, PyTorch's, ours / PyTorch's."""
    rows = []
    for op, modes in counts.items():
        for mode, c in modes.items():
            per = CHAIN if mode == "chain" else 1
            ours, pytorch = c["ours"] / per, c["pytorch"] / per
            rows.append(
                {
                    "op": op,
                    "mode": mode,
                    "ours": round(ours),
                    "pytorch": round(pytorch),
                    "ratio": round(ours / pytorch, 3),
                }
            )
    return rows


MODE_LABELS = {
    "standalone": "fwd+bwd, standalone",
    "chain": f"fwd+bwd, per op in a chain of {CHAIN}",
    "tokens": "fwd+bwd, standalone, (batch, tokens, features) input",
    "images": "fwd+bwd, standalone, (N, C, H, W) input",
    "packed": "fwd+bwd, standalone, gate and up packed in one tensor",
    "step": "optimizer step",
    "train_step": "training step: forward, backward, clip, AdamW",
    "train_fwd_bwd": "training step's forward and backward",
}


def markdown(rows: list[dict], unit: str) -> str:
    lines = [f"| op | what | ours ({unit}) | PyTorch's ({unit}) | ours / PyTorch's |", "|---|---|---:|---:|---:|"]
    for r in rows:
        what = MODE_LABELS.get(r["mode"], r["mode"])  # a --setup file's own cases print as named
        lines.append(f"| {r['op']} | {what} | {r['ours']:,} | {r['pytorch']:,} | {r['ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def bytecode_tables(counts: dict) -> str:
    """``--bytecodes``' answer: per case, ours and PyTorch's totals, then ours by function."""
    parts = []
    for op, modes in counts.items():
        for mode, c in modes.items():
            ours, pytorch = c["ours"], c["pytorch"]
            parts.append(
                f"### {op}: {MODE_LABELS.get(mode, mode)}\n\nbytecodes in one call of the case: "
                f"ours {ours['total']:,}, PyTorch's {pytorch['total']:,}\n\n| ours: bytecodes | function |\n|--:|---|\n"
                + "".join(f"| {n:,} | `{where}` |\n" for where, n in ours["top"])
            )
    return "\n".join(parts)


def environment() -> dict:
    import torch
    import triton

    return {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "note": "host instructions per call (callgrind) on a CPU machine, Triton launching through a stub "
        "libcuda; PyTorch's ops on CPU tensors; AdamW against torch.optim.AdamW(fused=True) on CPU (model steps: "
        "foreach AdamW and clip_grad_norm_)",
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for host_time.json and host_time.md")
    parser.add_argument(
        "--ops", default=",".join(OPS), help=f"comma-separated, of {','.join(CASES)} (default: the ops)"
    )
    parser.add_argument("--calls", type=int, default=20, help="calls counted per case")
    parser.add_argument("--setup", type=Path, help="a Python file run in the counting process first")
    parser.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD, help="where the stub is built")
    parser.add_argument("--cache-dir", type=Path, help="Triton's kernel cache (default: in --build-dir)")
    parser.add_argument(
        "--bytecodes", type=int, default=0, metavar="N",
        help="instead of counting instructions: the N functions executing the most bytecodes in one call",
    )  # fmt: skip
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--cg-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.ops = [op for op in args.ops.split(",") if op]
    unknown = set(args.ops) - set(CASES)
    if unknown:
        parser.error(f"unknown ops {sorted(unknown)}; choose from {','.join(CASES)}")
    if args.worker:
        _worker(args)
        return {}
    reason = missing_tools()
    if reason and not (args.bytecodes and shutil.which("gcc")):  # bytecodes need the stub, not valgrind
        parser.error(f"cannot count instructions: {reason}")
    build(args.build_dir)
    with tempfile.TemporaryDirectory() as cg_dir:
        args.cg_dir = Path(cg_dir)
        # compiles every kernel into the cache, outside valgrind (with --bytecodes, the whole count)
        raw = _run_worker(args, under_valgrind=False)
        if not args.bytecodes:
            raw = _run_worker(args, under_valgrind=True)
    for op, error in raw["errors"].items():
        print(f"{op}: not measured: {error}", file=sys.stderr)
    if args.bytecodes:
        tables = bytecode_tables(raw["counts"])
        print(tables, end="")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "bytecodes.md").write_text(tables)
        return raw
    rows = rows_of(raw["counts"])
    result = {"environment": environment(), "rows": rows, "errors": raw["errors"]}
    table = markdown(rows, "instructions")
    print(table, end="")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "host_time.json").write_text(json.dumps(result, indent=1) + "\n")
        env = result["environment"]
        (args.out / "host_time.md").write_text(
            f"# Host instructions per call\n\n{env['note']}; Python {env['python']}, torch {env['torch']}, "
            f"triton {env['triton']}.\n\n{table}"
        )
    return result


if __name__ == "__main__":
    main()
