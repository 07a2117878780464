"""Swap the layers of an existing model for ours, in place.

A module is converted by changing its class to a subclass of that class
whose forward runs our ops, so parameters, buffers, hooks, ``isinstance``
and the module objects themselves (and so optimizer references and
state_dict keys) stay exactly as they were. Only exact classes are
converted, each to a replacement with the same math (tests/test_patch*.py
check each against the class it replaces): a subclass may have its own
forward. A norm's subclass with nothing of its own but ``__init__`` (other
defaults, a bias set to None: timm's MetaFormer norms) runs its base's
forward on its own state, and is converted as its base is. Recognised:

- torch.nn: LayerNorm, RMSNorm, BatchNorm1d/2d, Dropout, CrossEntropyLoss.
- An ``nn.Linear``, transformers' ``Conv1D`` (GPT-2's Linear with its weight
  stored transposed) or an ``nn.BatchNorm1d``/``2d`` whose output goes only,
  and straight (through ``nn.Identity`` modules at most: timm's disabled
  drop_block), into an activation module computing relu, gelu, gelu_tanh,
  silu, quick_gelu or relu_squared, as the forward runs them (found by tracing it with
  ``torch.fx``; on every path traced: as the model is, in the other of train
  and eval mode, and with the forwards' optional arguments at their
  defaults), fuses with it: the Linear becomes one LinearAct, the
  BatchNorm ours with its ``activation`` set, and the activation module a
  ``FusedActivation``, which applies it again if another module takes the
  map's place (peft's LoRA wrapping a fused Linear, convert_sync_batchnorm
  replacing a BatchNorm). A BatchNorm that cannot fuse (its activation module called
  elsewhere too) is swapped unfused. Activation modules: torch's
  ReLU/GELU/SiLU and the transformers and timm classes claiming that math
  (quick_gelu: their QuickGELU, CLIP's; relu_squared: transformers'
  ReLUSquaredActivation), each checked on a probe before it
  is fused.
- torchvision's ConvNeXt LayerNorm2d, when already imported.
- ResNet blocks, timm's and torchvision's ``BasicBlock`` and ``Bottleneck``
  (when already imported; ``gpukernels.train``'s ``Bottleneck`` too): the
  block's forward ends with its last BatchNorm, the shortcut's addition and
  the ReLU in one op (``bn.fused(x, "relu", shortcut)``); torchvision's,
  whose one ReLU module serves the whole block, also fuses its other
  BatchNorms with their ReLU. The block's children are converted as any
  module's.
- transformers, when already imported: the RMSNorms of Llama, Mistral,
  Mixtral, Qwen2/Qwen3 (their MoE and VL models too), Gemma 1-4 (Gemma 3n's by
  its code), Phi-3, Granite, SmolLM3, OLMo 2, GLM, GLM-4 (and -MoE), DeepSeek-V3,
  gpt-oss and Llama 4, and those without a weight (Llama 4's qk norms, NanoChat's)
  (``rms_norm`` in their variant; those rounding back to their
  input's dtype return it under autocast too, as theirs), Cohere's LayerNorm (``layer_norm`` without
  a bias), OLMo's (without parameters, rounded back to its input's dtype), their gated
  MLPs ``down(act(gate(x)) * up(x))`` (``swiglu`` / ``geglu`` between the
  projections, which run as they are), the gating of MoE experts whose
  ``_apply_gate`` is transformers' default (packed ``swiglu`` / ``geglu`` of the
  up projection's halves, under the ``grouped_mm`` and ``batched_mm``
  implementations; their batched products as they are), the rotary embedding of queries and keys in every transformers
  attention whose module's ``apply_rotary_pos_emb`` computes one form of ours
  (halves or interleaved pairs rotated, of whole heads or of part; q and k in
  one call, or one tensor a call: Gemma 3n's and 4's) on a probe
  of each call ours takes (the attention's own forward, that function ours
  where the shapes fit: theirs at a call with other arguments), and the loss
  of causal LMs (``loss="logits"``: any whose forward calls transformers'
  ForCausalLMLoss; ``loss="fused"``: those listed in
  ``_CAUSAL_LMS``, where the loss soft-caps the logits for Gemma 2-4); and
  every other transformers class of the model whose code is one of those
  classes' (``_same_code``: transformers copies a module into the next
  model's file; its forward, the methods of its own that the forward calls
  and the wrappers around it compile to the same code reading the same
  globals), as that class is (OLMo 3, Ministral, Seed-OSS, ERNIE 4.5,
  Hunyuan, Exaone 4, Qwen3.5, ... and copies to come). In their
  blocks (and GPT-2's, GPT-NeoX's, Phi's, StableLM's) the norms whose output goes only to the attention's or
  the MLP's projections return the autocast dtype under autocast
  (``autocast_norms``; ``_NORMS_BEFORE_MATMULS``, and the Llama-form blocks
  whose attention or MLP runs the code of one there). Pre-norm blocks whose
  forward is Llama's, Gemma 2's or GLM-4's (a norm after each branch too), Phi-3's
  (a dropout on each branch), Granite's (each branch scaled; MiniCPM3's, HyperCLOVA X's Peri-LN with
  a norm after each branch, Granite MoE's and Granite 4's too: an MoE, a shared MLP, a Mamba layer in
  the attention's place where the layer has one), Llama 4's (its MoE's output a pair), Gemma 4's text
  layer (an MoE beside the MLP, an input of its own, the output scaled), StableLM's (without a parallel
  residual) or Qwen3.5's and Qwen3-Next's hybrid layers (a linear attention in the attention's place by
  ``block_type``), or Llama's with its norms named otherwise (CLIP's and SigLIP's encoder layers, text
  and vision towers alike, and the ~45 classes copied from them: BLIP, AltCLIP, Idefics 3, ...;
  Apertus's, VaultGemma's, Jamba's attention layers; Falcon-H1's, its Mamba layer and attention side
  by side; PaddleOCR-VL's and VideoLLaMA3's vision layers, which pass the attention its input by
  position, as the replacement then does) (a name
  the forward never reads, such as the attention's weights, and the order of a sum of two names
  aside: Llama 3.2 Vision's self-attention layers, BLIP's vision layers)
  (``_PRE_NORM_FORMS``, checked on the source of every
  transformers class of the model that calls Llama's children) or GPT-2's
  add the attention's output to the residual stream and normalise the sum for
  the MLP in one op (``add_rms_norm`` / ``add_layer_norm``) where that norm is
  converted to ours, as do ViT's layers, NomicBERT's, GTE's and Jina v3's post-norm layers, and BERT's
  post-norm outputs (``BertSelfOutput``,
  ``BertOutput``: the residual addition and the LayerNorm after it), and the classes whose
  forward is theirs (``_SOURCE_BLOCKS``); the block's children are converted as any module's.
- timm, when already imported: its LayerNorm, LayerNorm2d, RmsNorm (AIMv2's; Llama's
  rounding, ``_timm_rms_norm_forward``) and RmsNorm2d, and their norm + activation
  classes (LayerNormAct, LayerNormAct2d: ViTamin's; RmsNormAct, RmsNormAct2d:
  MobileNetV5's, Gemma 3n's vision tower: our norm, then their drop and act); its gated MLPs,
  GluMlp (SwiGLUPacked's) and SwiGLU (EVA-02, DINOv2-style ViTs), gating
  in one op (``swiglu`` / ``geglu``: packed where the gate is the first half),
  their projections, dropouts and norm converted as any module's; its
  BatchNormAct2d (EfficientNet, MobileNet, RegNet: a BatchNorm2d, then its
  ``drop`` and ``act`` modules) becomes our BatchNorm applying the activation
  in its op where ``act`` is one of ours and ``drop`` an nn.Identity, else
  running them after it; its ViT, EVA and Swin blocks (ViT, DeiT, DINOv2, EVA-02, Swin:
  ``_TIMM_BLOCKS``, each forward checked to be the one read) add the attention branch to the
  residual stream and apply ``norm2`` in one op (``add_layer_norm``), as the transformers
  blocks above.

None of transformers, timm and torchvision is imported here: their classes
are looked up in ``sys.modules`` only (but for a model holding transformers
classes: then the modeling modules of the families read are imported, the
classes its own are matched against). ``unpatch`` reverses every change.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import dis
import functools
import importlib
import inspect
import pickle
import sys
import textwrap
import types
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NamedTuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor

from . import nn as gnn
from .errors import ArgumentError, ArgumentTypeError
from .ops._checks import PLAIN_TENSOR_TYPES, autocast_enabled, check_choice
from .ops.add_norm import add_layer_norm, add_rms_norm
from .ops.cross_entropy import cross_entropy
from .ops.gated_act import ACTIVATIONS as GATED_ACTIVATIONS
from .ops.gated_act import geglu, swiglu
from .ops.layer_norm import layer_norm
from .ops.linear_act import linear_act
from .ops.linear_cross_entropy import linear_cross_entropy
from .ops.norm_add import layer_norm_add, rms_norm_add
from .ops.rms_norm import rms_norm
from .ops.rope import apply_rotary_pos_emb

LOSS_MODES = ("logits", "fused")

# Attributes patch sets on a module it converts (the forward reads them); unpatch removes them.
_SET_ATTRIBUTES = ("activation", "gated_activation", "fused_at", "seed", "defer_logits", "softcap", "feeds_matmuls")


def _keep_own_attributes(undo: list, module: torch.nn.Module) -> None:
    """Before ``module`` is converted: its own values of the attributes patch sets, which
    ``unpatch`` removes, to be put back after (Qwen3.5's gated RMSNorm has an ``activation``)."""
    own = module.__dict__
    undo.extend((module, key, own[key]) for key in _SET_ATTRIBUTES if key in own)


def _nothing_to_set(module: torch.nn.Module) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class _Rule:
    """How one exact class is converted: to ``replacement``, counted as ``kind``.
    ``prepare(module)`` returns the attributes the replacement's forward reads, or
    a string saying why this module must stay as it is. ``opaque``: the replacement
    runs its children inside its op (a gated MLP's activation), so they are neither
    traced nor converted; else they are, as any module's (an attention's norms).
    ``bypassed``: children whose work the replacement does itself (``prepare`` checks
    it is the same), left in place and not reported; ``in_op``: those of them that its op
    computes from another child's output (timm's gated MLPs' activation, called nowhere
    else), which no map before them may fuse. ``residual_norm`` (a block's): the child norm
    its replacement hands the residual; the block is left where that norm is not converted
    to one of ours, which take it (``_takes_residual``)."""

    replacement: type
    kind: str
    prepare: Callable[[torch.nn.Module], dict[str, Any] | str] = _nothing_to_set
    opaque: bool = True
    bypassed: tuple[str, ...] = ()
    in_op: tuple[str, ...] = ()
    residual_norm: str = ""


_TORCH_RULES = {
    torch.nn.LayerNorm: _Rule(gnn.LayerNorm, "LayerNorm"),
    torch.nn.RMSNorm: _Rule(gnn.RMSNorm, "RMSNorm"),
    torch.nn.BatchNorm1d: _Rule(gnn.BatchNorm1d, "BatchNorm1d"),
    torch.nn.BatchNorm2d: _Rule(gnn.BatchNorm2d, "BatchNorm2d"),
    torch.nn.Dropout: _Rule(gnn.Dropout, "Dropout", lambda module: {"seed": None}),
    torch.nn.CrossEntropyLoss: _Rule(gnn.CrossEntropyLoss, "CrossEntropyLoss"),
}

# Every class patch converts to -> the class it came from.
_ORIGINAL: dict[type, type] = {rule.replacement: cls for cls, rule in _TORCH_RULES.items()} | {
    gnn.LinearAct: torch.nn.Linear,
    gnn.HiddenStatesHead: torch.nn.Linear,
}


_REPLACEMENTS: dict[tuple[type, Callable], type] = {}


def _replacement(cls: type, forward: Callable, **methods: Callable) -> type:
    """``cls`` with ``forward`` (and ``methods``) instead of its own: what a module of a class
    we do not own becomes. One per class and forward; same name, this module's."""
    ours = _REPLACEMENTS.get((cls, forward))
    if ours is None:
        ours = type(
            cls.__name__,
            (cls,),
            {
                "forward": forward,
                **methods,
                "__module__": __name__,
                "__qualname__": cls.__qualname__,
                "__doc__": forward.__doc__,
                "__reduce_ex__": _reduce_replaced,
            },
        )
        _REPLACEMENTS[cls, forward] = ours
        _ORIGINAL[ours] = cls
    return ours


def _reduce_replaced(self, protocol: int):
    """Pickles a module of a replacement class as made again from its original class and its
    forward's name (``_rebuilt``): pickle cannot name a class made at run time."""
    _, _, *state = object.__reduce_ex__(self, max(protocol, 2))  # (copyreg.__newobj__, (class,), state, ...)
    cls = type(self)
    return (_rebuilt, (_ORIGINAL[cls], cls.forward.__qualname__), *state)


def _made_replacement(cls: type, forward_name: str) -> type | None:
    """The replacement of ``cls`` whose forward is named ``forward_name``, if this process made it."""
    for (original, forward), replacement in _REPLACEMENTS.items():
        if original is cls and forward.__qualname__ == forward_name:
            return replacement
    return None


def _rebuilt(cls: type, forward_name: str) -> torch.nn.Module:
    """A new module, its state not set yet, of the replacement of ``cls`` whose forward is named
    ``forward_name``; where this process has not made it yet, making the rules for the modules
    imported (the original's among them) makes it."""
    replacement = _made_replacement(cls, forward_name)
    if replacement is None:
        if cls.__module__.startswith("transformers."):
            _import_read_families()  # the classes ``cls`` may be matched against
        _third_party_rules({cls})
        _residual_block_rules()
        _add_norm_block_rules({cls})
        _init_only_subclass_rules({cls}, _TORCH_RULES | _third_party_rules())
        _batch_norm_act_rules(True)
        _fusable_maps()
        replacement = _made_replacement(cls, forward_name)
    if replacement is None:
        raise pickle.UnpicklingError(
            f"gpukernels cannot make its replacement of {cls.__module__}.{cls.__qualname__} (forward "
            f"{forward_name}) in this process: its rule does not apply to this version of the class"
        )
    return replacement.__new__(replacement)


def _is_ours(module: torch.nn.Module) -> bool:
    return type(module) in _ORIGINAL or type(module) is gnn.FusedActivation


def _loaded(module: str, *names: str) -> list:
    """Attributes of an already imported module (None for each when it is not)."""
    loaded = sys.modules.get(module)
    return [getattr(loaded, name, None) for name in names]


def _first_line(error: BaseException) -> str:
    """The error's type and the first sentence of its first line."""
    lines = str(error).strip().splitlines()
    sentence = lines[0].split(". ")[0].rstrip(".") if lines else ""
    return f"{type(error).__name__}: {sentence}" if sentence else type(error).__name__


def _has_hooks(module: torch.nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or getattr(module, "_backward_pre_hooks", None)
    )


# ---- activations ----------------------------------------------------------------------------------------------

_ACTIVATION_MATH = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
    "quick_gelu": lambda z: z * torch.sigmoid(1.702 * z),
    "relu_squared": lambda z: F.relu(z).square(),
}
_PROBE_TOLERANCE = 1e-6  # below fp32 rounding of the probe's values: FastGELU's 10-digit sqrt(2/pi) passes

# transformers.activations classes and the activation each claims to compute (checked by _activation).
_TRANSFORMERS_ACTIVATIONS = {
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "AccurateGELUActivation": "gelu_tanh",
    "SiLUActivation": "silu",
    "QuickGELUActivation": "quick_gelu",
    "ReLUSquaredActivation": "relu_squared",
}
# timm's own activation classes that compute one of ours (its get_act_layer("gelu") gives its GELU: ConvNeXt's MLPs).
_TIMM_ACTIVATIONS = {"GELU": "gelu", "GELUTanh": "gelu_tanh", "Swish": "silu", "QuickGELU": "quick_gelu"}
_THIRD_PARTY_ACTIVATIONS = {
    "transformers.activations": _TRANSFORMERS_ACTIVATIONS,
    "timm.layers.activations": _TIMM_ACTIVATIONS,
}
_TRANSFORMERS_UNSUPPORTED = {
    "ClippedGELUActivation": "gelu clipped to [min, max]",
    "MishActivation": "x * tanh(softplus(x))",
    "LaplaceActivation": "a Laplace CDF",
    "LinearActivation": "the identity",
    "SqrtSoftplusActivation": "sqrt(softplus(x))",
    "XIELUActivation": "xIELU",
}
_TIMM_UNSUPPORTED = {
    "Mish": "x * tanh(softplus(x))",
    "HardSwish": "x * relu6(x + 3) / 6",
    "HardMish": "x * clamp(x + 2, 0, 2) / 2",
}


def _claimed_activation(module: torch.nn.Module) -> str | None:
    cls = type(module)
    if cls is torch.nn.ReLU:
        return "relu"
    if cls is torch.nn.SiLU:
        return "silu"
    if cls is torch.nn.GELU:
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    claims = _THIRD_PARTY_ACTIVATIONS.get(cls.__module__)
    if claims is not None and cls.__name__ in claims:
        library = sys.modules.get(cls.__module__)  # the class itself, not one of the same name defined elsewhere
        if library is not None and getattr(library, cls.__name__, None) is cls:
            return claims[cls.__name__]
    return None


def _is_activation_module(module: torch.nn.Module) -> bool:
    """A module patch reports on: one it fuses, or a transformers or timm activation."""
    return _claimed_activation(module) is not None or type(module).__module__ in _THIRD_PARTY_ACTIVATIONS


def _activation(module: torch.nn.Module) -> tuple[str | None, str]:
    """(linear_act's name for ``module``'s activation, "") when its forward computes
    one of ours, checked on a float64 probe; else (None, why not)."""
    claimed = _claimed_activation(module)
    if claimed is None:
        math = (
            _TIMM_UNSUPPORTED if type(module).__module__ == "timm.layers.activations" else _TRANSFORMERS_UNSUPPORTED
        ).get(type(module).__name__, "")
        return (
            None,
            f"activation {type(module).__name__}{f' computes {math}:' if math else ' is'} "
            f"none of {'/'.join(_ACTIVATION_MATH)}",
        )
    probe = torch.linspace(-6.0, 6.0, 121, dtype=torch.float64)
    try:
        with torch.no_grad():
            error = (module.forward(probe.clone()) - _ACTIVATION_MATH[claimed](probe)).abs().max().item()
    except Exception as failure:  # a forward that needs more than a CPU float64 tensor: not checkable
        return None, f"its forward could not be checked on a CPU float64 probe ({_first_line(failure)})"
    if not error <= _PROBE_TOLERANCE:
        return None, f"its math differs from {claimed} (max error {error:.1e} on [-6, 6])"
    return claimed, ""


# ---- maps an activation can fuse with -------------------------------------------------------------------------


def _conv1d_act_forward(self, input: Tensor) -> Tensor:
    """transformers' Conv1D (weight stored (in, out)) and its activation in one linear_act."""
    weight, bias = gnn.module_state(self, self._parameters, "weight", "bias")
    return linear_act(input, weight.t(), bias, self.activation if gnn.fused_in_place(self) else "none")


def _fusable_maps() -> dict[type, _Rule]:
    """Exact classes of a map whose output can fuse with an activation -> the rule converting
    one that does (its ``activation`` set): affine maps become a LinearAct, BatchNorms ours,
    which apply the activation to their output in the same kernels."""
    maps = {
        torch.nn.Linear: _Rule(gnn.LinearAct, "LinearAct"),
        torch.nn.BatchNorm1d: _TORCH_RULES[torch.nn.BatchNorm1d],
        torch.nn.BatchNorm2d: _TORCH_RULES[torch.nn.BatchNorm2d],
    }
    (conv1d,) = _loaded("transformers.pytorch_utils", "Conv1D")
    if conv1d is not None:
        maps[conv1d] = _Rule(_replacement(conv1d, _conv1d_act_forward), "LinearAct")
    return maps


def _not_fused_with(map_name: str, why: str, swapped: bool) -> str:
    """Why an activation module is left though a map feeds it: the map's row says why, when
    the map is left too; a map swapped all the same (a BatchNorm) has no such row."""
    if swapped:
        return f"not fused into {map_name}, which was swapped without it: {why}"
    return f"its input's map {map_name} was left (see it)"


# ---- classes whose code is a read class's ----------------------------------------------------------------------
# transformers copies a model's modules into the next model's file ("Copied from", its modular files): the class
# has another name and module, the code is the same. A class whose forward (with the methods of its own it calls,
# and the wrappers around it) compiles to the same code as a class read here, reading the same globals, computes
# what that class computes, so it gets that class's rule: no list of names to keep up, and a class whose code
# changes in a release is left rather than converted on trust.

_NOTHING = object()


@functools.cache
def _code_key(code: types.CodeType, docstring: bool = False) -> tuple:
    """What ``code`` runs: bytecode, constants (``docstring``: the first, a docstring, aside),
    names, and the same of the code nested in it; not its names, file and lines."""
    consts = code.co_consts
    if docstring and consts and isinstance(consts[0], str):
        consts = (None, *consts[1:])
    return (
        code.co_code,
        tuple(_code_key(c) if isinstance(c, types.CodeType) else (type(c), c) for c in consts),
        code.co_names,
        code.co_varnames,
        code.co_freevars,
        code.co_cellvars,
        code.co_argcount,
        code.co_posonlyargcount,
        code.co_kwonlyargcount,
        code.co_flags,
    )


