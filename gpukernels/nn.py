"""Drop-in modules. Each subclasses its ``torch.nn`` namesake, so constructor
arguments, parameter and buffer names (and so state_dicts) and ``isinstance``
checks are PyTorch's; only ``forward`` runs our ops. ``FusedActivation`` is
what ``gk.patch`` leaves in the place of an activation module it fused into the
layer before it.

A ``LayerNorm`` or ``RMSNorm`` of ours (or a transformers RMSNorm ``gk.patch``
converted) whose ``feeds_matmuls`` attribute is true returns, under autocast, the
autocast dtype rather than fp32: what the matmuls its output goes to would cast
it to, rounded once by the norm's kernel, so that neither the fp32 result nor the casts' passes (one per matmul, and the
casts of their gradients back) exist. Its gradient then comes in that dtype:
the matmuls' gradients are summed in it rather than in fp32. ``gk.patch`` sets it
on the norms of transformer blocks whose output goes only to the block's
attention or MLP projections."""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from .ops._checks import autocast_dtype, check_choice
from .ops.add_norm import add_layer_norm, add_rms_norm
from .ops.batch_norm import batch_norm
from .ops.cross_entropy import REDUCTIONS, cross_entropy
from .ops.dropout import dropout
from .ops.layer_norm import layer_norm
from .ops.linear_act import ACTIVATIONS, linear_act
from .ops.linear_cross_entropy import linear_cross_entropy
from .ops.norm_add import layer_norm_add, rms_norm_add
from .ops.rms_norm import rms_norm

__all__ = [
    "LinearAct",
    "LayerNorm",
    "RMSNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "Dropout",
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "HiddenStatesHead",
    "FusedHeadLoss",
]


def module_state(module: torch.nn.Module, table: dict, *names: str) -> tuple:
    """The module's parameters or buffers ``names`` (None where registered as None), read
    from ``table`` (its ``_parameters`` or ``_buffers``): read as attributes, each fails the
    ordinary lookup before ``Module.__getattr__`` finds it, about 7k host instructions.
    One kept apart from the table (a parametrization) is read as the attribute it is."""
    try:
        return tuple(map(table.__getitem__, names))  # no Python frame a name (host time)
    except KeyError:
        return tuple(table[name] if name in table else getattr(module, name) for name in names)


def _NO_PARENT() -> None:
    return None


class Place:
    """Where ``gk.patch`` found a module it fused work into: its parent and its name there. The
    parent is held weakly, so that a copy of the module alone (peft's ``modules_to_save``
    deep-copies a layer) does not copy the model with it; a copy of the model gets a place in
    the copied parent (deepcopy copies a parent before its children), a pickle of it too."""

    __slots__ = ("parent", "name")

    def __init__(self, parent: torch.nn.Module | None, name: str):
        # None: a pickle of the layer made once its model was gone (a place nothing holds)
        self.parent = _NO_PARENT if parent is None else weakref.ref(parent)
        self.name = name

    def holds(self, module: torch.nn.Module) -> bool:
        parent = self.parent()
        return parent is not None and parent._modules.get(self.name) is module

    def __deepcopy__(self, memo: dict) -> "Place":
        parent = self.parent()
        return self if parent is None else Place(memo.get(id(parent), parent), self.name)

    def __reduce__(self):
        return Place, (self.parent(), self.name)


def fused_in_place(module: torch.nn.Module) -> bool:
    """Whether ``module``, a layer ``gk.patch`` fused work into (a Linear, transformers' Conv1D or a
    BatchNorm whose op applies the activation module after it; a causal LM's output layer whose
    loss takes its input), is still where patch found it (its ``fused_at``, a ``Place``). Once
    another module has taken its place (wrapping or replacing it), the fused work is given back:
    the ``FusedActivation`` left in the activation's place applies it, the loss reads logits.
    A layer built with an activation, not fused by patch, has no place to keep."""
    place = module.__dict__.get("fused_at")
    return place is None or place.holds(module)


