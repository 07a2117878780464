import copy

import pytest
import torch
from torch import nn

import gpukernels as gk
from gpukernels import nn as gnn


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(),
        nn.Linear(16, 16), nn.GELU(),
        nn.Linear(16, 16), nn.GELU(approximate="tanh"),
        nn.Linear(16, 16), nn.SiLU(),
        nn.LayerNorm(16), nn.Dropout(0.0),
        nn.Linear(16, 16), nn.Tanh(),          # not a supported activation: left
        nn.Linear(16, 16), nn.BatchNorm1d(16),  # not followed by an activation: left
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
    assert swapped == {"0": "LinearAct", "2": "LinearAct", "4": "LinearAct", "6": "LinearAct", "8": "LayerNorm",
                       "9": "Dropout", "13": "BatchNorm1d"}
    assert [model[i].activation for i in (0, 2, 4, 6)] == ["relu", "gelu", "gelu_tanh", "silu"]
    assert all(type(model[i]) is nn.Identity for i in (1, 3, 5, 7))
    left = {name: why for name, _, why in report.left}
    assert set(left) == {"10", "12", "14"} and "not followed" in left["10"]
    assert "swapped 7" in str(report) and "left 3" in str(report)


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
    assert report.left == [("0", "MyNorm", "subclass of a torch layer: its forward may differ")]


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
        assert type(block.act) is nn.Identity
        assert type(block.gate) is nn.Linear and type(block.fc2) is nn.Linear
    left = {name: why for name, _, why in report.left}
    assert "not followed" in left["blocks.1.gate"]  # F.silu is a function call, not a module to fuse
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
