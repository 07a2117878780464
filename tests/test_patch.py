import copy
import gc
import importlib
import pickle
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

import gpukernels as gk
from gpukernels import nn as gnn
from helpers import LoRA, assert_matches

gk_patch = importlib.import_module("gpukernels.patch")  # the module: gk.patch is the function


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.GELU(),
        nn.Linear(16, 16),
        nn.GELU(approximate="tanh"),
        nn.Linear(16, 16),
        nn.SiLU(),
        nn.LayerNorm(16),
        nn.Dropout(0.0),
        nn.Linear(16, 16),
        nn.Tanh(),  # not a supported activation: left
        nn.Linear(16, 16),
        nn.BatchNorm1d(16),  # not followed by an activation: left
        nn.Linear(16, 4),
    )


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 5 * 5, 3))

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


def _outputs_and_grads(model, x, target, loss_fn):
    model.zero_grad()
    loss = loss_fn(model(x), target)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("make,shape,classes", [(_mlp, (5, 8), 4), (Conv, (4, 3, 5, 5), 3)])
def test_patched_model_matches_original(make, shape, classes):
    torch.manual_seed(1)
    original = make()
    patched = copy.deepcopy(original)
    loss_orig, loss_patched = nn.CrossEntropyLoss(), nn.CrossEntropyLoss()
    report = gk.patch(patched)
    gk.patch(loss_patched)
    assert type(loss_patched) is gnn.CrossEntropyLoss
    x, target = torch.randn(shape), torch.randint(0, classes, (shape[0],))
    loss_a, grads_a = _outputs_and_grads(original, x, target, loss_orig)
    loss_b, grads_b = _outputs_and_grads(patched, x, target, loss_patched)
    torch.testing.assert_close(loss_b, loss_a)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a)
    assert report.swapped


def test_every_supported_pattern_swapped_and_rest_reported():
    model = _mlp()
    report = gk.patch(model)
    swapped = {name: new for name, _, new in report.swapped}
    assert swapped == {
        "0": "LinearAct",
        "2": "LinearAct",
        "4": "LinearAct",
        "6": "LinearAct",
        "8": "LayerNorm",
        "9": "Dropout",
        "13": "BatchNorm1d",
    }
    assert [model[i].activation for i in (0, 2, 4, 6)] == ["relu", "gelu", "gelu_tanh", "silu"]
    assert all(type(model[i]) is gnn.FusedActivation for i in (1, 3, 5, 7))
    left = {name: why for name, _, why in report.left}
    assert set(left) == {"10", "12", "14"}
    assert left["10"] == "followed by Tanh 11: not a relu/gelu/gelu_tanh/silu/quick_gelu/relu_squared activation module"
    assert left["12"].startswith("followed by BatchNorm1d 13") and "goes to output" in left["14"]
    assert report.counts == {"LinearAct": 4, "LayerNorm": 1, "Dropout": 1, "BatchNorm1d": 1}
    assert "swapped 7 module(s) (LinearAct 4, LayerNorm 1, Dropout 1, BatchNorm1d 1)" in str(report)
    assert "left 3" in str(report)


def test_state_dict_unchanged_and_parameters_are_the_same_objects():
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    params = list(model.parameters())
    gk.patch(model)
    after = model.state_dict()
    assert list(after) == list(before)
    for key in before:
        assert torch.equal(after[key], before[key])
    assert all(a is b for a, b in zip(model.parameters(), params))  # an optimizer made before patching still works


def test_patch_twice_is_harmless_and_unpatch_restores():
    model = _mlp()
    x = torch.randn(3, 8)
    model.eval()
    expected = model(x)
    gk.patch(model)
    second = gk.patch(model)
    assert second.swapped == []
    torch.testing.assert_close(model(x), expected)
    gk.unpatch(model)
    assert [type(m) for m in model] == [type(m) for m in _mlp()]
    torch.testing.assert_close(model(x), expected)


