"""linear_cross_entropy: custom ops ``gpukernels::linear_cross_entropy_fwd/_bwd``,
their fake implementations and autograd, the chunk loop both backends share,
and the checked public function.

``cross_entropy(softcap(x @ weight.T + bias), target)`` (plus ``z_loss * lse**2``
per row) without ever holding the (rows, vocab) logits: the rows are taken a
chunk at a time. For each chunk the backend computes the logits, the row
kernel writes the logits' gradient over them, and that gradient is at once
contracted into the chunk's rows of ``dx`` and added into ``dweight`` and
``dbias`` (fp32 accumulators, fp64 for fp64). Only then is the next chunk's
buffer made, so the extra memory is one chunk of logits plus the gradients
(dx, and dweight/dbias in the input dtype and in fp32).

With ``reduction="mean"`` or ``"sum"`` the upstream gradient is one number,
so the forward computes the gradients (scaled by 1/count for the mean) and
the backward only multiplies them by it. With ``reduction="none"`` each row
has its own upstream gradient, unknown in the forward: the forward computes
the losses only, and the backward runs the chunk loop again, recomputing each
chunk's logits, with those per-row scales.
Double backward is not supported: the saved gradients are not differentiable.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .._backend import get_kernel
from ._checks import check_choice, check_device, check_float, check_number, check_optional_float, empty_grad
from .cross_entropy import REDUCTIONS, TARGET_DTYPES

# Logits held per chunk: a fixed budget on CPU; on CUDA a share of the free
# memory, at most the cap (beyond ~2k rows a chunk's matmuls are as efficient as
# one over all rows, so more memory buys no speed).
CPU_CHUNK_BYTES = 64 << 20
CUDA_CHUNK_SHARE = 8
CUDA_MAX_CHUNK_BYTES = 512 << 20


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_budget(device: torch.device) -> int:
    """Bytes of logits one chunk may hold on ``device``."""
    if device.type != "cuda":
        return CPU_CHUNK_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached, reusable
    return min(free // CUDA_CHUNK_SHARE, CUDA_MAX_CHUNK_BYTES)


def default_chunk_rows(rows: int, vocab: int, dtype: torch.dtype, budget: int) -> int:
    """Rows per chunk: as many rows of logits (in the compute dtype) as fit ``budget``,
    at least 1, at most ``rows``."""
    row_bytes = vocab * _acc_dtype(dtype).itemsize
    return max(1, min(rows, budget // row_bytes))


class _Options(NamedTuple):
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: Optional[float]


def _run_chunks(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, grad_scale: Tensor,
                options: _Options, chunk_size: Optional[int], grads: tuple[bool, bool, bool]):
    """Per-row loss (0 on ignored rows) and logsumexp, and the gradients asked for by
    ``grads`` (x, weight, bias) of ``sum_i grad_scale_i * loss_i`` (``grad_scale`` 0-d or
    one per row): dx in x's dtype, dweight and dbias in the accumulation dtype."""
    rows, vocab = x.shape[0], weight.shape[0]
    acc = _acc_dtype(x.dtype)
    kernel = get_kernel("linear_cross_entropy", "linear_cross_entropy_chunk", x.device)
    loss = x.new_empty(rows, dtype=acc)
    lse = x.new_empty(rows, dtype=acc)
    dx = torch.empty_like(x) if grads[0] else None
    dweight = weight.new_zeros(weight.shape, dtype=acc) if grads[1] else None
    dbias = weight.new_zeros(vocab, dtype=acc) if grads[2] else None
    step = chunk_size or default_chunk_rows(rows, vocab, x.dtype, chunk_budget(x.device))
    per_row_scale = grad_scale.dim() == 1
    # autocast reaches into a custom op's body: it would round the fp32 accumulators to bf16
    with torch.autocast(x.device.type, enabled=False):
        for start in range(0, rows, step):
            part = slice(start, start + step)
            kernel(x[part], weight, bias, target[part], grad_scale[part] if per_row_scale else grad_scale,
                   **options._asdict(), loss=loss[part], lse=lse[part], dx=None if dx is None else dx[part],
                   dweight=dweight, dbias=dbias)
    return loss, lse, dx, dweight, dbias


def _forward_grads(reduction: str, bias: Optional[Tensor], grad_x: bool, grad_weight: bool,
                   grad_bias: bool) -> tuple[bool, bool, bool]:
    """The gradients the forward computes: those asked for, with mean/sum only."""
    if reduction == "none":
        return False, False, False
    return grad_x, grad_weight, grad_bias and bias is not None


