"""dropout: the op ``gpukernels::dropout_fwd`` (output spec and kernel
contract), its autograd, and the checked public function.

Inverted dropout on the flattened contiguous tensor, the mask drawn by
Philox4x32-10: element ``i`` takes the 16-bit half ``i % 2`` (low first) of
output word ``(i % 8) // 2`` of the call keyed by ``seed`` at counter ``i // 8``
(one call serves eight elements; see backends/_dropout.py and
backends/numpy/philox.py). Kept elements are scaled by ``1/(1-p)``, dropped
ones multiplied by 0, as PyTorch's ``x * mask * scale``: a dropped inf or nan
gives nan (an overflow stays visible to nan checks and loss scaling). No mask is
stored: the backward is the same op applied to ``dy`` with the same ``p`` and
``seed``, which regenerates the mask.

The keep test. The half ``h`` is the uniform ``h / 2**16``; the element is kept
when that is at least ``p``: ``h > keep_threshold(p) = ceil(p * 2**16) - 1``, an
integer compare, exact on every backend, so the masks are equal on every
backend. ``p`` takes effect rounded up to a multiple of ``2**-16``.

The seed is an int64 0-dim tensor rather than an int, so that drawing one
(``seed=None``) is a tensor op: no graph break under torch.compile, and a
CUDA-graph capture replays a fresh draw instead of baking in a constant.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ArgumentError, ArgumentTypeError
from ._checks import check_device, check_float, check_int, check_number
from ._op import kernel_op

_INT64_RANGE = (-(2**63), 2**63)
# Drawn seeds stay clear of the sign bit; any int64 seed is accepted from the caller.
_DRAWN_SEED_BOUND = 2**62


@kernel_op("dropout")
def dropout_fwd(x: Tensor, p: float, seed: Tensor, backend: str) -> Tensor:
    """Kernel: ``y`` = the contiguous ``x`` with the elements the keep test
    keeps for ``p`` and ``seed`` (an int64 0-dim tensor) times ``1/(1-p)`` (in
    the compute dtype: fp64 for fp64, else fp32), the others 0."""
    return torch.empty_like(x)  # x's strides, contiguous: under half new_empty(x.shape)'s host time


def _setup_context(ctx, inputs, output):
    _, p, seed = inputs
    ctx.save_for_backward(seed)
    ctx.p = p


def _backward(ctx, dy):
    (seed,) = ctx.saved_tensors
    return dropout_fwd.on(ctx.backend, dy.contiguous(), ctx.p, seed), None, None


dropout_fwd.register_autograd(_setup_context, _backward, twice_differentiable=True)  # dropout is linear


def _seed_tensor(seed: int | Tensor | None, like: Tensor) -> Tensor:
    """``seed`` as an int64 0-dim tensor on ``like``'s device; None draws one
    from that device's default generator (so torch.manual_seed repeats it)."""
    if seed is None:
        return torch.randint(0, _DRAWN_SEED_BOUND, (), dtype=torch.int64, device=like.device)
    if isinstance(seed, Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise ArgumentTypeError(
                f"seed must be an int or a one-element int64 tensor, got {seed.dtype} of shape {tuple(seed.shape)}"
            )
        check_device("seed", seed, like)
        return seed.reshape(shape=())
    if type(seed) is not int:  # a NumPy int, say
        seed = check_int("seed", seed, what="an int, a one-element int64 tensor or None")
    if not _INT64_RANGE[0] <= seed < _INT64_RANGE[1]:
        raise ArgumentError(f"seed must fit in int64, got {seed}")
    # a fill kernel, not torch.tensor's copy from pageable host memory, which waits for the GPU
    return torch.full((), seed, dtype=torch.int64, device=like.device)


def dropout(input: Tensor, p: float = 0.5, training: bool = True, seed: int | Tensor | None = None) -> Tensor:
    """``torch.nn.functional.dropout`` (inverted dropout) with a reproducible
    mask: the same ``seed`` gives the same mask on every backend. ``seed=None``
    draws one from PyTorch's default generator of ``input``'s device."""
    check_float("input", input)
    if not (type(p) is float and 0.0 <= p <= 1.0):  # the usual call passes as is
        p = check_number("p", p, low=0.0, high=1.0)
    if not training or p == 0.0:
        return input
    return dropout_fwd(input.contiguous(), p, _seed_tensor(seed, input))
