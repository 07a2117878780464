"""AOTAutograd's trace of a patched ResNet-50's training step (forward and backward,
Inductor's decompositions and partitioner, fake tensors): its time, and how many
times torch lowered our kernels to TTIR to find the arguments they write.

    python bench/results/trace-time-2026-12-04-shared-analyses/trace_resnet50.py [--torch-analysis]

Runs itself again through bench/host_time.py's stub driver (compiled Triton
kernels, an sm_90 target, no GPU); CPU tensors stand in for CUDA tensors, routed to
the Triton backend as in tests/test_inductor.py. ``--torch-analysis``: torch's
analysis at every call, without ours that keeps it per kernel and arguments.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))


def trace(torch_analysis: bool) -> None:
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
    from gpukernels.backends.triton import _launch
    from gpukernels.train.models import ResNet

    if torch_analysis:
        _launch.share_access_analyses = dict
    lowerings = collections.Counter()
    generate_ttir = triton_kernel_wrap.generate_ttir

    def counted(kernel, *args, **kwargs):
        lowerings[getattr(kernel, "__name__", None) or kernel.fn.__name__] += 1
        return generate_ttir(kernel, *args, **kwargs)

    triton_kernel_wrap.generate_ttir = counted
    torch.manual_seed(0)
    model = ResNet((3, 4, 6, 3), 64, 1000)
    gk.patch(model)
    model = model.to(memory_format=torch.channels_last)
    named = [*model.named_parameters(), *model.named_buffers()]
    with FakeTensorMode(allow_non_fake_inputs=True):
        state = [torch.empty_like(t).requires_grad_(t.requires_grad) for _, t in named]
        x = torch.randn(32, 3, 224, 224).to(memory_format=torch.channels_last)
        target = torch.randint(0, 1000, (32,))

        def step(x, target, *tensors):
            logits = torch.func.functional_call(model, dict(zip([n for n, _ in named], tensors)), (x,))
            return torch.nn.functional.cross_entropy(logits, target)

        start = time.perf_counter()
        loss = aot_function(
            step,
            fw_compiler=lambda gm, _: gm,
            bw_compiler=lambda gm, _: gm,
            decompositions=select_decomp_table(),
            partition_fn=min_cut_rematerialization_partition,
            keep_inference_input_mutations=True,
        )(x, target, *state)
        loss.backward()
        seconds = time.perf_counter() - start
    analysis = "torch's at every call" if torch_analysis else "kept per kernel and arguments"
    print(f"analysis {analysis}: trace {seconds:.1f} s, {sum(lowerings.values())} TTIR lowerings")
    for name, count in lowerings.most_common():
        print(f"  {name}: {count}")


if __name__ == "__main__":
    if os.environ.get("GPUKERNELS_TRACE_WORKER"):
        trace("--torch-analysis" in sys.argv)
    else:
        from bench import host_time

        build = host_time.build(host_time.DEFAULT_BUILD)
        env = host_time.stub_environment(build, build / "triton-cache-trace")
        subprocess.run([sys.executable, __file__, *sys.argv[1:]], env={**env, "GPUKERNELS_TRACE_WORKER": "1"}, check=True)
