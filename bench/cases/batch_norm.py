"""2d batch_norm in training of (n, c, hw, hw), NCHW or channels-last, fp32 weight, bias and running
statistics: bytes counted for x (read, written) and its gradient, as for layer_norm (2X forward, 3X
backward: 5X, the least a two-pass design can move)."""

import torch
import torch.nn.functional as F

import gpukernels as gk

from ..harness import Case, per_mode, providers

SHAPES = [(256, 64, 56), (256, 128, 28), (256, 256, 14), (256, 512, 7)]  # (n, c, hw)
QUICK_SHAPES = [(256, 256, 14)]
CPU_SHAPES = [(8, 16, 8), (16, 32, 14)]
TARGET_SHAPES = [(*shape, layout) for shape in SHAPES for layout in ("nchw", "channels_last")]
TARGETS = [("fwd+bwd", "bandwidth", 0.5), ("fwd+bwd", "eager", 1.5)]
"""Issue 16's: forward+backward at 80% of the copy bandwidth counted on 8X bytes, which is 50% on
the 5X counted here, and 1.5x eager (cuDNN), at every shape and layout."""
EAGER_ACTIVATIONS = {"none": lambda y: y, "relu": lambda y: F.relu(y, inplace=True)}


def case(
    shape: tuple, device: torch.device, dtype: torch.dtype, activation: str = "none", residual: bool = False
) -> Case:
    """``shape``: (n, c, hw), NCHW, or (n, c, hw, layout), layout "nchw" or "channels_last";
    ``activation`` fused into ours, applied after PyTorch's in place (as timm's ResNets do);
    ``residual``: a tensor like x added before it (ours fused, PyTorch's ``y += residual``),
    whose gradient is timed too."""
    n, c, hw, *layout = shape
    x = torch.randn(n, c, hw, hw, device=device, dtype=dtype)
    if layout == ["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.ones(c, device=device, requires_grad=True)
    b = torch.zeros(c, device=device, requires_grad=True)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    io = x.numel() * x.element_size()
    r = torch.randn_like(x).requires_grad_() if residual else None

    def eager():
        y = F.batch_norm(x, rm, rv, w, b, training=True)
        if r is not None:
            y += r
        return EAGER_ACTIVATIONS[activation](y)

    return Case(
        f"{n}x{c}x{hw}x{hw}" + ("-channels-last" if layout == ["channels_last"] else ""),
        x.numel(),
        providers(
            lambda: gk.batch_norm(x, rm, rv, w, b, training=True, activation=activation, residual=r),
            eager,
            device,
            "batch_norm",
        ),
        [x, w, b] + ([r] if residual else []),
        # a residual: read forward; its gradient written, the output read (relu's mask) backward
        bytes=per_mode(3 * io, 5 * io) if residual else per_mode(2 * io, 3 * io),
    )
