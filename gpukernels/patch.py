"""Swap the torch.nn layers of an existing model for ours, in place.

Modules are converted by changing their class to our subclass of the same
torch class, so parameters, buffers, hooks and the module objects themselves
(and so optimizer references and state_dict keys) stay exactly as they were.
An ``nn.Linear`` whose output goes only, and straight, into a ReLU/GELU/SiLU
module as the forward runs them (found by tracing the forward with
``torch.fx``: an ``nn.Sequential``, an MLP block's ``self.act(self.fc1(x))``)
becomes one ``LinearAct`` and the activation module an ``nn.Identity``.
``unpatch`` reverses every change.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx

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


class _Tracer(torch.fx.Tracer):
    """Keeps our modules opaque, as torch.nn's are: only the call sites matter."""

    def is_leaf_module(self, module: torch.nn.Module, qualified_name: str) -> bool:
        return type(module).__module__ == gnn.__name__ or super().is_leaf_module(module, qualified_name)


def _traced_graphs(module: torch.nn.Module, prefix: str = ""):
    """(prefix, FX graph) pairs covering ``module``: its own graph when its
    forward traces, else those of its children, recursively (a forward with
    data-dependent control flow does not trace; the blocks inside it may)."""
    try:
        yield prefix, _Tracer().trace(module)
    except Exception:
        for name, child in module.named_children():
            yield from _traced_graphs(child, f"{prefix}{name}.")


def _linear_act_pairs(model: torch.nn.Module):
    """(linear name, activation name, shared) for each exact ``nn.Linear``
    whose output goes only, and straight, into a ReLU/GELU/SiLU module, as
    the forward runs them (an ``nn.Sequential``, an MLP block's
    ``self.act(self.fc1(x))``, ...). ``shared``: either module is called
    more than once."""
    for prefix, graph in _traced_graphs(model):
        calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
        for node in graph.nodes:
            if node.op != "call_module" or len(node.users) != 1:
                continue
            (user,) = node.users
            if user.op != "call_module" or user.args[:1] != (node,):
                continue
            linear, act = model.get_submodule(prefix + node.target), model.get_submodule(prefix + user.target)
            if type(linear) is torch.nn.Linear and _activation_name(act) is not None:
                yield prefix + node.target, prefix + user.target, calls[node.target] > 1 or calls[user.target] > 1


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
        for linear_name, act_name, shared in _linear_act_pairs(model):
            linear, act = model.get_submodule(linear_name), model.get_submodule(act_name)
            if shared or uses[id(linear)] > 1 or uses[id(act)] > 1:
                report.left.append((linear_name, "Linear",
                                    f"shared module: fusing {type(act).__name__} would change its other uses"))
            elif _has_hooks(linear) or _has_hooks(act):
                report.left.append((linear_name, "Linear", "has hooks that expect the unfused outputs"))
            else:
                linear.__class__ = gnn.LinearAct
                linear.activation = _activation_name(act)
                parent_name, _, key = act_name.rpartition(".")
                parent = model.get_submodule(parent_name)
                setattr(parent, key, torch.nn.Identity())
                undo.append((parent, key, act))
                report.swapped.append((linear_name, f"Linear+{type(act).__name__}", "LinearAct"))

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
            why = ("not followed by a ReLU/GELU/SiLU module in forward" if cls is torch.nn.Linear
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
