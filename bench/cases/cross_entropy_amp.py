"""Mean cross-entropy of (rows, vocab) logits under bf16 autocast, as a mixed-precision training step
computes its loss: PyTorch's autocast runs F.cross_entropy on an fp32 copy of bf16 logits (kept for
the backward, whose fp32 gradient it rounds back to bf16); ours reads the logits as they are and
returns the fp32 loss. The plain op's case, each call under autocast; bytes: what ours moves, 3x the
logits' (a read forward, a read and a write backward)."""

import torch

from ..harness import Case
from . import cross_entropy
from .cross_entropy import CPU_SHAPES, QUICK_SHAPES, SHAPES  # noqa: F401  (the plain op's shapes)


def case(shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> Case:
    def under_autocast(fn):
        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return fn()

        return run

    return cross_entropy.case(shape, device, dtype, wrap=under_autocast)
