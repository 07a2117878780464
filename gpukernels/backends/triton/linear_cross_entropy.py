"""One chunk of rows of the fused linear + cross-entropy (the chunk loop is
``gpukernels.ops.linear_cross_entropy``'s).

The logits ``x @ weight.T + bias`` come from a torch matmul (cuBLAS on CUDA)
in the input dtype, so they round exactly as ``F.linear``'s do. The row kernel
of ``cross_entropy.py`` then writes the logits' gradient over that same buffer,
and two more matmuls contract it: ``dx = g @ weight`` (input dtype, as
PyTorch's backward gives it) and ``dweight += g.T @ x`` into an fp32
accumulator (fp64 for fp64). For bf16/fp16 that accumulation uses
``torch.addmm(..., out_dtype=torch.float32)`` in place where this build has it
(CUDA builds that accept an fp32 addend); otherwise the chunk's gradient and
rows are widened to fp32 first, a copy bounded by the chunk.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .cross_entropy import cross_entropy_rows


@functools.cache
def _has_mixed_addmm(device: torch.device) -> bool:
    """Whether ``acc += a @ b`` runs in place here with bf16 ``a``, ``b`` and an fp32 ``acc``."""
    if device.type != "cuda":
        return False
    acc = torch.zeros(1, 1, device=device)
    one = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
    try:
        torch.addmm(acc, one, one, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return acc.item() == 1.0


def _accumulate_product(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` with ``acc`` in fp32/fp64 and ``a``, ``b`` in the input dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif _has_mixed_addmm(acc.device):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def linear_cross_entropy_chunk(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                               grad_scale: Tensor, *, ignore_index: int, label_smoothing: float, z_loss: float,
                               softcap: Optional[float], loss: Tensor, lse: Tensor, dx: Optional[Tensor],
                               dweight: Optional[Tensor], dbias: Optional[Tensor]) -> None:
    """The NumPy kernel's contract."""
    logits = x @ weight.T if bias is None else torch.addmm(bias, x, weight.T)
    compute_grad = dx is not None or dweight is not None or dbias is not None
    grad = logits if compute_grad else None
    cross_entropy_rows(logits, target, None, ignore_index, label_smoothing, loss, grad, grad_scale,
                       lse=lse, softcap=softcap, z_loss=z_loss)
    if dx is not None:
        torch.mm(grad, weight, out=dx)
    if dweight is not None:
        _accumulate_product(dweight, grad.T, x)
    if dbias is not None:
        dbias += grad.sum(dim=0, dtype=dbias.dtype)
