"""gk.patch on real timm models (random weights, nothing downloaded): every norm
(and each fc1 + GELU) of ResNet-18/50, ConvNeXt-T, ViT-S, EfficientNet-B0,
MobileNetV3, RegNetY and CAFormer is swapped (timm's BatchNormAct2d with its activation
where ours computes it), each ResNet block ends in one op (its last BatchNorm,
the shortcut's addition and the ReLU), and the patched model's outputs and
gradients equal the unpatched model's in float64. Likewise torchvision's
ResNets, where it imports.

timm cannot be installed beside CI's torch (it pulls torchvision, which fails to
import beside that CPU build), so these run where timm is: the GPU machines'
releases (``ci/test-gpu-machine-versions.sh``), whose image has timm and trains
timm's ResNet-50 in ``python -m gpukernels.train --model resnet50 --preset gpu``."""

import copy
import importlib

import pytest
import torch
from torch import nn

import gpukernels as gk
from helpers import assert_matches, record_calls

timm = pytest.importorskip("timm")


NORM_KINDS = ("BatchNormAct2d", "LayerNormAct2d", "LayerNorm2d", "BatchNorm2d", "LayerNorm")


def _norms(model: nn.Module) -> dict[str, int]:
    """How many modules of each norm class the model holds, by the name of their class or of
    the nearest of ``NORM_KINDS`` it subclasses (MetaFormer's ``LayerNormNoBias``: LayerNorm)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
            kind = next(c.__name__ for c in type(module).__mro__ if c.__name__ in NORM_KINDS)
            counts[kind] = counts.get(kind, 0) + 1
    return counts


# name, input size, channels last, what patch must swap besides every norm
MODELS = [
    ("resnet18", 64, True, {"ResidualBlock": 8}),  # BasicBlocks
    ("resnet50", 64, True, {"ResidualBlock": 16}),  # Bottlenecks
    ("convnext_tiny", 64, False, {"LinearAct": 18}),  # each block's fc1 + timm's GELU
    ("vit_small_patch16_224", 224, False, {"LinearAct": 12, "ResidualNorm": 12}),  # fc1 + GELU; attention + norm2
    # BatchNormAct2d: with SiLU; with ReLU, Hardswish (not ours: run after our BatchNorm) or none
    ("efficientnet_b0", 64, True, {}),
    ("mobilenetv3_large_100", 64, True, {}),
    ("regnety_016", 64, True, {}),
    ("test_efficientnet_ln", 64, False, {}),  # LayerNormAct2d: a LayerNorm2d, then its drop and act
    # MetaFormer: LayerNormNoBias and LayerNorm2dNoBias, nn.LayerNorm's and LayerNorm2d's subclasses setting
    # their bias to None in __init__, nothing else of their own
    ("caformer_s18", 64, False, {"LinearAct": 13}),
]


def _assert_matches_at_scale(ours: torch.Tensor, theirs: torch.Tensor, floor: float = 1e-12) -> None:
    """Equal in float64 to 1e-11 of the tensor's largest element, or ``floor``: summing in another
    order (our kernels', or torch's own in another memory layout) changes the gradients of a deep
    model by about 1e-13 of that (EfficientNet-B0's stem: 2e-10 of 1.8e3, contiguous against
    channels-last, both torch's), past 1e-12 elementwise in its smaller elements; a wrong op errs
    by far more. A gradient that is zero but for rounding (a BatchNorm's bias whose shift the next
    BatchNorm removes: EfficientNet-B0's, 1e-15 to 1e-12, sums of terms up to the model's largest
    gradients) is as far from zero as those terms' rounding: ``floor`` says how far."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, rtol=0, atol=floor + 1e-11 * theirs.abs().max().item())


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
    _assert_matches_at_scale(outputs[1], outputs[0])
    largest = max(p.grad.abs().max().item() for p in plain.parameters())
    for ours, theirs in zip(patched.parameters(), plain.parameters()):
        _assert_matches_at_scale(ours.grad, theirs.grad, floor=max(1e-12, 1e-14 * largest))
    for ours, theirs in zip(patched.buffers(), plain.buffers()):  # BatchNorm's running statistics, its count
        if ours.is_floating_point():
            _assert_matches_at_scale(ours, theirs)
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
    assert type(model.layer1[0].act2) is gk.nn.FusedActivation and model.layer1[0].bn2.activation == "relu"
    # bn3 + shortcut + act3 in the block's forward, its act3 left in place, uncalled
    assert ("layer1.0", "Bottleneck", "ResidualBlock") in report.swapped
    assert type(model.layer1[0].act3) is nn.ReLU and model.layer1[0].bn3.activation == "none"


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_large_100"])
def test_batch_norm_act_fuses_each_activation_of_ours(name):
    """Each BatchNormAct2d whose act is one of ours (relu, silu) applies it in its op; one with another
    (Hardswish) or none (nn.Identity) runs its act module after our BatchNorm."""
    model = timm.create_model(name, pretrained=False, num_classes=10)
    acts = {
        name: module.act
        for name, module in model.named_modules()
        if type(module).__name__ == "BatchNormAct2d" and type(module.drop) is nn.Identity
    }
    ours = {nn.ReLU: "relu", nn.SiLU: "silu"}
    expected = sorted(
        (name, f"BatchNormAct2d+{ours[type(act)]}" if type(act) in ours else "BatchNormAct2d", "BatchNormAct2d")
        for name, act in acts.items()
    )
    assert any(type(act) in ours for act in acts.values()) and any(type(act) not in ours for act in acts.values())
    assert sorted(row for row in gk.patch(model).swapped if row[2] == "BatchNormAct2d") == expected
    for name, act in acts.items():
        assert model.get_submodule(name).activation == ours.get(type(act), "none")
        assert model.get_submodule(name).act is act  # left in place: uncalled when fused


def _gated_mlps():
    from timm.layers.mlp import GluMlp, SwiGLU, SwiGLUPacked

    return {  # name -> (module, input shape)
        "GluMlp, gate first, SiLU (EVA-02's)": (GluMlp(16, 24, act_layer=nn.SiLU, gate_last=False), (2, 5, 16)),
        "GluMlp, gate last, GELU": (GluMlp(16, 24, act_layer=nn.GELU), (2, 5, 16)),
        "GluMlp, gate last, GELU tanh": (GluMlp(16, 24, act_layer=lambda: nn.GELU(approximate="tanh")), (7, 16)),
        "GluMlp of 1x1 convs": (GluMlp(16, 24, act_layer=nn.SiLU, use_conv=True), (2, 16, 3, 3)),
        "SwiGLUPacked": (SwiGLUPacked(16, 24), (2, 5, 16)),
        "SwiGLU": (SwiGLU(16, 12), (2, 5, 16)),
        "SwiGLU with a norm (EVA-02 base's)": (SwiGLU(16, 12, norm_layer=nn.LayerNorm), (2, 5, 16)),
    }


@pytest.mark.parametrize("name", list(_gated_mlps()))
def test_gated_mlps_gate_in_one_op_and_match_in_float64(name):
    """timm's GluMlp (either half the gate, linears or 1x1 convs) and SwiGLU: the gating one op, its
    activation module left uncalled (never fused into the projection before it: the op applies it),
    the children converted as any module's; outputs and gradients as the unpatched module's."""
    torch.manual_seed(0)
    module, shape = _gated_mlps()[name]
    module = module.double()
    for parameter in module.parameters():  # timm's init makes the gate's weights near 0
        nn.init.normal_(parameter, std=0.5)
    patched = copy.deepcopy(module)
    report = gk.patch(patched)
    assert report.counts["GatedMLP"] == 1 and "LinearAct" not in report.counts
    assert patched.activation == ("gelu_tanh" if "tanh" in name else "gelu" if "GELU" in name else "silu")
    assert type(patched.act) is type(module.act)
    if "norm" in name:
        assert type(patched.norm) is gk.nn.LayerNorm
    x = torch.randn(shape, dtype=torch.float64)
    results = []
    for net in (module, patched):
        y = net(x)
        results.append((y, *torch.autograd.grad(y.square().sum(), list(net.parameters()))))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    gk.unpatch(patched)
    assert type(patched) is type(module)


def test_gated_mlp_with_an_activation_of_no_gated_op_is_left():
    from timm.layers.mlp import GluMlp

    report = gk.patch(GluMlp(16, 24))  # the GLU: a sigmoid gate
    assert "GatedMLP" not in report.counts
    why = "act: activation Sigmoid is none of relu/gelu/gelu_tanh/silu/quick_gelu/relu_squared"
    assert ("", "GluMlp", why) in report.left


def test_eva02_gates_every_block_in_one_op_and_matches_in_float64():
    """EVA-02 (GluMlp, gate first: packed; the base's SwiGLU with its LayerNorm), fp64, as the unpatched."""
    for name, counts in (("eva02_tiny_patch14_224", {"GatedMLP": 12}), ("eva02_base_patch14_224", {"GatedMLP": 12})):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=10, img_size=28).double()
        _assert_patched_matches_in_float64(model, 28, False, counts)


