"""add_layer_norm and add_rms_norm: a residual addition and the norm of its sum in one op,
against PyTorch's addition followed by its norm (and by ours), and the same math in float64."""

import pytest
import torch
import torch.nn.functional as F

import gpukernels as gk
from gpukernels.errors import ArgumentError, ArgumentTypeError
from helpers import (
    LOWP_FACTOR,
    RESIDUAL_DTYPES,
    assert_matches,
    dtype_pair_id,
    gradcheck,
    rel_err,
    residual_norm_inputs,
)

pytestmark = pytest.mark.family("add_norm")  # conftest's device fixture skips backends without them

SHAPES = [
    ((5, 1), (1,)),
    ((2, 5, 17), (17,)),
    ((9, 64), (64,)),  # a multiple of 16 features: the backward's pipelined row loop
    ((6, 1000), (1000,)),
    ((2, 3, 4, 5), (4, 5)),
    ((0, 17), (17,)),
    ((2, 9000), (9000,)),  # wider than one Triton block: the looped kernels
]
VARIANTS = {"plain": {}, "llama": dict(cast_before_weight=True), "gemma": dict(offset=1.0)}


def _outputs_and_grads(fn, x, residual, weight, bias=None, seed=1):
    """``fn``'s two outputs, and the gradients of every input for random gradients of both."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, residual, weight, bias)]
    y, summed = fn(*leaves)
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.device, y.dtype)
    dsummed = torch.randn(summed.shape, generator=g, dtype=torch.float64).to(summed.device, summed.dtype)
    torch.autograd.backward((y, summed), (dy, dsummed))
    return [y.detach(), summed.detach()] + [t.grad for t in leaves if t is not None]


def _torch_layer_norm(x, residual, weight, bias, norm_shape, eps=1e-5):
    summed = residual + x
    if summed.dtype == torch.float64:  # PyTorch takes fp32 parameters with fp32/bf16/fp16 input only
        weight, bias = weight.double(), bias.double()
    return F.layer_norm(summed, norm_shape, weight, bias, eps), summed


def _torch_rms_norm(x, residual, weight, _bias, norm_shape, eps=1e-6, offset=0.0, cast_before_weight=False):
    """transformers' formulas (Llama's, Gemma's) and F.rms_norm's, in the sum's dtype (float64 in float64)."""
    summed = residual + x
    stats = torch.float64 if summed.dtype == torch.float64 else torch.float32
    dims = tuple(range(-len(norm_shape), 0))
    h = summed.to(stats)
    h = h * torch.rsqrt(h.pow(2).mean(dims, keepdim=True) + eps)
    if cast_before_weight:
        return weight * h.to(summed.dtype), summed
    return (h * (offset + weight.to(stats))).to(summed.dtype), summed


def _double(*tensors):
    return [t.double() for t in tensors]


def _check(ours, theirs, reference):
    """Each result against PyTorch's and float64's; fp32 parameter gradients of bf16/fp16 rows
    carry those rows' rounding: judged as low-precision results (within a factor of PyTorch's error)."""
    low_precision = ours[1].dtype in (torch.bfloat16, torch.float16)  # the sum's
    for o, t, r in zip(ours, theirs, reference):
        if low_precision and o.dtype == torch.float32:
            assert rel_err(o, r) <= max(LOWP_FACTOR * rel_err(t, r), 1e-6), (rel_err(o, r), rel_err(t, r))
        else:
            assert_matches(o, t, r)


@pytest.mark.parametrize("dtypes", RESIDUAL_DTYPES, ids=dtype_pair_id)
@pytest.mark.parametrize("shape,norm_shape", SHAPES)
def test_add_layer_norm_matches_torch(device, shape, norm_shape, dtypes):
    x, residual, weight, bias = residual_norm_inputs(shape, norm_shape, dtypes, device)
    ours = _outputs_and_grads(lambda *a: gk.add_layer_norm(*a[:2], norm_shape, *a[2:]), x, residual, weight, bias)
    theirs = _outputs_and_grads(lambda *a: _torch_layer_norm(*a, norm_shape), x, residual, weight, bias)
    reference = _outputs_and_grads(lambda *a: _torch_layer_norm(*a, norm_shape), *_double(x, residual, weight, bias))
    assert torch.equal(ours[1], theirs[1])  # the sum, as PyTorch's addition rounds it
    assert [t.dtype for t in ours] == [t.dtype for t in theirs]
    _check(ours, theirs, reference)