def _cell(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return _NOTHING


def _same_function(f: Any, g: Any, same_globals: bool) -> bool:
    """Whether functions ``f`` and ``g`` run the same code: each ``functools.wraps`` layer
    (transformers' decorators) the same code over the same closure but for the function it
    wraps, and the innermost the same code, defaults and (``same_globals``) globals."""
    if f is g:
        return True
    if not (isinstance(f, types.FunctionType) and isinstance(g, types.FunctionType)):
        return False
    inner_f, inner_g = f.__dict__.get("__wrapped__"), g.__dict__.get("__wrapped__")
    if (
        (inner_f is None) != (inner_g is None)
        or _code_key(f.__code__, docstring=True) != _code_key(g.__code__, docstring=True)
        or f.__defaults__ != g.__defaults__
        or f.__kwdefaults__ != g.__kwdefaults__
    ):
        return False
    if (same_globals or inner_f is not None) and any(
        f.__globals__.get(name, _NOTHING) is not g.__globals__.get(name, _NOTHING) for name in f.__code__.co_names
    ):
        return False
    for a, b in zip(map(_cell, f.__closure__ or ()), map(_cell, g.__closure__ or ())):
        if inner_f is not None and a is inner_f and b is inner_g:
            continue
        if a is not b and not (type(a) is type(b) and type(a) in (str, int, float, bool, tuple) and a == b):
            return False
    return inner_f is None or _same_function(inner_f, inner_g, same_globals)


def _same_code(cls: type, read: type, same_globals: bool = True) -> bool:
    """Whether ``cls``'s forward runs the code of ``read``'s (``_same_function``), and so
    does each method of theirs it calls on ``self`` (Gemma's RMSNorm's ``_norm``).
    ``same_globals=False`` for a dataflow fact only: which calls an argument reaches."""
    seen = set()
    pending = ["forward"]
    while pending:
        name = pending.pop()
        f, g = (inspect.getattr_static(c, name, _NOTHING) for c in (cls, read))
        if f is g:
            continue
        if not _same_function(f, g, same_globals):
            return False
        seen.add(name)
        pending += [n for n in inspect.unwrap(f).__code__.co_names if n not in seen]
    return True


def _same_code_as(cls: type, read: Iterable[type], same_globals: bool = True) -> type | None:
    """The first of the ``read`` classes whose forward ``cls``'s is (``_same_code``), or None."""
    return next((r for r in read if r is cls or _same_code(cls, r, same_globals=same_globals)), None)


def _transformers_classes(model: torch.nn.Module) -> set[type]:
    """The transformers classes of ``model``'s modules, as they were before any patch; where
    there are any, the modeling modules of the families read are imported (once), so that
    their classes are there to be matched against."""
    classes = {c for c in map(_original_class, model.modules()) if c.__module__.startswith("transformers.")}
    if classes:
        _import_read_families()
    return classes


@functools.cache
def _import_read_families() -> None:
    families = {
        model
        for entries in (
            *_RMS_NORMS.values(),
            _GATED_MLPS,
            _ACTIVATION_FN_GATED_MLPS,
            _GATE_UP_MLPS,
            _INPUT_OUTPUT_MLPS,
            _SILU_GATED_MLPS,
            _GATED_RMS_NORMS,
            _ADD_NORM_BLOCKS,
            _NORMS_BEFORE_MATMULS,
            _CAUSAL_LMS,
        )
        for model, _ in entries
    }
    for model in sorted(families):
        with contextlib.suppress(ImportError):  # a family this transformers release lacks
            importlib.import_module(f"transformers.models.{model}.modeling_{model}")


# ---- transformers and timm classes ----------------------------------------------------------------------------


def _rms_norm_variant(
    norm: torch.nn.Module,
    x: Tensor,
    residual: Tensor | None,
    add_to: Tensor | None,
    eps: float,
    input_dtype_under_autocast: bool = False,
    scaled: bool = True,
    **variant,
) -> Tensor | tuple[Tensor, Tensor]:
    """A transformers RMSNorm's forward in its ``variant`` (rms_norm's ``offset`` and
    ``cast_before_weight``): ``rms_norm(x)``; given a residual (a decoder layer's forward
    that ``gk.patch`` converted, ``_add_then_norm``) ``(rms_norm(residual + x), residual + x)``;
    given ``add_to`` (``_norm_then_add``), ``add_to + rms_norm(x)``.
    ``input_dtype_under_autocast``: the result in the dtype of what is normalised under
    autocast too (the norm's own casts: fp32 in, rounded back), where the plain op's is fp32.
    Without ``scaled``, no weight (Gemma 4's ``with_scale=False``)."""
    if scaled:
        (weight,) = gnn.module_state(norm, norm._parameters, "weight")
        shape = weight.shape
    else:
        weight, shape = None, x.shape[-1]
    if add_to is not None:
        rounded = input_dtype_under_autocast and x.dtype != torch.float64 and autocast_enabled(x)
        return rms_norm_add(x, add_to, shape, weight, eps, norm_dtype=x.dtype if rounded else None, **variant)
    out_dtype = gnn.matmul_input_dtype(norm, x, residual)
    if input_dtype_under_autocast and out_dtype is None and autocast_enabled(x):
        normalised = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
        out_dtype = None if normalised == torch.float64 else normalised
    if residual is not None:
        return add_rms_norm(x, residual, shape, weight, eps, out_dtype=out_dtype, **variant)
    return rms_norm(x, shape, weight, eps, out_dtype=out_dtype, **variant)


# Each takes a residual to add before the norm (``_add_then_norm``) or after it (``add_to``: ``_norm_then_add``).
def _variance_epsilon(norm: torch.nn.Module) -> float:
    """A transformers RMSNorm's eps: ``variance_epsilon``, or ``eps`` (Gemma 4's and Llama 4's in 5.17)."""
    state = norm.__dict__
    return state["variance_epsilon"] if "variance_epsilon" in state else state["eps"]


def _llama_rms_norm_forward(self, hidden_states: Tensor, residual: Tensor | None = None, *, add_to=None):
    """Llama's RMSNorm: normalised in fp32, rounded to the input dtype, then times the weight."""
    return _rms_norm_variant(self, hidden_states, residual, add_to, _variance_epsilon(self), cast_before_weight=True)


def _weightless_rms_norm_forward(self, hidden_states: Tensor, residual: Tensor | None = None, *, add_to=None):
    """An RMSNorm without a weight (Llama 4's, NanoChat's): normalised in fp32, rounded to the input
    dtype (under autocast too)."""
    return _rms_norm_variant(
        self, hidden_states, residual, add_to, _variance_epsilon(self), input_dtype_under_autocast=True, scaled=False
    )


def _gemma_rms_norm_forward(self, x: Tensor, residual: Tensor | None = None, *, add_to=None):
    """Gemma's RMSNorm: times (1 + weight) in fp32, then rounded to the input dtype."""
    return _rms_norm_variant(self, x, residual, add_to, self.eps, offset=1.0)


def _olmo2_rms_norm_forward(self, hidden_states: Tensor, residual: Tensor | None = None, *, add_to=None):
    """OLMo 2's RMSNorm: times the weight in fp32, then rounded to the input dtype (under autocast too)."""
    return _rms_norm_variant(
        self, hidden_states, residual, add_to, self.variance_epsilon, input_dtype_under_autocast=True
    )


def _gemma4_rms_norm_forward(self, hidden_states: Tensor, residual: Tensor | None = None, *, add_to=None):
    """Gemma 3n's and 4's RMSNorm: OLMo 2's, without a weight where ``with_scale`` is False."""
    return _rms_norm_variant(
        self,
        hidden_states,
        residual,
        add_to,
        _variance_epsilon(self),
        input_dtype_under_autocast=True,
        scaled=self.with_scale,
    )


def _gated_rms_norm_forward(self, hidden_states: Tensor, gate: Tensor) -> Tensor:
    """Qwen3.5's and Qwen3-Next's gated RMSNorm (their linear attention's output): Llama's RMSNorm
    (rounded to the input dtype, then times the weight), times ``silu(gate)`` in fp32, rounded to
    the input dtype: our rms_norm, then swiglu of the gate and the norm, in two ops where the
    model's code runs eight."""
    input_dtype = hidden_states.dtype
    (weight,) = gnn.module_state(self, self._parameters, "weight")
    normed = rms_norm(hidden_states, weight.shape, weight, self.variance_epsilon, cast_before_weight=True)
    if gate.dtype != normed.dtype:  # a wider norm (an fp32 weight): the product in its dtype, as the model's
        gate = gate.to(normed.dtype)
    gated = swiglu(gate, normed)
    return gated if gated.dtype == input_dtype else gated.to(input_dtype)


def _gated(gate: Tensor, up: Tensor | None, activation: str) -> Tensor:
    """``act(gate) * up``; without ``up``, of gate's halves (``swiglu``'s packed form)."""
    if activation == "silu":
        return swiglu(gate, up)
    return geglu(gate, up, approximate="tanh" if activation == "gelu_tanh" else "none")


def _gated_mlp_forward(self, x: Tensor) -> Tensor:
    """``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with the gating in one op."""
    parts = self._modules  # see _train_bottleneck_forward
    return parts["down_proj"](_gated(parts["gate_proj"](x), parts["up_proj"](x), self.activation))


def _silu_gated_mlp_forward(self, x: Tensor) -> Tensor:
    """LFM2's MLP: ``w2(silu(w1(x)) * w3(x))`` (its activation a function, not a module) with the
    gating in one op."""
    parts = self._modules  # see _train_bottleneck_forward
    return parts["w2"](_gated(parts["w1"](x), parts["w3"](x), "silu"))


def _gate_up_mlp_forward(self, hidden_states: Tensor) -> Tensor:
    """Phi-3's and GLM-4's MLP: one projection holds gate and up; ``down_proj(up * act(gate))``,
    the projection's output gated in its packed form (its gradient written whole)."""
    parts = self._modules  # see _train_bottleneck_forward
    return parts["down_proj"](_gated(parts["gate_up_proj"](hidden_states), None, self.activation))


def _input_output_mlp_forward(self, hidden_states: Tensor) -> Tensor:
    """Granite MoE Shared's and Granite 4's shared MLP: ``input_linear`` holds gate, then up;
    ``output_linear(activation(gate) * up)``, the projection's output gated in its packed form."""
    parts = self._modules  # see _train_bottleneck_forward
    return parts["output_linear"](_gated(parts["input_linear"](hidden_states), None, self.gated_activation))


def _timm_glu_mlp_forward(self, x: Tensor) -> Tensor:
    """timm's GluMlp (and its SwiGLUPacked): ``fc1``'s output halves gated in one op (packed
    where the gate is the first half of the last dim), then ``drop1``, ``norm``, ``fc2`` and ``drop2``."""
    parts = self._modules  # see _train_bottleneck_forward
    hidden = parts["fc1"](x)
    if self.gate_last or self.chunk_dim != -1:
        first, second = hidden.chunk(2, dim=self.chunk_dim)
        hidden = _gated(second, first, self.activation) if self.gate_last else _gated(first, second, self.activation)
    else:
        hidden = _gated(hidden, None, self.activation)
    return parts["drop2"](parts["fc2"](parts["norm"](parts["drop1"](hidden))))


def _timm_swiglu_forward(self, x: Tensor) -> Tensor:
    """timm's SwiGLU: ``act(fc1_g(x)) * fc1_x(x)`` in one op, then ``drop1``, ``norm``, ``fc2`` and ``drop2``."""
    parts = self._modules  # see _train_bottleneck_forward
    hidden = _gated(parts["fc1_g"](x), parts["fc1_x"](x), self.activation)
    return parts["drop2"](parts["fc2"](parts["norm"](parts["drop1"](hidden))))


def _experts_forward(self, *args, **kwargs):
    """The MoE experts' forward as written (the ``experts_implementation`` chosen), their
    ``_apply_gate`` ours."""
    return _original_class(self).forward(self, *args, **kwargs)


def _experts_apply_gate(self, gate_up_out: Tensor) -> Tensor:
    """transformers' default ``_apply_gate`` of MoE experts, ``act_fn(gate) * up`` of the
    halves of ``gate_up_out``, in one op (packed)."""
    return _gated(gate_up_out, None, self.activation)


def _gates_by_default(cls: type) -> bool:
    """Whether ``cls`` is transformers' MoE experts class whose ``_apply_gate`` is the default."""
    moe = sys.modules.get("transformers.integrations.moe")
    return moe is not None and getattr(cls, "_apply_gate", None) is getattr(moe, "_default_apply_gate", ())


def _experts_checked(experts: torch.nn.Module) -> dict[str, Any] | str:
    """The activation of experts whose batched implementations gate through ``_apply_gate``;
    else why not: the eager implementation gates inline, and experts without a gate never call it."""
    if not getattr(experts, "has_gate", False):
        return "its experts have no gate (has_gate is False)"
    implementation = getattr(getattr(experts, "config", None), "_experts_implementation", None)
    if implementation == "eager":
        return "its experts_implementation is 'eager', which gates inline: 'grouped_mm' and 'batched_mm' gate in ours"
    return _gated_activation("act_fn")(experts)


def _gated_activation(attribute: str, key: str = "activation") -> Callable[[torch.nn.Module], dict[str, Any] | str]:
    """The ``prepare`` of a gated MLP whose activation module is ``attribute``: its name as ``key``
    (``gated_activation`` where the MLP's own ``activation`` is that module)."""

    def prepare(mlp):
        act = getattr(mlp, attribute)
        name, why = _activation(act)
        if name is None:
            return f"{attribute}: {why}"
        if name not in GATED_ACTIVATIONS:
            return f"{attribute} is {name}: no gated op for it"
        if _has_hooks(act):
            return f"{attribute} has hooks, which would no longer run"
        return {key: name}

    return prepare


def _timm_layer_norm_forward(
    self, x: Tensor, residual: Tensor | None = None, *, add_to: Tensor | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    """timm's LayerNorm: F.layer_norm over the trailing dims; given a residual (a ViT block's
    forward that ``gk.patch`` converted, ``_add_then_norm``), ``add_layer_norm``'s pair; given
    ``add_to``, ``layer_norm_add``'s sum."""
    weight, bias = gnn.module_state(self, self._parameters, "weight", "bias")
    if add_to is not None:
        return layer_norm_add(x, add_to, self.normalized_shape, weight, bias, self.eps)
    if residual is not None:
        return add_layer_norm(x, residual, self.normalized_shape, weight, bias, self.eps)
    return layer_norm(x, self.normalized_shape, weight, bias, self.eps)


def _timm_rms_norm_forward(self, x: Tensor) -> Tensor:
    """timm's RmsNorm: rows of x times their rstd, rounded to x's dtype, then times the weight
    (as Llama's RMSNorm; timm's own rounds each step in x's dtype outside autocast). Under CUDA
    autocast both compute in fp32 and return fp32 (timm's steps are fp32 ops there; on CPU,
    whose autocast leaves them, timm's returns x's dtype)."""
    (weight,) = gnn.module_state(self, self._parameters, "weight")
    return rms_norm(x, self.normalized_shape, weight, self.eps, cast_before_weight=True)


def _timm_rms_norm_2d_forward(self, x: Tensor) -> Tensor:
    """timm's RmsNorm2d: ``_timm_rms_norm_forward`` over the channels of an NCHW tensor."""
    (weight,) = gnn.module_state(self, self._parameters, "weight")
    channels_last = x.permute(0, 2, 3, 1)
    return rms_norm(channels_last, self.normalized_shape, weight, self.eps, cast_before_weight=True).permute(0, 3, 1, 2)


def _cohere_layer_norm_forward(self, x: Tensor) -> Tensor:
    """Cohere's LayerNorm: over the last dim, without a bias, in fp32, rounded to x's dtype
    (as F.layer_norm, which computes in fp32 whatever the input dtype)."""
    (weight,) = gnn.module_state(self, self._parameters, "weight")
    return layer_norm(x, weight.shape, weight, None, self.variance_epsilon, out_dtype=gnn.matmul_input_dtype(self, x))


def _olmo_layer_norm_forward(
    self, hidden_states: Tensor, residual: Tensor | None = None, *, add_to: Tensor | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    """OLMo's LayerNorm: no weight or bias, F.layer_norm in fp32 with eps 1e-5 (as its forward
    writes them), rounded back to the dtype of what it normalises, under autocast too; given
    a residual or ``add_to``, as ``_timm_layer_norm_forward``. Its forward takes fp64 down to
    fp32, which our ops would not: fp64 runs it as written."""
    x, shape = hidden_states, self.normalized_shape
    if x.dtype == torch.float64 or (residual is not None and residual.dtype == torch.float64):
        summed = x if residual is None else residual + x
        y = _original_class(self).forward(self, summed)
        return y if residual is None else (y, summed)
    if add_to is not None:
        return layer_norm_add(x, add_to, shape, None, None, 1e-5, norm_dtype=x.dtype)
    out_dtype = gnn.matmul_input_dtype(self, x, residual)
    if out_dtype is None:
        out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    if residual is not None:
        return add_layer_norm(x, residual, shape, None, None, 1e-5, out_dtype=out_dtype)
    return layer_norm(x, shape, None, None, 1e-5, out_dtype=out_dtype)


def _silu_gated_norm(module: torch.nn.Module) -> dict[str, Any] | str:
    if module.activation != "silu":
        return f"its activation is {module.activation!r}: only silu's gated op is ours here"
    return {}


def _one_weight_a_feature(module: torch.nn.Module) -> dict[str, Any] | str:
    if module.weight.dim() != 1:
        return f"its weight of shape {tuple(module.weight.shape)} (a weight a head: QK norm) is no layer norm's"
    return {}


def _layer_norm_2d_forward(self, x: Tensor) -> Tensor:
    """timm's and torchvision's LayerNorm2d: over the channels of an NCHW tensor."""
    weight, bias = gnn.module_state(self, self._parameters, "weight", "bias")
    return layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, weight, bias, self.eps).permute(0, 3, 1, 2)


def _then_drop_and_act(norm_forward: Callable) -> Callable:
    """timm's norm + activation class of ``norm_forward``'s norm (LayerNormAct, RmsNormAct2d, ...:
    MobileNetV5's, ViTamin's): our norm, then its ``drop`` and ``act`` modules as timm runs them."""

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(norm_forward(self, x)))

    forward.__doc__ = f"{norm_forward.__doc__} Then its drop and act modules."
    return forward


def _unless_fast_norm(module: torch.nn.Module) -> dict[str, Any] | str:
    if getattr(module, "_fast_norm", False):
        return "timm's fast norm is on: it computes in the autocast dtype (or with apex)"
    return {}


def _timm_batch_norm_act_forward(self, x: Tensor) -> Tensor:
    """timm's BatchNormAct2d with our BatchNorm: its activation in the same op where patch
    fused it (``activation``), else its ``drop`` and ``act`` modules after it, as timm runs them."""
    x = gnn.BatchNormForward.fused(self, x, self.activation)
    return x if self.activation != "none" else self.act(self.drop(x))


def _batch_norm_act_rules(fuse: bool) -> dict[type, _Rule]:
    """The rule for timm's BatchNormAct2d (BatchNorm2d's forward, then its ``drop`` and ``act``
    modules) when timm is imported: its activation fused when ``fuse``, ``drop`` computes
    nothing (an nn.Identity), ``act`` is one of ours (or an nn.Identity) and neither has hooks;
    else its BatchNorm ours, ``drop`` and ``act`` run after it as they are."""
    (cls,) = _loaded("timm.layers.norm_act", "BatchNormAct2d")
    if cls is None:
        return {}

    def prepare(module):
        drop, act = module.drop, module.act
        if not fuse or type(drop) is not torch.nn.Identity or _has_hooks(drop) or _has_hooks(act):
            return {"activation": "none"}
        return {"activation": "none" if type(act) is torch.nn.Identity else (_activation(act)[0] or "none")}

    return {cls: _Rule(_replacement(cls, _timm_batch_norm_act_forward), "BatchNormAct2d", prepare)}


# The classes below, as (model, class name), were read in transformers 5.17 and 5.25 (the GPU machines' and CI's
# releases). RMSNorms by their rounding: Llama's (rounded to the input dtype, then times the weight), Gemma's
# (times 1 + weight in fp32, then rounded), OLMo 2's (times the weight in fp32, then rounded; Gemma 3n's and 4's: its
# weight optional).
_RMS_NORMS = {
    _llama_rms_norm_forward: (
        ("llama", "LlamaRMSNorm"),
        ("mistral", "MistralRMSNorm"),
        ("mixtral", "MixtralRMSNorm"),
        ("qwen2", "Qwen2RMSNorm"),
        ("qwen2_moe", "Qwen2MoeRMSNorm"),
        ("qwen2_vl", "Qwen2VLRMSNorm"),
        ("qwen2_5_vl", "Qwen2_5_VLRMSNorm"),
        ("qwen3", "Qwen3RMSNorm"),
        ("qwen3_moe", "Qwen3MoeRMSNorm"),
        ("qwen3_vl", "Qwen3VLTextRMSNorm"),
        ("phi3", "Phi3RMSNorm"),
        ("granite", "GraniteRMSNorm"),
        ("smollm3", "SmolLM3RMSNorm"),
        ("glm", "GlmRMSNorm"),
        ("glm4", "Glm4RMSNorm"),
        ("glm4_moe", "Glm4MoeRMSNorm"),
        ("deepseek_v3", "DeepseekV3RMSNorm"),
        ("llama4", "Llama4TextRMSNorm"),  # its eps: eps in 5.17
    ),
    _gemma_rms_norm_forward: (("gemma", "GemmaRMSNorm"), ("gemma2", "Gemma2RMSNorm"), ("gemma3", "Gemma3RMSNorm")),
    _olmo2_rms_norm_forward: (("olmo2", "Olmo2RMSNorm"), ("gpt_oss", "GptOssRMSNorm"), ("helium", "HeliumRMSNorm")),
    _gemma4_rms_norm_forward: (("gemma4", "Gemma4RMSNorm"),),
    _weightless_rms_norm_forward: (
        ("llama4", "Llama4TextL2Norm"),  # Llama4TextWeightlessRMSNorm's name in 5.17 (an alias of it in 5.25)
        ("llama4", "Llama4TextWeightlessRMSNorm"),
        ("nanochat", "NanoChatRMSNorm"),
    ),
}
# rms_norm(x) * silu(gate), Llama's rounding (the Gated DeltaNet's output norm)
_GATED_RMS_NORMS = (("qwen3_5", "Qwen3_5RMSNormGated"), ("qwen3_next", "Qwen3NextRMSNormGated"))
# down_proj(act_fn(gate_proj(x)) * up_proj(x)) (the MoE models' dense and shared-expert MLPs; the VL models' text
# and vision MLPs)
_GATED_MLPS = (
    ("llama", "LlamaMLP"),
    ("mistral", "MistralMLP"),
    ("qwen2", "Qwen2MLP"),
    ("qwen2_moe", "Qwen2MoeMLP"),
    ("qwen2_vl", "Qwen2MLP"),
    ("qwen2_5_vl", "Qwen2MLP"),
    ("qwen2_5_vl", "Qwen2_5_VLMLP"),
    ("qwen3", "Qwen3MLP"),
    ("qwen3_moe", "Qwen3MoeMLP"),
    ("qwen3_vl", "Qwen3VLTextMLP"),
    ("gemma", "GemmaMLP"),
    ("gemma2", "Gemma2MLP"),
    ("gemma3", "Gemma3MLP"),
    ("granite", "GraniteMLP"),
    ("smollm3", "SmolLM3MLP"),
    ("olmo2", "Olmo2MLP"),
    ("stablelm", "StableLmMLP"),
    ("glm4_moe", "Glm4MoeMLP"),
    ("deepseek_v3", "DeepseekV3MLP"),
)
# the same, its activation module ``activation_fn``
_ACTIVATION_FN_GATED_MLPS = (("llama4", "Llama4TextMLP"),)
# gate and up from one projection: down_proj(up * activation_fn(gate))
_GATE_UP_MLPS = (("phi3", "Phi3MLP"), ("glm", "GlmMLP"), ("glm4", "Glm4MLP"))
# the same, gate first: output_linear(activation(gate) * up) (Granite MoE Shared's and Granite 4's shared MLP)
_INPUT_OUTPUT_MLPS = (("granitemoeshared", "GraniteMoeSharedMLP"), ("granitemoehybrid", "GraniteMoeHybridMLP"))
# w2(F.silu(w1(x)) * w3(x))
_SILU_GATED_MLPS = (("lfm2", "Lfm2MLP"),)


def _transformers_class(model: str, name: str) -> type | None:
    return _loaded(f"transformers.models.{model}.modeling_{model}", name)[0]


# ---- norms whose output only matmuls read (transformers) -------------------------------------------------------


def _pre_norms(
    prefix: str, mlp_norm: str = "post_attention_layernorm", attention: str = "self_attn"
) -> dict[str, tuple[tuple[str, str], ...]]:
    return {
        "input_layernorm": ((attention, f"{prefix}Attention"),),
        mlp_norm: (("mlp", f"{prefix}MLP"),),
    }


# Blocks whose forward passes a norm's output only to its attention or its MLP, whose forward in turn
# passes it only to projections (their shape read besides), as read in transformers 5.25 (and checked on
# the installed version by tests/test_patch_models.py: the same logits bit for bit under autocast):
# (model, block class) -> {norm: ((a child it goes to, that child's class), ...)}. Under autocast those
# projections cast it to the autocast dtype, so the norm may return that dtype (gnn.matmul_input_dtype).
# Phi's, StableLM's and Cohere's (parallel residual) input norm goes to both.
# Not here: norms of a block's outputs (Gemma 2/3's post-norms, OLMo 2's), the final norm (returned as
# the model's hidden state).
_NORMS_BEFORE_MATMULS = {
    ("llama", "LlamaDecoderLayer"): _pre_norms("Llama"),
    ("mistral", "MistralDecoderLayer"): _pre_norms("Mistral"),
    ("qwen2", "Qwen2DecoderLayer"): _pre_norms("Qwen2"),
    ("qwen3", "Qwen3DecoderLayer"): _pre_norms("Qwen3"),
    ("gemma", "GemmaDecoderLayer"): _pre_norms("Gemma"),
    ("gemma2", "Gemma2DecoderLayer"): _pre_norms("Gemma2", "pre_feedforward_layernorm"),
    ("gemma3", "Gemma3DecoderLayer"): _pre_norms("Gemma3", "pre_feedforward_layernorm"),
    ("phi3", "Phi3DecoderLayer"): _pre_norms("Phi3"),
    ("smollm3", "SmolLM3DecoderLayer"): _pre_norms("SmolLM3"),
    ("glm", "GlmDecoderLayer"): _pre_norms("Glm"),
    ("glm4", "Glm4DecoderLayer"): _pre_norms("Glm4"),
    ("gpt2", "GPT2Block"): {"ln_1": (("attn", "GPT2Attention"),), "ln_2": (("mlp", "GPT2MLP"),)},
    ("gpt_neox", "GPTNeoXLayer"): _pre_norms("GPTNeoX", attention="attention"),
    ("phi", "PhiDecoderLayer"): {"input_layernorm": (("self_attn", "PhiAttention"), ("mlp", "PhiMLP"))},
    ("olmo", "OlmoDecoderLayer"): _pre_norms("Olmo"),
    ("cohere", "CohereDecoderLayer"): {"input_layernorm": (("self_attn", "CohereAttention"), ("mlp", "CohereMLP"))},
    ("cohere2", "Cohere2DecoderLayer"): {"input_layernorm": (("self_attn", "Cohere2Attention"), ("mlp", "Cohere2MLP"))},
    ("stablelm", "StableLmDecoderLayer"): {
        "input_layernorm": (("self_attn", "StableLmAttention"), ("mlp", "StableLmMLP")),
        "post_attention_layernorm": (("mlp", "StableLmMLP"),),
    },
}


def _hooked_reason(block: torch.nn.Module, names: tuple[str, ...]) -> str | None:
    """Why a block whose forward patch replaces must stay as it is when the block or its
    children ``names`` ("": the block) have hooks, which expect its forward as written; else None."""
    hooked = [name for name in names if _has_hooks(block.get_submodule(name))]
    if hooked:
        return f"has hooks ({', '.join(name or 'the block' for name in hooked)}), which expect its forward as written"
    return None


def _original_class(module: torch.nn.Module) -> type:
    return _ORIGINAL.get(type(module), type(module))


def _norms_feeding_matmuls(classes: Iterable[type]) -> dict[type, dict[str, list[tuple[str, tuple[type, ...]]]]]:
    """``_NORMS_BEFORE_MATMULS`` with classes: block class -> {norm: [(a child it goes to, the
    classes that child may have)]}; and for each of ``classes`` in one of ``_PRE_NORM_FORMS``
    not listed, its norms before its attention and its MLP, going to an attention and an MLP
    whose forwards are those of the Llama-form blocks listed (``_same_code``, globals aside:
    which calls the norm's output reaches is what counts) or are those classes."""
    blocks = {}
    llama_form = {"self_attn": set(), "mlp": set()}  # the children's classes of the Llama-form blocks listed
    for (family, name), norms in _NORMS_BEFORE_MATMULS.items():
        cls = _transformers_class(family, name)
        if cls is not None:
            blocks[cls] = {
                norm: [(child, (_transformers_class(family, of),)) for child, of in children]
                for norm, children in norms.items()
            }
            if isinstance(_block_call(cls.forward, _LLAMA_FORM), _BlockCall):
                for child, (of,) in (*blocks[cls]["input_layernorm"], *blocks[cls]["post_attention_layernorm"]):
                    llama_form[child].add(of)
    # the model's classes that may read a Llama-form block's norm as the listed blocks' children do
    readers = {
        child: tuple(c for c in classes if _same_code_as(c, read, same_globals=False))
        for child, read in llama_form.items()
    }
    for cls in set(classes) - set(blocks):
        form = _pre_norm_form(cls)
        if form is not None and isinstance(_block_call(cls.forward, form), _BlockCall):
            mixer = _TOKEN_MIXER if form.mixer else "self_attn"  # a hybrid layer's: by its block_type
            blocks[cls] = {form.input_norm: [(mixer, readers["self_attn"])], form.norm: [("mlp", readers["mlp"])]}
    return blocks


_DTYPE_FREE = ("shape", "size", "dim", "ndim", "device")  # what a tensor tells alike in any dtype
# transformers' zeroing of padded positions before a linear attention reads its input (Qwen3.5's and Qwen3-Next's
# Gated DeltaNet), as read in 5.17 and 5.25: the input's values times a 0/1 mask, in the input's dtype, which
# rounding to another dtype first leaves the same
_MASK_PADDING_SOURCE = """
if attention_mask is not None:
    dtype = hidden_states.dtype
    hidden_states = (hidden_states * attention_mask[:, :, None]).to(dtype)
return hidden_states
"""


@functools.cache
def _masks_padding(function: Callable) -> bool:
    """Whether ``function`` is ``_MASK_PADDING_SOURCE``'s ``(hidden_states, attention_mask)``."""
    read = _forward_body(function) if isinstance(function, types.FunctionType) else "not a function"
    if isinstance(read, str):
        return False
    body, signature = read
    return list(signature.parameters) == ["hidden_states", "attention_mask"] and ast.dump(body) == ast.dump(
        _parsed(_MASK_PADDING_SOURCE)
    )


@functools.cache
def _children_reading_input(cls: type) -> tuple[str, ...] | None:
    """The children ``self.<name>`` to which ``cls.forward`` passes its first input, when it
    reads that input only so (the one argument of each call, under the name it came by) and
    by what does not depend on its dtype (``_DTYPE_FREE``), up to the statement of its body
    that binds the name to another value (``x = self.fc(x)``, GPT-NeoX's MLP), if any; else
    None (its source unreadable among the reasons). ``x = mask_padding(x, mask)`` (a global
    function of ``_MASK_PADDING_SOURCE``'s) keeps the name's values and dtype."""
    forward = inspect.unwrap(cls.__dict__.get("forward", cls.forward))
    try:
        function = ast.parse(textwrap.dedent(inspect.getsource(forward))).body[0]
    except (OSError, TypeError, SyntaxError):
        return None
    if not isinstance(function, ast.FunctionDef) or len(function.args.args) < 2:
        return None
    input_name = function.args.args[1].arg
    parents = {child: node for node in ast.walk(function) for child in ast.iter_child_nodes(node)}
    children = set()
    for statement in function.body:
        rebinds = (
            isinstance(statement, ast.Assign)
            and len(statement.targets) == 1
            and isinstance(statement.targets[0], ast.Name)
            and statement.targets[0].id == input_name
        )
        if rebinds and _masks_input(statement.value, input_name, forward.__globals__):
            continue
        for node in ast.walk(statement.value if rebinds else statement):
            if not isinstance(node, ast.Name) or node.id != input_name:
                continue
            parent = parents[node]
            if not isinstance(node.ctx, ast.Load):
                return None
            if isinstance(parent, ast.Attribute) and parent.attr in _DTYPE_FREE:
                continue
            call = parent if isinstance(parent, ast.Call) else None
            if (
                call is None
                or len(call.args) != 1
                or call.args[0] is not node
                or call.keywords
                or not isinstance(call.func, ast.Attribute)
                or not (isinstance(call.func.value, ast.Name) and call.func.value.id == "self")
            ):
                return None
            children.add(call.func.attr)
        if rebinds:
            break
    return tuple(sorted(children)) or None


def _masks_input(value: ast.expr, input_name: str, names: dict) -> bool:
    """Whether ``value`` is ``f(<input_name>, <a name>)`` with ``f``, a global of ``names``,
    a padding mask's (``_masks_padding``)."""
    return (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Name)
        and len(value.args) == 2
        and not value.keywords
        and all(isinstance(arg, ast.Name) for arg in value.args)
        and value.args[0].id == input_name
        and value.args[1].id != input_name
        and _masks_padding(names.get(value.func.id))
    )


