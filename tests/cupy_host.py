"""The CuPy backend's kernels on CPU tensors: its CUDA sources (``_runtime.source``)
built as host C++ with g++ and launched by a stand-in for ``_runtime.launch``.
One host thread runs a block's CUDA threads as fibers, each in turn until it
reaches ``__syncthreads`` or ends: in thread order and in reverse order,
alternately from one barrier to the next and from one block to the next, so
that a barrier missing between a write and a read of shared memory shows,
whichever thread writes. A barrier that some threads of a block reach and
others never do is reported, as is a launch whose arguments' C types are not
the kernel's.

conftest's ``cpu-cupy-host`` target runs every op suite on these kernels, so
their arithmetic, indexing, reductions and launch arguments are checked
wherever the tests run; only CuPy's compile and launch (and the GPU's own
rounding of exp/log/pow) are left to the ``cuda-cupy`` target. conftest loads
this module as a plugin for its fixture ``cupy_host_kernels``.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import gpukernels._backend as backend_dispatch
import gpukernels.backends.cupy as cupy_backend
from gpukernels.backends.cupy import _runtime

GXX = shutil.which("g++")
needs_gxx = pytest.mark.skipif(GXX is None, reason="g++ is not installed (the CuPy kernels' host build)")

# conftest's target: CPU tensors, the CuPy backend through the host build.
HOST_TARGET = pytest.param(("cpu", "cupy"), id="cpu-cupy-host", marks=[pytest.mark.cupy_host, needs_gxx])

# Stands in for the CUDA runtime when the sources are compiled as host C++:
# CUDA's qualifiers, the block's threads as fibers (ucontext) switched by the
# launcher gk_launch, and host versions of the bit primitives _common.cu takes
# from the device. gk_body<kernel> calls a kernel with its arguments unpacked
# from an array of their addresses; gk_signature names their C types.
HOST_PRELUDE = r"""
#define GK_HOST_EMULATION
#include <math.h>
#include <string.h>
#include <ucontext.h>
#include <memory>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__ __restrict

struct gk_dim3 { unsigned x, y, z; };
static gk_dim3 threadIdx, blockIdx, blockDim, gridDim;  // the running fiber's

enum gk_state { GK_RUNNABLE, GK_AT_BARRIER, GK_DONE };
struct gk_fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  gk_state state;
};
static const size_t GK_STACK_BYTES = 256 * 1024;
static gk_fiber gk_fibers[1024];  // GK_MAX_THREADS
static ucontext_t gk_scheduler;
static void (*gk_kernel_body)();
static const void* const* gk_args;

static inline void __syncthreads() {
  gk_fiber& fiber = gk_fibers[threadIdx.x];
  fiber.state = GK_AT_BARRIER;
  swapcontext(&fiber.context, &gk_scheduler);
}

static void gk_fiber_main() {
  gk_kernel_body();
  gk_fibers[threadIdx.x].state = GK_DONE;  // then uc_link: back to the scheduler
}

// Runs body on blocks x threads CUDA threads; 1 when a barrier was reached by
// some of a block's threads while the others had ended (a deadlock on a GPU).
static inline int gk_launch(void (*body)(), unsigned blocks, unsigned threads, const void* const* args) {
  gk_kernel_body = body;
  gk_args = args;
  gridDim = {blocks, 1, 1};
  blockDim = {threads, 1, 1};
  for (unsigned block = 0; block < blocks; ++block) {
    blockIdx = {block, 0, 0};
    for (unsigned t = 0; t < threads; ++t) {
      gk_fiber& fiber = gk_fibers[t];
      if (!fiber.stack) fiber.stack.reset(new char[GK_STACK_BYTES]);
      getcontext(&fiber.context);
      fiber.context.uc_stack.ss_sp = fiber.stack.get();
      fiber.context.uc_stack.ss_size = GK_STACK_BYTES;
      fiber.context.uc_link = &gk_scheduler;
      makecontext(&fiber.context, gk_fiber_main, 0);
      fiber.state = GK_RUNNABLE;
    }
    for (unsigned phase = 0;; ++phase) {
      unsigned at_barrier = 0, done = 0;
      for (unsigned i = 0; i < threads; ++i) {
        const unsigned t = (block + phase) % 2 ? threads - 1 - i : i;
        threadIdx = {t, 0, 0};
        swapcontext(&gk_scheduler, &gk_fibers[t].context);
        at_barrier += gk_fibers[t].state == GK_AT_BARRIER;
        done += gk_fibers[t].state == GK_DONE;
      }
      if (done == threads) break;
      if (at_barrier != threads) return 1;
      for (unsigned t = 0; t < threads; ++t) gk_fibers[t].state = GK_RUNNABLE;
    }
  }
  return 0;
}

template <typename... Args, size_t... I>
static void gk_call(void (*kernel)(Args...), std::index_sequence<I...>) {
  kernel(*static_cast<const std::remove_cv_t<Args>*>(gk_args[I])...);
}
template <typename... Args> constexpr auto gk_indices(void (*)(Args...)) { return std::index_sequence_for<Args...>{}; }
template <auto kernel> static void gk_body() { gk_call(kernel, gk_indices(kernel)); }

template <typename T> constexpr char gk_code() {
  if constexpr (std::is_pointer_v<T>) return 'p';
  if constexpr (std::is_same_v<T, long long>) return 'q';
  if constexpr (std::is_same_v<T, int>) return 'i';
  if constexpr (std::is_same_v<T, float>) return 'f';
  if constexpr (std::is_same_v<T, double>) return 'd';
  return '?';
}
template <typename... Args> static const char* gk_signature(void (*)(Args...)) {
  static const char codes[] = {gk_code<std::remove_cv_t<Args>>()..., 0};
  return codes;
}

