"""LayerNorm over the rows of a contiguous tensor, read as a (rows, D) matrix (layer_norm.cu):
one block per row; the backward's dweight/dbias as per-block partial sums
added up afterwards by torch. The kernels read and write x's dtype: with ``y`` in
another (``out_dtype``), they run on x in fp32 (exact), their fp32 results then
rounded once into ``y`` and ``dx``."""

from __future__ import annotations

import numpy as np
import torch

from ..._numerics import row_count
from . import _runtime
from ._runtime import MAX_BLOCKS, acc_dtype, acc_scalar, kernel_name, persistent_blocks, pointer, row_threads


def _in_acc(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A weight or bias as the kernels read it: contiguous, in the accumulation
    dtype of ``dtype`` (whatever its own floating dtype)."""
    return None if t is None else t.to(acc_dtype(dtype)).contiguous()


def layer_norm_fwd(x, weight, bias, eps, out_dtype, y, stats):
    rows, d = row_count(x), x.shape[-1]
    if rows and y.dtype != x.dtype:
        y32 = torch.empty_like(x, dtype=torch.float32)
        layer_norm_fwd(x.float(), weight, bias, eps, None, y32, stats)
        y.copy_(y32)
    elif rows:
        weight, bias = _in_acc(weight, x.dtype), _in_acc(bias, x.dtype)
        _runtime.launch(
            "layer_norm.cu",
            kernel_name("layer_norm_fwd", x.dtype),
            x.device,
            min(rows, MAX_BLOCKS),
            row_threads(d),
            (
                pointer(x),
                pointer(weight),
                pointer(bias),
                pointer(y),
                pointer(stats[0]),  # each row's mean
                pointer(stats[1]),  # each row's rstd
                np.int64(rows),
                np.int64(d),
                acc_scalar(eps, x.dtype),
            ),
        )


def layer_norm_bwd(dy, x, weight, stats, has_bias, dx, dweight, dbias):
    if dy.dtype != x.dtype:
        dx32 = torch.empty_like(x, dtype=torch.float32)
        layer_norm_bwd(dy.float(), x.float(), weight, stats, has_bias, dx32, dweight, dbias)
        dx.copy_(dx32)
        return
    rows, d = row_count(x), x.shape[-1]
    blocks = persistent_blocks(x.device, rows)
    acc = acc_dtype(x.dtype)
    # Zeroed: blocks add their rows into them, and blocks with no rows leave zeros.
    dweight_partial = torch.zeros((blocks, d), dtype=acc, device=x.device) if weight is not None else None
    dbias_partial = torch.zeros((blocks, d), dtype=acc, device=x.device) if has_bias else None
    if rows:
        weight_acc = _in_acc(weight, x.dtype)  # held until the launch: the kernel reads its address
        _runtime.launch(
            "layer_norm.cu",
            kernel_name("layer_norm_bwd", x.dtype),
            x.device,
            blocks,
            row_threads(d),
            (
                pointer(dy),
                pointer(x),
                pointer(weight_acc),
                pointer(stats[0]),
                pointer(stats[1]),
                pointer(dx),
                pointer(dweight_partial),
                pointer(dbias_partial),
                np.int64(rows),
                np.int64(d),
            ),
        )
    if weight is not None:
        dweight.copy_(dweight_partial.sum(0))
    if has_bias:
        dbias.copy_(dbias_partial.sum(0))