def _matmuls_read_input(module: torch.nn.Module) -> bool:
    """Whether ``module``'s forward reads its input only by passing it to linear layers of its
    own (``nn.Linear``, ``LinearAct``, without hooks) and by its shape: under autocast they cast
    it to the autocast dtype first, so an input in that dtype gives the same results. A name
    the module lacks or sets to None is a branch that cannot run (DeepSeek's q_proj beside its
    q_a_proj: one of the two, by its config)."""
    names = _children_reading_input(type(module))
    if names is None:
        return False
    children = [getattr(module, name, None) for name in names]
    return all(
        child is None or (type(child) in (torch.nn.Linear, gnn.LinearAct) and not _has_hooks(child))
        for child in children
    )


_TOKEN_MIXER = "<token mixer>"
"""The child of a hybrid layer (``_MIXER_LAYER_FORWARD``) its input norm's output goes to: ``self_attn``
or ``linear_attn`` by its ``block_type``."""
_TOKEN_MIXERS = {"full_attention": "self_attn", "linear_attention": "linear_attn"}


def _child_reading(block: torch.nn.Module, child: str) -> torch.nn.Module | None:
    """``block``'s child ``child`` (``_TOKEN_MIXER``: its token mixer, None for another block_type)."""
    if child == _TOKEN_MIXER:
        child = _TOKEN_MIXERS.get(getattr(block, "block_type", None))
    return None if child is None else getattr(block, child, None)


def _mark_norms_feeding_matmuls(
    model: torch.nn.Module, classes: set[type], swapped: set[str], uses: Counter
) -> list[str]:
    """Set ``feeds_matmuls`` on the norms (swapped by this patch) of the blocks of
    ``_NORMS_BEFORE_MATMULS`` (and the Llama-form blocks like them among the model's
    transformers ``classes``: ``_norms_feeding_matmuls``) whose output goes to the block's own
    attention or MLP classes, or to children whose forward only linear layers read
    (``_matmuls_read_input``); not on a shared norm, nor where a hook on the norm or on those
    children would see its dtype. Returns their names."""
    blocks = _norms_feeding_matmuls(classes)
    marked = []
    for block_name, block in model.named_modules():
        norms = blocks.get(_original_class(block))
        for norm_name, children in (norms or {}).items():
            name = _child_name(block_name, norm_name)
            norm = getattr(block, norm_name, None)
            readers = [(_child_reading(block, child), classes) for child, classes in children]
            if (
                name in swapped
                and all(
                    child is not None and (_original_class(child) in classes or _matmuls_read_input(child))
                    for child, classes in readers
                )
                and uses[id(norm)] == 1
                and not (_has_hooks(norm) or any(_has_hooks(child) for child, _ in readers))
            ):
                norm.feeds_matmuls = True
                marked.append(name)
    return marked


# ---- a block's residual addition with the norm after it (transformers) ---------------------------------------

# Pre-norm blocks' forwards as read in transformers 5.17 and 5.25, but the keywords of the attention's call
# (checked apart: each a parameter of the forward passed on by its own name, and its **kwargs). A block class
# whose forward is this one (its AST, docstring and annotations aside) computes what the replacement below
# computes, so the replacement may run in its place, whatever the class's name (the Llama form is checked on
# each transformers class of a model); any other forward (another release, a block with dropout or scaling
# between, another call's keywords) is left as it is.
_LLAMA_LAYER_FORWARD = """
residual = hidden_states
hidden_states = self.input_layernorm(hidden_states)
hidden_states, _ = self.self_attn(hidden_states=hidden_states)
hidden_states = residual + hidden_states
residual = hidden_states
hidden_states = self.post_attention_layernorm(hidden_states)
hidden_states = self.mlp(hidden_states)
hidden_states = residual + hidden_states
return hidden_states
"""
# gpt-oss's: Llama's with an MLP that returns its router's scores besides
_PAIR_MLP_LAYER_FORWARD = _LLAMA_LAYER_FORWARD.replace("hidden_states = self.mlp(", "hidden_states, _ = self.mlp(")
# Gemma 2's and 3's, GLM-4's: a norm after the attention and after the MLP, besides those before them (named
# by the form: ``_sandwich_form``)
_SANDWICH_LAYER_FORWARD = """
residual = hidden_states
hidden_states = self.input_layernorm(hidden_states)
hidden_states, _ = self.self_attn(hidden_states=hidden_states)
hidden_states = self.{after_attention}(hidden_states)
hidden_states = residual + hidden_states
residual = hidden_states
hidden_states = self.{before_mlp}(hidden_states)
hidden_states = self.mlp(hidden_states)
hidden_states = self.{after_mlp}(hidden_states)
hidden_states = residual + hidden_states
return hidden_states
"""
# Granite's: Llama's with each branch scaled before its residual addition
_SCALED_LAYER_FORWARD = """
residual = hidden_states
hidden_states = self.input_layernorm(hidden_states)
hidden_states, _ = self.self_attn(hidden_states=hidden_states)
hidden_states = residual + hidden_states * self.residual_multiplier
residual = hidden_states
hidden_states = self.post_attention_layernorm(hidden_states)
hidden_states = self.mlp(hidden_states)
hidden_states = residual + hidden_states * self.residual_multiplier
return hidden_states
"""
# Granite MoE's: Granite's, the MLP an MoE
_GRANITE_MOE_LAYER_FORWARD = _SCALED_LAYER_FORWARD.replace("self.mlp(", "self.block_sparse_moe(")
# Granite MoE Shared's (and Granite MoE SWA's): an MLP beside the MoE where the config sets one
_GRANITE_SHARED_LAYER_FORWARD = _SCALED_LAYER_FORWARD.replace(
    "hidden_states = self.mlp(hidden_states)\n",
    """moe_hidden_states = self.block_sparse_moe(hidden_states)
if self.shared_mlp is None:
    hidden_states = moe_hidden_states
else:
    hidden_states = moe_hidden_states + self.shared_mlp(hidden_states)
""",
)
# Granite 4's (Granite MoE Hybrid's): the token mixer a Mamba layer where the layer has one (its keywords apart:
# ``_BlockForm.mixer``), else the attention; the shared MLP, the MoE beside where the config sets experts
_GRANITE_HYBRID_LAYER_FORWARD = """
residual = hidden_states
hidden_states = self.input_layernorm(hidden_states)
if self.mamba is not None:
    hidden_states = self.mamba(hidden_states=hidden_states)
else:
    hidden_states, _ = self.self_attn(hidden_states=hidden_states)
hidden_states = residual + hidden_states * self.residual_multiplier
residual = hidden_states
hidden_states = self.post_attention_layernorm(hidden_states)
if self.has_experts:
    moe_hidden_states = self.block_sparse_moe(hidden_states)
    hidden_states = moe_hidden_states + self.shared_mlp(hidden_states)
else:
    hidden_states = self.shared_mlp(hidden_states)
hidden_states = residual + hidden_states * self.residual_multiplier
return hidden_states
"""
# Llama 4's: the MLP ``feed_forward``, an MoE's returning its router's logits besides, viewed as the residual's shape
_LLAMA4_LAYER_FORWARD = """
residual = hidden_states
hidden_states = self.input_layernorm(hidden_states)
attention_states, _ = self.self_attn(hidden_states=hidden_states)
hidden_states = residual + attention_states
residual = hidden_states
hidden_states = self.post_attention_layernorm(hidden_states)
hidden_states = self.feed_forward(hidden_states)
if self.is_moe_layer:
    hidden_states, _ = hidden_states
hidden_states = residual + hidden_states.view(residual.shape)
return hidden_states
"""
# Phi-3's: Llama's with a dropout on each branch before its residual addition
_DROPOUT_LAYER_FORWARD = """
residual = hidden_states
hidden_states = self.input_layernorm(hidden_states)
hidden_states, self_attn_weights = self.self_attn(hidden_states=hidden_states)
hidden_states = residual + self.resid_attn_dropout(hidden_states)
residual = hidden_states
hidden_states = self.post_attention_layernorm(hidden_states)
hidden_states = self.mlp(hidden_states)
hidden_states = residual + self.resid_mlp_dropout(hidden_states)
return hidden_states
"""
# Qwen3.5's and Qwen3-Next's: Llama's, the token mixer by ``block_type``: a linear attention (its keywords apart:
# ``_BlockForm.mixer``) or the attention (``else`` in Qwen3.5's of 5.25, ``elif`` in the others); Qwen3-Next's MLP
# returns its router's logits besides where it is an MoE (``mlp_pair``)
_MIXER_LAYER_FORWARD = """
residual = hidden_states
hidden_states = self.input_layernorm(hidden_states)
if self.block_type == "linear_attention":
    hidden_states = self.linear_attn(hidden_states=hidden_states)
{attention_test}:
    hidden_states, _ = self.self_attn(hidden_states=hidden_states)
hidden_states = residual + hidden_states
residual = hidden_states
hidden_states = self.post_attention_layernorm(hidden_states)
hidden_states = self.mlp(hidden_states)
{mlp_pair}hidden_states = residual + hidden_states
return hidden_states
"""
_MLP_PAIR = """if isinstance(hidden_states, tuple):
    hidden_states, _ = hidden_states
"""
# LFM2's: pre-norm, the token mixer by ``is_attention_layer`` (a short convolution, its keywords apart:
# ``_BlockForm.mixer``, or the attention), each norm called inline, the branches added residual last
_LFM2_LAYER_FORWARD = """
residual = hidden_states
if self.is_attention_layer:
    hidden_states, _ = self.self_attn(hidden_states=self.operator_norm(hidden_states))
else:
    hidden_states = self.conv(hidden_states=self.operator_norm(hidden_states))
hidden_states = hidden_states + residual
hidden_states = hidden_states + self.feed_forward(self.ffn_norm(hidden_states))
return hidden_states
"""
# Gemma 4's text layer: Gemma 3's, with an MoE beside its MLP and an input of its own (per layer), each where
# its config sets it, and the output scaled
_GEMMA4_LAYER_FORWARD = """
residual = hidden_states
hidden_states = self.input_layernorm(hidden_states)
hidden_states, _ = self.self_attn(hidden_states=hidden_states)
hidden_states = self.post_attention_layernorm(hidden_states)
hidden_states = residual + hidden_states
residual = hidden_states
hidden_states = self.pre_feedforward_layernorm(hidden_states)
hidden_states = self.mlp(hidden_states)
if self.enable_moe_block:
    hidden_states_1 = self.post_feedforward_layernorm_1(hidden_states)
    hidden_states_flat = residual.reshape(-1, residual.shape[-1])
    _, top_k_weights, top_k_index = self.router(hidden_states_flat)
    hidden_states_2 = self.pre_feedforward_layernorm_2(hidden_states_flat)
    hidden_states_2 = self.experts(hidden_states_2, top_k_index, top_k_weights)
    hidden_states_2 = hidden_states_2.reshape(residual.shape)
    hidden_states_2 = self.post_feedforward_layernorm_2(hidden_states_2)
    hidden_states = hidden_states_1 + hidden_states_2
hidden_states = self.post_feedforward_layernorm(hidden_states)
hidden_states = residual + hidden_states
if self.hidden_size_per_layer_input:
    residual = hidden_states
    hidden_states = self.per_layer_input_gate(hidden_states)
    hidden_states = self.act_fn(hidden_states)
    hidden_states = hidden_states * per_layer_input
    hidden_states = self.per_layer_projection(hidden_states)
    hidden_states = self.post_per_layer_input_norm(hidden_states)
    hidden_states = residual + hidden_states
hidden_states *= self.layer_scalar
return hidden_states
"""
# OLMo 2's, OLMo 3's and EXAONE 4's: post-norm, each branch's output normalised before its residual addition
_POST_NORM_LAYER_FORWARD = """
residual = hidden_states
hidden_states, _ = self.self_attn(hidden_states=hidden_states)
hidden_states = self.post_attention_layernorm(hidden_states)
hidden_states = residual + hidden_states
residual = hidden_states
hidden_states = self.mlp(hidden_states)
hidden_states = self.post_feedforward_layernorm(hidden_states)
hidden_states = residual + hidden_states
return hidden_states
"""
# Falcon-H1's: pre-norm, its Mamba layer (its keywords apart: ``_BlockForm.mixer``) and its attention side by side,
# each scaled, the MLP ``feed_forward``; it returns a tuple
_PARALLEL_HYBRID_LAYER_FORWARD = """
residual = hidden_states
hidden_states = self.input_layernorm(hidden_states)
mamba_hidden_states = self.mamba(hidden_states=hidden_states)
mamba_hidden_states = mamba_hidden_states * self.ssm_out_multiplier
attention_hidden_states, _ = self.self_attn(hidden_states=hidden_states * self.attention_in_multiplier)
attention_hidden_states = attention_hidden_states * self.attn_out_multiplier
hidden_states = mamba_hidden_states + attention_hidden_states
hidden_states = residual + hidden_states
residual = hidden_states
hidden_states = self.pre_ff_layernorm(hidden_states)
hidden_states = self.feed_forward(hidden_states)
hidden_states = residual + hidden_states
return (hidden_states,)
"""
# NomicBERT's, GTE's and Jina v3's (as read in 5.25; NomicBERT's in 5.17 too): post-norm as BERT's, a dropout on
# each branch, the attention given its input by position
_NOMIC_BERT_LAYER_FORWARD = """
residual = hidden_states
attention_output, _ = self.self_attn(hidden_states)
hidden_states = residual + self.post_attention_dropout(attention_output)
hidden_states = self.post_attention_layernorm(hidden_states)
residual = hidden_states
hidden_states = self.mlp(hidden_states)
hidden_states = residual + self.post_mlp_dropout(hidden_states)
hidden_states = self.post_mlp_layernorm(hidden_states)
return hidden_states
"""
# StableLM's: GPT-NeoX's parallel residual where its config asks for one (the block's own forward runs it), else
# Llama's form with a dropout on the MLP's branch
_PARALLEL_OR_SERIAL_LAYER_FORWARD = """
residual = hidden_states
hidden_states = self.input_layernorm(hidden_states)
self_attn_output, _ = self.self_attn(hidden_states=hidden_states)
if self.use_parallel_residual:
    mlp_output = self.mlp(hidden_states)
    mlp_output = self.dropout(mlp_output)
    hidden_states = residual + self_attn_output + mlp_output
else:
    residual = residual + self_attn_output
    mlp_output = self.mlp(self.post_attention_layernorm(residual))
    mlp_output = self.dropout(mlp_output)
    hidden_states = residual + mlp_output
return hidden_states
"""
_GPT2_BLOCK_FORWARD = """
residual = hidden_states
hidden_states = self.ln_1(hidden_states)
attn_output, _ = self.attn(hidden_states)
hidden_states = attn_output + residual
if encoder_hidden_states is not None:
    if not hasattr(self, 'crossattention'):
        raise ValueError(f'If `encoder_hidden_states` are passed, {self} has to be instantiated with '
                         'cross-attention layers by setting `config.add_cross_attention=True`')
    residual = hidden_states
    hidden_states = self.ln_cross_attn(hidden_states)
    cross_attn_output, _ = self.crossattention(hidden_states)
    hidden_states = residual + cross_attn_output
residual = hidden_states
hidden_states = self.ln_2(hidden_states)
feed_forward_hidden_states = self.mlp(hidden_states)
hidden_states = residual + feed_forward_hidden_states
return hidden_states
"""