class FusedActivation(torch.nn.Module):
    """What ``gk.patch`` leaves in the place of an activation module it fused into the map
    before it (a Linear, transformers' Conv1D, a BatchNorm, whose op now applies it): passes its
    input on while that map is where patch found it (``fused_in_place``). Once another module has
    taken the map's place (peft's LoRA layer wrapping it and adding its own term to the map's
    output, torch's ``convert_sync_batchnorm`` or a quantizer replacing it), the map computes
    without the activation and this module applies it, so the model computes what it did before
    patch either way (the activation after the wrapper's sum, where an activation fused into the
    map would come before it). ``unpatch`` puts the activation module back."""

    def __init__(self, activation: torch.nn.Module, map_module: torch.nn.Module):
        super().__init__()
        # plain attributes, not submodules: the map is registered in its own place, and the
        # module tree (named_modules, state_dict keys) stays the model's
        self.__dict__["act"] = activation
        self.__dict__["map_module"] = map_module

    def forward(self, input: Tensor) -> Tensor:
        return input if fused_in_place(self.map_module) else self.act(input)

    def extra_repr(self) -> str:
        return f"{type(self.act).__name__}, applied by the {type(self.map_module).__name__} before it"


class LinearAct(torch.nn.Linear):
    """``activation(nn.Linear(x))`` as one op (``gpukernels.linear_act``); ``activation`` is one of
    ``none, relu, gelu, gelu_tanh, silu, quick_gelu, relu_squared``."""

    def __init__(
        self, in_features: int, out_features: int, activation: str = "none", bias: bool = True, device=None, dtype=None
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = check_choice("activation", activation, ACTIVATIONS)

    def forward(self, input: Tensor) -> Tensor:
        activation = self.activation if fused_in_place(self) else "none"
        return linear_act(input, *module_state(self, self._parameters, "weight", "bias"), activation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"


def matmul_input_dtype(norm: torch.nn.Module, input: Tensor, residual: Tensor | None = None) -> torch.dtype | None:
    """The dtype ``norm`` returns for ``input`` (plus ``residual``) when it feeds matmuls
    (``norm.feeds_matmuls``, see the module doc) under autocast: the autocast dtype; else
    None (the op's own)."""
    if not norm.__dict__.get("feeds_matmuls"):
        return None
    if input.dtype == torch.float64 or (residual is not None and residual.dtype == torch.float64):
        return None  # autocast leaves fp64 as it is
    return autocast_dtype(input)


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` with our op. ``norm(input, residual)`` returns
    ``(norm(residual + input), residual + input)`` in one op (``add_layer_norm``): a
    pre-norm block's residual addition and its next norm, as ``gk.patch`` calls it;
    ``norm(input, add_to=residual)`` returns ``residual + norm(input)`` in one op
    (``layer_norm_add``): a post-norm block's norm and the residual addition after it."""

    def forward(
        self, input: Tensor, residual: Tensor | None = None, *, add_to: Tensor | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        weight, bias = module_state(self, self._parameters, "weight", "bias")
        if add_to is not None:
            return layer_norm_add(input, add_to, self.normalized_shape, weight, bias, self.eps)
        out_dtype = matmul_input_dtype(self, input, residual)
        if residual is not None:
            return add_layer_norm(input, residual, self.normalized_shape, weight, bias, self.eps, out_dtype=out_dtype)
        return layer_norm(input, self.normalized_shape, weight, bias, self.eps, out_dtype=out_dtype)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with our op; ``norm(input, residual)`` and ``norm(input,
    add_to=residual)`` as LayerNorm's (``add_rms_norm``, ``rms_norm_add``)."""

    def forward(
        self, input: Tensor, residual: Tensor | None = None, *, add_to: Tensor | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        (weight,) = module_state(self, self._parameters, "weight")
        if add_to is not None:
            return rms_norm_add(input, add_to, self.normalized_shape, weight, self.eps)
        out_dtype = matmul_input_dtype(self, input, residual)
        if residual is not None:
            return add_rms_norm(input, residual, self.normalized_shape, weight, self.eps, out_dtype=out_dtype)
        return rms_norm(input, self.normalized_shape, weight, self.eps, out_dtype=out_dtype)


class BatchNormForward:
    """``torch.nn.modules.batchnorm._BatchNorm.forward`` with our op: the
    same momentum / cumulative-average / track_running_stats rules. A mixin
    of BatchNorm1d, BatchNorm2d and ``distributed.SyncBatchNorm``, not in
    ``__all__``. ``activation`` (none, relu, gelu, gelu_tanh, silu, quick_gelu, relu_squared; an attribute,
    not a parameter or buffer) is applied to the output by the same kernels:
    ``act(BatchNorm(x))``, as ``gk.patch`` sets it where an activation module
    takes a BatchNorm's output alone."""

    activation = "none"

    def forward(self, input: Tensor) -> Tensor:
        return self.fused(input, self.activation if fused_in_place(self) else "none")

    def fused(self, input: Tensor, activation: str, residual: Tensor | None = None) -> Tensor:
        """``activation(BatchNorm(input) + residual)`` (``residual`` optional) as one op, the
        module's state kept as its forward keeps it: how the forward of a ResNet block that
        ``gk.patch`` converted ends its block (``bn3.fused(x, "relu", shortcut)``)."""
        self._check_input_dim(input)
        try:  # module_state's reads inline: a ResNet-50 step runs 53 of these, host-bound (0.8% of its host count)
            params, buffers = self._parameters, self._buffers
            weight, bias = params["weight"], params["bias"]
            running_mean, running_var = buffers["running_mean"], buffers["running_var"]
            batches = buffers["num_batches_tracked"]
        except KeyError:  # one kept apart from them (a parametrization)
            weight, bias = module_state(self, self._parameters, "weight", "bias")
            running_mean, running_var, batches = module_state(
                self, self._buffers, "running_mean", "running_var", "num_batches_tracked"
            )
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and batches is not None:
            batches.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(batches)
        use_batch_stats = self.training or (running_mean is None and running_var is None)
        keep_running = not self.training or self.track_running_stats
        return batch_norm(
            input,
            running_mean if keep_running else None,
            running_var if keep_running else None,
            weight,
            bias,
            use_batch_stats,
            momentum,
            self.eps,
            activation,
            residual,
        )

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        return extra if self.activation == "none" else f"{extra}, activation={self.activation!r}"


class _BatchNormAct(BatchNormForward):
    """BatchNorm1d's and BatchNorm2d's constructor: torch's arguments, then ``activation``."""

    def __init__(self, *args, activation: str = "none", **kwargs):
        super().__init__(*args, **kwargs)
        self.activation = check_choice("activation", activation, ACTIVATIONS)


class BatchNorm1d(_BatchNormAct, torch.nn.BatchNorm1d):
    pass


class BatchNorm2d(_BatchNormAct, torch.nn.BatchNorm2d):
    pass


class Dropout(torch.nn.Dropout):
    """Inverted dropout whose mask is regenerated in the backward (nothing
    stored). ``seed=None`` draws a fresh seed from torch's generator on each
    call; a fixed ``seed`` gives the same mask on every call and backend."""

    def __init__(self, p: float = 0.5, inplace: bool = False, seed: int | None = None):
        super().__init__(p, inplace)
        self.seed = seed

    def forward(self, input: Tensor) -> Tensor:
        out = dropout(input, self.p, self.training, self.seed)
        # The backward needs neither input nor output, so writing the result
        # over the input is safe for autograd.
        return input.copy_(out) if self.inplace and out is not input else out


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing)


class LinearCrossEntropyLoss(torch.nn.Module):
    """``gpukernels.linear_cross_entropy`` as a loss module:
    ``forward(input, weight, target, bias=None)`` is
    ``cross_entropy(softcap(input @ weight.T + bias), target)`` (+ z-loss), taken a
    chunk of rows at a time, never holding the logits."""

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
    ):
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size

    def forward(self, input: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None) -> Tensor:
        return linear_cross_entropy(
            input,
            weight,
            target,
            bias,
            self.ignore_index,
            self.reduction,
            self.label_smoothing,
            self.z_loss,
            self.softcap,
            self.chunk_size,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}, "
            f"chunk_size={self.chunk_size}"
        )


class HiddenStatesHead(torch.nn.Linear):
    """An ``nn.Linear`` whose forward returns its input (the hidden states): a model's
    output layer once ``gpukernels.fuse_linear_cross_entropy`` has moved its matmul
    into the loss. Its parameters, and so the state_dict, are the Linear's."""

    def forward(self, input: Tensor) -> Tensor:
        return input


class FusedHeadLoss(torch.nn.Module):
    """``loss(head(input), target)`` from the hidden states ``input``, for a head made a
    ``HiddenStatesHead`` by ``gpukernels.fuse_linear_cross_entropy``."""

    def __init__(self, head: torch.nn.Linear, loss: LinearCrossEntropyLoss):
        super().__init__()
        self.loss = loss
        self.__dict__["head"] = head  # not a submodule: its parameters stay the model's alone

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return self.loss(input, self.head.weight, target, self.head.bias)
