"""The op-definition layer: one declaration per kernel-backed op.

An op is declared by its *output spec*: a function with the op's signature
(its last parameter is ``backend: str``) that returns empty output tensors of
the right shapes and dtypes. ``@kernel_op(family)`` turns it into

- the ``torch.library`` custom op ``gpukernels::<name>`` (schema from the
  spec's annotations), with the spec as its fake implementation, so
  torch.compile, fake and meta tensors, tensor subclasses (DTensor under
  FSDP2), dispatch modes and vmap all see one op;
- its real implementation: the spec allocates the outputs, the kernel
  ``<name>`` of backend module ``gpukernels.backends.<backend>.<family>``
  writes into them (the kernel contract: ``kernel(*inputs, *outputs) -> None``,
  the same for every backend);
- the eager bypass: on plain tensors, outside compile and modes, the op's
  implementation runs directly (with grad mode on, under an autograd.Function
  with the op's own autograd formula when it has one), skipping the
  dispatcher's Python layers, which cost more host time than a small kernel
  takes on the GPU.

The backend is chosen once, when the public function calls the op, and passed
to it as its last argument; the autograd context keeps it, so the backward runs
on the forward's backend whatever is selected when it runs.

Under torch.compile, Inductor launches the op's Triton kernels itself: when the
backend is Triton with compiled kernels (CUDA tensors), AOTAutograd traces the
op's implementation (the spec allocates; each ``kernel[grid](...)`` of the
launcher becomes ``torch.library.wrap_triton``'s, see backends/triton/_launch.py),
so the graph holds ``triton_kernel_wrapper_functional`` nodes, which Inductor
compiles, schedules and calls from its own code, writing each kernel's outputs
in place (torch reads from the kernel's TTIR which arguments it writes).
That is ``torch.library.triton_op``'s mechanism, a rule for FunctionalTensorMode
(the mode AOTAutograd traces under) that runs the implementation, registered on
the op ``gpukernels::<name>`` itself instead of making the op a ``triton_op``:
a ``triton_op`` decomposes on every backend, so the NumPy, CuPy and interpreter
paths would need a second, inner opaque op, which their graphs would name
instead of the public one. The rule keeps the op one opaque node
(its implementation called back at run time, as before) on other backends, under
the Triton interpreter, for ops with tensor-list arguments (AdamW's step: its
kernel reaches the tensors through a table of their addresses, which no graph
can hold), for ops declared ``traced=False`` (the fused linear + cross-entropy:
its time is cuBLAS matmuls, which Inductor would lower again, worse: see
ops/linear_cross_entropy.py), for symbolic sizes or scalars (dynamic shapes: the
launchers work shapes out on the host, as ints), under ``torch.export`` (as for
``triton_op``s) and for tensor subclasses other than fake and functional tensors. Every kernel
of the Triton backend is listed for the op as ``triton_op`` lists its own, so
that AOTAutograd's cache key covers their sources (not the launchers').
"""

from __future__ import annotations

import functools
import importlib.util
import re
from itertools import chain
from operator import attrgetter
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

from .. import _backend
from .._backend import backend_for, backend_name, kernel_for
from .._numerics import row_count, row_stats, stats_dtype  # noqa: F401  (the op files' rules for statistics and rows)
from ._checks import PLAIN_TENSOR_TYPES, contiguous_param

try:  # torch's list of each triton_op's kernels, for AOTAutograd's cache key
    from torch._library.triton import triton_ops_to_kernels
except ImportError:  # an older torch, without that cache
    triton_ops_to_kernels = {}

_PLAIN_ARGUMENT_TYPES = PLAIN_TENSOR_TYPES | {type(None), bool, int, float, str, torch.dtype}
_LISTED_ARGUMENT_TYPES = _PLAIN_ARGUMENT_TYPES | {list}
_is_list = list.__instancecheck__

OPS: dict[str, "KernelOp"] = {}
"""Every declared op by name: the kernel contract each backend must meet."""


_is_meta = attrgetter("is_meta")


def _needs_dispatch_for(value) -> bool:
    if type(value) in PLAIN_TENSOR_TYPES:
        return value.is_meta
    if isinstance(value, torch.Tensor):  # a subclass: FakeTensor, DTensor, ...
        return True
    if isinstance(value, (list, tuple)):
        if PLAIN_TENSOR_TYPES.issuperset(map(type, value)):  # a list of plain tensors, in passes that run in C
            return any(map(_is_meta, value))
        return any(_needs_dispatch_for(v) for v in value)
    return False


