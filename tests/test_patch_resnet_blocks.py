"""gk.patch converting timm's and torchvision's ResNet blocks (BasicBlock, Bottleneck) so that
each ends with its last BatchNorm, the shortcut's addition and the ReLU in one op. Neither
library installs beside CI's torch: replicas of their classes (tests/test_patch_bn.py) are
registered where patch looks the classes up, in ``sys.modules``. Each patched model against
the unpatched one in float64 (outputs, input and parameter gradients, running statistics,
train then eval), what leaves a block as it is, the report and unpatch. tests/test_patch_timm.py
runs the real libraries where they are installed."""

import copy
from collections import Counter

import pytest
import torch
from test_patch_bn import (
    _FC_LEFT,
    FLOAT64,
    TimmBasicBlock,
    TimmBottleneck,
    TimmResNet,
    TorchvisionBasicBlock,
    TorchvisionBottleneck,
    _assert_same_function,
    _keep_output,
    _randomized,
)
from torch import nn

import gpukernels as gk
from gpukernels import nn as gnn
from gpukernels.distributed import SyncBatchNorm, convert_sync_batchnorm
from helpers import assert_matches, register_modules

_LIBRARIES = {
    "timm.models.resnet": {"BasicBlock": TimmBasicBlock, "Bottleneck": TimmBottleneck},
    "torchvision.models.resnet": {"BasicBlock": TorchvisionBasicBlock, "Bottleneck": TorchvisionBottleneck},
}

# block class -> its BatchNorms, in order (the last one's output is added to the shortcut), and those the
# FX dataflow fuses with the activation module after them (timm's; torchvision's one ReLU serves three calls)
_BATCH_NORMS = {
    TimmBasicBlock: (("bn1", "bn2"), ("bn1",)),
    TimmBottleneck: (("bn1", "bn2", "bn3"), ("bn1", "bn2")),
    TorchvisionBasicBlock: (("bn1", "bn2"), ()),
    TorchvisionBottleneck: (("bn1", "bn2", "bn3"), ()),
}
# the activation module the converted block computes relu in place of calling
_BYPASSED = {
    TimmBasicBlock: "act2",
    TimmBottleneck: "act3",
    TorchvisionBasicBlock: "relu",
    TorchvisionBottleneck: "relu",
}
BLOCKS = list(_BATCH_NORMS)
_IDS = [block.__name__ for block in BLOCKS]


@pytest.fixture
def libraries(monkeypatch):
    """The replicas as timm's and torchvision's classes, for the test."""
    register_modules(monkeypatch, _LIBRARIES)


def _stage(block: type, inplanes: int = 8, planes: int = 4) -> nn.Sequential:
    """Two blocks as a ResNet stage makes them: the first downsamples (stride 2; its shortcut through
    a 1x1 convolution and a BatchNorm), the second takes the first's output as its shortcut."""
    out = planes * block.expansion
    downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=2, bias=False), nn.BatchNorm2d(out))
    return nn.Sequential(block(inplanes, planes, 2, downsample), block(out, planes))


def _input(channels_last: bool = False) -> torch.Tensor:
    x = torch.randn(4, 8, 6, 6, dtype=FLOAT64)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _residual_block_rows(report: gk.PatchReport) -> list[tuple[str, str, str]]:
    return [row for row in report.swapped if row[2] == "ResidualBlock"]


@pytest.fixture
def fused_calls(monkeypatch) -> list[tuple[str, bool]]:
    """(activation, whether a residual was added) of each BatchNorm call (forward calls .fused too)."""
    calls = []
    fused = gnn.BatchNormForward.fused

    def recording(self, input, activation, residual=None):
        calls.append((activation, residual is not None))
        return fused(self, input, activation, residual)

    monkeypatch.setattr(gnn.BatchNormForward, "fused", recording)
    return calls


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("block", BLOCKS, ids=_IDS)
def test_blocks_end_in_one_op_and_match_unpatched_in_float64(libraries, fused_calls, block, channels_last):
    plain = _randomized(_stage(block))
    patched = copy.deepcopy(plain)
    report = gk.patch(patched)
    batch_norms, fused_by_dataflow = _BATCH_NORMS[block]
    assert sorted(report.swapped) == sorted(
        [(i, block.__name__, "ResidualBlock") for i in "01"]
        + [
            (f"{i}.{bn}", "BatchNorm2d+ReLU" if bn in fused_by_dataflow else "BatchNorm2d", "BatchNorm2d")
            for i in "01"
            for bn in batch_norms
        ]
        + [("0.downsample.1", "BatchNorm2d", "BatchNorm2d")]
    )
    assert report.left == []  # the ReLU modules the blocks no longer call are no news
    for converted in patched:
        assert type(converted).__name__ == block.__name__ and type(converted).__mro__[1] is block
        assert all(type(getattr(converted, bn)) is gnn.BatchNorm2d for bn in batch_norms)  # .fused is ours
        assert type(getattr(converted, _BYPASSED[block])) is nn.ReLU  # in place, uncalled
    if channels_last:
        plain, patched = (m.to(memory_format=torch.channels_last) for m in (plain, patched))
    _assert_same_function(patched, plain, _input(channels_last))
    # per block, in training then in eval: the last BatchNorm with the shortcut and relu, the others with relu
    per_block = len(batch_norms) - 1
    assert Counter(fused_calls) == {("relu", True): 4, ("relu", False): 4 * per_block, ("none", False): 2}