def test_hooks_and_shared_modules_are_left_alone_and_reported():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.GELU())
    report = gk.patch(model)
    assert all(type(m) is not gnn.LinearAct for m in model)
    assert any("shared" in why for _, _, why in report.left)

    hooked = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    seen = []
    hooked[0].register_forward_hook(lambda mod, inp, out: seen.append(out.min().item()))
    report = gk.patch(hooked)
    assert type(hooked[0]) is nn.Linear and any("hooks" in why for _, _, why in report.left)
    hooked(torch.randn(4, 8))
    assert seen and seen[0] < 0  # the hook still sees the pre-activation output


def test_subclass_of_torch_layer_is_left():
    class MyNorm(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(MyNorm(4))
    report = gk.patch(model)
    assert type(model[0]) is MyNorm
    assert report.left == [("0", "MyNorm", "a subclass with its own forward")]

    class ResettingNorm(nn.LayerNorm):  # a method of its own, which the swapped class would keep running
        def reset_parameters(self):
            super().reset_parameters()

    class PlainDropout(nn.Dropout):
        pass

    report = gk.patch(nn.Sequential(ResettingNorm(4), PlainDropout()))
    assert report.left == [
        ("0", "ResettingNorm", "a subclass of LayerNorm with more than __init__ of its own (reset_parameters)"),
        ("1", "PlainDropout", "a subclass of Dropout: only exact classes are swapped"),
    ]


class NoBiasLayerNorm(nn.LayerNorm):  # timm's MetaFormer LayerNormNoBias
    def __init__(self, features: int, **kwargs):
        super().__init__(features, **kwargs)
        self.eps = kwargs.get("eps", 1e-6)
        self.bias = None


class PlainRMSNorm(nn.RMSNorm):
    pass


def test_norm_subclasses_adding_only_init_are_swapped(monkeypatch):
    """They run the base's forward on their own state (NoBiasLayerNorm's eps and no bias, which
    float64 tells apart): ours runs on it too, still an instance of theirs."""
    torch.manual_seed(0)
    plain = nn.Sequential(NoBiasLayerNorm(16), nn.Linear(16, 16), PlainRMSNorm(16, eps=1e-5)).double()
    model = copy.deepcopy(plain)
    report = gk.patch(model)
    assert report.swapped == [("0", "NoBiasLayerNorm", "LayerNorm"), ("2", "PlainRMSNorm", "RMSNorm")]
    assert isinstance(model[0], NoBiasLayerNorm) and isinstance(model[2], PlainRMSNorm)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    outputs = []
    for m in (plain, model):
        y = m(x)
        y.square().sum().backward()
        outputs.append((y, x.grad, *(p.grad for p in m.parameters())))
        x.grad = None
    for ours, theirs in zip(*outputs, strict=True):
        assert_matches(ours, theirs)
    restored = pickle.loads(pickle.dumps(model))
    monkeypatch.setattr(gk_patch, "_REPLACEMENTS", {})  # as a new process, which makes the replacement again
    again = pickle.loads(pickle.dumps(model))
    for copied in (restored, again):
        assert type(copied[0]).__name__ == "NoBiasLayerNorm" and type(copied[0]).forward is gnn.LayerNorm.forward
        assert_matches(copied(x), outputs[1][0])
    gk.unpatch(model)
    assert [type(m) for m in model] == [NoBiasLayerNorm, nn.Linear, PlainRMSNorm]


def test_hooks_on_swapped_norm_keep_running():
    model = nn.Sequential(nn.LayerNorm(4))
    calls = []
    model[0].register_forward_hook(lambda *a: calls.append(1))
    gk.patch(model)
    assert type(model[0]) is gnn.LayerNorm
    model(torch.randn(2, 4))
    assert calls == [1]


class MLPBlock(nn.Module):
    """The common transformer MLP: activation as a module attribute."""

    def __init__(self, d=8, functional=False):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d)
        self.gate = nn.Linear(d, d)
        self.functional = functional

    def forward(self, x):
        h = torch.nn.functional.silu(self.gate(x)) if self.functional else self.gate(x)
        return self.fc2(self.act(self.fc1(x))) + h


