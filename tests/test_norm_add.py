"""layer_norm_add and rms_norm_add: a norm and the residual addition after it in one op,
against PyTorch's norm followed by its addition (and our norm's), and the same math in float64."""

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

pytestmark = pytest.mark.family("norm_add")  # conftest's device fixture skips backends without them

SHAPES = [
    ((5, 1), (1,)),
    ((2, 5, 17), (17,)),
    ((9, 64), (64,)),
    ((6, 1000), (1000,)),
    ((2, 3, 4, 5), (4, 5)),
    ((0, 17), (17,)),
    ((2, 9000), (9000,)),  # wider than one Triton block: the looped kernel
]
# transformers' RMSNorms: plain (F.rms_norm's rounding), Llama's (rounded to x's dtype, then times the
# weight), Gemma's (times 1 + weight, then rounded), OLMo 2's (times the weight in fp32, then rounded: under
# autocast too, norm_dtype=input's)
VARIANTS = {"plain": {}, "llama": dict(cast_before_weight=True), "gemma": dict(offset=1.0)}


def _output_and_grads(fn, *inputs, seed=1):
    """``fn``'s output, and the gradients of every input for a random gradient of it."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    out.backward(dout)
    return [out.detach()] + [t.grad for t in leaves]


def _torch_layer_norm(x, residual, weight, bias, norm_shape, eps=1e-5):
    if x.dtype == torch.float64:  # PyTorch takes fp32 parameters with fp32/bf16/fp16 input only
        weight, bias = weight.double(), bias.double()
    return residual + F.layer_norm(x, norm_shape, weight, bias, eps)


def _torch_rms_norm(x, residual, weight, norm_shape, eps=1e-6, offset=0.0, cast_before_weight=False):
    """transformers' formulas (Llama's, Gemma's) and F.rms_norm's, then the addition."""
    stats = torch.float64 if x.dtype == torch.float64 else torch.float32
    dims = tuple(range(-len(norm_shape), 0))
    h = x.to(stats)
    h = h * torch.rsqrt(h.pow(2).mean(dims, keepdim=True) + eps)
    if cast_before_weight:
        return residual + weight * h.to(x.dtype)
    return residual + (h * (offset + weight.to(stats))).to(x.dtype)


def _double(*tensors):
    return [t.double() for t in tensors]


def _check(ours, theirs, reference):
    """Each result against PyTorch's and float64's; the gradients of fp32 parameters of bf16/fp16
    rows carry those rows' rounding: judged as low-precision results (within a factor of PyTorch's
    error)."""
    assert [t.dtype for t in ours] == [t.dtype for t in theirs]
    low_precision = ours[1].dtype in (torch.bfloat16, torch.float16)  # x's gradient: x's dtype
    for o, t, r in zip(ours, theirs, reference):
        if low_precision and o.dtype == torch.float32:
            assert rel_err(o, r) <= max(LOWP_FACTOR * rel_err(t, r), 1e-6), (rel_err(o, r), rel_err(t, r))
        else:
            assert_matches(o, t, r)


@pytest.mark.parametrize("dtypes", RESIDUAL_DTYPES, ids=dtype_pair_id)
@pytest.mark.parametrize("shape,norm_shape", SHAPES)
def test_layer_norm_add_matches_torch(device, shape, norm_shape, dtypes):
    inputs = residual_norm_inputs(shape, norm_shape, dtypes, device)
    ours = _output_and_grads(lambda x, r, w, b: gk.layer_norm_add(x, r, norm_shape, w, b), *inputs)
    theirs = _output_and_grads(lambda *a: _torch_layer_norm(*a, norm_shape), *inputs)
    reference = _output_and_grads(lambda *a: _torch_layer_norm(*a, norm_shape), *_double(*inputs))
    _check(ours, theirs, reference)
    assert torch.equal(ours[2], theirs[2])  # the residual's gradient: the output's, in its dtype


@pytest.mark.parametrize("dtypes", RESIDUAL_DTYPES, ids=dtype_pair_id)
@pytest.mark.parametrize(
    "shape,norm_shape,variant",
    # transformers' RMSNorms normalise the last dim; of one feature, x's gradient is all cancellation (0
    # without eps), its last fp16 digits the backward formula's own (rms_norm's tests cover it there)
    [
        (*shapes, variant)
        for shapes in SHAPES
        for variant in sorted(VARIANTS)
        if variant == "plain" or (len(shapes[1]) == 1 and shapes[1] != (1,))
    ],
)
def test_rms_norm_add_matches_torch(device, shape, norm_shape, dtypes, variant):
    options = VARIANTS[variant]
    inputs = residual_norm_inputs(shape, norm_shape, dtypes, device, weight_scale=0.1 if "offset" in options else 1)[:3]
    ours = _output_and_grads(lambda x, r, w: gk.rms_norm_add(x, r, norm_shape, w, 1e-6, **options), *inputs)
    theirs = _output_and_grads(lambda x, r, w: _torch_rms_norm(x, r, w, norm_shape, **options), *inputs)
    reference = _output_and_grads(lambda x, r, w: _torch_rms_norm(x, r, w, norm_shape, **options), *_double(*inputs))
    _check(ours, theirs, reference)


@pytest.mark.parametrize("dtypes", RESIDUAL_DTYPES[:4], ids=dtype_pair_id)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("features", [300, 9000])
def test_the_sum_of_our_norm_and_the_residual_bit_for_bit(device, dtypes, variant, features):
    """The norm's result rounded as our norm alone returns it, then PyTorch's addition: the same
    output as ``residual + gk.rms_norm(x)`` (``gk.layer_norm``), and the same gradients. Where the
    sum is wider than the norm's result (bf16 x, fp32 residual), the norm's backward reads the
    sum's gradient as it is, where autograd would round it to the norm's dtype first: x's and the
    weight's gradients then are those of the norm's result in the sum's dtype (``out_dtype``)."""
    x, residual, weight, bias = residual_norm_inputs((7, features), (features,), dtypes, device)
    options = VARIANTS[variant]
    pairs = [
        (
            lambda x, r, w: gk.rms_norm_add(x, r, features, w, 1e-6, **options),
            lambda x, r, w, out_dtype=None: r + gk.rms_norm(x, features, w, 1e-6, **options, out_dtype=out_dtype),
            (x, residual, weight),
            gk.rms_norm(x, features, weight, 1e-6, **options).dtype,
        ),
        (
            lambda x, r, w, b: gk.layer_norm_add(x, r, features, w, b),
            lambda x, r, w, b, out_dtype=None: r + gk.layer_norm(x, features, w, b, out_dtype=out_dtype),
            (x, residual, weight, bias),
            gk.layer_norm(x, features, weight, bias).dtype,
        ),
    ]
    for fused, apart, inputs, norm_dtype in pairs:
        ours, theirs = _output_and_grads(fused, *inputs), _output_and_grads(apart, *inputs)
        assert [t.dtype for t in ours] == [t.dtype for t in theirs]
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[2], theirs[2])  # the sum; residual's gradient
        if ours[0].dtype != norm_dtype:
            theirs = _output_and_grads(lambda *a: apart(*a, out_dtype=ours[0].dtype), *inputs)
        for o, t in zip(ours[1:], theirs[1:]):
            assert torch.equal(o, t)


