"""rope: rotary position embedding of queries and keys, transformers'
``apply_rotary_pos_emb``, as one op ``gpukernels::rope`` for both tensors each
way (its output spec and kernel contract), its autograd, and the checked
public function.

The rotation pairs element ``j`` of a head's first half with element ``j`` of
its second half (``rotate_half``), or with ``interleaved`` element ``2j`` with
``2j + 1`` (Cohere's and GLM's rotate_half); a cos narrower than a head rotates
that many leading elements and passes the rest through (a partial rotary
embedding: GPT-NeoX's, Phi-4's, Qwen3-Next's). Its backward is the same op,
transposed (``transpose``): the rotation's matrix is not assumed orthogonal,
since some rope variants scale cos and sin. Nothing is saved but cos and sin.

The kernels see ``q`` and ``k`` as ``(batch, heads, time, head_dim)`` or
``(batch, time, heads, head_dim)`` tensors (``heads_dim`` 1 or 2) of any
strides whose last is 1, ``cos`` and ``sin`` as ``(batch or 1, time,
rotated)`` tensors of one layout, last stride 1, ``rotated`` even and at most
``head_dim``, and write outputs laid out
as their spec makes them (``empty_like``: the input's strides where it is
dense).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ArgumentError, ArgumentTypeError
from ._checks import autocast_enabled, check_device, check_float, check_int
from ._op import dense, kernel_op

# transformers' unsqueeze_dim -> the dim of q and k that holds the heads
_HEADS_DIM = {1: 1, 2: 2, -3: 1, -2: 2}


@kernel_op("rope")
def rope(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    heads_dim: int,
    transpose: bool,
    interleaved: bool,
    dtype: torch.dtype,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Kernel: for ``x`` each of ``q`` and ``k``, with ``x1, x2`` the pairs of each head's
    first ``rotated`` elements (``cos.shape[-1]``): the halves of those, or with
    ``interleaved`` their even and odd elements; and ``c1, c2``, ``s1, s2`` the elements
    of its position's ``cos`` and ``sin`` at the same places; in fp32 (fp64 when q or cos
    is fp64): ``x1 c1 - x2 s1`` and ``x2 c2 + x1 s2`` (the rotation), or with ``transpose``
    ``x1 c1 + x2 s2`` and ``x2 c2 - x1 s1`` (its transpose: the backward), and the elements
    past ``rotated`` as they are, into ``q_out`` and ``k_out`` in ``dtype``."""
    return _output_like(q, dtype), _output_like(k, dtype)


def _output_like(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``empty_like(t, dtype=dtype)`` with a unit last stride, as the kernels write each
    head: empty_like keeps a dense ``t``'s strides (the attention's layout of heads and
    time), but lays out other tensors in the order of their strides, which for a ``t``
    whose elements overlap (time and head_dim both of stride 1) may put a head's apart."""
    out = torch.empty_like(t, dtype=dtype)
    return out if out.stride(-1) == 1 else t.new_empty(size=t.shape, dtype=dtype)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, heads_dim, transpose, interleaved, _ = inputs
    ctx.save_for_backward(cos, sin)
    ctx.options = heads_dim, transpose, interleaved, q.dtype
    ctx.outputs = output[0].shape, output[1].shape, output[0].dtype


def _unit_last_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _backward(ctx, dq, dk):
    cos, sin = dense(*ctx.saved_tensors) if ctx.relaid else ctx.saved_tensors
    heads_dim, transpose, interleaved, dtype = ctx.options
    q_shape, k_shape, out_dtype = ctx.outputs
    # one output without a gradient (unused): zeros in its place, and no gradient for its input
    dq_in = torch.zeros(size=q_shape, dtype=out_dtype, device=cos.device) if dq is None else _unit_last_stride(dq)
    dk_in = torch.zeros(size=k_shape, dtype=out_dtype, device=cos.device) if dk is None else _unit_last_stride(dk)
    grad_q, grad_k = rope.on(ctx.backend, dq_in, dk_in, cos, sin, heads_dim, not transpose, interleaved, dtype)
    return None if dq is None else grad_q, None if dk is None else grad_k, None, None, None, None, None, None


rope.register_autograd(_setup_context, _backward, differentiable_outputs=2)


def _check_heads(name: str, t: Tensor, q: Tensor, heads_dim: int) -> None:
    """``t`` (q or k): a float 4-D tensor of q's dtype and device whose batch, time and
    head_dim are q's."""
    check_float(name, t)
    if t.dim() != 4:
        raise ArgumentError(
            f"{name} must be 4-D, (batch, heads, time, head_dim) for unsqueeze_dim 1 or (batch, time, heads, "
            f"head_dim) for 2, got shape {tuple(t.shape)}"
        )
    if t is q:
        return
    check_device(name, t, q)
    if t.dtype != q.dtype:
        raise ArgumentTypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; cast them to one dtype")
    time_dim = 3 - heads_dim
    if (t.shape[0], t.shape[time_dim], t.shape[3]) != (q.shape[0], q.shape[time_dim], q.shape[3]):
        raise ArgumentError(
            f"{name} of shape {tuple(t.shape)} must have q's batch, time and head_dim (q: {tuple(q.shape)}, "
            f"heads in dim {heads_dim})"
        )


