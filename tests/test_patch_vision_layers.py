"""gk.patch on timm's and torchvision's layers that are not torch's classes: timm's BatchNormAct2d
(a BatchNorm2d subclass that runs its ``drop`` and ``act`` modules after the norm: EfficientNet,
MobileNet, RegNet), timm's own activation modules (GELU, GELUTanh, Swish: ConvNeXt's MLPs) and
torchvision's ConvNeXt LayerNorm2d. Neither library installs beside CI's torch, so replicas of
their classes (timm 1.0.31's and torchvision 0.26's forwards) are registered where patch looks
them up, in ``sys.modules``; tests/test_patch_timm.py runs the real ones where they are
installed. Each patched model against the unpatched one in float64 (outputs, input and
parameter gradients, running statistics, train and eval), the report, what keeps an activation
out of the op, unpatch and convert_sync_batchnorm."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_patch_bn import _FC_LEFT, FLOAT64, _assert_same_function, _randomized
from torch import nn

import gpukernels as gk
from gpukernels import nn as gnn
from gpukernels.distributed import SyncBatchNorm, convert_sync_batchnorm
from helpers import register_modules


def _timm_activation(name: str, forward) -> type:
    """A replica of the timm activation class ``name``, as timm.layers.activations defines it."""
    cls = type(name, (nn.Module,), {"forward": lambda self, x: forward(x)})
    cls.__module__ = "timm.layers.activations"
    cls.__init__ = lambda self, inplace=False: nn.Module.__init__(self)
    return cls


GELU = _timm_activation("GELU", F.gelu)
GELUTanh = _timm_activation("GELUTanh", lambda x: F.gelu(x, approximate="tanh"))
Swish = _timm_activation("Swish", lambda x: x.mul(x.sigmoid()))
QuickGELU = _timm_activation("QuickGELU", lambda x: x * torch.sigmoid(1.702 * x))
Mish = _timm_activation("Mish", lambda x: x.mul(F.softplus(x).tanh()))


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.norm_act.BatchNormAct2d: its forward as timm writes it; its constructor
    with the arguments these tests use (``act_layer`` a class, ``drop_layer`` a class or None)."""

    def __init__(self, num_features, act_layer=nn.ReLU, apply_act=True, drop_layer=None, **kwargs):
        super().__init__(num_features, **kwargs)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer() if apply_act else nn.Identity()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:
                    exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )
        x = self.drop(x)
        x = self.act(x)
        return x


_TIMM = {
    "timm.layers.norm_act": {"BatchNormAct2d": BatchNormAct2d},
    "timm.layers.activations": {cls.__name__: cls for cls in (GELU, GELUTanh, Swish, QuickGELU, Mish)},
}


@pytest.fixture
def timm_layers(monkeypatch):
    """The replicas as timm's classes, for the test."""
    register_modules(monkeypatch, _TIMM)


class DropBlock(nn.Module):
    """A drop layer that computes something (timm's DropBlock2d when its rate is set): between
    the norm and the activation, it keeps the activation out of the op."""

    def forward(self, x):
        return x * 0.5


# BatchNormAct2d's arguments -> the activation our op applies for it ("none": its act module runs after)
NORM_ACTS = {
    "relu": (dict(act_layer=nn.ReLU), "relu"),
    "silu": (dict(act_layer=nn.SiLU), "silu"),
    "timm_gelu": (dict(act_layer=GELU), "gelu"),
    "timm_gelu_tanh": (dict(act_layer=GELUTanh), "gelu_tanh"),
    "timm_swish": (dict(act_layer=Swish), "silu"),
    "no_act": (dict(apply_act=False), "none"),
    "hardswish": (dict(act_layer=nn.Hardswish), "none"),
    "timm_quick_gelu": (dict(act_layer=QuickGELU), "quick_gelu"),
    "mish": (dict(act_layer=Mish), "none"),
    "drop_block": (dict(act_layer=nn.ReLU, drop_layer=DropBlock), "none"),
    "momentum_none": (dict(act_layer=nn.SiLU, momentum=None), "silu"),
    "no_affine": (dict(act_layer=nn.ReLU, affine=False), "relu"),
    "no_running_stats": (dict(act_layer=nn.GELU, track_running_stats=False), "gelu"),
}