def test_autocast_adds_the_norms_fp32_result_unless_told_to_round(device):
    """Under autocast the plain norm's result is fp32 (as the norm alone), added unrounded; an
    input-dtype ``norm_dtype`` (OLMo 2's norm) rounds it to bf16 first: each as the norm apart."""
    x, residual, weight, bias = residual_norm_inputs((4, 64), (64,), (torch.bfloat16, torch.float32), device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        plain = gk.rms_norm_add(x, residual, 64, weight)
        plain_apart = residual + gk.rms_norm(x, 64, weight)
        rounded = gk.rms_norm_add(x, residual, 64, weight, norm_dtype=torch.bfloat16)
        rounded_apart = residual + gk.rms_norm(x, 64, weight, out_dtype=torch.bfloat16)
        centred = gk.layer_norm_add(x, residual, 64, weight, bias)
        centred_apart = residual + gk.layer_norm(x, 64, weight, bias)
    assert torch.equal(plain, plain_apart) and torch.equal(rounded, rounded_apart)
    assert torch.equal(centred, centred_apart)
    assert not torch.equal(plain, rounded)


def test_gradcheck(device):
    inputs = [t.double().requires_grad_() for t in residual_norm_inputs((3, 2, 5), (5,), (torch.float64,) * 2, device)]
    assert gradcheck(lambda x, r, w, b: gk.layer_norm_add(x, r, 5, w, b), inputs)
    assert gradcheck(lambda x, r, w: gk.rms_norm_add(x, r, 5, w, cast_before_weight=True), inputs[:3])
    assert gradcheck(lambda x, r, w: gk.rms_norm_add(x, r, 5, w, offset=1.0), inputs[:3])


def test_bad_arguments_are_named():
    x = torch.randn(4, 8)
    with pytest.raises(ArgumentError, match="residual must have shape"):
        gk.layer_norm_add(x, torch.randn(4, 1), 8)
    with pytest.raises(ArgumentTypeError, match="residual must be"):
        gk.rms_norm_add(x, torch.ones(4, 8, dtype=torch.int64), 8)
    with pytest.raises(ArgumentTypeError, match="residual must be a torch.Tensor"):
        gk.rms_norm_add(x, 1.0, 8)
    with pytest.raises(ArgumentError, match="norm_dtype must be input's dtype"):
        gk.rms_norm_add(x, x, 8, norm_dtype=torch.bfloat16)
    with pytest.raises(ArgumentError, match="from a torch.float64 weight with cast_before_weight"):
        gk.rms_norm_add(x, x, 8, torch.ones(8, dtype=torch.float64), cast_before_weight=True)
    with pytest.raises(ArgumentTypeError, match="norm_dtype must be a torch.dtype"):
        gk.layer_norm_add(x, x, 8, norm_dtype="bfloat16")
    with pytest.raises(ArgumentError, match="offset"):
        gk.rms_norm_add(x, x, 8, offset=1.0)
    with pytest.raises(ArgumentError, match="eps"):
        gk.layer_norm_add(x, x, 8, eps=-1.0)
