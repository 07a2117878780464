"""Host time per call, on tensors so small that the GPU's time does not count:
every op's forward and backward, ours against PyTorch's eager equivalent (the
cases of ``bench/host_time.py``: standalone, per op in a chain, the norms on
model-shaped input; AdamW's step), then the pieces an op's call is made of (a
torch allocation, an aten kernel, Triton launches, our layer_norm at each
layer of its call, and PyTorch's).

    python -m bench.host_overhead      (needs a CUDA GPU)

A call that spends more host time than its kernels take on the GPU is
launch-bound; this says how much and where that host time goes.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
import triton

import gpukernels as gk

# Private on purpose: the kernel lookup and the dispatch decision are the steps an op's call
# (`op.on`) is made of, timed here one by one; the launch is timed on the Triton kernel itself.
from gpukernels._backend import kernel_for
from gpukernels.backends.triton import _norm as triton_norm
from gpukernels.backends.triton._common import float_bits
from gpukernels.ops._op import needs_dispatch
from gpukernels.ops.layer_norm import layer_norm_bwd, layer_norm_fwd


@triton.jit
def _empty_kernel(X):
    pass


class _InBackward(torch.autograd.Function):
    """Runs ``piece`` in its backward: what that piece costs on autograd's device thread."""

    piece = staticmethod(lambda: None)

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, dy):
        _InBackward.piece()
        return dy


def in_backward(x, dy, piece):
    def run():
        _InBackward.piece = piece
        x.grad = None
        _InBackward.apply(x).backward(dy)

    return run


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def host_us(fn, calls: int = 2000) -> float:
    """Microseconds of host time a call: issuing ``calls`` calls, after a warm-up (the
    GPU keeps up with tiny tensors, so the host is what the loop waits on)."""
    for _ in range(min(calls, 50)):
        fn()
    _synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    _synchronize()
    return elapsed / calls * 1e6


def per_op_us(device: torch.device, calls: int = 2000) -> list[dict]:
    """Each op's case of ``bench/host_time.py``, its tensors on ``device``: µs per call,
    ours and PyTorch's (a chain's per op)."""
    from bench.host_time import CASES, CHAIN, MODE_LABELS

    rows = []
    for op, make in CASES.items():
        with device:  # the cases' tensors, made on the default device, on this one
            cases = make()
        for mode, (ours, pytorch) in cases.items():
            per = CHAIN if mode == "chain" else 1
            ours_us, pytorch_us = host_us(ours, calls) / per, host_us(pytorch, calls) / per
            rows.append({"op": op, "what": MODE_LABELS[mode], "ours": ours_us, "pytorch": pytorch_us})
    return rows


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench.host_overhead needs a CUDA GPU")
    device = torch.device("cuda")
    print("| op | what | ours (us) | eager PyTorch (us) | ours / eager |\n|---|---|---:|---:|---:|")
    for r in per_op_us(device):
        print(f"| {r['op']} | {r['what']} | {r['ours']:.1f} | {r['pytorch']:.1f} | {r['ours'] / r['pytorch']:.2f}x |")
    print()
    x = torch.randn(8, 64, device=device, requires_grad=True)
    w = torch.randn(64, device=device, requires_grad=True)
    b = torch.randn(64, device=device, requires_grad=True)
    dy = torch.randn(8, 64, device=device)
    xd, wd, bd = x.detach(), w.detach(), b.detach()
    stats = torch.empty(2, 8, device=device)  # each row's mean, then each row's rstd

    def fwd_bwd(fn):
        def run():
            x.grad = w.grad = b.grad = None
            fn(x, (64,), w, b).backward(dy)

        return run

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn(x, (64,), w, b)

        return run

    pieces = {
        "torch.empty": lambda: torch.empty(8, 64, device=device),
        "aten add (x + 1)": lambda: xd + 1,
        "triton launch, 1 argument": lambda: _empty_kernel[(1,)](xd),
        "triton launch, norm_fwd_kernel": lambda: triton_norm.norm_fwd_kernel[(8,)](
            xd,
            None,  # no residual
            wd,
            bd,
            xd,
            None,
            stats,
            8,
            64,
            *float_bits(1e-5),
            None,  # no offset
            None,
            CENTERED=True,
            CAST_BEFORE_W=False,
            BLOCK_D=64,
            ONE_BLOCK=True,
            ROWS=1,
            num_warps=1,
        ),
        "kernel_for": lambda: kernel_for("triton", "layer_norm", "layer_norm_fwd", device),
        "needs_dispatch": lambda: needs_dispatch((xd, wd, bd, 1e-5, None)),
        "op layer_norm_fwd (allocations + launch)": lambda: layer_norm_fwd.on("triton", xd, wd, bd, 1e-5, None),
        "op layer_norm_bwd (allocations + launches)": lambda: layer_norm_bwd.on("triton", dy, xd, wd, stats, True),
        "x.clone() forward + backward (C++ backward)": fwd_bwd(lambda x, shape, w, b: x.clone()),
        "gk.layer_norm forward, no grad": no_grad(gk.layer_norm),
        "gk.layer_norm forward, with grad": lambda: gk.layer_norm(x, (64,), w, b),
        "F.layer_norm forward, no grad": no_grad(F.layer_norm),
        "gk.layer_norm forward + backward": fwd_bwd(gk.layer_norm),
        "F.layer_norm forward + backward": fwd_bwd(F.layer_norm),
    }
    for name in ("torch.empty", "triton launch, 1 argument", "op layer_norm_bwd (allocations + launches)"):
        pieces[f"in a backward: {name}"] = in_backward(x, dy, pieces[name])
    pieces["in a backward: nothing"] = in_backward(x, dy, lambda: None)
    pieces["in a backward: get_device_properties"] = in_backward(
        x, dy, lambda: torch.cuda.get_device_properties(device).multi_processor_count
    )
    pieces["in a backward: 10 x torch.empty"] = in_backward(
        x, dy, lambda: [torch.empty(8, 64, device=device) for _ in range(10)]
    )
    width = max(map(len, pieces))
    for name, fn in pieces.items():
        print(f"{name.ljust(width)}  {host_us(fn):8.1f} us")


if __name__ == "__main__":
    main()