def _check_trig(cos: Tensor, sin: Tensor, q: Tensor, heads_dim: int) -> None:
    """cos and sin: float tensors of one shape, dtype and device, q's, shaped (batch or 1,
    time, rotated) of q's, ``rotated`` even and at most head_dim; no gradient asked of them."""
    for name, t in (("cos", cos), ("sin", sin)):
        check_float(name, t)
        check_device(name, t, q)
    if sin.dtype != cos.dtype:
        raise ArgumentTypeError(f"sin has dtype {sin.dtype} but cos has {cos.dtype}; cast them to one dtype")
    batch, time, head_dim = q.shape[0], q.shape[3 - heads_dim], q.shape[3]
    if cos.dim() != 3 or cos.shape[0] not in (1, batch) or cos.shape[1] != time or cos.shape[2] > head_dim:
        raise ArgumentError(
            f"cos must have shape ({batch} or 1, {time}, at most {head_dim}) (batch, time of q, and the "
            f"elements of a head it rotates), got {tuple(cos.shape)}"
        )
    if cos.shape[2] % 2:
        raise ArgumentError(
            f"cos's last dim must be even (the elements of a head are rotated in pairs), got {cos.shape[2]}"
        )
    if sin.shape != cos.shape:
        raise ArgumentError(f"sin must have cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}")
    if (cos.requires_grad or sin.requires_grad) and torch.is_grad_enabled():
        raise ArgumentError("cos and sin must not require grad: rope is not differentiable with respect to them")


def apply_rotary_pos_emb(
    q: Tensor, k: Tensor | None, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1, *, interleaved: bool = False
) -> tuple[Tensor, Tensor | None]:
    """transformers' ``apply_rotary_pos_emb``: ``(q * cos + rotate_half(q) * sin, k * cos +
    rotate_half(k) * sin)``, with cos and sin unsqueezed at ``unsqueeze_dim``, in one kernel
    each way for both. ``q``: ``(batch, heads, time, head_dim)`` for ``unsqueeze_dim`` 1,
    ``(batch, time, heads, head_dim)`` for 2; ``k`` likewise, with its own number of heads;
    ``cos`` and ``sin``: ``(batch or 1, time, rotated)``, not requiring grad, ``rotated``
    even: a cos narrower than a head rotates its first ``rotated`` elements and passes the
    rest through (transformers' partial rotary embeddings: ``cat(rope(x[..., :rotated]),
    x[..., rotated:])``). ``interleaved``: rotate_half of adjacent elements,
    ``stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)`` (Cohere's, GLM-4V's). The
    results have the dtype PyTorch's expression gives (q's and cos's promoted), but under
    autocast q's: attention, which reads them, runs in the autocast dtype. ``k=None``
    rotates q alone and returns ``(q's, None)`` (Gemma 3n's and 4's ``apply_rotary_pos_emb``
    takes one tensor)."""
    what = "1 (heads before time) or 2 (time before heads)"
    if type(unsqueeze_dim) is not int:  # a NumPy int, say; not a bool
        unsqueeze_dim = check_int("unsqueeze_dim", unsqueeze_dim, what=what, not_int=ArgumentError)
    heads_dim = _HEADS_DIM.get(unsqueeze_dim)
    if heads_dim is None:
        raise ArgumentError(f"unsqueeze_dim must be {what}, got {unsqueeze_dim!r}")
    _check_heads("q", q, q, heads_dim)
    if k is not None:
        _check_heads("k", k, q, heads_dim)
    _check_trig(cos, sin, q, heads_dim)
    dtype = q.dtype if autocast_enabled(q) else torch.promote_types(q.dtype, cos.dtype)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    if type(interleaved) is not bool:
        raise ArgumentTypeError(f"interleaved must be a bool, got {type(interleaved).__name__}")
    if k is None:  # a k of no heads: the kernels rotate q's and nothing else
        q_out, _ = rope(_unit_last_stride(q), _no_heads(q, heads_dim), cos, sin, heads_dim, False, interleaved, dtype)
        return q_out, None
    return rope(_unit_last_stride(q), _unit_last_stride(k), cos, sin, heads_dim, False, interleaved, dtype)


def _no_heads(q: Tensor, heads_dim: int) -> Tensor:
    shape = list(q.shape)
    shape[heads_dim] = 0
    return q.new_empty(size=shape)