def _conv_net(**norm_act) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), BatchNormAct2d(6, **norm_act), nn.Conv2d(6, 4, 1))


def _input(channels_last: bool) -> torch.Tensor:
    x = torch.randn(4, 3, 5, 5, dtype=FLOAT64)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _randomized_where_it_has(model: nn.Module) -> nn.Module:
    """_randomized, for a model whose BatchNorm may have no weight and bias or no running statistics."""
    bn = model[1]
    if bn.affine and bn.track_running_stats:
        return _randomized(model)
    torch.manual_seed(0)
    return model.to(FLOAT64)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("case", list(NORM_ACTS))
def test_batch_norm_act_matches_unpatched_in_float64(timm_layers, case, channels_last):
    arguments, activation = NORM_ACTS[case]
    plain = _randomized_where_it_has(_conv_net(**arguments))
    patched = copy.deepcopy(plain)
    report = gk.patch(patched)
    old = "BatchNormAct2d" if activation == "none" else f"BatchNormAct2d+{activation}"
    assert report.swapped == [("1", old, "BatchNormAct2d")] and report.left == []
    bn = patched[1]
    assert isinstance(bn, BatchNormAct2d) and type(bn) is not BatchNormAct2d and bn.activation == activation
    assert type(bn.act) is type(plain[1].act) and type(bn.drop) is type(plain[1].drop)  # left in place
    x = _input(channels_last)
    if channels_last:
        plain, patched = (m.to(memory_format=torch.channels_last) for m in (plain, patched))
    _assert_same_function(patched, plain, x)


@pytest.mark.parametrize("fuse", [True, False])
def test_batch_norm_act_runs_our_op_once(timm_layers, monkeypatch, fuse):
    """The norm and a fused activation are one call of our op, its act module uncalled; unfused
    (fuse_linear_act=False), our op then the act module."""
    model = _conv_net(act_layer=nn.SiLU).to(FLOAT64)
    gk.patch(model, fuse_linear_act=fuse)
    calls, fused = [], gnn.BatchNormForward.fused

    def recording(self, input, activation, residual=None):
        calls.append(activation)
        return fused(self, input, activation, residual)

    monkeypatch.setattr(gnn.BatchNormForward, "fused", recording)
    act_calls = []
    model[1].act.register_forward_hook(lambda *args: act_calls.append(1))
    model(_input(False))
    assert calls == ["silu" if fuse else "none"] and len(act_calls) == (0 if fuse else 1)


@pytest.mark.parametrize("case", ["silu", "hardswish"])
def test_patched_batch_norm_act_compiles(timm_layers, case):
    plain = _randomized(_conv_net(**NORM_ACTS[case][0]))
    patched = copy.deepcopy(plain)
    gk.patch(patched)
    _assert_same_function(torch.compile(patched, backend="aot_eager", fullgraph=True), plain, _input(True))


def test_batch_norm_act_keeps_a_hooked_activation_out_of_the_op(timm_layers):
    model = _randomized(_conv_net(act_layer=nn.ReLU))
    seen = []
    model[1].act.register_forward_hook(lambda module, args, output: seen.append(output))
    plain = copy.deepcopy(model)
    report = gk.patch(model)
    assert report.swapped == [("1", "BatchNormAct2d", "BatchNormAct2d")] and model[1].activation == "none"
    _assert_same_function(model, plain, _input(False), modes=(True,))
    assert len(seen) == 2  # the hook ran in both models


def test_batch_norm_act_unpatches(timm_layers):
    model = _conv_net(act_layer=GELU)
    keys = list(model.state_dict())
    gk.patch(model)
    assert model[1].activation == "gelu"
    gk.unpatch(model)
    assert type(model[1]) is BatchNormAct2d and "activation" not in vars(model[1])
    assert list(model.state_dict()) == keys


def test_batch_norm_act_left_alone_when_timm_is_not_imported():
    """The replica unregistered: a BatchNorm2d subclass with a forward of its own, as any other."""
    model = _conv_net(act_layer=nn.ReLU)
    report = gk.patch(model)
    assert report.swapped == [] and report.left == [("1", "BatchNormAct2d", "a subclass with its own forward")]


