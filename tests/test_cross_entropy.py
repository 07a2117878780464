import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import gpukernels as gk
from gpukernels._numerics import row_stats
from gpukernels.ops.cross_entropy import (
    cross_entropy,
    cross_entropy_bwd,
    cross_entropy_fwd,
    cross_entropy_probs_bwd,
    cross_entropy_probs_fwd,
)
from helpers import LOOPED_CLASSES, PIPELINED_LOOPED_CLASSES, SMALL_BLOCK, assert_matches, gradcheck

pytestmark = pytest.mark.family("cross_entropy")  # conftest's device fixture skips backends without them

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _logits(shape, dtype=torch.float64, scale=3.0, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(device, dtype)


def _targets(shape, classes, ignored=(), ignore_index=-100, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, classes, shape, generator=g)
    target.view(-1)[list(ignored)] = ignore_index
    return target.to(device)


def _upstream(shape, device):
    return torch.randn(shape, dtype=torch.float64).to(device)


def _loss_and_grad(fn, x, target, upstream=None, **kwargs):
    """The loss of ``fn`` and d(upstream . loss)/dx (upstream 1 for reduced losses)."""
    x = x.detach().requires_grad_()
    loss = fn(x, target, **kwargs)
    up = torch.ones_like(loss) if upstream is None else upstream.to(loss.dtype)
    (grad,) = torch.autograd.grad(loss, x, up)
    return loss.detach(), grad


def _compare(x, target, upstream=None, **kwargs):
    """Ours against PyTorch in x's dtype and against PyTorch in fp64 on the same (rounded)
    values; returns the errors."""
    upstream = None if upstream is None else upstream.to(x.dtype).double()
    ours = _loss_and_grad(cross_entropy, x, target, upstream, **kwargs)
    theirs = _loss_and_grad(F.cross_entropy, x, target, upstream, **kwargs)
    weight64 = None if kwargs.get("weight") is None else kwargs["weight"].double()
    reference = _loss_and_grad(F.cross_entropy, x.double(), target, upstream, **{**kwargs, "weight": weight64})
    return [assert_matches(o, t, r) for o, t, r in zip(ours, theirs, reference)]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("classes", [1, 3, 17, 1000, 4097])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torch(device, dtype, classes, reduction):
    x = _logits((6, classes), dtype, device=device)
    target = _targets((6,), classes, ignored=[2], device=device)
    upstream = _upstream(6, device) if reduction == "none" else None
    _compare(x, target, upstream, reduction=reduction)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_weights_and_smoothing_on_4d_input(device, dtype, reduction, weighted, label_smoothing):
    x = _logits((2, 5, 3, 4), dtype, device=device)
    target = _targets((2, 3, 4), 5, ignored=[0, 7, 23], device=device)
    weight = torch.rand(5, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(device, dtype) + 0.1
    upstream = _upstream((2, 3, 4), device) if reduction == "none" else None
    _compare(
        x, target, upstream, weight=weight if weighted else None, reduction=reduction, label_smoothing=label_smoothing
    )


def _spec_loss(x, target, weight, ignore_index, e):
    """The loss's formula, written out in fp64 for a (N, C) input."""
    logp = torch.log_softmax(x.double(), dim=1)
    kept = target != ignore_index
    safe = torch.where(kept, target, 0)
    w_t = torch.where(kept, weight[safe], 0)
    per_row = -(1 - e) * w_t * logp.gather(1, safe[:, None])[:, 0] - e / x.shape[1] * (logp * weight).sum(1)
    return torch.where(kept, per_row, 0), w_t


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_spec_formula(device, dtype):
    x = _logits((9, 7), dtype, device=device)
    target = _targets((9,), 7, ignored=[1, 4], device=device)
    weight = torch.linspace(0.2, 2.0, 7, dtype=torch.float64, device=device)
    per_row, w_t = _spec_loss(x, target, weight, -100, 0.2)
    kwargs = dict(weight=weight.to(dtype), label_smoothing=0.2)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cross_entropy(x, target, reduction="none", **kwargs).double(), per_row, **tol)
    torch.testing.assert_close(cross_entropy(x, target, **kwargs).double(), per_row.sum() / w_t.sum(), **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_single_class_gives_exact_zeros(device, dtype):
    x = _logits((5, 1), dtype, device=device)
    weight = torch.tensor([0.3], dtype=dtype, device=device)
    for reduction in ("mean", "sum", "none"):
        for t in _loss_and_grad(
            cross_entropy,
            x,
            torch.zeros(5, dtype=torch.long, device=device),
            weight=weight,
            reduction=reduction,
            label_smoothing=0.1,
        ):
            assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("ignore_index", [2, -1, 10**9])
def test_custom_ignore_index(device, ignore_index):
    x = _logits((8, 5), torch.float64, device=device)
    target = _targets((8,), 5, ignored=[0, 3, 5], ignore_index=ignore_index, device=device)
    for reduction in ("mean", "sum", "none"):
        upstream = _upstream(8, device) if reduction == "none" else None
        _compare(x, target, upstream, ignore_index=ignore_index, reduction=reduction, label_smoothing=0.1)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_all_rows_ignored(device, dtype, weighted):
    x = _logits((4, 6), dtype, device=device)
    target = torch.full((4,), -100, device=device)
    weight = torch.rand(6, dtype=dtype, device=device) if weighted else None
    loss, grad = _loss_and_grad(cross_entropy, x, target, weight=weight, label_smoothing=0.1)
    assert loss.dtype == dtype and torch.isnan(loss)
    assert torch.equal(grad, torch.zeros_like(x))
    for reduction in ("sum", "none"):
        ours = _loss_and_grad(cross_entropy, x, target, weight=weight, reduction=reduction, label_smoothing=0.1)
        assert all(torch.equal(t, torch.zeros_like(t)) for t in ours)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rows_kept_of_class_weight_zero(device, dtype, label_smoothing):
    """Every row kept has a class weight of 0: the mean's denominator is 0 and the loss nan,
    as PyTorch's, with label smoothing too (whose sum over the classes is not 0: not inf);
    no gradient (0), as with every row ignored."""
    x = _logits((4, 6), dtype, device=device)
    target = torch.tensor([0, 0, -100, 0], device=device)
    weight = torch.tensor([0.0, 1.0, 1.0, 2.0, 1.0, 1.0], dtype=dtype, device=device)
    loss, grad = _loss_and_grad(cross_entropy, x, target, weight=weight, label_smoothing=label_smoothing)
    assert loss.dtype == dtype and torch.isnan(loss)
    assert torch.isnan(F.cross_entropy(x, target, weight=weight, label_smoothing=label_smoothing))
    assert torch.equal(grad, torch.zeros_like(x))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(device, reduction):
    x = torch.randn(0, 5, device=device, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long, device=device)
    ours, theirs = cross_entropy(x, target, reduction=reduction), F.cross_entropy(x, target, reduction=reduction)
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    ours.sum().backward()
    assert x.grad.shape == (0, 5)


def test_one_dim_input(device):
    x = _logits((11,), torch.float64, device=device)
    for reduction in ("mean", "none"):
        upstream = torch.tensor(0.7, dtype=torch.float64, device=device)
        _compare(x, torch.tensor(4, device=device), upstream, reduction=reduction, label_smoothing=0.3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_large_and_masked_logits_are_stable(device, dtype):
    x = _logits((4, 9), dtype, scale=1000.0, device=device) + 10_000.0
    target = _targets((4,), 9, device=device)
    x[0, (target[0] + 1) % 9] = -math.inf  # a masked class, as in vocabulary masking
    upstream = _logits((4,), scale=1.0, seed=5, device=device)
    assert all(t.isfinite().all() for t in _loss_and_grad(cross_entropy, x, target, upstream, reduction="none"))
    _compare(x, target, upstream, reduction="none")


def test_smoothing_over_logits_too_far_apart_gives_pytorchs_inf_loss_without_warnings(device):
    """Smoothing sums every class's log-probability: logits whose sum overflows fp32 make that
    row's loss inf, as PyTorch's, with no floating-point warning on the way."""
    x = _logits((3, 9), torch.float32, device=device)
    x[0] = -3e38
    x[0, 0] = 0.0
    target = _targets((3,), 9, device=device)
    with warnings.catch_warnings():
        if gk.backend_name(device) != "triton":  # the interpreter's NumPy warns as it runs a GPU's arithmetic
            warnings.simplefilter("error")
        ours = cross_entropy(x, target, reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(ours, F.cross_entropy(x, target, reduction="none", label_smoothing=0.1))
    assert ours[0] == math.inf


def test_large_logits_with_smoothing_are_stable(device):
    """The smoothing term's sum over the row, far from 0 (no class masked: it would make the loss inf)."""
    x = _logits((4, 9), torch.float32, scale=300.0, device=device) + 10_000.0
    upstream = _logits((4,), scale=1.0, seed=5, device=device)
    _compare(x, _targets((4,), 9, device=device), upstream, reduction="none", label_smoothing=0.1)


@pytest.mark.parametrize("probabilities", [False, True])
def test_many_rows(device, probabilities):
    """600 rows: the reduction takes steps of rows (256 at a time on Triton with 5 classes),
    the last one partial."""
    x = _logits((600, 5), torch.float32, device=device)
    target = (
        _probs((600, 5), torch.float32, device=device)
        if probabilities
        else _targets((600,), 5, ignored=range(0, 600, 7), device=device)
    )
    weight = torch.linspace(0.5, 2.0, 5, device=device)
    _compare(x, target, weight=weight, label_smoothing=0.1)


def test_int32_target(device):
    x = _logits((5, 9), torch.float32, device=device)
    target = _targets((5,), 9, device=device)
    torch.testing.assert_close(cross_entropy(x, target.int()), F.cross_entropy(x, target))


@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
def test_non_contiguous_input(device, layout):
    if layout == "transposed":
        x, target = _logits((7, 6), device=device).t(), _targets((6,), 7, device=device)
    else:
        x = _logits((2, 5, 3, 4), device=device).to(memory_format=torch.channels_last)
        target = _targets((2, 3, 4), 5, device=device)
    assert not x.is_contiguous()
    _compare(x, target, weight=torch.rand(x.shape[1], dtype=torch.float64, device=device), label_smoothing=0.05)


@pytest.mark.parametrize("rows", ["padded", "broadcast", "overlapping"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_rows_any_stride_apart(device, dtype, rows):
    """(N, C) logits whose rows are contiguous but not adjacent: a padded vocabulary
    sliced to the real one (its padding nan, which no read may reach), read where it is;
    one row broadcast to every row (stride 0) and rows that overlap (one element apart),
    which the kernels, reading and writing a row up to its stride, get as a copy."""
    classes = 37
    if rows == "padded":
        buffer = _logits((6, classes + 11), dtype, device=device)
        buffer[:, classes:] = math.nan
        x = buffer[:, :classes]
    elif rows == "broadcast":
        x = _logits((1, classes), dtype, device=device).expand(6, classes)
    else:
        x = _logits((6 + classes - 1,), dtype, device=device).unfold(0, classes, 1)
    assert x.stride(1) == 1 and not x.is_contiguous()
    target = _targets((6,), classes, ignored=[2], device=device)
    weight = torch.rand(classes, dtype=torch.float64, device=device).to(dtype) + 0.1
    for reduction in ("mean", "none"):
        upstream = _upstream(6, device) if reduction == "none" else None
        _compare(x, target, upstream, weight=weight, reduction=reduction, label_smoothing=0.05)
    backend = gk.backend_name(device)
    torch.library.opcheck(cross_entropy_fwd.custom_op, (x, target, weight, -100, 0.05, "mean", None, backend))


@pytest.mark.parametrize("shape", [(6,), (3, 2)])
def test_strided_class_indices(device, shape):
    """Class indices that step over elements (a view of every other one, (N,) or (N, d1))
    are read as such."""
    x = _logits((shape[0], 7, *shape[1:]), device=device)
    target = _targets((*shape[:-1], 2 * shape[-1]), 7, device=device)[..., ::2]
    assert not target.is_contiguous()
    _compare(x, target, weight=torch.rand(7, dtype=torch.float64, device=device), label_smoothing=0.05)


def test_forward_saves_the_rows_logsumexp_statistics(device):
    x = _logits((4, 7), torch.float64, scale=300.0, device=device) + 1e4
    target = _targets((4,), 7, ignored=[2], device=device)
    weight = torch.linspace(0.5, 2.0, 7, dtype=torch.float64, device=device)
    _, stats = cross_entropy_fwd(x, target, weight, -100, 0.0, "mean", None)
    assert stats.shape == (2 * 4 + 2,)
    row_max, log_sum, totals = row_stats(stats, 4)
    want_max = x.max(dim=1).values
    torch.testing.assert_close(row_max, want_max, rtol=0, atol=0)
    torch.testing.assert_close(log_sum, torch.logsumexp(x - want_max[:, None], dim=1), rtol=1e-14, atol=0)
    kept = target != -100
    torch.testing.assert_close(totals, torch.stack([weight[target[kept]].sum(), weight.sum()]), rtol=1e-14, atol=0)
    _, stats = cross_entropy_fwd(x, target, None, -100, 0.1, "none", None)
    torch.testing.assert_close(row_stats(stats, 4)[2], torch.tensor([3.0, 7.0], dtype=torch.float64, device=device))


def test_no_grad_matches_torch(device):
    x = _logits((4, 7), torch.float64, device=device).requires_grad_()
    target = _targets((4,), 7, device=device)
    with torch.no_grad():
        torch.testing.assert_close(cross_entropy(x, target), F.cross_entropy(x, target))


def test_autocast_runs_in_fp32(device):
    x = _logits((6, 10), torch.bfloat16, device=device).requires_grad_()
    target = _targets((6,), 10, device=device)
    saved = []

    def keep(t):
        saved.append(t)
        return t

    with torch.autocast(device.type, dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(keep, keep):
        ours, theirs = cross_entropy(x, target), F.cross_entropy(x, target)
        assert cross_entropy(x.double(), target).dtype == torch.float64
    assert ours.dtype == theirs.dtype == torch.float32
    # fp32 math on the bf16 logits; PyTorch's CUDA autocast rounds on the way (1e-3 off here)
    torch.testing.assert_close(ours, F.cross_entropy(x.float(), target))
    # the logits read and kept as they are (no fp32 copy), the gradient in their dtype, as autocast's copy gives it
    assert saved[0] is x
    (grad,) = torch.autograd.grad(ours, x)
    (want,) = torch.autograd.grad(F.cross_entropy(x.float(), target), x)
    assert grad.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(grad, want, rtol=8e-3, atol=1e-5)


def test_autocast_with_class_weights(device):
    """Class weights take PyTorch's autocast way: logits and weights in fp32; fp64
    weights beside the fp32 logits are refused as PyTorch refuses them (they were
    once dropped without a word)."""
    x = _logits((6, 10), torch.bfloat16, device=device)
    target = _targets((6,), 10, ignored=[1], device=device)
    weight = torch.linspace(0.5, 2.0, 10, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        ours = cross_entropy(x, target, weight=weight.bfloat16())
        with pytest.raises(TypeError, match="weight must have input's dtype"):
            cross_entropy(x, target, weight=weight.double())
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, F.cross_entropy(x.float(), target, weight=weight.bfloat16().float()))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("probabilities", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_out_dtype(device, out_dtype, probabilities, reduction):
    """The loss in ``out_dtype``, rounded once from the statistics dtype's sums; the
    gradient as without it, in the logits' dtype."""
    x = _logits((6, 10), torch.bfloat16, device=device)
    target = _probs((6, 10), torch.bfloat16, device=device) if probabilities else _targets((6,), 10, device=device)
    upstream = _upstream(6, device).to(out_dtype) if reduction == "none" else None
    loss, grad = _loss_and_grad(cross_entropy, x, target, upstream, reduction=reduction, out_dtype=out_dtype)
    plain_loss, plain_grad = _loss_and_grad(cross_entropy, x, target, upstream, reduction=reduction)
    assert loss.dtype == out_dtype and grad.dtype == torch.bfloat16
    target64 = target.double() if probabilities else target
    reference = F.cross_entropy(x.double(), target64, reduction=reduction)
    rounding = max(torch.finfo(out_dtype).eps, 1e-6)  # one rounding, or the fp32 sums' error
    torch.testing.assert_close(loss.double(), reference, rtol=rounding, atol=0)
    if reduction == "mean":  # the same upstream 1: the same gradient, bit for bit
        torch.testing.assert_close(grad, plain_grad, rtol=0, atol=0)
    else:  # an upstream in out_dtype, which the plain call rounds to bf16
        torch.testing.assert_close(grad, plain_grad, rtol=8e-3, atol=1e-5)
    torch.testing.assert_close(plain_loss, loss.to(plain_loss.dtype), rtol=8e-3, atol=0)


def test_out_dtype_must_be_floating():
    x, target = _logits((3, 4)), _targets((3,), 4)
    with pytest.raises(TypeError, match="out_dtype"):
        cross_entropy(x, target, out_dtype=torch.int64)
    with pytest.raises(TypeError, match="out_dtype"):
        cross_entropy(x, target, out_dtype="float32")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck(device, reduction):
    x = _logits((5, 4), torch.float64, scale=1.0, device=device).requires_grad_()
    target = _targets((5,), 4, ignored=[3], device=device)
    weight = torch.rand(4, dtype=torch.float64, device=device) + 0.5
    assert gradcheck(lambda x: cross_entropy(x, target, weight=weight, reduction=reduction, label_smoothing=0.2), (x,))


def test_opcheck(device):
    x = _logits((5, 4), torch.float32, device=device).requires_grad_()
    target = _targets((5,), 4, ignored=[1], device=device)
    backend = gk.backend_name(device)
    for weight in (None, torch.rand(4, device=device)):
        for reduction in ("mean", "sum", "none"):
            for loss_dtype in (None, torch.float64):
                torch.library.opcheck(
                    cross_entropy_fwd.custom_op, (x, target, weight, -100, 0.1, reduction, loss_dtype, backend)
                )
            _, stats = cross_entropy_fwd(x.detach(), target, weight, -100, 0.1, reduction, None)
            grad_loss = torch.rand(5 if reduction == "none" else (), device=device)
            torch.library.opcheck(
                cross_entropy_bwd.custom_op,
                (grad_loss, x.detach(), target, weight, stats, -100, 0.1, reduction, backend),
            )


def test_compiles_without_graph_breaks(device):
    x = _logits((6, 5), torch.float32, device=device)
    target = _targets((6,), 5, ignored=[2], device=device)
    compiled = torch.compile(cross_entropy, fullgraph=True, backend="aot_eager")
    ours = _loss_and_grad(compiled, x, target, label_smoothing=0.1)
    theirs = _loss_and_grad(F.cross_entropy, x, target, label_smoothing=0.1)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t)


def _bad(**overrides):
    args = dict(input=torch.randn(3, 4), target=torch.tensor([0, 1, 2]))
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (_bad(target=torch.tensor([0, 1])), ValueError, "target must have shape"),
        (
            _bad(target=torch.tensor([0.0, 1.0, 2.0])),
            ValueError,
            "target of class probabilities must have input's shape",
        ),
        (_bad(target=torch.ones(3, 4, dtype=torch.long)), ValueError, r"target must have shape \(3,\)"),
        (_bad(target=torch.ones(3, dtype=torch.uint8)), TypeError, "target must hold class indices"),
        (
            _bad(target=torch.full((3, 4), 0.25, dtype=torch.float64)),
            TypeError,
            "target of class probabilities must have input's dtype",
        ),
        (_bad(target=torch.full((3, 4), 0.25), ignore_index=0), ValueError, "ignore_index must be negative"),
        (_bad(target=[0, 1, 2]), TypeError, "target"),
        (_bad(target=torch.tensor([0, 1, 2], device="meta")), RuntimeError, "target is on meta"),
        (_bad(input=torch.ones(3, 4, dtype=torch.long)), TypeError, "input"),
        (_bad(input=torch.tensor(1.0), target=torch.tensor(0)), ValueError, "input"),
        (
            _bad(input=torch.randn(3, 0), target=torch.full((3,), -100)),
            ValueError,
            "input must have at least one class",
        ),
        (_bad(weight=torch.ones(3)), ValueError, "weight"),
        (_bad(weight=torch.ones(4, dtype=torch.float64)), TypeError, "weight"),
        (_bad(weight=torch.ones(4, requires_grad=True)), RuntimeError, "weight"),
        (_bad(reduction="avg"), ValueError, "reduction"),
        (_bad(label_smoothing=1.5), ValueError, "label_smoothing"),
        (_bad(label_smoothing=-0.1), ValueError, "label_smoothing"),
        (_bad(label_smoothing=math.nan), ValueError, "label_smoothing"),
        (_bad(ignore_index=1.5), TypeError, "ignore_index"),
        (_bad(ignore_index=True), TypeError, "ignore_index"),
        (_bad(ignore_index=1 << 63), ValueError, "ignore_index must fit in an int64"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        cross_entropy(**kwargs)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize(
    "target, match", [([0, 1, 4], "target 4"), ([0, -3, 1], "target -3"), ([-100, 7, -100], "target 7")]
)
def test_out_of_range_target(device, target, match, weighted):
    if device.type == "cuda":
        pytest.skip("CUDA reports an out-of-range target as a device-side assert, which ends the CUDA context")
    if gk.backend_name(device) == "cupy":
        pytest.skip("CuPy's flag is CUDA's device-side assert, a RuntimeError on the host build: see test_cupy.py")
    weight = torch.ones(4, device=device) if weighted else None
    with pytest.raises(IndexError, match=match):
        cross_entropy(torch.randn(3, 4, device=device), torch.tensor(target, device=device), weight=weight)


def test_forwards_share_the_streams_counter_and_flag(device):
    """The Triton forward's last program sets the stream's arrival counter back to 0
    and writes the target check's flag on every call: a forward with a bad target
    between good ones fails alone, and each loss is right."""
    if gk.backend_name(device) != "triton" or device.type == "cuda":
        pytest.skip("the Triton backend's flag, read on the host (CPU tensors, the interpreter)")
    from gpukernels.backends.triton._common import arrival_counter

    x = _logits((3, 4), device=device)
    good, bad = torch.tensor([0, 1, 3], device=device), torch.tensor([0, 4, 3], device=device)
    for target in (good, bad, good, bad, good):
        if target is bad:
            with pytest.raises(IndexError, match="target 4"):
                cross_entropy(x, target)
        else:
            assert_matches(cross_entropy(x, target), F.cross_entropy(x, target))
        assert arrival_counter(x.device, results=1)[0].item() == 0


@pytest.mark.parametrize("probabilities", [False, True])
def test_a_forward_after_longer_ones(device, probabilities):
    """The rows' losses go to scratch kept from forward to forward (Triton): a forward
    of fewer rows than the last reads and writes only its own (its statistics' layout,
    the last program's count), with losses and gradients right each time."""
    for rows in (24, 9, 30, 1):
        x = _logits((rows, 5), torch.float64, device=device).requires_grad_()
        target = _probs((rows, 5), device=device) if probabilities else _targets((rows,), 5, device=device)
        for reduction in ("mean", "sum"):
            ours, theirs = (loss(x, target, reduction=reduction) for loss in (cross_entropy, F.cross_entropy))
            assert_matches(ours.detach(), theirs.detach())
            torch.testing.assert_close(torch.autograd.grad(ours, x), torch.autograd.grad(theirs, x))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("classes", [LOOPED_CLASSES, PIPELINED_LOOPED_CLASSES])
def test_looped_column_blocks(device, small_blocks, classes, dtype, reduction, weighted, label_smoothing):
    x = _logits((5, classes), dtype, device=device)
    target = _targets((5,), classes, ignored=[3], device=device)
    target[0] = classes - 1  # in the partial last block
    weight = torch.rand(classes, dtype=torch.float64).to(device, dtype) + 0.1 if weighted else None
    upstream = _upstream(5, device) if reduction == "none" else None
    _compare(x, target, upstream, weight=weight, reduction=reduction, label_smoothing=label_smoothing)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_looped_blocks_with_large_and_masked_logits(device, small_blocks, label_smoothing):
    """The running max starts at -inf over a fully masked first block, then jumps
    by thousands between blocks."""
    x = _logits((3, LOOPED_CLASSES), torch.float32, scale=1000.0, device=device) + 10_000.0
    x[0, :SMALL_BLOCK] = -math.inf
    x[1, SMALL_BLOCK:] += 5000.0
    target = torch.tensor([SMALL_BLOCK + 5, 2, LOOPED_CLASSES - 1], device=device)
    _compare(x, target, _upstream(3, device), reduction="none", label_smoothing=label_smoothing)


# ---- class-probability (soft-label) targets ----


def _probs(shape, dtype=torch.float64, seed=3, device="cpu"):
    """Rows of class probabilities over dim 1 (dim 0 for 1-D), some of them exactly 0."""
    g = torch.Generator().manual_seed(seed)
    class_dim = 0 if len(shape) == 1 else 1
    logits = 2.0 * torch.randn(shape, generator=g, dtype=torch.float64)
    logits[torch.rand(shape, generator=g, dtype=torch.float64) < 0.2] = -math.inf
    probs = torch.softmax(logits, dim=class_dim).nan_to_num(1.0 / shape[class_dim])  # a row all -inf: uniform
    return probs.to(device, dtype)


def _loss_and_grads(fn, x, target, upstream=None, **kwargs):
    """The loss of ``fn`` and d(upstream . loss)/d(x, target) (upstream 1 for reduced losses)."""
    x, target = x.detach().requires_grad_(), target.detach().requires_grad_()
    loss = fn(x, target, **kwargs)
    up = torch.ones_like(loss) if upstream is None else upstream.to(loss.dtype)
    return (loss.detach(), *torch.autograd.grad(loss, (x, target), up))


def _compare_probs(x, target, upstream=None, **kwargs):
    """Loss, d/d logits and d/d target: ours against PyTorch in x's dtype and against PyTorch
    in fp64 on the same (rounded) values; returns the errors."""
    upstream = None if upstream is None else upstream.to(x.dtype).double()
    ours = _loss_and_grads(cross_entropy, x, target, upstream, **kwargs)
    theirs = _loss_and_grads(F.cross_entropy, x, target, upstream, **kwargs)
    weight64 = None if kwargs.get("weight") is None else kwargs["weight"].double()
    reference = _loss_and_grads(
        F.cross_entropy, x.double(), target.double(), upstream, **{**kwargs, "weight": weight64}
    )
    return [assert_matches(o, t, r) for o, t, r in zip(ours, theirs, reference)]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("classes", [1, 3, 17, 1000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_probs_match_torch(device, dtype, classes, reduction):
    x = _logits((6, classes), dtype, device=device)
    upstream = _upstream(6, device) if reduction == "none" else None
    _compare_probs(x, _probs((6, classes), dtype, device=device), upstream, reduction=reduction)


# every dtype on 4-D input; 3-D and 1-D on two each
PROBS_SHAPES = [((2, 5, 3, 4), dtype) for dtype in DTYPES] + [
    ((3, 6, 5), torch.float32),
    ((3, 6, 5), torch.bfloat16),
    ((7,), torch.float64),
    ((7,), torch.float16),
]


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("shape, dtype", PROBS_SHAPES, ids=[f"{s}-{d}" for s, d in PROBS_SHAPES])
def test_probs_with_weights_and_smoothing(device, shape, dtype, reduction, label_smoothing):
    """4-D, 3-D and 1-D input, the class dim 1 (0 for 1-D); PyTorch's mean divides by the
    rows, not by the weights."""
    classes = shape[0 if len(shape) == 1 else 1]
    x = _logits(shape, dtype, device=device)
    weight = torch.rand(classes, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.1
    batch_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    upstream = _upstream(batch_shape, device) if reduction == "none" else None
    _compare_probs(
        x,
        _probs(shape, dtype, device=device),
        upstream,
        weight=weight.to(device, dtype),
        reduction=reduction,
        label_smoothing=label_smoothing,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_probs_match_the_formula(device, dtype):
    """-sum_c w[c] ((1-e) y[c] + e/C) logp[c] per row, the mean over the rows, in fp64."""
    x, y = _logits((9, 7), dtype, device=device), _probs((9, 7), dtype, device=device)
    weight = torch.linspace(0.2, 2.0, 7, dtype=torch.float64, device=device)
    e = 0.3
    per_row = -(weight * ((1 - e) * y.double() + e / 7) * torch.log_softmax(x.double(), dim=1)).sum(1)
    kwargs = dict(weight=weight.to(dtype), label_smoothing=e)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cross_entropy(x, y, reduction="none", **kwargs).double(), per_row, **tol)
    torch.testing.assert_close(cross_entropy(x, y, **kwargs).double(), per_row.mean(), **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_probs_single_class_gives_exact_zeros(device, dtype):
    x = _logits((5, 1), dtype, device=device)
    weight = torch.tensor([0.3], dtype=dtype, device=device)
    for reduction in ("mean", "sum", "none"):
        for t in _loss_and_grads(
            cross_entropy, x, torch.ones_like(x), weight=weight, reduction=reduction, label_smoothing=0.1
        ):
            assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("classes", [LOOPED_CLASSES, PIPELINED_LOOPED_CLASSES])
def test_probs_looped_column_blocks(device, small_blocks, classes, dtype, reduction, weighted):
    x = _logits((4, classes), dtype, device=device)
    weight = torch.rand(classes, dtype=torch.float64).to(device, dtype) + 0.1 if weighted else None
    upstream = _upstream(4, device) if reduction == "none" else None
    _compare_probs(
        x,
        _probs((4, classes), dtype, device=device),
        upstream,
        weight=weight,
        reduction=reduction,
        label_smoothing=0.1,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_probs_large_logits_are_stable(device, dtype):
    x = _logits((4, 9), dtype, scale=1000.0, device=device) + 10_000.0
    y = _probs((4, 9), dtype, device=device)
    upstream = _logits((4,), scale=1.0, seed=5, device=device)
    assert all(t.isfinite().all() for t in _loss_and_grads(cross_entropy, x, y, upstream, reduction="none"))
    _compare_probs(x, y, upstream, reduction="none", label_smoothing=0.1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_probs_empty_batch(device, reduction):
    x = torch.randn(0, 5, device=device, requires_grad=True)
    y = torch.zeros(0, 5, device=device, requires_grad=True)
    ours, theirs = cross_entropy(x, y, reduction=reduction), F.cross_entropy(x, y, reduction=reduction)
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    ours.sum().backward()
    assert x.grad.shape == y.grad.shape == (0, 5)


def test_probs_target_gradient_only_when_asked(device):
    x = _logits((4, 6), torch.float64, device=device).requires_grad_()
    y = _probs((4, 6), device=device)
    (grad,) = torch.autograd.grad(cross_entropy(x, y, label_smoothing=0.1), x)
    torch.testing.assert_close(grad, _loss_and_grads(F.cross_entropy, x, y, label_smoothing=0.1)[1])
    outputs = cross_entropy_probs_fwd(x.detach(), y, None, 0.1, "mean", None)
    grads = cross_entropy_probs_bwd(
        torch.tensor(1.0, dtype=torch.float64, device=device), x.detach(), y, None, *outputs[1:], 0.1, "mean", False
    )
    assert grads[1].numel() == 0
    torch.testing.assert_close(grads[0], grad)
    y.requires_grad_()
    (target_grad,) = torch.autograd.grad(cross_entropy(x.detach(), y, label_smoothing=0.1), y)
    torch.testing.assert_close(target_grad, _loss_and_grads(F.cross_entropy, x, y, label_smoothing=0.1)[2])


def test_probs_saved_statistics(device):
    x, y = _logits((4, 7), device=device), _probs((4, 7), device=device)
    weight = torch.linspace(0.5, 2.0, 7, dtype=torch.float64, device=device)
    _, stats = cross_entropy_probs_fwd(x, y, weight, 0.2, "sum", None)
    assert stats.shape == (3 * 4,)
    row_max, log_sum, target_mass = row_stats(stats, 4)
    torch.testing.assert_close(row_max, x.max(dim=1).values, rtol=0, atol=0)
    torch.testing.assert_close(log_sum, torch.logsumexp(x - row_max[:, None], dim=1), rtol=1e-14, atol=0)
    torch.testing.assert_close(target_mass, (weight * (0.8 * y + 0.2 / 7)).sum(1), rtol=1e-14, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_probs_gradcheck(device, reduction):
    x = _logits((3, 4), scale=1.0, device=device).requires_grad_()
    y = _probs((3, 4), device=device).requires_grad_()
    weight = torch.rand(4, dtype=torch.float64, device=device) + 0.5
    assert gradcheck(lambda x, y: cross_entropy(x, y, weight=weight, reduction=reduction, label_smoothing=0.2), (x, y))


def test_probs_opcheck(device):
    x = _logits((5, 4), torch.float32, device=device).requires_grad_()
    y = _probs((5, 4), torch.float32, device=device).requires_grad_()
    weight = torch.rand(4, device=device)
    backend = gk.backend_name(device)
    for reduction in ("mean", "none"):
        for loss_dtype in (None, torch.float64):
            args = (x, y, weight, 0.1, reduction, loss_dtype, backend)
            torch.library.opcheck(cross_entropy_probs_fwd.custom_op, args)
        outputs = cross_entropy_probs_fwd(x.detach(), y.detach(), weight, 0.1, reduction, None)
        grad_loss = torch.rand(5 if reduction == "none" else (), device=device)
        torch.library.opcheck(
            cross_entropy_probs_bwd.custom_op,
            (grad_loss, x.detach(), y.detach(), weight, *outputs[1:], 0.1, reduction, reduction == "none", backend),
        )


def test_probs_compile_without_graph_breaks(device):
    x, y = _logits((6, 5), torch.float32, device=device), _probs((6, 5), torch.float32, device=device)
    compiled = torch.compile(cross_entropy, fullgraph=True, backend="aot_eager")
    for o, t in zip(
        _loss_and_grads(compiled, x, y, label_smoothing=0.1),
        _loss_and_grads(F.cross_entropy, x, y, label_smoothing=0.1),
    ):
        torch.testing.assert_close(o, t)


def test_probs_autocast_runs_in_fp32(device):
    x, y = _logits((6, 10), torch.bfloat16, device=device), _probs((6, 10), torch.bfloat16, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        ours = cross_entropy(x, y, label_smoothing=0.1)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, F.cross_entropy(x.float(), y.float(), label_smoothing=0.1))


@pytest.mark.parametrize("probabilities", [False, True])
def test_strided_upstream_of_none(device, probabilities):
    """The per-row gradient as autograd hands it over: expanded (stride 0) from a sum,
    or every other element of a longer tensor."""
    x = _logits((5, 7), torch.float32, device=device).requires_grad_()
    target = _probs((5, 7), torch.float32, device=device) if probabilities else _targets((5,), 7, [1], device=device)
    upstream = _logits((10,), torch.float32, seed=4, device=device)[::2]
    for fn in (cross_entropy, F.cross_entropy):
        loss = fn(x, target, reduction="none", label_smoothing=0.1)
        (by_sum,) = torch.autograd.grad(loss.sum(), x)
        (by_strided,) = torch.autograd.grad(fn(x, target, reduction="none", label_smoothing=0.1), x, upstream)
        if fn is cross_entropy:
            ours = by_sum, by_strided
    torch.testing.assert_close(ours[0], by_sum)
    torch.testing.assert_close(ours[1], by_strided)


def test_probs_autocast_accepts_an_fp32_target(device):
    x, y = _logits((6, 10), torch.bfloat16, device=device), _probs((6, 10), torch.float32, device=device)
    with pytest.raises(TypeError, match="target of class probabilities must have input's dtype"):
        cross_entropy(x, y)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        ours = cross_entropy(x, y)
    torch.testing.assert_close(ours, F.cross_entropy(x.float(), y))


def test_probs_through_the_module(device):
    x, y = _logits((2, 5, 3), device=device), _probs((2, 5, 3), device=device)
    weight = torch.linspace(0.5, 2.0, 5, dtype=torch.float64, device=device)
    for reduction in ("mean", "none"):
        kwargs = dict(weight=weight, reduction=reduction, label_smoothing=0.1)
        assert isinstance(gk.nn.CrossEntropyLoss(**kwargs), torch.nn.CrossEntropyLoss)
        torch.testing.assert_close(gk.nn.CrossEntropyLoss(**kwargs)(x, y), torch.nn.CrossEntropyLoss(**kwargs)(x, y))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_peak_memory_is_the_gradient_and_o_of_rows(reduction):
    """4096 x 128k bf16 logits, forward + backward: above the logits, at most one
    logits-sized buffer (the gradient itself) and a few bytes per row."""
    rows, vocab = 4096, 131072
    device = torch.device("cuda")
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(rows, vocab, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
    target = torch.randint(0, vocab, (rows,), device=device, generator=g)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = cross_entropy(x, target, reduction=reduction)
    (loss.sum() if reduction == "none" else loss).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= x.numel() * x.element_size() + 64 * rows, f"{extra / 2**20:.0f} MiB above the logits"