@pytest.mark.parametrize("two_d", [False, True], ids=["RmsNorm", "RmsNorm2d"])
@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_swapped_as_close_to_fp64_as_timms(affine, two_d):
    """timm's RmsNorm (over the last dim) and RmsNorm2d (over an NCHW tensor's channels): ours
    computes in fp32 and rounds once where timm's rounds each step in the input's dtype; in fp64
    the same, in fp32 and bf16 within the tests' tolerance of timm's (or as close to the fp64
    result)."""
    from timm.layers.norm import RmsNorm, RmsNorm2d

    torch.manual_seed(0)
    norm = (RmsNorm2d if two_d else RmsNorm)(64, eps=1e-5, affine=affine)
    if affine:
        nn.init.normal_(norm.weight)
    ours = copy.deepcopy(norm)
    assert gk.patch(ours).counts == {"RMSNorm2d" if two_d else "RMSNorm": 1}
    x = 3 * torch.randn((4, 64, 5, 3) if two_d else (4, 5, 64), dtype=torch.float64)
    reference = norm.double()(x)
    torch.testing.assert_close(ours.double()(x), reference, rtol=1e-14, atol=1e-14)
    for dtype in (torch.float32, torch.bfloat16):
        with torch.no_grad():
            assert_matches(ours.to(dtype)(x.to(dtype)), norm.to(dtype)(x.to(dtype)), reference.detach())