@pytest.mark.parametrize("block", [TimmBottleneck, TorchvisionBottleneck], ids=lambda block: block.__name__)
def test_converted_blocks_compile(libraries, block):
    plain = _randomized(_stage(block))
    patched = copy.deepcopy(plain)
    gk.patch(patched)
    _assert_same_function(torch.compile(patched, backend="aot_eager"), plain, _input(channels_last=True))


class _Float32(nn.Module):
    """A shortcut in another dtype than the block's convolutions (as under autocast with an fp32 input)."""

    def forward(self, x):
        return x.float()


@pytest.mark.parametrize("block", BLOCKS, ids=_IDS)
def test_a_shortcut_of_another_dtype_is_added_as_the_block_writes_it(libraries, fused_calls, block):
    plain = _randomized(block(8, 8 // block.expansion, downsample=_Float32()))
    patched = copy.deepcopy(plain)
    assert len(_residual_block_rows(gk.patch(patched))) == 1
    _assert_same_function(patched, plain, _input())
    assert ("relu", True) not in fused_calls and ("none", False) in fused_calls


@pytest.mark.parametrize("block", [TorchvisionBasicBlock, TorchvisionBottleneck], ids=lambda block: block.__name__)
def test_batch_norms_made_sync_after_patch_run_their_own_forward(libraries, fused_calls, block):
    """convert_sync_batchnorm after patch (it belongs before): the converted blocks call each
    SyncBatchNorm's forward, which syncs the batch statistics across ranks, not .fused, which
    would not. (timm's blocks refuse it: their bn1 and bn2 apply their act.)"""
    plain = _randomized(_stage(block))
    patched = copy.deepcopy(plain)
    gk.patch(patched)
    convert_sync_batchnorm(patched)
    assert all(type(getattr(converted, bn)) is SyncBatchNorm for converted in patched for bn in _BATCH_NORMS[block][0])
    _assert_same_function(patched, plain, _input())
    assert set(fused_calls) == {("none", False)}  # each from a SyncBatchNorm's forward (one process: no group)


class _SqueezeExcite(nn.Module):
    """timm's SE attention in its essentials: channels scaled by a gate computed from their means."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return x * self.fc(x.mean((2, 3), keepdim=True)).sigmoid()


class _BatchNorm2dSubclass(nn.BatchNorm2d):
    pass


def _set(name: str, make):
    """Sets the first block's ``name`` to a new ``make()``."""

    def change(stage):
        setattr(stage[0], name, make())

    return change


def _hook(name: str):
    """Hooks the first block's ``name`` (the block itself for ""), keeping its output as ``seen``."""

    def change(stage):
        stage[0].get_submodule(name).register_forward_hook(_keep_output)

    return change


# block, what changes in the first block, why patch then leaves it
LEFT = {
    "se": (
        TimmBottleneck,
        _set("se", lambda: _SqueezeExcite(16)),
        "se is set: it runs between bn3 and the shortcut's addition",
    ),
    "drop_path": (
        TimmBasicBlock,
        _set("drop_path", lambda: nn.Identity()),  # stands for timm's DropPath, at rate 0
        "drop_path is set: it runs between bn2 and the shortcut's addition",
    ),
    "silu": (TimmBottleneck, _set("act3", lambda: nn.SiLU()), "act3 computes silu, not relu"),
    "tanh": (
        TimmBasicBlock,
        _set("act2", lambda: nn.Tanh()),
        "act2: activation Tanh is none of relu/gelu/gelu_tanh/silu/quick_gelu/relu_squared",
    ),
    "norm_subclass": (
        TorchvisionBottleneck,
        _set("bn2", lambda: _BatchNorm2dSubclass(4)),
        "bn2 is a _BatchNorm2dSubclass, not torch's BatchNorm2d (or ours)",
    ),
    "norm_with_relu": (
        TorchvisionBasicBlock,
        _set("bn1", lambda: gnn.BatchNorm2d(4, activation="relu")),
        "bn1 already applies relu",
    ),
    "hooked_block": (TimmBottleneck, _hook(""), "has hooks (the block), which expect its forward as written"),
    "hooked_bn3": (TimmBottleneck, _hook("bn3"), "has hooks (bn3), which expect its forward as written"),
    "hooked_act2": (TimmBasicBlock, _hook("act2"), "has hooks (act2), which expect its forward as written"),
    "hooked_bn1": (TorchvisionBottleneck, _hook("bn1"), "has hooks (bn1), which expect its forward as written"),
    "hooked_relu": (TorchvisionBasicBlock, _hook("relu"), "has hooks (relu), which expect its forward as written"),
}


@pytest.mark.parametrize("case", list(LEFT))
def test_a_block_its_op_cannot_compute_is_left_as_it_is(libraries, case):
    block, change, why = LEFT[case]
    stage = _stage(block)
    change(stage)
    plain = _randomized(stage)
    patched = copy.deepcopy(plain)  # hooks with it, keeping the copy's outputs
    report = gk.patch(patched)
    assert ("0", block.__name__, why) in report.left
    assert _residual_block_rows(report) == [("1", block.__name__, "ResidualBlock")]
    assert type(patched[0]) is block
    last_bn = _BATCH_NORMS[block][0][-1]
    if type(getattr(plain[0], last_bn)) is nn.BatchNorm2d:  # swapped all the same, unfused
        assert (f"0.{last_bn}", "BatchNorm2d", "BatchNorm2d") in report.swapped
    _assert_same_function(patched, plain, _input())
    for name, module in patched.named_modules():
        if hasattr(module, "seen"):
            assert_matches(module.seen, plain.get_submodule(name).seen)


@pytest.mark.parametrize("block", BLOCKS, ids=_IDS)
def test_batch_norms_already_ours_are_used_as_they_are(libraries, block):
    stage = _stage(block)
    for name in _BATCH_NORMS[block][0]:
        features = getattr(stage[1], name).num_features
        setattr(stage[1], name, gnn.BatchNorm2d(features))
    plain = _randomized(stage)
    patched = copy.deepcopy(plain)
    assert len(_residual_block_rows(gk.patch(patched))) == 2
    _assert_same_function(patched, plain, _input())


def test_unregistered_copies_of_the_classes_are_not_converted():
    """Without the libraries' modules (or with other classes in them), a block is any module."""
    report = gk.patch(_stage(TimmBottleneck))
    assert _residual_block_rows(report) == []


@pytest.mark.parametrize("block", BLOCKS, ids=_IDS)
def test_fuse_linear_act_false_leaves_the_blocks(libraries, block):
    plain = _randomized(_stage(block))
    patched = copy.deepcopy(plain)
    report = gk.patch(patched, fuse_linear_act=False)
    assert _residual_block_rows(report) == [] and all(type(b) is block for b in patched)
    assert report.counts == {"BatchNorm2d": 2 * len(_BATCH_NORMS[block][0]) + 1}
    _assert_same_function(patched, plain, _input())


@pytest.mark.parametrize("block", BLOCKS, ids=_IDS)
def test_unpatch_restores_the_blocks_and_their_function(libraries, block):
    plain = _randomized(_stage(block))
    model = copy.deepcopy(plain)
    gk.patch(model)
    assert gk.patch(model).swapped == []  # patching again changes nothing
    gk.unpatch(model)
    assert [(name, type(m)) for name, m in model.named_modules()] == [
        (name, type(m)) for name, m in plain.named_modules()
    ]
    x = _input()
    for training in (True, False):
        model.train(training)
        plain.train(training)
        assert torch.equal(model(x), plain(x))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))


