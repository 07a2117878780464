"""The models the main job trains, all from random weights (nothing downloaded)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ArgumentError
from ._deps import install_hint, optional, require


class Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


def build_model(hidden: int, blocks: int, dropout: float, classes: int = 10, features: int = 64) -> nn.Module:
    """An MLP with every layer gpukernels replaces: Linear+ReLU, BatchNorm1d,
    then pre-norm residual blocks (LayerNorm, Linear+GELU, Linear, Dropout)."""
    layers = [nn.Linear(features, hidden), nn.ReLU(), nn.BatchNorm1d(hidden)]
    for _ in range(blocks):
        layers.append(
            Residual(
                nn.Sequential(
                    nn.LayerNorm(hidden),
                    nn.Linear(hidden, 4 * hidden),
                    nn.GELU(),
                    nn.Linear(4 * hidden, hidden),
                    nn.Dropout(dropout),
                )
            )
        )
    layers += [nn.LayerNorm(hidden), nn.Linear(hidden, classes)]
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1x1 reduce, 3x3 (carries the stride), 1x1 expand by 4.
    A ReLU module for each of its three activations, as timm's (torchvision's calls one
    three times), so that gk.patch fuses bn1 and bn2 with theirs."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = nn.ReLU()
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.act3 = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        return self.act3(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """Bottleneck ResNet (torchvision's layout, with timm's activation modules: one per
    activation): ``blocks=(3, 4, 6, 3), width=64`` is ResNet-50."""

    def __init__(self, blocks=(3, 4, 6, 3), width: int = 64, classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages, channels = [], width
        for stage, count in enumerate(blocks):
            stage_width = width * 2**stage
            for block in range(count):
                stages.append(Bottleneck(channels, stage_width, stride=2 if stage > 0 and block == 0 else 1))
                channels = stage_width * Bottleneck.expansion
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if isinstance(module, Bottleneck):
                nn.init.zeros_(module.bn3.weight)  # each block starts as the identity (timm's zero_init_last)

    def forward(self, x):
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(self.layers(x)), 1))


def build_resnet(blocks: tuple[int, ...], width: int, classes: int) -> tuple[nn.Module, str]:
    """ResNet-50 from timm, else torchvision, else ours; any other size is ours.
    Returns the model and where its definition came from."""
    if tuple(blocks) == (3, 4, 6, 3) and width == 64:
        timm = optional("timm")
        if timm is not None:
            return timm.create_model("resnet50", pretrained=False, num_classes=classes), "timm resnet50"
        torchvision = optional("torchvision")
        if torchvision is not None:
            return torchvision.models.resnet50(weights=None, num_classes=classes), "torchvision resnet50"
        return ResNet(blocks, width, classes), (
            "gpukernels.train.models.ResNet (ResNet-50 layout; timm and "
            f"torchvision not importable, for timm's: {install_hint('timm')})"
        )
    return ResNet(blocks, width, classes), f"gpukernels.train.models.ResNet (blocks {tuple(blocks)}, width {width})"


# transformers causal LMs of Llama's layout, built from the same sizes (``--model``: config class, model class)
LLAMA_LAYOUTS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),  # q/k norms
    # q/k norms, a norm after each branch too, GeGLU (tanh), scaled embeddings tied to the head, sliding-window layers
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}
LANGUAGE_MODELS = ("gpt2", *LLAMA_LAYOUTS)


def language_model_source(kind: str) -> str:
    return f"transformers {'GPT2LMHeadModel' if kind == 'gpt2' else LLAMA_LAYOUTS[kind][1]}"


def build_language_model(kind: str, cfg: dict) -> nn.Module:
    """A transformers causal LM (``gpt2``: GPT2LMHeadModel; ``LLAMA_LAYOUTS``: Llama's,
    Qwen3's, Gemma 3's) from a config; dropout is 0 so every way computes the same
    function. Token 0 is the corpus's end-of-text (special tokens come first in the
    trained vocabulary). No KV cache (``use_cache=False``), which a training step has no
    use for: with one, each attention layer's forward copies its keys and values into it
    (a patched Llama step on the H200 ran 24 such copies, 3.9 ms, and held them to its end)."""
    transformers = require("transformers", f"--model {kind}")
    common = dict(vocab_size=cfg["vocab"], bos_token_id=0, eos_token_id=0, use_cache=False)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            n_positions=cfg["seq_len"],
            n_embd=cfg["width"],
            n_layer=cfg["layers"],
            n_head=cfg["heads"],
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
        model = transformers.GPT2LMHeadModel(config)
        model.loss_type = "ForCausalLM"  # transformers infers it from the class name, which GPT-2's lacks
        return model
    if kind not in LLAMA_LAYOUTS:
        raise ArgumentError(f"unknown language model {kind!r}")
    config_class, model_class = LLAMA_LAYOUTS[kind]
    head_dim = cfg["width"] // cfg["heads"]  # Qwen3's and Gemma 3's own default is wider
    config = getattr(transformers, config_class)(
        hidden_size=cfg["width"],
        intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"],
        head_dim=head_dim,
        max_position_embeddings=cfg["seq_len"],
        **(dict(query_pre_attn_scalar=head_dim, pad_token_id=0) if kind == "gemma3" else {}),
        **common,
    )
    return getattr(transformers, model_class)(config)