@dataclass(frozen=True)
class _BlockCall:
    """How a block's forward (one of the forms above) takes its arguments and passes them
    to its attention: ``parameters``, its named parameters after ``self`` in order
    (``hidden_states`` first), with their ``defaults``, but those ``required`` (Qwen3-VL's
    ``position_embeddings``); ``attention_keywords``, those it passes on to the attention by
    name, besides its own ``**kwargs``."""

    parameters: tuple[str, ...]
    defaults: dict[str, Any]
    attention_keywords: tuple[str, ...]
    required: frozenset[str] = frozenset()
    mixer_keywords: tuple[tuple[str | None, "str | _KwargsKey"], ...] = ()
    """A form's other token mixer's keywords (``_BlockForm.mixer``), each with what it passes
    (``_keywords_passed``): a parameter, a key of the forward's ``**kwargs``, or (None) them all."""
    passes_all: bool = field(init=False)
    """Whether the forward passes every named parameter but ``hidden_states`` on to its attention."""
    attention_defaults: dict[str, Any] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "passes_all", set(self.attention_keywords) == set(self.parameters[1:]))
        defaults = {key: self.defaults[key] for key in self.attention_keywords if key in self.defaults}
        object.__setattr__(self, "attention_defaults", defaults)

    def mixer_call(self, args: tuple, kwargs: dict) -> tuple[Tensor, dict] | None:
        """``(hidden_states, the token mixer's keyword arguments)`` for the forward's call
        ``(*args, **kwargs)``, as the forward passes them on (``mixer_keywords``); None where
        ``bind`` is."""
        bound = self.bind(args, kwargs)
        if bound is None:
            return None
        named, rest = bound
        arguments = {}
        for keyword, source in self.mixer_keywords:
            if keyword is None:
                arguments.update(rest)
            else:
                arguments[keyword] = rest.get(source.key) if isinstance(source, _KwargsKey) else named[source]
        return named["hidden_states"], arguments

    def bind(self, args: tuple, kwargs: dict) -> tuple[dict, dict] | None:
        """The forward's named arguments and its ``**kwargs`` for a call ``(*args, **kwargs)``;
        None for more positional arguments than it names, or a required one missing."""
        if len(args) > len(self.parameters):
            return None
        named = dict(self.defaults)
        named.update(zip(self.parameters, args))
        rest = {}
        for key, value in kwargs.items():
            if key in named or key in self.required:  # a required one has no default in named
                named[key] = value
            else:
                rest[key] = value
        if not self.required <= named.keys():
            return None
        return named, rest

    def attention_call(self, args: tuple, kwargs: dict) -> tuple[Tensor, dict, dict] | None:
        """``(hidden_states, the attention's keyword arguments, the forward's named ones)`` for
        the forward's call ``(*args, **kwargs)``, as the forward passes them on; None where
        ``bind`` is. The usual call (hidden states alone by position, every other argument by
        keyword, to a forward passing all on) in one merge of dicts (host time)."""
        if (
            len(args) == 1
            and self.passes_all
            and "hidden_states" not in kwargs
            and (not self.required or self.required <= kwargs.keys())
        ):
            return args[0], {**self.attention_defaults, **kwargs}, kwargs
        bound = self.bind(args, kwargs)
        if bound is None:
            return None
        named, rest = bound
        return named["hidden_states"], {**{key: named[key] for key in self.attention_keywords}, **rest}, named


def _without_keywords(tree: ast.AST, callees: tuple[str, ...]) -> tuple[ast.AST, dict[str, list[ast.keyword]]]:
    """``tree`` with the keywords of its calls ``self.<callee>(...)`` taken out, and those
    keywords by callee (``hidden_states=``, which the replacement passes as the forward
    does, stays, compared as read; so do the other calls' keywords)."""
    taken = {callee: [] for callee in callees}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if (
                isinstance(func, ast.Attribute)
                and isinstance(func.value, ast.Name)
                and func.value.id == "self"
                and func.attr in callees
            ):
                taken[func.attr] += [k for k in node.keywords if k.arg != "hidden_states"]
                node.keywords = [k for k in node.keywords if k.arg == "hidden_states"]
    return tree, taken


def _canonical(tree: ast.Module) -> ast.Module:
    """``tree`` (a forward's body, a form's source) as the two are compared, in place: a name stored
    and never read is ``_`` (whatever a forward calls the attention weights it discards), and an
    addition of two names has its operands in one order (``x + residual`` is ``residual + x``: the
    sum of two tensors rounds the same either way)."""
    read = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and node.id not in read:
            node.id = "_"
        elif (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.Add)
            and isinstance(node.left, ast.Name)
            and isinstance(node.right, ast.Name)
            and node.left.id > node.right.id
        ):
            node.left, node.right = node.right, node.left
    return tree


def _parsed(source: str) -> ast.Module:
    """A form's source as its forward's body is compared with it (``_canonical``)."""
    return _canonical(ast.parse(source))


def _forward_body(forward: Callable) -> tuple[ast.Module, inspect.Signature] | str:
    """``forward``'s body, its docstring aside, as a module to compare with a form's source
    (``ast.dump``; ``_canonical``), and its signature; else why they cannot be read."""
    try:
        function = ast.parse(textwrap.dedent(inspect.getsource(forward))).body[0]
        signature = inspect.signature(forward)
    except (OSError, TypeError, SyntaxError, ValueError) as e:
        return f"its forward's source cannot be read ({_first_line(e)})"
    if not isinstance(function, ast.FunctionDef):
        return "its forward's source is not a function's definition"
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return _canonical(ast.Module(body=body, type_ignores=[])), signature


@functools.cache
def _block_call(forward: Callable, form: _BlockForm) -> _BlockCall | str:
    """A block's ``forward``'s ``_BlockCall`` when its body is ``form.source`` (the keywords
    of its attention's call and of the calls ``form.apart`` aside), each keyword of its
    ``self.<attention>(...)`` call passing on a parameter under its own name or the
    forward's ``**kwargs``; else why not."""
    attention = form.attention
    read = _forward_body(forward)
    if isinstance(read, str):
        return read
    body, signature = read
    callees = (attention, *form.apart, *filter(None, [form.mixer]))
    ours, keywords = _without_keywords(body, callees)
    expected, _ = _without_keywords(_parsed(form.source), callees)
    if ast.dump(ours) != ast.dump(expected):
        return "its forward is not the one read (transformers 5.17 and 5.25): the residual addition stays apart"
    parameters = list(signature.parameters.values())[1:]
    named = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    var_keyword = next((p.name for p in parameters if p.kind is p.VAR_KEYWORD), None)
    passed = _keywords_passed(keywords[attention], attention, named, var_keyword, same_name=True)
    if isinstance(passed, str):
        return passed
    mixer_keywords = _keywords_passed(keywords.get(form.mixer, []), form.mixer, named, var_keyword, same_name=False)
    if isinstance(mixer_keywords, str):
        return mixer_keywords
    if (
        var_keyword is None
        or not named
        or named[0] != "hidden_states"
        or any(p.kind is p.KEYWORD_ONLY or p.kind is p.VAR_POSITIONAL for p in parameters)
    ):
        return f"its forward's parameters are not the ones read: {signature}"
    defaults = {p.name: p.default for p in parameters[1:] if p.name in named}
    required = frozenset(name for name, value in defaults.items() if value is inspect.Parameter.empty)
    defaults = {name: value for name, value in defaults.items() if name not in required}
    attention_keywords = tuple(k for k, _ in passed if k is not None)
    return _BlockCall(tuple(named), defaults, attention_keywords, required, tuple(mixer_keywords))


class _KwargsKey(NamedTuple):
    """What a forward passes as ``kwargs.get(key)``, of its ``**kwargs``."""

    key: str


def _keywords_passed(
    keywords: list[ast.keyword], callee: str, named: list[str], var_keyword: str | None, same_name: bool
) -> list[tuple[str | None, str | _KwargsKey]] | str:
    """The ``(keyword, parameter)`` pairs of a forward's call of ``callee``, each keyword passing
    one of the forward's ``named`` parameters, under its own name where ``same_name`` (else
    also ``kwargs.get("<key>")``: ``(keyword, _KwargsKey(key))``); its ``**kwargs`` as
    ``(None, <its name>)``; else why not."""
    pairs = []
    for keyword in keywords:
        value = keyword.value
        if keyword.arg is None and isinstance(value, ast.Name) and value.id == var_keyword:
            pairs.append((None, var_keyword))
            continue
        if not same_name and keyword.arg is not None and (key := _kwargs_key(value, var_keyword)) is not None:
            pairs.append((keyword.arg, _KwargsKey(key)))
            continue
        if not (
            keyword.arg is not None
            and isinstance(value, ast.Name)
            and value.id in named
            and (value.id == keyword.arg or not same_name)
        ):
            return f"its forward passes {ast.unparse(value)} to {callee} as {keyword.arg}"
        pairs.append((keyword.arg, value.id))
    return pairs


def _kwargs_key(value: ast.expr, var_keyword: str | None) -> str | None:
    """``key`` where ``value`` reads ``<var_keyword>.get("<key>")``, else None."""
    if (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Attribute)
        and value.func.attr == "get"
        and isinstance(value.func.value, ast.Name)
        and value.func.value.id == var_keyword
        and len(value.args) == 1
        and not value.keywords
        and isinstance(value.args[0], ast.Constant)
        and isinstance(value.args[0].value, str)
    ):
        return value.args[0].value
    return None


def _takes_residual(cls: type) -> bool:
    """Whether a norm of class ``cls`` takes a residual: ``norm(x, residual)``."""
    return cls.__dict__.get("forward") in _RESIDUAL_NORM_FORWARDS


# The norms' forwards that take a residual (gk.nn's too: an init-only subclass of nn.LayerNorm runs LayerNorm's)
_RESIDUAL_NORM_FORWARDS = frozenset(
    (gnn.LayerNorm.forward, gnn.RMSNorm.forward, *_RMS_NORMS, _timm_layer_norm_forward, _olmo_layer_norm_forward)
)


