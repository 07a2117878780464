"""Compile every Triton kernel variant the library launches for an H100
(sm_90), on a machine without a GPU.

    python ci/compile_sm90.py            # exit 1 if any variant fails to compile
    python ci/compile_sm90.py -k batch_norm_ -k dropout   # only kernels whose name contains one of these
    python ci/compile_sm90.py --out occupancy.md          # the occupancy table into a file too
    python ci/compile_sm90.py -k batch_norm_stats --dump ir/  # each variant's TTGIR, PTX and SASS too

The Triton interpreter runs kernels without compiling them, so a kernel can
pass every CPU test and still fail to compile for a GPU (a type the code
generator rejects, a version difference between Triton releases). This
script runs each op once per dtype and option set under the interpreter,
records every kernel launch (each argument as Triton's JIT would specialize
it for a GPU launch: its type, 16-byte alignment or divisibility by 16, an
int equal to 1 as a constant; constexpr values; launch options), then, in
fresh processes without the interpreter (one a core), compiles each distinct
variant with Triton's own compiler for sm_90, with those specializations (a
variant compiled without them is another kernel: no vectorised loads, other
registers); autotuned kernels are compiled in the first configuration their
GPU autotuner would try and in the last, which small problems run untuned.
One variant per kernel, argument types and constants other than block sizes,
plus one per block size for the row-normalisation kernels at the feature
counts they are tuned for.

It prints an occupancy table, one row per variant: registers per thread,
spilled bytes and static shared memory from ptxas's own report of the compile
(`ptxas -v`, which Triton runs), Triton's dynamic shared memory, and the
programs an sm_90 SM holds at once (`programs_per_sm`). For a kernel with a
persistent grid, the programs per SM its launcher asks for and, where fewer
fit, the fewer it sizes the grid to on a GPU (`fitting_per_sm`): a grid that
asked for more would run in waves. A variant that spills registers
fails the run unless `SPILLS_ALLOWED` names it with a reason.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_TENSOR_TYPES = {
    "float64": "*fp64",
    "float32": "*fp32",
    "float16": "*fp16",
    "bfloat16": "*bf16",
    "int64": "*i64",
    "int32": "*i32",
    "int8": "*i8",
    "uint8": "*u8",
    "bool": "*i1",
}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")

# Feature counts the row-normalisation kernels are tuned for (rows x these,
# bf16): each block size is its own variant in the table.
NORM_FEATURES = (1024, 2048, 4096, 8192)

# The benchmarks' shapes (bf16), whose block sizes, splits and integer
# specializations the tests' small shapes never make; recorded without running
# the kernels. batch_norm2d (N, C, H, W), NCHW and channels-last, with the split
# reductions a GPU's grid gives them; cross_entropy and linear_cross_entropy at a
# vocabulary of 32k (every larger multiple of 16 launches the same variants: the block
# sizes are capped there) and at GPT-2's 50257 (rows not 16-byte aligned), on 16 rows
# of 64 features (rows and features only size the grid and the matmuls); dropout on
# 2^20 elements.
BATCH_NORM_SHAPES = ((256, 64, 56, 56), (256, 128, 28, 28), (256, 256, 14, 14), (256, 512, 7, 7))
VOCABULARIES = (32768, 50257)
GPU_SMS = 132  # an H100 SXM's or H200's SMs, for the persistent grids of those launches


def grid_programs_per_sm() -> dict[str, int]:
    """Programs per SM each persistent grid asks for, read from the launchers'
    constants (``fitting_per_sm(..., per_sm, ...)`` in gpukernels/backends/triton),
    which a GPU lowers to what fits. Imported when asked, as gpukernels is
    everywhere here (after the environment is set)."""
    from gpukernels.backends.triton._common import PROGRAMS_PER_SM
    from gpukernels.backends.triton._norm import BWD_PROGRAMS_PER_SM

    return {
        "norm_bwd_kernel": BWD_PROGRAMS_PER_SM,  # _norm.py
        "batch_norm_stats_kernel": PROGRAMS_PER_SM,  # batch_norm.py: the reduction grid, channel blocks x splits
        "batch_norm_bwd_reduce_kernel": PROGRAMS_PER_SM,
    }


# Variants allowed to spill registers: (kernel, words every one of which the
# row's variant or shape contains, the reason). Any other spill fails the run.
SPILLS_ALLOWED = (
    (
        "norm_bwd_kernel",
        ("BLOCK_D=8192", "ONE_BLOCK=False"),
        "rows wider than 8192 columns, read in column blocks (the tests' 9000, whose odd width leaves the loads "
        "unvectorised): 512 threads cap ptxas at 128 registers (65536 / 512), too few for a block's values, "
        "its partial sums and the row's running sums",
    ),
    (
        "norm_bwd_kernel",
        ("BLOCK_D=8192", "ONE_BLOCK=True", "STAGES=2"),
        "the backward of 8192-feature fp32 rows (an fp32 residual stream under autocast, the norm's bf16 "
        "output's gradient as dy) two rows ahead: layer_norm's 44 bytes at ptxas' 128-register cap (512 "
        "threads), with the residual's gradient added (add_layer_norm, add_rms_norm) 68 and 44; bf16 rows "
        "(three ahead) do not spill. Not timed on a GPU",
    ),
    (
        "norm_fwd_kernel",
        ("BLOCK_D=8192", "ONE_BLOCK=False", "ADD_AFTER=True", "fp64"),
        "fp64 rows wider than 8192 columns (the tests' 9000) normalised and added to a residual (layer_norm_add: "
        "112 bytes): at 512 threads ptxas caps a thread at 128 registers, too few for a column block's doubles "
        "with the weight, bias and residual read beside them; bf16 and fp32 rows do not spill",
    ),
    (
        "linear_act_bwd_kernel",
        ("ACC=fp64",),
        "a 32 x 128 fp64 tile on 128 threads, 32 doubles a thread, plus the activation derivative's temporaries",
    ),
)


# ---------------------------------------------------------------- recording (interpreter)


def _specialization(param, value, backend) -> list:
    """``value``, a runtime argument for the JITFunction parameter ``param``, as the JIT
    specializes it for a GPU launch (Triton's own rule, the kernel's ``do_not_specialize``
    lists honoured): ["type", "*bf16", "D"] (D: 16-byte aligned, or an int divisible by 16),
    or ["constexpr", 1] for an int equal to 1 or None."""
    from triton._C.libtriton import native_specialize_impl

    kind, attr = native_specialize_impl(
        backend, value, param.is_const, not param.do_not_specialize, not param.do_not_specialize_on_alignment
    )
    return ["constexpr", attr] if kind == "constexpr" else ["type", kind, attr or ""]


def record() -> list[dict]:
    """Run every op under the interpreter; the launches, deduplicated."""
    import torch
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    backend = make_backend(GPUTarget("cuda", 90, 32))
    launches: dict[str, dict] = {}
    kernels: dict = {}  # interpreted function -> its JITFunction, for its parameters (constexpr, specialization)
    every_block_size = False
    run_kernels = True
    original_run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        if self not in kernels:
            flags = {k: v for k, v in self.kwargs.items() if k.startswith("do_not_specialize")}
            kernels[self] = JITFunction(self.fn, **flags)
        bound = dict(zip(self.arg_names, args)) | {k: v for k, v in kwargs.items() if k not in _LAUNCH_OPTIONS}
        entry = {
            "module": self.fn.__module__,
            "kernel": self.fn.__name__,
            "args": {},
            "options": {k: kwargs[k] for k in _LAUNCH_OPTIONS if k in kwargs},
            "shape": next((_shape_of(v) for v in args if isinstance(v, torch.Tensor)), ""),
        }
        for param in kernels[self].params:
            value = bound[param.name]
            if param.is_constexpr:
                entry["args"][param.name] = ["constexpr", f"tl.{value.name}" if isinstance(value, tl.dtype) else value]
            else:
                entry["args"][param.name] = _specialization(param, value, backend)
        # Block sizes and launch options vary with the shape but not the code
        # paths: one variant per kernel, argument types and other constants.
        key = {**entry, "shape": None}
        if not every_block_size:
            key |= {"options": None, "args": {n: a for n, a in entry["args"].items() if not n.startswith("BLOCK")}}
        launches.setdefault(json.dumps(key, sort_keys=True), entry)
        if run_kernels:
            return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    try:
        _exercise_every_op()
        every_block_size = True
        _exercise_norm_features()
        run_kernels = False  # only the launches' arguments matter: the interpreter would take minutes
        _exercise_benchmark_shapes()
    finally:
        InterpretedFunction.run = original_run
    return list(launches.values())


def _shape_of(tensor) -> str:
    """The first tensor argument of a launch, as the shape it was recorded with: "bf16 [4, 4096]"."""
    return f"{_TENSOR_TYPES[str(tensor.dtype).replace('torch.', '')][1:]} {list(tensor.shape)}"


def _exercise_norm_features() -> None:
    import torch

    import gpukernels as gk

    with gk.use_backend("triton"):
        for d in NORM_FEATURES:
            # 16 rows: a row count the JIT specializes as a model's (divisible by 16), not as the constant 1
            x, w, b = (torch.randn(*shape, dtype=torch.bfloat16, requires_grad=True) for shape in ((16, d), (d,), (d,)))
            gk.layer_norm(x, (d,), w, b).float().sum().backward()
            gk.rms_norm(x, (d,), w).float().sum().backward()
            # a patched block's norms under autocast: the fp32 residual stream in, bf16 out (and its gradient)
            x, w, b = (torch.randn(*shape, requires_grad=True) for shape in ((16, d), (d,), (d,)))
            gk.layer_norm(x, (d,), w, b, out_dtype=torch.bfloat16).float().sum().backward()
            gk.rms_norm(x, (d,), w, cast_before_weight=True, out_dtype=torch.bfloat16).float().sum().backward()
            # a patched block's attention output (bf16) added to that stream, the sum normalised for the MLP
            attention = torch.randn(16, d, dtype=torch.bfloat16, requires_grad=True)
            for y, summed in (
                gk.add_layer_norm(attention, x, (d,), w, b, out_dtype=torch.bfloat16),
                gk.add_rms_norm(attention, x, (d,), w, cast_before_weight=True, out_dtype=torch.bfloat16),
            ):
                (y.float().sum() + summed.sum()).backward()
            # a post-norm block's (OLMo 2's): that output normalised, rounded back to bf16, added to the stream
            gk.rms_norm_add(attention, x, (d,), w, norm_dtype=torch.bfloat16).sum().backward()


def _exercise_benchmark_shapes() -> None:
    import torch

    import gpukernels as gk
    from bench.host_time import flags_as_kernels_would_write
    from gpukernels.backends.triton import _common, batch_norm

    def gpu_grid(device, work_items: int, per_sm: int = _common.PROGRAMS_PER_SM) -> int:
        return max(1, min(work_items, GPU_SMS * per_sm))

    def leaf(*shape):
        return torch.empty(*shape, dtype=torch.bfloat16, requires_grad=True)

    with gk.use_backend("triton"), _patched(batch_norm, "num_programs", gpu_grid):
        batch_norm._tiling_of.cache_clear()  # tilings cached with the interpreter's grid
        for shape, channels_last in itertools.product(BATCH_NORM_SHAPES, (False, True)):
            x = torch.empty(shape, dtype=torch.bfloat16)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            c = shape[1]
            w, b = (torch.ones(c, requires_grad=True) for _ in range(2))
            # a ResNet's BN, its BN + ReLU, and a block's end (BN, the shortcut added, ReLU)
            for activation, residual in (("none", None), ("relu", None), ("relu", torch.empty_like(x))):
                y = gk.batch_norm(
                    x.requires_grad_(), torch.zeros(c), torch.ones(c), w, b, True, 0.1, 1e-5, activation, residual
                )
                y.backward(torch.empty_like(y))
        batch_norm._tiling_of.cache_clear()
        target = torch.zeros(16, dtype=torch.int64)
        for vocabulary in VOCABULARIES:
            flags_as_kernels_would_write()  # the target check reads what the forward's kernel would write
            gk.cross_entropy(leaf(16, vocabulary), target).backward()
            flags_as_kernels_would_write()
            gk.linear_cross_entropy(leaf(16, 64), leaf(vocabulary, 64), target).backward()
        y = gk.dropout(leaf(1 << 20), 0.1, seed=1)
        y.backward(torch.empty_like(y))


@contextlib.contextmanager
def _patched(module, name: str, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def _exercise_every_op() -> None:
    import torch

    import gpukernels as gk
    from gpukernels.ops.linear_act import ACTIVATIONS

    def run_backward(out, *inputs):
        (out.float().sum() if out.dim() else out.float()).backward()

    with gk.use_backend("triton"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):

            def leaf(*shape, scale=1.0):
                return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).requires_grad_()

            for d in (17, 9000):  # one block, and the looped wide-row kernels
                for affine in (True, False):
                    x, w, b = leaf(3, d), (leaf(d) if affine else None), (leaf(d) if affine else None)
                    run_backward(gk.layer_norm(x, (d,), w, b), x)
                    for cast_before_weight in (False, True):
                        run_backward(gk.rms_norm(x, (d,), w, cast_before_weight=cast_before_weight), x)
                    if affine:  # Gemma's 1 + weight: the kernels' offset words
                        run_backward(gk.rms_norm(x, (d,), w, offset=1.0, cast_before_weight=True), x)
                    # a residual added first (both outputs' gradients: the sum's joins dx)
                    residual = leaf(3, d)
                    for y, summed in (
                        gk.add_layer_norm(x, residual, (d,), w, b),
                        gk.add_rms_norm(x, residual, (d,), w, cast_before_weight=True),
                    ):
                        run_backward(y.float().sum() + summed.float().sum(), x)
                    # a residual added after (the norm's result rounded to x's dtype first, or not)
                    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
                    run_backward(gk.layer_norm_add(x, residual, (d,), w, b), x)
                    run_backward(gk.rms_norm_add(x, residual.float(), (d,), w, norm_dtype=stats_dtype), x)
            for activation in ACTIVATIONS:
                for bias in (True, False):
                    x, w = leaf(5, 7), leaf(6, 7)
                    run_backward(gk.linear_act(x, w, leaf(6) if bias else None, activation), x)
            param_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
            # one tile a channel block (training: one launch each way), and several (the split kernels)
            for shape, channels_last in itertools.product(((2, 3, 4, 5), (130, 3, 2, 20)), (False, True)):
                for training in (True, False):
                    x = leaf(*shape)
                    if channels_last:
                        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
                    w = torch.ones(3, dtype=param_dtype, requires_grad=True)
                    rm, rv = torch.zeros(3, dtype=param_dtype), torch.ones(3, dtype=param_dtype)
                    run_backward(gk.batch_norm(x, rm, rv, w, torch.zeros(3, dtype=param_dtype), training=training), x)
            if dtype in (torch.float32, torch.bfloat16):  # the fused activations, on the split kernels
                for activation, training in itertools.product(ACTIVATIONS[1:], (True, False)):  # all but none
                    x = leaf(130, 3, 2, 20)
                    w = torch.ones(3, dtype=param_dtype, requires_grad=True)
                    rm, rv = torch.zeros(3, dtype=param_dtype), torch.ones(3, dtype=param_dtype)
                    b = torch.zeros(3, dtype=param_dtype)
                    run_backward(gk.batch_norm(x, rm, rv, w, b, training=training, activation=activation), x)
                for activation in ("none", "relu"):  # a residual added before the activation, NCHW beside channels-last
                    x, r = leaf(130, 3, 2, 20), leaf(130, 3, 2, 20).detach().to(memory_format=torch.channels_last)
                    rm, rv = torch.zeros(3, dtype=param_dtype), torch.ones(3, dtype=param_dtype)
                    run_backward(gk.batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5, activation, r), x)
            target = torch.tensor([0, 2, -100, 1])
            for weight in (None, torch.rand(3, dtype=torch.float64).to(dtype)):
                for smoothing in (0.0, 0.1):
                    for reduction in ("mean", "none"):
                        logits = leaf(4, 3)
                        run_backward(
                            gk.cross_entropy(logits, target, weight, reduction=reduction, label_smoothing=smoothing),
                            logits,
                        )
            for reduction, smoothing in (("mean", 0.0), ("none", 0.1)):  # class-probability targets
                for target_grad in (False, True):
                    logits = leaf(4, 3)
                    probs = torch.rand(4, 3, dtype=torch.float64).to(dtype).requires_grad_(target_grad)
                    run_backward(
                        gk.cross_entropy(logits, probs, reduction=reduction, label_smoothing=smoothing), logits
                    )
            for options in ({}, {"label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0}):
                for reduction in ("mean", "none"):
                    x, w = leaf(4, 5), leaf(3, 5)
                    run_backward(gk.linear_cross_entropy(x, w, target, reduction=reduction, **options), x)
            x = leaf(1000)
            run_backward(gk.dropout(x, 0.3, seed=1), x)
            for gated in (gk.swiglu, gk.geglu):
                x = leaf(3, 5)
                run_backward(gated(x, leaf(3, 5)), x)
                x = leaf(3, 64)  # packed, and chunked (rows apart), widths of 16-byte rows
                run_backward(gated(x), x)
                run_backward(gated(*x.chunk(2, dim=-1)), x)
            # a tiny head, GPT-2/Llama-small's 12 heads of 64 (GQA's k: 4), 32 heads of 128; Pythia's
            # quarter of 64 rotated, GLM-4's interleaved half of 128, Cohere's interleaved 128
            for heads, head_dim, rotated, interleaved in (
                (3, 8, 8, False),
                (12, 64, 64, False),
                (32, 128, 128, False),
                (12, 64, 16, False),
                (32, 128, 64, True),
                (32, 128, 128, True),
            ):
                q, k = leaf(1, heads, 2, head_dim), leaf(1, max(heads // 3, 1), 2, head_dim)
                angles = torch.rand(1, 2, rotated, dtype=torch.float64)
                cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
                q_embed, k_embed = gk.apply_rotary_pos_emb(q, k, cos, sin, interleaved=interleaved)
                run_backward(q_embed.float().sum() + k_embed.float().sum(), q)
            for amsgrad in (False, True):
                params = [torch.nn.Parameter(torch.randn(1500).to(dtype)), torch.nn.Parameter(torch.randn(3).to(dtype))]
                for p in params:
                    p.grad = torch.randn_like(p)
                optimizer = gk.optim.AdamW(
                    params, amsgrad=amsgrad, maximize=amsgrad, max_grad_norm=1.0 if amsgrad else None
                )
                if amsgrad:  # a scale and overflow flag, as GradScaler.step hands them over
                    optimizer.grad_scale, optimizer.found_inf = torch.tensor(2.0**16), torch.zeros(size=())
                optimizer.step()


# ---------------------------------------------------------------- compiling (no interpreter)


def _jit_function(module: str, name: str):
    """The kernel's JITFunction and, if it is autotuned, its configs."""
    import importlib

    from triton.runtime.jit import JITFunction

    obj = getattr(importlib.import_module(module), name)
    configs = getattr(obj, "configs", None)
    while not isinstance(obj, JITFunction):
        obj = obj.fn
    return obj, configs


