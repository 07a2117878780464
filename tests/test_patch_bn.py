"""gk.patch fusing a BatchNorm1d/2d with the activation module that alone takes its output
(through nn.Identity modules at most): each patched model against the unpatched one in
float64 (outputs, input and parameter gradients, running statistics, train and eval), what
the report says, what prevents the fusion (a shared activation, the BatchNorm's output used
twice, hooks, fuse_linear_act=False) and unpatch."""

import copy
import functools
from collections import OrderedDict

import pytest
import torch
from torch import nn

import gpukernels as gk
from gpukernels import nn as gnn
from helpers import TOLERANCES, assert_matches

FLOAT64 = torch.float64


def _randomized(model: nn.Module) -> nn.Module:
    """``model`` in float64 with every BatchNorm's affine parameters and running statistics
    away from 1 and 0, so that a BatchNorm computed wrongly cannot pass for a right one."""
    torch.manual_seed(0)
    model = model.to(FLOAT64)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_()
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    return model


def _forward_backward(model: nn.Module, x: torch.Tensor, training: bool):
    """(output, input gradient, parameter gradients) of ``model`` in that mode, under a random cotangent."""
    model.train(training)
    model.zero_grad()
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.backward(torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1)))
    return y, x.grad, [p.grad for p in model.parameters()]


def _assert_same_function(patched: nn.Module, plain: nn.Module, x: torch.Tensor, modes=(True, False)) -> None:
    """``patched`` computes what ``plain`` does, forward and backward, in each mode (training, then
    eval, which reads the running statistics training updated), and updates the same buffers."""
    for training in modes:
        ours, theirs = _forward_backward(patched, x, training), _forward_backward(plain, x, training)
        assert_matches(ours[0], theirs[0])
        assert_matches(ours[1], theirs[1])
        for a, b in zip(ours[2], theirs[2], strict=True):
            assert_matches(a, b)
    for a, b in zip(patched.buffers(), plain.buffers(), strict=True):  # running statistics, batch counts
        torch.testing.assert_close(a, b, **TOLERANCES[FLOAT64])


class ConvNet(nn.Module):
    """Conv -> BN -> act three times, the second through an nn.Identity (timm's disabled drop_block)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.drop_block, self.act2 = nn.Identity(), nn.GELU()
        self.conv3, self.bn3, self.act3 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.SiLU(inplace=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.drop_block(self.bn2(self.conv2(x))))
        x = self.act3(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


_FC_LEFT = ("fc", "Linear", "its output goes to output, not to an activation module (patch fuses modules)")


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_conv_net_batch_norms_fuse_and_match_unpatched_in_float64(channels_last):
    plain = _randomized(ConvNet())
    patched = copy.deepcopy(plain)
    report = gk.patch(patched)
    assert report.swapped == [
        ("bn1", "BatchNorm2d+ReLU", "BatchNorm2d"),
        ("bn2", "BatchNorm2d+GELU", "BatchNorm2d"),
        ("bn3", "BatchNorm2d+SiLU", "BatchNorm2d"),
    ]
    assert report.counts == {"BatchNorm2d": 3} and report.left == [_FC_LEFT]
    assert all(type(bn) is gnn.BatchNorm2d for bn in (patched.bn1, patched.bn2, patched.bn3))
    assert [bn.activation for bn in (patched.bn1, patched.bn2, patched.bn3)] == ["relu", "gelu", "silu"]
    assert all(type(m) is gnn.FusedActivation for m in (patched.act1, patched.act2, patched.act3))
    assert type(patched.drop_block) is nn.Identity
    x = torch.randn(4, 3, 6, 6, dtype=FLOAT64)
    if channels_last:
        plain, patched = (m.to(memory_format=torch.channels_last) for m in (plain, patched))
        x = x.contiguous(memory_format=torch.channels_last)
    _assert_same_function(patched, plain, x)


_ACTIVATION_MODULES = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_tanh": functools.partial(nn.GELU, approximate="tanh"),
    "silu": nn.SiLU,
}


@pytest.mark.parametrize("activation", list(_ACTIVATION_MODULES))
@pytest.mark.parametrize("shape", [(8, 6), (4, 6, 5)], ids=["NC", "NCL"])
def test_batch_norm_1d_fuses_each_activation(activation, shape):
    act = _ACTIVATION_MODULES[activation]()
    plain = _randomized(nn.Sequential(nn.BatchNorm1d(6), act, nn.Linear(shape[-1], 3)))
    patched = copy.deepcopy(plain)
    report = gk.patch(patched)
    assert report.swapped[0] == ("0", f"BatchNorm1d+{type(act).__name__}", "BatchNorm1d")
    assert type(patched[0]) is gnn.BatchNorm1d and patched[0].activation == activation
    assert type(patched[1]) is gnn.FusedActivation
    _assert_same_function(patched, plain, torch.randn(shape, dtype=FLOAT64))


# torchvision cannot be installed in CI either: its ResNet blocks as torchvision/models/resnet.py (0.26)
# writes them, at ResNet's defaults (groups 1, base width 64, dilation 1, nn.BatchNorm2d). Unregistered,
# as here, they are any model's modules; tests/test_patch_resnet_blocks.py registers them as torchvision's.
class TorchvisionBasicBlock(nn.Module):
    """One ReLU module, called twice."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)

        return out