def _in_dtypes(grads: tuple[Optional[Tensor], ...], likes: tuple[Optional[Tensor], ...]) -> tuple[Tensor, ...]:
    """Each gradient in its tensor's dtype; an empty placeholder for one not computed."""
    return tuple(empty_grad(likes[0]) if g is None else g.to(like.dtype) for g, like in zip(grads, likes))


@torch.library.custom_op("gpukernels::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int,
                             label_smoothing: float, z_loss: float, softcap: Optional[float], reduction: str,
                             chunk_size: Optional[int], grad_x: bool, grad_weight: bool,
                             grad_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, lse, dx, dweight, dbias): the reduced loss and the per-row logsumexp in
    fp32 (fp64 for fp64); for mean/sum the gradients of the loss asked for by
    ``grad_*`` in their tensors' dtypes (empty when not asked; ``reduction="none"``
    asks for none: its backward recomputes them)."""
    options = _Options(ignore_index, label_smoothing, z_loss, softcap)
    acc = _acc_dtype(x.dtype)
    kept_rows = (target != ignore_index).sum(dtype=acc)
    if reduction == "mean":
        grad_scale = torch.where(kept_rows > 0, 1 / kept_rows, 0)
    else:
        grad_scale = torch.ones((), dtype=acc, device=x.device)
    grads = _forward_grads(reduction, bias, grad_x, grad_weight, grad_bias)
    loss, lse, dx, dweight, dbias = _run_chunks(x, weight, bias, target, grad_scale, options, chunk_size, grads)
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / kept_rows  # all rows ignored: 0/0, nan as in PyTorch
    return (loss, lse, *_in_dtypes((dx, dweight, dbias), (x, weight, bias)))


@linear_cross_entropy_fwd.register_fake
def _(x, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap, reduction, chunk_size,
      grad_x, grad_weight, grad_bias):
    acc = _acc_dtype(x.dtype)
    rows = x.shape[0]
    loss = x.new_empty((rows,) if reduction == "none" else (), dtype=acc)
    grads = _forward_grads(reduction, bias, grad_x, grad_weight, grad_bias)
    return (loss, x.new_empty(rows, dtype=acc),
            torch.empty_like(x) if grads[0] else empty_grad(x),
            torch.empty_like(weight) if grads[1] else empty_grad(x),
            torch.empty_like(bias) if grads[2] else empty_grad(x))


@torch.library.custom_op("gpukernels::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(dloss: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                             ignore_index: int, label_smoothing: float, z_loss: float, softcap: Optional[float],
                             chunk_size: Optional[int], grad_x: bool, grad_weight: bool,
                             grad_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``sum_i dloss_i * loss_i`` (reduction="none"): the chunks again, their
    logits recomputed, each row's gradient scaled by its ``dloss_i``."""
    options = _Options(ignore_index, label_smoothing, z_loss, softcap)
    row_scale = dloss.to(_acc_dtype(x.dtype)).contiguous()
    grads = (grad_x, grad_weight, grad_bias and bias is not None)
    _, _, dx, dweight, dbias = _run_chunks(x, weight, bias, target, row_scale, options, chunk_size, grads)
    return _in_dtypes((dx, dweight, dbias), (x, weight, bias))


@linear_cross_entropy_bwd.register_fake
def _(dloss, x, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap, chunk_size,
      grad_x, grad_weight, grad_bias):
    return (torch.empty_like(x) if grad_x else empty_grad(x),
            torch.empty_like(weight) if grad_weight else empty_grad(x),
            torch.empty_like(bias) if grad_bias and bias is not None else empty_grad(x))


def _setup_context(ctx, inputs, output):
    x, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap, reduction, chunk_size, *grads = inputs
    _, lse, dx, dweight, dbias = output
    ctx.mark_non_differentiable(lse, dx, dweight, dbias)
    ctx.reduction = reduction
    ctx.grads = tuple(grads)
    ctx.options = (ignore_index, label_smoothing, z_loss, softcap, chunk_size)
    ctx.has_bias = bias is not None
    if reduction == "none":
        ctx.save_for_backward(x, weight, bias, target)
    else:
        ctx.save_for_backward(dx, dweight, dbias)


def _backward(ctx, dloss, _dlse, _ddx, _ddweight, _ddbias):
    wanted = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and ctx.has_bias)
    if ctx.reduction == "none":
        x, weight, bias, target = ctx.saved_tensors
        grads = linear_cross_entropy_bwd(dloss.contiguous(), x, weight, bias, target, *ctx.options, *wanted)
    else:
        missing = [name for name, want, got in zip(("x", "weight", "bias"), wanted, ctx.grads) if want and not got]
        if missing:
            raise RuntimeError(f"linear_cross_entropy_fwd was called without grad_{missing[0]}=True, so it has no "
                               f"gradient to give; gpukernels.linear_cross_entropy decides this itself")
        grads = tuple(g * dloss for g in ctx.saved_tensors)
    return (*(g if want else None for g, want in zip(grads, wanted)), *(None,) * 10)


linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_target(target: Tensor, x: Tensor) -> None:
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor of class indices, got {type(target).__name__}")
    if target.dtype not in TARGET_DTYPES:
        raise TypeError(f"target must hold class indices as int64 (or int32), got {target.dtype}")
    check_device("target", target, x)
    if tuple(target.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"target must have shape {tuple(x.shape[:-1])} (x's leading dims) for x of shape "
                         f"{tuple(x.shape)}, got {tuple(target.shape)}")


def _check_tensors(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    check_float("x", x)
    check_float("weight", weight)
    check_device("weight", weight, x)
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must be 2-D (vocab, hidden) with vocab >= 1, got shape {tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x of shape {tuple(x.shape)} and weight of shape {tuple(weight.shape)} do not fit: "
                         f"x's last dim must equal weight's hidden size {weight.shape[1]}")
    check_optional_float("bias", bias, x, (weight.shape[0],))


def _check_dtypes(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise RuntimeError(f"x and {name} must have the same dtype, got {x.dtype} and {t.dtype}")


def _check_options(ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size, return_lse):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_choice("reduction", reduction, REDUCTIONS)
    label_smoothing = check_number("label_smoothing", label_smoothing, low=0.0, high=1.0)
    z_loss = check_number("z_loss", z_loss, low=0.0)
    softcap = None if softcap is None else check_number("softcap", softcap, low=0.0, low_open=True)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    return label_smoothing, z_loss, softcap


def _autocast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """As autocast casts for F.linear: every floating tensor but fp64."""
    return t if t is None or t.dtype == torch.float64 else t.to(dtype)


def linear_cross_entropy(x: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         z_loss: float = 0.0, softcap: float | None = None, chunk_size: int | None = None,
                         return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """``F.cross_entropy(c, target, ignore_index=..., reduction=..., label_smoothing=...)``
    with ``c = softcap * tanh(z / softcap)`` (``c = z`` when ``softcap`` is None) and
    ``z = F.linear(x, weight, bias)``, plus ``z_loss * logsumexp(c)**2`` added to each
    row's loss that is not ignored (so the mean divides both by the rows not ignored),
    without ever holding the (rows, vocab) logits.

    ``x`` is ``(..., hidden)``, ``weight`` ``(vocab, hidden)`` as in ``nn.Linear``,
    ``target`` ``x.shape[:-1]`` class indices. Rows are taken ``chunk_size`` at a time
    (default: as many as fit 64 MiB of logits on CPU, 1/8 of the free memory up to
    512 MiB on CUDA). With mean/sum the gradients are computed in the forward and the
    backward only scales them; with ``reduction="none"`` the backward recomputes each
    chunk's logits to scale every row by its own upstream gradient (one more pass).
    All rows ignored gives a nan mean and zero gradients, as PyTorch does.

    The loss has x's dtype (fp32 under autocast, whose dtype x, weight and bias are cast
    to as F.linear would). ``return_lse=True`` also returns the per-row logsumexp of
    ``c``, shape ``x.shape[:-1]``, fp32 (fp64 for fp64), not differentiable."""
    _check_tensors(x, weight, bias)
    _check_target(target, x)
    label_smoothing, z_loss, softcap = _check_options(ignore_index, reduction, label_smoothing, z_loss, softcap,
                                                      chunk_size, return_lse)
    device_type = x.device.type
    autocasting = torch.is_autocast_enabled(device_type)
    if autocasting:
        dtype = torch.get_autocast_dtype(device_type)
        x, weight, bias = _autocast(x, dtype), _autocast(weight, dtype), _autocast(bias, dtype)
    _check_dtypes(x, weight, bias)

    grad_enabled = torch.is_grad_enabled()
    loss, lse, _, _, _ = linear_cross_entropy_fwd(
        x.reshape(-1, weight.shape[1]).contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
        target.reshape(-1).long(), ignore_index, label_smoothing, z_loss, softcap, reduction, chunk_size,
        grad_enabled and x.requires_grad, grad_enabled and weight.requires_grad,
        grad_enabled and bias is not None and bias.requires_grad)
    batch_shape = x.shape[:-1]
    loss = loss.view(batch_shape) if reduction == "none" else loss
    if not (autocasting and x.dtype != torch.float64):
        loss = loss.to(x.dtype)
    return (loss, lse.view(batch_shape)) if return_lse else loss
