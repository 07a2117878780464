"""Largest error of every op against PyTorch, per dtype, forward and backward.

    python -m bench.accuracy [--device cpu|cuda] [--backend numpy|triton|cupy] [--ops swiglu,adamw]

fp64/fp32: the largest absolute difference from PyTorch's result in the same
dtype. bf16/fp16: the relative norm error against a float64 computation, with
PyTorch's own low-precision error beside it. An op of several results (the
residual ops' norm and sum, rotary embedding's q and k) is judged by its worst
one, forward and backward; backward errors are over every input gradient of
the op. Where PyTorch has no single op, its side is the expression our op
replaces, written in PyTorch (``F.silu(gate) * up`` for ``swiglu``). AdamW is
measured after ``ADAMW_STEPS`` steps, its params against
``torch.optim.AdamW``'s.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import gpukernels as gk

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
LOW_PRECISION = (torch.bfloat16, torch.float16)
ADAMW_STEPS = 10


@dataclass(frozen=True)
class Case:
    """One op: ``ours`` and ``theirs`` take ``inputs`` (fp64 tensors, cast to the dtype
    measured, each given a gradient) and return a tensor or a tuple of tensors."""

    name: str
    inputs: tuple[Tensor, ...]
    ours: Callable[..., Tensor | tuple[Tensor, ...]]
    theirs: Callable[..., Tensor | tuple[Tensor, ...]]

    @property
    def function(self) -> str:
        """The public function measured (``linear_act[relu]`` measures ``linear_act``)."""
        return self.name.split("[")[0]


@dataclass(frozen=True)
class Error:
    """Ours, and PyTorch's against the fp64 reference where the dtype is low-precision."""

    ours: float
    torch: Optional[float] = None

    def __str__(self) -> str:
        return f"{self.ours:.2g}" + ("" if self.torch is None else f" (torch {self.torch:.2g})")


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _bn(x, w, b, *, ours: bool, relu: bool = False):
    channels = x.shape[1]
    stats_dtype = torch.float32 if x.dtype in LOW_PRECISION else x.dtype  # running stats: fp32 for bf16/fp16
    rm = torch.zeros(channels, device=x.device, dtype=stats_dtype)
    rv = torch.ones(channels, device=x.device, dtype=stats_dtype)
    w, b = w.to(stats_dtype), b.to(stats_dtype)
    if ours:
        return gk.batch_norm(x, rm, rv, w, b, training=True, activation="relu" if relu else "none")
    y = F.batch_norm(x, rm, rv, w, b, training=True)
    return F.relu(y) if relu else y