class TorchvisionBottleneck(nn.Module):
    """One ReLU module, called three times."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)

        out = self.conv3(out)
        out = self.bn3(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)

        return out


def test_a_shared_activation_is_not_fused_and_the_batch_norms_are_swapped_unfused():
    plain = _randomized(TorchvisionBottleneck(8, 2))
    patched = copy.deepcopy(plain)
    report = gk.patch(patched)
    assert report.swapped == [(f"bn{i}", "BatchNorm2d", "BatchNorm2d") for i in (1, 2, 3)]
    assert all(type(bn) is gnn.BatchNorm2d and bn.activation == "none" for bn in (patched.bn1, patched.bn2))
    assert type(patched.relu) is nn.ReLU
    assert report.left == [
        (
            "relu",
            "ReLU",
            "not fused into bn2, which was swapped without it: shared module: fusing ReLU would change its other uses",
        )
    ]
    _assert_same_function(patched, plain, torch.randn(2, 8, 5, 5, dtype=FLOAT64))


class PreActivationKept(nn.Module):
    """The BatchNorm's output goes to the activation and past it: fusing would change the second use."""

    def __init__(self):
        super().__init__()
        self.bn, self.drop, self.act = nn.BatchNorm1d(6), nn.Identity(), nn.ReLU()

    def forward(self, x):
        h = self.drop(self.bn(x))
        return self.act(h) + h


def test_a_batch_norm_whose_output_is_used_twice_is_not_fused():
    plain = _randomized(PreActivationKept())
    patched = copy.deepcopy(plain)
    report = gk.patch(patched)
    assert report.swapped == [("bn", "BatchNorm1d", "BatchNorm1d")]
    assert patched.bn.activation == "none" and type(patched.act) is nn.ReLU
    assert report.left == [
        (
            "act",
            "ReLU",
            "not fused into bn, which was swapped without it: its output is used 2 times, not by one activation module",
        )
    ]
    _assert_same_function(patched, plain, torch.randn(8, 6, dtype=FLOAT64))


def _keep_output(module, inputs, output):
    module.seen = output


@pytest.mark.parametrize("hooked", ["bn", "drop_block", "act"])
def test_hooks_prevent_the_fusion_and_see_what_they_saw_unpatched(hooked):
    plain = _randomized(nn.Sequential(OrderedDict(bn=nn.BatchNorm1d(6), drop_block=nn.Identity(), act=nn.ReLU())))
    plain.get_submodule(hooked).register_forward_hook(_keep_output)
    patched = copy.deepcopy(plain)  # the hook with it, keeping the copy's output
    report = gk.patch(patched)
    assert report.swapped == [("bn", "BatchNorm1d", "BatchNorm1d")]
    assert patched.bn.activation == "none" and type(patched.act) is nn.ReLU
    if hooked != "drop_block":  # the BatchNorm's output reaches the act no further than a hooked Identity
        assert report.left == [
            (
                "act",
                "ReLU",
                "not fused into bn, which was swapped without it: has hooks that expect the unfused outputs",
            )
        ]
    x = torch.randn(8, 6, dtype=FLOAT64)
    assert_matches(patched(x), plain(x))
    assert_matches(patched.get_submodule(hooked).seen, plain.get_submodule(hooked).seen)


def test_fuse_linear_act_false_swaps_the_batch_norms_unfused():
    plain = _randomized(ConvNet())
    patched = copy.deepcopy(plain)
    report = gk.patch(patched, fuse_linear_act=False)
    assert report.swapped == [(f"bn{i}", "BatchNorm2d", "BatchNorm2d") for i in (1, 2, 3)]
    assert all("activation" not in bn.__dict__ for bn in (patched.bn1, patched.bn2, patched.bn3))
    assert [type(a) for a in (patched.act1, patched.act2, patched.act3)] == [nn.ReLU, nn.GELU, nn.SiLU]
    assert report.left == [
        (name, cls, "fuse_linear_act=False")
        for name, cls in [("act1", "ReLU"), ("act2", "GELU"), ("act3", "SiLU"), ("fc", "Linear")]
    ]
    _assert_same_function(patched, plain, torch.randn(2, 3, 5, 5, dtype=FLOAT64))


