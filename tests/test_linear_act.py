import math

import pytest
import torch
import torch.nn.functional as F

import gpukernels as gk
from gpukernels.ops.linear_act import linear_act, linear_act_bwd, linear_act_fwd
from helpers import TORCH_ACTIVATIONS, assert_matches, gradcheck

pytestmark = pytest.mark.family("linear_act")  # conftest's device fixture skips backends without them

ACTIVATIONS = list(TORCH_ACTIVATIONS)
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def torch_linear_act(x, weight, bias=None, activation="none"):
    return TORCH_ACTIVATIONS[activation](F.linear(x, weight, bias))


def _randn(shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=g, dtype=torch.float64)


def _problem(x_shape, out_features, has_bias=True, device="cpu"):
    """fp64 x, weight, bias scaled as nn.Linear initialises, so z is O(1) whatever in_features is."""
    in_features = x_shape[-1]
    weight = _randn((out_features, in_features), in_features**-0.5, seed=1).to(device)
    bias = _randn((out_features,), seed=2).to(device) if has_bias else None
    return _randn(x_shape, seed=0).to(device), weight, bias


def _output_and_grads(fn, x, weight, bias, activation, upstream):
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias) if t is not None]
    y = fn(*leaves, *([] if bias is not None else [None]), activation=activation)
    grads = torch.autograd.grad(y, leaves, upstream.to(y.dtype))
    return [y.detach(), *grads]


def _compare(x, weight, bias, activation, dtype):
    """Ours against PyTorch in ``dtype`` and against PyTorch in fp64; returns the errors."""
    # the reference sees the very values ours and PyTorch's see, rounded to dtype
    upstream = _randn(x.shape[:-1] + weight.shape[:1], seed=3).to(x.device, dtype).double()
    cast = [None if t is None else t.to(dtype) for t in (x, weight, bias)]
    ours = _output_and_grads(linear_act, *cast, activation, upstream)
    theirs = _output_and_grads(torch_linear_act, *cast, activation, upstream)
    reference = _output_and_grads(
        torch_linear_act, *(None if t is None else t.double() for t in cast), activation, upstream
    )
    return [assert_matches(o, t, r) for o, t, r in zip(ours, theirs, reference)]


SIZES = [(1, 1), (1, 3), (3, 17), (17, 1), (17, 17), (1000, 3), (3, 1000)]


@pytest.mark.parametrize("in_features, out_features", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_torch(device, activation, dtype, in_features, out_features):
    _compare(*_problem((5, in_features), out_features, device=device), activation, dtype)


# fp32 is left out: its 1e-6 atol is below the rounding noise of sums over
# 90-1100 terms, where ours and PyTorch's differ only in summation order.
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_more_than_one_tile_in_every_dim(device, activation, dtype):
    """The backward's dz pass spans several (BLOCK_ROWS, BLOCK_COLS) tiles each way,
    none a multiple of the tile, so dbias sums several rows of partial column sums."""
    rows, in_features, out_features = (150, 130, 270) if device.type == "cpu" else (1100, 520, 270)
    _compare(*_problem((rows, in_features), out_features, device=device), activation, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_without_bias_on_3d_input(device, activation, dtype):
    _compare(*_problem((2, 3, 17), 6, has_bias=False, device=device), activation, dtype)


# exp(-z) -> inf for very negative z is the right limit (sigmoid -> 0); the
# Triton interpreter computes it with NumPy, which warns.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_extreme_pre_activations(device, activation):
    x = torch.tensor([[-1000.0], [-30.0], [-1e-3], [0.0], [1e-3], [30.0], [1000.0]], dtype=torch.float64, device=device)
    weight, bias = (
        torch.ones(1, 1, dtype=torch.float64, device=device),
        torch.zeros(1, dtype=torch.float64, device=device),
    )
    for dtype in (torch.float64, torch.float32):
        _compare(x, weight, bias, activation, dtype)


def test_relu_passes_the_gradient_of_a_nan(device):
    """relu's backward is PyTorch's threshold_backward: 0 where the output is <= 0, the
    gradient elsewhere, a nan output's included (the nan row of x gets the weight's column
    sums; with the gradient dropped there, zeros)."""
    x = torch.tensor([[math.nan, 1.0], [-1.0, 2.0]], device=device)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 2.0]], device=device)
    grads = [
        _output_and_grads(fn, x, weight, None, "relu", torch.ones(2, 3, device=device))[1:]
        for fn in (linear_act, torch_linear_act)
    ]
    assert grads[1][0][0].tolist() == [2.0, 3.0]
    torch.testing.assert_close(grads[0], grads[1], equal_nan=True, rtol=0, atol=0)