def _add_then_norm(norm: torch.nn.Module, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
    """``(norm(residual + x), residual + x)``: in one op where ``norm`` is one of ours that
    takes a residual (``norm(x, residual)``) and has no hooks (which would see that call),
    else as the block wrote it."""
    if _takes_residual(type(norm)) and not _has_hooks(norm):
        return norm(x, residual)
    summed = residual + x
    return norm(summed), summed


def _norm_then_add(norm: torch.nn.Module, x: Tensor, residual: Tensor) -> Tensor:
    """``residual + norm(x)``: in one op where ``norm`` is one of ours that takes a residual
    (``norm(x, add_to=residual)``) and has no hooks, else as the block wrote it."""
    if _takes_residual(type(norm)) and not _has_hooks(norm):
        return norm(x, add_to=residual)
    return residual + norm(x)


def _llama_layer_forward(self, *args, **kwargs) -> Tensor:
    """A pre-norm decoder layer written as Llama's (``_LLAMA_LAYER_FORWARD``) or one of its
    variants (``_PRE_NORM_FORMS``: where ``self.branch_ends`` are not None, the attention's
    output through the first before its residual addition, the MLP's added to the residual
    stream by the second): the attention's residual addition and the norm before the MLP,
    ``self.mlp_norm``, in one op (``_add_then_norm``)."""
    call = self.block_call.attention_call(args, kwargs)
    if call is None:
        return _original_class(self).forward(self, *args, **kwargs)
    residual, attention_kwargs, _ = call
    parts = self._modules  # see _train_bottleneck_forward
    normed = parts[self.input_norm](residual)
    if self.by_position:
        attention_output, _ = parts["self_attn"](normed, **attention_kwargs)
    else:
        attention_output, _ = parts["self_attn"](hidden_states=normed, **attention_kwargs)
    return _mlp_half(self, parts, attention_output, residual)


def _mlp_half(self, parts: dict, mixed: Tensor, residual: Tensor) -> Tensor:
    """A Llama-form block's second half, from its token mixer's output ``mixed``: that output (through
    ``branch_ends[0]``) added to the residual stream and normalised by ``self.mlp_norm`` in one op
    (``_add_then_norm``), the MLP (its ``mlp``, or ``self.mlp_branch``), its output added (through
    ``branch_ends[1]``)."""
    attention_end, mlp_end = self.branch_ends
    if attention_end is not None:  # None, as Llama's: no call (host time)
        mixed = attention_end(self, mixed)
    normed, hidden_states = _add_then_norm(parts[self.mlp_norm], mixed, residual)
    mlp_branch = self.mlp_branch
    mlp_output = parts["mlp"](normed) if mlp_branch is None else mlp_branch(normed)
    return hidden_states + mlp_output if mlp_end is None else mlp_end(self, mlp_output, hidden_states)


# What a variant of Llama's block does to the attention's output before its residual addition, ``end(block,
# output)``, and to the MLP's to add it to the residual stream, ``end(block, output, residual)``: ``_added(end)``
# of the first kind, or ``_norm_added``


def _first_if_pair(block: torch.nn.Module, output: Tensor | tuple[Tensor, Any]) -> Tensor:
    """gpt-oss's MLP returns ``(output, router scores)``; Qwen3-Next's ``(output, router logits)`` where an MoE."""
    return output[0] if isinstance(output, tuple) else output


def _scaled_by(factor: str) -> Callable[[torch.nn.Module, Tensor], Tensor]:
    """The branch's output times the block's ``factor`` (Granite's ``residual_multiplier``, MiniCPM3's
    ``residual_scale``)."""
    return lambda block, output: output * getattr(block, factor)


def _normed_and_scaled(norm: str) -> Callable[[torch.nn.Module, Tensor], Tensor]:
    """The branch's output through the block's ``norm``, then scaled as Granite's (HyperCLOVA X's)."""
    return lambda block, output: block._modules[norm](output) * block.residual_multiplier


def _through(child: str) -> Callable[[torch.nn.Module, Tensor], Tensor]:
    """The branch's output through the block's ``child`` (a norm: Gemma 2's; a dropout: Phi-3's)."""
    return lambda block, output: block._modules[child](output)


def _added(end: Callable[[torch.nn.Module, Tensor], Tensor]) -> Callable[[torch.nn.Module, Tensor, Tensor], Tensor]:
    """The MLP's output through ``end``, added to the residual stream."""
    return lambda block, output, residual: residual + end(block, output)


def _norm_added(norm: str) -> Callable[[torch.nn.Module, Tensor, Tensor], Tensor]:
    """The MLP's output through the block's ``norm`` and added to the residual stream in one op
    (``_norm_then_add``: Gemma 2's and 3's, GLM-4's norm after the MLP)."""
    return lambda block, output, residual: _norm_then_add(block._modules[norm], output, residual)


def _serial_layer_forward(self, *args, **kwargs) -> Tensor:
    """StableLM's layer (``_PARALLEL_OR_SERIAL_LAYER_FORWARD``): with a parallel residual its own
    forward, else Llama's with the MLP's branch through its dropout (``_llama_layer_forward``)."""
    if self.use_parallel_residual:
        return _original_class(self).forward(self, *args, **kwargs)
    return _llama_layer_forward(self, *args, **kwargs)


def _mixer_layer_forward(self, *args, **kwargs) -> Tensor:
    """A hybrid layer (``_MIXER_LAYER_FORWARD``, ``_GRANITE_HYBRID_LAYER_FORWARD``): by its
    ``uses_mixer``, Llama's form (``_llama_layer_forward``), or its other token mixer in the
    attention's place, called as the forward calls it (``_BlockCall.mixer_call``); either way the
    token mixer's residual addition and the MLP's norm in one op (``_mlp_half``)."""
    uses_mixer = self.uses_mixer()
    if uses_mixer is False:
        return _llama_layer_forward(self, *args, **kwargs)
    call = self.block_call.mixer_call(args, kwargs) if uses_mixer else None
    if call is None:
        return _original_class(self).forward(self, *args, **kwargs)
    residual, mixer_kwargs = call
    parts = self._modules  # see _train_bottleneck_forward
    mixed = parts[self.mixer](hidden_states=parts[self.input_norm](residual), **mixer_kwargs)
    return _mlp_half(self, parts, mixed, residual)


def _lfm2_layer_forward(self, *args, **kwargs) -> Tensor:
    """LFM2's layer (``_LFM2_LAYER_FORWARD``): its attention or its short convolution (called
    as the forward calls it, ``_BlockCall.mixer_call``), then the token mixer's residual
    addition and ``ffn_norm`` in one op (``_add_then_norm``)."""
    attention = self.is_attention_layer
    call = self.block_call.attention_call(args, kwargs) if attention else self.block_call.mixer_call(args, kwargs)
    if call is None:
        return _original_class(self).forward(self, *args, **kwargs)
    residual, mixer_kwargs = call[:2]
    parts = self._modules  # see _train_bottleneck_forward
    if attention:
        mixed, _ = parts["self_attn"](hidden_states=parts["operator_norm"](residual), **mixer_kwargs)
    else:
        mixed = parts["conv"](hidden_states=parts["operator_norm"](residual), **mixer_kwargs)
    normed, hidden_states = _add_then_norm(parts["ffn_norm"], mixed, residual)
    return hidden_states + parts["feed_forward"](normed)


def _parallel_hybrid_layer_forward(self, *args, **kwargs) -> tuple[Tensor]:
    """Falcon-H1's layer (``_PARALLEL_HYBRID_LAYER_FORWARD``): its Mamba layer and its attention side by
    side on the input norm's output, each scaled, then their sum's residual addition and
    ``pre_ff_layernorm`` in one op (``_add_then_norm``)."""
    call = self.block_call.attention_call(args, kwargs)
    mixer_call = self.block_call.mixer_call(args, kwargs)
    if call is None or mixer_call is None:
        return _original_class(self).forward(self, *args, **kwargs)
    residual, attention_kwargs, _ = call
    parts = self._modules  # see _train_bottleneck_forward
    normed = parts["input_layernorm"](residual)
    mamba_output = parts["mamba"](hidden_states=normed, **mixer_call[1]) * self.ssm_out_multiplier
    attention_output, _ = parts["self_attn"](hidden_states=normed * self.attention_in_multiplier, **attention_kwargs)
    mixed = attention_output * self.attn_out_multiplier + mamba_output
    normed, hidden_states = _add_then_norm(parts["pre_ff_layernorm"], mixed, residual)
    return (hidden_states + parts["feed_forward"](normed),)


def _nomic_bert_layer_forward(self, *args, **kwargs) -> Tensor:
    """NomicBERT's, GTE's and Jina v3's layer (``_NOMIC_BERT_LAYER_FORWARD``): post-norm as BERT's, each
    branch's output through its dropout, added to the residual stream and the sum normalised in one op
    (``_add_then_norm``); the attention given its input by position, as the layer gives it."""
    call = self.block_call.attention_call(args, kwargs)
    if call is None:
        return _original_class(self).forward(self, *args, **kwargs)
    residual, attention_kwargs, _ = call
    parts = self._modules  # see _train_bottleneck_forward
    attention_output, _ = parts["self_attn"](residual, **attention_kwargs)
    attention_output = parts["post_attention_dropout"](attention_output)
    hidden_states, _ = _add_then_norm(parts["post_attention_layernorm"], attention_output, residual)
    mlp_output = parts["post_mlp_dropout"](parts["mlp"](hidden_states))
    normed, _ = _add_then_norm(parts["post_mlp_layernorm"], mlp_output, hidden_states)
    return normed


def _post_norm_layer_forward(self, *args, **kwargs) -> Tensor:
    """A post-norm decoder layer (``_POST_NORM_LAYER_FORWARD``): each branch's norm and the
    residual addition after it in one op (``_norm_then_add``)."""
    call = self.block_call.attention_call(args, kwargs)
    if call is None:
        return _original_class(self).forward(self, *args, **kwargs)
    residual, attention_kwargs, _ = call
    parts = self._modules  # see _train_bottleneck_forward
    attention_output, _ = parts["self_attn"](hidden_states=residual, **attention_kwargs)
    hidden_states = _norm_then_add(parts["post_attention_layernorm"], attention_output, residual)
    return _norm_then_add(parts["post_feedforward_layernorm"], parts["mlp"](hidden_states), hidden_states)


def _gemma4_layer_forward(self, *args, **kwargs) -> Tensor:
    """Gemma 4's text layer (``_GEMMA4_LAYER_FORWARD``): the attention's residual addition and
    ``pre_feedforward_layernorm`` in one op (``_add_then_norm``), the norms after the MLP and
    after the per-layer input and their residual additions in one op each (``_norm_then_add``),
    the rest as written."""
    call = self.block_call.attention_call(args, kwargs)
    if call is None:
        return _original_class(self).forward(self, *args, **kwargs)
    residual, attention_kwargs, named = call
    parts = self._modules  # see _train_bottleneck_forward
    attention_output, _ = parts["self_attn"](hidden_states=parts["input_layernorm"](residual), **attention_kwargs)
    attention_output = parts["post_attention_layernorm"](attention_output)
    normed, residual = _add_then_norm(parts["pre_feedforward_layernorm"], attention_output, residual)
    hidden_states = parts["mlp"](normed)
    if self.enable_moe_block:
        flat = residual.reshape(-1, residual.shape[-1])
        _, top_k_weights, top_k_index = parts["router"](flat)
        experts_output = parts["experts"](parts["pre_feedforward_layernorm_2"](flat), top_k_index, top_k_weights)
        experts_output = parts["post_feedforward_layernorm_2"](experts_output.reshape(*residual.shape))
        hidden_states = parts["post_feedforward_layernorm_1"](hidden_states) + experts_output
    hidden_states = _norm_then_add(parts["post_feedforward_layernorm"], hidden_states, residual)
    if self.hidden_size_per_layer_input:
        gate = parts["act_fn"](parts["per_layer_input_gate"](hidden_states))
        per_layer = parts["per_layer_projection"](gate * named.get("per_layer_input"))
        hidden_states = _norm_then_add(parts["post_per_layer_input_norm"], per_layer, hidden_states)
    hidden_states *= self.layer_scalar
    return hidden_states


def _gpt2_block_forward(self, *args, **kwargs) -> Tensor:
    """GPT-2's block (``_GPT2_BLOCK_FORWARD``) without cross-attention: the attention's
    residual addition and ``ln_2`` in one op (``_add_then_norm``)."""
    call = self.block_call.attention_call(args, kwargs)
    if call is None or call[2].get("encoder_hidden_states") is not None:
        return _original_class(self).forward(self, *args, **kwargs)
    residual, attention_kwargs, _ = call
    parts = self._modules  # see _train_bottleneck_forward
    attention_output, _ = parts["attn"](parts["ln_1"](residual), **attention_kwargs)
    normed, hidden_states = _add_then_norm(parts["ln_2"], attention_output, residual)
    return hidden_states + parts["mlp"](normed)


class _BlockForm(NamedTuple):
    """A block forward's form: its ``replacement`` forward, the ``source`` read, its attention's
    name, the norm it fuses with the residual addition before it, and ``apart``: calls whose
    keywords are not compared (a branch the replacement hands back to the block's own forward,
    whose keywords changed between releases)."""

    replacement: Callable
    source: str
    attention: str
    norm: str
    apart: tuple[str, ...] = ()
    branch_ends: tuple[Callable | None, Callable | None] = (None, None)
    """A Llama-form variant's: what the block does to the attention's and the MLP's output before
    each residual addition."""
    mixer: str | None = None
    """The token mixer the block calls in place of its attention where ``uses_mixer`` says so
    (Qwen3.5's linear attention, Granite 4's Mamba layer), its keywords read from the forward
    (``_BlockCall.mixer_keywords``)."""
    uses_mixer: Callable[[torch.nn.Module], bool | None] | None = None
    """Whether a block calls its ``mixer`` (True) or its attention (False); None: neither read. (A
    method of the replacement, as ``mlp_branch``.)"""
    mlp_branch: Callable[[torch.nn.Module, Tensor], Tensor] | None = None
    """A Llama-form variant's MLP branch, ``mlp_branch(block, normed)``, where it is not its ``mlp``
    child (Granite MoE's)."""
    input_norm: str = "input_layernorm"
    """A pre-norm form's norm before its attention."""
    by_position: bool = False
    """Whether the block passes the attention its input by position (as the replacement then does:
    a hook on the attention sees the call as written), not as ``hidden_states=``."""

    @property
    def children(self) -> frozenset[str]:
        """What a class's forward calls to be checked against a pre-norm form."""
        return frozenset((self.input_norm, self.attention, self.norm))

    def renamed(self, input_norm: str, norm: str, mlp: str = "mlp") -> "_BlockForm":
        """This pre-norm form (of an ``mlp``) with its norms named otherwise (Llama's: CLIP's
        ``layer_norm1`` and ``layer_norm2``, Apertus's, VaultGemma's), and its MLP (Jamba's)."""
        source = self.source.replace(f"self.{self.input_norm}(", f"self.{input_norm}(")
        source = source.replace(f"self.{self.norm}(", f"self.{norm}(").replace("self.mlp(", f"self.{mlp}(")
        mlp_branch = None if mlp == "mlp" else _through(mlp)
        return self._replace(source=source, input_norm=input_norm, norm=norm, mlp_branch=mlp_branch)

    def by_position_form(self) -> "_BlockForm":
        """This form with its attention given its input by position (PaddleOCR-VL's vision layers)."""
        keyword = f"self.{self.attention}(hidden_states=hidden_states)"
        source = self.source.replace(keyword, f"self.{self.attention}(hidden_states)")
        return self._replace(source=source, by_position=True)


def _by_block_type(block: torch.nn.Module) -> bool | None:
    """Qwen3.5's and Qwen3-Next's layers: the linear attention, the attention, or (another block_type)
    neither of the two read."""
    return _LINEAR_ATTENTION_LAYERS.get(block.block_type)


_LINEAR_ATTENTION_LAYERS = {"linear_attention": True, "full_attention": False}


def _has_mamba(block: torch.nn.Module) -> bool:
    return block.mamba is not None  # Granite 4's: its Mamba layer where it has one, else its attention


def _mixer_form(attention_test: str, mlp_pair: bool) -> _BlockForm:
    source = _MIXER_LAYER_FORWARD.format(attention_test=attention_test, mlp_pair=_MLP_PAIR if mlp_pair else "")
    ends = (None, _added(_first_if_pair) if mlp_pair else None)
    return _BlockForm(
        _mixer_layer_forward,
        source,
        "self_attn",
        "post_attention_layernorm",
        branch_ends=ends,
        mixer="linear_attn",
        uses_mixer=_by_block_type,
    )


def _moe_pair_viewed(block: torch.nn.Module, output: Tensor | tuple[Tensor, Tensor], residual: Tensor) -> Tensor:
    """Llama 4's MLP branch added: an MoE layer's output, its router's logits aside, as the residual's shape."""
    if block.is_moe_layer:
        output, _ = output
    return residual + output.view(size=residual.shape)


def _moe_and_shared_mlp(block: torch.nn.Module, x: Tensor) -> Tensor:
    """Granite MoE Shared's MLP branch: its MoE, and its shared MLP beside where it has one."""
    moe_output = block._modules["block_sparse_moe"](x)
    shared_mlp = block.shared_mlp
    return moe_output if shared_mlp is None else moe_output + shared_mlp(x)


def _shared_mlp_and_moe(block: torch.nn.Module, x: Tensor) -> Tensor:
    """Granite 4's MLP branch: its shared MLP, its MoE beside where it has experts."""
    parts = block._modules
    if block.has_experts:
        return parts["block_sparse_moe"](x) + parts["shared_mlp"](x)
    return parts["shared_mlp"](x)


def _sandwich_form(after_attention: str, before_mlp: str, after_mlp: str) -> _BlockForm:
    names = dict(after_attention=after_attention, before_mlp=before_mlp, after_mlp=after_mlp)
    source = _SANDWICH_LAYER_FORWARD.format(**names)
    ends = (_through(after_attention), _norm_added(after_mlp))
    return _BlockForm(_llama_layer_forward, source, "self_attn", before_mlp, branch_ends=ends)


# Checked on every transformers class of a model: Llama's and the models built like it (Mistral, Qwen2/3 and
# their MoE and VL models, Gemma, SmolLM3, GLM, DeepSeek-V3, ...).
_LLAMA_FORM = _BlockForm(_llama_layer_forward, _LLAMA_LAYER_FORWARD, "self_attn", "post_attention_layernorm")


def _scaled_form(factor: str) -> _BlockForm:
    """Granite's form, each branch scaled by the block's ``factor`` before its residual addition."""
    scaled = _scaled_by(factor)
    source = _SCALED_LAYER_FORWARD.replace("residual_multiplier", factor)
    return _LLAMA_FORM._replace(source=source, branch_ends=(scaled, _added(scaled)))


_SCALED_FORM = _scaled_form("residual_multiplier")  # Granite's
# HyperCLOVA X's (Peri-LN): Granite's, each branch's output normalised before it is scaled
_PERI_NORM_SCALED_FORM = _LLAMA_FORM._replace(
    source=_SANDWICH_LAYER_FORWARD.format(
        after_attention="post_norm1", before_mlp="post_attention_layernorm", after_mlp="post_norm2"
    ).replace("= residual + hidden_states\n", "= residual + hidden_states * self.residual_multiplier\n"),
    branch_ends=(_normed_and_scaled("post_norm1"), _added(_normed_and_scaled("post_norm2"))),
)
# The forms a class calling Llama's children may have besides (Gemma 2 and 3, Gemma 4's vision encoder; GLM-4;
# gpt-oss; Phi-3, Phi-4-multimodal; Granite, Granite MoE (Shared, SWA), Granite 4; Llama 4; Gemma 4's text layer;
# StableLM's; Qwen3.5's and Qwen3-Next's hybrid layers; those of other names: CLIP's, Apertus's, Jamba's, ...), tried
# in turn; a class of none is left with its reason against the first whose children its forward calls.
_PRE_NORM_FORMS = (
    _LLAMA_FORM,
    _sandwich_form("post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
    _sandwich_form("post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm"),
    _LLAMA_FORM._replace(source=_PAIR_MLP_LAYER_FORWARD, branch_ends=(None, _added(_first_if_pair))),
    _LLAMA_FORM._replace(
        source=_DROPOUT_LAYER_FORWARD,
        branch_ends=(_through("resid_attn_dropout"), _added(_through("resid_mlp_dropout"))),
    ),
    _LLAMA_FORM.renamed("layer_norm1", "layer_norm2"),  # CLIP's, SigLIP's, BLIP's, ... encoder layers
    _LLAMA_FORM.renamed("layer_norm1", "layer_norm2").by_position_form(),  # PaddleOCR-VL's, VideoLLaMA3's vision
    _LLAMA_FORM.renamed("attention_layernorm", "feedforward_layernorm"),  # Apertus's
    _LLAMA_FORM.renamed("input_layernorm", "pre_feedforward_layernorm"),  # VaultGemma's
    _LLAMA_FORM.renamed("input_layernorm", "pre_ff_layernorm", "feed_forward"),  # Jamba's attention layers
    _BlockForm(  # Falcon-H1's
        _parallel_hybrid_layer_forward, _PARALLEL_HYBRID_LAYER_FORWARD, "self_attn", "pre_ff_layernorm", mixer="mamba"
    ),
    _SCALED_FORM,
    _scaled_form("residual_scale"),  # MiniCPM3's
    _PERI_NORM_SCALED_FORM,
    _SCALED_FORM._replace(source=_GRANITE_MOE_LAYER_FORWARD, mlp_branch=_through("block_sparse_moe")),
    _SCALED_FORM._replace(source=_GRANITE_SHARED_LAYER_FORWARD, mlp_branch=_moe_and_shared_mlp),
    _SCALED_FORM._replace(
        replacement=_mixer_layer_forward,
        source=_GRANITE_HYBRID_LAYER_FORWARD,
        mixer="mamba",
        uses_mixer=_has_mamba,
        mlp_branch=_shared_mlp_and_moe,
    ),
    _LLAMA_FORM._replace(
        source=_LLAMA4_LAYER_FORWARD, branch_ends=(None, _moe_pair_viewed), mlp_branch=_through("feed_forward")
    ),
    _BlockForm(_gemma4_layer_forward, _GEMMA4_LAYER_FORWARD, "self_attn", "pre_feedforward_layernorm"),
    _LLAMA_FORM._replace(
        replacement=_serial_layer_forward,
        source=_PARALLEL_OR_SERIAL_LAYER_FORWARD,
        branch_ends=(None, _added(_through("dropout"))),
    ),
    *(
        _mixer_form(test, mlp_pair)
        for test in ("else", 'elif self.block_type == "full_attention"')
        for mlp_pair in (False, True)
    ),
)
# Checked on every transformers class of a model calling a post-norm block's children (``_POST_NORM_CHILDREN``):
# OLMo 2's, OLMo 3's, EXAONE 4's.
_POST_NORM_FORM = _BlockForm(
    _post_norm_layer_forward, _POST_NORM_LAYER_FORWARD, "self_attn", "post_attention_layernorm"
)
# NomicBERT's, GTE's, Jina v3's, checked on every transformers class calling its children
# (``_NOMIC_BERT_CHILDREN``).
_NOMIC_BERT_FORM = _BlockForm(
    _nomic_bert_layer_forward, _NOMIC_BERT_LAYER_FORWARD, "self_attn", "post_attention_layernorm", by_position=True
)
# LFM2's, checked on every transformers class calling its children (``_LFM2_CHILDREN``).
_LFM2_FORM = _BlockForm(_lfm2_layer_forward, _LFM2_LAYER_FORWARD, "self_attn", "ffn_norm", mixer="conv")
# (model, block class) -> its form: the other blocks, checked on their own class.
_ADD_NORM_BLOCKS = {
    ("gpt2", "GPT2Block"): _BlockForm(_gpt2_block_forward, _GPT2_BLOCK_FORWARD, "attn", "ln_2", ("crossattention",))
}


def _add_norm_block_check(call: _BlockCall | str, norm: str) -> Callable[[torch.nn.Module], dict[str, Any] | str]:
    """The ``prepare`` of a block's rule (``call``: its class's ``_block_call``): {} when its
    replacement forward computes what the block's does, else why not."""

    def prepare(block):
        if isinstance(call, str):
            return call
        if not isinstance(getattr(block, norm, None), torch.nn.Module):
            return f"its {norm} is None: no norm after the residual addition (StableLM's parallel residual)"
        # A hook on the block could expect its forward's calls; one on the norm, its one input and output.
        return _hooked_reason(block, ("", norm)) or {}

    return prepare


_POST_NORM_CHILDREN = frozenset(("self_attn", "post_attention_layernorm", "mlp", "post_feedforward_layernorm"))
_LFM2_CHILDREN = frozenset(("operator_norm", "self_attn", "conv", "ffn_norm", "feed_forward"))
_NOMIC_BERT_CHILDREN = frozenset(("self_attn", "post_attention_layernorm", "mlp", "post_mlp_layernorm"))


def _calls_children(cls: type, children: frozenset[str], but: str = "") -> bool:
    """Whether ``cls``'s forward calls ``children`` (and not ``but``): what a block of a form
    calls (a pre-norm form's ``children``; a post-norm block's, without an ``input_layernorm``),
    whose forward is then checked against the forms: converted, or left with the reason."""
    forward = inspect.unwrap(cls.forward)
    if not isinstance(forward, types.FunctionType):
        return False
    names = forward.__code__.co_names
    return children.issubset(names) and but not in names


def _block_form(cls: type) -> _BlockForm | None:
    """The form a transformers class is checked against, by the children its forward calls: a
    pre-norm form (``_pre_norm_form``), the post-norm form, LFM2's; None for another class."""
    form = _pre_norm_form(cls)
    if form is not None:
        return form
    if _calls_children(cls, _POST_NORM_CHILDREN, but="input_layernorm"):
        return _POST_NORM_FORM
    if _calls_children(cls, _LFM2_CHILDREN):
        return _LFM2_FORM
    if _calls_children(cls, _NOMIC_BERT_CHILDREN):
        return _NOMIC_BERT_FORM
    return None


def _pre_norm_form(cls: type) -> _BlockForm | None:
    """The first of ``_PRE_NORM_FORMS`` whose source is ``cls``'s forward; where none is, the
    first whose children the forward calls (the block is then left with its reason against it);
    None where it calls no form's children (the MLP by any name: Granite MoE's block_sparse_moe)."""
    candidates = [form for form in _PRE_NORM_FORMS if _calls_children(cls, form.children)]
    fallback = candidates[0] if candidates else None
    return next((f for f in candidates if isinstance(_block_call(cls.forward, f), _BlockCall)), fallback)


def _timm_vit_block_forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """timm's ViT block (``_TIMM_VIT_BLOCK_FORWARD``): the attention branch's residual addition
    and ``norm2`` in one op (``_add_then_norm``)."""
    parts = self._modules  # see _train_bottleneck_forward
    attention = parts["attn"](parts["norm1"](x), attn_mask=attn_mask, is_causal=is_causal)
    normed, x = _add_then_norm(parts["norm2"], parts["drop_path1"](parts["ls1"](attention)), x)
    return x + parts["drop_path2"](parts["ls2"](parts["mlp"](normed)))


def _timm_eva_block_forward(
    self, x: Tensor, rope: Tensor | None = None, attn_mask: Tensor | None = None, is_causal: bool = False
) -> Tensor:
    """timm's EVA block (``_TIMM_EVA_BLOCK_FORWARD``): as ``_timm_vit_block_forward``, its
    branches scaled by ``gamma_1`` / ``gamma_2`` where set."""
    parts = self._modules  # see _train_bottleneck_forward
    attention = parts["attn"](parts["norm1"](x), rope=rope, attn_mask=attn_mask, is_causal=is_causal)
    if self.gamma_1 is not None:
        attention = self.gamma_1 * attention
    normed, x = _add_then_norm(parts["norm2"], parts["drop_path1"](attention), x)
    mlp_output = parts["mlp"](normed)
    if self.gamma_2 is not None:
        mlp_output = self.gamma_2 * mlp_output
    return x + parts["drop_path2"](mlp_output)


def _timm_swin_block_forward(self, x: Tensor) -> Tensor:
    """timm's Swin block (``_TIMM_SWIN_BLOCK_FORWARD``): the attention branch's residual addition
    and ``norm2`` (over the channels: the same before the tokens' reshape) in one op."""
    parts = self._modules  # see _train_bottleneck_forward
    B, H, W, C = x.shape
    normed, x = _add_then_norm(parts["norm2"], parts["drop_path1"](self._attn(parts["norm1"](x))), x)
    x = x.reshape(B, -1, C)
    x = x + parts["drop_path2"](parts["mlp"](normed.reshape(B, -1, C)))
    return x.reshape(B, H, W, C)


# timm's blocks' forwards (timm 1.0.x), checked as the transformers forms: ViT's (ViT, DeiT, DINOv2's LayerScale,
# ...), EVA's (EVA-02), Swin's
_TIMM_VIT_BLOCK_FORWARD = """
x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
return x
"""
_TIMM_EVA_BLOCK_FORWARD = """
x_attn = self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask, is_causal=is_causal)
if self.gamma_1 is not None:
    x_attn = self.gamma_1 * x_attn
x = x + self.drop_path1(x_attn)
x_mlp = self.mlp(self.norm2(x))
if self.gamma_2 is not None:
    x_mlp = self.gamma_2 * x_mlp
x = x + self.drop_path2(x_mlp)
return x
"""
_TIMM_SWIN_BLOCK_FORWARD = """
B, H, W, C = x.shape
x = x + self.drop_path1(self._attn(self.norm1(x)))
x = x.reshape(B, -1, C)
x = x + self.drop_path2(self.mlp(self.norm2(x)))
x = x.reshape(B, H, W, C)
return x
"""
# (module, class, replacement, the source it computes as); each hands norm2 the residual
_TIMM_BLOCKS = (
    ("timm.models.vision_transformer", "Block", _timm_vit_block_forward, _TIMM_VIT_BLOCK_FORWARD),
    ("timm.models.eva", "EvaBlock", _timm_eva_block_forward, _TIMM_EVA_BLOCK_FORWARD),
    ("timm.models.swin_transformer", "SwinTransformerBlock", _timm_swin_block_forward, _TIMM_SWIN_BLOCK_FORWARD),
)


@functools.cache
def _forward_differs(forward: Callable, source: str, replacement: Callable) -> str | None:
    """Why ``forward`` may not be ``replacement``, whose body computes what ``source`` does: its
    body is not ``source`` (docstring and annotations aside) or its parameters are not the
    replacement's (names, kinds, defaults); None when it may."""
    read = _forward_body(forward)
    if isinstance(read, str):
        return read
    body, signature = read
    if ast.dump(body) != ast.dump(_parsed(source)):
        return "its forward is not the one read: the residual addition stays apart"
    parameters, expected = (
        [(p.name, p.kind, p.default) for p in s.parameters.values()]
        for s in (signature, inspect.signature(replacement))
    )
    return None if parameters == expected else f"its forward's parameters are not the ones read: {signature}"


def _bert_output_forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
    """BERT's attention and MLP outputs (``_BERT_OUTPUT_FORWARD``): the residual addition and the
    LayerNorm of the sum in one op (``_add_then_norm``)."""
    parts = self._modules  # see _train_bottleneck_forward
    normed, _ = _add_then_norm(parts["LayerNorm"], parts["dropout"](parts["dense"](hidden_states)), input_tensor)
    return normed


def _vit_layer_forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs) -> Tensor:
    """transformers' ViT layer (``_VIT_LAYER_FORWARD``): the attention's residual addition and
    ``layernorm_after`` in one op (``_add_then_norm``)."""
    parts = self._modules  # see _train_bottleneck_forward
    attention_output, _ = parts["attention"](parts["layernorm_before"](hidden_states), attention_mask, **kwargs)
    normed, hidden_states = _add_then_norm(parts["layernorm_after"], parts["dropout"](attention_output), hidden_states)
    return parts["dropout"](parts["mlp"](normed)) + hidden_states


# BERT's post-norm outputs (``BertSelfOutput``, ``BertOutput``) and transformers' ~80 copies of them (RoBERTa,
# XLM-R, ELECTRA, DeBERTa, BigBird, LayoutLM, BLIP-2's Q-Former, ...)
_BERT_OUTPUT_FORWARD = """
hidden_states = self.dense(hidden_states)
hidden_states = self.dropout(hidden_states)
hidden_states = self.LayerNorm(hidden_states + input_tensor)
return hidden_states
"""
# ViT's layer (DeiT, ViTMAE, ViTMSN, I-JEPA, AST, ViViT, VideoPrism)
_VIT_LAYER_FORWARD = """
residual = hidden_states
hidden_states = self.layernorm_before(hidden_states)
hidden_states, _ = self.attention(hidden_states, attention_mask, **kwargs)
hidden_states = self.dropout(hidden_states)
hidden_states = hidden_states + residual
residual = hidden_states
hidden_states = self.layernorm_after(hidden_states)
hidden_states = self.mlp(hidden_states)
hidden_states = self.dropout(hidden_states)
hidden_states = hidden_states + residual
return hidden_states
"""
# transformers blocks matched by their forward's source (as read in 5.17 and 5.25), whatever their class:
# (the replacement, the source it computes as, the norm it hands the residual)
_SOURCE_BLOCKS = (
    (_bert_output_forward, _BERT_OUTPUT_FORWARD, "LayerNorm"),
    (_vit_layer_forward, _VIT_LAYER_FORWARD, "layernorm_after"),
)


def _source_block(cls: type) -> tuple[Callable, str] | None:
    """``(replacement, norm)`` of the first of ``_SOURCE_BLOCKS`` that ``cls``'s forward is."""
    forward = inspect.unwrap(cls.__dict__.get("forward"))
    if not isinstance(forward, types.FunctionType):
        return None
    for replacement, source, norm in _SOURCE_BLOCKS:
        if norm in forward.__code__.co_names and _forward_differs(forward, source, replacement) is None:
            return replacement, norm
    return None


def _norm_unhooked(norm: str) -> Callable[[torch.nn.Module], dict[str, Any] | str]:
    return lambda block: _hooked_reason(block, ("", norm)) or {}


def _timm_block_check(source: str, replacement: Callable) -> Callable[[torch.nn.Module], dict[str, Any] | str]:
    def prepare(block):
        return _forward_differs(_original_class(block).forward, source, replacement) or _norm_unhooked("norm2")(block)

    return prepare


def _add_norm_block_rules(classes: Iterable[type] = ()) -> dict[type, _Rule]:
    """Rules for the pre-norm blocks of ``_ADD_NORM_BLOCKS`` and timm's ViT block already
    imported, and for those of ``classes`` (a model's transformers classes) whose forward is
    one of ``_PRE_NORM_FORMS`` or ``_SOURCE_BLOCKS``: the block's children traced and
    converted as any module's (its norms to ours, which take the residual), its forward the
    replacement."""
    blocks = [
        (cls, form)
        for (model, name), form in _ADD_NORM_BLOCKS.items()
        if (cls := _transformers_class(model, name)) is not None
    ]
    listed = {cls for cls, _ in blocks}
    blocks += [(cls, form) for cls in set(classes) - listed if (form := _block_form(cls)) is not None]
    rules = {}
    for cls, form in blocks:
        call = _block_call(cls.forward, form)
        replacement = _replacement(cls, form.replacement)
        if isinstance(call, _BlockCall):
            replacement.block_call = call  # a class attribute: the forward reads it, torch.compile too
            replacement.branch_ends, replacement.mlp_norm = form.branch_ends, form.norm
            replacement.mixer, replacement.uses_mixer = form.mixer, form.uses_mixer
            replacement.mlp_branch, replacement.input_norm = form.mlp_branch, form.input_norm
            replacement.by_position = form.by_position
        rules[cls] = _Rule(
            replacement, "ResidualNorm", _add_norm_block_check(call, form.norm), opaque=False, residual_norm=form.norm
        )
    for cls in classes:
        if (found := _source_block(cls)) is not None:
            forward, norm = found
            rules[cls] = _Rule(
                _replacement(cls, forward), "ResidualNorm", _norm_unhooked(norm), opaque=False, residual_norm=norm
            )
    for module, name, forward, source in _TIMM_BLOCKS:
        (cls,) = _loaded(module, name)
        if cls is not None:
            check = _timm_block_check(source, forward)
            rules[cls] = _Rule(_replacement(cls, forward), "ResidualNorm", check, opaque=False, residual_norm="norm2")
    return rules


# ---- ResNet blocks (timm, torchvision) ------------------------------------------------------------------------


def _batch_norm_relu(bn: torch.nn.Module, x: Tensor, relu: torch.nn.Module, shortcut: Tensor | None = None) -> Tensor:
    """``relu(bn(x))``, or ``relu(bn(x) + shortcut)`` as a ResNet block ends, in one op
    (``bn.fused``). As the block writes it where that op would not compute the same: ``bn``
    no longer our BatchNorm2d (``convert_sync_batchnorm`` after patch: its forward syncs the
    statistics, ``.fused`` would not), or a shortcut of another shape or dtype than x's (a
    block given an fp32 input under autocast)."""
    if type(bn) is gnn.BatchNorm2d and (shortcut is None or (shortcut.shape, shortcut.dtype) == (x.shape, x.dtype)):
        return bn.fused(x, "relu", shortcut)
    x = bn(x)
    if shortcut is not None:
        x += shortcut
    return relu(x)


def _shortcut(parts: dict[str, torch.nn.Module], x: Tensor) -> Tensor:
    downsample = parts.get("downsample")  # absent: set to None before any module (an attribute, then)
    return x if downsample is None else downsample(x)


def _timm_basic_block_forward(self, x: Tensor) -> Tensor:
    """timm's BasicBlock (no se, no drop_path), bn2, the shortcut's addition and act2 in one op."""
    parts = self._modules  # see _train_bottleneck_forward
    shortcut = x
    x = parts["conv1"](x)
    x = parts["bn1"](x)
    x = parts["drop_block"](x)
    x = parts["act1"](x)
    x = parts["aa"](x)
    return _batch_norm_relu(parts["bn2"], parts["conv2"](x), parts["act2"], _shortcut(parts, shortcut))


def _timm_bottleneck_forward(self, x: Tensor) -> Tensor:
    """timm's Bottleneck (no se, no drop_path), bn3, the shortcut's addition and act3 in one op."""
    parts = self._modules  # see _train_bottleneck_forward
    shortcut = x
    x = parts["conv1"](x)
    x = parts["bn1"](x)
    x = parts["act1"](x)
    x = parts["conv2"](x)
    x = parts["bn2"](x)
    x = parts["drop_block"](x)
    x = parts["act2"](x)
    x = parts["aa"](x)
    return _batch_norm_relu(parts["bn3"], parts["conv3"](x), parts["act3"], _shortcut(parts, shortcut))


def _torchvision_basic_block_forward(self, x: Tensor) -> Tensor:
    """torchvision's BasicBlock, each BatchNorm and the ReLU after it in one op (bn2's with the
    shortcut's addition), in place of its one ``relu`` module, which its forward calls twice."""
    parts = self._modules  # see _train_bottleneck_forward
    relu = parts["relu"]
    out = _batch_norm_relu(parts["bn1"], parts["conv1"](x), relu)
    return _batch_norm_relu(parts["bn2"], parts["conv2"](out), relu, _shortcut(parts, x))


def _torchvision_bottleneck_forward(self, x: Tensor) -> Tensor:
    """torchvision's Bottleneck, each BatchNorm and the ReLU after it in one op (bn3's with the
    shortcut's addition), in place of its one ``relu`` module, which its forward calls three times."""
    parts = self._modules  # see _train_bottleneck_forward
    relu = parts["relu"]
    out = _batch_norm_relu(parts["bn1"], parts["conv1"](x), relu)
    out = _batch_norm_relu(parts["bn2"], parts["conv2"](out), relu)
    return _batch_norm_relu(parts["bn3"], parts["conv3"](out), relu, _shortcut(parts, x))


def _train_bottleneck_forward(self, x: Tensor) -> Tensor:
    """gpukernels.train's Bottleneck (its ResNet when neither timm nor torchvision is installed),
    bn3, the shortcut's addition and act3 in one op.

    The replacement forwards read their blocks' submodules from the block's table of them
    (``_modules``, where ``Module.__setattr__`` puts every module assigned), not as
    attributes: ``self.conv1`` is found only by ``Module.__getattr__``, after a failed
    attribute lookup, about 7k host instructions a read (a patched ResNet-50 step reads
    about 150)."""
    parts = self._modules
    shortcut = _shortcut(parts, x)
    out = parts["act1"](parts["bn1"](parts["conv1"](x)))
    out = parts["act2"](parts["bn2"](parts["conv2"](out)))
    return _batch_norm_relu(parts["bn3"], parts["conv3"](out), parts["act3"], shortcut)


# module, class, replacement forward, the BatchNorms it calls .fused on (the last one adds the shortcut), the
# activation module it computes relu in place of calling, the modules that must be None (they would run
# between the last BatchNorm and the addition). Read in timm 1.0.31 and torchvision 0.26.
_RESIDUAL_BLOCKS = (
    ("timm.models.resnet", "BasicBlock", _timm_basic_block_forward, ("bn2",), "act2", ("se", "drop_path")),
    ("timm.models.resnet", "Bottleneck", _timm_bottleneck_forward, ("bn3",), "act3", ("se", "drop_path")),
    ("torchvision.models.resnet", "BasicBlock", _torchvision_basic_block_forward, ("bn1", "bn2"), "relu", ()),
    ("torchvision.models.resnet", "Bottleneck", _torchvision_bottleneck_forward, ("bn1", "bn2", "bn3"), "relu", ()),
    ("gpukernels.train.models", "Bottleneck", _train_bottleneck_forward, ("bn3",), "act3", ()),
)


def _residual_block_check(
    batch_norms: tuple[str, ...], relu: str, absent: tuple[str, ...]
) -> Callable[[torch.nn.Module], dict[str, Any] | str]:
    """The ``prepare`` of a ResNet block's rule: {} when its replacement forward computes what
    the block's does, else why not."""

    def prepare(block):
        for name in absent:
            if getattr(block, name) is not None:
                return f"{name} is set: it runs between {batch_norms[-1]} and the shortcut's addition"
        for name in batch_norms:
            bn = getattr(block, name)
            if type(bn) not in (torch.nn.BatchNorm2d, gnn.BatchNorm2d):
                return f"{name} is a {type(bn).__name__}, not torch's BatchNorm2d (or ours)"
            if getattr(bn, "activation", "none") != "none":
                return f"{name} already applies {bn.activation}"
        activation, why = _activation(getattr(block, relu))
        if activation != "relu":  # the only activation the op applies after a residual
            return f"{relu} computes {activation}, not relu" if activation else f"{relu}: {why}"
        # A hook on the block could expect its forward's calls; those on the others would no longer run. Sharing
        # does not matter: the modules stay where they are, the BatchNorms' state kept by .fused as by forward.
        return _hooked_reason(block, ("", *batch_norms, relu)) or {}

    return prepare


def _residual_block_rules() -> dict[type, _Rule]:
    """Rules for the ResNet blocks of the timm and torchvision modules already imported: the
    block's children traced and converted as any module's (its BatchNorms to ours, which the
    replacement forward calls ``.fused`` on), the activation module it computes in place of
    calling left where it is."""
    rules = {}
    for module, name, forward, batch_norms, relu, absent in _RESIDUAL_BLOCKS:
        (cls,) = _loaded(module, name)
        if cls is not None:
            rules[cls] = _Rule(
                _replacement(cls, forward),
                "ResidualBlock",
                _residual_block_check(batch_norms, relu, absent),
                opaque=False,
                bypassed=(relu,),
            )
    return rules


# ---- rotary embeddings inside attention -----------------------------------------------------------------------

_ROPE_GLOBAL = "apply_rotary_pos_emb"
# The global a replacement attention's forward reads instead, set in its module beside
# transformers' own (which stays as it is, for every module patch leaves)
_ROPE_ALIAS = "_gpukernels_apply_rotary_pos_emb"


def _reading_global_as(function: Callable, name: str, alias: str) -> types.FunctionType | None:
    """A copy of ``function`` that reads the global ``alias`` where it read ``name`` (its
    code's name renamed: same module globals, which torch.compile guards as the module's),
    each ``functools.wraps`` wrapper around it (transformers' renames of deprecated
    arguments) copied to call the copy; None when a layer is no plain function, a wrapper
    holds what it wraps elsewhere than in its closure, or the innermost function reads no
    global ``name`` or uses the name otherwise too."""
    if not isinstance(function, types.FunctionType):
        return None
    inner = function.__dict__.get("__wrapped__")
    code, closure = function.__code__, function.__closure__
    if inner is None:
        uses = [i.opname for i in dis.get_instructions(code) if i.argval == name]
        if not uses or any(op != "LOAD_GLOBAL" for op in uses):
            return None
        code = code.replace(co_names=tuple(alias if n == name else n for n in code.co_names))
        copied_inner = None
    else:
        copied_inner = _reading_global_as(inner, name, alias)
        cells = closure or ()
        if copied_inner is None or not any(_holds(cell, inner) for cell in cells):
            return None
        closure = tuple(types.CellType(copied_inner) if _holds(cell, inner) else cell for cell in cells)
    copy = types.FunctionType(code, function.__globals__, function.__name__, function.__defaults__, closure)
    copy.__kwdefaults__ = function.__kwdefaults__
    for attribute in ("__module__", "__qualname__", "__doc__", "__annotations__"):
        setattr(copy, attribute, getattr(function, attribute))
    copy.__dict__.update(function.__dict__)
    if copied_inner is not None:
        copy.__wrapped__ = copied_inner
    return copy


def _holds(cell: types.CellType, value: Any) -> bool:
    try:
        return cell.cell_contents is value
    except ValueError:  # an empty cell
        return False


def _forward_globals(cls: type) -> dict:
    """The globals the innermost function of ``cls.forward`` (under its wrappers) reads: its module's."""
    return inspect.unwrap(cls.forward).__globals__


def _reads_rope_global(cls: type) -> bool:
    """Whether ``cls``'s forward names its module's ``apply_rotary_pos_emb`` (an attention's)."""
    forward = inspect.unwrap(cls.forward)
    return isinstance(forward, types.FunctionType) and _ROPE_GLOBAL in forward.__code__.co_names


class _RopeForm(NamedTuple):
    """Which of ours a module's ``apply_rotary_pos_emb`` computes, as the probe found it."""

    interleaved: bool  # rotate_half of adjacent elements (Cohere's), not of halves (Llama's)
    trig: str = "each"  # how the cos and sin handed over give each rotated element's (_TRIG)
    partial: bool = False  # fewer elements rotated than a head has, the rest as they are (GPT-NeoX's): theirs too
    one_tensor: bool = False  # theirs rotates one tensor a call, (x, cos, sin[, unsqueeze_dim]) (Gemma 3n's and 4's)


# How a form's cos and sin give each rotated element's, and how many elements they rotate: as they are
# (Llama's, Cohere's); the first half of each, each element twice (GLM's interleaved pairs); a half's, for
# both halves (gpt-oss's)
_TRIG = {
    "each": (lambda t: t, lambda width: width),
    "first_half_twice": (
        lambda t: t[..., : t.shape[-1] // 2].repeat_interleave(2, dim=-1),
        lambda width: width // 2 * 2,
    ),
    "one_half": (lambda t: torch.cat((t, t), dim=-1), lambda width: 2 * width),
}
_ROPE_FORMS = (
    _RopeForm(False),
    _RopeForm(True),
    _RopeForm(True, "first_half_twice"),
    _RopeForm(False, "one_half"),
    _RopeForm(False, one_tensor=True),
)


def _rope_in_place_of(theirs: Callable, form: _RopeForm) -> Callable:
    """transformers' ``apply_rotary_pos_emb`` as ours in ``form`` for the calls ``(q, k, cos,
    sin)`` and ``(q, k, cos, sin, unsqueeze_dim)`` (by position or name; in a ``one_tensor``
    form ``(x, cos, sin)`` and ``(x, cos, sin, unsqueeze_dim)``) whose shapes ours takes (a
    cos narrower than a head where theirs rotates part of it); any other call (other
    arguments, no k) as ``theirs`` (which the probe checked on those calls: ``_rope_form``)."""
    one_tensor = form.one_tensor
    arities = (3, 4) if one_tensor else (4, 5)  # without and with unsqueeze_dim

    def rope_or_theirs(*args, **kwargs):
        if len(args) in arities:
            if one_tensor:
                (q, cos, sin), k = args[:3], None
            else:
                q, k, cos, sin = args[:4]
            unsqueeze_dim = args[-1] if len(args) == arities[1] else kwargs.pop("unsqueeze_dim", 1)
            if (
                not kwargs
                and type(unsqueeze_dim) is int
                and unsqueeze_dim in (1, 2)
                and (k is not None or one_tensor)  # some take q alone (k=None)
                and q.dim() == 4
                and cos.dim() == 3
                and cos.shape[-1] % 2 == 0  # as the probe's: an odd one goes to theirs
                and ((rotated := _TRIG[form.trig][1](cos.shape[-1])) == q.shape[-1] or form.partial)
                and rotated <= q.shape[-1]
                and not cos.requires_grad
            ):
                if form.trig != "each":
                    cos, sin = map(_TRIG[form.trig][0], (cos, sin))
                embedded = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim, interleaved=form.interleaved)
                return embedded[0] if one_tensor else embedded
            if len(args) == arities[0] and unsqueeze_dim != 1:
                kwargs["unsqueeze_dim"] = unsqueeze_dim
        return theirs(*args, **kwargs)

    rope_or_theirs.__wrapped__ = theirs
    return rope_or_theirs


@functools.cache
def _rope_attention_forward(cls: type) -> Callable | None:
    """``cls.forward`` calling ours in place of its module's ``apply_rotary_pos_emb``, in the
    form the probe finds that to compute (where it finds none, the rule's check leaves the
    attention: ``_rope_checked``); None where it cannot be made (see ``_reading_global_as``).
    One per class: its replacement's."""
    module_globals = _forward_globals(cls)
    theirs = module_globals.get(_ROPE_GLOBAL)
    forward = None if theirs is None else _reading_global_as(cls.forward, _ROPE_GLOBAL, _ROPE_ALIAS)
    if forward is not None:
        form = _rope_form(theirs)
        if isinstance(form, _RopeForm):
            module_globals.setdefault(_ROPE_ALIAS, _rope_in_place_of(theirs, form))
        forward.__doc__ = "The attention's forward, its rotary embedding of queries and keys gpukernels'."
    return forward


def _rope_math(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1, form: _RopeForm = _ROPE_FORMS[0]
) -> tuple[Tensor, Tensor]:
    """What ours computes in ``form`` (``ops/rope.py``), in torch ops: ``x * cos +
    rotate_half(x) * sin`` on a head's first ``cos.shape[-1]`` elements, the rest as they are."""

    def rotate_half(x: Tensor) -> Tensor:
        if form.interleaved:
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        first, second = x.chunk(2, dim=-1)
        return torch.cat((-second, first), dim=-1)

    cos, sin = (_TRIG[form.trig][0](t).unsqueeze(unsqueeze_dim) for t in (cos, sin))
    rotated = cos.shape[-1]
    return tuple(
        torch.cat((x[..., :rotated] * cos + rotate_half(x[..., :rotated]) * sin, x[..., rotated:]), dim=-1)
        for x in (q, k)
    )


def _rope_probe_error(theirs: Callable, form: _RopeForm, rotated: int = 8) -> float | str:
    """The largest difference between ``theirs`` and ours in ``form`` on float64 probes of
    each call ours takes in its place (``_rope_in_place_of``): ``(q, k, cos, sin)`` (``(q, cos,
    sin)`` in a ``one_tensor`` form) with heads before time, and heads after with
    ``unsqueeze_dim=2`` by position and by name
    (grouped-query k, heads of 8 elements, cos and sin rotating ``rotated`` of them in
    ``form``, random: any values, not only a rotation's); or why theirs could not be run. A
    fifth parameter that means something else (position ids) fails it. Against torch ops,
    not our op, so that the check does not depend on the backend selected (one for CUDA
    tensors only cannot run the CPU probe)."""
    width = rotated // 2 if form.trig == "one_half" else rotated
    g = torch.Generator().manual_seed(0)
    error = 0.0
    for unsqueeze_dim, q_shape, k_shape, keywords in (
        (1, (2, 4, 3, 8), (2, 2, 3, 8), False),
        (2, (2, 3, 4, 8), (2, 3, 2, 8), False),
        (2, (2, 3, 4, 8), (2, 3, 2, 8), True),
    ):
        q, k, cos, sin = (
            torch.randn(shape, generator=g, dtype=torch.float64)
            for shape in (q_shape, k_shape, (2, 3, width), (2, 3, width))
        )
        tensors = (q,) if form.one_tensor else (q, k)
        try:
            with torch.no_grad():
                if unsqueeze_dim == 1:
                    result = theirs(*tensors, cos, sin)
                elif keywords:
                    result = theirs(*tensors, cos, sin, unsqueeze_dim=unsqueeze_dim)
                else:
                    result = theirs(*tensors, cos, sin, unsqueeze_dim)
                expected = _rope_math(q, k, cos, sin, unsqueeze_dim, form)
                if form.one_tensor:
                    result, expected = (result,), expected[:1]
                error = max(error, *((a - b).abs().max().item() for a, b in zip(result, expected, strict=True)))
        except Exception as failure:
            return _first_line(failure)
    return error


@functools.cache
def _rope_form(theirs: Callable) -> _RopeForm | str:
    """The form of ours (``_ROPE_FORMS``) that ``theirs`` computes on the probes
    (``_rope_probe_error``), with ``partial`` where it computes that form rotating half a
    head too (theirs errs or differs there: calls with such a cos go to it); or why none."""
    errors = []
    for form in _ROPE_FORMS:
        error = _rope_probe_error(theirs, form)
        if not isinstance(error, str) and error <= _PROBE_TOLERANCE:
            partial_error = _rope_probe_error(theirs, form, rotated=4)
            return form._replace(partial=not isinstance(partial_error, str) and partial_error <= _PROBE_TOLERANCE)
        errors.append(error)
    differences = [error for error in errors if not isinstance(error, str)]
    if not differences:
        return f"{_ROPE_GLOBAL} could not be checked on a CPU float64 probe ({errors[0]})"
    return (
        f"its {_ROPE_GLOBAL} computes none of ours, q * cos + rotate_half(q) * sin with halves or adjacent "
        f"elements rotated (least max error {min(differences):.1e})"
    )


def _rope_checked(attention: torch.nn.Module) -> dict[str, Any] | str:
    form = _rope_form(_forward_globals(type(attention)).get(_ROPE_GLOBAL))
    return form if isinstance(form, str) else {}


_NORM_KINDS = frozenset(("LayerNorm", "RMSNorm", "LayerNorm2d", "RMSNorm2d"))
# What a class's namespace holds besides its methods, or an ``__init__`` that only sets state up
_INIT_ONLY = frozenset(
    ("__module__", "__qualname__", "__doc__", "__init__", "__firstlineno__", "__static_attributes__", "__dict__",
     "__weakref__", "__annotations__")
)  # fmt: skip


def _init_only_subclass_rules(classes: Iterable[type], rules: dict[type, _Rule]) -> dict[type, _Rule]:
    """Rules for the ``classes`` that subclass a norm of ``rules`` with nothing of their own
    but ``__init__`` (timm's MetaFormer ``LayerNormNoBias``: ``nn.LayerNorm`` with its bias
    set to None; a model's ``class LayerNorm(nn.LayerNorm)`` with other defaults): their
    modules run the base's forward on their own state, which the base's replacement forward
    reads as well. Each becomes the subclass with that forward (still an instance of it)."""
    found = {}
    for cls in set(classes) - set(rules):
        base = next((c for c in cls.__mro__ if c in rules), None)
        if base is not None and rules[base].kind in _NORM_KINDS and not _added_attributes(cls, base):
            rule = rules[base]
            found[cls] = dataclasses.replace(rule, replacement=_replacement(cls, rule.replacement.forward))
    return found


def _added_attributes(cls: type, base: type) -> list[str]:
    """What the classes from ``cls`` to ``base`` (not included) define beyond an ``__init__``."""
    return sorted({key for c in cls.__mro__[: cls.__mro__.index(base)] for key in vars(c)} - _INIT_ONLY)


def _third_party_rules(classes: Iterable[type] = ()) -> dict[type, _Rule]:
    """Rules for the transformers and timm classes of the modules already imported: those
    read, and those of ``classes`` (a model's transformers classes) whose code is a read
    class's (``_same_code``) or whose forward reads its module's ``apply_rotary_pos_emb`` (an
    attention: its own forward runs, ours in place of theirs where the probe passes)."""
    read = [
        (_transformers_class(model, name), forward, "RMSNorm", _nothing_to_set)
        for forward, classes in _RMS_NORMS.items()
        for model, name in classes
    ]
    read.append((_transformers_class("cohere", "CohereLayerNorm"), _cohere_layer_norm_forward, "LayerNorm",
                 _one_weight_a_feature))  # fmt: skip
    read.append((_transformers_class("olmo", "OlmoLayerNorm"), _olmo_layer_norm_forward, "LayerNorm", _nothing_to_set))
    read += [
        (_transformers_class(model, name), _gated_rms_norm_forward, "GatedRMSNorm", _silu_gated_norm)
        for model, name in _GATED_RMS_NORMS
    ]
    read += [
        (_transformers_class(model, name), _gated_mlp_forward, "GatedMLP", _gated_activation("act_fn"))
        for model, name in _GATED_MLPS
    ]
    read += [
        (_transformers_class(model, name), _gated_mlp_forward, "GatedMLP", _gated_activation("activation_fn"))
        for model, name in _ACTIVATION_FN_GATED_MLPS
    ]
    read += [
        (_transformers_class(model, name), _gate_up_mlp_forward, "GatedMLP", _gated_activation("activation_fn"))
        for model, name in _GATE_UP_MLPS
    ]
    read += [
        (_transformers_class(model, name), _silu_gated_mlp_forward, "GatedMLP", _nothing_to_set)
        for model, name in _SILU_GATED_MLPS
    ]
    read += [
        (
            _transformers_class(model, name),
            _input_output_mlp_forward,
            "GatedMLP",
            _gated_activation("activation", "gated_activation"),
        )
        for model, name in _INPUT_OUTPUT_MLPS
    ]
    read = [entry for entry in read if entry[0] is not None]
    by_class = {entry[0]: entry for entry in read}
    found = list(read)
    attentions, experts = [], []
    for cls in set(classes) - set(by_class):
        same = _same_code_as(cls, by_class)
        if same is not None:
            found.append((cls, *by_class[same][1:]))
        elif _reads_rope_global(cls):
            attentions.append(cls)
        elif _gates_by_default(cls):
            experts.append(cls)
    timm_norm, timm_norm_2d, timm_rms_norm, timm_rms_norm_2d = _loaded(
        "timm.layers.norm", "LayerNorm", "LayerNorm2d", "RmsNorm", "RmsNorm2d"
    )
    found.append((timm_norm, _timm_layer_norm_forward, "LayerNorm", _unless_fast_norm))
    found.append((timm_norm_2d, _layer_norm_2d_forward, "LayerNorm2d", _unless_fast_norm))
    found.append((timm_rms_norm, _timm_rms_norm_forward, "RMSNorm", _unless_fast_norm))
    found.append((timm_rms_norm_2d, _timm_rms_norm_2d_forward, "RMSNorm2d", _unless_fast_norm))
    norm_acts = _loaded("timm.layers.norm_act", "LayerNormAct", "LayerNormAct2d", "RmsNormAct", "RmsNormAct2d")
    for cls, norm_forward, kind in zip(
        norm_acts,
        (_timm_layer_norm_forward, _layer_norm_2d_forward, _timm_rms_norm_forward, _timm_rms_norm_2d_forward),
        ("LayerNormAct", "LayerNormAct2d", "RMSNormAct", "RMSNormAct2d"),
    ):
        found.append((cls, _then_drop_and_act(norm_forward), kind, _unless_fast_norm))
    (torchvision_norm_2d,) = _loaded("torchvision.models.convnext", "LayerNorm2d")  # ConvNeXt's
    found.append((torchvision_norm_2d, _layer_norm_2d_forward, "LayerNorm2d", _nothing_to_set))
    rules = {
        cls: _Rule(_replacement(cls, forward), kind, prepare)
        for cls, forward, kind, prepare in found
        if cls is not None
    }
    # timm's gated MLPs: their projections, dropouts and norm converted as any module's, the gating one op
    for cls, forward in zip(
        _loaded("timm.layers.mlp", "GluMlp", "SwiGLU"), (_timm_glu_mlp_forward, _timm_swiglu_forward)
    ):
        if cls is not None:
            rules[cls] = _Rule(
                _replacement(cls, forward), "GatedMLP", _gated_activation("act"), opaque=False, in_op=("act",)
            )
    for attention in attentions:
        forward = _rope_attention_forward(attention)
        if forward is not None:
            rules[attention] = _Rule(_replacement(attention, forward), "RoPE", _rope_checked, opaque=False)
    for cls in experts:
        replacement = _replacement(cls, _experts_forward, _apply_gate=_experts_apply_gate)
        rules[cls] = _Rule(replacement, "GatedExperts", _experts_checked)
    return rules


# ---- tracing the forward --------------------------------------------------------------------------------------


class _Tracer(torch.fx.Tracer):
    """Traces a module's forward, keeping opaque the modules ``leaves`` names, as
    torch.nn's are: only their call sites matter. A submodule whose forward does
    not trace becomes opaque too (its error kept in ``failed``), so an attention
    block that does not trace does not hide the MLP beside it; the nodes of its failed
    attempt stay in the graph, as users, but are listed in ``discarded``. ``defaults``:
    the root's arguments that have defaults take them (else each is a placeholder, which
    a test such as ``x is not None`` finds given)."""

    def __init__(self, leaves: Callable[[torch.nn.Module], bool], defaults: bool = False):
        super().__init__()
        self.leaves = leaves
        self.defaults = defaults
        self.failed: dict[str, str] = {}
        self.discarded: set[torch.fx.Node] = set()

    def is_leaf_module(self, module: torch.nn.Module, qualified_name: str) -> bool:
        return self.leaves(module) or super().is_leaf_module(module, qualified_name)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        # A placeholder per named parameter, as torch.fx makes, but none for *args and **kwargs (traced empty):
        # torch.fx cannot make those of a wrapper (transformers' decorators) on every Python.
        parameters = list(inspect.signature(inspect.unwrap(root_fn)).parameters.values())[1:]
        positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        keyword = [p.name for p in parameters if p.kind is p.KEYWORD_ONLY]
        proxies = {
            p.name: p.default
            if self.defaults and p.default is not p.empty
            else self.create_proxy("placeholder", p.name, (), {})
            for p in parameters
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }

        def call_root(root):
            return root_fn(root, *(proxies[name] for name in positional), **{name: proxies[name] for name in keyword})

        return call_root, [self.root]

    def create_arg(self, a: Any):
        # A transformers ModelOutput (an OrderedDict subclass) returned by the root: as a dict.
        if isinstance(a, dict) and type(a) is not dict:
            a = dict(a)
        return super().create_arg(a)

    def call_module(self, m, forward, args, kwargs):
        if self.is_leaf_module(m, self.path_of_module(m)):
            return super().call_module(m, forward, args, kwargs)
        nodes, depth = len(self.graph.nodes), len(self.module_stack)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as error:
            while len(self.module_stack) > depth:
                self.module_stack.popitem()
            self.discarded.update(list(self.graph.nodes)[nodes:])
            path = self.path_of_module(m)
            self.failed = {name: why for name, why in self.failed.items() if not name.startswith(path + ".")}
            self.failed[path] = _first_line(error)
            return self.create_proxy("call_module", path, args, kwargs)


def _has_forward(module: torch.nn.Module) -> bool:
    return type(module).forward is not torch.nn.Module.forward


def _traced_graphs(module: torch.nn.Module, leaves, failures: dict[str, str], prefix: str = "", defaults: bool = False):
    """(prefix, graph, discarded nodes) covering ``module``: its own graph when its
    forward traces, else those of its children, recursively; likewise for each
    submodule that did not trace inside a graph. ``failures``: module name -> why
    its forward did not trace. ``defaults``: as ``_Tracer``'s."""
    if leaves(module):
        return
    tracer = _Tracer(leaves, defaults)
    try:
        graph = tracer.trace(module)
    except Exception as error:
        if _has_forward(module):
            failures[prefix.rstrip(".")] = _first_line(error)
        for name, child in module.named_children():
            yield from _traced_graphs(child, leaves, failures, f"{prefix}{name}.", defaults)
        return
    yield prefix, graph, tracer.discarded
    for path, why in tracer.failed.items():
        failures[prefix + path] = why
        for name, child in module.get_submodule(path).named_children():
            yield from _traced_graphs(child, leaves, failures, f"{prefix}{path}.{name}.", defaults)


def _past_identities(node: torch.fx.Node, is_identity: Callable[[torch.fx.Node], bool]) -> torch.fx.Node:
    """Where ``node``'s output goes on unchanged: the last of the nn.Identity calls after it,
    each the one user of the output before it (as its first argument); ``node`` when none is."""
    while len(node.users) == 1:
        (user,) = node.users
        if not (is_identity(user) and user.args[:1] == (node,)):
            break
        node = user
    return node


def _first_input(node: torch.fx.Node) -> torch.fx.Node | None:
    source = node.args[0] if node.args else None
    return source if isinstance(source, torch.fx.Node) else None


@contextlib.contextmanager
def _in_other_mode(model: torch.nn.Module):
    """Every module of ``model`` in the other of train and eval mode, for the block."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        for module, training in modes:
            module.training = not training
        yield
    finally:
        for module, training in modes:
            module.training = training


# The other paths of a forward a fusion must hold on too: (the model's state for it, whether
# the forwards' optional arguments take their defaults, its name)
_OTHER_PATHS = (
    (_in_other_mode, False, "in the other of train and eval mode"),
    (lambda model: contextlib.nullcontext(), True, "with its optional arguments at their defaults"),
)


def _dataflow(model: torch.nn.Module, leaves, maps: dict[type, _Rule], swapping: set[int]):
    """What tracing the forward says about the maps and activation modules:
    (pairs, why_not, failures). ``pairs``: (map name, activation module name,
    activation, shared) for each map of a fusable class whose output goes only, and
    straight (through nn.Identity modules at most), into an activation module computing
    one of ours (``shared``: either is called more than once), on every path of the
    forward traced: as the model is, in the other mode (a branch on ``self.training``)
    and with the forwards' optional arguments at their defaults (``if x is not None``);
    ``why_not``: module name -> why it is in no pair, for those in a graph ("" for a
    torch activation no map feeds: no candidate); ``failures``: module name -> why its
    forward did not trace (as the model is). ``swapping``: the ids of the modules patch
    swaps whether fused or not."""
    pairs, why_not, failures = _traced_dataflow(model, leaves, maps, swapping)
    for state, defaults, path in _OTHER_PATHS:
        with state(model):
            other_pairs, other_why_not, _ = _traced_dataflow(model, leaves, maps, swapping, defaults)
        acts = {map_name: act_name for map_name, act_name, _, _ in other_pairs}
        kept = []
        for pair in pairs:
            map_name, act_name = pair[:2]
            if acts.get(map_name, act_name) == act_name and map_name not in other_why_not:
                kept.append(pair)  # the same pair, or the map not called on that path
                continue
            why = other_why_not.get(map_name) or f"its output goes to {acts[map_name]}"
            why_not[map_name] = f"on another path of the forward ({path}) {why}"
            why_not[act_name] = _not_fused_with(
                map_name, why_not[map_name], id(model.get_submodule(map_name)) in swapping
            )
        pairs = kept
    return pairs, why_not, failures


def _traced_dataflow(
    model: torch.nn.Module, leaves, maps: dict[type, _Rule], swapping: set[int], defaults: bool = False
):
    """``_dataflow``'s pairs, why_not and failures on the path one trace of the forward takes
    (``defaults``: as ``_Tracer``'s)."""
    pairs, why_not, failures = [], {}, {}
    ours = "/".join(_ACTIVATION_MATH)
    for prefix, graph, discarded in _traced_graphs(model, leaves, failures, defaults=defaults):
        calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
        modules = [
            (node, prefix + node.target) for node in graph.nodes if node.op == "call_module" and node not in discarded
        ]

        def is_identity(node: torch.fx.Node) -> bool:
            # computes nothing: its calls elsewhere (if shared) stay the same; a hook on one would see the activation
            if node.op != "call_module" or node in discarded:
                return False
            module = model.get_submodule(prefix + node.target)
            return type(module) is torch.nn.Identity and not _has_hooks(module)

        map_at = {}  # the node a map's output reaches unchanged -> the map's name
        for node, name in modules:
            if type(model.get_submodule(name)) not in maps:
                continue
            end = _past_identities(node, is_identity)
            map_at[end] = name
            (user, *others) = list(end.users) or [None]
            if user is None or others:
                why_not[name] = f"its output is used {len(end.users)} times, not by one activation module"
            elif user.op != "call_module" or user in discarded:
                why_not[name] = (
                    f"its output goes to {getattr(user.target, '__name__', user.target)}, "
                    "not to an activation module (patch fuses modules)"
                )
            elif user.args[:1] != (end,):
                why_not[name] = f"its output is not the first argument of {prefix + user.target}"
            else:
                act_name = prefix + user.target
                act = model.get_submodule(act_name)
                activation, why = _activation(act) if _is_activation_module(act) else (None, "")
                if activation is not None:
                    pairs.append((name, act_name, activation, calls[node.target] > 1 or calls[user.target] > 1))
                else:
                    why_not[name] = (
                        f"followed by {type(act).__name__} {act_name}: {why or f'not a {ours} activation module'}"
                    )
        fused = {act for _, act, _, _ in pairs}
        for node, name in modules:  # activation modules that no map feeds alone
            act = model.get_submodule(name)
            if not _is_activation_module(act) or name in fused:
                continue
            source = _first_input(node)
            while source is not None and source not in map_at and is_identity(source):
                source = _first_input(source)
            map_name = map_at.get(source)
            if map_name is not None:
                swapped = id(model.get_submodule(map_name)) in swapping
                why_not[name] = _activation(act)[1] or _not_fused_with(map_name, why_not[map_name], swapped)
            elif type(act).__module__ == "transformers.activations":  # an MLP's activation, in a form we miss
                why_not[name] = _activation(act)[1] or "its input is no nn.Linear's (or Conv1D's)"
            else:  # a torch activation after a convolution, an addition, ...: nothing to fuse with, nothing to say
                why_not[name] = ""
    return pairs, why_not, failures


def _untraced_reason(name: str, failures: dict[str, str]) -> str:
    """Why a module seen in no graph was not: its nearest ancestor that did not trace."""
    while name:
        name = name.rpartition(".")[0]
        if name in failures:
            return f"the forward of {name or '<root>'} did not trace ({failures[name]})"
    return "not called in its parent's forward as traced"


# ---- the causal-LM loss (transformers) ------------------------------------------------------------------------

# Causal LMs whose forward passes its output layer's result straight to self.loss_function(logits, labels, ...)
# (read in transformers 5.17 and 5.25): the fused loss may take the hidden states in its place.
_CAUSAL_LMS = (
    ("gpt2", "GPT2LMHeadModel"),
    ("opt", "OPTForCausalLM"),
    ("llama", "LlamaForCausalLM"),
    ("mistral", "MistralForCausalLM"),
    ("mixtral", "MixtralForCausalLM"),
    ("qwen2", "Qwen2ForCausalLM"),
    ("qwen2_moe", "Qwen2MoeForCausalLM"),
    ("qwen3", "Qwen3ForCausalLM"),
    ("qwen3_moe", "Qwen3MoeForCausalLM"),
    ("qwen3_next", "Qwen3NextForCausalLM"),  # Qwen3-MoE's forward, reading its own module's globals
    ("qwen3_5_moe", "Qwen3_5MoeForCausalLM"),  # likewise
    ("gemma", "GemmaForCausalLM"),
    ("phi3", "Phi3ForCausalLM"),
    ("smollm3", "SmolLM3ForCausalLM"),
    ("olmo2", "Olmo2ForCausalLM"),
    ("glm", "GlmForCausalLM"),
    ("glm4", "Glm4ForCausalLM"),
    ("gpt_neox", "GPTNeoXForCausalLM"),
    ("phi", "PhiForCausalLM"),
    ("stablelm", "StableLmForCausalLM"),
    ("bert", "BertLMHeadModel"),
    ("granite", "GraniteForCausalLM"),
    ("cohere", "CohereForCausalLM"),
    ("cohere2", "Cohere2ForCausalLM"),  # Cohere's forward
    ("gemma2", "Gemma2ForCausalLM"),
    ("gemma3", "Gemma3ForCausalLM"),
    ("glm4_moe", "Glm4MoeForCausalLM"),
    ("deepseek_v3", "DeepseekV3ForCausalLM"),
    ("gpt_oss", "GptOssForCausalLM"),
    ("gemma4", "Gemma4ForCausalLM"),
    ("exaone4", "Exaone4ForCausalLM"),  # Llama's forward, its decorators in another order
    # Mixtral's: the router's auxiliary loss added to the loss
    ("jamba", "JambaForCausalLM"),
    ("minimax", "MiniMaxForCausalLM"),
    ("ernie4_5_moe", "Ernie4_5_MoeForCausalLM"),
    ("llama4", "Llama4ForCausalLM"),
    # Granite's (the logits scaled) with Mixtral's auxiliary loss; FalconH1's scaled by its lm_head_multiplier
    ("granitemoe", "GraniteMoeForCausalLM"),
    ("granitemoeshared", "GraniteMoeSharedForCausalLM"),
    ("granitemoehybrid", "GraniteMoeHybridForCausalLM"),
    ("falcon_h1", "FalconH1ForCausalLM"),
    # read with those above in transformers 5.17 and 5.25: Llama's form (OLMoE, Phi-3.5-MoE, JetMoE, Mellum,
    # MiniMax-M2: Mixtral's auxiliary loss; MiniCPM3: the hidden states scaled before the head), GPT-2's era
    # (Falcon, BLOOM, GPT-J, GPT-Neo, CodeGen, StarCoder's GPTBigCode, MPT), Cohere 2's MoE (scaled)
    ("olmoe", "OlmoeForCausalLM"),
    ("phimoe", "PhimoeForCausalLM"),
    ("jetmoe", "JetMoeForCausalLM"),
    ("mellum", "MellumForCausalLM"),
    ("minimax_m2", "MiniMaxM2ForCausalLM"),
    ("minicpm3", "MiniCPM3ForCausalLM"),
    ("falcon", "FalconForCausalLM"),
    ("bloom", "BloomForCausalLM"),
    ("gptj", "GPTJForCausalLM"),
    ("gpt_neo", "GPTNeoForCausalLM"),
    ("codegen", "CodeGenForCausalLM"),
    ("gpt_bigcode", "GPTBigCodeForCausalLM"),
    ("mpt", "MptForCausalLM"),
    ("cohere2_moe", "Cohere2MoeForCausalLM"),
    # vision-language models: the language model's head and loss alike
    ("qwen2_vl", "Qwen2VLForConditionalGeneration"),
    ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
    ("qwen3_vl", "Qwen3VLForConditionalGeneration"),
    ("gemma3", "Gemma3ForConditionalGeneration"),
    ("gemma4", "Gemma4ForConditionalGeneration"),
)
# Causal LMs whose forward scales the logits before the loss (Granite divides them by config.logits_scaling,
# Cohere multiplies them by its logit_scale): under loss="fused" it scales the hidden states, which gives the same
# logits from an output layer without a bias.
_SCALED_CAUSAL_LMS = (
    ("granite", "GraniteForCausalLM"),
    ("granitemoe", "GraniteMoeForCausalLM"),
    ("granitemoeshared", "GraniteMoeSharedForCausalLM"),
    ("granitemoehybrid", "GraniteMoeHybridForCausalLM"),
    ("falcon_h1", "FalconH1ForCausalLM"),
    ("cohere", "CohereForCausalLM"),
    ("cohere2", "Cohere2ForCausalLM"),
    ("cohere2_moe", "Cohere2MoeForCausalLM"),
)
# Causal LMs whose forward soft-caps the logits by config.final_logit_softcapping before the loss: under
# loss="fused", the loss caps the logits it makes, and the forward, which gets the hidden states, must not.
_SOFT_CAPPED_CAUSAL_LMS = (
    ("gemma2", "Gemma2ForCausalLM"),
    ("gemma3", "Gemma3ForCausalLM"),
    ("gemma4", "Gemma4ForCausalLM"),
    ("gemma4", "Gemma4ForConditionalGeneration"),  # by its text config's
)


def _shifted_labels(labels: Tensor, ignore_index: int, shift_labels: Tensor | None, device) -> Tensor:
    """transformers' ForCausalLMLoss targets: token t predicts label t + 1; the last predicts nothing."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1).to(device)


def _mean_over_items(loss: Tensor, num_items_in_batch) -> Tensor:
    if num_items_in_batch is None:
        return loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


class _CausalLMLoss:
    """transformers' ForCausalLMLoss with our ops, for ``model.loss_function``: the
    same shift, ``ignore_index``, ``shift_labels`` and ``num_items_in_batch`` (a sum
    over that many items instead of the mean), the loss in fp32. With ``head``
    (``loss="fused"``) the model passes the hidden states in place of the logits
    while it computes a loss, and ``linear_cross_entropy`` takes them with the head's
    weight, never holding the logits."""

    def __init__(self, head: torch.nn.Linear | None = None):
        self.head = head

    def __call__(
        self,
        logits: Tensor,
        labels: Tensor,
        vocab_size: int,
        num_items_in_batch=None,
        ignore_index: int = -100,
        shift_labels: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        reduction = "mean" if num_items_in_batch is None else "sum"
        target = _shifted_labels(labels, ignore_index, shift_labels, logits.device)
        head = self.head
        if head is not None and head.defer_logits:
            loss = linear_cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                head.weight,
                target,
                head.bias,
                ignore_index,
                reduction,
                softcap=head.softcap,
            )
        else:  # as ForCausalLMLoss on fp32 logits: the kernels compute in fp32 from the logits as they are
            loss = cross_entropy(
                logits.reshape(-1, vocab_size),
                target,
                ignore_index=ignore_index,
                reduction=reduction,
                out_dtype=torch.float32,
            )
        return _mean_over_items(loss.float(), num_items_in_batch)


class _DeferredLogitsHead(torch.nn.Linear):
    """A causal LM's output layer under ``loss="fused"``: while ``defer_logits`` is
    set (the model is computing a loss) it returns its input, the hidden states, for
    the loss to multiply by chunks; otherwise the logits, as an ``nn.Linear``."""

    def forward(self, input: Tensor) -> Tensor:
        return input if self.defer_logits else F.linear(input, self.weight, self.bias)


_ORIGINAL[_DeferredLogitsHead] = torch.nn.Linear

LOGITS_ROW_MULTIPLE = 16
"""cuBLAS runs its fast kernels on matrices whose rows start 16-byte aligned: a head whose
vocabulary is not a multiple of this many elements (GPT-2's 50257) gets its sm75 "align1"
kernels for the logits' matmuls, forward and backward (an H200, GPT-2 124M's eager step: 61 ms
of its 208 ms, 2026-12-04-b)."""


class _AlignedLogitsHead(torch.nn.Linear):
    """A causal LM's output layer under ``loss="logits"`` when its vocabulary is not a
    multiple of ``LOGITS_ROW_MULTIPLE``: the weight (and bias) padded with zero rows to
    one, so that its matmuls, forward and backward, run on rows of the padded width, the
    logits then copied out contiguous, in the model's width. Plain torch ops, so autocast,
    autograd and torch.compile treat it as theirs; the price is a copy of the logits each
    way (a slice's backward fills the padded gradient), against the aligned matmuls. A
    tensor subclass (a tensor-parallel DTensor weight, say) takes nn.Linear's own forward:
    its padding would be the subclass's to do, if it can."""

    def forward(self, input: Tensor) -> Tensor:
        if type(input) not in PLAIN_TENSOR_TYPES or type(self.weight) not in PLAIN_TENSOR_TYPES:
            return F.linear(input, self.weight, self.bias)
        pad = -self.out_features % LOGITS_ROW_MULTIPLE
        weight = F.pad(self.weight, (0, 0, 0, pad))
        bias = None if self.bias is None else F.pad(self.bias, (0, pad))
        return F.linear(input, weight, bias)[..., : self.out_features].contiguous()


_ORIGINAL[_AlignedLogitsHead] = torch.nn.Linear


class _ForwardDeferringLogits:
    """A causal LM's forward that, given labels while it trains (training mode, gradients
    enabled), lets the loss take the hidden states in place of the logits and returns
    ``logits=None`` (Liger's convention), the loss alone holding what the logits gave.
    An evaluation (eval mode, or no_grad / inference_mode) returns the logits and the
    loss computed from them: metrics read the logits there, and no backward needs the
    memory back. With ``capped_config`` (a soft-capping model's
    text config), its ``final_logit_softcapping`` moves to the head's ``softcap`` for the
    call, so that the loss caps the logits and the forward leaves the hidden states
    as they are. An object, not a closure, so that a deepcopy of the model gets one
    calling its own forward, head and config."""

    def __init__(self, forward: Callable, head: _DeferredLogitsHead, capped_config: Any = None):
        functools.update_wrapper(self, forward)  # forward's signature, for transformers' introspection
        self.head = head
        self.capped_config = capped_config
        self.labels_at = list(inspect.signature(forward).parameters).index("labels")

    @property
    def __code__(self) -> types.CodeType:
        """The code a call runs first: torch.export reads a module's ``forward.__code__``
        (to name what it traces), which a callable object lacks."""
        return type(self).__call__.__code__

    def __call__(self, *args, **kwargs):
        labels = args[self.labels_at] if len(args) > self.labels_at else kwargs.get("labels")
        training = self.__wrapped__.__self__.training and torch.is_grad_enabled()
        # another module in the head's place (peft's modules_to_save copy or LoRA layer): the model's
        # logits come from it, and the loss takes them as logits
        if labels is None or not training or not gnn.fused_in_place(self.head):
            return self.__wrapped__(*args, **kwargs)
        config = self.capped_config
        softcap = None if config is None else config.final_logit_softcapping
        self.head.defer_logits = True
        self.head.softcap = softcap
        if softcap is not None:
            config.final_logit_softcapping = None
        try:
            output = self.__wrapped__(*args, **kwargs)
        finally:
            self.head.defer_logits = False
            self.head.softcap = None
            if softcap is not None:
                config.final_logit_softcapping = softcap
        if isinstance(output, tuple):  # return_dict=False: (loss, logits, ...) as to_tuple() drops a None field
            return output[:1] + output[2:]
        return dataclasses.replace(output, logits=None)


class _Absent:
    """What ``undo`` puts back for an attribute that was not there (a class: deepcopy keeps it)."""


def _child_name(name: str, child: str) -> str:
    """The name of module ``name``'s child ``child`` in the model (the root's name is "")."""
    return f"{name}.{child}" if name else child


def _parent_and_key(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    """The module holding ``model``'s submodule ``name``, and the key it holds it by."""
    parent_name, _, key = name.rpartition(".")
    return model.get_submodule(parent_name), key


def _set(undo: list, obj: Any, name: str, value: Any) -> None:
    """``setattr(obj, name, value)``, with what to put back appended to ``undo``
    as ``(obj, name, previous)``: records that a deepcopy of the model remaps."""
    modules = getattr(obj, "_modules", {})
    undo.append((obj, name, modules[name] if name in modules else obj.__dict__.get(name, _Absent)))
    setattr(obj, name, value)


def _patch_loss(model: torch.nn.Module, mode: str, report: PatchReport, undo: list) -> str | None:
    """Swap a transformers causal LM's loss; returns the name of the head the fused loss took."""
    (pretrained,) = _loaded("transformers.modeling_utils", "PreTrainedModel")
    causal_loss, losses = _loaded("transformers.loss.loss_utils", "ForCausalLMLoss", "LOSS_MAPPING")
    if pretrained is None or not isinstance(model, pretrained):
        return None
    name = "loss_function"
    causal_lms, soft_capped, scaled = (
        {cls for cls in (_transformers_class(*entry) for entry in entries) if cls is not None}
        for entries in (_CAUSAL_LMS, _SOFT_CAPPED_CAUSAL_LMS, _SCALED_CAUSAL_LMS)
    )
    read = _same_code_as(type(model), causal_lms)  # the model's class, or a causal LM whose forward it runs
    # "logits" swaps a function for one computing the same from what any caller gives it: any forward
    # calling it does; "fused" changes what the forward gives it, so only a forward read may be
    forward = inspect.unwrap(type(model).forward)
    calls_loss_function = isinstance(forward, types.FunctionType) and "loss_function" in forward.__code__.co_names
    if read is None and not (mode == "logits" and calls_loss_function and model.get_output_embeddings() is not None):
        why = "not one of the causal LMs whose loss patch swaps"
        if mode == "fused" and calls_loss_function:
            why += " with loss='fused' (its forward is none read; loss='logits' swaps it)"
        report.left.append((name, type(model).__name__, why))
        return None
    # model.loss_function, without the warning its property gives for a loss_type of None
    current = (
        model.__dict__.get("_loss_function") or (losses or {}).get(getattr(model, "loss_type", None)) or causal_loss
    )
    if isinstance(current, _CausalLMLoss):  # patched before: with this loss, or refused
        patched = "fused" if current.head is not None else "logits"
        if patched != mode:
            raise ArgumentError(f"loss={mode!r}: the model's loss is patched with loss={patched!r}; unpatch it first")
        return None
    if current is not causal_loss:
        report.left.append(
            (name, getattr(current, "__name__", type(current).__name__), "not transformers' ForCausalLMLoss")
        )
        return None
    head = model.get_output_embeddings()
    why_not_fused = None
    if type(head) is not torch.nn.Linear or _has_hooks(head):
        why_not_fused = (
            f"loss='fused' needs the output layer to be an nn.Linear without hooks, got {type(head).__name__}"
        )
    elif read in scaled and head.bias is not None:
        why_not_fused = (
            "loss='fused' would scale the output layer's bias with the hidden states, which the model does not"
        )
    if mode == "fused" and why_not_fused:
        report.left.append((name, "ForCausalLMLoss", why_not_fused))
        return None
    if mode == "logits" and type(head) is torch.nn.Linear and head.out_features % LOGITS_ROW_MULTIPLE:
        head.__class__ = _AlignedLogitsHead
        report.swapped.append((next(n for n, m in model.named_modules() if m is head), "Linear", "AlignedLogitsHead"))
    head_name = None
    if mode == "fused":
        head_name = next(n for n, m in model.named_modules() if m is head)
        head.__class__ = _DeferredLogitsHead
        head.fused_at = gnn.Place(*_parent_and_key(model, head_name))
        head.defer_logits = False
        head.softcap = None
        capped_config = model.config.get_text_config() if read in soft_capped else None
        _set(undo, model, "forward", _ForwardDeferringLogits(model.forward, head, capped_config))
    _set(undo, model, "_loss_function", _CausalLMLoss(head if mode == "fused" else None))
    report.swapped.append(
        (
            name,
            f"{head_name}+ForCausalLMLoss" if head_name else "ForCausalLMLoss",
            "LinearCrossEntropyLoss" if head_name else "CrossEntropyLoss",
        )
    )
    return head_name


# ---- patch / unpatch ------------------------------------------------------------------------------------------


@dataclass
class PatchReport:
    """What ``patch`` changed: ``swapped`` rows are (module name, old, kind);
    ``left`` rows are (module name, class, why it was left); ``counts`` is
    the number swapped of each kind; ``feeding_matmuls``, the norms that return
    the autocast dtype under autocast (their output goes only to matmuls)."""

    swapped: list[tuple[str, str, str]] = field(default_factory=list)
    left: list[tuple[str, str, str]] = field(default_factory=list)
    feeding_matmuls: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(kind for _, _, kind in self.swapped))

    def __str__(self) -> str:
        counts = ", ".join(f"{kind} {n}" for kind, n in self.counts.items())
        lines = [f"swapped {len(self.swapped)} module(s){f' ({counts})' if counts else ''}:"]
        lines += [f"  {name or '<root>'}: {old} -> {new}" for name, old, new in self.swapped]
        if self.feeding_matmuls:
            lines.append(
                f"{len(self.feeding_matmuls)} norm(s) in the autocast dtype under autocast (only matmuls read "
                f"their output): {', '.join(self.feeding_matmuls)}"
            )
        if self.left:
            lines.append(f"left {len(self.left)} module(s):")
            lines += [f"  {name or '<root>'}: {cls} ({why})" for name, cls, why in self.left]
        return "\n".join(lines)


def _module_uses(model: torch.nn.Module) -> Counter:
    """How many places hold each module (by id): its names in the module tree, and the plain
    dicts, lists and tuples among the modules' attributes (a module also called through one
    of those is shared: fusing or replacing it would change that use)."""
    uses = Counter()
    for _, module in model.named_modules(remove_duplicate=False):
        uses[id(module)] += 1
        for key, value in vars(module).items():
            if key.startswith("_") or not isinstance(value, (dict, list, tuple)):
                continue
            for item in value.values() if isinstance(value, dict) else value:
                if isinstance(item, torch.nn.Module):
                    uses[id(item)] += 1
    return uses


def _check_model(model) -> None:
    if not isinstance(model, torch.nn.Module):
        raise ArgumentTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def patch(
    model: torch.nn.Module,
    fuse_linear_act: bool = True,
    loss: str = "logits",
    autocast_norms: bool = True,
    residual_norms: bool = True,
) -> PatchReport:
    """Convert ``model``'s layers to gpukernels' in place; returns a report.
    Patching an already patched model changes nothing.

    ``fuse_linear_act``: fuse each activation module into the map before it (a Linear,
    Conv1D or BatchNorm; see the module's docstring), and each ResNet block's last
    BatchNorm with the shortcut's addition and the ReLU. False leaves every activation
    module and block as it is; the BatchNorms are then swapped unfused, the Linears left.

    ``loss`` (transformers causal LMs: ``"logits"`` for every model whose forward calls
    transformers' ``ForCausalLMLoss`` as its ``loss_function``, ``"fused"`` for those of
    ``_CAUSAL_LMS`` and those whose forward runs their code): ``"logits"`` computes
    ``model(..., labels=...)``'s loss with our cross_entropy on the logits, in fp32 as transformers' loss computes it
    (reading bf16 logits as they are, where transformers makes an fp32 copy of them), and
    gives an output layer whose vocabulary is not a multiple of 16 (GPT-2's) matmuls on
    padded rows (``_AlignedLogitsHead``);
    ``"fused"`` with linear_cross_entropy from the hidden states and the output layer's
    weight, never holding the logits: the model then returns ``logits=None`` when given
    labels in training mode with gradients enabled (the logits when not: an evaluation,
    in eval mode or under no_grad, gets them and the loss computed from them).

    ``autocast_norms`` (transformers blocks listed in ``_NORMS_BEFORE_MATMULS``: Llama,
    Mistral, Qwen2/3, Gemma 1-3, Phi-3, SmolLM3, GLM, GLM-4, GPT-2, GPT-NeoX, Phi, StableLM; and
    Llama-form blocks whose attention or MLP runs the code of one of theirs): the norms whose output
    goes only to the projections of the block's attention or MLP return, under autocast,
    the autocast dtype the projections would cast it to (the same values: no fp32
    result, no cast passes), and take their gradient in it (the projections' gradients
    summed in it, not in fp32). False: they return fp32, as the models' code does.

    ``residual_norms`` (transformers blocks whose forward is Llama's, Gemma 2's, GLM-4's,
    Phi-3's or Granite's (its MoE models' too), ``_PRE_NORM_FORMS``, GPT-2's, ViT's; timm's ViT, EVA and Swin
    blocks; BERT's outputs, post-norm, likewise): the attention's output added to the
    residual stream and the sum normalised for the MLP in one op (``add_rms_norm`` /
    ``add_layer_norm``), and a norm after a branch (OLMo 2/3's and EXAONE 4's post-norm
    blocks, ``_POST_NORM_FORM``; Gemma 2-4's and GLM-4's after the MLP) with the residual
    addition after it in one op (``rms_norm_add``); LFM2's layers (``_LFM2_FORM``) as Llama's,
    where the block's forward is the one read and its norm is converted to ours. False leaves
    those blocks' forward as written."""
    _check_model(model)
    check_choice("loss", loss, LOSS_MODES)
    for name, value in (
        ("fuse_linear_act", fuse_linear_act),
        ("autocast_norms", autocast_norms),
        ("residual_norms", residual_norms),
    ):
        if not isinstance(value, bool):
            raise ArgumentTypeError(f"{name} must be a bool, got {type(value).__name__}")
    report = PatchReport()
    undo = model.__dict__.setdefault("_gpukernels_undo", [])
    uses = _module_uses(model)
    classes = _transformers_classes(model)
    rules = _TORCH_RULES | _third_party_rules(classes) | _batch_norm_act_rules(fuse_linear_act)
    if fuse_linear_act:
        rules |= _residual_block_rules()
    if residual_norms:
        rules |= _add_norm_block_rules(classes)
    rules |= _init_only_subclass_rules({type(module) for module in model.modules()}, rules)
    maps = _fusable_maps()
    head = _patch_loss(model, loss, report, undo)
    # Decided first: a module that will be swapped is opaque to tracing, one that stays is traced into.
    settings = {
        name: rules[type(module)].prepare(module) for name, module in model.named_modules() if type(module) in rules
    }
    for name, setting in settings.items():
        norm = rules[type(model.get_submodule(name))].residual_norm
        if norm and not isinstance(setting, str):
            norm_name = _child_name(name, norm)
            norm_class = type(model.get_submodule(norm_name))
            if isinstance(settings.get(norm_name, ""), str) or not _takes_residual(rules[norm_class].replacement):
                settings[name] = (
                    f"its {norm} ({norm_class.__name__}) is not converted to one of ours, which take the residual"
                )
    swapping = {
        id(module)
        for name, s in settings.items()
        if not isinstance(s, str) and rules[type(module := model.get_submodule(name))].opaque
    }

    computed_in_ops = {
        _child_name(name, child): name
        for name, s in settings.items()
        if not isinstance(s, str)
        for child in rules[type(model.get_submodule(name))].in_op
    }

    def leaves(module):
        return _is_ours(module) or id(module) in swapping or type(module) in maps or _is_activation_module(module)

    pairs, why_not, failures = _dataflow(model, leaves, maps, swapping) if fuse_linear_act else ([], {}, {})
    for map_name, act_name, activation, shared in pairs:
        map_module, act = model.get_submodule(map_name), model.get_submodule(act_name)
        if act_name in computed_in_ops:
            why_not[map_name] = (
                f"its activation {act_name} runs in the gated op of {computed_in_ops[act_name] or '<root>'}"
            )
            continue
        if shared or uses[id(map_module)] > 1 or uses[id(act)] > 1:
            why_not[map_name] = f"shared module: fusing {type(act).__name__} would change its other uses"
        elif _has_hooks(map_module) or _has_hooks(act):
            why_not[map_name] = "has hooks that expect the unfused outputs"
        else:
            rule = maps[type(map_module)]
            report.swapped.append((map_name, f"{type(map_module).__name__}+{type(act).__name__}", rule.kind))
            _keep_own_attributes(undo, map_module)
            map_module.__class__ = rule.replacement
            map_module.activation = activation
            map_module.fused_at = gnn.Place(*_parent_and_key(model, map_name))
            _set(undo, *_parent_and_key(model, act_name), gnn.FusedActivation(act, map_module))
            continue
        why_not[act_name] = _not_fused_with(map_name, why_not[map_name], id(map_module) in swapping)

    inside_swapped = ()  # name prefixes of swapped modules whose children run inside them as they are
    bypassed = set()  # names of the children whose work a swapped module does itself
    for name, module in model.named_modules():
        cls = type(module)
        if name.startswith(inside_swapped) or name == head or _is_ours(module) or name in bypassed:
            continue
        if name in settings:
            if isinstance(settings[name], str):
                report.left.append((name, cls.__name__, settings[name]))
                continue
            _keep_own_attributes(undo, module)
            module.__class__ = rules[cls].replacement
            for key, value in settings[name].items():
                setattr(module, key, value)
            # a gated MLP's or norm's, now inside its op
            activation = settings[name].get("activation", settings[name].get("gated_activation", "none"))
            report.swapped.append(
                (name, cls.__name__ if activation == "none" else f"{cls.__name__}+{activation}", rules[cls].kind)
            )
            if rules[cls].opaque:
                inside_swapped += (name + ".",)
            bypassed.update(_child_name(name, child) for child in (*rules[cls].bypassed, *rules[cls].in_op))
        elif cls in maps or _is_activation_module(module):
            why = why_not.get(name)
            if why is None:
                why = "fuse_linear_act=False" if not fuse_linear_act else _untraced_reason(name, failures)
            if why:
                report.left.append((name, cls.__name__, why))
        elif isinstance(module, tuple(_TORCH_RULES)):
            base = next(c for c in cls.__mro__ if c in _TORCH_RULES)
            own = _added_attributes(cls, base)
            if "forward" in own:
                why = "a subclass with its own forward"
            elif _TORCH_RULES[base].kind in _NORM_KINDS:
                why = f"a subclass of {base.__name__} with more than __init__ of its own ({', '.join(own)})"
            else:
                why = f"a subclass of {base.__name__}: only exact classes are swapped"
            report.left.append((name, cls.__name__, why))
    if autocast_norms:
        swapped = {name for name, _, _ in report.swapped}
        report.feeding_matmuls = _mark_norms_feeding_matmuls(model, classes, swapped, uses)
    return report


def fuse_linear_cross_entropy(
    model: torch.nn.Module, head: str, loss: torch.nn.CrossEntropyLoss, **options
) -> gnn.FusedHeadLoss:
    """Opt-in: fuse ``model``'s output layer ``head`` (the name of an exact ``nn.Linear``
    whose output, the logits, goes to ``loss``) with ``loss``, so the logits are never
    held. The head becomes a ``HiddenStatesHead``, which returns the hidden states, and
    the returned module computes ``loss(head(hidden), target)`` from them with
    ``gpukernels.linear_cross_entropy``: train with ``fused(model(x), target)``.
    Whatever the model does between the head and its output must act on rows alone
    (reshapes, slices, ``.float()``). ``options``: ``z_loss``, ``softcap``,
    ``chunk_size``. ``unpatch(model)`` restores the head; parameters and state_dict
    keys never change. (For transformers causal LMs, ``patch(model, loss="fused")``.)"""
    _check_model(model)
    try:
        linear = model.get_submodule(head)
    except (AttributeError, TypeError):
        raise ArgumentError(f"head {head!r} names no submodule of the model") from None
    if type(linear) is not torch.nn.Linear:
        raise ArgumentTypeError(f"head {head!r} must name an nn.Linear, got {type(linear).__name__}")
    if type(loss) not in (torch.nn.CrossEntropyLoss, gnn.CrossEntropyLoss):
        raise ArgumentTypeError(f"loss must be an nn.CrossEntropyLoss, got {type(loss).__name__}")
    if loss.weight is not None:
        raise ArgumentError("loss has class weights, which linear_cross_entropy does not take")
    fused = gnn.FusedHeadLoss(
        linear, gnn.LinearCrossEntropyLoss(loss.ignore_index, loss.reduction, loss.label_smoothing, **options)
    )
    linear.__class__ = gnn.HiddenStatesHead
    return fused


def unpatch(model: torch.nn.Module) -> None:
    """Undo ``patch``: original classes back, fused activations and the loss back in place."""
    _check_model(model)
    for module in model.modules():
        if type(module) in _ORIGINAL:
            module.__class__ = _ORIGINAL[type(module)]
            for key in _SET_ATTRIBUTES:
                module.__dict__.pop(key, None)
    for module in list(model.modules()):
        for obj, name, previous in reversed(module.__dict__.pop("_gpukernels_undo", [])):
            if previous is _Absent:
                delattr(obj, name)
            else:
                setattr(obj, name, previous)
