"""Swap the torch.nn layers of an existing model for ours, in place.

Modules are converted by changing their class to our subclass of the same
torch class, so parameters, buffers, hooks and the module objects themselves
(and so optimizer references and state_dict keys) stay exactly as they were.
An ``nn.Linear`` directly followed by ReLU/GELU/SiLU inside an
``nn.Sequential`` becomes one ``LinearAct`` and the activation an
``nn.Identity``. ``unpatch`` reverses every change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import nn as gnn

# Only these exact classes are converted: a user's subclass may have its own forward.
_SWAPS = {
    torch.nn.LayerNorm: gnn.LayerNorm,
    torch.nn.BatchNorm1d: gnn.BatchNorm1d,
    torch.nn.BatchNorm2d: gnn.BatchNorm2d,
    torch.nn.Dropout: gnn.Dropout,
    torch.nn.CrossEntropyLoss: gnn.CrossEntropyLoss,
}
_OURS = {ours: theirs for theirs, ours in _SWAPS.items()} | {gnn.LinearAct: torch.nn.Linear,
                                                              gnn.HiddenStatesHead: torch.nn.Linear}


def _activation_name(module: torch.nn.Module) -> str | None:
    if type(module) is torch.nn.ReLU:
        return "relu"
    if type(module) is torch.nn.SiLU:
        return "silu"
    if type(module) is torch.nn.GELU:
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    return None


@dataclass
class PatchReport:
    """What ``patch`` changed: ``swapped`` rows are (module name, old, new);
    ``left`` rows are (module name, class, why it was left)."""

    swapped: list[tuple[str, str, str]] = field(default_factory=list)
    left: list[tuple[str, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"swapped {len(self.swapped)} module(s):"]
        lines += [f"  {name or '<root>'}: {old} -> {new}" for name, old, new in self.swapped]
        if self.left:
            lines.append(f"left {len(self.left)} module(s):")
            lines += [f"  {name or '<root>'}: {cls} ({why})" for name, cls, why in self.left]
        return "\n".join(lines)


def _has_hooks(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def patch(model: torch.nn.Module, fuse_linear_act: bool = True) -> PatchReport:
    """Convert ``model``'s layers to gpukernels' in place; returns a report.
    Patching an already patched model changes nothing."""
    report = PatchReport()
    undo = model.__dict__.setdefault("_gpukernels_undo", [])
    uses: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        uses[id(module)] = uses.get(id(module), 0) + 1

    if fuse_linear_act:
        for parent_name, parent in model.named_modules():
            if type(parent) is not torch.nn.Sequential:
                continue
            children = list(parent.named_children())
            for (lin_key, linear), (act_key, act) in zip(children, children[1:]):
                activation = _activation_name(act)
                if type(linear) is not torch.nn.Linear or activation is None:
                    continue
                name = f"{parent_name}.{lin_key}".lstrip(".")
                if uses[id(linear)] > 1 or uses[id(act)] > 1:
                    report.left.append((name, "Linear", f"shared module: fusing {type(act).__name__} would change its other uses"))
                elif _has_hooks(linear) or _has_hooks(act):
                    report.left.append((name, "Linear", "has hooks that expect the unfused outputs"))
                else:
                    linear.__class__ = gnn.LinearAct
                    linear.activation = activation
                    setattr(parent, act_key, torch.nn.Identity())
                    undo.append((parent, act_key, act))
                    report.swapped.append((name, f"Linear+{type(act).__name__}", "LinearAct"))

    reported = {name for name, _, _ in report.left}
    for name, module in model.named_modules():
        cls = type(module)
        if cls in _SWAPS:
            module.__class__ = _SWAPS[cls]
            if cls is torch.nn.Dropout:
                module.seed = None
            report.swapped.append((name, cls.__name__, _SWAPS[cls].__name__))
        elif cls in _OURS:
            continue  # already ours
        elif name in reported:
            continue
        elif isinstance(module, tuple(_SWAPS)) or cls is torch.nn.Linear:
            why = ("not followed by ReLU/GELU/SiLU in an nn.Sequential" if cls is torch.nn.Linear
                   else "subclass of a torch layer: its forward may differ")
            report.left.append((name, cls.__name__, why))
    return report


def fuse_linear_cross_entropy(model: torch.nn.Module, head: str, loss: torch.nn.CrossEntropyLoss,
                              **options) -> gnn.FusedHeadLoss:
    """Opt-in: fuse ``model``'s output layer ``head`` (the name of an exact ``nn.Linear``
    whose output, the logits, goes to ``loss``) with ``loss``, so the logits are never
    held. The head becomes a ``HiddenStatesHead``, which returns the hidden states, and
    the returned module computes ``loss(head(hidden), target)`` from them with
    ``gpukernels.linear_cross_entropy``: train with ``fused(model(x), target)``.
    Whatever the model does between the head and its output must act on rows alone
    (reshapes, slices, ``.float()``). ``options``: ``z_loss``, ``softcap``,
    ``chunk_size``. ``unpatch(model)`` restores the head; parameters and state_dict
    keys never change."""
    linear = model.get_submodule(head)
    if type(linear) is not torch.nn.Linear:
        raise TypeError(f"head {head!r} must name an nn.Linear, got {type(linear).__name__}")
    if type(loss) not in (torch.nn.CrossEntropyLoss, gnn.CrossEntropyLoss):
        raise TypeError(f"loss must be an nn.CrossEntropyLoss, got {type(loss).__name__}")
    if loss.weight is not None:
        raise ValueError("loss has class weights, which linear_cross_entropy does not take")
    fused = gnn.FusedHeadLoss(linear, gnn.LinearCrossEntropyLoss(loss.ignore_index, loss.reduction,
                                                                 loss.label_smoothing, **options))
    linear.__class__ = gnn.HiddenStatesHead
    return fused


def unpatch(model: torch.nn.Module) -> None:
    """Undo ``patch``: torch classes back, fused activations back in place."""
    for module in model.modules():
        if type(module) in _OURS:
            module.__class__ = _OURS[type(module)]
            module.__dict__.pop("activation", None)
            module.__dict__.pop("seed", None)
    for parent, key, act in reversed(model.__dict__.pop("_gpukernels_undo", [])):
        setattr(parent, key, act)
