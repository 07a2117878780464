"""linear_cross_entropy: custom ops ``gpukernels::linear_cross_entropy_fwd/_bwd``,
their fake implementations and autograd, the two loops both backends share,
and the checked public function.

``cross_entropy(softcap(x @ weight.T + bias), target)`` (plus ``z_loss * lse**2``
per row) without ever holding the (rows, vocab) logits, in two passes, as
flash attention treats its scores:

- forward, by chunks of rows: each chunk's logits, then each row's loss and
  the statistics of its logsumexp (row max and log-sum, fp32; fp64 for fp64).
  Only these (rows,) vectors are saved, beside the inputs.
- backward, by slices of the vocabulary: the slice's logits for all rows again,
  their gradient from the saved statistics written over them, then
  ``dweight[slice] = g.T @ x`` and ``dbias[slice]`` straight in the input dtype
  (one matmul over all rows, accumulated in fp32 inside it) and
  ``dx += g @ weight[slice]`` into an fp32 accumulator.

So the extra memory is one chunk (or slice) of logits, the (rows, hidden) fp32
``dx`` accumulator and the gradients themselves; no (vocab, hidden) fp32
accumulator (2 GiB at vocab 128k, hidden 4096) and no gradient computed in the
forward and held until the backward scales it. The price is one more matmul
than the unfused op (the logits twice), the trade flash attention makes.
The same backward serves every reduction: its per-row scale is the upstream
gradient (``"none"``), that gradient (``"sum"``) or it over the rows kept
(``"mean"``). Double backward is not supported.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .._backend import get_kernel
from ._checks import check_choice, check_device, check_float, check_number, check_optional_float, empty_grad
from ._eager import direct, reshaped, with_autograd
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


def slice_columns(rows: int, vocab: int, chunk_rows: int) -> int:
    """Vocabulary columns per backward slice: as many logits as a chunk of
    ``chunk_rows`` rows holds, at least 1 column, at most ``vocab``."""
    return max(1, min(vocab, chunk_rows * vocab // max(rows, 1)))


class _Options(NamedTuple):
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: Optional[float]


def _chunk_rows(x: Tensor, vocab: int, chunk_size: Optional[int]) -> int:
    return chunk_size or default_chunk_rows(x.shape[0], vocab, x.dtype, chunk_budget(x.device))


def _row_statistics(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, options: _Options,
                    chunk_size: Optional[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Per row: the loss (0 on ignored rows), the max of the (softcapped) logits and the
    log of ``sum exp(logit - max)``, by chunks of rows."""
    rows, vocab = x.shape[0], weight.shape[0]
    kernel = get_kernel("linear_cross_entropy", "linear_cross_entropy_rows", x.device)
    loss, row_max, log_sum = (x.new_empty(rows, dtype=_acc_dtype(x.dtype)) for _ in range(3))
    step = _chunk_rows(x, vocab, chunk_size)
    # autocast reaches into a custom op's body: it would change the logits' dtype
    with torch.autocast(x.device.type, enabled=False):
        for start in range(0, rows, step):
            part = slice(start, start + step)
            kernel(x[part], weight, bias, target[part], **options._asdict(), loss=loss[part], row_max=row_max[part],
                   log_sum=log_sum[part])
    return loss, row_max, log_sum


def _gradients(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, row_max: Tensor, log_sum: Tensor,
               grad_scale: Tensor, options: _Options, chunk_size: Optional[int],
               grads: tuple[bool, bool, bool]) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """The gradients asked for by ``grads`` (x, weight, bias) of ``sum_i grad_scale_i * loss_i``
    (``grad_scale`` 0-d or one per row), by slices of the vocabulary, in the inputs' dtypes."""
    rows, vocab = x.shape[0], weight.shape[0]
    kernel = get_kernel("linear_cross_entropy", "linear_cross_entropy_slice", x.device)
    dx_acc = x.new_zeros(x.shape, dtype=_acc_dtype(x.dtype)) if grads[0] else None
    dweight = torch.empty_like(weight) if grads[1] else None
    dbias = torch.empty_like(bias) if grads[2] else None
    step = slice_columns(rows, vocab, _chunk_rows(x, vocab, chunk_size))
    with torch.autocast(x.device.type, enabled=False):
        for start in range(0, vocab, step):
            part = slice(start, start + step)
            kernel(x, weight[part], None if bias is None else bias[part], target, row_max, log_sum, grad_scale,
                   vocab=vocab, col_offset=start, **options._asdict(), dx=dx_acc,
                   dweight=None if dweight is None else dweight[part], dbias=None if dbias is None else dbias[part])
    return None if dx_acc is None else dx_acc.to(x.dtype), dweight, dbias