@pytest.mark.parametrize("dtypes", RESIDUAL_DTYPES, ids=dtype_pair_id)
@pytest.mark.parametrize(
    "shape,norm_shape,variant",
    # transformers' RMSNorms (Llama's, Gemma's) normalise the last dim
    [
        (*shapes, variant)
        for shapes in SHAPES
        for variant in sorted(VARIANTS)
        if variant == "plain" or len(shapes[1]) == 1
    ],
)
def test_add_rms_norm_matches_torch(device, shape, norm_shape, dtypes, variant):
    options = VARIANTS[variant]
    x, residual, weight, _ = residual_norm_inputs(
        shape, norm_shape, dtypes, device, weight_scale=0.1 if "offset" in options else 1
    )

    def theirs_fn(x, residual, weight, _bias):
        return _torch_rms_norm(x, residual, weight, None, norm_shape, **options)

    def ours_fn(x, residual, weight, _bias):
        return gk.add_rms_norm(x, residual, norm_shape, weight, 1e-6, **options)

    ours = _outputs_and_grads(ours_fn, x, residual, weight)
    theirs = _outputs_and_grads(theirs_fn, x, residual, weight)
    reference = _outputs_and_grads(theirs_fn, *_double(x, residual, weight))
    assert torch.equal(ours[1], theirs[1])
    assert [t.dtype for t in ours] == [t.dtype for t in theirs]
    _check(ours, theirs, reference)


@pytest.mark.parametrize("dtypes", RESIDUAL_DTYPES[:3], ids=dtype_pair_id)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_is_the_norm_of_the_sum_bit_for_bit(device, dtypes, variant):
    """The norm reads the sum as rounded to its dtype: the same ``y`` as our norm of PyTorch's sum."""
    x, residual, weight, bias = residual_norm_inputs((7, 300), (300,), dtypes, device)
    options = VARIANTS[variant]
    y, summed = gk.add_rms_norm(x, residual, 300, weight, 1e-6, **options)
    assert torch.equal(y, gk.rms_norm(residual + x, 300, weight, 1e-6, **options))
    y, summed = gk.add_layer_norm(x, residual, 300, weight, bias)
    assert torch.equal(y, gk.layer_norm(residual + x, 300, weight, bias))


@pytest.mark.parametrize("which", ["y", "sum"])
def test_gradient_through_one_output(device, which):
    """The backward with a gradient for one output only (the other's None: not materialised)."""
    x, residual, weight, bias = residual_norm_inputs((6, 40), (40,), (torch.bfloat16, torch.float32), device)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (x, residual, weight, bias)]
        y, summed = fn(*leaves)
        out = y if which == "y" else summed
        out.backward(torch.ones_like(out))
        return [t.grad for t in leaves]

    ours = grads(lambda x, r, w, b: gk.add_layer_norm(x, r, 40, w, b))
    theirs = grads(lambda x, r, w, b: _torch_layer_norm(x, r, w, b, (40,)))
    for o, t in zip(ours, theirs):
        if t is None:
            assert o is None or not o.any()
        else:
            torch.testing.assert_close(o, t, atol=2e-2, rtol=2e-2)


def test_gradcheck(device):
    inputs = [t.double().requires_grad_() for t in residual_norm_inputs((3, 2, 5), (5,), (torch.float64,) * 2, device)]
    assert gradcheck(lambda x, r, w, b: gk.add_layer_norm(x, r, 5, w, b), inputs)
    assert gradcheck(lambda x, r, w: gk.add_rms_norm(x, r, 5, w, cast_before_weight=True), inputs[:3])


def test_autocast_normalises_the_sum_in_fp32_as_the_norm_alone(device):
    x, residual, weight, bias = residual_norm_inputs((4, 64), (64,), (torch.bfloat16, torch.float32), device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y, summed = gk.add_layer_norm(x, residual, 64, weight, bias)
        expected = gk.layer_norm(residual + x, 64, weight, bias)
        y_feeding, _ = gk.add_rms_norm(x, residual, 64, weight, out_dtype=torch.bfloat16)
    assert y.dtype == expected.dtype == torch.float32 and torch.equal(y, expected)
    assert summed.dtype == torch.float32 and y_feeding.dtype == torch.bfloat16


def test_bad_residual_is_named():
    x = torch.randn(4, 8)
    with pytest.raises(ArgumentError, match="residual must have shape"):
        gk.add_layer_norm(x, torch.randn(4, 1), 8)
    with pytest.raises(ArgumentTypeError, match="residual must be"):
        gk.add_rms_norm(x, torch.ones(4, 8, dtype=torch.int64), 8)
    with pytest.raises(ArgumentTypeError, match="residual must be a torch.Tensor"):
        gk.add_rms_norm(x, 1.0, 8)
    with pytest.raises(ArgumentError, match="out_dtype"):
        gk.add_rms_norm(x, x.double(), 8, out_dtype=torch.bfloat16)  # the sum is float64
    with pytest.raises(ArgumentError, match="offset"):
        gk.add_rms_norm(x, x, 8, offset=1.0)


def test_modules_take_a_residual():
    """gk.nn.LayerNorm / RMSNorm called with a residual return the norm of the sum and the sum."""
    x, residual = torch.randn(3, 16), torch.randn(3, 16)
    for norm in (gk.nn.LayerNorm(16), gk.nn.RMSNorm(16)):
        y, summed = norm(x, residual)
        assert torch.equal(summed, residual + x) and torch.equal(y, norm(residual + x))
