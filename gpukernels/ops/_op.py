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
  implementation runs directly (under an autograd.Function with the op's own
  autograd formula when it has one), skipping the dispatcher's Python layers,
  which cost more host time than a small kernel takes on the GPU.

The backend is chosen once, when the public function calls the op, and passed
to it as its last argument; the autograd context keeps it, so the backward runs
on the forward's backend whatever is selected when it runs.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .._backend import backend_name, kernel_for
from .._numerics import stats_dtype  # noqa: F401  (the op files' one rule for statistics)

_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_PLAIN_VALUE_TYPES = (type(None), bool, int, float, str)

OPS: dict[str, "KernelOp"] = {}
"""Every declared op by name: the kernel contract each backend must meet."""


def _needs_dispatch_for(value) -> bool:
    if type(value) in _PLAIN_TENSOR_TYPES:
        return value.is_meta
    if isinstance(value, torch.Tensor):  # a subclass: FakeTensor, DTensor, ...
        return True
    if isinstance(value, (list, tuple)):
        return any(_needs_dispatch_for(v) for v in value)
    return False


_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._len_torch_function_stack
_functorch_level = torch._C._functorch.peek_interpreter_stack


def needs_dispatch(args: Sequence) -> bool:
    """Whether a call with ``args`` must go through the custom op."""
    # compile; dispatch or torch-function modes (fake tensors, flop counters,
    # torch.device(...)); functorch transforms (vmap, grad)
    if _is_compiling() or _dispatch_modes() or _function_modes() or _functorch_level() is not None:
        return True
    for a in args:
        kind = type(a)
        if kind in _PLAIN_TENSOR_TYPES:
            if a.is_meta:
                return True
        elif kind in _PLAIN_VALUE_TYPES:
            continue
        elif _needs_dispatch_for(a):
            return True
    return False


def device_of(first) -> torch.device:
    """The device of an op's first argument: a tensor, or a list of them (multi-tensor ops)."""
    if isinstance(first, Tensor):
        return first.device
    return first[0].device if first else torch.device("cpu")  # an empty list: nothing to launch


class KernelOp:
    """A kernel-backed custom op made from its output spec (see the module doc).

    ``op(*args)`` runs it on the backend selected for the first argument's
    device; ``op.on(backend, *args)`` on a given one (a backward on its
    forward's). ``kernel_inputs`` and ``kernel_outputs`` name the arguments of
    the backends' kernel ``name``, in order."""

    def __init__(self, spec: Callable, family: str, mutates_args: Sequence[str] = ()):
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
        self._eager = self._run
        OPS[self.name] = self

    def _run(self, *args):
        outputs = self.spec(*args)
        kernel = kernel_for(args[-1], self.family, self.name, device_of(args[0]))
        if outputs is None:
            kernel(*args[:-1])
        elif isinstance(outputs, Tensor):
            kernel(*args[:-1], outputs)
        else:
            kernel(*args[:-1], *outputs)
        return outputs

    def __call__(self, *args):
        return self.on(backend_name(device_of(args[0])), *args)

    def on(self, backend: str, *args):
        args = (*args, backend)
        return self.custom_op(*args) if needs_dispatch(args) else self._eager(*args)

    def register_autograd(self, setup_context: Callable, backward: Callable) -> None:
        """The op's autograd formula, for the custom op and the eager bypass alike.
        ``setup_context(ctx, inputs, output)`` sees the inputs without the backend,
        which it finds in ``ctx.backend``; ``backward`` returns one gradient per
        input but the backend. Gradients of extra outputs (statistics saved for the
        backward) are not materialised as zeros, and the backward runs only for the
        first output's gradient, which is what every op's formula uses."""

        def setup(ctx, inputs, output):
            ctx.set_materialize_grads(False)
            ctx.inputs_count = len(inputs)
            ctx.backend = inputs[-1]
            setup_context(ctx, inputs[:-1], output)

        def backward_of_first_output(ctx, *grads):
            if grads[0] is None:
                return (None,) * ctx.inputs_count
            return (*backward(ctx, *grads), None)

        self.custom_op.register_autograd(backward_of_first_output, setup_context=setup)

        # forward(ctx, ...), not forward(...) with a setup_context: Function.apply binds
        # the arguments to the signature of the latter on every call (inspect, host time)
        def forward(ctx, *args):
            output = self._run(*args)
            setup(ctx, args, output)
            return output

        function = type(
            f"{self.name}_function",
            (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(backward_of_first_output)},
        )
        self._eager = function.apply


def kernel_op(family: str, mutates_args: Sequence[str] = ()) -> Callable[[Callable], KernelOp]:
    """Declare a kernel-backed op from its output spec: ``@kernel_op("layer_norm")``."""
    return lambda spec: KernelOp(spec, family, mutates_args)


def reshaped(t: Tensor, *shape: int) -> Tensor:
    """``t.reshape(shape)``, or ``t`` itself when it has that shape already: every
    reshape or view is a node of the autograd graph, with host time of its own."""
    return t if t.shape == shape else t.reshape(shape)
