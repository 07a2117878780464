"""Benchmark harness: ``python -m gpukernels.bench``.

Times each op (forward, backward, forward+backward; AdamW's step) for
gpukernels and for the baselines in the same process: PyTorch eager,
``torch.compile`` (default and max-autotune-no-cudagraphs), the CuPy backend
where it has the op, Liger-Kernel where installed, fused ``torch.optim.AdamW``
and cuBLAS (``torch._addmm_activation``) for linear_act. Each time is also
given as achieved GB/s (the op's minimal bytes read + written) or TFLOP/s,
as a fraction of what this GPU measures in the same run (a device-to-device
copy; a cuBLAS bf16 matmul), and as a ratio to every baseline; forward+backward
rows carry the peak memory.

On a machine without CUDA it runs the NumPy backend against PyTorch CPU at
small sizes, labelled as CPU numbers, so the harness itself is tested.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import importlib.util
import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

import gpukernels as gk

MODES = ("fwd", "bwd", "fwd+bwd")


@dataclass
class Case:
    """One op at one shape: the callables to time and what the op must move."""

    op: str
    shape: str
    size: int  # x-axis of the plots (elements or parameters)
    providers: dict[str, Callable[[], object]]  # name -> forward (or step) callable
    grad_inputs: list[torch.Tensor] = field(default_factory=list)
    bytes: dict[str, float] = field(default_factory=dict)  # mode -> minimal bytes read + written
    flops: dict[str, float] = field(default_factory=dict)  # mode -> FLOPs (matmul ops)
    modes: tuple[str, ...] = MODES


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
    speedup: dict[str, float] = field(default_factory=dict)  # baseline -> baseline_ms / ours_ms (gpukernels rows)


# ---------------------------------------------------------------- timing


def _time_ms(fn: Callable[[], object], cuda: bool, quick: bool, graph: bool = False) -> float:
    if cuda:
        import triton.testing

        if graph:  # replays of a CUDA graph of the calls: the GPU's time, without the host's launch overhead
            return triton.testing.do_bench_cudagraph(fn, rep=30 if quick else 100, return_mode="median")
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


def _mode_fn(case: Case, forward: Callable[[], object], mode: str) -> Callable[[], object]:
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
            out.backward(torch.ones_like(out) if out.dim() == 0 else _grad_like(out))

        return run
    out = forward()
    grad = torch.ones_like(out) if out.dim() == 0 else _grad_like(out)

    def backward():
        clear()
        out.backward(grad, retain_graph=True)

    return backward


_GRADS: dict[tuple, torch.Tensor] = {}


def _grad_like(out: torch.Tensor) -> torch.Tensor:
    key = (tuple(out.shape), out.dtype, out.device)
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


# ---------------------------------------------------------------- device peaks


def measure_peaks(device: torch.device, quick: bool) -> dict[str, float]:
    """What this GPU does in this run: copy bandwidth (GB/s) and bf16 matmul (TFLOP/s)."""
    if device.type != "cuda":
        return {}
    n = 2**28  # 1 GiB of fp32: far beyond L2
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    copy_ms = _time_ms(lambda: dst.copy_(src), True, quick)
    src = dst = None  # the 2 GiB freed before the matmul's inputs
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm_ms = _time_ms(lambda: a @ b, True, quick)
    return {"copy_gbps": 2 * n * 4 / copy_ms / 1e6, "bf16_matmul_tflops": 2 * 8192**3 / mm_ms / 1e9}


# ---------------------------------------------------------------- cases


def _compiled(fn: Callable, mode: str | None = None) -> Callable:
    return torch.compile(fn, mode=mode, dynamic=False)


def _common_providers(
    ours: Callable,
    eager: Callable,
    device: torch.device,
    cupy_op: str | None,
    liger: Callable[[object], Callable] | None = None,
) -> dict[str, Callable]:
    """gpukernels, eager and, on CUDA, torch.compile (two modes), the CuPy
    backend when it has ``cupy_op``, and Liger-Kernel when installed
    (``liger`` maps its functional module to the call to time)."""
    providers = {"gpukernels": ours, "eager": eager}
    if device.type == "cuda":
        providers["compile"] = _compiled(eager)
        providers["compile-max"] = _compiled(eager, "max-autotune-no-cudagraphs")
        liger_transformers = _liger("liger_kernel.transformers") if liger else None
        if liger_transformers is not None:
            providers["liger"] = _first_output(liger(liger_transformers))
        if (
            cupy_op
            and gk.unavailable_reason("cupy") is None
            and importlib.util.find_spec(f"gpukernels.backends.cupy.{cupy_op}") is not None
        ):

            def with_cupy():
                with gk.use_backend("cupy"):
                    return ours()

            providers["cupy"] = with_cupy
    return providers


def _first_output(fn: Callable) -> Callable:
    """Some baselines return (loss, extras): time them as the loss."""

    def call():
        out = fn()
        return out[0] if isinstance(out, tuple) else out

    return call


def _liger(module: str) -> object | None:
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    try:
        return importlib.import_module(module)
    except Exception:  # a broken optional install must not stop the benchmark
        return None


def layer_norm_cases(device, dtype, quick):
    rows = 4096 if quick else 8192
    widths = [4096] if quick else [1024, 2048, 4096, 8192]
    if device.type != "cuda":
        rows, widths = 256, [256, 1024]
    for d in widths:
        x = torch.randn(rows, d, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(d, device=device, dtype=dtype, requires_grad=True)
        b = torch.randn(d, device=device, dtype=dtype, requires_grad=True)

        def liger_norm(lg, d=d, x=x):
            norm = lg.LigerLayerNorm(d).to(device, dtype)
            return lambda: norm(x)

        providers = _common_providers(
            lambda: gk.layer_norm(x, (d,), w, b), lambda: F.layer_norm(x, (d,), w, b), device, "layer_norm", liger_norm
        )
        s = x.element_size()
        io = rows * d * s
        yield Case(
            "layer_norm",
            f"{rows}x{d}",
            rows * d,
            providers,
            [x, w, b],
            bytes={"fwd": 2 * io, "bwd": 3 * io, "fwd+bwd": 5 * io},
        )


def cross_entropy_cases(device, dtype, quick):
    rows = 4096 if quick else 8192
    vocabs = [131072] if quick else [32768, 131072, 262144]
    if device.type != "cuda":
        rows, vocabs = 64, [1000, 4096]
    for v in vocabs:
        logits = torch.randn(rows, v, device=device, dtype=dtype, requires_grad=True)
        target = torch.randint(0, v, (rows,), device=device)
        providers = _common_providers(
            lambda: gk.cross_entropy(logits, target),
            lambda: F.cross_entropy(logits, target),
            device,
            "cross_entropy",
            lambda lg: partial(lg.LigerCrossEntropyLoss(), logits, target),
        )
        io = rows * v * logits.element_size()
        yield Case(
            "cross_entropy",
            f"{rows}x{v}",
            rows * v,
            providers,
            [logits],
            bytes={"fwd": io, "bwd": io, "fwd+bwd": 2 * io},
        )


def dropout_cases(device, dtype, quick):
    sizes = [2**26] if quick else [2**24, 2**26, 2**28]
    if device.type != "cuda":
        sizes = [2**16, 2**20]
    for n in sizes:
        x = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
        providers = _common_providers(lambda: gk.dropout(x, 0.1, seed=1), lambda: F.dropout(x, 0.1), device, "dropout")
        io = n * x.element_size()
        yield Case("dropout", f"{n}", n, providers, [x], bytes={"fwd": 2 * io, "bwd": 2 * io, "fwd+bwd": 4 * io})


def batch_norm_cases(device, dtype, quick):
    shapes = [(256, 256, 14)] if quick else [(256, 64, 56), (256, 128, 28), (256, 256, 14), (256, 512, 7)]
    if device.type != "cuda":
        shapes = [(8, 16, 8), (16, 32, 14)]
    for n, c, hw in shapes:
        x = torch.randn(n, c, hw, hw, device=device, dtype=dtype, requires_grad=True)
        w = torch.ones(c, device=device, requires_grad=True)
        b = torch.zeros(c, device=device, requires_grad=True)
        rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
        providers = _common_providers(
            lambda: gk.batch_norm(x, rm, rv, w, b, training=True),
            lambda: F.batch_norm(x, rm, rv, w, b, training=True),
            device,
            None,
        )
        io = x.numel() * x.element_size()
        yield Case(
            "batch_norm",
            f"{n}x{c}x{hw}x{hw}",
            x.numel(),
            providers,
            [x, w, b],
            bytes={"fwd": 2 * io, "bwd": 3 * io, "fwd+bwd": 5 * io},
        )


def linear_act_cases(device, dtype, quick):
    shapes = [(8192, 4096, 4096)] if quick else [(4096, 4096, 4096), (8192, 4096, 4096), (8192, 4096, 16384)]
    if device.type != "cuda":
        shapes = [(128, 256, 256)]
    for m, k, n in shapes:
        x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(n, k, device=device, dtype=dtype) / math.sqrt(k)).requires_grad_()
        b = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
        providers = _common_providers(
            lambda: gk.linear_act(x, w, b, "gelu"), lambda: F.gelu(F.linear(x, w, b)), device, None
        )
        if device.type == "cuda":
            providers["cublas-addmm-gelu"] = lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True)
            providers["cublas-matmul"] = lambda: x @ w.t()
        flops = 2 * m * n * k
        yield Case(
            "linear_act",
            f"{m}x{k}x{n}",
            m * n * k,
            providers,
            [x, w, b],
            flops={"fwd": flops, "bwd": 2 * flops, "fwd+bwd": 3 * flops},
        )


def linear_cross_entropy_cases(device, dtype, quick):
    """The LLM head: hidden states x (rows, hidden) times weight (vocab, hidden), then the loss."""
    shapes = [(8192, 4096, 131072)] if quick else [(4096, 4096, 32768), (8192, 4096, 131072), (8192, 4096, 262144)]
    if device.type != "cuda":
        shapes = [(256, 64, 4096)]
    for rows, hidden, vocab in shapes:
        x = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(vocab, hidden, device=device, dtype=dtype) / math.sqrt(hidden)).requires_grad_()
        target = torch.randint(0, vocab, (rows,), device=device)
        providers = _common_providers(
            lambda: gk.linear_cross_entropy(x, w, target),
            lambda: F.cross_entropy(F.linear(x, w), target),
            device,
            None,
            # Liger's loss takes the weight first
            lambda lg: partial(lg.LigerFusedLinearCrossEntropyLoss(), w, x, target),
        )
        flops = 2 * rows * hidden * vocab
        yield Case(
            "linear_cross_entropy",
            f"{rows}x{hidden}x{vocab}",
            rows * hidden * vocab,
            providers,
            [x, w],
            flops={"fwd": flops, "bwd": 2 * flops, "fwd+bwd": 3 * flops},
        )


def adamw_cases(device, dtype, quick):
    """Parameter sets of 4096x4096 matrices (and one remainder) in fp32."""
    totals = [10**8] if quick else [10**7, 10**8, 10**9]
    if device.type != "cuda":
        totals = [10**5, 10**6]
    for total in totals:
        chunk = min(4096 * 4096, total)
        sizes = [chunk] * (total // chunk) + ([total % chunk] if total % chunk else [])
        providers = {}
        for name, make in (
            ("gpukernels", lambda ps: gk.optim.AdamW(ps, lr=1e-3)),
            ("torch-fused", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
            ("torch-foreach", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)),
        ):
            if name == "torch-fused" and device.type != "cuda":
                continue
            params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in sizes]
            for p in params:
                p.grad = torch.randn_like(p)
            providers[name] = make(params).step
        yield Case(
            "adamw", f"{total / 1e6:g}M params", total, providers, bytes={"step": 7 * 4 * total}, modes=("step",)
        )
        del providers
        gc.collect()


OPS = {
    "layer_norm": layer_norm_cases,
    "cross_entropy": cross_entropy_cases,
    "dropout": dropout_cases,
    "batch_norm": batch_norm_cases,
    "linear_act": linear_act_cases,
    "linear_cross_entropy": linear_cross_entropy_cases,
    "adamw": adamw_cases,
}


# ---------------------------------------------------------------- running


def run(
    ops: list[str],
    dtype: torch.dtype,
    device: torch.device,
    quick: bool,
    skip: frozenset[str] = frozenset(),
    on_case: Callable[[list[Row], dict], None] | None = None,
    graph: bool = False,
) -> tuple[list[Row], dict]:
    """Every case of ``ops`` by every provider but those in ``skip``, timed by CUDA graph
    replays when ``graph``; ``on_case(rows, peaks)`` after each case, so that a run cut
    short still leaves what it measured."""
    cuda = device.type == "cuda"
    peaks = measure_peaks(device, quick)
    rows: list[Row] = []
    for op in tqdm(ops, desc="ops", disable=None):
        for case in OPS[op](device, dtype, quick):
            for mode in case.modes:
                case_rows = []
                for provider, forward in case.providers.items():
                    if provider in skip:
                        continue
                    try:
                        fn = _mode_fn(case, forward, mode)
                        ms = _time_ms(fn, cuda, quick, graph)
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
                    case_rows.append(row)
                ours = next((r for r in case_rows if r.provider == "gpukernels"), None)
                if ours is not None:
                    ours.speedup = {r.provider: r.ms / ours.ms for r in case_rows if r is not ours}
                rows += case_rows
            del case
            if on_case is not None and rows:
                on_case(rows, peaks)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    return rows, peaks


def profile(
    ops: list[str],
    dtype: torch.dtype,
    device: torch.device,
    quick: bool,
    providers: tuple[str, ...] = ("gpukernels", "eager"),
) -> str:
    """Where the time of each case's forward+backward goes: per provider, the
    host time of one call when nothing waits on the GPU, the GPU time of one
    call, and torch.profiler's kernels by GPU time; for ours also the Python
    functions by their own host time (cProfile). A host time above the GPU time
    means the call is launch-bound."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    sections = []
    for op in ops:
        for case in OPS[op](device, dtype, quick):
            for provider in providers:
                if provider not in case.providers:
                    continue
                fn = _mode_fn(case, case.providers[provider], case.modes[-1])
                for _ in range(3):
                    fn()
                if cuda:
                    torch.cuda.synchronize()
                calls = 10
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                host_us = (time.perf_counter() - start) / calls * 1e6
                if cuda:
                    torch.cuda.synchronize()
                with torch_profile(activities=activities) as prof:
                    for _ in range(calls):
                        fn()
                    if cuda:
                        torch.cuda.synchronize()
                device_us = (sum(e.self_device_time_total for e in prof.key_averages()) / calls) if cuda else None
                title = f"== {op} {case.shape} {case.modes[-1]} {provider}: host {host_us:.0f} us/call" + (
                    f", GPU kernels {device_us:.0f} us/call" if device_us is not None else ""
                )
                sections.append(title + "\n" + prof.key_averages().table(sort_by=sort, row_limit=12))
                if provider == "gpukernels":
                    python_profile = cProfile.Profile()
                    python_profile.runcall(lambda: [fn() for _ in range(calls)])
                    text = io.StringIO()
                    pstats.Stats(python_profile, stream=text).sort_stats("tottime").print_stats(15)
                    sections.append(f"-- {op} {case.shape} {provider}: Python, {calls} calls\n" + text.getvalue())
            del case
            gc.collect()
    return "\n\n".join(sections)


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


