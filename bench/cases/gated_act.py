"""SwiGLU of a gated MLP's projections, (rows, D) each: packed, as a fused gate-up
projection computes them (Phi-3, GLM-4, timm's SwiGLUPacked: ``swiglu(gate_up)``
against ``F.silu(gate) * up`` of its chunks), and apart, as Llama's two projections
(two contiguous tensors). Forward: reads gate and up, writes the product; backward:
reads them and the upstream gradient, writes both gradients."""

import torch
import torch.nn.functional as F

import gpukernels as gk

from ..harness import Case, per_mode, providers

# (layout, rows, D): 16 x 2048 tokens of Phi-3-mini's MLP (D 8192) and of the training preset's Llama (D 2048)
SHAPES = [("packed", 32768, 8192), ("apart", 32768, 8192), ("packed", 32768, 2048), ("apart", 32768, 2048)]
QUICK_SHAPES = [("packed", 32768, 8192), ("apart", 32768, 8192)]
CPU_SHAPES = [("packed", 256, 64), ("apart", 256, 64)]


def case(shape: tuple[str, int, int], device: torch.device, dtype: torch.dtype) -> Case:
    layout, rows, d = shape
    if layout == "packed":
        gate_up = torch.randn(rows, 2 * d, device=device, dtype=dtype, requires_grad=True)
        inputs = [gate_up]
        ours, eager = (lambda: gk.swiglu(gate_up)), (lambda: _eager(*gate_up.chunk(2, dim=-1)))
    else:
        gate, up = (torch.randn(rows, d, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        inputs = [gate, up]
        ours, eager = (lambda: gk.swiglu(gate, up)), (lambda: _eager(gate, up))
    io = rows * d * inputs[0].element_size()
    return Case(
        f"{layout} {rows}x{d}",
        rows * d,
        providers(ours, eager, device, "gated_act"),
        inputs,
        bytes=per_mode(3 * io, 5 * io),
    )


def _eager(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