class Untraceable(nn.Module):
    """Data-dependent control flow: FX cannot trace this forward, but can its blocks."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([MLPBlock(), MLPBlock(functional=True)])

    def forward(self, x):
        for block in self.blocks:
            if x.sum() > -1e9:
                x = block(x)
        return x


def test_mlp_block_patterns_are_fused_by_tracing_the_forward():
    model = Untraceable()
    x = torch.randn(5, 8)
    expected = model(x)
    report = gk.patch(model)
    for block in model.blocks:
        assert type(block.fc1) is gnn.LinearAct and block.fc1.activation == "gelu_tanh"
        assert type(block.act) is gnn.FusedActivation
        assert type(block.gate) is nn.Linear and type(block.fc2) is nn.Linear
    left = {name: why for name, _, why in report.left}
    assert "goes to silu" in left["blocks.1.gate"]  # F.silu is a function call, not a module to fuse
    torch.testing.assert_close(model(x), expected)
    gk.unpatch(model)
    assert all(type(b.act) is nn.GELU and type(b.fc1) is nn.Linear for b in model.blocks)
    torch.testing.assert_close(model(x), expected)


def test_activation_module_used_twice_is_not_fused():
    class TwiceAct(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.act = nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU()

        def forward(self, x):
            return self.act(self.fc2(self.act(self.fc1(x))))

    model = TwiceAct()
    report = gk.patch(model)
    assert type(model.fc1) is nn.Linear and type(model.act) is nn.ReLU
    assert {name for name, _, why in report.left if "shared" in why} == {"fc1", "fc2"}


def test_activation_module_also_held_in_a_dict_is_not_fused():
    """A module called through a plain dict (not the module tree) is the same object: fusing
    it would leave that call applying the activation a second time."""

    class ActInDict(LinearAndGELU):
        def __init__(self):
            super().__init__()
            self.table = {"act": self.act}

        def forward(self, x):
            return self.table["act"](self.fc(x))

    model = ActInDict()
    x = torch.randn(2, 4)
    expected = model(x)
    report = gk.patch(model)
    assert type(model.fc) is nn.Linear and "shared" in dict((n, why) for n, _, why in report.left)["fc"]
    torch.testing.assert_close(model(x), expected)


class Attention(nn.Module):
    """Data-dependent control flow: its forward does not trace."""

    def __init__(self, d=8):
        super().__init__()
        self.qkv = nn.Linear(d, d)

    def forward(self, x):
        h = self.qkv(x)
        return h if h.sum() > 0 else -h


class Block(nn.Module):
    """An attention that does not trace beside an MLP in the same forward (OPT's decoder layer)."""

    def __init__(self, d=8):
        super().__init__()
        self.attn, self.fc1, self.act, self.fc2 = Attention(d), nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.fc2(self.act(self.fc1(x)))


def test_a_submodule_that_does_not_trace_leaves_the_rest_of_the_forward_traced():
    model = Block()
    x = torch.randn(3, 8)
    expected = model(x)
    report = gk.patch(model)
    assert type(model.fc1) is gnn.LinearAct and type(model.act) is gnn.FusedActivation
    left = {name: why for name, _, why in report.left}
    assert left["attn.qkv"] == (
        "the forward of attn did not trace "
        "(TraceError: symbolically traced variables cannot be used as inputs to control flow)"
    )
    torch.testing.assert_close(model(x), expected)


def test_what_a_forward_that_did_not_trace_did_before_failing_is_not_fused():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), nn.GELU()

        def forward(self, x):
            a = self.fc(x)
            b = self.act(a)
            return b if b.sum() > 0 else a  # a feeds more than the activation: fusing would change it

    model = nn.Sequential(nn.Linear(4, 4), Inner())
    x = torch.randn(2, 4)
    expected = model(x)
    report = gk.patch(model)
    assert type(model[1].fc) is nn.Linear and type(model[1].act) is nn.GELU
    assert dict((n, why) for n, _, why in report.left)["1.fc"].startswith("the forward of 1 did not trace")
    torch.testing.assert_close(model(x), expected)