@pytest.mark.parametrize("patched", [False, True], ids=["timm", "patched"])
def test_convert_sync_batchnorm_refuses_batch_norm_act(timm_layers, patched):
    """SyncBatchNorm runs no activation: converting a BatchNormAct2d (fused by patch or not) would
    drop it silently, so it is refused, naming the class; a subclass without a forward of its own
    is converted as its base."""
    model = _conv_net(act_layer=nn.ReLU)
    if patched:
        gk.patch(model)
    with pytest.raises(ValueError, match="BatchNormAct2d is a BatchNorm subclass with a forward of its own"):
        convert_sync_batchnorm(model)
    assert isinstance(model[1], BatchNormAct2d)

    class Renamed(nn.BatchNorm2d):
        pass

    assert type(convert_sync_batchnorm(Renamed(3))) is SyncBatchNorm


@pytest.mark.parametrize(
    "act, activation",
    [(GELU, "gelu"), (GELUTanh, "gelu_tanh"), (Swish, "silu"), (QuickGELU, "quick_gelu")],
    ids=["GELU", "GELUTanh", "Swish", "QuickGELU"],
)
def test_linear_fuses_timm_activations(timm_layers, act, activation):
    """timm's own activation modules after a Linear (ConvNeXt's MLP: fc1 -> GELU; CLIP's: QuickGELU) fuse
    into a LinearAct."""
    plain = nn.Sequential(nn.Linear(6, 8), act(), nn.Linear(8, 3)).to(FLOAT64)
    patched = copy.deepcopy(plain)
    report = gk.patch(patched)
    assert report.swapped == [("0", f"Linear+{act.__name__}", "LinearAct")]
    assert type(patched[0]) is gnn.LinearAct and patched[0].activation == activation
    assert type(patched[1]) is gnn.FusedActivation
    _assert_same_function(patched, plain, torch.randn(5, 6, dtype=FLOAT64))


def test_timm_activation_not_ours_is_reported_with_its_math(timm_layers):
    """Mish is no activation of ours: the Linear before it and the module itself say what it computes."""
    model = nn.Sequential(nn.Linear(6, 8), Mish(), nn.Linear(8, 3))
    report = gk.patch(model)
    why = "activation Mish computes x * tanh(softplus(x)): none of relu/gelu/gelu_tanh/silu/quick_gelu/relu_squared"
    assert report.swapped == []
    assert report.left == [
        ("0", "Linear", f"followed by Mish 1: {why}"),
        ("1", "Mish", why),
        ("2", *_FC_LEFT[1:]),
    ]


def test_timm_activation_of_the_same_name_elsewhere_is_not_claimed():
    """A class named as timm's, its module not timm's imported one: not fused."""
    model = nn.Sequential(nn.Linear(6, 8), GELU(), nn.Linear(8, 3))
    report = gk.patch(model)
    assert all(kind != "LinearAct" for _, _, kind in report.swapped)


class TorchvisionLayerNorm2d(nn.LayerNorm):
    """torchvision.models.convnext.LayerNorm2d, as torchvision writes it."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_torchvision_layer_norm_2d_matches_in_float64(monkeypatch, channels_last):
    register_modules(monkeypatch, {"torchvision.models.convnext": {"LayerNorm2d": TorchvisionLayerNorm2d}})
    plain = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), TorchvisionLayerNorm2d(6, eps=1e-6), nn.Conv2d(6, 4, 1))
    plain = plain.to(FLOAT64)
    with torch.no_grad():
        plain[1].weight.uniform_(0.5, 1.5)
        plain[1].bias.normal_()
    patched = copy.deepcopy(plain)
    report = gk.patch(patched)
    assert report.swapped == [("1", "TorchvisionLayerNorm2d", "LayerNorm2d")] and report.left == []
    x = _input(channels_last)
    if channels_last:
        plain, patched = (m.to(memory_format=torch.channels_last) for m in (plain, patched))
    _assert_same_function(patched, plain, x)