_grad_enabled = torch.is_grad_enabled  # off (a backward, inference): no autograd node to make
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._len_torch_function_stack
_functorch_level = torch._C._functorch.peek_interpreter_stack


_legacy_batched = torch._C._functorch.is_legacy_batchedtensor
# the (pack, unpack) pair of saved_tensors_hooks in effect, None without
_saved_tensors_hooks = torch._C._autograd._top_saved_tensors_default_hooks


def dense(*tensors: Tensor | None) -> tuple:
    """Each tensor contiguous (None kept). A backward reads its saved tensors through this
    when ``ctx.relaid``: they were saved under ``saved_tensors_hooks``, whose unpack may
    return a tensor of other strides (its values the same), which the kernels, reading
    them as the forward laid them out, would misread; every kernel takes dense tensors."""
    return tuple(map(contiguous_param, tensors))


def legacy_batched(grad: Tensor) -> bool:
    """Whether a backward's gradient is batched by torch's legacy vmap (``DispatchEveryOp``),
    for a backward that Dynamo may trace (an autograd.Function's: batch_norm's): not asked
    under torch.compile, which cannot trace that C function (and batches nothing so)."""
    return not _is_compiling() and _legacy_batched(grad)


class DispatchEveryOp(torch.overrides.TorchFunctionMode):
    """A mode under which ``needs_dispatch`` is true for every call: a backward given
    gradients batched by torch's legacy vmap (``autograd.grad(is_grads_batched=True)``,
    ``autograd.functional.jacobian(vectorize=True)``) runs under it, since its kernels
    cannot take batched tensors, which ``needs_dispatch`` cannot tell from plain ones
    (a plain type, no functorch level); through the dispatcher, that vmap's fallback
    runs the op sample by sample. Backwards check their first gradient given."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def under_func_transforms() -> bool:
    """Whether torch.func's transforms (grad, vjp, jacrev, vmap) are active, outside
    torch.compile: ops with an autograd formula then go through ``transform_function``'s."""
    return _functorch_level() is not None and not _is_compiling()


def needs_dispatch(args: Sequence) -> bool:
    """Whether a call with ``args`` must go through the custom op."""
    # compile; dispatch or torch-function modes (fake tensors, flop counters,
    # torch.device(...)); functorch transforms (vmap, grad)
    if _is_compiling() or _dispatch_modes() or _function_modes() or _functorch_level() is not None:
        return True
    first = args[0]
    if type(first) in PLAIN_TENSOR_TYPES and _PLAIN_ARGUMENT_TYPES.issuperset(map(type, args)):
        # plain tensors and values (a pass that runs in C): meta tensors go to the fake
        # implementation, and the first tensor's device is the op's (a meta tensor beside
        # real ones is a device mismatch, which the public functions refuse)
        return first.is_meta
    if type(first) is list and _LISTED_ARGUMENT_TYPES.issuperset(map(type, args)):
        # a multi-tensor op's lists beside plain values, in passes that run in C: its tensors
        # are its lists' (a meta or other device beside them is a mismatch its spec refuses)
        tensors = list(chain.from_iterable(filter(_is_list, args)))
        if PLAIN_TENSOR_TYPES.issuperset(map(type, tensors)):
            return any(map(_is_meta, tensors))
    for a in args:
        kind = type(a)
        if kind in PLAIN_TENSOR_TYPES:
            if a.is_meta:
                return True
        elif kind not in _PLAIN_ARGUMENT_TYPES and _needs_dispatch_for(a):
            return True
    return False


def device_of(first) -> torch.device:
    """The device of an op's first argument: a tensor, or a list of them (multi-tensor ops)."""
    if isinstance(first, Tensor):
        return first.device
    return first[0].device if first else torch.device("cpu")  # an empty list: nothing to launch


_SYMBOLIC_TYPES = (torch.SymInt, torch.SymFloat, torch.SymBool)
_TRACED_TENSOR_TYPES = (Tensor, torch.nn.Parameter, FunctionalTensor)


def _concrete(value) -> bool:
    """Whether ``value`` (an op argument) has no symbolic size, stride or scalar."""
    if isinstance(value, Tensor):
        return all(type(s) is int for s in (*value.shape, *value.stride(), value.storage_offset()))
    if isinstance(value, (list, tuple)):
        return all(_concrete(v) for v in value)
    return not isinstance(value, _SYMBOLIC_TYPES)