def test_control_flow_on_an_optional_argument_is_not_taken_for_its_default():
    class KeepsPreActivation(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), nn.SiLU()

        def forward(self, x, keep_pre_activation=False):
            h = self.fc(x)
            return (self.act(h), h) if keep_pre_activation else self.act(h)

    model = KeepsPreActivation()
    report = gk.patch(model)
    assert type(model.fc) is nn.Linear
    assert "did not trace" in dict((n, why) for n, _, why in report.left)["fc"]


class LinearAndGELU(nn.Module):
    """A Linear and a GELU, for a forward to call."""

    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(4, 4), nn.GELU()


class ActivatedInTraining(LinearAndGELU):
    def forward(self, x):
        h = self.fc(x)
        return self.act(h) if self.training else h


class ActivatedWhenScaled(LinearAndGELU):
    def forward(self, x, scale=None):
        h = self.fc(x)
        if scale is not None:  # traced as given: the argument is a placeholder
            return self.act(h) * scale
        return h


@pytest.mark.parametrize(
    "make, path",
    [
        (ActivatedInTraining, "in the other of train and eval mode"),
        (ActivatedWhenScaled, "with its optional arguments at their defaults"),
    ],
)
@pytest.mark.parametrize("training", [True, False])
def test_a_map_activated_on_one_path_of_the_forward_only_is_not_fused(make, path, training):
    """A forward traces one path: a Linear whose output goes to the activation on it alone
    (in training, or when an optional argument is given) stays unfused, whichever mode the
    model is patched in, and every path gives what it gave."""
    model = make().train(training)
    x = torch.randn(2, 4)
    paths = [dict(), dict(scale=2.0)] if make is ActivatedWhenScaled else [dict()]
    expected = [model.train(mode)(x, **kwargs) for mode in (True, False) for kwargs in paths]
    report = gk.patch(model.train(training))
    assert type(model.fc) is nn.Linear and type(model.act) is nn.GELU
    why = dict((n, why) for n, _, why in report.left)["fc"]
    assert path in why or (not training and make is ActivatedInTraining and "not to an activation module" in why)
    for (mode, kwargs), want in zip([(m, k) for m in (True, False) for k in paths], expected):
        torch.testing.assert_close(model.train(mode)(x, **kwargs), want)


def test_an_activation_is_checked_not_trusted():
    act = nn.GELU()
    act.forward = lambda x: torch.relu(x)  # an instance's forward replaced: the class is only a claim
    model = nn.Sequential(nn.Linear(4, 4), act)
    report = gk.patch(model)
    assert type(model[0]) is nn.Linear
    assert dict((n, why) for n, _, why in report.left)["1"].startswith("its math differs from gelu (max error")


def test_rms_norm_is_swapped():
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(6, 8), nn.RMSNorm(8, eps=1e-6))
    model = copy.deepcopy(original)
    assert gk.patch(model).counts == {"RMSNorm": 1}
    assert type(model[1]) is gnn.RMSNorm
    x = torch.randn(4, 6)
    torch.testing.assert_close(model(x), original(x))