def cases(device: torch.device) -> Iterator[Case]:
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device)

    d = 1000
    x, r, w, b = randn(64, d), randn(64, d), randn(d), randn(d)
    yield Case(
        "layer_norm",
        (x, w, b),
        lambda x, w, b: gk.layer_norm(x, (d,), w, b),
        lambda x, w, b: F.layer_norm(x, (d,), w, b),
    )
    yield Case(
        "rms_norm", (x, w), lambda x, w: gk.rms_norm(x, (d,), w, 1e-6), lambda x, w: F.rms_norm(x, (d,), w, 1e-6)
    )
    yield Case(
        "add_layer_norm",
        (x, r, w, b),
        lambda x, r, w, b: gk.add_layer_norm(x, r, (d,), w, b),
        lambda x, r, w, b: (F.layer_norm(r + x, (d,), w, b), r + x),
    )
    yield Case(
        "add_rms_norm",
        (x, r, w),
        lambda x, r, w: gk.add_rms_norm(x, r, (d,), w, 1e-6),
        lambda x, r, w: (F.rms_norm(r + x, (d,), w, 1e-6), r + x),
    )
    yield Case(
        "layer_norm_add",
        (x, r, w, b),
        lambda x, r, w, b: gk.layer_norm_add(x, r, (d,), w, b),
        lambda x, r, w, b: r + F.layer_norm(x, (d,), w, b),
    )
    yield Case(
        "rms_norm_add",
        (x, r, w),
        lambda x, r, w: gk.rms_norm_add(x, r, (d,), w, 1e-6),
        lambda x, r, w: r + F.rms_norm(x, (d,), w, 1e-6),
    )

    xi, wi, bi = randn(64, 256), randn(384, 256) / 16, randn(384)
    torch_acts = {
        "relu": F.relu,
        "gelu": F.gelu,
        "silu": F.silu,
        "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
        "quick_gelu": lambda z: z * torch.sigmoid(1.702 * z),
        "relu_squared": lambda z: F.relu(z).square(),
    }
    for act, torch_act in torch_acts.items():
        yield Case(
            f"linear_act[{act}]",
            (xi, wi, bi),
            lambda x, w, b, act=act: gk.linear_act(x, w, b, act),
            lambda x, w, b, torch_act=torch_act: torch_act(F.linear(x, w, b)),
        )

    gate, up = randn(64, 1000), randn(64, 1000)
    yield Case("swiglu", (gate, up), gk.swiglu, lambda gate, up: F.silu(gate) * up)
    for approximate in ("none", "tanh"):
        yield Case(
            f"geglu[{approximate}]",
            (gate, up),
            lambda gate, up, a=approximate: gk.geglu(gate, up, a),
            lambda gate, up, a=approximate: F.gelu(gate, approximate=a) * up,
        )

    # transformers' layout: q (batch, heads, time, head_dim), k with fewer heads (GQA),
    # cos and sin (1, time, head_dim) in the model's dtype
    angles = torch.outer(torch.arange(16, dtype=torch.float64), 10000.0 ** (-torch.arange(0, 64, 2) / 64))
    angles = torch.cat((angles, angles), dim=-1)[None].to(device)
    cos, sin = angles.cos(), angles.sin()
    yield Case(
        "apply_rotary_pos_emb",
        (randn(2, 4, 16, 64), randn(2, 2, 16, 64)),
        lambda q, k: gk.apply_rotary_pos_emb(q, k, cos.to(q.dtype), sin.to(q.dtype)),
        lambda q, k: tuple(t * cos.to(q.dtype)[:, None] + _rotate_half(t) * sin.to(q.dtype)[:, None] for t in (q, k)),
    )

    vocab = 4097
    logits, target = randn(64, vocab) * 3, torch.randint(0, vocab, (64,), generator=g).to(device)
    yield Case(
        "cross_entropy",
        (logits,),
        lambda z: gk.cross_entropy(z, target, label_smoothing=0.1),
        lambda z: F.cross_entropy(z, target, label_smoothing=0.1),
    )
    hidden, head = randn(64, 256), randn(vocab, 256) / 16
    yield Case(
        "linear_cross_entropy",
        (hidden, head),
        lambda h, w: gk.linear_cross_entropy(h, w, target),
        lambda h, w: F.cross_entropy(F.linear(h, w), target),
    )

    xb, wb, bb = randn(16, 32, 7, 9), randn(32), randn(32)
    yield Case("batch_norm", (xb, wb, bb), lambda *a: _bn(*a, ours=True), lambda *a: _bn(*a, ours=False))
    yield Case(
        "batch_norm[relu]",
        (xb, wb, bb),
        lambda *a: _bn(*a, ours=True, relu=True),
        lambda *a: _bn(*a, ours=False, relu=True),
    )

    # PyTorch's mask differs from ours: its side applies ours in PyTorch arithmetic.
    xd = randn(100, 1000)
    keep = gk.dropout(torch.ones_like(xd), 0.3, seed=5) != 0
    yield Case("dropout", (xd,), lambda x: gk.dropout(x, 0.3, seed=5), lambda x: x * keep.to(x.dtype) * (1 / 0.7))


def _run(fn, inputs, dtype) -> tuple[list[Tensor], list[Tensor]]:
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out = fn(*leaves)
    outs = list(out) if isinstance(out, tuple) else [out]
    g = torch.Generator().manual_seed(1)
    grads = [
        torch.ones_like(o)
        if o.dim() == 0
        else torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype)
        for o in outs
    ]
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs], [t.grad for t in leaves]


