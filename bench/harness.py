"""Timing of every case of every op by each of its providers in each mode, as GB/s or
TFLOP/s against what this GPU measures in the same run; the profiler's view of a case;
the environment a run was measured in.

A case module (``bench/cases/<op>.py``) gives its shapes (``SHAPES``, ``QUICK_SHAPES``
for ``--quick``, ``CPU_SHAPES`` without a GPU) and ``case(shape, device, dtype)``, the
``Case`` of one shape; ``providers`` builds the usual set of ways to compare. An op that
``--compile`` cannot compare says why in its module's ``COMPILE_SKIP_REASON``.
"""

from __future__ import annotations

import contextlib
import cProfile
import datetime
import gc
import importlib
import importlib.util
import io
import platform
import pstats
import statistics
import sys
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Iterable, Iterator

import torch
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile

import gpukernels as gk

MODES = ("fwd", "bwd", "fwd+bwd")
OURS = ("gpukernels", "gpukernels-compile")  # the rows that carry a speed-up over the others


@dataclass
class Case:
    """One op at one shape: the callables to time and what the op must move."""

    shape: str
    size: int  # x-axis of the plots (elements or parameters)
    providers: dict[str, Callable[[], object]]  # name -> forward (or step) callable
    grad_inputs: list[torch.Tensor] = field(default_factory=list)
    bytes: dict[str, float] = field(default_factory=dict)  # mode -> minimal bytes read + written
    flops: dict[str, float] = field(default_factory=dict)  # mode -> FLOPs (matmul ops)
    modes: tuple[str, ...] = MODES
    # provider -> why its call cannot be captured in a CUDA graph: graph timings time it with
    # events instead (a failed capture can leave PyTorch's CUDA generator unusable for the run)
    uncapturable: dict[str, str] = field(default_factory=dict)


@dataclass
class Row:
    op: str
    shape: str
    size: int
    mode: str
    provider: str
    ms: float
    gbps: float | None = None
    tflops: float | None = None
    fraction_of_peak: float | None = None
    peak_mem_mib: float | None = None
    speedup: dict[str, float] = field(default_factory=dict)  # baseline -> baseline_ms / ours_ms (OURS rows)