def test_patch_imports_none_of_transformers_timm_torchvision():
    code = (
        "import sys, torch, gpukernels as gk; "
        "gk.patch(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.LayerNorm(2))); "
        "print(sorted(m for m in ('transformers', 'timm', 'torchvision') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# timm cannot be installed beside this torch (it pulls torchvision): its two LayerNorm classes, as timm
# (timm/layers/norm.py, with fast_norm.py's helpers) defines them, stand in for it under its module name.
_TIMM_NORM_SOURCE = '''
import torch
import torch.nn as nn
import torch.nn.functional as F

_USE_FAST_NORM = False


def is_fast_norm():
    return _USE_FAST_NORM


def fast_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    if torch.jit.is_scripting():
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    dt = torch.get_autocast_dtype(x.device.type)
    x, weight, bias = x.to(dt), weight.to(dt), bias.to(dt) if bias is not None else None
    with torch.amp.autocast(device_type=x.device.type, enabled=False):
        x = F.layer_norm(x, normalized_shape, weight, bias, eps)
    return x


class LayerNorm(nn.LayerNorm):
    """ LayerNorm w/ fast norm option
    """
    _fast_norm: torch.jit.Final[bool]

    def __init__(self, num_channels, eps=1e-6, affine=True, **kwargs):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, **kwargs)
        self._fast_norm = is_fast_norm()  # can't script unless we have these flags here (no globals)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fast_norm:
            x = fast_layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        else:
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x


class LayerNorm2d(nn.LayerNorm):
    """ LayerNorm for channels of '2D' spatial NCHW tensors """
    _fast_norm: torch.jit.Final[bool]

    def __init__(self, num_channels, eps=1e-6, affine=True, **kwargs):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, **kwargs)
        self._fast_norm = is_fast_norm()  # can't script unless we have these flags here (no globals)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        if self._fast_norm:
            x = fast_layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        else:
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x
'''


@pytest.fixture
def timm_norm(monkeypatch):
    module = types.ModuleType("timm.layers.norm")
    exec(compile(_TIMM_NORM_SOURCE, "timm/layers/norm.py", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, "timm.layers.norm", module)
    return module


class ConvNeXtish(nn.Module):
    def __init__(self, timm_norm):
        super().__init__()
        self.conv, self.norm2d = nn.Conv2d(3, 8, 3, padding=1), timm_norm.LayerNorm2d(8)
        self.norm, self.fc = timm_norm.LayerNorm(8), nn.Linear(8, 4)

    def forward(self, x):
        h = self.norm2d(self.conv(x)).mean((2, 3))
        return self.fc(self.norm(h))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_timm_layer_norms_are_swapped_with_the_same_math(timm_norm, dtype):
    torch.manual_seed(0)
    original = ConvNeXtish(timm_norm).to(dtype)
    with torch.no_grad():
        for p in original.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # weights and biases not 1 and 0
    model = copy.deepcopy(original)
    report = gk.patch(model)
    assert report.counts == {"LayerNorm2d": 1, "LayerNorm": 1}
    assert isinstance(model.norm2d, timm_norm.LayerNorm2d) and type(model.norm2d) is not timm_norm.LayerNorm2d
    assert list(model.state_dict()) == list(original.state_dict())
    x = torch.randn(2, 3, 5, 5, dtype=dtype)
    out, expected = model(x), original(x)
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    for a, b in zip(model.parameters(), original.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    gk.unpatch(model)
    assert type(model.norm2d) is timm_norm.LayerNorm2d and type(model.norm) is timm_norm.LayerNorm
    assert torch.equal(model(x), original(x))


def test_timm_fast_norm_is_left_with_its_reason(timm_norm):
    timm_norm._USE_FAST_NORM = True
    model = nn.Sequential(timm_norm.LayerNorm(8))
    report = gk.patch(model)
    assert type(model[0]) is timm_norm.LayerNorm
    assert report.left == [
        ("0", "LayerNorm", "timm's fast norm is on: it computes in the autocast dtype (or with apex)")
    ]


def test_torch_activations_no_map_feeds_are_not_reported():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2), nn.SiLU())
    report = gk.patch(model)
    assert {name for name, _, _ in report.left} == set()
    assert report.counts == {"BatchNorm2d": 1, "LinearAct": 1}


class TwoIdentities(nn.Module):
    """A Linear's output through two nn.Identity modules (timm's disabled drop_block and anti-aliasing) to a GELU."""

    def __init__(self, keep: bool):
        super().__init__()
        self.fc, self.drop, self.aa, self.act = nn.Linear(4, 4), nn.Identity(), nn.Identity(), nn.GELU()
        self.keep = keep  # the first Identity's output also added to the result: the GELU cannot be fused

    def forward(self, x):
        h = self.drop(self.fc(x))
        y = self.act(self.aa(h))
        return y + h if self.keep else y


@pytest.mark.parametrize("keep", [False, True], ids=["fused", "output-kept"])
def test_a_linear_fuses_through_identity_modules_unless_one_gives_its_output_elsewhere_too(keep):
    torch.manual_seed(0)
    original = TwoIdentities(keep)
    model = copy.deepcopy(original)
    report = gk.patch(model)
    assert type(model.fc) is (nn.Linear if keep else gnn.LinearAct)
    assert type(model.act) is (nn.GELU if keep else gnn.FusedActivation)
    if keep:
        assert report.left == [
            ("fc", "Linear", "its output is used 2 times, not by one activation module"),
            ("act", "GELU", "its input's map fc was left (see it)"),
        ]
    else:
        assert report.swapped == [("fc", "Linear+GELU", "LinearAct")] and report.left == []
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), original(x))


