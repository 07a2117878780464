"""One chunk of rows of the fused linear + cross-entropy (the chunk loop is
``gpukernels.ops.linear_cross_entropy``'s): logits by a NumPy matmul in fp32
(fp64 for fp64), the row kernel of ``cross_entropy.py`` writing the logits'
gradient over them, then the contractions into dx, dweight and dbias."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ._arrays import as_array, as_tensor
from .cross_entropy import rows_loss_and_grad


def linear_cross_entropy_chunk(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                               grad_scale: Tensor, *, ignore_index: int, label_smoothing: float, z_loss: float,
                               softcap: Optional[float], loss: Tensor, lse: Tensor, dx: Optional[Tensor],
                               dweight: Optional[Tensor], dbias: Optional[Tensor]) -> None:
    """Writes the chunk's per-row ``loss`` and ``lse``; where given, writes ``dx`` and adds
    into the accumulators ``dweight`` and ``dbias`` (fp32, fp64 for fp64) the gradients
    scaled by ``grad_scale`` (0-d, or one per row). bf16/fp16 weights are widened per
    chunk: a (vocab, hidden) copy, the price of a reference path."""
    x_chunk, w = as_array(x), as_array(weight, x.dtype)
    logits = x_chunk @ w.T
    if bias is not None:
        logits += as_array(bias, x.dtype)
    compute_grad = dx is not None or dweight is not None or dbias is not None
    row_loss, row_lse, grad = rows_loss_and_grad(logits, target.numpy(), None, ignore_index, label_smoothing,
                                                 compute_grad, softcap, z_loss, overwrite=True)
    loss.numpy()[:] = row_loss
    lse.numpy()[:] = row_lse
    if not compute_grad:
        return
    scale = as_array(grad_scale)
    grad *= scale[:, None] if scale.ndim else scale
    if dx is not None:
        dx.copy_(as_tensor(grad @ w, dx.dtype))
    if dweight is not None:
        dweight.numpy()[:] += grad.T @ x_chunk
    if dbias is not None:
        dbias.numpy()[:] += grad.sum(axis=0)