def _linear_cross_entropy_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int,
                              label_smoothing: float, z_loss: float, softcap: Optional[float], reduction: str,
                              chunk_size: Optional[int]) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, row_max, log_sum): the reduced loss, and per row the statistics of the
    logsumexp (``lse = row_max + log_sum``), fp32 (fp64 for fp64)."""
    options = _Options(ignore_index, label_smoothing, z_loss, softcap)
    loss, row_max, log_sum = _row_statistics(x, weight, bias, target, options, chunk_size)
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / (target != ignore_index).sum()  # all rows ignored: 0/0, nan as in PyTorch
    return loss, row_max, log_sum


linear_cross_entropy_fwd = torch.library.custom_op("gpukernels::linear_cross_entropy_fwd", _linear_cross_entropy_fwd,
                                                   mutates_args=())


@linear_cross_entropy_fwd.register_fake
def _(x, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap, reduction, chunk_size):
    acc = _acc_dtype(x.dtype)
    rows = x.shape[0]
    loss = x.new_empty((rows,) if reduction == "none" else (), dtype=acc)
    return loss, x.new_empty(rows, dtype=acc), x.new_empty(rows, dtype=acc)


def _linear_cross_entropy_bwd(grad_scale: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                              row_max: Tensor, log_sum: Tensor, ignore_index: int, label_smoothing: float,
                              z_loss: float, softcap: Optional[float], chunk_size: Optional[int], grad_x: bool,
                              grad_weight: bool, grad_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) of ``sum_i grad_scale_i * loss_i`` (``grad_scale`` 0-d or one per
    row), each empty when not asked for by ``grad_*``."""
    options = _Options(ignore_index, label_smoothing, z_loss, softcap)
    grads = (grad_x, grad_weight, grad_bias and bias is not None)
    dx, dweight, dbias = _gradients(x, weight, bias, target, row_max, log_sum, grad_scale.to(row_max.dtype),
                                    options, chunk_size, grads)
    return tuple(empty_grad(x) if g is None else g for g in (dx, dweight, dbias))


linear_cross_entropy_bwd = torch.library.custom_op("gpukernels::linear_cross_entropy_bwd", _linear_cross_entropy_bwd,
                                                   mutates_args=())


@linear_cross_entropy_bwd.register_fake
def _(grad_scale, x, weight, bias, target, row_max, log_sum, ignore_index, label_smoothing, z_loss, softcap,
      chunk_size, grad_x, grad_weight, grad_bias):
    return (torch.empty_like(x) if grad_x else empty_grad(x),
            torch.empty_like(weight) if grad_weight else empty_grad(x),
            torch.empty_like(bias) if grad_bias and bias is not None else empty_grad(x))


def _setup_context(ctx, inputs, output):
    x, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap, reduction, chunk_size = inputs
    _, row_max, log_sum = output
    ctx.mark_non_differentiable(row_max, log_sum)
    ctx.reduction = reduction
    ctx.options = (ignore_index, label_smoothing, z_loss, softcap, chunk_size)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, bias, target, row_max, log_sum)


def _backward(ctx, dloss, _drow_max, _dlog_sum):
    x, weight, bias, target, row_max, log_sum = ctx.saved_tensors
    wanted = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and ctx.has_bias)
    grad_scale = dloss
    if ctx.reduction == "mean":
        kept_rows = (target != ctx.options[0]).sum()
        grad_scale = torch.where(kept_rows > 0, dloss / kept_rows, 0)
    grads = _call_bwd(grad_scale.contiguous(), x, weight, bias, target, row_max, log_sum,
                      *ctx.options, *wanted)
    return (*(g if want else None for g, want in zip(grads, wanted)), *(None,) * 7)


_call_bwd = direct(linear_cross_entropy_bwd, _linear_cross_entropy_bwd)
_call_fwd = with_autograd(linear_cross_entropy_fwd, _linear_cross_entropy_fwd, _setup_context, _backward)


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
    ``target`` ``x.shape[:-1]`` class indices. The forward takes the rows ``chunk_size``
    at a time (default: as many as fit 64 MiB of fp32 logits on CPU, 1/8 of the free
    memory up to 512 MiB on CUDA) and saves two numbers per row; the backward
    recomputes the logits by slices of the vocabulary holding as many logits as a
    chunk, and writes each slice's weight gradient with one matmul over all rows.
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

    loss, row_max, log_sum = _call_fwd(
        reshaped(x, math.prod(x.shape[:-1]), weight.shape[1]).contiguous(), weight.contiguous(),
        None if bias is None else bias.contiguous(), reshaped(target, target.numel()).long(), ignore_index, label_smoothing, z_loss, softcap, reduction, chunk_size)
    batch_shape = x.shape[:-1]
    loss = reshaped(loss, *batch_shape) if reduction == "none" else loss
    if not (autocasting and x.dtype != torch.float64):
        loss = loss.to(x.dtype)
    return (loss, (row_max + log_sum).view(batch_shape)) if return_lse else loss
