"""Benchmark: ``python -m bench``.

Times each op (forward, backward, forward+backward; AdamW's step) for
gpukernels and for the baselines in the same process: PyTorch eager,
``torch.compile`` (default and max-autotune-no-cudagraphs), the CuPy backend
where it has the op, Liger-Kernel where installed, fused ``torch.optim.AdamW``
and cuBLAS (``torch._addmm_activation``) for linear_act. Each time is also
given as achieved GB/s (the op's minimal bytes read + written) or TFLOP/s,
as a fraction of what this GPU measures in the same run (a device-to-device
copy; a cuBLAS bf16 matmul), and as a ratio to every baseline; forward+backward
rows carry the peak memory.

With --targets it times the ops that have performance targets (layer_norm,
batch_norm, dropout, cross_entropy) at their target shapes, each call as one
replay of a CUDA graph with L2 flushed before it (the GPU's time on data read
from memory), and reports each target as met or not beside the usual tables.

With --compile it compares each op inside torch.compile instead: ours compiled
(gpukernels-compile: on CUDA, Inductor launches our Triton kernels from its own
code) against Inductor's kernels for the PyTorch op (compile), forward and
forward+backward (a compiled backward cannot be rerun alone), beside both called
eagerly; the compiled result is first checked against ours eager. The optimizer
steps are left out (one opaque op each under torch.compile).

On a machine without CUDA it runs the NumPy backend against PyTorch CPU at
small sizes, labelled as CPU numbers, so the harness itself is tested.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import harness, report
from .cases import OPS


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--ops", help=f"comma-separated, from {','.join(OPS)} (default: all; with --targets, those that have targets)"
    )
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
        "--targets",
        action="store_true",
        help="the ops with performance targets at their target shapes, timed by CUDA graph replays with L2 "
        "flushed before each, and each target met or not (CUDA only)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="each op inside torch.compile: ours (gpukernels-compile) against Inductor's kernels "
        "for the PyTorch op (compile), beside both eager; fwd and fwd+bwd; AdamW's steps left out",
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
        print(report.summary(report.read_rows(a.summarize)))
        return
    targeted = [name for name, module in OPS.items() if hasattr(module, "TARGETS")]
    names = [o.strip() for o in (a.ops or ",".join(targeted if a.targets else OPS)).split(",") if o.strip()]
    unknown = [o for o in names if o not in OPS]
    if unknown:
        p.error(f"unknown ops {unknown}; choose from {list(OPS)}")
    if a.targets and set(names) - set(targeted):
        p.error(f"--targets: {sorted(set(names) - set(targeted))} have no targets; those with targets: {targeted}")
    ops = {name: OPS[name] for name in names}
    if a.compile:
        for name in [n for n in ops if getattr(ops[n], "COMPILE_SKIP_REASON", None)]:
            print(f"--compile: {name} left out: {ops.pop(name).COMPILE_SKIP_REASON}")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # NumPy computes bf16/fp16 in fp32 anyway; CPU numbers are for the harness, in fp32.
    dtype = getattr(torch, a.dtype) if device.type == "cuda" else torch.float32
    env = harness.environment(device) | {"dtype": str(dtype).replace("torch.", "")}
    if a.cuda_graph:
        env["timing"] = "CUDA graph replays"
    if a.targets:
        env["timing"] = "one CUDA graph replay a call, L2 flushed before each"
    if a.compile:
        env["compile"] = "each op inside torch.compile (gpukernels-compile: ours; compile: Inductor's)"
    out = Path(a.out)
    stem = "cpu" if device.type != "cuda" else f"{env['device'].replace(' ', '-')}-{env['date']}"
    stem += "-cudagraph" if a.cuda_graph else ""
    stem += "-targets" if a.targets else ""
    stem += "-compile" if a.compile else ""
    skip = frozenset(name.strip() for name in a.skip.split(",") if name.strip())
    if a.profile:
        out.mkdir(parents=True, exist_ok=True)
        profiled = ("gpukernels-compile", "compile") if a.compile else ("gpukernels", "eager")
        text = harness.profile(ops, dtype, device, a.quick, profiled, a.compile)
        (out / "profile.txt").write_text(text + "\n")
        print(text)
        return
    for flag, wanted in (("--cuda-graph", a.cuda_graph), ("--targets", a.targets)):
        if wanted and device.type != "cuda":
            p.error(f"{flag} needs a CUDA device")
        if wanted and a.compile:
            p.error(f"{flag} cannot time --compile's providers: torch.compile's calls are not captured this way")
    if a.targets:
        skip |= {"compile", "compile-max"}  # not captured in a CUDA graph this way
    targets = {name: ops[name].TARGETS for name in ops if a.targets}

    def write(rows, peaks):
        report.write(rows, peaks, env, out, stem, report.target_table(rows, targets) if targets else "")

    rows, peaks = harness.run(
        ops,
        dtype,
        device,
        a.quick,
        skip,
        write,
        timing="graph-flushed" if a.targets else "graph" if a.cuda_graph else "events",
        compiled=a.compile,
        targets=a.targets,
    )
    if not rows:
        raise SystemExit("no case ran: nothing to write")
    plotted = report.plot(rows, out, env)
    print(report.table(rows))
    if targets:
        print(report.target_table(rows, targets))
    print(f"results: {out}/{stem}.{{md,json,csv}}" + (f" and {out}/<op>.png" if plotted else ""))


if __name__ == "__main__":
    main()
