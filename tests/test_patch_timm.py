"""gk.patch on real timm models (random weights, nothing downloaded): every norm
(and each fc1 + GELU) of ResNet-18/50, ConvNeXt-T and ViT-S is swapped, each
ResNet block ends in one op (its last BatchNorm, the shortcut's addition and
the ReLU), and the patched model's outputs and gradients equal the unpatched
model's in float64. Likewise torchvision's ResNets, where it imports.

timm cannot be installed beside CI's torch (it pulls torchvision, which fails to
import beside that CPU build), so these run where timm is: the GPU machines'
releases (``ci/test-gpu-machine-versions.sh``), whose image has timm and trains
timm's ResNet-50 in ``python -m gpukernels.train --model resnet50 --preset gpu``."""

import copy

import pytest
import torch
from torch import nn

import gpukernels as gk
from helpers import assert_matches

timm = pytest.importorskip("timm")


def _norms(model: nn.Module) -> dict[str, int]:
    """How many modules of each norm class the model holds, by class name."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return counts


# name, input size, channels last, what patch must swap besides every norm
MODELS = [
    ("resnet18", 64, True, {"ResidualBlock": 8}),  # BasicBlocks
    ("resnet50", 64, True, {"ResidualBlock": 16}),  # Bottlenecks
    ("convnext_tiny", 64, False, {}),
    ("vit_small_patch16_224", 224, False, {"LinearAct": 12}),  # each block's fc1 + GELU
]


def _assert_patched_matches_in_float64(plain: nn.Module, size: int, channels_last: bool, fused: dict[str, int]):
    """patch swaps each of ``plain``'s norms and ``fused``, and the patched model computes what ``plain`` does."""
    norms = _norms(plain)
    assert norms  # the model has norms to swap
    patched = copy.deepcopy(plain)
    counts = gk.patch(patched).counts
    for kind, n in {**norms, **fused}.items():
        assert counts.get(kind) == n, (kind, n, counts)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    if channels_last:  # as the training preset runs ResNet-50
        plain, patched = (m.to(memory_format=torch.channels_last) for m in (plain, patched))
        x = x.contiguous(memory_format=torch.channels_last)
    outputs = []
    for model in (plain, patched):
        model.train()  # batch statistics, and every dropout (rate 0 in these configs)
        y = model(x)
        y.square().sum().backward()
        outputs.append(y)
    assert_matches(outputs[1], outputs[0])
    for ours, theirs in zip(patched.parameters(), plain.parameters()):
        assert_matches(ours.grad, theirs.grad)
    for ours, theirs in zip(patched.buffers(), plain.buffers()):  # BatchNorm's running statistics, its count
        if ours.is_floating_point():
            assert_matches(ours, theirs)
        else:
            assert torch.equal(ours, theirs)


@pytest.mark.parametrize("name, size, channels_last, fused", MODELS, ids=[m[0] for m in MODELS])
def test_patch_swaps_every_norm_and_matches_in_float64(name, size, channels_last, fused):
    torch.manual_seed(0)
    _assert_patched_matches_in_float64(
        timm.create_model(name, pretrained=False, num_classes=10).double(), size, channels_last, fused
    )


def test_resnet50_fuses_the_relu_after_bn1_and_bn2_of_every_block():
    """timm's Bottleneck: bn1 -> act1, bn2 -> drop_block (an nn.Identity) -> act2 fuse, as
    the stem's bn1 -> act1; bn3 and the downsample's BatchNorm feed the residual addition."""
    model = timm.create_model("resnet50", pretrained=False, num_classes=10)
    report = gk.patch(model)
    fused = sorted(name for name, old, _ in report.swapped if old == "BatchNorm2d+ReLU")
    blocks = [f"layer{stage}.{i}" for stage, count in zip(range(1, 5), (3, 4, 6, 3)) for i in range(count)]
    assert fused == sorted(["bn1", *(f"{block}.{bn}" for block in blocks for bn in ("bn1", "bn2"))])
    assert report.counts["BatchNorm2d"] == 53
    assert type(model.layer1[0].act2) is nn.Identity and model.layer1[0].bn2.activation == "relu"
    # bn3 + shortcut + act3 in the block's forward, its act3 left in place, uncalled
    assert ("layer1.0", "Bottleneck", "ResidualBlock") in report.swapped
    assert type(model.layer1[0].act3) is nn.ReLU and model.layer1[0].bn3.activation == "none"


TORCHVISION_RESNETS = [("resnet18", 8), ("resnet50", 16)]


@pytest.mark.parametrize("name, blocks", TORCHVISION_RESNETS, ids=[m[0] for m in TORCHVISION_RESNETS])
def test_torchvision_resnet_blocks_convert_and_match_in_float64(name, blocks):
    """torchvision's blocks call one ReLU module two or three times: converted, each BatchNorm fuses its
    ReLU. Each block's last BatchNorm zero-initialised, as timm's ResNets are: with whole residual
    branches from the start, ResNet-50's gradients differ from torch's by more than 1e-12 in some
    elements with any layout or patch (about 2e-12 of the largest, channels-last against contiguous)."""
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = getattr(models, name)(weights=None, num_classes=10, zero_init_residual=True).double()
    _assert_patched_matches_in_float64(model, 64, True, {"ResidualBlock": blocks})