def _exporting() -> bool:
    """Whether torch.export is tracing (it keeps ``triton_op``s whole; a torch without
    that rule decomposes them)."""
    try:
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:
        return False
    return custom_triton_ops_decomposition_disabled()


def _compiled_triton() -> bool:
    """Whether the Triton backend's kernels are compiled (``triton.jit``), not the
    interpreter's: then it serves CUDA tensors only, and its launches can be traced."""
    from ..backends.triton._common import INTERPRETING

    return not INTERPRETING


class _TritonKernels:
    """Every kernel of the Triton backend, as ``torch._library.triton`` lists an op's
    kernels for AOTAutograd's cache key; found when a key is first made, since the
    backend's modules are imported when an op first runs on it."""

    def __iter__(self) -> Iterator:
        if importlib.util.find_spec("triton") is None:
            return iter(())
        for family in {op.family for op in OPS.values()}:
            importlib.import_module(f"gpukernels.backends.triton.{family}")
        from ..backends.triton._launch import KERNELS

        return iter([kernel.fn for kernel in KERNELS])


_TRITON_KERNELS = _TritonKernels()


class KernelOp:
    """A kernel-backed custom op made from its output spec (see the module doc).

    ``op(*args)`` runs it on the backend selected for the first argument's
    device; ``op.on(backend, *args)`` on a given one (a backward on its
    forward's). ``kernel_inputs`` and ``kernel_outputs`` name the arguments of
    the backends' kernel ``name``, in order."""

    def __init__(self, spec: Callable, family: str, mutates_args: Sequence[str] = (), traced: bool = True):
        self.name = spec.__name__
        self.family = family
        self.spec = spec
        params = list(spec.__code__.co_varnames[: spec.__code__.co_argcount])
        if params[-1:] != ["backend"]:
            raise TypeError(f"the output spec of {self.name} must take `backend: str` last")
        self.kernel_inputs = tuple(params[:-1])
        schema = torch.library.infer_schema(spec, mutates_args=tuple(mutates_args))
        self.custom_op = torch.library.custom_op(
            f"gpukernels::{self.name}", self._run, mutates_args=tuple(mutates_args), schema=schema
        )
        self.custom_op.register_fake(spec)
        # a multi-tensor op's kernel reads its tensors' addresses from a table: opaque to tracing
        if traced and not re.search(r"Tensor\??\[\]", schema):
            self.custom_op.register_torch_dispatch(FunctionalTensorMode, self._decompose)
            triton_ops_to_kernels[f"gpukernels::{self.name}"] = _TRITON_KERNELS
        self._eager = self._run
        self._transformed: Callable | None = None  # set with the autograd formula
        OPS[self.name] = self

    def _run(self, *args):
        outputs = self.spec(*args)
        first = args[0]
        device = first.device if type(first) in PLAIN_TENSOR_TYPES else device_of(first)
        # kernel_for's cache read here: one call less
        kernel = _backend._kernels.get((args[-1], self.family, self.name, device))
        if kernel is None:
            kernel = kernel_for(args[-1], self.family, self.name, device)
        if outputs is None:
            kernel(*args[:-1])
        elif type(outputs) is tuple:
            kernel(*args[:-1], *outputs)
        else:
            kernel(*args[:-1], outputs)
        return outputs

    def _decompose(self, mode, op, types, args, kwargs):
        """The op under FunctionalTensorMode (AOTAutograd): its implementation traced,
        each launch a ``wrap_triton`` node, on the Triton backend's CUDA path; one
        opaque node otherwise (see the module doc)."""
        if (
            args[-1] == "triton"
            and not kwargs
            and _compiled_triton()
            and all(t in _TRACED_TENSOR_TYPES or issubclass(t, FakeTensor) for t in types)
            and _concrete(args)
            and not _exporting()
        ):
            from ..backends.triton._launch import traced_launches

            with mode, traced_launches():
                return self._run(*args)
        return mode.__torch_dispatch__(op, types, args, kwargs)

    def __call__(self, *args):  # self.on(backend_name(device of args[0]), *args), one call less
        first = args[0]
        args = (*args, backend_for(first) if type(first) in PLAIN_TENSOR_TYPES else backend_name(device_of(first)))
        if needs_dispatch(args):
            return self._dispatched(args)
        return self._eager(*args) if _grad_enabled() else self._run(*args)

    def on(self, backend: str, *args):
        args = (*args, backend)
        if needs_dispatch(args):
            return self._dispatched(args)
        return self._eager(*args) if _grad_enabled() else self._run(*args)

    def _dispatched(self, args: tuple):
        """The op through the dispatcher, or under torch.func's transforms through its
        function for them (the custom op's own autograd has none: see ``transform_function``)."""
        if self._transformed is not None and under_func_transforms():
            return self._transformed(*args)
        return self.custom_op(*args)

    def _run_any(self, *args):
        """The implementation on plain tensors, the custom op on others (a transform's
        wrapped tensors: vmap's rule runs the forward on batched tensors)."""
        return self.custom_op(*args) if needs_dispatch(args) else self._run(*args)

    def eagerly(self, backend: str, *args):
        """``on(backend, *args)`` for a caller that found ``needs_dispatch`` false for
        these arguments (under the same modes): the eager path, without asking again."""
        return self._eager(*args, backend) if _grad_enabled() else self._run(*args, backend)

    def register_autograd(
        self,
        setup_context: Callable,
        backward: Callable,
        twice_differentiable: bool = False,
        differentiable_outputs: int = 1,
    ) -> None:
        """The op's autograd formula, for the custom op and the eager bypass alike.
        ``setup_context(ctx, inputs, output)`` sees the inputs without the backend,
        which it finds in ``ctx.backend`` (and in ``ctx.relaid`` whether saved tensors may
        come back laid out anew: ``dense``); ``backward`` returns one gradient per
        input but the backend. Gradients are not materialised as zeros: the backward
        runs when one of the first ``differentiable_outputs`` outputs has one (the
        others, statistics saved for the backward, have none that matters), and
        takes None for those of them that have none.

        Backward kernels have no autograd of their own, so unless ``backward`` is
        made of differentiable ops (``twice_differentiable``), a second derivative
        through it raises instead of silently leaving out this op's term."""

        no_grads = (None,) * (len(self.kernel_inputs) + 1)  # one per input, the backend's included

        def setup(ctx, inputs, output):
            ctx.materialize_grads = False  # ctx.set_materialize_grads(False), one call less
            ctx.backend = inputs[-1]
            ctx.relaid = _saved_tensors_hooks(False) is not None
            setup_context(ctx, inputs[:-1], output)

        guarded_backward = refuse_second_derivative(self.name)(backward)

        def backward_of_outputs(ctx, *grads):
            given = grads[0]
            if given is None:
                given = next((g for g in grads[1:differentiable_outputs] if g is not None), None)
                if given is None:
                    return no_grads
            # create_graph: guard the second derivative
            run = guarded_backward if not twice_differentiable and torch.is_grad_enabled() else backward
            if _legacy_batched(given):  # the custom op's autograd, which Dynamo does not trace
                with DispatchEveryOp():
                    return (*run(ctx, *grads), None)
            return (*run(ctx, *grads), None)

        self.custom_op.register_autograd(backward_of_outputs, setup_context=setup)
        self._transformed = transform_function(self.name, self._run_any, setup, backward_of_outputs).apply

        run = self._run

        # forward(ctx, ...), not forward(...) with a setup_context: Function.apply binds
        # the arguments to the signature of the latter on every call (inspect, host time);
        # setup's lines inline, one call less
        def forward(ctx, *args):
            output = run(*args)
            ctx.materialize_grads = False
            ctx.backend = args[-1]
            ctx.relaid = _saved_tensors_hooks(False) is not None
            setup_context(ctx, args[:-1], output)
            return output

        # Function.apply looks these up on the class on every call, through the metaclass's
        # and the class's whole MRO unless the class's own dict has them (host time)
        inherited = {
            name: next(c.__dict__[name] for c in torch.autograd.Function.__mro__ if name in c.__dict__)
            for name in _LOOKED_UP_BY_APPLY
        }
        function = type(
            f"{self.name}_function",
            (torch.autograd.Function,),
            {**inherited, "forward": staticmethod(forward), "backward": staticmethod(backward_of_outputs)},
        )
        self._eager = eager_apply(function)


