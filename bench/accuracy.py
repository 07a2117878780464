"""Largest error of every op against PyTorch, per dtype, forward and backward.

    python -m bench.accuracy [--device cpu|cuda] [--backend numpy|triton|cupy]

fp64/fp32: the largest absolute difference from PyTorch's result in the same
dtype. bf16/fp16: the relative norm error against a float64 computation, with
PyTorch's own low-precision error beside it. Backward errors are over every
input gradient of the op.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import gpukernels as gk

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _cases(device):
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device)

    x, w, b = randn(64, 1000), randn(1000), randn(1000)
    yield "layer_norm", (x, w, b), lambda f, x, w, b: f.layer_norm(x, (1000,), w, b)
    xi, wi, bi = randn(64, 256), randn(384, 256) / 16, randn(384)
    for act in ("relu", "gelu", "gelu_tanh", "silu", "quick_gelu", "relu_squared"):
        torch_act = {
            "relu": F.relu,
            "gelu": F.gelu,
            "silu": F.silu,
            "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
            "quick_gelu": lambda z: z * torch.sigmoid(1.702 * z),
            "relu_squared": lambda z: F.relu(z).square(),
        }[act]
        yield (
            f"linear_act[{act}]",
            (xi, wi, bi),
            (
                lambda f, x, w, b, act=act, torch_act=torch_act: (
                    gk.linear_act(x, w, b, act) if f is gk else torch_act(F.linear(x, w, b))
                )
            ),
        )
    logits, target = randn(64, 4097) * 3, torch.randint(0, 4097, (64,), generator=g).to(device)
    yield "cross_entropy", (logits,), lambda f, z: f.cross_entropy(z, target, label_smoothing=0.1)
    xb, wb, bb = randn(16, 32, 7, 9), randn(32), randn(32)

    def bn(f, x, w, b, relu=False):
        rm, rv = torch.zeros(32, device=device, dtype=x.dtype), torch.ones(32, device=device, dtype=x.dtype)
        if x.dtype in (torch.bfloat16, torch.float16):
            rm, rv, w, b = rm.float(), rv.float(), w.float(), b.float()
        if f is gk:
            return gk.batch_norm(x, rm, rv, w, b, training=True, activation="relu" if relu else "none")
        y = F.batch_norm(x, rm, rv, w, b, training=True)
        return F.relu(y) if relu else y

    yield "batch_norm", (xb, wb, bb), bn
    yield "batch_norm[relu]", (xb, wb, bb), lambda f, x, w, b: bn(f, x, w, b, relu=True)
    xd = randn(100, 1000)
    # PyTorch's mask differs from ours: the reference applies ours in PyTorch arithmetic.
    keep = gk.dropout(torch.ones_like(xd), 0.3, seed=5) != 0
    yield "dropout", (xd,), (lambda f, x: gk.dropout(x, 0.3, seed=5) if f is gk else x * keep.to(x.dtype) * (1 / 0.7))


def _run(fn, f, inputs, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out = fn(f, *leaves)
    grad_out = (
        torch.ones_like(out)
        if out.dim() == 0
        else torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(
            out.device, out.dtype
        )
    )
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


def _err(ours, theirs, reference):
    if ours.dtype in (torch.float64, torch.float32):
        return (ours.double() - theirs.double()).abs().max().item(), None
    rel = lambda a: ((a.double() - reference).norm() / reference.norm()).item()  # noqa: E731
    return rel(ours), rel(theirs)


def measure(device: torch.device) -> list[tuple[str, str, str, str]]:
    rows = []
    for name, inputs, fn in _cases(device):
        ref_out, ref_grads = _run(fn, F, inputs, torch.float64)
        for dtype in DTYPES:
            ours_out, ours_grads = _run(fn, gk, inputs, dtype)
            theirs_out, theirs_grads = _run(fn, F, inputs, dtype)
            cells = []
            for ours, theirs, ref in [(ours_out, theirs_out, ref_out)] + list(zip(ours_grads, theirs_grads, ref_grads)):
                cells.append(_err(ours, theirs, ref))
            fwd = cells[0]
            bwd = max(cells[1:], key=lambda c: c[0])
            fmt = lambda c: f"{c[0]:.2g}" + ("" if c[1] is None else f" (torch {c[1]:.2g})")  # noqa: E731
            rows.append((name, str(dtype).replace("torch.", ""), fmt(fwd), fmt(bwd)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", help="default: the device's default backend")
    a = p.parse_args()
    device = torch.device(a.device)
    with gk.use_backend(a.backend):
        rows = measure(device)
    print(f"backend {gk.backend_name(device) if a.backend is None else a.backend}, device {device}\n")
    print("| op | dtype | forward | backward |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
