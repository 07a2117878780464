"""Compile every Triton kernel variant the library launches for an H100
(sm_90), on a machine without a GPU.

    python ci/compile_sm90.py            # exit 1 if any variant fails to compile
    python ci/compile_sm90.py -k batch_norm_ -k dropout   # only kernels whose name contains one of these

The Triton interpreter runs kernels without compiling them, so a kernel can
pass every CPU test and still fail to compile for a GPU (a type the code
generator rejects, a version difference between Triton releases). This
script runs each op once per dtype and option set under the interpreter,
records every kernel launch (argument types, constexpr values, launch
options), then, in a fresh process without the interpreter, compiles each
distinct variant with Triton's own compiler for sm_90; autotuned kernels are
compiled in the first configuration their GPU autotuner would try and in the
last, which small problems run untuned. One variant per kernel, argument
types and constants other than block sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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


# ---------------------------------------------------------------- recording (interpreter)


def _describe(value):
    """("type", x) for a runtime argument, ("constexpr", x) for a constant."""
    import torch
    import triton.language as tl

    if isinstance(value, torch.Tensor):
        return "type", _TENSOR_TYPES[str(value.dtype).replace("torch.", "")]
    if value is None:
        return "constexpr", None
    if isinstance(value, tl.dtype):
        return "constexpr", f"tl.{value.name}"
    if isinstance(value, bool):
        return "type", "i1"
    if isinstance(value, int):
        return "type", "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "type", "fp32"
    raise TypeError(f"cannot describe a kernel argument of type {type(value).__name__}")


def record() -> list[dict]:
    """Run every op under the interpreter; the launches, deduplicated."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    launches: dict[str, dict] = {}
    original_run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        constexpr_names = {n for n, p in self.fn.__annotations__.items() if "constexpr" in str(p)}
        bound = dict(zip(self.arg_names, args)) | {k: v for k, v in kwargs.items() if k not in _LAUNCH_OPTIONS}
        entry = {
            "module": self.fn.__module__,
            "kernel": self.fn.__name__,
            "args": {},
            "options": {k: kwargs[k] for k in _LAUNCH_OPTIONS if k in kwargs},
        }
        for name in self.arg_names:
            value = bound[name]
            if name in constexpr_names:
                entry["args"][name] = [
                    "constexpr",
                    _describe(value)[1] if value is None or isinstance(value, tl.dtype) else value,
                ]
            else:
                entry["args"][name] = list(_describe(value))
        # Block sizes and launch options vary with the shape but not the code
        # paths: one variant per kernel, argument types and other constants.
        key = {**entry, "options": None, "args": {n: a for n, a in entry["args"].items() if not n.startswith("BLOCK")}}
        launches.setdefault(json.dumps(key, sort_keys=True), entry)
        return original_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    try:
        _exercise_every_op()
    finally:
        InterpretedFunction.run = original_run
    return list(launches.values())


def _exercise_every_op() -> None:
    import torch

    import gpukernels as gk

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
            for activation in ("none", "relu", "gelu", "gelu_tanh", "silu"):
                for bias in (True, False):
                    x, w = leaf(5, 7), leaf(6, 7)
                    run_backward(gk.linear_act(x, w, leaf(6) if bias else None, activation), x)
            param_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
            for channels_last in (False, True):
                for training in (True, False):
                    x = leaf(2, 3, 4, 5)
                    if channels_last:
                        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
                    w = torch.ones(3, dtype=param_dtype, requires_grad=True)
                    rm, rv = torch.zeros(3, dtype=param_dtype), torch.ones(3, dtype=param_dtype)
                    run_backward(gk.batch_norm(x, rm, rv, w, torch.zeros(3, dtype=param_dtype), training=training), x)
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
            for amsgrad in (False, True):
                params = [torch.nn.Parameter(torch.randn(1500).to(dtype)), torch.nn.Parameter(torch.randn(3).to(dtype))]
                for p in params:
                    p.grad = torch.randn_like(p)
                gk.optim.AdamW(params, amsgrad=amsgrad, maximize=amsgrad).step()


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


def compile_all(launches: list[dict]) -> list[str]:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", 90, 32)
    failures, done = [], 0
    for launch in launches:
        fn, configs = _jit_function(launch["module"], launch["kernel"])
        variants = [({}, launch["options"])]
        if configs and len(configs) > 1:  # the GPU autotuner's first and last (small-problem) configs
            variants = [
                (c.kwargs, {"num_warps": c.num_warps, "num_stages": c.num_stages}) for c in (configs[0], configs[-1])
            ]
        for config_kwargs, options in variants:
            signature, constexprs = {}, {}
            for name, (kind, value) in launch["args"].items():
                if name in config_kwargs:
                    kind, value = "constexpr", config_kwargs[name]
                if kind == "constexpr":
                    signature[name] = "constexpr"
                    constexprs[name] = (
                        tl.dtype(value[3:]) if isinstance(value, str) and value.startswith("tl.") else value
                    )
                else:
                    signature[name] = value
            label = (
                f"{launch['kernel']} {json.dumps({k: v for k, v in constexprs.items() if v is not None}, default=str)}"
            )
            try:
                triton.compile(triton.compiler.ASTSource(fn, signature, constexprs), target=target, options=options)
                done += 1
            except Exception as e:  # report every failure, not just the first
                failures.append(f"{label}: {type(e).__name__}: {str(e)[:800]}")
        print(f"  {label[:150]}", flush=True)
    print(f"compiled {done} kernel variants for sm_90 with triton {triton.__version__}; {len(failures)} failed")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument(
        "-k", "--kernel", action="append", help="compile only the kernels whose name contains this (repeatable)"
    )
    args = parser.parse_args()
    if os.environ.get("GPUKERNELS_COMPILE_PHASE") == "compile":
        failures = compile_all(json.loads(sys.stdin.read()))
        for f in failures:
            print("FAILED", f)
        return 1 if failures else 0
    os.environ["TRITON_INTERPRET"] = "1"
    start = time.perf_counter()
    launches = [launch for launch in record() if not args.kernel or any(k in launch["kernel"] for k in args.kernel)]
    print(f"recorded {len(launches)} distinct kernel launches in {time.perf_counter() - start:.0f} s")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"GPUKERNELS_COMPILE_PHASE": "compile"}
    return subprocess.run([sys.executable, __file__], input=json.dumps(launches), text=True, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