def ptxas_usage(log: str) -> dict:
    """Registers per thread, spilled bytes (stores + loads) and static shared memory from a `ptxas -v` log."""
    registers = re.findall(r"Used (\d+) registers", log)
    if len(registers) != 1:
        raise RuntimeError(f"expected one entry function's register count in ptxas's log:\n{log}")
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {
        "registers": int(registers[0]),
        "spill_bytes": sum(int(stores) + int(loads) for stores, loads in spills),
        "static_shared": sum(int(n) for n in re.findall(r"(\d+) bytes smem", log)),
    }


def _variant(constexprs: dict) -> str:
    """The constants that make a variant, then the pointers it is compiled without: "ACC=fp32 no:W,DB"."""
    absent = [k for k, v in constexprs.items() if v is None]
    words = [f"{k}={v}" for k, v in constexprs.items() if v is not None]
    return " ".join(words + ["no:" + ",".join(absent)] if absent else words)


def spill_allowed(row: dict) -> bool:
    text = f"{row['variant']} {row['shape']}".split()
    return any(kernel == row["kernel"] and all(w in text for w in words) for kernel, words, _ in SPILLS_ALLOWED)


def occupancy_row(launch: dict, constexprs: dict, log: str, metadata) -> dict:
    """One row of the occupancy table for a compiled variant (`metadata`: the CompiledKernel's)."""
    from gpukernels.backends.triton._occupancy import programs_per_sm

    usage = ptxas_usage(log)
    shared = usage["static_shared"] + metadata.shared
    threads = metadata.num_warps * 32
    programs, limiter = programs_per_sm(usage["registers"], threads, shared)
    grid = grid_programs_per_sm().get(launch["kernel"])
    return {
        "kernel": launch["kernel"],
        "variant": _variant(constexprs),
        "shape": launch["shape"],
        "threads": threads,
        "registers": usage["registers"],
        "spill_bytes": usage["spill_bytes"],
        "shared": shared,
        "programs": programs,
        "limiter": limiter,
        "grid": grid,
        "below_grid": grid is not None and programs < grid,
    }