def per_mode(fwd: float, bwd: float) -> dict[str, float]:
    """The bytes (or FLOPs) of the forward, of the backward and of both."""
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def progress(items: Iterable, desc: str) -> Iterable:
    """``items`` with a progress bar on a terminal when tqdm (the ``bench`` extra) is installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, disable=None)


# ---------------------------------------------------------------- providers


def providers(
    ours: Callable,
    eager: Callable,
    device: torch.device,
    family: str,
    liger: Callable[[ModuleType], Callable] | None = None,
    quack: Callable[[], Callable] | None = None,
) -> dict[str, Callable]:
    """gpukernels, eager and, on CUDA, torch.compile (two modes), the CuPy backend
    when it has op family ``family``, Liger-Kernel when installed (``liger`` maps
    its ``liger_kernel.transformers`` module to the call to time) and QuACK when
    installed (``quack()`` gives the call to time; where it raises, the run says why
    and goes on without it)."""
    found = {"gpukernels": ours, "eager": eager}
    if device.type != "cuda":
        return found
    found["compile"] = _compiled(eager)
    found["compile-max"] = _compiled(eager, "max-autotune-no-cudagraphs")
    liger_transformers = _liger("liger_kernel.transformers") if liger else None
    if liger_transformers is not None:
        found["liger"] = _first_output(liger(liger_transformers))
    if quack is not None and importlib.util.find_spec("quack") is not None:
        try:
            found["quack"] = quack()
        except Exception as e:  # QuACK needs CUTLASS's DSL and an sm_90+ GPU: say what failed
            print(f"quack: not timed ({family}): {type(e).__name__}: {e}", file=sys.stderr)
    if (
        gk.unavailable_reason("cupy") is None
        and importlib.util.find_spec(f"gpukernels.backends.cupy.{family}") is not None
    ):

        def with_cupy():
            with gk.use_backend("cupy"):
                return ours()

        found["cupy"] = with_cupy
    return found


def compiled_providers(found: dict[str, Callable]) -> dict[str, Callable]:
    """What ``--compile`` compares: ours and PyTorch's op each inside ``torch.compile``
    (default mode; ours with ``fullgraph=True``, so a graph break fails rather than
    falling back to eager), beside both called eagerly. The backward is the compiled
    graph's (AOTAutograd's). On CUDA, Inductor launches our Triton kernels itself."""
    return {
        "gpukernels": found["gpukernels"],
        "gpukernels-compile": _compiled(found["gpukernels"], fullgraph=True),
        "eager": found["eager"],
        "compile": found.get("compile") or _compiled(found["eager"]),
    }


def _compiled(fn: Callable, mode: str | None = None, fullgraph: bool = False) -> Callable:
    return torch.compile(fn, mode=mode, dynamic=False, fullgraph=fullgraph)


def _first_output(fn: Callable) -> Callable:
    """Some baselines return (loss, extras): time them as the loss (a tuple of outputs,
    rope's q and k, stays whole)."""

    def call():
        out = fn()
        return out[0] if isinstance(out, tuple) and out[0].dim() == 0 else out

    return call


def _liger(module: str) -> ModuleType | None:
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    try:
        return importlib.import_module(module)
    except Exception:  # a broken optional install must not stop the benchmark
        return None


def cases(
    module: ModuleType,
    device: torch.device,
    dtype: torch.dtype,
    quick: bool,
    compiled: bool = False,
    targets: bool = False,
) -> Iterator[Case]:
    """The cases of one op's module, made one at a time so that only one holds memory: at
    the shapes of its targets (``TARGET_SHAPES``) when ``targets``; with the providers of
    ``compiled_providers`` when ``compiled``, and then without the backward timed alone: a
    compiled backward cannot be run again on the same graph (AOTAutograd donates the
    buffers it saves for it to the backward)."""
    if targets:
        shapes = module.TARGET_SHAPES
    else:
        shapes = module.CPU_SHAPES if device.type != "cuda" else module.QUICK_SHAPES if quick else module.SHAPES
    for shape in shapes:
        case = module.case(shape, device, dtype)
        if compiled:
            case.providers = compiled_providers(case.providers)
            case.modes = tuple(mode for mode in case.modes if mode != "bwd")
        yield case


# ---------------------------------------------------------------- timing


TIMINGS = ("events", "graph", "graph-flushed")
"""How ``time_ms`` times a call on CUDA: CUDA events around each call, L2 flushed before
it (host launch overhead included where the GPU waits for it); replays of a CUDA graph of
the calls (the GPU's time, without the host's; data that fits in L2 may stay there
between calls); one replay of a graph of one call at a time, L2 flushed before each
replay (the GPU's time on data read from memory: what a bandwidth target is judged on)."""

FLUSH_BYTES = 256 << 20  # more than any L2 (H100 50 MB, H200 60 MB): written before each timed call


def time_ms(fn: Callable[[], object], cuda: bool, quick: bool, timing: str = "events") -> float:
    """Median milliseconds of a call of ``fn``, timed as ``timing`` says (``TIMINGS``) on CUDA;
    on CPU by the wall clock."""
    if cuda:
        import triton.testing

        if timing == "graph":
            return triton.testing.do_bench_cudagraph(fn, rep=30 if quick else 100, return_mode="median")
        if timing == "graph-flushed":
            return _flushed_graph_replay_ms(fn, replays=30 if quick else 100)
        # median, after warm-up, with L2 flushed between runs
        return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100, return_mode="median")
    fn()  # warm-up
    times = []
    budget = time.perf_counter() + (0.2 if quick else 1.0)
    while len(times) < 3 or (time.perf_counter() < budget and len(times) < 50):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _flushed_graph_replay_ms(fn: Callable[[], object], replays: int) -> float:
    """Median time of one replay of a CUDA graph of one call of ``fn``, each replay after a
    write of FLUSH_BYTES (outside the graph, so not timed; its time also covers the host's
    replay launch). Everything on the current stream, which must not be the default one
    (``_timing_stream``): a backward runs on its forward's stream, so a graph can hold the
    backward of a forward run before the capture only when both are on the capture stream."""
    stream = torch.cuda.current_stream()
    fn()  # warm-up: compiles, allocates
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=stream.device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
    for start, end in events:
        flush.zero_()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


@contextlib.contextmanager
def _timing_stream(timing: str, cuda: bool) -> Iterator[None]:
    """For ``graph-flushed`` timing: a side stream, current while a mode's callable is made
    (a backward's forward runs then) and timed, after the work queued so far."""
    if timing != "graph-flushed" or not cuda:
        yield
        return
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        yield
    torch.cuda.current_stream().wait_stream(side)


def mode_fn(case: Case, forward: Callable[[], object], mode: str) -> Callable[[], object]:
    """The callable that times ``mode`` of ``forward``."""
    if mode == "fwd" or not case.grad_inputs:
        return forward

    def clear():
        for t in case.grad_inputs:
            t.grad = None

    if mode == "fwd+bwd":

        def run():
            clear()
            out = forward()
            torch.autograd.backward(out, _grad_like(out))

        return run
    out = forward()
    grad = _grad_like(out)

    def backward():
        clear()
        torch.autograd.backward(out, grad, retain_graph=True)

    return backward


_GRADS: dict[tuple, torch.Tensor] = {}


