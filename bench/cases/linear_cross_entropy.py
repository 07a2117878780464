"""The LLM head: hidden states x (rows, hidden) times weight (vocab, hidden), then the
mean cross-entropy; counted in the matmuls' FLOPs."""

import math
from functools import partial

import torch
import torch.nn.functional as F

import gpukernels as gk

from ..harness import Case, per_mode, providers

SHAPES = [(4096, 4096, 32768), (8192, 4096, 131072), (8192, 4096, 262144)]  # (rows, hidden, vocab)
QUICK_SHAPES = [(8192, 4096, 131072)]
CPU_SHAPES = [(256, 64, 4096)]
TARGET_SHAPES = [(8192, 4096, 32768), (8192, 4096, 131072), (8192, 4096, 262144)]
TARGETS = [("fwd+bwd", "eager", 1.0), ("fwd+bwd", "liger", 1.3)]
"""Issue 16's: forward+backward at least as fast as eager and 1.3x Liger-Kernel (peak memory under a third of
eager's: tests/test_linear_cross_entropy.py's GPU test)."""


def case(shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> Case:
    rows, hidden, vocab = shape
    x = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=device, dtype=dtype) / math.sqrt(hidden)).requires_grad_()
    target = torch.randint(0, vocab, (rows,), device=device)
    flops = 2 * rows * hidden * vocab
    return Case(
        f"{rows}x{hidden}x{vocab}",
        rows * hidden * vocab,
        providers(
            lambda: gk.linear_cross_entropy(x, w, target),
            lambda: F.cross_entropy(F.linear(x, w), target),
            device,
            "linear_cross_entropy",
            # Liger's loss takes the weight first
            lambda lg: partial(lg.LigerFusedLinearCrossEntropyLoss(), w, x, target),
        ),
        [x, w],
        flops=per_mode(flops, 2 * flops),
        # Ours and Liger's compute the gradients in the forward and hand them over in the
        # backward: a backward replayed alone (retain_graph) would time something else
        # (ours: the two-pass backward a second backward takes; Liger's: nothing)
        modes=("fwd", "fwd+bwd"),
    )
