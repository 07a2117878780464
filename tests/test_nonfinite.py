"""Every op with inf or nan in an input or in the upstream gradient (each backend conftest's
``device`` selects): the elements PyTorch makes inf or nan are ours too, forward and backward,
the others are finite, and no floating-point warning is raised on the way (a diverging step
must not raise in a user's tests run with warnings as errors; the Triton interpreter's NumPy
warns as it runs a GPU's arithmetic, so there only the values are checked); AdamW's step with
an inf or nan gradient."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import gpukernels as gk

D = 8
TARGET = torch.tensor([1, 2, 3])


_ANGLES = torch.randn(1, 3, D, generator=torch.Generator().manual_seed(0))
_COS_SIN = (_ANGLES.cos(), _ANGLES.sin())


def _rope(x, cos, sin):
    """transformers' rotary embedding, written out."""
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin[:, None]


def _sum_of(q_and_k):
    """q's and k's rotations in one output: q (1, 2, 3, D) and k (1, 1, 3, D) broadcast."""
    return q_and_k[0] + q_and_k[1]


# name, family, ours, PyTorch's, x's shape, the shapes of the further inputs (normal samples)
CASES = [
    ("layer_norm", "layer_norm", lambda x, w, b: gk.layer_norm(x, (D,), w, b),
     lambda x, w, b: F.layer_norm(x, (D,), w, b), (3, D), [(D,), (D,)]),
    ("rms_norm", "rms_norm", lambda x, w: gk.rms_norm(x, (D,), w), lambda x, w: F.rms_norm(x, (D,), w), (3, D), [(D,)]),
    ("add_layer_norm", "add_norm", lambda x, r, w, b: gk.add_layer_norm(x, r, (D,), w, b)[0],
     lambda x, r, w, b: F.layer_norm(x + r, (D,), w, b), (3, D), [(3, D), (D,), (D,)]),
    ("add_rms_norm", "add_norm", lambda x, r, w: gk.add_rms_norm(x, r, (D,), w)[0],
     lambda x, r, w: F.rms_norm(x + r, (D,), w), (3, D), [(3, D), (D,)]),
    ("layer_norm_add", "norm_add", lambda x, r, w, b: gk.layer_norm_add(x, r, (D,), w, b),
     lambda x, r, w, b: r + F.layer_norm(x, (D,), w, b), (3, D), [(3, D), (D,), (D,)]),
    ("rms_norm_add", "norm_add", lambda x, r, w: gk.rms_norm_add(x, r, (D,), w),
     lambda x, r, w: r + F.rms_norm(x, (D,), w), (3, D), [(3, D), (D,)]),
    ("cross_entropy", "cross_entropy", lambda x: gk.cross_entropy(x, TARGET.to(x.device), reduction="none"),
     lambda x: F.cross_entropy(x, TARGET, reduction="none"), (3, D), []),
    ("cross_entropy_smoothed", "cross_entropy",
     lambda x: gk.cross_entropy(x, TARGET.to(x.device), label_smoothing=0.1),
     lambda x: F.cross_entropy(x, TARGET, label_smoothing=0.1), (3, D), []),
    ("linear_cross_entropy", "linear_cross_entropy",
     lambda x, w: gk.linear_cross_entropy(x, w, TARGET.to(x.device), reduction="none"),
     lambda x, w: F.cross_entropy(F.linear(x, w).float(), TARGET, reduction="none"), (3, D), [(5, D)]),
    *[
        (f"linear_act_{activation}", "linear_act", lambda x, w, b, a=activation: gk.linear_act(x, w, b, a),
         lambda x, w, b, f=reference: f(F.linear(x, w, b)), (3, D), [(5, D), (5,)])
        for activation, reference in (
            ("relu", F.relu), ("gelu", F.gelu), ("silu", F.silu), ("relu_squared", lambda z: F.relu(z).square())
        )
    ],
    ("swiglu", "gated_act", gk.swiglu, lambda g, u: F.silu(g) * u, (3, D), [(3, D)]),
    ("geglu", "gated_act", gk.geglu, lambda g, u: F.gelu(g) * u, (3, D), [(3, D)]),
    ("rope", "rope", lambda q, k: _sum_of(gk.apply_rotary_pos_emb(q, k, *(t.to(q.device) for t in _COS_SIN))),
     lambda q, k: _rope(q, *_COS_SIN) + _rope(k, *_COS_SIN), (1, 2, 3, D), [(1, 1, 3, D)]),
    ("batch_norm", "batch_norm", lambda x, w, b: gk.batch_norm(x, None, None, w, b, training=True),
     lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True), (4, 3, 2, 2), [(3,), (3,)]),
    ("dropout", "dropout", lambda x: gk.dropout(x, 0.5, seed=5),
     lambda x: x * gk.dropout(torch.ones_like(x), 0.5, seed=5), (3, D), []),
]  # fmt: skip


def _outputs_and_gradients(fn, inputs, dy_value):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    dy = torch.ones_like(out)
    if dy_value is not None:
        dy.view(-1)[-1] = dy_value
    return [out.detach().cpu(), *(g.cpu() for g in torch.autograd.grad(out, inputs, dy))]


@pytest.mark.parametrize("where", ["input", "gradient"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "ours, theirs, shape, further",
    [pytest.param(*rest, id=name, marks=pytest.mark.family(family)) for name, family, *rest in CASES],
)
def test_inf_and_nan_reach_the_elements_pytorchs_reach_without_warnings(
    device, ours, theirs, shape, further, dtype, value, where
):
    torch.manual_seed(0)
    inputs = [torch.randn(s, dtype=torch.float64).to(dtype) for s in (shape, *further)]
    if where == "input":
        inputs[0].view(-1)[5] = value
    dy_value = value if where == "gradient" else None
    with warnings.catch_warnings():
        if gk.backend_name(device) != "triton":
            warnings.simplefilter("error")
        got = _outputs_and_gradients(ours, [t.to(device) for t in inputs], dy_value)
    want = _outputs_and_gradients(theirs, inputs, dy_value)
    # (a -inf logit other than the target's leaves the loss finite: ours must too)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a.isfinite(), b.isfinite()), f"{'output' if i == 0 else f'gradient {i - 1}'}"


@pytest.mark.family("adamw")
@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_adamw_with_an_inf_or_nan_gradient_steps_as_pytorchs_without_warnings(device, value, max_grad_norm):
    """One inf or nan gradient element: the params PyTorch's AdamW (after clip_grad_norm_ where
    clipping) makes nan are nan in ours, the others are equal."""
    torch.manual_seed(0)
    params = [torch.randn(5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    grads = [torch.randn_like(p) for p in params]
    grads[0][1] = value
    ours = [torch.nn.Parameter(p.to(device)) for p in params]
    theirs = [torch.nn.Parameter(p.clone()) for p in params]
    for p, q, g in zip(ours, theirs, grads):
        p.grad, q.grad = g.to(device), g.clone()
    with warnings.catch_warnings():
        if gk.backend_name(device) != "triton":
            warnings.simplefilter("error")
        gk.optim.AdamW(ours, lr=0.1, max_grad_norm=max_grad_norm).step()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(theirs, max_grad_norm)
    torch.optim.AdamW(theirs, lr=0.1).step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), equal_nan=True)
