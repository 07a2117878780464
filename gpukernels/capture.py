"""Capture a whole training step in a CUDA graph and replay it.

A step launched op by op from Python waits on the host whenever its kernels
are shorter than their launches. Replaying a CUDA graph launches the whole
step at once. ``capture_step`` does the capture as PyTorch's "whole-network
capture" recipe does, and checks what a replay needs:

- static shapes: every replay gets inputs of the example inputs' shapes,
  dtypes and device (they are copied into the graph's own input tensors);
- the learning rate as a CUDA tensor, changed in place (a float lr is baked
  into the graph at capture: every replay would use the lr of that moment);
- no host syncs inside the step (``.item()``, printing a tensor, a CPU->GPU
  copy from pageable memory, ``clip_grad_norm_(error_if_nonfinite=True)``);
- a warm-up of a few eager steps on a side stream before the capture, so the
  optimizer state and every lazily made buffer exist (they are real training
  steps on the example inputs).

Dropout with ``seed=None`` (``gk.nn.Dropout`` and every patched dropout) draws
its seed with ``torch.randint`` on the device, which under capture reads
PyTorch's graph-safe Philox state: each replay draws a new mask. A fixed
``seed`` replays the same mask, as it would eagerly.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .errors import ArgumentError, ArgumentTypeError
from .ops._checks import check_int


class CapturedStep:
    """A captured step: ``captured(*inputs)`` copies the inputs into the graph's
    own, replays the graph and returns the step's output (the same tensors on
    every replay: read or clone them before the next)."""

    def __init__(self, graph: "torch.cuda.CUDAGraph", static_inputs: Sequence[Tensor], output: Any):
        self.graph = graph
        self.static_inputs = tuple(static_inputs)
        self.output = output

    def __call__(self, *inputs: Tensor) -> Any:
        if len(inputs) != len(self.static_inputs):
            raise ArgumentTypeError(f"the step was captured with {len(self.static_inputs)} input(s), got {len(inputs)}")
        for i, (static, new) in enumerate(zip(self.static_inputs, inputs)):
            _check_like(f"inputs[{i}]", new, static)
            static.copy_(new)
        self.graph.replay()
        return self.output


def _check_like(name: str, t: Any, static: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise ArgumentTypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.shape != static.shape or t.dtype != static.dtype or t.device != static.device:
        raise ArgumentError(
            f"{name} is {t.dtype}{list(t.shape)} on {t.device}, but the step was captured with "
            f"{static.dtype}{list(static.shape)} on {static.device}: a CUDA graph replays static "
            f"shapes (capture one step per shape)"
        )


def _check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    from .optim import AdamW

    for i, group in enumerate(optimizer.param_groups):
        lr = group["lr"]
        if not (isinstance(lr, Tensor) and lr.is_cuda):
            raise ArgumentTypeError(
                f"optimizer.param_groups[{i}]['lr'] is {type(lr).__name__ if not isinstance(lr, Tensor) else lr.device}"
                f": a captured step would replay the lr it had at capture. Make it a CUDA tensor, e.g. "
                f"lr=torch.tensor(1e-3, dtype=torch.float64, device='cuda'), and change it in place"
            )
        # ours keeps torch's flags for state-dict compatibility, and is always capturable
        if not isinstance(optimizer, AdamW) and "capturable" in group and not group["capturable"]:
            raise ArgumentError(
                f"optimizer.param_groups[{i}] has capturable=False: torch.optim optimizers need "
                f"capturable=True to be captured (gpukernels.optim.AdamW always is)"
            )


def capture_step(
    step: Callable[..., Any],
    *example_inputs: Tensor,
    optimizer: torch.optim.Optimizer | None = None,
    warmup_steps: int = 3,
    pool: Any = None,
) -> CapturedStep:
    """Capture ``step(*inputs)`` — forward, backward, gradient clipping and the
    optimizer step, returning e.g. the loss — in a CUDA graph; returns a
    ``CapturedStep`` that replays it on new inputs of the same shapes.

    ``optimizer`` (the one ``step`` steps) is checked for a tensor lr, and the
    graph zeroes its gradients in place before ``step`` runs (``step`` need not
    zero them): the gradient tensors the warm-up made stay those of every replay,
    and gk.optim.AdamW's tables of their addresses, which can only be built
    outside a capture, stay valid. ``warmup_steps`` eager steps run first, on a
    side stream. ``pool``: a memory pool to share with other graphs."""
    for i, t in enumerate(example_inputs):
        if not isinstance(t, Tensor):
            raise ArgumentTypeError(f"example_inputs[{i}] must be a tensor, got {type(t).__name__}")
        if not t.is_cuda:
            raise ArgumentError(f"example_inputs[{i}] is on {t.device}: a CUDA graph captures CUDA tensors only")
    warmup_steps = check_int(
        "warmup_steps",
        warmup_steps,
        low=1,
        what="an int (the optimizer state must exist before capture)",
        not_int=ArgumentError,
    )
    if optimizer is not None:
        _check_optimizer(optimizer)
    if not torch.cuda.is_available():
        raise RuntimeError("capture_step needs a CUDA GPU")

    static_inputs = [t.detach().clone() for t in example_inputs]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_steps):
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            step(*static_inputs)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, pool=pool):
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=False)
            output = step(*static_inputs)
    except RuntimeError as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RuntimeError(
            f"the step could not be captured in a CUDA graph: {first_line}. A captured step must "
            f"make no host syncs (.item(), printing or branching on a tensor's value, "
            f"CPU->GPU copies from pageable memory)"
        ) from e
    return CapturedStep(graph, static_inputs, output)
