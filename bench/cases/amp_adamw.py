"""One AdamW step driven by AMP's ``GradScaler`` (``scaler.step`` + ``scaler.update``), over
the parameters of ``adamw.py``'s cases: ours takes the scaler's fused path, dividing each
gradient by the scale as the update reads it and skipping itself on the device on overflow
(8 fp32 accesses per parameter: the update's 7 and the scaler's overflow check), as
PyTorch's fused AdamW does on CUDA; against an optimizer without that path (PyTorch's
foreach AdamW), for which the scaler unscales every gradient in place (10 accesses) and
reads the overflow flag on the host before the step."""

import torch

from ..harness import Case
from . import adamw

SHAPES, QUICK_SHAPES, CPU_SHAPES = adamw.SHAPES, adamw.QUICK_SHAPES, adamw.CPU_SHAPES
COMPILE_SKIP_REASON = adamw.COMPILE_SKIP_REASON


def _scaled_step(optimizer, device: torch.device):
    scaler = torch.amp.GradScaler(device.type)
    scaler.scale(torch.ones((), device=device))  # the scale is made on first use

    def step():
        scaler.step(optimizer)
        scaler.update()

    return step


def case(total: int, device: torch.device, dtype: torch.dtype) -> Case:
    steps = {
        name: _scaled_step(make(adamw.parameters(total, device)), device)
        for name, make in adamw.optimizers(device).items()
    }
    return Case(f"{total / 1e6:g}M params", total, steps, bytes={"step": 8 * 4 * total}, modes=("step",))
