"""batch_norm, a residual added, then a ReLU: a ResNet block's end (``x = bn3(x); x += shortcut;
x = act3(x)``), ours in one op (``activation="relu", residual=shortcut``), PyTorch's as timm runs it
(cuDNN's batch norm, the in-place addition, the in-place ReLU). Bytes counted as the least the op can
move: 3X forward (x and the residual read, y written), 5X backward (dy, y and x read, dx and the
residual's gradient written)."""

import torch

from ..harness import Case
from . import batch_norm, batch_norm_relu

SHAPES = batch_norm.SHAPES
QUICK_SHAPES = batch_norm_relu.QUICK_SHAPES
CPU_SHAPES = batch_norm.CPU_SHAPES


def case(shape: tuple, device: torch.device, dtype: torch.dtype) -> Case:
    return batch_norm.case(shape, device, dtype, activation="relu", residual=True)