_C_FUNCTION_APPLY = torch._C._FunctionBase.__dict__["apply"]
_LOOKED_UP_BY_APPLY = [
    name
    for name in ("setup_context", "clear_saved_tensors_on_access", "boxed_grads_call")
    if hasattr(torch.autograd.Function, name)
]


def eager_apply(function: type[torch.autograd.Function]) -> Callable:
    """``function.apply`` without its Python layer: the C apply it ends in. That layer
    is for functorch transforms and torch.compile, under which ``needs_dispatch`` is
    true: call this only where it is false.

    Its backward is run directly too: the engine calls the node's ``apply``, torch's
    Python method that looks the backward up again on every call (``backward`` or
    ``vjp``, boxed or not: two calls and a few class lookups, one of a missing
    attribute), so the backward itself is made that method."""
    function._backward_cls.apply = function.backward
    return _C_FUNCTION_APPLY.__get__(None, function)


def transform_function(name: str, forward: Callable, setup_context: Callable, backward: Callable) -> type:
    """An op's autograd.Function for torch.func's transforms, which take only the
    ``setup_context`` form (functorch calls ``forward(*args)`` at each level, the
    inputs unwrapped, then ``setup_context`` on the level's). The custom op's own
    autograd, torch.library's, is of the other form, which they refuse; the eager
    bypass's is too (``Function.apply`` binds a ``setup_context`` form's arguments to
    its signature on every call: host time). vmap runs ``forward`` on batched tensors
    (``generate_vmap_rule``), so it must take them: through the custom op."""
    return type(
        f"{name}_for_transforms",
        (torch.autograd.Function,),
        {
            "generate_vmap_rule": True,
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
        },
    )