@pytest.mark.parametrize(
    "name, kind", [("LayerNormAct", "LayerNormAct"), ("LayerNormAct2d", "LayerNormAct2d"),
                   ("RmsNormAct", "RMSNormAct"), ("RmsNormAct2d", "RMSNormAct2d")],
)  # fmt: skip
def test_norm_act_runs_our_norm_then_its_drop_and_act(name, kind):
    """timm's norm + activation modules (MobileNetV5's RmsNormAct2d, ViTamin's LayerNormAct2d):
    our norm, then their drop and act modules (a GELU here), in fp64 as timm's."""
    from timm.layers import norm_act

    torch.manual_seed(0)
    module = getattr(norm_act, name)(16, act_layer=nn.GELU).double()
    nn.init.normal_(module.weight)
    ours = copy.deepcopy(module)
    assert gk.patch(ours).counts == {kind: 1}
    x = 3 * torch.randn((2, 16, 5, 3) if name.endswith("2d") else (2, 5, 16), dtype=torch.float64)
    x_ours = x.clone().requires_grad_()
    x_theirs = x.clone().requires_grad_()
    y_ours, y_theirs = ours(x_ours), module(x_theirs)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-13, atol=1e-13)
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.weight.grad, module.weight.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "module, name",
    [("norm", "RmsNorm"), ("norm", "RmsNorm2d")]
    + [("norm_act", name) for name in ("LayerNormAct", "LayerNormAct2d", "RmsNormAct", "RmsNormAct2d")],
)
def test_norm_with_fast_norm_is_left(module, name):
    from timm.layers import fast_norm

    enabled = fast_norm.is_fast_norm()
    fast_norm.set_fast_norm(True)
    try:
        norm = getattr(importlib.import_module(f"timm.layers.{module}"), name)(8)
    finally:
        fast_norm.set_fast_norm(enabled)
    report = gk.patch(norm)
    assert not report.swapped and report.left[0][2].startswith("timm's fast norm is on")


