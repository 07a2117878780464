"""``jit``: ``triton.jit`` for the kernels we launch from the host, with a
launch path that costs about half of ``JITFunction.run``'s host time.

``JITFunction.run`` does on every launch what only a new specialization
needs: it binds the arguments into a dict, builds its specialization list,
formats the options with ``str`` for its cache key, compares every module
global the kernel reads with its value at compile time, and builds launch
metadata for the launch hooks. ``Kernel`` keeps its own cache of compiled
kernels, keyed on what decides the specialization, computed by a function
generated per kernel:

- a tensor by its dtype and the 16-byte alignment of its address, as the JIT
  does; any other non-constexpr argument through Triton's own
  ``native_specialize_impl``, as the JIT does (the installed Triton's rules:
  None, an int equal to 1, divisible by 16 or beyond 32 bits, ...);
- each constexpr by value, as the JIT's own key (which takes ``True`` for
  ``1``: equal values);
- the launch options (``num_warps=``, ...) by name and value (the compiler
  reads them by value), the knobs the JIT adds to them, the current device.

A hit launches the cached ``CompiledKernel`` through the C launcher (its
runner's, called directly when the kernel needs no scratch memory), with the
device and stream read on every call; a miss goes through
``JITFunction.run`` (which compiles if needed, checks and launches) and
caches the kernel it returns. So a hit launches what the JIT launched for an
equal key, and the key tells apart whatever the JIT's tells apart.

What a hit skips: the JIT's check that the module globals a kernel reads
still hold their compile-time values (each miss does it), and the launch
metadata when no launch hook is installed. Launches with a pre-run hook on
the kernel or a stages-inspection hook installed go through the JIT.

Reading every argument's specialization still costs about half of a launch.
``kernel.launch(grid, key, constexprs, *args)`` skips it: the launcher, which knows
what its arguments are, gives a key that stands for their specialization
(dtypes and sizes, say, and only when the pointers it was given are 16-byte
aligned: the outputs it allocated are), and a hit launches the kernel cached
for the key with nothing else read. A key
that stood for two specializations would launch a wrong kernel, so under
``GPUKERNELS_CHECK_LAUNCH_KEYS=1`` (the tests set it) every keyed launch goes
through ``kernel[grid]`` and checks its key against the JIT's own.

While an op's implementation is traced into a graph (``traced_launches``,
entered by ops/_op.py when torch.compile's AOTAutograd decomposes an op on
CUDA tensors), ``kernel[grid](...)`` is ``torch.library.wrap_triton``'s
instead: a graph node that Inductor compiles and launches itself. One
context variable, read once per launch, tells the two apart. Torch works out
which arguments such a node's kernel writes by lowering the kernel to TTIR, at
every node and again at three places of Inductor's lowering; for our kernels
that answer is worked out once per kernel and arguments as the lowering sees
them (``share_access_analyses``).

Under ``TRITON_INTERPRET=1`` (read when ``jit`` decorates, as by
``triton.jit``) the ``Kernel`` ``jit`` returns holds ``triton.jit``'s
interpreted function, which runs every launch (keys checked as above).
``jit`` is for kernels launched with ``kernel[grid](...)`` or
``kernel.launch(...)``; a function called from inside kernels stays
``triton.jit``.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import os
from typing import Any, Callable, Iterator, Sequence

import torch
import triton
from torch import Tensor
from triton import knobs
from triton._C.libtriton import native_specialize_impl
from triton.compiler import CompiledKernel
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from ._occupancy import device_limits, programs_per_sm

# The knobs JITFunction.run adds to a launch's options (so to its cache key), in this Triton release.
JIT_OPTION_KNOBS = tuple(
    (group, name)
    for group, name in (
        ("runtime", "debug"),
        ("compilation", "instrumentation_mode"),
        ("compilation", "fpsan_homomorphic_casts"),
    )
    if hasattr(getattr(knobs, group), name)
)
# How the key reads each: the fp-sanitizer's option is an environment read, and the compiler
# reads it only under the fpsan instrumentation mode.
_KNOB_READS = {
    (
        "compilation",
        "fpsan_homomorphic_casts",
    ): "knobs.compilation.instrumentation_mode and knobs.compilation.fpsan_homomorphic_casts"
}
_HAS_STAGES_HOOK = hasattr(knobs.runtime, "add_stages_inspection_hook")


# Read once per launch (a context variable: per thread, and cheaper to read than a thread-local's attribute).
_traced = contextvars.ContextVar("gpukernels_traced_launches", default=False)
tracing = _traced.get
"""``tracing()``: whether launches now become graph nodes (inside ``traced_launches``)."""


@contextlib.contextmanager
def traced_launches() -> Iterator[None]:
    """Within it (this thread), ``kernel[grid](...)`` of a ``jit`` kernel is
    ``wrap_triton(kernel.fn)[grid](...)``: under a tracing mode, a
    ``triton_kernel_wrapper`` node of the graph rather than a launch. Launchers
    read ``tracing()`` where a traced graph needs something else than a launch
    does (a fresh tensor where they keep one across launches)."""
    share_access_analyses()
    token = _traced.set(True)
    try:
        yield
    finally:
        _traced.reset(token)


# torch's analysis of the arguments a traced kernel reads and writes: its name in torch 2.13, in 2.11
_ACCESS_ANALYSES = ("identify_accessed_tensors", "identify_mutated_tensors")


@functools.cache
def share_access_analyses() -> dict:
    """Torch finds which arguments a traced kernel writes by lowering the kernel to
    TTIR (tens of milliseconds) for each launch in the graph, and again for each
    where Inductor lowers it (three more places): AOTAutograd's trace of a patched
    ResNet-50's step alone lowered our kernels 252 times (53 batch norms). The answer depends only on the
    kernel and what the lowering sees of its arguments (tensors by dtype, other
    values as they are, symbolic ones as 2), so torch's analysis is wrapped, once,
    to keep it per such key for our kernels; other kernels, and arguments the
    lowering reads more of (real tensors, TMA descriptors), go to torch's as before.
    Returns the kept analyses, by key."""
    from torch._higher_order_ops import triton_kernel_wrap

    analyses: dict = {}
    name = next((n for n in _ACCESS_ANALYSES if hasattr(triton_kernel_wrap, n)), None)
    if name is None:  # another torch: its analysis as it is
        return analyses
    analyse = getattr(triton_kernel_wrap, name)

    @functools.wraps(analyse)
    def shared(kernel, kwargs, tma_descriptor_metadata, *more, **options):
        # more arguments than these three (a later torch's): torch's analysis as it is
        key = None if more or options else access_analysis_key(kernel, kwargs, tma_descriptor_metadata)
        if key is None:
            return analyse(kernel, kwargs, tma_descriptor_metadata, *more, **options)
        if key not in analyses:
            analyses[key] = analyse(kernel, kwargs, tma_descriptor_metadata)
        return copy.deepcopy(analyses[key])  # each caller its own, as from torch's

    setattr(triton_kernel_wrap, name, shared)
    return analyses


def access_analysis_key(kernel: Any, kwargs: dict, tma_descriptor_metadata: dict) -> tuple | None:
    """What torch's lowering of ``kernel`` to TTIR (``generate_ttir``) reads of its
    arguments, as a key; None for a kernel not ours or arguments it reads more of."""
    import sympy
    from torch._inductor.ir import TensorBox
    from torch._subclasses.fake_tensor import FakeTensor
    from triton.runtime.autotuner import Autotuner

    if tma_descriptor_metadata:
        return None
    if isinstance(kernel, Autotuner):  # torch's, holding a launch's num_warps: lowered with its first config
        if kernel.configs:
            kwargs = {**kwargs, **kernel.configs[0].kwargs}
        kernel = kernel.fn
    if not any(kernel is ours.fn for ours in KERNELS):
        return None
    key = [id(kernel)]  # KERNELS holds every one of ours: ids stay theirs
    for name, value in kwargs.items():
        if isinstance(value, (FakeTensor, TensorBox)):  # lowered as an empty tensor of its dtype
            key.append((name, Tensor, value.dtype))
        elif isinstance(value, Tensor):  # lowered as it is: its address is read
            return None
        elif isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, sympy.Expr)):
            key.append((name, int, 2))  # lowered as 2
        else:
            key.append((name, type(value), value))
    key = tuple(key)
    try:
        hash(key)
    except TypeError:  # an argument value no dict can key: torch's analysis at every call
        return None
    return key


def _binder_source(fn: JITFunction) -> str | None:
    """Source of ``bind(*args, **kwargs) -> (key, arguments in signature order)``
    for ``fn``; None for a signature with ``*args``."""
    parameters = list(fn.signature.parameters.values())
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
        return None
    arguments, key = [], []
    for p, kp in zip(parameters, fn.params):
        if p.kind == p.KEYWORD_ONLY and "*" not in arguments:
            arguments.append("*")
        arguments.append(p.name if p.default is p.empty else f"{p.name}=default_{p.name}")
        if kp.is_constexpr:
            key.append(p.name)
        else:
            # a tensor's specialization is its dtype and 16-byte alignment: read here, in half
            # the time of the general rule
            key.append(
                f"({p.name}.dtype, {p.name}.data_ptr() & 15 == 0) if isinstance({p.name}, Tensor) "
                f"else specialize(backend, {p.name}, {kp.is_const}, {not kp.do_not_specialize}, "
                f"{not kp.do_not_specialize_on_alignment})"
            )
    key.append("*options.items()")
    key += [_KNOB_READS.get(knob, f"knobs.{knob[0]}.{knob[1]}") for knob in JIT_OPTION_KNOBS]
    bound = "".join(f"{p.name}, " for p in parameters)
    return f"def bind({', '.join(arguments + ['**options'])}):\n    return ({', '.join(key)}), ({bound})\n"


def _make_binder(fn: JITFunction, backend: Any) -> Callable | None:
    source = _binder_source(fn)
    if source is None:
        return None
    namespace = {
        f"default_{name}": p.default for name, p in fn.signature.parameters.items() if p.default is not p.empty
    }
    namespace.update(specialize=native_specialize_impl, backend=backend, knobs=knobs, Tensor=torch.Tensor)
    exec(source, namespace)
    return namespace["bind"]


# Triton >= 3.7's C launcher is one function for every kernel, taking the kernel's arguments
# as one tuple with their annotations; before, each kernel had its own, taking them spread.
_LAUNCH_TAKES_TUPLE = tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 7)


def _launcher(kernel: CompiledKernel) -> Callable:
    """``call(stream, bound, grid_x, grid_y=1, grid_z=1)``: launch ``kernel`` with no
    launch hooks, ``bound`` every argument in signature order. The C launcher itself
    where the runner (the Python launcher, which works out scratch buffers and then
    calls it) has nothing more to do; the runner where it has (scratch memory, a
    sanitizer) or is not the NVIDIA launcher this knows."""
    run, function, packed_metadata = kernel.run, kernel.function, kernel.packed_metadata

    def call_runner(stream, bound, grid_x, grid_y=1, grid_z=1):
        run(grid_x, grid_y, grid_z, stream, function, packed_metadata, None, None, None, *bound)

    try:
        c_launch, cooperative, pdl = run.launch, run.launch_cooperative_grid, run.launch_pdl
        if run.global_scratch_size or run.profile_scratch_size or getattr(run, "gsan_enabled", False):
            return call_runner
        if _LAUNCH_TAKES_TUPLE:
            annotations, signature = run.arg_annotations, run.kernel_signature
    except AttributeError:
        return call_runner

    if _LAUNCH_TAKES_TUPLE:

        def call_c(stream, bound, grid_x, grid_y=1, grid_z=1):
            c_launch(grid_x, grid_y, grid_z, stream, function, cooperative, pdl, packed_metadata, None, None, None,
                     None, None, annotations, signature, bound)  # fmt: skip

    else:

        def call_c(stream, bound, grid_x, grid_y=1, grid_z=1):
            c_launch(grid_x, grid_y, grid_z, stream, function, cooperative, pdl, None, None, packed_metadata, None,
                     None, None, *bound)  # fmt: skip

    return call_c


def _launch_hooked(kernel: CompiledKernel, grid: tuple, stream, bound: tuple) -> None:
    """Launch ``kernel`` through its runner with launch metadata, for the launch hooks."""
    runtime = knobs.runtime
    size = len(grid)
    kernel.run(grid[0], grid[1] if size > 1 else 1, grid[2] if size > 2 else 1, stream, kernel.function,
               kernel.packed_metadata, kernel.launch_metadata(grid, stream, *bound), runtime.launch_enter_hook,
               runtime.launch_exit_hook, *bound)  # fmt: skip


def _hooked(fn: JITFunction) -> bool | None:
    """Whether launch enter/exit hooks are set (chains, which call nothing when empty:
    no metadata to build then); None when a hook needs the JIT's own launch (a pre-run
    hook, a stages-inspection hook, a plain function set in place of a chain)."""
    runtime = knobs.runtime
    if fn.pre_run_hooks or (_HAS_STAGES_HOOK and runtime.add_stages_inspection_hook is not None):
        return None
    try:
        return bool(runtime.launch_enter_hook.calls or runtime.launch_exit_hook.calls)
    except AttributeError:
        return None


# The NVIDIA driver's get_current_device (Triton <= 3.6), a Python function, and the C call
# it ends in (None without CUDA).
_cuda_get_device = getattr(torch._C, "_cuda_getDevice", None)
_torch_current_device = torch.cuda.current_device if _cuda_get_device is not None else None


KERNELS: list["Kernel"] = []
"""Every compiled kernel ``jit`` has made (AOTAutograd's cache key lists their sources: ops/_op.py)."""

CHECK_LAUNCH_KEYS = os.environ.get("GPUKERNELS_CHECK_LAUNCH_KEYS", "0") not in ("", "0")
"""Whether every ``Kernel.launch`` checks its launch key (the tests set it). Read at import."""


KEYED_LIMIT = 4096
"""At most this many launch keys per kernel: past it the keys cached so far are dropped (each
then misses once, and is launched and cached again from the compiled kernels)."""


class LaunchKeyError(AssertionError):
    """A launcher gave one launch key for arguments that specialize differently."""


class Kernel:
    """A kernel launched from the host: ``kernel[grid](*args, CONSTEXPR=..., num_warps=...)``
    through a cache of its compiled kernels keyed by what the JIT specializes on, or
    ``kernel.launch(grid, key, lambda: dict(CONSTEXPR=..., ...), *args)`` through a cache keyed by
    the launcher (see the module doc). ``kernel.fn`` is the JITFunction, or under the
    interpreter the interpreted function, which runs every launch; other attributes
    are its."""

    def __init__(self, fn: Any, options: dict | None = None):
        self.fn = fn
        self.compiled = isinstance(fn, JITFunction)
        # what the JIT specializes on: under the interpreter, the JITFunction ``triton.jit``
        # would make of the function with the same ``options`` (do_not_specialize, ...)
        self._jit = fn if self.compiled else JITFunction(fn.fn, **(options or {}))
        parameters = self._jit.params
        trailing_constexprs = 0
        while trailing_constexprs < len(parameters) and parameters[-1 - trailing_constexprs].is_constexpr:
            trailing_constexprs += 1
        self.runtime_params = len(parameters) - trailing_constexprs
        """How many arguments ``launch`` takes by position: all but the trailing constexprs."""
        # device -> (binder, {binder key: (launcher, CompiledKernel)})
        self._devices: dict[Any, tuple[Callable, dict]] = {}
        # (device, launch key) -> (launcher, CompiledKernel, trailing constexprs' values)
        self._keyed: dict[tuple, tuple] = {}
        self._keys_seen: dict = {}  # under CHECK_LAUNCH_KEYS: launch key -> binder key
        self._resident: dict = {}  # (device, variant key) -> programs an SM holds
        self._key_binder: Callable | None = None
        self._launch_bound = self._launch
        if self.compiled:
            KERNELS.append(self)

    def __getattr__(self, name: str) -> Any:
        if name == "fn":  # not set yet (an instance being copied)
            raise AttributeError(name)
        return getattr(self.fn, name)

    def __repr__(self) -> str:
        return f"Kernel({self.fn!r})"

    def __getitem__(self, grid) -> Callable:
        if not self.compiled:
            return self.fn[grid]
        if tracing():
            from torch.library import wrap_triton

            return wrap_triton(self.fn)[grid]
        return functools.partial(self._launch_bound, grid)

    def launch(self, grid: tuple, key: Any, constexprs: Callable[[], dict], *args) -> Any:
        """``kernel[grid](*args, **constexprs())``, where the launcher's hashable ``key``
        says that these arguments specialize as those of every earlier launch with an
        equal key: the same dtypes, 16-byte alignments, None operands, integer classes
        (equal to 1, divisible by 16, beyond 32 bits), constexprs and options. ``args``
        are the arguments before the kernel's trailing constexprs, by position;
        ``constexprs()`` gives those and the launch options (``num_warps=``, ...) by
        name, and is called only when the key is new (or checked): building them on
        every call would cost host time. A hit launches the kernel cached for ``key``
        with ``args``, the cached constexprs and the current stream, and reads nothing
        else of the arguments. Under ``CHECK_LAUNCH_KEYS`` every launch goes through
        ``kernel[grid]``, and one whose key was given before to arguments that
        specialize differently raises LaunchKeyError. A ``key`` of None is no key (a
        misaligned pointer, a traced launch): ``kernel[grid]``, nothing cached."""
        if key is None:
            return self[grid](*args, **constexprs())
        if not CHECK_LAUNCH_KEYS and self.compiled and not tracing():
            active = driver._active or driver.active  # the property's frame only until a driver is made
            get_device = active.get_current_device
            # torch.cuda.current_device without its lazy-init check: the tensors launched on are CUDA's
            device = _cuda_get_device() if get_device is _torch_current_device else get_device()
            found = self._keyed.get((device, key))
            if found is not None:
                runtime = knobs.runtime
                try:  # whether any hook is set (_hooked's question, inline: host time)
                    hooks = (
                        self.fn.pre_run_hooks
                        or runtime.launch_enter_hook.calls
                        or runtime.launch_exit_hook.calls
                        or (_HAS_STAGES_HOOK and runtime.add_stages_inspection_hook is not None)
                    )
                except AttributeError:  # a plain function set in place of a chain
                    hooks = True
                if not hooks:
                    call, kernel, cached = found
                    call(active.get_current_stream(device), args + cached, *grid)
                    return kernel
                hooked = _hooked(self.fn)
                if hooked:
                    _, kernel, cached = found
                    _launch_hooked(kernel, grid, active.get_current_stream(device), args + cached)
                    return kernel
        kwargs = constexprs()
        if CHECK_LAUNCH_KEYS:
            self._check_key(key, args, kwargs)
        kernel = self[grid](*args, **kwargs)
        if self.compiled and isinstance(kernel, CompiledKernel) and not tracing():
            self._cache_for_key(key, kernel, args, kwargs)
        return kernel

    def programs_per_sm(self, key: Any, constexprs: Callable[[], dict], *args) -> int:
        """How many programs of the kernel ``kernel.launch(grid, key, constexprs, *args)``
        launches an SM of the current CUDA device holds at once (``_occupancy``): what a
        persistent grid is sized from. The kernel is compiled for these arguments, each
        tensor by its dtype alone (as an aligned tensor; a buffer the grid will size may be
        given as its dtype), and loaded, without a launch (Triton's ``warmup``); the answer
        is kept for ``key``, which must be equal only for arguments that compile alike
        (their dtypes, None operands, integer classes and constexprs); a key of None
        keeps nothing. 0: the kernel cannot launch."""
        device = driver.active.get_current_device()
        found = self._resident.get((device, key))
        if found is None:
            dtypes = [a.dtype if isinstance(a, torch.Tensor) else a for a in args]
            kernel = self.fn.warmup(*dtypes, grid=(1,), **constexprs())
            kernel._init_handles()  # loads it: the driver reports its registers
            metadata = kernel.metadata
            found, _ = programs_per_sm(kernel.n_regs, metadata.num_warps * 32, metadata.shared, device_limits(device))
            if key is not None:
                if len(self._resident) >= KEYED_LIMIT:
                    self._resident.clear()
                self._resident[device, key] = found
        return found

    def _cache_for_key(self, key: Any, kernel: CompiledKernel, args: tuple, kwargs: dict) -> None:
        """Keep under ``key`` the entry of the generic cache that launched ``kernel``."""
        device = driver.active.get_current_device()
        if len(args) != self.runtime_params or device not in self._devices:
            return
        binder, kernels = self._devices[device]
        specialization, bound = binder(*args, **kwargs)
        entry = kernels.get(specialization)
        if entry is not None and entry[1] is kernel:
            if len(self._keyed) >= KEYED_LIMIT:  # keys holding sizes grow with every new shape: start over
                self._keyed.clear()
            self._keyed[device, key] = (*entry, bound[self.runtime_params :])

    def _check_key(self, key: Any, args: tuple, kwargs: dict) -> None:
        if len(args) != self.runtime_params:
            raise LaunchKeyError(
                f"{self.fn.__name__}: launch takes its first {self.runtime_params} arguments (all but the trailing "
                f"constexprs) by position, got {len(args)}"
            )
        if self._key_binder is None:  # the JIT's key, without a backend: a tensor descriptor's would need one
            self._key_binder = _make_binder(self._jit, None)
        specialization, _ = self._key_binder(*args, **kwargs)
        seen = self._keys_seen.setdefault(key, specialization)
        if seen != specialization:
            raise LaunchKeyError(
                f"{self.fn.__name__}: launch key {key!r} was given to arguments that specialize as\n  {seen}\n"
                f"and as\n  {specialization}"
            )

    def _launch(self, grid, *args, **kwargs):
        active = driver._active or driver.active
        device = active.get_current_device()
        try:
            binder, kernels = self._devices[device]
            key, bound = binder(*args, **kwargs)
            entry = kernels[key]
        except Exception:  # a first launch here, or arguments for the JIT to judge
            return self._miss(grid, args, kwargs)
        hooked = _hooked(self.fn)
        if hooked is None:
            return self.fn.run(*args, grid=grid, warmup=False, **kwargs)
        if callable(grid):
            grid = grid(dict(zip(self.fn.arg_names, bound)))
        call, kernel = entry
        if hooked:
            _launch_hooked(kernel, grid, active.get_current_stream(device), bound)
        else:
            call(active.get_current_stream(device), bound, *grid)
        return kernel

    def _miss(self, grid, args, kwargs):
        """Launch through the JIT, then cache the compiled kernel it launched."""
        kernel = self.fn.run(*args, grid=grid, warmup=False, **kwargs)
        # an async compile's future, or no kernel (a jit_cache_hook declined to compile): nothing to cache
        if _hooked(self.fn) is None or not isinstance(kernel, CompiledKernel) or kernel.function is None:
            return kernel
        device = driver.active.get_current_device()
        if device not in self._devices:
            binder = _make_binder(self.fn, self.fn.device_caches[device][3])
            if binder is None:
                return kernel
            self._devices[device] = (binder, {})
        binder, kernels = self._devices[device]
        key, _ = binder(*args, **kwargs)
        try:
            kernels[key] = (_launcher(kernel), kernel)
        except TypeError:  # an unhashable option or constexpr: such launches stay with the JIT
            pass
        return kernel

    def cache_size(self) -> int:
        """How many compiled kernels the direct path holds (all devices)."""
        return sum(len(kernels) for _, kernels in self._devices.values())


def jit(fn: Callable | None = None, *, float_options: Sequence[str] = (), **options) -> Kernel:
    """``triton.jit`` (same options) for a kernel launched from the host, as a ``Kernel``:
    compiled, its launches go through its caches; under the interpreter they run there.
    ``float_options``: the arguments that take ``_common.float_bits`` words, which
    specialize on neither their values nor their alignment (a launch key leaves them out)."""
    if fn is None:
        return lambda f: jit(f, float_options=float_options, **options)
    if float_options:
        for option in ("do_not_specialize", "do_not_specialize_on_alignment"):
            options[option] = [*options.get(option, ()), *float_options]
    return Kernel(triton.jit(fn, **options), options)
