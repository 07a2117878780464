"""batch_norm with a ReLU after it, a ResNet's BN + ReLU: ours fused (``activation="relu"``), PyTorch's
``F.relu(F.batch_norm(...), inplace=True)`` as timm's ResNets run it (eager: cuDNN's batch norm, then
a ReLU pass each way). Bytes counted as for batch_norm (2X forward, 3X backward), which is what the
fused op moves; the unfused pair moves 2X more forward and 3X more backward."""

import torch

from ..harness import Case
from . import batch_norm

SHAPES = batch_norm.SHAPES
QUICK_SHAPES = [(256, 256, 14, "channels_last")]  # the layout the training comparison's ResNet-50 runs in
CPU_SHAPES = batch_norm.CPU_SHAPES


def case(shape: tuple, device: torch.device, dtype: torch.dtype) -> Case:
    return batch_norm.case(shape, device, dtype, activation="relu")
