"""The ops under torch.func's transforms: grad, jacrev, vmap and per-sample gradients
(vmap of grad) give PyTorch's results, on every backend; a second derivative through a
kernel's backward raises; dropout's masks follow vmap's randomness as PyTorch's ops do.
Also batched gradients (torch's legacy vmap over a backward): autograd.grad's
is_grads_batched and autograd.functional.jacobian's vectorize; and saved-tensor hooks
whose unpack lays a tensor out anew."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacrev, vmap

import gpukernels as gk
from gpukernels import nn as gnn
from helpers import TOLERANCES

F64 = torch.float64
TARGET = torch.tensor([1, 0, 4, 2])


def _rotate_half(x):
    first, second = x.chunk(2, -1)
    return torch.cat((-second, first), -1)


def _torch_rope(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _torch_rms_norm(x, weight):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * weight


def _vectors(*shapes):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator, dtype=F64) for shape in shapes]


# name: (ours, PyTorch's, input shapes, how many leading inputs are differentiated, the op family)
CASES = {
    "layer_norm": (
        lambda x, w, b: gk.layer_norm(x, (6,), w, b),
        lambda x, w, b: F.layer_norm(x, (6,), w, b),
        [(4, 6), (6,), (6,)],
        3,
        "layer_norm",
    ),
    "rms_norm": (
        lambda x, w: gk.rms_norm(x, (6,), w, eps=1e-6),
        _torch_rms_norm,
        [(4, 6), (6,)],
        2,
        "rms_norm",
    ),
    "add_rms_norm": (
        lambda x, r, w: gk.add_rms_norm(x, r, (6,), w, eps=1e-6),
        lambda x, r, w: (_torch_rms_norm(x + r, w), x + r),
        [(4, 6), (4, 6), (6,)],
        3,
        "add_norm",
    ),
    "add_layer_norm": (
        lambda x, r, w, b: gk.add_layer_norm(x, r, (6,), w, b),
        lambda x, r, w, b: (F.layer_norm(x + r, (6,), w, b), x + r),
        [(4, 6), (4, 6), (6,), (6,)],
        4,
        "add_norm",
    ),
    "rms_norm_add": (
        lambda x, r, w: gk.rms_norm_add(x, r, (6,), w, eps=1e-6),
        lambda x, r, w: r + _torch_rms_norm(x, w),
        [(4, 6), (4, 6), (6,)],
        3,
        "norm_add",
    ),
    "layer_norm_add": (
        lambda x, r, w, b: gk.layer_norm_add(x, r, (6,), w, b),
        lambda x, r, w, b: r + F.layer_norm(x, (6,), w, b),
        [(4, 6), (4, 6), (6,), (6,)],
        4,
        "norm_add",
    ),
    "cross_entropy": (
        lambda x: gk.cross_entropy(x, TARGET, label_smoothing=0.1),
        lambda x: F.cross_entropy(x, TARGET, label_smoothing=0.1),
        [(4, 6)],
        1,
        "cross_entropy",
    ),
    "linear_act": (
        lambda x, w, b: gk.linear_act(x, w, b, "gelu"),
        lambda x, w, b: F.gelu(F.linear(x, w, b)),
        [(4, 6), (5, 6), (5,)],
        3,
        "linear_act",
    ),
    "swiglu": (gk.swiglu, lambda g, u: F.silu(g) * u, [(4, 6), (4, 6)], 2, "gated_act"),
    "rope": (gk.apply_rotary_pos_emb, _torch_rope, [(2, 3, 4, 6), (2, 1, 4, 6), (2, 4, 6), (2, 4, 6)], 2, "rope"),
    "linear_cross_entropy": (
        lambda x, w, b: gk.linear_cross_entropy(x, w, TARGET, b),
        lambda x, w, b: F.cross_entropy(F.linear(x, w, b), TARGET),
        [(4, 6), (7, 6), (7,)],
        3,
        "linear_cross_entropy",
    ),
    "batch_norm": (
        lambda x, w, b: gk.batch_norm(x, None, None, w, b, training=True, activation="relu"),
        lambda x, w, b: F.relu(F.batch_norm(x, None, None, w, b, training=True)),
        [(4, 3, 5), (3,), (3,)],
        3,
        "batch_norm",
    ),
}
# batch_norm's op updates running stats in place: vmap's fallback, which runs an op sample by
# sample, refuses ops that write their arguments (PyTorch's batch_norm under vmap needs batched
# running stats)
VMAPPED = [name for name in CASES if name != "batch_norm"]


def _params(names):
    return [pytest.param(name, marks=pytest.mark.family(CASES[name][4])) for name in names]


def _projected(fn):
    """``fn``'s outputs, each times a fixed ramp, summed: a scalar to differentiate."""

    def scalar(*inputs):
        outputs = fn(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return sum(
            (o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype, device=o.device).view(o.shape)).sum() for o in outputs
        )

    return scalar