def occupancy_table(rows: list[dict]) -> str:
    """The rows as a markdown table, sorted by kernel."""
    lines = [
        "| kernel | variant | recorded with | threads | registers | spilled B | shared B | programs/SM | limited by"
        " | grid asks |",
        "|---|---|---|--:|--:|--:|--:|--:|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["shape"], r["variant"], r["threads"])):
        grid = (
            "" if r["grid"] is None else f"{r['grid']}/SM" + (f", sized to {r['programs']}" if r["below_grid"] else "")
        )
        lines.append(
            f"| {r['kernel']} | {r['variant']} | {r['shape']} | {r['threads']} | {r['registers']} | {r['spill_bytes']}"
            f" | {r['shared']} | {r['programs']} | {r['limiter']} | {grid} |"
        )
    return "\n".join(lines) + "\n"


def dump_ir(kernel, name: str, label: str, folder: Path) -> None:
    """A compiled variant's TTGIR, PTX and SASS (Triton's own disassembly) into ``folder``, as
    ``<name>-<n>.<ir>``, each headed by the variant's label: what a loop compiled to (pipelined
    copies, vector widths, the instructions an element costs) without a GPU."""
    folder.mkdir(parents=True, exist_ok=True)
    number = sum(1 for _ in folder.glob(f"{name}-*.ttgir"))
    for ir in ("ttgir", "ptx", "sass"):
        (folder / f"{name}-{number}.{ir}").write_text(f"// {label}\n{kernel.asm[ir]}")


def compile_all(launches: list[dict], dump: Path | None = None) -> tuple[list[str], list[dict]]:
    """Compile every launch's variants: the failures, and an occupancy row per compiled variant
    (with ``dump``, its IR written there: ``dump_ir``)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", 90, 32)
    backend = triton.compiler.make_backend(target)
    failures, rows = [], []
    for launch in launches:
        fn, configs = _jit_function(launch["module"], launch["kernel"])
        variants = [({}, launch["options"])]
        if configs and len(configs) > 1:  # the GPU autotuner's first and last (small-problem) configs
            variants = [
                (c.kwargs, {"num_warps": c.num_warps, "num_stages": c.num_stages}) for c in (configs[0], configs[-1])
            ]
        for config_kwargs, options in variants:
            signature, constexprs, attrs = {}, {}, {}
            for index, (name, (kind, value, *attr)) in enumerate(launch["args"].items()):
                if name in config_kwargs:
                    kind, value = "constexpr", config_kwargs[name]
                if kind == "constexpr":
                    signature[name] = "constexpr"
                    constexprs[name] = (
                        tl.dtype(value[3:]) if isinstance(value, str) and value.startswith("tl.") else value
                    )
                else:
                    signature[name] = value
                    if attr and attr[0]:  # the JIT's specialization: alignment, divisibility by 16
                        attrs[(index,)] = backend.parse_attr(attr[0])
            label = (
                f"{launch['kernel']} {json.dumps({k: v for k, v in constexprs.items() if v is not None}, default=str)}"
            )
            ptxas_log = io.StringIO()  # Triton prints ptxas's log with TRITON_DUMP_PTXAS_LOG=1
            try:
                with contextlib.redirect_stdout(ptxas_log):
                    kernel = triton.compile(
                        triton.compiler.ASTSource(fn, signature, constexprs, attrs), target=target, options=options
                    )
                rows.append(occupancy_row(launch, constexprs, ptxas_log.getvalue(), kernel.metadata))
                if dump:
                    dump_ir(kernel, launch["kernel"], f"{label} {launch['shape']}", dump)
            except Exception as e:  # report every failure, not just the first
                failures.append(f"{label}: {type(e).__name__}: {str(e)[:800]}")
        print(f"  {label[:150]}", flush=True)
    return failures, rows


def report(failures: list[str], rows: list[dict], out: Path | None) -> int:
    """The occupancy table and every failure (spills not allowed included): exit status 1 if any."""
    import triton

    print(f"compiled {len(rows)} kernel variants for sm_90 with triton {triton.__version__}; {len(failures)} failed")
    table = occupancy_table(rows)
    print(f"\nOccupancy on sm_90 (H100/H200):\n\n{table}")
    if out:
        out.write_text(table)
    below = sorted({r["kernel"] for r in rows if r["below_grid"]})
    if below:
        print(f"grids sized down to the programs an SM holds: {', '.join(below)}")
    failures = failures + [
        f"{r['kernel']} {r['variant']} ({r['shape']}): spills {r['spill_bytes']} bytes"
        " (SPILLS_ALLOWED lists the variants allowed to, each with the reason)"
        for r in rows
        if r["spill_bytes"] and not spill_allowed(r)
    ]
    for f in failures:
        print("FAILED", f)
    return 1 if failures else 0


def compile_in_processes(launches: list[dict], dump: Path | None) -> tuple[list[str], list[dict]]:
    """``compile_all`` in fresh processes without the interpreter, one a core (ptxas runs
    a variant at a time), the launches dealt out among them; one process with ``dump``,
    which numbers its files by those already written."""
    workers = 1 if dump else max(1, min(len(os.sched_getaffinity(0)), len(launches)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {
        "GPUKERNELS_COMPILE_PHASE": "compile",
        "TRITON_DUMP_PTXAS_LOG": "1",  # ptxas's register and spill report, printed by the compile
        "TRITON_ALWAYS_COMPILE": "1",  # a cached kernel would skip ptxas and its report
    }
    command = [sys.executable, __file__, *(["--dump", str(dump)] if dump else [])]
    with tempfile.TemporaryDirectory() as results:
        processes = []
        for worker in range(workers):
            result = Path(results) / f"{worker}.json"
            process = subprocess.Popen(
                command, stdin=subprocess.PIPE, text=True, env=env | {"GPUKERNELS_COMPILE_RESULT": str(result)}
            )
            process.stdin.write(json.dumps(launches[worker::workers]))
            process.stdin.close()
            processes.append((process, result))
        failures, rows = [], []
        for worker, (process, result) in enumerate(processes):
            if process.wait() != 0 or not result.exists():
                failures.append(f"compile worker {worker} exited with {process.returncode} before its report")
                continue
            outcome = json.loads(result.read_text())
            failures += outcome["failures"]
            rows += outcome["rows"]
    return failures, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument(
        "-k", "--kernel", action="append", help="compile only the kernels whose name contains this (repeatable)"
    )
    parser.add_argument("--out", type=Path, help="also write the occupancy table (markdown) to this file")
    parser.add_argument("--dump", type=Path, help="write each variant's TTGIR, PTX and SASS into this folder")
    args = parser.parse_args()
    if os.environ.get("GPUKERNELS_COMPILE_PHASE") == "compile":
        failures, rows = compile_all(json.loads(sys.stdin.read()), args.dump)
        Path(os.environ["GPUKERNELS_COMPILE_RESULT"]).write_text(json.dumps({"failures": failures, "rows": rows}))
        return 0
    os.environ["TRITON_INTERPRET"] = "1"
    start = time.perf_counter()
    launches = [launch for launch in record() if not args.kernel or any(k in launch["kernel"] for k in args.kernel)]
    print(f"recorded {len(launches)} distinct kernel launches in {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    failures, rows = compile_in_processes(launches, args.dump)
    print(f"compile took {time.perf_counter() - start:.0f} s")
    return report(failures, rows, args.out)


if __name__ == "__main__":
    sys.exit(main())
