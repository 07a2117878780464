"""Where one training step's time goes (``--profile``): the GPU kernels of a step after
the timed ones, grouped by who wrote them, against the step's wall time. A step whose
kernels add up to much less than its wall time waits on the host; one whose kernels fill
it is as fast as its kernels."""

from __future__ import annotations

import functools
import re
import time
from collections import defaultdict
from pathlib import Path

import torch

# Kernel names by origin. Triton names a kernel after its Python function, with no
# namespace; Inductor's own kernels are triton_poi_/triton_red_/triton_per_...
_CATEGORIES = (
    ("inductor", re.compile(r"^triton_")),
    ("attention", re.compile(r"flash|fmha|attention|sdpa", re.I)),  # before matmul: cuDNN's are named sm90_...
    ("matmul", re.compile(r"nvjet|gemm|xmma|cutlass|cublas|sm\d\d_", re.I)),
    ("other triton", re.compile(r"^[A-Za-z_]\w*$")),  # no namespace, no signature: a Triton kernel not ours
)


@functools.cache
def _our_kernels() -> frozenset[str]:
    """The names of the Triton backend's jit functions, read from its sources (the launcher's
    registry of kernels holds compiled ones only, none under the interpreter)."""
    sources = (Path(__file__).parent.parent / "backends" / "triton").glob("*.py")
    return frozenset(
        re.findall(r"^@(?:triton\.)?jit\b.*\n(?:@.*\n)*def (\w+)\(", "\n".join(p.read_text() for p in sources), re.M)
    )


def category(kernel: str) -> str:
    """``gpukernels``, ``inductor``, ``matmul``, ``attention``, ``other triton`` or ``aten/other``."""
    ours = _our_kernels()
    if kernel in ours or re.sub(r"_\d+$", "", kernel) in ours:  # Inductor numbers the user kernels it emits
        return "gpukernels"
    return next((name for name, pattern in _CATEGORIES if pattern.search(kernel)), "aten/other")


def profile_step(step, device: torch.device) -> tuple[dict, str]:
    """Run ``step()`` (one whole training step, ending in a host sync) under torch.profiler;
    returns a summary (wall ms, kernel ms, kernel launches, ms by category) and a text table
    of the kernels (CUDA) or of the operators (CPU)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    cuda = device.type == "cuda"
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    # shapes: which tensors a copy or an add moved tells the layer that asked for it
    with torch.profiler.profile(activities=activities, record_shapes=cuda) as prof:
        start = time.perf_counter()
        step()
        wall_ms = 1e3 * (time.perf_counter() - start)
    if not cuda:
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        return {"wall_ms": wall_ms}, f"one step, {wall_ms:.1f} ms on the CPU\n{table}\n"
    kernels: dict[str, list[float]] = defaultdict(list)
    for event in prof.events():
        # user annotations (Optimizer.step#AdamW.step) are ranges over kernels, not kernels
        if event.device_type == torch.autograd.DeviceType.CUDA and not getattr(event, "is_user_annotation", False):
            kernels[event.name].append(event.time_range.elapsed_us() / 1e3)
    origins = {name: category(name) for name in kernels}
    by_category: dict[str, float] = defaultdict(float)
    for name, times in kernels.items():
        by_category[origins[name]] += sum(times)
    kernel_ms = sum(by_category.values())
    summary = {
        "wall_ms": wall_ms,
        "kernel_ms": kernel_ms,
        "launches": sum(len(t) for t in kernels.values()),
        "by_category_ms": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
    }
    lines = [
        f"one step: {wall_ms:.1f} ms wall, {kernel_ms:.1f} ms in {summary['launches']} kernels "
        f"({kernel_ms / wall_ms:.0%} of the wall time)",
        "by origin: " + ", ".join(f"{k} {v:.1f} ms" for k, v in summary["by_category_ms"].items()),
        "",
        f"{'ms':>9} {'calls':>6} {'% kernel':>8}  {'origin':<12}  kernel",
    ]
    for name, times in sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:40]:
        total = sum(times)
        lines.append(f"{total:9.3f} {len(times):6d} {total / kernel_ms:8.1%}  {origins[name]:<12}  {name[:150]}")
    # Which operators launched them: the autograd nodes of the backward (``autograd::engine::
    # evaluate_function: CatBackward0``) and the ops inside them, each with its kernels' time
    # and its children's, so that a kernel above can be traced to the layer that asked for it.
    operators = prof.key_averages().table(sort_by="device_time_total", row_limit=40, max_name_column_width=90)
    lines += ["", "operators by the device time of their kernels and their children's:", operators]
    by_shape = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_device_time_total", row_limit=40, max_name_column_width=50, max_shapes_column_width=100
    )
    lines += ["", "operators by the device time of their own kernels, by their inputs' shapes:", by_shape]
    return summary, "\n".join(lines) + "\n"
