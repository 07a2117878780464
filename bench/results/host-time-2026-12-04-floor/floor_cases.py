"""Where layer_norm's host instructions go, against the least a Python autograd.Function costs.

    python -m bench.host_time --ops layer_norm --setup bench/results/host-time-2026-12-04-floor/floor_cases.py

Replaces bench.host_time's layer_norm cases (the counting process runs bench/host_time.py as
``__main__``); every row's PyTorch column is F.layer_norm's forward and backward.
"""

import __main__

import torch
import torch.nn.functional as F

import gpukernels as gk
from gpukernels.ops._op import eager_apply


class BareLayerNorm(torch.autograd.Function):
    """What any Python autograd.Function with layer_norm's outputs pays: the forward's two
    allocations (y, stats) and the backward's three (dx, dweight, dbias); no checks, no
    backend lookup, no launch."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, stats = torch.empty_like(x), x.new_empty((2, x.shape[0]), dtype=torch.float32)
        ctx.save_for_backward(x, weight, stats)
        return y, stats

    @staticmethod
    def backward(ctx, dy, _dstats):
        x, weight, _ = ctx.saved_tensors
        d = x.shape[-1]
        return torch.empty_like(x), weight.new_empty(d), weight.new_empty(d), None


def cases():
    x, w, b = (torch.randn(*shape, requires_grad=True) for shape in ((8, 64), (64,), (64,)))
    bare = eager_apply(BareLayerNorm)  # its C apply, as our ops' eager path calls theirs

    def pytorch():
        F.layer_norm(x, (64,), w, b).sum().backward()

    return {
        "gk.layer_norm": (lambda: gk.layer_norm(x, (64,), w, b).sum().backward(), pytorch),
        "bare autograd.Function, same 5 allocations": (lambda: bare(x, w, b, 1e-5)[0].sum().backward(), pytorch),
        "x.sum().backward() alone (in every row)": (lambda: x.sum().backward(), pytorch),
    }


__main__.CASES["layer_norm"] = cases
