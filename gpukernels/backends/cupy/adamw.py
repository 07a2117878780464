"""AdamW over a list of tensors, updated in place by one launch (adamw.cu)
per parameter dtype: each block updates one chunk of one tensor, found in a
table of device pointers. The step counters are incremented first by one
``torch._foreach_add_``, then read by the kernel, like the lr, from device
memory: nothing is synchronised, and a tensor lr changed in place is seen.
So is the optional grad scale, which multiplies each gradient as it is read,
and the optional ``found_inf``: nonzero, the steps are incremented by 0 and
every block returns before it writes.
"""

from __future__ import annotations

import numpy as np
import torch

from .._layout import copy_back, in_param_layout
from . import _runtime
from ._runtime import kernel_name, pointer

THREADS = 256
CHUNK = 8192  # elements per block


def _table(columns: list[list[torch.Tensor | None]], device: torch.device) -> tuple[torch.Tensor, int]:
    """The int64 table adamw.cu reads (its layout is spelled out there) from
    the per-tensor columns params, grads, exp_avgs, exp_avg_sqs,
    max_exp_avg_sqs, steps; and the number of blocks."""
    params = columns[0]
    numels = torch.tensor([p.numel() for p in params], dtype=torch.int64)
    blocks_per_tensor = (numels + CHUNK - 1) // CHUNK
    first_blocks = torch.cumsum(blocks_per_tensor, 0) - blocks_per_tensor
    block_tensor = torch.repeat_interleave(torch.arange(len(params)), blocks_per_tensor)
    pointers = torch.tensor(
        [[t.data_ptr() if t is not None else 0 for t in column] for column in columns], dtype=torch.int64
    )
    table = torch.cat((pointers.reshape(-1), numels, first_blocks, block_tensor))
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)  # ordered on the stream, no host wait
    return table, len(block_tensor)


def adamw_step_(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    steps,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    amsgrad,
    maximize,
    grad_scale=None,
    found_inf=None,
):
    torch._foreach_add_(steps, 1.0 if found_inf is None else (found_inf == 0).float())
    columns = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    for dtype in dict.fromkeys(p.dtype for p in params):
        chosen = [i for i, p in enumerate(params) if p.dtype == dtype]
        tensors = [[column[i] for i in chosen] for column in columns]
        # the kernel walks each tensor as a flat array: state laid out otherwise than its param is staged
        staged = in_param_layout(tensors)
        max_sqs = staged[4] if amsgrad else [None] * len(chosen)
        table, blocks = _table([*staged[:4], max_sqs, [steps[i] for i in chosen]], params[0].device)
        if blocks:
            _runtime.launch(
                "adamw.cu",
                kernel_name("adamw", dtype),
                params[0].device,
                blocks,
                THREADS,
                (
                    pointer(table),
                    np.int64(len(chosen)),
                    np.int64(CHUNK),
                    pointer(lr),
                    np.float64(beta1),
                    np.float64(beta2),
                    np.float64(eps),
                    np.float64(weight_decay),
                    np.int32(amsgrad),
                    np.int32(maximize),
                    pointer(grad_scale),
                    pointer(found_inf),
                ),
                options=("--fmad=false",),
            )
        copy_back(tensors, staged, read_only=1)