class _SecondDerivativeRefused(torch.autograd.Function):
    """Passes a backward's gradients through; differentiating them again raises.
    Its inputs include the tensors the backward read (its saved tensors and the
    incoming gradients) that require grad, so every path of a second derivative
    that needs this op's term meets it: ``torch.autograd.grad`` prunes nodes not
    on a path to its inputs, which is why ``once_differentiable``'s error node,
    attached to nothing, would let the term be silently dropped."""

    generate_vmap_rule = True  # the setup_context form: torch.func's transforms take only that

    @staticmethod
    def forward(name: str, outputs_count: int, *tensors):
        return tuple(t.clone() for t in tensors[:outputs_count])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.name = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            f"gpukernels: {ctx.name}'s backward runs kernels without autograd, so its second derivative is not "
            "available; differentiate twice through the PyTorch op instead"
        )


def refuse_second_derivative(name: str) -> Callable[[Callable], Callable]:
    """Decorates an autograd backward ``backward(ctx, *grads)`` made of kernels
    without autograd: a second derivative through it raises (once_differentiable's
    error could be pruned away, see ``_SecondDerivativeRefused``)."""

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def backward_once(ctx, *grads):
            if not torch.is_grad_enabled():  # no create_graph: the usual case, nothing to guard
                return backward(ctx, *grads)
            with torch.no_grad():
                results = backward(ctx, *grads)
            read = [t for t in (*grads, *ctx.saved_tensors) if isinstance(t, Tensor) and t.requires_grad]
            slots = [i for i, r in enumerate(results) if isinstance(r, Tensor)]
            if not read or not slots:
                return results
            guarded = _SecondDerivativeRefused.apply(name, len(slots), *(results[i] for i in slots), *read)
            results = list(results)
            for i, g in zip(slots, guarded):
                results[i] = g
            return tuple(results)

        return backward_once

    return decorate


def kernel_op(family: str, mutates_args: Sequence[str] = (), traced: bool = True) -> Callable[[Callable], KernelOp]:
    """Declare a kernel-backed op from its output spec: ``@kernel_op("layer_norm")``.
    ``traced=False``: one opaque node under torch.compile on every backend (see the module doc)."""
    return lambda spec: KernelOp(spec, family, mutates_args, traced)


def reshaped(t: Tensor, *shape: int) -> Tensor:
    """``t.reshape(shape)``, or ``t`` itself when it has that shape already: every
    reshape or view is a node of the autograd graph, with host time of its own.

    A size goes to torch by keyword or as separate ints, never as one positional tuple
    (here and in every op): given one positional argument, torch's parser of ``reshape``,
    ``view``, ``new_empty``, ``empty`` and the like first tries the ints-as-arguments
    form, which raises and clears a TypeError for a tuple: 3,500 host instructions a
    call, 13,000 for a ``torch.Size``."""
    return t if t.shape == shape else t.reshape(shape=shape)