static inline float gk_float_from_bits(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned gk_float_bits(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
static inline double gk_double_from_bits(unsigned long long u) { double d; memcpy(&d, &u, 8); return d; }
static inline float gk_mul_rn(float a, float b) { return a * b; }
static inline double gk_mul_rn(double a, double b) { return a * b; }
static inline float gk_half_to_float(unsigned short h) { _Float16 v; memcpy(&v, &h, 2); return (float)v; }
static inline unsigned short gk_float_to_half(float f) {
  _Float16 v = (_Float16)f;
  unsigned short h;
  memcpy(&h, &v, 2);
  return h;
}
"""

# Extra entry points for tests that call device functions directly.
HOST_EXTRAS = {
    "dropout.cu": r"""
extern "C" void philox_words(unsigned long long seed, unsigned long long counter, unsigned* out) {
  const PhiloxWords words = philox4x32(seed, counter);
  for (int k = 0; k < 4; ++k) out[k] = words.word[k];
}
extern "C" void to_bf16(const float* in, unsigned short* out, i64 n) {
  for (i64 i = 0; i < n; ++i) out[i] = gk_float_to_bf16(in[i]);
}
"""
}

# The C type of each NumPy scalar type of a launch's arguments (np.uint64: a pointer), and its gk_signature code.
ARG_TYPES = {
    np.uint64: (ctypes.c_uint64, "p"),
    np.int64: (ctypes.c_int64, "q"),
    np.int32: (ctypes.c_int32, "i"),
    np.float32: (ctypes.c_float, "f"),
    np.float64: (ctypes.c_double, "d"),
}
# A kernel: one name, or a name for each dtype (GK_FOR_EACH_DTYPE's SUFFIX).
KERNEL = re.compile(r'extern "C" __global__ void (\w+?)(_##SUFFIX)?\(')


def kernel_names(code: str) -> list[str]:
    suffixes = _runtime.DTYPE_SUFFIX.values()
    return [
        name
        for base, per_dtype in KERNEL.findall(code)
        for name in ([f"{base}_{s}" for s in suffixes] if per_dtype else [base])
    ]


class HostKernels:
    """The backend's sources built as host shared libraries, and a ``launch``
    with _runtime.launch's signature that runs a kernel on CPU tensors."""

    def __init__(self, build_dir: Path):
        self.build_dir = build_dir
        self.libraries: dict[str, ctypes.CDLL] = {}
        self.launches: list[tuple[str, int, int]] = []

    def library(self, name: str) -> ctypes.CDLL:
        """The host build of the backend's source ``name``."""
        if name not in self.libraries:
            self.build(name, _runtime.source(name) + HOST_EXTRAS.get(name, ""))
        return self.libraries[name]

    def build(self, name: str, code: str) -> ctypes.CDLL:
        """``code`` (CUDA C) built for the host as library ``name``, with an entry
        point gk_launch_<kernel> and gk_signature_<kernel> for each kernel."""
        entry_points = "".join(
            f'extern "C" int gk_launch_{k}(unsigned blocks, unsigned threads, const void* const* args) '
            f"{{ return gk_launch(gk_body<{k}>, blocks, threads, args); }}\n"
            f'extern "C" const char* gk_signature_{k}() {{ return gk_signature({k}); }}\n'
            for k in kernel_names(code)
        )
        source = self.build_dir / f"{name}.cpp"
        source.write_text(HOST_PRELUDE + code + entry_points)
        built = self.build_dir / f"{name}.so"
        command = [GXX, "-std=c++17", "-O1", "-Wall", "-Werror", "-shared", "-fPIC", "-o", str(built), str(source)]
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        library = self.libraries[name] = ctypes.CDLL(str(built))
        for k in kernel_names(code):
            getattr(library, f"gk_signature_{k}").restype = ctypes.c_char_p
            getattr(library, f"gk_launch_{k}").argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p]
        return library

    def launch(self, name, kernel, device, blocks, threads, args, options=()):
        assert device.type == "cpu", device
        _runtime.check_launch(kernel, blocks, threads)
        self.launches.append((kernel, blocks, threads))
        library = self.library(name)
        wanted = getattr(library, f"gk_signature_{kernel}")().decode()
        given = "".join(ARG_TYPES[type(a)][1] for a in args)
        assert given == wanted, f"{kernel}: arguments of C types {given!r} for parameters {wanted!r}"
        values = [ARG_TYPES[type(a)][0](a.item()) for a in args]
        addresses = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
        deadlocked = getattr(library, f"gk_launch_{kernel}")(blocks, threads, addresses)
        assert not deadlocked, f"{kernel}: __syncthreads reached by some threads of a block, not all"


@pytest.fixture(scope="session")
def cupy_host_kernels(tmp_path_factory) -> HostKernels:
    return HostKernels(tmp_path_factory.mktemp("cupy_host"))


def use_host_build(monkeypatch: pytest.MonkeyPatch, kernels: HostKernels) -> None:
    """Until ``monkeypatch`` undoes it: the CuPy backend takes CPU tensors and
    launches its kernels through ``kernels``."""
    monkeypatch.setattr(_runtime, "launch", kernels.launch)
    monkeypatch.setattr(cupy_backend, "device_types", lambda: ("cuda", "cpu"))
    monkeypatch.setattr(cupy_backend, "unavailable_reason", lambda: None)
    # Dispatch caches the kernel it finds for (backend, family, kernel, device type):
    # a cache of this test's own, so that no CPU entry of the CuPy backend outlives it.
    monkeypatch.setattr(backend_dispatch, "_kernels", {})