def _grad_like(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """The gradient the backward of ``out`` (a tensor, or a tuple of them: one each) is timed
    with: ones for a loss, else random, one per shape."""
    if isinstance(out, tuple):
        return tuple(_grad_like(o) for o in out)
    if out.dim() == 0:
        return torch.ones_like(out)
    key = (tuple(out.shape), out.stride(), out.dtype, out.device)  # a channels-last output gets a channels-last one
    if key not in _GRADS:
        _GRADS[key] = torch.randn_like(out)
    return _GRADS[key]


def _peak_mem_mib(fn: Callable[[], object], grad_inputs: list[torch.Tensor]) -> float:
    """Peak memory above what was allocated before ``fn``, with no gradients held
    beforehand: the gradients ``fn`` makes are counted."""
    for t in grad_inputs:
        t.grad = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure_peaks(device: torch.device, quick: bool) -> dict[str, float]:
    """What this GPU does in this run: copy bandwidth (GB/s) and bf16 matmul (TFLOP/s)."""
    if device.type != "cuda":
        return {}
    n = 2**28  # 1 GiB of fp32: far beyond L2
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    copy_ms = time_ms(lambda: dst.copy_(src), True, quick)
    src = dst = None  # the 2 GiB freed before the matmul's inputs
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm_ms = time_ms(lambda: a @ b, True, quick)
    return {"copy_gbps": 2 * n * 4 / copy_ms / 1e6, "bf16_matmul_tflops": 2 * 8192**3 / mm_ms / 1e9}


# ---------------------------------------------------------------- running


def run(
    ops: dict[str, ModuleType],
    dtype: torch.dtype,
    device: torch.device,
    quick: bool,
    skip: frozenset[str] = frozenset(),
    on_case: Callable[[list[Row], dict], None] | None = None,
    timing: str = "events",
    compiled: bool = False,
    targets: bool = False,
) -> tuple[list[Row], dict]:
    """Every case of ``ops`` (name -> case module) by every provider but those in ``skip``,
    timed as ``timing`` says (``TIMINGS``), with the providers of ``compiled_providers``
    when ``compiled``, at the shapes of the ops' targets when ``targets``; ``on_case(rows,
    peaks)`` after each case, so that a run cut short still leaves what it measured."""
    cuda = device.type == "cuda"
    peaks = measure_peaks(device, quick)
    rows: list[Row] = []
    for op, module in progress(ops.items(), "ops"):
        for case in cases(module, device, dtype, quick, compiled, targets):
            if compiled and "gpukernels-compile" not in skip:
                _drop_if_different(op, case, "gpukernels-compile", "gpukernels")
            for mode in case.modes:
                rows += _timed_mode(op, case, mode, skip, peaks, cuda, quick, timing)
            del case  # its tensors freed before the next case is made
            if on_case is not None and rows:
                on_case(rows, peaks)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    return rows, peaks


def _drop_if_different(op: str, case: Case, provider: str, reference: str, tolerance: float = 2e-2) -> None:
    """Leaves ``provider`` out of ``case``, saying why, when it fails or when its output or
    the gradients of its backward differ from ``reference``'s by more than ``tolerance`` of
    their largest magnitude: a wrong result is not timed (rounding passes)."""
    try:
        got, want = _result(case, case.providers[provider]), _result(case, case.providers[reference])
    except Exception as e:  # a failure to compile, say: reported, not fatal
        problem = f"{type(e).__name__}: {e}"
    else:
        outputs = len(want) - len(case.grad_inputs)
        names = ["output"] if outputs == 1 else [f"output {i}" for i in range(outputs)]
        names += [f"gradient of input {i}" for i in range(len(case.grad_inputs))]
        differences = [f"{name}: {d}" for name, g, w in zip(names, got, want) if (d := _difference(g, w, tolerance))]
        problem = f"differs from {reference}: {'; '.join(differences)}" if differences else ""
    if problem:
        print(f"  {op} {case.shape} {provider}: skipped ({problem})"[:400])
        del case.providers[provider]


def _difference(got: torch.Tensor | None, want: torch.Tensor | None, tolerance: float) -> str:
    """How ``got`` is not ``want`` within ``tolerance`` of ``want``'s largest magnitude; empty when it is."""
    if got is None or want is None:
        return "" if got is None and want is None else "a gradient missing" if got is None else "an extra gradient"
    if (got.shape, got.dtype) != (want.shape, want.dtype):
        return f"{got.dtype} {list(got.shape)}, not {want.dtype} {list(want.shape)}"
    error = ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()
    return "" if error <= tolerance else f"largest difference {error:.3g} of the largest magnitude"


def _result(case: Case, forward: Callable[[], object]) -> list[torch.Tensor]:
    """The output of ``forward`` and, after its backward, the gradients of ``case``'s inputs."""
    for t in case.grad_inputs:
        t.grad = None
    out = forward()
    if case.grad_inputs:
        torch.autograd.backward(out, _grad_like(out))
    outputs = out if isinstance(out, tuple) else (out,)
    result = [o.detach().clone() for o in outputs] + [t.grad for t in case.grad_inputs]
    for t in case.grad_inputs:
        t.grad = None
    return result


def _timed_mode(
    op: str, case: Case, mode: str, skip: frozenset[str], peaks: dict, cuda: bool, quick: bool, timing: str
) -> list[Row]:
    """A row per provider of ``case`` in ``mode``; each of ours (``OURS``) carries its speed-up over each baseline."""
    rows = []
    for provider, forward in case.providers.items():
        if provider in skip:
            continue
        provider_timing = timing
        if timing.startswith("graph") and provider in case.uncapturable:
            provider_timing = "events"
            print(f"  {op} {case.shape} {mode} {provider}: timed with events, host included "
                  f"({case.uncapturable[provider]})")  # fmt: skip
        try:
            with _timing_stream(provider_timing, cuda):
                fn = mode_fn(case, forward, mode)
                ms = time_ms(fn, cuda, quick, provider_timing)
            mem = _peak_mem_mib(fn, case.grad_inputs) if cuda and mode in ("fwd+bwd", "step") else None
        except Exception as e:  # a baseline that cannot run this case is reported, not fatal
            print(f"  {op} {case.shape} {mode} {provider}: skipped ({type(e).__name__}: {e})"[:300])
            continue
        row = Row(op, case.shape, case.size, mode, provider, ms, peak_mem_mib=mem)
        if mode in case.bytes:
            row.gbps = case.bytes[mode] / ms / 1e6
            if "copy_gbps" in peaks:
                row.fraction_of_peak = row.gbps / peaks["copy_gbps"]
        if mode in case.flops:
            row.tflops = case.flops[mode] / ms / 1e9
            if "bf16_matmul_tflops" in peaks:
                row.fraction_of_peak = row.tflops / peaks["bf16_matmul_tflops"]
        rows.append(row)
    for ours in (r for r in rows if r.provider in OURS):
        ours.speedup = {r.provider: r.ms / ours.ms for r in rows if r.provider not in OURS}
    return rows


def profile(
    ops: dict[str, ModuleType],
    dtype: torch.dtype,
    device: torch.device,
    quick: bool,
    profiled: tuple[str, ...] = ("gpukernels", "eager"),
    compiled: bool = False,
) -> str:
    """Where the time of each case's forward+backward goes: per provider, the
    host time of one call when nothing waits on the GPU, the GPU time of one
    call, and torch.profiler's kernels by GPU time; for ours also the Python
    functions by their own host time (cProfile). A host time above the GPU time
    means the call is launch-bound. With ``compiled``, the cases have the providers of
    ``compiled_providers``."""
    sections = []
    for op, module in ops.items():
        for case in cases(module, device, dtype, quick, compiled):
            for provider in profiled:
                if provider in case.providers:
                    sections += _profiled(op, case, provider, device.type == "cuda")
            del case
            gc.collect()
    return "\n\n".join(sections)


def _profiled(op: str, case: Case, provider: str, cuda: bool, calls: int = 10) -> list[str]:
    mode = case.modes[-1]
    fn = mode_fn(case, case.providers[provider], mode)
    for _ in range(3):
        fn()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host_us = (time.perf_counter() - start) / calls * 1e6
    if cuda:
        torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    title = f"== {op} {case.shape} {mode} {provider}: host {host_us:.0f} us/call"
    if cuda:
        device_us = sum(e.self_device_time_total for e in prof.key_averages()) / calls
        title += f", GPU kernels {device_us:.0f} us/call"
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    sections = [title + "\n" + prof.key_averages().table(sort_by=sort, row_limit=12)]
    if provider in OURS:
        python_profile = cProfile.Profile()
        python_profile.runcall(lambda: [fn() for _ in range(calls)])
        text = io.StringIO()
        pstats.Stats(python_profile, stream=text).sort_stats("tottime").print_stats(15)
        sections.append(f"-- {op} {case.shape} {provider}: Python, {calls} calls\n" + text.getvalue())
    return sections


def environment(device: torch.device) -> dict:
    import triton

    env = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "device": "cpu" if device.type != "cuda" else torch.cuda.get_device_name(device),
    }
    if device.type == "cuda":
        import subprocess

        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = "unknown"
        env["cuda"] = torch.version.cuda
    else:
        env["note"] = "CPU run: NumPy backend vs PyTorch CPU at small sizes; not GPU numbers"
    return env
