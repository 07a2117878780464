"""AOTAutograd's trace of a model's training step (forward and backward, Inductor's
decompositions and partitioner, fake tensors): its time, and how many times torch
lowered our kernels to TTIR to find the arguments they write.

    python bench/results/trace-time-2026-12-04-shared-analyses/trace_step.py \
        [--model resnet50|gpt2|llama] [--torch-analysis | --unpatched]

The models are the training harness's ``gpu`` presets (ResNet-50 at batch 32;
GPT-2 124M and the Llama-style 148M at one sequence of their preset's length).
Runs itself again through bench/host_time.py's stub driver (compiled Triton
kernels, an sm_90 target, no GPU); CPU tensors stand in for CUDA tensors, routed to
the Triton backend as in tests/test_inductor.py. ``--torch-analysis``: torch's
analysis at every call, without ours that keeps it per kernel and arguments;
``--unpatched``: the model as it is, for comparison.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))


def model_and_inputs(name: str):
    """The model, a function making its step's inputs, and a function of the model and
    those inputs giving the step's loss."""
    import torch
    import torch.nn.functional as F

    from gpukernels.train.models import ResNet, build_language_model
    from gpukernels.train.presets import PRESETS

    if name == "resnet50":
        model = ResNet((3, 4, 6, 3), 64, 1000).to(memory_format=torch.channels_last)

        def inputs():
            x = torch.randn(32, 3, 224, 224).to(memory_format=torch.channels_last)
            return x, torch.randint(0, 1000, (32,))

        return model, inputs, lambda run, x, target: F.cross_entropy(run(x), target)
    cfg = PRESETS[name]["gpu"]
    model = build_language_model(name, cfg)

    def inputs():
        return (torch.randint(0, cfg["vocab"], (1, cfg["seq_len"])),)

    return model, inputs, lambda run, ids: run(input_ids=ids, labels=ids).loss


def trace(model_name: str, torch_analysis: bool, patched: bool) -> None:
    import torch
    import torch._higher_order_ops.triton_kernel_wrap as triton_kernel_wrap
    import torch._inductor.lowering  # noqa: F401  (the decompositions read it)
    from functorch.compile import aot_function, min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bench import host_time

    host_time.install_stub_driver()
    host_time.route_cpu_tensors_to_triton()
    import gpukernels as gk
    from gpukernels.backends.triton import _launch, cross_entropy, linear_cross_entropy

    def check_targets_as_on_cuda(last, target, ignore_index, classes):
        """A device-side assert, as on CUDA tensors (on CPU tensors the host reads a flag)."""
        torch._assert_async(last.ok, "target out of bounds")

    cross_entropy.check_targets = linear_cross_entropy.check_targets = check_targets_as_on_cuda
    if torch_analysis:
        _launch.share_access_analyses = dict
    lowerings = collections.Counter()
    generate_ttir = triton_kernel_wrap.generate_ttir

    def counted(kernel, *args, **kwargs):
        lowerings[getattr(kernel, "__name__", None) or kernel.fn.__name__] += 1
        return generate_ttir(kernel, *args, **kwargs)

    triton_kernel_wrap.generate_ttir = counted
    torch.manual_seed(0)
    model, inputs, loss_of = model_and_inputs(model_name)
    if patched:
        gk.patch(model)
    named = [*model.named_parameters(), *model.named_buffers()]
    with FakeTensorMode(allow_non_fake_inputs=True):
        state = [torch.empty_like(t).requires_grad_(t.requires_grad) for _, t in named]
        step_inputs = inputs()

        def step(*tensors):
            parameters = dict(zip([n for n, _ in named], tensors[len(step_inputs) :]))

            def run(*args, **kwargs):
                return torch.func.functional_call(model, parameters, args, kwargs)

            return loss_of(run, *tensors[: len(step_inputs)])

        start = time.perf_counter()
        loss = aot_function(
            step,
            fw_compiler=lambda gm, _: gm,
            bw_compiler=lambda gm, _: gm,
            decompositions=select_decomp_table(),
            partition_fn=min_cut_rematerialization_partition,
            keep_inference_input_mutations=True,
        )(*step_inputs, *state)
        loss.backward()
        seconds = time.perf_counter() - start
    analysis = "torch's at every call" if torch_analysis else "kept per kernel and arguments"
    model_kind = "patched" if patched else "unpatched"
    count = sum(lowerings.values())
    print(f"{model_name} {model_kind}, analysis {analysis}: trace {seconds:.1f} s, {count} TTIR lowerings")
    for name, count in lowerings.most_common():
        print(f"  {name}: {count}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("resnet50", "gpt2", "llama"), default="resnet50")
    options = parser.add_mutually_exclusive_group()
    options.add_argument("--torch-analysis", action="store_true")
    options.add_argument("--unpatched", action="store_true")
    args = parser.parse_args()
    if os.environ.get("GPUKERNELS_TRACE_WORKER"):
        trace(args.model, args.torch_analysis, not args.unpatched)
    else:
        from bench import host_time

        build = host_time.build(host_time.DEFAULT_BUILD)
        env = host_time.stub_environment(build, build / "triton-cache-trace")
        worker = {**env, "GPUKERNELS_TRACE_WORKER": "1"}
        subprocess.run([sys.executable, __file__, *sys.argv[1:]], env=worker, check=True)
