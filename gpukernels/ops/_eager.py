"""How the public functions call their ops: through torch.library's
dispatcher when something needs it, directly otherwise.

Every op is a torch.library custom op: torch.compile traces it, fake and meta
tensors run its fake implementation, tensor subclasses (DTensor under FSDP2),
dispatch modes and functorch transforms see it. In plain eager mode on plain
tensors none of that is used, and the custom op's Python layers then cost more
host time than a small kernel takes on the GPU: on an H200 machine
(2026-11-26, ``bench --profile``) about 0.35 ms per call, against 0.19 ms of
GPU time for all the kernels of a 4096x4096 bf16 layer_norm forward+backward.
So there the op's own function runs directly, under an autograd.Function
that has the very ``setup_context`` and ``backward`` registered with the
custom op: one implementation, two ways in.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import _op


def needs_dispatch(args) -> bool:
    return _op.needs_dispatch(args)


def direct(op: Callable, fn: Callable) -> Callable:
    """Calls ``op``'s function ``fn`` itself where the dispatcher is not needed."""
    def call(*args):
        return op(*args) if needs_dispatch(args) else fn(*args)
    return call


def with_autograd(op, fn: Callable, setup_context: Callable, backward: Callable) -> Callable:
    """Registers ``setup_context`` and ``backward`` as ``op``'s autograd formula and
    returns the caller of ``op``: where the dispatcher is not needed, an
    autograd.Function with the same formula around ``fn``.

    Gradients of the extra outputs (statistics saved for the backward) are not
    materialised as zeros, and the backward runs only for the first output's
    gradient, which is what every op's formula uses."""

    def setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        ctx.inputs_count = len(inputs)
        setup_context(ctx, inputs, output)

    def backward_of_first_output(ctx, *grads):
        if grads[0] is None:
            return (None,) * ctx.inputs_count
        return backward(ctx, *grads)

    op.register_autograd(backward_of_first_output, setup_context=setup)

    # forward(ctx, ...), not forward(...) with a setup_context: Function.apply binds
    # the arguments to the signature of the latter on every call (inspect, host time)
    def forward(ctx, *args):
        output = fn(*args)
        setup(ctx, args, output)
        return output

    function = type(f"{fn.__name__}_function", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward_of_first_output)})

    def call(*args):
        return op(*args) if needs_dispatch(args) else function.apply(*args)
    return call


def reshaped(t: torch.Tensor, *shape: int) -> torch.Tensor:
    """``t.reshape(shape)``, or ``t`` itself when it has that shape already: every
    reshape or view is a node of the autograd graph, with host time of its own."""
    return t if t.shape == shape else t.reshape(shape)
