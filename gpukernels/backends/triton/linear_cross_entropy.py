"""The fused linear + cross-entropy's two passes (their loops are
``gpukernels.ops.linear_cross_entropy``'s).

Logits always come from a torch matmul (cuBLAS on CUDA) in the input dtype, so
they round exactly as ``F.linear``'s do.

- ``linear_cross_entropy_rows`` (forward, a chunk of rows): the logits, then the
  row kernel of ``cross_entropy.py`` for each row's loss and the statistics of
  its logsumexp, ``m`` and ``log s``.
- ``linear_cross_entropy_slice`` (backward, a slice of the vocabulary over all
  rows): the logits again, ``cross_entropy.py``'s ``logits_grad_kernel`` writing their gradient over
  them from the saved statistics, then ``dweight[slice] = g.T @ x`` and
  ``dbias[slice]`` in the input dtype and ``dx += g @ weight[slice]`` into an
  fp32 accumulator (fp64 for fp64). For bf16/fp16 that accumulation uses
  ``torch.addmm(..., out_dtype=torch.float32)`` in place where this build has
  it (CUDA builds that accept an fp32 addend); otherwise the slice's gradient
  and weight are widened to fp32 first, a copy bounded by the slice.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .cross_entropy import cross_entropy_rows, logits_grad

def _logits(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return x @ weight.T if bias is None else torch.addmm(bias, x, weight.T)


@functools.cache
def _has_mixed_addmm(device: torch.device) -> bool:
    """Whether ``acc += a @ b`` runs in place here with bf16 ``a``, ``b`` and an fp32 ``acc``."""
    if device.type != "cuda":
        return False
    acc = torch.ones(1, 1, device=device)
    one = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
    try:
        torch.addmm(acc, one, one, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return acc.item() == 2.0  # the product added to acc, not written over it


def _accumulate_product(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` with ``acc`` in fp32/fp64 and ``a``, ``b`` in the input dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif _has_mixed_addmm(acc.device):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def linear_cross_entropy_rows(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, *,
                              ignore_index: int, label_smoothing: float, z_loss: float, softcap: Optional[float],
                              loss: Tensor, row_max: Tensor, log_sum: Tensor) -> None:
    """The NumPy kernel's contract."""
    cross_entropy_rows(_logits(x, weight, bias), target, None, ignore_index, label_smoothing, loss, row_max, log_sum,
                       softcap=softcap, z_loss=z_loss)


def linear_cross_entropy_slice(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, row_max: Tensor,
                               log_sum: Tensor, grad_scale: Tensor, *, vocab: int, col_offset: int,
                               ignore_index: int, label_smoothing: float, z_loss: float, softcap: Optional[float],
                               dx: Optional[Tensor], dweight: Optional[Tensor], dbias: Optional[Tensor]) -> None:
    """The NumPy kernel's contract."""
    grad = _logits(x, weight, bias)
    logits_grad(grad, target, None, row_max, log_sum, grad_scale, grad, classes=vocab, col_offset=col_offset,
                ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap, z_loss=z_loss)
    if dweight is not None:
        torch.mm(grad.T, x, out=dweight)
    if dbias is not None:
        dbias.copy_(grad.sum(dim=0, dtype=row_max.dtype))
    if dx is not None:
        _accumulate_product(dx, grad, weight)