@pytest.mark.parametrize("change", ["wrapped", "replaced"])
def test_a_fused_linear_wrapped_or_replaced_after_patch_gets_its_activation_after_it(change):
    """A Linear that gk.patch fused its GELU into, then wrapped (peft's LoRA applied after patch adds
    its term to the Linear's output, before the activation) or replaced (a quantizer's swap): the
    Linear computes without the GELU and the module left in the GELU's place applies it, as the
    unpatched model with the same change computes; unpatch then puts the GELU back."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)).double()
    patched = copy.deepcopy(plain)
    gk.patch(patched)
    fused = patched[0]
    assert gnn.fused_in_place(fused) and type(patched[1]) is gnn.FusedActivation
    for model in (plain, patched):
        torch.manual_seed(1)
        model[0] = LoRA(model[0]) if change == "wrapped" else nn.Linear(6, 8, dtype=torch.float64)
    assert not gnn.fused_in_place(fused)
    x = torch.randn(5, 6, dtype=torch.float64)
    outputs = []
    for model in (plain, patched):
        y = model(x)
        y.square().sum().backward()
        outputs.append((y, [p.grad for p in model.parameters()]))
    (y_plain, grads_plain), (y_patched, grads_patched) = outputs
    torch.testing.assert_close(y_patched, y_plain)
    for a, b in zip(grads_patched, grads_plain, strict=True):
        torch.testing.assert_close(a, b)
    gk.unpatch(patched)
    assert type(patched[1]) is nn.GELU and all(type(m) is not gnn.LinearAct for m in patched.modules())
    torch.testing.assert_close(patched(x), y_plain)


def test_a_copy_of_a_patched_model_keeps_its_fused_activations():
    """deepcopy and pickling remap the place each fused map keeps to the copy's: still fused.
    A copy of the map alone (peft's modules_to_save) copies no more than the map."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.SiLU(), nn.Linear(8, 3)).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    expected = model(x)
    gk.patch(model)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert copied[0].fused_at.parent() is copied and copied[1].map_module is copied[0]
        assert gnn.fused_in_place(copied[0])
        torch.testing.assert_close(copied(x), expected)
    alone = copy.deepcopy(model[0])
    assert alone.fused_at.parent() is model and not gnn.fused_in_place(alone)
    layer = model[0]
    del model, copied
    gc.collect()  # the model's undo records hold it in a cycle
    pickled = pickle.loads(pickle.dumps(layer))  # its model gone: a place nothing holds
    assert not gnn.fused_in_place(pickled) and not gnn.fused_in_place(layer)
