"""What differs between models: building one, its batches, its loss as each way
computes it, and its evaluation. Every way of one task sees the same batches."""

from __future__ import annotations

import contextlib
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..patch import PatchReport, patch
from ._deps import install_hint, require
from .data import batch_order, digit_images, load_digits, stdlib_tokens
from .models import LANGUAGE_MODELS, build_language_model, build_model, build_resnet, language_model_source

LABEL_SMOOTHING = 0.05  # classifiers' loss, every way


# A layer's index in a module path (h.3.attn, layers.11): a model's layers are left for one reason
_LAYER_INDEX = re.compile(r"(?<=[A-Za-z_])\.\d+(?!\w)")


def summarize(report) -> str:
    """One line for a patch report: swaps counted by kind, left modules by reason (with the
    layer indices in the reason's module paths as ``*``: one count for every layer)."""
    if not isinstance(report, PatchReport):
        return str(report)
    swaps = Counter(f"{old}->{new}" if old != new else new for _, old, new in report.swapped)
    left = Counter(f"{cls} ({_LAYER_INDEX.sub('.*', why)})" for _, cls, why in report.left)
    text = f"swapped {len(report.swapped)}: " + (", ".join(f"{k} x{n}" for k, n in swaps.items()) or "nothing")
    if left:
        text += f"; left {len(report.left)}: " + ", ".join(f"{k} x{n}" for k, n in left.items())
    if report.feeding_matmuls:
        text += f"; {len(report.feeding_matmuls)} norms in the autocast dtype (only projections read them)"
    return text


@contextlib.contextmanager
def _module_globals_restored(module):
    """Liger's apply_liger_kernel_to_* also replaces functions and classes in the
    transformers modeling module (RoPE, RMSNorm): put them back after its run."""
    saved = dict(vars(module))
    try:
        yield
    finally:
        for name, value in saved.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)


class LanguageModelTask:
    """Next-token prediction on the stdlib corpus; ``model(input_ids=ids, labels=ids).loss``
    (transformers shifts the labels), as Liger's patched forward also takes it."""

    unit = "tokens"

    def __init__(self, kind: str, cfg: dict, device: torch.device, seed: int, cache_dir: Path):
        require("transformers", f"--model {kind}")  # before the tokenizer's minutes, not after
        self.kind, self.cfg, self.device = kind, cfg, device
        self.data = stdlib_tokens(cfg["vocab"], cfg["corpus_bytes"], cache_dir)
        seq_len = cfg["seq_len"]
        windows = self.data.tokens.size // seq_len
        tokens = torch.from_numpy(self.data.tokens[: windows * seq_len].astype(np.int64))
        self.windows = tokens.view(windows, seq_len)
        self.order = batch_order(windows, cfg["batch_size"], cfg["steps"], seed)
        self.units_per_step = cfg["batch_size"] * seq_len
        self.source = language_model_source(kind)
        # Liger's function for the model: Gemma 3's text-only model has its own
        self.liger_patch = f"apply_liger_kernel_to_{'gemma3_text' if kind == 'gemma3' else kind}"

    def describe(self) -> dict:
        return {"data": self.data.describe(), "model_source": self.source}

    def build(self) -> nn.Module:
        return build_language_model(self.kind, self.cfg)

    def batch(self, step: int) -> tuple[torch.Tensor, ...]:
        return (self.windows[self.order[step]].to(self.device),)

    def plain(self, model: nn.Module):
        return lambda ids: model(input_ids=ids, labels=ids).loss

    def gpukernels(self, model: nn.Module, **options):
        """gpukernels' layers and fused LM loss: ``patch(model, loss="fused", **options)``
        (``loss="logits"`` in ``options``: the logits, then our cross_entropy)."""
        return self.plain(model), summarize(patch(model, **{"loss": "fused", **options}))

    def liger_unavailable(self) -> str | None:
        try:
            import liger_kernel.transformers as liger
        except ImportError as error:
            return f"liger_kernel is not importable ({error}): {install_hint('liger_kernel')}"
        if not hasattr(liger, self.liger_patch):
            return f"Liger-Kernel has no {self.liger_patch}"
        if self.device.type != "cuda":
            return "Liger-Kernel's Triton kernels need a CUDA device"
        return None

    def liger(self, model: nn.Module, stack: contextlib.ExitStack):
        import liger_kernel.transformers as liger

        stack.enter_context(_module_globals_restored(sys.modules[type(model).__module__]))
        getattr(liger, self.liger_patch)(model=model)
        return self.plain(model), f"liger_kernel.transformers.{self.liger_patch}(model=model)"

    def evaluate(self, model: nn.Module) -> dict:
        return {}