@pytest.mark.parametrize(
    "name, options",
    [
        ("vit_small_patch14_dinov2", dict(img_size=28)),  # LayerScale on each branch
        ("deit3_small_patch16_224", dict(img_size=32, drop_path_rate=0.5)),  # LayerScale, stochastic depth
        ("eva02_tiny_patch14_224", dict(img_size=28, init_values=0.1, drop_path_rate=0.5)),  # EvaBlock, gammas
        ("swin_tiny_patch4_window7_224", dict(img_size=56, drop_path_rate=0.5)),  # (B, H, W, C) tokens
    ],
)
def test_vit_blocks_add_and_normalise_in_one_op_as_timms_in_float64(name, options, monkeypatch):
    """timm's ViT, EVA and Swin blocks: the attention branch (through its LayerScale or gamma and
    DropPath, drawn in the block's order) added to the residual stream and ``norm2`` applied in one
    op, once a block a forward; in training, seed for seed, what timm's blocks compute."""
    gk_patch = importlib.import_module("gpukernels.patch")  # the module: gk.patch is the function
    torch.manual_seed(0)
    plain = timm.create_model(name, pretrained=False, num_classes=10, **options).double()
    patched = copy.deepcopy(plain)
    assert gk.patch(patched).counts["ResidualNorm"] == 12
    calls = record_calls(monkeypatch, gk_patch, "_add_then_norm", lambda norm, *rest: type(norm))
    x = torch.randn(2, 3, options["img_size"], options["img_size"], dtype=torch.float64)
    outputs = []
    for model in (plain, patched):
        model.train()
        torch.manual_seed(1)
        y = model(x)
        y.square().sum().backward()
        outputs.append(y)
    assert len(calls) == 12 and all(gk_patch._takes_residual(cls) for cls in calls)
    _assert_matches_at_scale(outputs[1], outputs[0])
    for theirs, ours in zip(plain.parameters(), patched.parameters()):
        _assert_matches_at_scale(ours.grad, theirs.grad)
    torch.manual_seed(2)  # another seed drops other paths: the stochastic depth is in effect
    assert options.get("drop_path_rate") is None or not torch.equal(patched(x), outputs[1])


def test_vit_block_left_where_its_forward_or_hooks_differ(monkeypatch):
    from timm.models.vision_transformer import Block

    model = nn.Sequential(Block(16, 2), Block(16, 2))
    model[0].norm2.register_forward_hook(lambda *args: None)
    left = {n: why for n, _, why in gk.patch(model).left}
    assert "has hooks (norm2)" in left["0"] and "1" not in left

    def forward(self, x, attn_mask=None, is_causal=False):  # the attention's output scaled: another block
        x = x + 0.5 * self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    monkeypatch.setattr(Block, "forward", forward)
    left = {n: why for n, _, why in gk.patch(nn.Sequential(Block(16, 2))).left}
    assert "is not the one read" in left["0"]


def test_aimv2_layout_patches_every_norm_and_mlp_and_matches_in_float64():
    """AIMv2's ViT (RmsNorm, SwiGLU with SiLU), two blocks: every RmsNorm and gated MLP swapped."""
    torch.manual_seed(0)
    model = timm.create_model(
        "aimv2_large_patch14_224", pretrained=False, img_size=28, depth=2, embed_dim=32, num_heads=2, num_classes=5
    ).double()
    for parameter in model.parameters():  # SwiGLU's init makes the gate's weights near 0
        nn.init.normal_(parameter, std=0.3)
    patched = copy.deepcopy(model)
    counts = gk.patch(patched).counts
    assert counts["RMSNorm"] == 6 and counts["GatedMLP"] == 2
    x = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    results = []
    for net in (model, patched):
        y = net(x)
        results.append((y, *torch.autograd.grad(y.square().sum(), list(net.parameters()))))
    for ours, theirs in zip(*results):
        _assert_matches_at_scale(ours, theirs)


def test_torchvision_convnext_swaps_every_norm_and_matches_in_float64():
    """torchvision's ConvNeXt: its LayerNorm2d (stem, downsampling), each block's LayerNorm and fc1 + GELU.
    Without stochastic depth, whose random draws would differ between the two models' runs."""
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = models.convnext_tiny(weights=None, num_classes=10, stochastic_depth_prob=0.0).double()
    _assert_patched_matches_in_float64(model, 64, False, {"LinearAct": 18})


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


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "convnext_atto"])
def test_a_patched_model_pickles_whole(name):
    """torch.save of the whole patched model (its ResNet blocks', BatchNormAct2d's and
    LayerNorm2d's replacement classes are made at run time): the copy loaded is patched
    and computes the same outputs and gradients."""
    import io

    model = timm.create_model(name).to(torch.float64)
    gk.patch(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    results = []
    for net in (model, loaded):
        y = net(x)
        results.append((y, *torch.autograd.grad(y.sum(), list(net.parameters()))))
    for ours, theirs in zip(*results):
        assert torch.equal(ours, theirs)