def test_blocks_in_a_timm_resnet_report_each_row(libraries):
    """The stem's bn1 + act1 and each block's bn1 + act1, bn2 + act2 fuse by the forward's dataflow
    (traced before any block is converted); each block's bn3 + shortcut + act3 by its rule."""
    plain = _randomized(TimmResNet())
    patched = copy.deepcopy(plain)
    report = gk.patch(patched)
    assert report.swapped == [
        ("bn1", "BatchNorm2d+ReLU", "BatchNorm2d"),
        ("layer1.0.bn1", "BatchNorm2d+ReLU", "BatchNorm2d"),
        ("layer1.0.bn2", "BatchNorm2d+ReLU", "BatchNorm2d"),
        ("layer1.1.bn1", "BatchNorm2d+ReLU", "BatchNorm2d"),
        ("layer1.1.bn2", "BatchNorm2d+ReLU", "BatchNorm2d"),
        ("layer1.0", "TimmBottleneck", "ResidualBlock"),
        ("layer1.0.bn3", "BatchNorm2d", "BatchNorm2d"),
        ("layer1.0.downsample.1", "BatchNorm2d", "BatchNorm2d"),
        ("layer1.1", "TimmBottleneck", "ResidualBlock"),
        ("layer1.1.bn3", "BatchNorm2d", "BatchNorm2d"),
    ]
    assert report.counts == {"BatchNorm2d": 8, "ResidualBlock": 2} and report.left == [_FC_LEFT]
    x = torch.randn(2, 3, 16, 16, dtype=FLOAT64).contiguous(memory_format=torch.channels_last)
    plain, patched = (m.to(memory_format=torch.channels_last) for m in (plain, patched))
    _assert_same_function(patched, plain, x)