class ClassifierTask:
    """scikit-learn's digits: ``mlp`` on the 64 pixels, ``resnet50`` on 3-channel resized images."""

    def __init__(self, kind: str, cfg: dict, device: torch.device, seed: int, input_dtype: torch.dtype):
        self.kind, self.cfg, self.device, self.input_dtype = kind, cfg, device, input_dtype
        (self.x, self.y), (self.test_x, self.test_y) = load_digits(device, seed)
        self.order = batch_order(len(self.x), cfg["batch_size"], cfg["steps"], seed)
        self.units_per_step = cfg["batch_size"]
        if kind == "mlp":
            self.unit, self.source = "samples", "gpukernels.train.models.build_model (residual MLP)"
        else:
            self.unit, self.source = "images", None  # known once built
        self.memory_format = torch.channels_last if cfg.get("channels_last") else torch.contiguous_format

    def describe(self) -> dict:
        data = {"data": "scikit-learn digits", "train": len(self.x), "test": len(self.test_x)}
        if self.kind != "mlp":
            data["image_size"] = self.cfg["image_size"]
        return {"data": data, "model_source": self.source}

    def build(self) -> nn.Module:
        if self.kind == "mlp":
            return build_model(self.cfg["hidden"], self.cfg["blocks"], self.cfg["dropout"])
        model, self.source = build_resnet(self.cfg["blocks"], self.cfg["width"], classes=10)
        return model.to(memory_format=self.memory_format)

    def _inputs(self, rows: torch.Tensor) -> torch.Tensor:
        if self.kind != "mlp":
            rows = digit_images(rows, self.cfg["image_size"], self.memory_format)
        return rows.to(self.input_dtype)

    def batch(self, step: int) -> tuple[torch.Tensor, ...]:
        idx = self.order[step].to(self.device)
        return self._inputs(self.x[idx]), self.y[idx]

    def plain(self, model: nn.Module):
        loss = nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
        return lambda x, y: loss(model(x), y)

    def gpukernels(self, model: nn.Module, **options):
        report = patch(model, **options)
        loss = nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
        report.swapped += [("loss", old, new) for _, old, new in patch(loss).swapped]
        return (lambda x, y: loss(model(x), y)), summarize(report)

    def liger_unavailable(self) -> str | None:
        return "Liger-Kernel patches transformers language models only"

    def evaluate(self, model: nn.Module) -> dict:
        """Test accuracy, in eval mode (BatchNorm running statistics, no dropout)."""
        model.eval()
        correct = 0
        with torch.no_grad():
            for start in range(0, len(self.test_x), self.cfg["batch_size"]):
                x = self._inputs(self.test_x[start : start + self.cfg["batch_size"]])
                correct += (model(x).argmax(1) == self.test_y[start : start + len(x)]).sum().item()
        return {"accuracy": correct / len(self.test_x)}


def make_task(kind: str, cfg: dict, device: torch.device, seed: int, cache_dir: Path, input_dtype: torch.dtype):
    if kind in LANGUAGE_MODELS:
        return LanguageModelTask(kind, cfg, device, seed, cache_dir)
    return ClassifierTask(kind, cfg, device, seed, input_dtype)