def _err(ours: Tensor, theirs: Tensor, reference: Tensor) -> Error:
    if ours.dtype not in LOW_PRECISION:
        return Error((ours.double() - theirs.double()).abs().max().item())
    rel = lambda a: ((a.double() - reference).norm() / reference.norm()).item()  # noqa: E731
    return Error(rel(ours), rel(theirs))


def _worst(errors: list[Error]) -> Error:
    return max(errors, key=lambda e: e.ours)


def measure(
    device: torch.device, functions: Optional[Iterable[str]] = None
) -> list[tuple[str, torch.dtype, Error, Error]]:
    """Per case (of ``functions`` only, when given) and dtype: the forward's error, the backward's."""
    rows = []
    for case in cases(device):
        if functions is not None and case.function not in functions:
            continue
        ref_outs, ref_grads = _run(case.theirs, case.inputs, torch.float64)
        for dtype in DTYPES:
            ours_outs, ours_grads = _run(case.ours, case.inputs, dtype)
            theirs_outs, theirs_grads = _run(case.theirs, case.inputs, dtype)
            fwd = [_err(*t) for t in zip(ours_outs, theirs_outs, ref_outs, strict=True)]
            bwd = [_err(*t) for t in zip(ours_grads, theirs_grads, ref_grads, strict=True)]
            rows.append((case.name, dtype, _worst(fwd), _worst(bwd)))
    return rows


def _adamw_params(optimizer_class, p0: Tensor, grads: list[Tensor], dtype: torch.dtype) -> Tensor:
    p = p0.to(dtype, copy=True).requires_grad_()
    opt = optimizer_class([p], lr=1e-2, weight_decay=0.1)
    for grad in grads:
        p.grad = grad.to(dtype)
        opt.step()
    return p.detach()


def measure_adamw(device: torch.device) -> list[tuple[torch.dtype, Error]]:
    """Per dtype: the params' error after ``ADAMW_STEPS`` steps of ``gk.optim.AdamW``."""
    g = torch.Generator().manual_seed(2)
    p0 = torch.randn(4096, generator=g, dtype=torch.float64).to(device)
    grads = [torch.randn(4096, generator=g, dtype=torch.float64).to(device) for _ in range(ADAMW_STEPS)]
    reference = _adamw_params(torch.optim.AdamW, p0, grads, torch.float64)
    return [
        (
            dtype,
            _err(
                _adamw_params(gk.optim.AdamW, p0, grads, dtype),
                _adamw_params(torch.optim.AdamW, p0, grads, dtype),
                reference,
            ),
        )
        for dtype in DTYPES
    ]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", help="default: the device's default backend")
    p.add_argument("--ops", help="comma-separated functions of gk.functional, and adamw (default: all)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    known = (*gk.functional.__all__, "adamw")
    ops = known if a.ops is None else a.ops.split(",")
    unknown = [op for op in ops if op not in known]
    if unknown:
        p.error(f"--ops: unknown {', '.join(unknown)}; choose among {', '.join(known)}")
    with gk.use_backend(a.backend):
        rows = measure(device, ops)
        adamw_rows = measure_adamw(device) if "adamw" in ops else []
    print(f"backend {gk.backend_name(device) if a.backend is None else a.backend}, device {device}\n")
    if rows:
        print("| op | dtype | forward | backward |\n|---|---|---|---|")
    for name, dtype, fwd, bwd in rows:
        print(f"| {name} | {_dtype_name(dtype)} | {fwd} | {bwd} |")
    if adamw_rows:
        print(f"\n| optimizer | dtype | params after {ADAMW_STEPS} steps |\n|---|---|---|")
    for dtype, err in adamw_rows:
        print(f"| AdamW | {_dtype_name(dtype)} | {err} |")


if __name__ == "__main__":
    main()