def _inputs(name, device):
    return [t.to(device) for t in _vectors(*CASES[name][2])]


def _assert_close(ours, theirs):
    for a, b in zip(torch.utils._pytree.tree_leaves(ours), torch.utils._pytree.tree_leaves(theirs), strict=True):
        torch.testing.assert_close(a, b, **TOLERANCES[F64])


@pytest.mark.parametrize("name", _params(CASES))
def test_grad_as_torch(device, name):
    ours, theirs, _, differentiated, _ = CASES[name]
    inputs = _inputs(name, device)
    argnums = tuple(range(differentiated))
    _assert_close(grad(_projected(ours), argnums)(*inputs), grad(_projected(theirs), argnums)(*inputs))


@pytest.mark.parametrize("name", _params(VMAPPED))
def test_per_sample_grads_as_torch(device, name):
    """vmap of grad: each sample's gradient, the op run inside both transforms."""
    ours, theirs, _, differentiated, _ = CASES[name]
    batched = [torch.stack([t, 2 * t - 1]) for t in _inputs(name, device)]
    argnums = tuple(range(differentiated))
    per_sample = vmap(grad(_projected(ours), argnums))(*batched)
    _assert_close(per_sample, vmap(grad(_projected(theirs), argnums))(*batched))
    _assert_close(vmap(ours)(*batched), vmap(theirs)(*batched))


@pytest.mark.family("layer_norm", "cross_entropy")
@pytest.mark.parametrize("name", ["layer_norm", "cross_entropy"])
def test_jacrev_as_torch(device, name):
    ours, theirs, _, differentiated, _ = CASES[name]
    inputs = _inputs(name, device)
    _assert_close(jacrev(ours, 0)(*inputs), jacrev(theirs, 0)(*inputs))


@pytest.mark.parametrize("name", _params(CASES))
def test_vectorized_jacobian_as_torch(device, name):
    """autograd.functional.jacobian(vectorize=True) runs each op's backward once, on
    gradients batched by torch's legacy vmap, which the kernels cannot read."""
    ours, theirs, _, differentiated, _ = CASES[name]
    inputs = _inputs(name, device)
    fixed = inputs[differentiated:]

    def jacobian(fn):
        return torch.autograd.functional.jacobian(
            lambda *a: fn(*a, *fixed), tuple(inputs[:differentiated]), vectorize=True
        )

    _assert_close(jacobian(ours), jacobian(theirs))


@pytest.mark.family("layer_norm")
def test_batched_grads_as_torch(device):
    x, weight = (t.to(device).requires_grad_() for t in _vectors((4, 6), (6,)))
    cotangents = torch.stack(_vectors((4, 6), (4, 6), (4, 6))).to(device)
    ours = torch.autograd.grad(gk.layer_norm(x, (6,), weight), (x, weight), cotangents, is_grads_batched=True)
    theirs = torch.autograd.grad(F.layer_norm(x, (6,), weight), (x, weight), cotangents, is_grads_batched=True)
    _assert_close(ours, theirs)


class _Transposed:
    """saved_tensors_hooks: each saved tensor of 2 or more dims packed as a dense copy of its
    transpose and unpacked as the transpose of that, its values as saved, its strides not."""

    def __init__(self):
        self.unpacked = 0

    def pack(self, t):
        return (True, t.mT.contiguous()) if t.dim() >= 2 and t.is_floating_point() else (False, t)

    def unpack(self, packed):
        relaid, t = packed
        self.unpacked += relaid
        return t.mT if relaid else t


@pytest.mark.parametrize("channels_last", [False, True], ids=["dense", "channels_last"])
@pytest.mark.parametrize("name", _params(CASES))
def test_saved_tensors_laid_out_anew_by_hooks(device, name, channels_last):
    """PyTorch's ops take whatever layout an unpack hook returns; the kernels read the saved
    tensors as the forward laid them out (a misread was a silently wrong gradient on Triton)."""
    ours, theirs, _, differentiated, _ = CASES[name]
    if channels_last and name != "batch_norm":
        pytest.skip("channels-last input: batch_norm's")
    inputs = _inputs(name, device)
    if channels_last:
        inputs[0] = inputs[0].reshape(4, 3, 5, 1).contiguous(memory_format=torch.channels_last)
    if name == "linear_cross_entropy":  # per row: the two-pass backward, which reads saved tensors
        ours = lambda x, w, b: gk.linear_cross_entropy(x, w, TARGET, b, reduction="none")  # noqa: E731
        theirs = lambda x, w, b: F.cross_entropy(F.linear(x, w, b), TARGET, reduction="none")  # noqa: E731

    def grads(fn):
        hooks = _Transposed()
        leaves = [t.detach().requires_grad_(i < differentiated) for i, t in enumerate(inputs)]
        with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
            scalar = _projected(fn)(*leaves)
        scalar.backward()
        return [t.grad for t in leaves[:differentiated]], hooks.unpacked

    (ours_grads, relaid), (theirs_grads, _) = grads(ours), grads(theirs)
    assert relaid  # the backward read a tensor laid out anew
    _assert_close(ours_grads, theirs_grads)


