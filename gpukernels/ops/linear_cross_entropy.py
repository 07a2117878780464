"""linear_cross_entropy: the ops ``gpukernels::linear_cross_entropy_fwd/_bwd`` and
``gpukernels::linear_cross_entropy_grads_fwd`` (output specs and kernel contracts),
their autograd, the sizes of their chunks, and the checked public function.

``cross_entropy(softcap(x @ weight.T + bias), target)`` (plus ``z_loss * lse**2``
per row) without ever holding the (rows, vocab) logits, by chunks of rows: each
chunk's logits, then each row's loss and the statistics of its logsumexp (row
max and log-sum, fp32; fp64 for fp64), saved as (rows,) vectors beside the
inputs; the kernels reduce the rows' losses themselves. The gradients come one
of two ways:

- in the forward (``_grads_fwd``: a training step in eager or under
  torch.compile, reduction to one loss): while a chunk's logits are held, their
  gradient for an upstream gradient of 1 (for ``mean`` over the rows kept,
  counted first) is written over them and turned into ``dx[chunk]`` and the
  chunk's shares of ``dweight`` and ``dbias`` (in the parameters' dtype). The
  backward scales them by the upstream gradient (in place in eager; into new
  tensors in a compiled graph) and hands them over. Three matmuls over the logits, as the
  unfused op; held: a chunk of logits and the gradients themselves.
- in two passes (``_fwd`` then ``_bwd``: ``reduction="none"``, whose upstream
  gradient is one a row; traces other than torch.compile's (AOTAutograd alone,
  functorch, dispatch modes); a second backward through the graph, which finds
  the forward's gradients handed over): the backward goes by slices
  of the vocabulary, the slice's logits for all rows again, their gradient from
  the saved statistics written over them, then ``dweight[slice] = g.T @ x`` and
  ``dbias[slice]`` in the input dtype (one matmul over all rows) and ``dx += g @
  weight[slice]`` into an fp32 accumulator: one matmul more than the unfused op
  (the logits twice), the trade flash attention makes, and no (vocab, hidden)
  fp32 accumulator.

Under torch.compile the three ops stay opaque nodes (``traced=False``): Inductor,
tracing them, would lower their matmuls itself, the fp32 accumulation of bf16
products to a cuBLAS kernel several times slower than eager's ``addmm`` into fp32
and an unaligned vocabulary's matmuls with padding copies (measured on an H200,
torch 2.11: 10 to 27 ms more per training step of a 150M model); opaque, they run
the same kernels as in eager, for the host cost of one op call per step.

Double backward is not supported.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..errors import ArgumentError, ArgumentTypeError
from ._checks import (
    autocast_enabled,
    cast_as_autocast,
    check_choice,
    check_device,
    check_float,
    check_ignore_index,
    check_int,
    check_number,
    check_optional_float,
    contiguous_param,
    empty_grad,
)
from ._op import dense, kernel_op, needs_dispatch, reshaped, row_stats, stats_dtype
from .cross_entropy import REDUCTIONS, TARGET_DTYPES

# Logits held per chunk: a fixed budget on CPU; on CUDA a share of the free
# memory, at most the cap: the larger of CUDA_MAX_CHUNK_BYTES (beyond ~2k rows a
# chunk's matmuls are as efficient as one over all rows) and half of dweight's
# size. With the gradients in the forward each chunk reads and writes dweight
# once, so fewer chunks move less; a step holds dweight anyway, and chunks of
# half its size number 2 * rows / hidden whatever the vocabulary (8192 rows,
# hidden 4096, bf16: 4 chunks of 2048 rows, 512 MiB of logits at 128k, 1 GiB at
# 256k).
CPU_CHUNK_BYTES = 64 << 20
CUDA_CHUNK_SHARE = 8
CUDA_MAX_CHUNK_BYTES = 512 << 20


def chunk_budget(device: torch.device, weight_bytes: int = 0) -> int:
    """Bytes of logits one chunk may hold on ``device``, for a head weight of
    ``weight_bytes``."""
    if device.type != "cuda":
        return CPU_CHUNK_BYTES
    cap = max(CUDA_MAX_CHUNK_BYTES, weight_bytes // 2)
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        # the free memory now says nothing of it at a replay (a compiled graph may be
        # replayed from a CUDA graph too, and Dynamo cannot trace the driver's answer), and
        # the graph's private pool keeps what the capture allocates: the cap
        return cap
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached, reusable
    return min(free // CUDA_CHUNK_SHARE, cap)


def logits_dtype(x: Tensor) -> torch.dtype:
    """The dtype a chunk's logits are held in: x's on CUDA (Triton's come from a torch
    matmul in x's dtype), the statistics dtype elsewhere (NumPy computes them in it)."""
    return x.dtype if x.device.type == "cuda" else stats_dtype(x.dtype)


def default_chunk_rows(rows: int, vocab: int, dtype: torch.dtype, budget: int) -> int:
    """Rows per chunk: as many rows of logits in ``dtype`` (``logits_dtype``) as fit
    ``budget``, at least 1, at most ``rows``."""
    row_bytes = vocab * dtype.itemsize
    return max(1, min(rows, budget // row_bytes))


def slice_columns(rows: int, vocab: int, chunk_rows: int) -> int:
    """Vocabulary columns per backward slice: as many logits as a chunk of
    ``chunk_rows`` rows holds, at least 1 column, at most ``vocab``."""
    return max(1, min(vocab, chunk_rows * vocab // max(rows, 1)))


@kernel_op("linear_cross_entropy", traced=False)
def linear_cross_entropy_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    reduction: str,
    chunk_rows: int,
    loss_dtype: torch.dtype,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Kernel: ``chunk_rows`` rows at a time, each row's loss of its logits
    ``c = softcap(x @ weight.T + bias)``: ``cross_entropy``'s with label smoothing, plus
    ``z_loss * lse**2``, 0 on ignored rows; reduced by ``reduction`` (``mean`` over the rows
    not ignored: nan when there are none) into ``loss``, in ``loss_dtype``; into ``stats``
    (``row_stats``; fp32, fp64 for fp64) each row's ``row_max``, each row's ``log_sum`` of
    ``c`` (``lse = row_max + log_sum``), then ``kept_rows``, the number of rows not ignored.
    A target outside ``[0, vocab)`` that is not ``ignore_index`` is an error (a device-side
    assert on CUDA)."""
    rows = x.shape[0]
    return (
        x.new_empty(size=(rows,) if reduction == "none" else (), dtype=loss_dtype),
        x.new_empty(2 * rows + 1, dtype=stats_dtype(x.dtype)),
    )


@kernel_op("linear_cross_entropy", traced=False)
def linear_cross_entropy_bwd(
    grad_loss: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    stats: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    reduction: str,
    slice_columns: int,
    grad_x: bool,
    grad_weight: bool,
    grad_bias: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Kernel: ``slice_columns`` vocabulary entries at a time, ``dx``, ``dweight``, ``dbias``
    (in the inputs' dtypes; each empty when not asked for by ``grad_*``) of
    ``sum_i s_i * loss_i``, with ``s_i`` the upstream ``grad_loss`` (0-d, or one per row for
    ``none``, any stride), divided by ``kept_rows`` for ``mean`` (0 when that is 0)."""
    return _grads_like(x, weight, bias, grad_x, grad_weight, grad_bias)


def _grads_like(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], grad_x: bool, grad_weight: bool, grad_bias: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``dx``, ``dweight``, ``dbias`` in the inputs' dtypes, each empty when not asked for."""
    return (
        torch.empty_like(x) if grad_x else empty_grad(x),
        torch.empty_like(weight) if grad_weight else empty_grad(x),
        torch.empty_like(bias) if grad_bias and bias is not None else empty_grad(x),
    )


@kernel_op("linear_cross_entropy", traced=False)
def linear_cross_entropy_grads_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    reduction: str,
    chunk_rows: int,
    slice_columns: int,
    loss_dtype: torch.dtype,
    grad_x: bool,
    grad_weight: bool,
    grad_bias: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Kernel: ``linear_cross_entropy_fwd``'s ``loss`` and ``stats`` (``reduction`` ``mean``
    or ``sum``), and ``dx``, ``dweight``, ``dbias`` as ``linear_cross_entropy_bwd`` gives
    them for an upstream gradient of 1: the loss's gradients, which the backward scales
    by the upstream gradient. ``chunk_rows`` and ``slice_columns`` are the sizes of the
    two passes; a backend computing the gradients in the forward's pass over the chunks
    (Triton) needs only the first."""
    options = (ignore_index, label_smoothing, z_loss, softcap, reduction, chunk_rows, loss_dtype, backend)
    loss, stats = linear_cross_entropy_fwd.spec(x, weight, bias, target, *options)
    return loss, stats, *_grads_like(x, weight, bias, grad_x, grad_weight, grad_bias)


def _save_inputs(ctx, x, weight, bias, target, stats, options: tuple, chunk_rows: int) -> None:
    """What the two-pass backward reads: the inputs, the forward's statistics, the options."""
    ctx.mark_non_differentiable(stats)
    ctx.options = (*options, slice_columns(x.shape[0], weight.shape[0], chunk_rows))
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, bias, target, stats)


def _setup_context(ctx, inputs, output):
    x, weight, bias, target, *options, chunk_rows, _ = inputs
    _save_inputs(ctx, x, weight, bias, target, output[1], tuple(options), chunk_rows)


def _wanted(ctx) -> tuple[bool, bool, bool]:
    return ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and ctx.has_bias


def _backward(ctx, grad_loss, *_grad_extra_outputs):
    wanted = _wanted(ctx)
    saved = dense(*ctx.saved_tensors) if ctx.relaid else ctx.saved_tensors
    grads = linear_cross_entropy_bwd.on(ctx.backend, grad_loss, *saved, *ctx.options, *wanted)
    return (*(g if want else None for g, want in zip(grads, wanted)), *(None,) * 8)


linear_cross_entropy_fwd.register_autograd(_setup_context, _backward)


def _grads_setup_context(ctx, inputs, output):
    x, weight, bias, target, *options, chunk_rows, _slice_columns, _loss_dtype, _, _, _ = inputs
    _, stats, *grads = output
    ctx.mark_non_differentiable(*grads)
    _save_inputs(ctx, x, weight, bias, target, stats, tuple(options), chunk_rows)
    # not saved tensors: the backward hands them over (and drops them) rather than reading them
    ctx.grads = grads


def _grads_backward(ctx, grad_loss, *_grad_extra_outputs):
    """The forward's gradients times the upstream gradient, scaled in place and handed
    over: a second backward through this node (``retain_graph``) finds them gone and runs
    the two-pass backward instead. The mean's division is the forward's, in fp32."""
    grads, ctx.grads = ctx.grads, None
    if grads is None:
        return (*_backward(ctx, grad_loss)[:3], *(None,) * 12)
    wanted = _wanted(ctx)
    asked = [g for g, want in zip(grads, wanted) if want]
    # in place on plain tensors (no second dweight-sized buffer); a trace (AOTAutograd,
    # functorch) cannot write into the forward's outputs
    scaled = iter((_scaled if needs_dispatch(asked) else _scale_)(asked, grad_loss))
    return (*(next(scaled) if want else None for want in wanted), *(None,) * 12)


# elements of a narrower gradient multiplied at a time in the wider dtype: a bounded
# temporary (64 MiB in fp32), not a widened copy of a dweight that may be gigabytes
_WIDENED_SLICE = 1 << 24


def _scale_(grads: list[Tensor], scale: Tensor) -> list[Tensor]:
    """Each of ``grads`` times ``scale`` (0-d) in place, computed in the wider of the
    dtypes: on CUDA ``mul_`` would cast an fp32 0-d ``scale`` to bf16 gradients' dtype
    first (a loss over 3 accumulation steps under autocast: every gradient 0.4% off), so
    a narrower gradient is multiplied in the wider dtype by slices and copied back.
    (GradScaler's unscale op, which does this in one launch, has no bf16 kernel on CUDA.)"""
    for g in grads:
        wide = torch.promote_types(g.dtype, scale.dtype)
        if wide == g.dtype:
            g.mul_(scale)
            continue
        for part in g.view(-1).split(_WIDENED_SLICE):
            part.copy_(part.to(wide).mul_(scale))
    return grads


def _scaled(grads: list[Tensor], scale: Tensor) -> list[Tensor]:
    """``_scale_``'s products as new tensors (a trace)."""
    return [(g.to(torch.promote_types(g.dtype, scale.dtype)) * scale).to(g.dtype) for g in grads]


linear_cross_entropy_grads_fwd.register_autograd(_grads_setup_context, _grads_backward)


def _check_target(target: Tensor, x: Tensor) -> None:
    if not isinstance(target, Tensor):
        raise ArgumentTypeError(f"target must be a torch.Tensor of class indices, got {type(target).__name__}")
    if target.dtype not in TARGET_DTYPES:
        raise ArgumentTypeError(f"target must hold class indices as int64 (or int32), got {target.dtype}")
    check_device("target", target, x)
    if tuple(target.shape) != tuple(x.shape[:-1]):
        raise ArgumentError(
            f"target must have shape {tuple(x.shape[:-1])} (x's leading dims) for x of shape "
            f"{tuple(x.shape)}, got {tuple(target.shape)}"
        )


def _check_tensors(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    check_float("x", x)
    check_float("weight", weight)
    check_device("weight", weight, x)
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ArgumentError(f"weight must be 2-D (vocab, hidden) with vocab >= 1, got shape {tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ArgumentError(
            f"x of shape {tuple(x.shape)} and weight of shape {tuple(weight.shape)} do not fit: "
            f"x's last dim must equal weight's hidden size {weight.shape[1]}"
        )
    check_optional_float("bias", bias, x, (weight.shape[0],))


def _check_dtypes(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise ArgumentTypeError(f"x and {name} must have the same dtype, got {x.dtype} and {t.dtype}")


def _check_options(ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size, return_lse):
    """The options as the kernels take them: ``(ignore_index, label_smoothing, z_loss, softcap, chunk_size)``."""
    ignore_index = check_ignore_index(ignore_index)
    check_choice("reduction", reduction, REDUCTIONS)
    label_smoothing = check_number("label_smoothing", label_smoothing, low=0.0, high=1.0)
    z_loss = check_number("z_loss", z_loss, low=0.0)
    softcap = None if softcap is None else check_number("softcap", softcap, low=0.0, low_open=True)
    if chunk_size is not None:
        chunk_size = check_int("chunk_size", chunk_size, low=1, what="None or an int", not_int=ArgumentError)
    if not isinstance(return_lse, bool):
        raise ArgumentTypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    return ignore_index, label_smoothing, z_loss, softcap, chunk_size


def _gradients_wanted(x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[bool, bool, bool]:
    """Which of dx, dweight, dbias a backward will want: none with grad mode off."""
    if not torch.is_grad_enabled():
        return False, False, False
    return x.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad


def linear_cross_entropy(
    x: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``F.cross_entropy(c, target, ignore_index=..., reduction=..., label_smoothing=...)``
    with ``c = softcap * tanh(z / softcap)`` (``c = z`` when ``softcap`` is None) and
    ``z = F.linear(x, weight, bias)``, plus ``z_loss * logsumexp(c)**2`` added to each
    row's loss that is not ignored (so the mean divides both by the rows not ignored),
    without ever holding the (rows, vocab) logits.

    ``x`` is ``(..., hidden)``, ``weight`` ``(vocab, hidden)`` as in ``nn.Linear``,
    ``target`` ``x.shape[:-1]`` class indices. The forward takes the rows ``chunk_size``
    at a time (default: as many as fit 64 MiB of fp32 logits on CPU; on CUDA, of logits
    in x's dtype, 1/8 of the free memory up to 512 MiB or half of weight's size, the
    larger) and saves two numbers per row. With grad mode on, an
    input that requires grad and ``reduction`` ``mean`` or ``sum`` (eager,
    or under torch.compile), it also computes the gradients while each chunk's logits
    are held, and the backward scales them; else (and under other traces) the backward
    recomputes the logits by slices of the vocabulary holding as many logits as
    a chunk (see the module doc). A loss
    that will not be differentiated is best computed under ``torch.no_grad()``.
    All rows ignored gives a nan mean and zero gradients, as PyTorch does.

    The loss has x's dtype (fp32 under autocast, whose dtype x, weight and bias are cast
    to as F.linear would). ``return_lse=True`` also returns the per-row logsumexp of
    ``c``, shape ``x.shape[:-1]``, fp32 (fp64 for fp64), not differentiable."""
    _check_tensors(x, weight, bias)
    _check_target(target, x)
    ignore_index, label_smoothing, z_loss, softcap, chunk_size = _check_options(
        ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size, return_lse
    )
    autocasting = autocast_enabled(x)
    if autocasting:
        x, weight, bias = cast_as_autocast(x, weight, bias)
    _check_dtypes(x, weight, bias)

    rows, vocab = math.prod(x.shape[:-1]), weight.shape[0]
    chunk_rows = chunk_size
    if chunk_rows is None:
        budget = chunk_budget(x.device, weight.numel() * weight.element_size())
        chunk_rows = default_chunk_rows(rows, vocab, logits_dtype(x), budget)
    loss_dtype = stats_dtype(x.dtype) if autocasting else x.dtype
    inputs = (
        reshaped(x, rows, weight.shape[1]).contiguous(),
        weight.contiguous(),
        contiguous_param(bias),
        reshaped(target, rows).contiguous(),  # the kernels read the indices one after another
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        reduction,
        chunk_rows,
    )
    wanted = _gradients_wanted(x, weight, bias)
    # eager and torch.compile (where the op is one opaque node, its backward scaling the
    # gradients into new tensors); other traces (AOTAutograd alone, functorch, dispatch
    # modes) take the two passes, whose backward they can hold as a graph of its own
    if reduction != "none" and any(wanted) and (torch.compiler.is_compiling() or not needs_dispatch(inputs[:3])):
        columns = slice_columns(rows, vocab, chunk_rows)
        loss, stats, *_ = linear_cross_entropy_grads_fwd(*inputs, columns, loss_dtype, *wanted)
    else:
        loss, stats = linear_cross_entropy_fwd(*inputs, loss_dtype)
    batch_shape = x.shape[:-1]
    loss = reshaped(loss, *batch_shape) if reduction == "none" else loss
    if not return_lse:
        return loss
    row_max, log_sum, _ = row_stats(stats, rows)
    return loss, (row_max + log_sum).view(size=batch_shape)