def test_relu_squared_drops_the_gradient_where_z_is_not_positive_whatever_it_is(device):
    """relu_squared's backward is PyTorch's for relu(z).square(): square's 2 relu(z) dy, then
    relu's threshold_backward, 0 where relu(z) <= 0 even for an inf or nan dy there (2 * 0 *
    inf would be nan); a nan z passes its nan on."""
    x = torch.tensor([[1.0], [math.nan]], device=device)
    weight = torch.tensor([[-1.0], [2.0]], device=device)  # z = [-1, 2] on the first row
    dy = torch.tensor([[math.inf, 1.0], [1.0, 1.0]], device=device)
    ours, theirs = (
        _output_and_grads(fn, x, weight, None, "relu_squared", dy)[1:] for fn in (linear_act, torch_linear_act)
    )
    assert theirs[0][0].tolist() == [8.0]  # 4 * 2 from z = 2 alone
    torch.testing.assert_close(ours, theirs, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("x_shape", [(0, 17), (2, 0, 17)])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_empty_batch(device, activation, x_shape):
    x, weight, bias = _problem(x_shape, 4, device=device)
    y, dx, dweight, dbias = _output_and_grads(
        linear_act, x, weight, bias, activation, torch.zeros(x_shape[:-1] + (4,), device=device)
    )
    assert y.shape == x_shape[:-1] + (4,) and dx.shape == x_shape
    assert torch.equal(dweight, torch.zeros_like(weight)) and torch.equal(dbias, torch.zeros_like(bias))


@pytest.mark.parametrize("activation", ["silu", "relu"])
def test_non_contiguous_input(device, activation):
    x, weight, bias = _problem((6, 18), 5, device=device)
    x, weight = x[:, ::2], weight[:, ::2]
    assert not x.is_contiguous() and not weight.is_contiguous()
    _compare(x, weight, bias, activation, torch.float32)


@pytest.mark.parametrize("activation", ["gelu_tanh", "relu"])
def test_transposed_weight_is_read_in_place(device, activation):
    """transformers' Conv1D stores its weight (in, out) and calls with weight.t(): the op
    keeps that view for the backward, not a contiguous copy, and its gradient reaches
    the stored weight laid out as it is."""
    x, weight, bias = _problem((6, 5), 4, device=device)
    stored = weight.float().t().contiguous().requires_grad_()  # (in, out), as Conv1D holds it
    saved = []

    def keep(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        y = linear_act(x.float(), stored.t(), bias.float(), activation)
    assert any(t.untyped_storage().data_ptr() == stored.untyped_storage().data_ptr() for t in saved)
    y.backward(torch.ones_like(y))
    reference = stored.detach().clone().requires_grad_()
    torch_linear_act(x.float(), reference.t(), bias.float(), activation).backward(torch.ones_like(y))
    assert_matches(y, torch_linear_act(x.float(), reference.t(), bias.float(), activation))
    assert_matches(stored.grad, reference.grad)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck(device, activation):
    x, weight, bias = (t.requires_grad_() for t in _problem((2, 3, 4), 3, device=device))
    assert gradcheck(lambda *args: linear_act(*args, activation=activation), (x, weight, bias))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_opcheck(device, activation):
    x, weight, bias = (t.float().requires_grad_() for t in _problem((4, 5), 3, device=device))
    backend = gk.backend_name(device)
    torch.library.opcheck(linear_act_fwd.custom_op, (x, weight, bias, activation, backend))
    torch.library.opcheck(linear_act_fwd.custom_op, (x, weight, None, activation, backend))
    y, z = linear_act_fwd(x, weight, bias, activation)
    saved = y if activation == "relu" else z
    for has_bias in (True, False):
        dy = torch.randn(4, 3, device=device)
        torch.library.opcheck(
            linear_act_bwd.custom_op, (dy, x.detach(), weight.detach(), saved.detach(), activation, has_bias, backend)
        )


@pytest.mark.parametrize("activation", ["none", "relu", "silu"])
def test_saves_only_what_the_backward_needs(device, activation):
    x, weight, bias = (t.float() for t in _problem((4, 5), 3, device=device))
    _, z = linear_act_fwd(x, weight, bias, activation)
    assert z.numel() == (0 if activation in ("none", "relu") else 12)


@pytest.mark.parametrize("activation", ["relu", "gelu_tanh"])
def test_autocast_bf16(device, activation):
    x, weight, bias = (t.float() for t in _problem((6, 17), 5, device=device))
    upstream = _randn((6, 5), seed=3).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        ours = _output_and_grads(linear_act, x, weight, bias, activation, upstream)
        theirs = _output_and_grads(torch_linear_act, x, weight, bias, activation, upstream)
    reference = _output_and_grads(torch_linear_act, x.double(), weight.double(), bias.double(), activation, upstream)
    assert [t.dtype for t in ours] == [t.dtype for t in theirs] == [torch.bfloat16] + 3 * [torch.float32]
    # the gradients are fp32 casts of bf16 results: judge them as bf16
    for o, t, r in zip(ours, theirs, reference):
        assert_matches(o.bfloat16(), t.bfloat16(), r)


def test_autocast_leaves_fp64_alone(device):
    x, weight, bias = _problem((3, 4), 2, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        assert linear_act(x, weight, bias, "gelu").dtype == torch.float64


def test_compiles_without_graph_breaks(device):
    x, weight, bias = (t.float() for t in _problem((2, 3, 7), 5, device=device))
    upstream = _randn((2, 3, 5), seed=3).to(device)
    compiled = torch.compile(linear_act, fullgraph=True, backend="aot_eager")
    ours = _output_and_grads(compiled, x, weight, bias, "silu", upstream)
    theirs = _output_and_grads(torch_linear_act, x, weight, bias, "silu", upstream)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t)


def _bad(**overrides):
    args = dict(x=torch.randn(2, 4), weight=torch.randn(3, 4), bias=torch.randn(3))
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (_bad(activation="tanh"), ValueError, "activation .*'tanh'"),
        (_bad(weight=torch.randn(4)), ValueError, "weight must be 2-D"),
        (_bad(weight=torch.randn(3, 5)), ValueError, r"x of shape \(2, 4\) and weight of shape \(3, 5\)"),
        (_bad(x=torch.tensor(1.0)), ValueError, "x of shape"),
        (_bad(bias=torch.randn(4)), ValueError, "bias"),
        (_bad(weight=torch.randn(3, 4, dtype=torch.float64)), RuntimeError, "x and weight must have the same dtype"),
        (_bad(bias=torch.randn(3, dtype=torch.float64)), RuntimeError, "x and bias must have the same dtype"),
        (_bad(weight=torch.randn(3, 4, device="meta")), RuntimeError, "weight is on meta"),
        (_bad(bias=torch.randn(3, device="meta")), RuntimeError, "bias is on meta"),
        (_bad(x=torch.ones(2, 4, dtype=torch.long)), TypeError, "x must be"),
        (_bad(weight=torch.ones(3, 4, dtype=torch.long)), TypeError, "weight must be"),
        (_bad(bias=torch.ones(3, dtype=torch.long)), TypeError, "bias must be"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        linear_act(**kwargs)