@pytest.mark.parametrize("name", _params(["layer_norm", "cross_entropy", "batch_norm"]))
def test_second_derivative_through_transforms_raises(device, name):
    """grad of grad needs the backward kernels' own derivative, which they do not have:
    an error, not a Hessian missing the op's term."""
    ours, _, _, _, _ = CASES[name]
    inputs = _inputs(name, device)
    first = grad(_projected(ours))
    with pytest.raises(RuntimeError, match="second derivative is not available"):
        grad(lambda *a: first(*a).square().sum())(*inputs)


@pytest.mark.family("batch_norm")
def test_batch_norm_updates_running_stats_under_grad(device):
    x, weight, bias = (t.to(device) for t in _vectors((4, 3, 5), (3,), (3,)))
    ours_stats = [torch.zeros(3, dtype=F64, device=device), torch.ones(3, dtype=F64, device=device)]
    theirs_stats = [t.clone() for t in ours_stats]

    def loss(op, stats):
        return lambda x, w, b: _projected(lambda *a: op(a[0], *stats, a[1], a[2], training=True))(x, w, b)

    ours = grad(loss(gk.batch_norm, ours_stats), (0, 1, 2))(x, weight, bias)
    theirs = grad(loss(F.batch_norm, theirs_stats), (0, 1, 2))(x, weight, bias)
    _assert_close(ours, theirs)
    _assert_close(ours_stats, theirs_stats)


@pytest.mark.family("dropout")
def test_dropout_grad_is_its_mask(device):
    x = torch.randn(64, dtype=F64, device=device) + 3  # no zeros: the output's zeros are the mask's
    up = torch.randn(64, dtype=F64, device=device)
    dx = grad(lambda t: (gk.dropout(t, 0.25, seed=7) * up).sum())(x)
    kept = gk.dropout(x, 0.25, seed=7) != 0
    assert 0 < kept.sum() < 64
    torch.testing.assert_close(dx, torch.where(kept, up / 0.75, 0), **TOLERANCES[F64])


@pytest.mark.family("dropout")
def test_dropout_masks_follow_vmap_randomness(device):
    """As PyTorch's random ops: vmap refuses a drawn mask by default, draws one a sample
    with randomness="different" and one for all with "same"."""
    x = torch.ones(4, 256, dtype=F64, device=device)
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(lambda t: gk.dropout(t, 0.5))(x)
    different = vmap(lambda t: gk.dropout(t, 0.5), randomness="different")(x)
    same = vmap(lambda t: gk.dropout(t, 0.5), randomness="same")(x)
    assert len({tuple(row.nonzero().flatten().tolist()) for row in different}) == 4
    assert all(torch.equal(row, same[0]) for row in same)
    assert 0 < (same[0] == 0).sum() < 256


@pytest.mark.family("linear_act", "layer_norm", "cross_entropy")
def test_per_sample_gradients_of_a_model(device):
    """The torch.func recipe for per-sample gradients (functional_call, vmap of grad) on a
    model of our modules gives those of the same model of torch.nn modules."""
    torch.manual_seed(0)
    theirs = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.SiLU(), torch.nn.LayerNorm(8), torch.nn.Linear(8, 5))
    ours = torch.nn.Sequential(
        gnn.LinearAct(6, 8, "silu"), torch.nn.Identity(), gnn.LayerNorm(8), torch.nn.Linear(8, 5)
    )
    ours.load_state_dict(theirs.state_dict())
    theirs, ours = theirs.to(device, F64), ours.to(device, F64)
    x, target = torch.randn(3, 6, dtype=F64, device=device), torch.tensor([0, 4, 2], device=device)

    def per_sample(model, loss):
        params = {k: v.detach() for k, v in model.named_parameters()}

        def sample_loss(params, x, target):
            return loss(functional_call(model, params, (x[None],)), target[None])

        return vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, target)

    _assert_close(per_sample(ours, gnn.CrossEntropyLoss()), per_sample(theirs, F.cross_entropy))
