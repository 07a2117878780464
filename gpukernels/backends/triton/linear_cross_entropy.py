"""The fused linear + cross-entropy's two passes.

Logits always come from a torch matmul (cuBLAS on CUDA) in the input dtype, so
they round exactly as ``F.linear``'s do.

- forward, by chunks of rows: each chunk's logits, then the row kernel of
  ``cross_entropy.py`` for each row's loss and the statistics of its logsumexp,
  ``m`` and ``log s``; the program to finish last, of all the chunks, reduces the
  rows' losses and checks every target. With the gradients in the forward
  (``linear_cross_entropy_grads_fwd``), ``cross_entropy_bwd_kernel`` then writes
  the chunk's logits' gradient over them (for an upstream gradient of 1), and
  three matmuls make ``dx[chunk]`` and add the chunk's shares of ``dweight`` and
  ``dbias``.
- backward, by slices of the vocabulary over all rows: the logits again,
  ``cross_entropy.py``'s ``cross_entropy_bwd_kernel`` writing their gradient over them
  from the saved statistics, then ``dweight[slice] = g.T @ x`` and
  ``dbias[slice]`` in the input dtype and ``dx += g @ weight[slice]`` into an
  fp32 accumulator (fp64 for fp64; ``dx`` itself for fp32 and fp64, which the
  first slice writes rather than adds to, so nothing is zeroed). For bf16/fp16
  that accumulation uses ``torch.addmm(..., out_dtype=torch.float32)`` in place
  where this build has it (CUDA builds that accept an fp32 addend); otherwise the
  slice's gradient and weight are widened to fp32 first, a copy bounded by the
  slice.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _disable_current_modes

from .cross_entropy import check_targets, cross_entropy_rows, finish_without_rows, forward_setup, logits_grad

# Chunks of logits have rows padded to a multiple of this many elements. cuBLAS runs its
# fast kernels on matrices whose rows start 16-byte aligned: with an odd vocabulary
# (GPT-2's 50257) a chunk of logits holding its rows back to back gets its sm75 "align1"
# kernels for all three matmuls over it (an H200, GPT-2 124M's step: 2.5 to 3.9 ms a call
# for 0.41 TFLOP, 63.5 ms of the 129 ms step). And the cross-entropy kernels, told that
# they may read (and write) the padding (``padded=True``), load a row in whole 16-byte
# vectors, and the forward through Triton's pipeline, only where its padded length is
# one Triton knows to be a multiple of 16 (the one divisibility it specializes on).
_ROW_MULTIPLE = 16


def _logits_buffer(rows: int, columns: int, like: Tensor) -> Tensor:
    """An empty (rows, columns) matrix in ``like``'s dtype whose rows are padded to a
    multiple of ``_ROW_MULTIPLE`` elements (a view of a wider one when ``columns`` needs it)."""
    padded = -(-columns // _ROW_MULTIPLE) * _ROW_MULTIPLE
    buffer = like.new_empty(rows, padded)
    return buffer if padded == columns else buffer[:, :columns]


def _logits(x: Tensor, weight: Tensor, bias: Optional[Tensor], buffer: Tensor) -> Tensor:
    """``x @ weight.T + bias`` into the first ``len(x)`` rows of ``buffer``."""
    out = buffer[: x.shape[0], : weight.shape[0]]
    return torch.mm(x, weight.T, out=out) if bias is None else torch.addmm(bias, x, weight.T, out=out)


@functools.cache
def _has_mixed_addmm(device: torch.device) -> bool:
    """Whether ``acc += a @ b`` runs in place here with bf16 ``a``, ``b`` and an fp32 ``acc``."""
    if device.type != "cuda":
        return False
    with _disable_current_modes():  # a probe of real tensors, also when the op runs inside a dispatch mode
        acc = torch.ones(1, 1, device=device)
        one = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
        try:
            torch.addmm(acc, one, one, out_dtype=torch.float32, out=acc)
        except (RuntimeError, TypeError, NotImplementedError):
            return False
        return acc.item() == 2.0  # the product added to acc, not written over it


def _accumulate_product(acc: Tensor, a: Tensor, b: Tensor, first: bool) -> None:
    """``acc += a @ b`` (``acc = a @ b`` when ``first``) with ``acc`` in fp32/fp64 and ``a``,
    ``b`` in the input dtype."""
    beta = 0 if first else 1
    if a.dtype == acc.dtype:
        acc.addmm_(a, b, beta=beta)
    elif not _has_mixed_addmm(acc.device):
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype), beta=beta)
    else:
        torch.addmm(acc, a, b, beta=beta, out_dtype=acc.dtype, out=acc)


def linear_cross_entropy_fwd(
    x,
    weight,
    bias,
    target,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    reduction,
    chunk_rows,
    loss_dtype,
    loss,
    stats,
):
    rows, vocab = x.shape[0], weight.shape[0]
    last, reduced, row_loss = forward_setup(reduction, loss, stats, rows)
    if not rows:
        return finish_without_rows(last, reduced, stats, None, vocab)
    buffer = _logits_buffer(min(chunk_rows, rows), vocab, x)
    # autocast reaches into a custom op's body: it would change the logits' dtype
    with torch.autocast(x.device.type, enabled=False):
        for start in range(0, rows, chunk_rows):
            cross_entropy_rows(
                _logits(x[start : start + chunk_rows], weight, bias, buffer),
                target,
                None,
                ignore_index,
                label_smoothing,
                row_loss,
                stats,
                rows,
                row_offset=start,
                softcap=softcap,
                z_loss=z_loss,
                last=last,
                loss=reduced,
                padded=True,
            )
    check_targets(last, target, ignore_index, vocab)


def linear_cross_entropy_grads_fwd(
    x,
    weight,
    bias,
    target,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    reduction,
    chunk_rows,
    slice_columns,
    loss_dtype,
    grad_x,
    grad_weight,
    grad_bias,
    loss,
    stats,
    dx,
    dweight,
    dbias,
):
    """The forward's chunks, each also turned into its share of the loss's gradients while
    its logits are at hand: the logits' gradient written over them (for an upstream
    gradient of 1; over the rows kept for ``mean``, counted before the first chunk, so
    that the division is in fp32 inside the kernel), ``dx[chunk] = g @ weight``
    (complete: the chunk's rows are whole), ``dweight (+)= g.T @ x[chunk]`` and
    ``dbias (+)= sum(g)`` in the parameters' dtype, the first chunk writing rather than
    adding (nothing zeroed). Three matmuls over the logits in all, as the unfused op
    does, against four for the forward and backward apart. ``slice_columns`` is the
    backward's, unused here."""
    rows, vocab = x.shape[0], weight.shape[0]
    last, reduced, row_loss = forward_setup(reduction, loss, stats, rows)
    if not rows:
        dweight.zero_()  # empty when not asked for
        dbias.zero_()
        return finish_without_rows(last, reduced, stats, None, vocab)
    if reduction == "mean":  # 0 when every row is ignored (no gradient), as the two passes
        kept = (target != ignore_index).sum().to(stats.dtype)
        scale = torch.where(kept != 0, kept.reciprocal(), 0.0)
    else:
        scale = torch.ones(size=(), dtype=stats.dtype, device=x.device)
    options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap, z_loss=z_loss)
    buffer = _logits_buffer(min(chunk_rows, rows), vocab, x)
    with torch.autocast(x.device.type, enabled=False):
        for start in range(0, rows, chunk_rows):
            chunk = x[start : start + chunk_rows]
            grad = _logits(chunk, weight, bias, buffer)
            cross_entropy_rows(grad, target, None, row_loss=row_loss, stats=stats, total_rows=rows, row_offset=start,
                               last=last, loss=reduced, padded=True, **options)  # fmt: skip
            logits_grad(grad, target, None, stats, scale, grad, classes=vocab, col_offset=0, reduction="sum",
                        row_offset=start, total_rows=rows, padded=True, **options)  # fmt: skip
            first = start == 0
            if grad_x:
                torch.mm(grad, weight, out=dx[start : start + chunk_rows])
            if grad_weight:
                torch.addmm(dweight, grad.T, chunk, beta=0 if first else 1, out=dweight)
            if grad_bias:
                if first:
                    torch.sum(grad, dim=0, out=dbias)
                else:
                    dbias += grad.sum(dim=0)
    check_targets(last, target, ignore_index, vocab)