def test_state_dict_unchanged_and_unpatch_restores_the_modules_and_their_function():
    plain = _randomized(ConvNet())
    model = copy.deepcopy(plain)
    activations = [model.act1, model.act2, model.act3]
    gk.patch(model)
    patched_state = model.state_dict()
    assert list(patched_state) == list(plain.state_dict())
    assert all(torch.equal(patched_state[key], value) for key, value in plain.state_dict().items())
    gk.unpatch(model)
    assert [(name, type(m)) for name, m in model.named_modules()] == [
        (name, type(m)) for name, m in plain.named_modules()
    ]
    assert all(a is b for a, b in zip([model.act1, model.act2, model.act3], activations))  # back in place
    assert not any(hasattr(bn, "activation") for bn in (model.bn1, model.bn2, model.bn3))
    x = torch.randn(2, 3, 5, 5, dtype=FLOAT64)
    for training in (True, False):
        ours, theirs = _forward_backward(model, x, training), _forward_backward(plain, x, training)
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))


# timm cannot be installed in CI (tests/test_patch_timm.py runs the real one where it can): its ResNet's
# stem and blocks as timm/models/resnet.py (1.0.31) writes them, at ResNet-18's and ResNet-50's defaults
# (no attention, no anti-aliasing: both None or nn.Identity; drop_block an nn.Identity; drop_path None).
# Registered as timm's by tests/test_patch_resnet_blocks.py; any model's modules here.
class TimmBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        first_planes = planes
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, first_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(first_planes)
        self.drop_block = nn.Identity()
        self.act1 = nn.ReLU(inplace=True)
        self.aa = nn.Identity()
        self.conv2 = nn.Conv2d(first_planes, outplanes, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(outplanes)
        self.se = None
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x

        x = self.conv1(x)
        x = self.bn1(x)
        x = self.drop_block(x)
        x = self.act1(x)
        x = self.aa(x)

        x = self.conv2(x)
        x = self.bn2(x)

        if self.se is not None:
            x = self.se(x)

        if self.drop_path is not None:
            x = self.drop_path(x)

        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        x = self.act2(x)

        return x


class TimmBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        width = planes
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.drop_block = nn.Identity()
        self.act2 = nn.ReLU(inplace=True)
        self.aa = nn.Identity()
        self.conv3 = nn.Conv2d(width, outplanes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.se = None
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x

        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)

        x = self.conv2(x)
        x = self.bn2(x)
        x = self.drop_block(x)
        x = self.act2(x)
        x = self.aa(x)

        x = self.conv3(x)
        x = self.bn3(x)

        if self.se is not None:
            x = self.se(x)

        if self.drop_path is not None:
            x = self.drop_path(x)

        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        x = self.act3(x)

        return x


class TimmResNet(nn.Module):
    """timm's ResNet stem (conv1, bn1, act1, maxpool), one stage of two Bottlenecks, its head."""

    def __init__(self, stem: int = 8, planes: int = 4, classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        out = planes * TimmBottleneck.expansion
        downsample = nn.Sequential(nn.Conv2d(stem, out, 1, stride=2, bias=False), nn.BatchNorm2d(out))
        self.layer1 = nn.Sequential(TimmBottleneck(stem, planes, 2, downsample), TimmBottleneck(out, planes))
        self.fc = nn.Linear(out, classes)

    def forward(self, x):
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        return self.fc(self.layer1(x).mean((2, 3)))


def test_timm_resnet_fuses_bn1_and_bn2_of_each_bottleneck_not_bn3():
    plain = _randomized(TimmResNet())
    patched = copy.deepcopy(plain)
    report = gk.patch(patched)
    fused = {name for name, old, _ in report.swapped if old == "BatchNorm2d+ReLU"}
    assert fused == {"bn1", "layer1.0.bn1", "layer1.0.bn2", "layer1.1.bn1", "layer1.1.bn2"}
    unfused = {name for name, old, _ in report.swapped if old == "BatchNorm2d"}
    assert unfused == {"layer1.0.bn3", "layer1.0.downsample.1", "layer1.1.bn3"}  # each added to the shortcut first
    assert report.counts == {"BatchNorm2d": 8} and report.left == [_FC_LEFT]
    assert all(type(block.act3) is nn.ReLU for block in patched.layer1)
    x = torch.randn(2, 3, 16, 16, dtype=FLOAT64).contiguous(memory_format=torch.channels_last)
    plain, patched = (m.to(memory_format=torch.channels_last) for m in (plain, patched))
    _assert_same_function(patched, plain, x)