def table(rows: list[Row]) -> str:
    header = ("op", "shape", "mode", "provider", "ms", "GB/s", "TFLOP/s", "of peak", "mem MiB", "ours vs this")
    lines = [header]
    ours = {(r.op, r.shape, r.mode): r for r in rows if r.provider == "gpukernels"}
    for r in rows:
        mine = ours.get((r.op, r.shape, r.mode))
        ratio = "" if mine is None or r is mine else f"{r.ms / mine.ms:.2f}x"
        lines.append(
            (
                r.op,
                r.shape,
                r.mode,
                r.provider,
                f"{r.ms:.3f}",
                "" if r.gbps is None else f"{r.gbps:.3g}",
                "" if r.tflops is None else f"{r.tflops:.3g}",
                "" if r.fraction_of_peak is None else f"{100 * r.fraction_of_peak:.0f}%",
                "" if r.peak_mem_mib is None else f"{r.peak_mem_mib:.0f}",
                ratio,
            )
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = [" | ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join(out)


def plot(rows: list[Row], out: Path, env: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for op in dict.fromkeys(r.op for r in rows):
        mode = "step" if op == "adamw" else "fwd+bwd"
        op_rows = [r for r in rows if r.op == op and r.mode == mode]
        metric = "tflops" if any(r.tflops is not None for r in op_rows) else "gbps"
        fig, ax = plt.subplots(figsize=(7, 4))
        for provider in dict.fromkeys(r.provider for r in op_rows):
            pts = sorted((r.size, getattr(r, metric)) for r in op_rows if r.provider == provider)
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                label=provider,
                linewidth=2.5 if provider == "gpukernels" else 1.2,
            )
        ax.set_xscale("log")
        ax.set_xlabel("elements" if op != "adamw" else "parameters")
        ax.set_ylabel("TFLOP/s" if metric == "tflops" else "GB/s")
        ax.set_title(f"{op} {mode} — {env['device']}, {env['date']}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


SUMMARY_BASELINES = ("eager", "compile", "compile-max", "liger", "cupy", "torch-fused", "cublas-matmul")


def summary(rows: list[Row]) -> str:
    """A Markdown table, one line per op and shape, of forward+backward (AdamW: a step):
    our time, our speed-up over each baseline that ran (>1: ours is faster), our share
    of the measured peak, and peak memory against eager's."""
    lines = [
        "| op | shape | ours ms | "
        + " | ".join(f"vs {b}" for b in SUMMARY_BASELINES)
        + " | of peak | mem MiB (eager) |",
        "|---" * (len(SUMMARY_BASELINES) + 5) + "|",
    ]
    for r in rows:
        if r.provider != "gpukernels" or r.mode not in ("fwd+bwd", "step"):
            continue
        eager = next(
            (
                e
                for e in rows
                if (e.op, e.shape, e.mode, e.provider) == (r.op, r.shape, r.mode, "eager")
                and e.peak_mem_mib is not None
            ),
            None,
        )
        ratios = [f"{r.speedup[b]:.2f}x" if b in r.speedup else "" for b in SUMMARY_BASELINES]
        mem = (
            ""
            if r.peak_mem_mib is None
            else f"{r.peak_mem_mib:.0f}" + (f" ({eager.peak_mem_mib:.0f})" if eager else "")
        )
        peak = "" if r.fraction_of_peak is None else f"{100 * r.fraction_of_peak:.0f}%"
        lines.append(f"| {r.op} | {r.shape} | {r.ms:.3f} | " + " | ".join(ratios) + f" | {peak} | {mem} |")
    return "\n".join(lines)


def write(rows: list[Row], peaks: dict, env: dict, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(
        json.dumps({"environment": env, "peaks": peaks, "rows": [asdict(r) for r in rows]}, indent=1)
    )
    with open(out / f"{stem}.csv", "w", newline="") as f:
        fields = [k for k in asdict(rows[0]) if k != "speedup"] + ["speedup"]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            d = asdict(r)
            d["speedup"] = json.dumps(d["speedup"])
            writer.writerow(d)
    header = [
        f"# gpukernels benchmark — {env['device']}",
        "",
        "| " + " | ".join(f"{k}: {v}" for k, v in env.items()) + " |",
        "",
    ]
    if peaks:
        header += [
            f"Measured in this run: copy {peaks['copy_gbps']:.0f} GB/s, "
            f"cuBLAS bf16 matmul {peaks['bf16_matmul_tflops']:.0f} TFLOP/s.",
            "",
        ]
    (out / f"{stem}.md").write_text(
        "\n".join(header) + summary(rows) + "\n\nEvery provider and mode:\n\n```\n" + table(rows) + "\n```\n"
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {','.join(OPS)}")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--quick", action="store_true", help="one shape per op, shorter timing")
    p.add_argument("--summarize", metavar="JSON", help="print the Markdown summary of a results file and exit")
    p.add_argument(
        "--skip",
        default="",
        help="comma-separated providers not to run, e.g. compile-max (its autotuning takes minutes per op)",
    )
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="time replays of CUDA graphs of the calls: what "
        "the kernels take without the host's launch overhead (torch.compile providers cannot be captured "
        "this way: --skip them)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead of timing every provider, profile ours and "
        "eager's forward+backward (torch.profiler) into <out>/profile.txt",
    )
    p.add_argument("--out", default="out/bench", help="folder for the .json/.csv/.md results and the plots")
    a = p.parse_args(argv)
    if a.summarize:
        print(summary([Row(**r) for r in json.loads(Path(a.summarize).read_text())["rows"]]))
        return
    ops = [o.strip() for o in a.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        p.error(f"unknown ops {unknown}; choose from {list(OPS)}")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # NumPy computes bf16/fp16 in fp32 anyway; CPU numbers are for the harness, in fp32.
    dtype = getattr(torch, a.dtype) if device.type == "cuda" else torch.float32
    env = environment(device) | {"dtype": str(dtype).replace("torch.", "")}
    if a.cuda_graph:
        env["timing"] = "CUDA graph replays"
    out = Path(a.out)
    stem = "cpu" if device.type != "cuda" else f"{env['device'].replace(' ', '-')}-{env['date']}"
    stem += "-cudagraph" if a.cuda_graph else ""
    skip = frozenset(p.strip() for p in a.skip.split(",") if p.strip())
    if a.profile:
        out.mkdir(parents=True, exist_ok=True)
        text = profile(ops, dtype, device, a.quick)
        (out / "profile.txt").write_text(text + "\n")
        print(text)
        return
    if a.cuda_graph and device.type != "cuda":
        p.error("--cuda-graph needs a CUDA device")
    rows, peaks = run(
        ops, dtype, device, a.quick, skip, lambda rows, peaks: write(rows, peaks, env, out, stem), graph=a.cuda_graph
    )
    if not rows:
        raise SystemExit("no case ran: nothing to write")
    plot(rows, out, env)
    print(table(rows))
    print(f"results: {out}/{stem}.{{md,json,csv}} and {out}/<op>.png")


if __name__ == "__main__":
    main()