def linear_cross_entropy_bwd(
    grad_loss,
    x,
    weight,
    bias,
    target,
    stats,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    reduction,
    slice_columns,
    grad_x,
    grad_weight,
    grad_bias,
    dx,
    dweight,
    dbias,
):
    vocab = weight.shape[0]
    dx_acc = dx if not grad_x or dx.dtype == stats.dtype else x.new_empty(size=x.shape, dtype=stats.dtype)
    buffer = _logits_buffer(x.shape[0], min(slice_columns, vocab), x)
    with torch.autocast(x.device.type, enabled=False):
        for start in range(0, vocab, slice_columns):
            part = slice(start, start + slice_columns)
            grad = _logits(x, weight[part], None if bias is None else bias[part], buffer)
            logits_grad(
                grad,
                target,
                None,
                stats,
                grad_loss,
                grad,
                classes=vocab,
                col_offset=start,
                ignore_index=ignore_index,
                label_smoothing=label_smoothing,
                reduction=reduction,
                softcap=softcap,
                z_loss=z_loss,
                padded=True,
            )
            if grad_weight:
                torch.mm(grad.T, x, out=dweight[part])
            if grad_bias:
                torch.sum(grad, dim=0, out=dbias[part])
            if grad_x:
                _accumulate_product(dx_acc, grad, weight[part], first=start == 0)
    if grad_x and dx_acc is not dx:
        dx.copy_(dx_acc)
