import math

import pytest
import torch
import torch.nn.functional as F

from gpukernels.ops.cross_entropy import cross_entropy, cross_entropy_fwd
from helpers import assert_matches

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _logits(shape, dtype=torch.float64, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def _targets(shape, classes, ignored=(), ignore_index=-100, seed=1):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, classes, shape, generator=g)
    target.view(-1)[list(ignored)] = ignore_index
    return target


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
def test_matches_torch(dtype, classes, reduction):
    x = _logits((6, classes), dtype)
    target = _targets((6,), classes, ignored=[2])
    upstream = torch.randn(6, dtype=torch.float64) if reduction == "none" else None
    _compare(x, target, upstream, reduction=reduction)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_weights_and_smoothing_on_4d_input(dtype, reduction, weighted, label_smoothing):
    x = _logits((2, 5, 3, 4), dtype)
    target = _targets((2, 3, 4), 5, ignored=[0, 7, 23])
    weight = torch.rand(5, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype) + 0.1
    upstream = torch.randn(2, 3, 4, dtype=torch.float64) if reduction == "none" else None
    _compare(x, target, upstream, weight=weight if weighted else None, reduction=reduction,
             label_smoothing=label_smoothing)


def _spec_loss(x, target, weight, ignore_index, e):
    """SPEC.md's formula, written out in fp64 for a (N, C) input."""
    logp = torch.log_softmax(x.double(), dim=1)
    kept = target != ignore_index
    safe = torch.where(kept, target, 0)
    w_t = torch.where(kept, weight[safe], 0)
    per_row = -(1 - e) * w_t * logp.gather(1, safe[:, None])[:, 0] - e / x.shape[1] * (logp * weight).sum(1)
    return torch.where(kept, per_row, 0), w_t


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_spec_formula(dtype):
    x = _logits((9, 7), dtype)
    target = _targets((9,), 7, ignored=[1, 4])
    weight = torch.linspace(0.2, 2.0, 7, dtype=torch.float64)
    per_row, w_t = _spec_loss(x, target, weight, -100, 0.2)
    kwargs = dict(weight=weight.to(dtype), label_smoothing=0.2)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cross_entropy(x, target, reduction="none", **kwargs).double(), per_row, **tol)
    torch.testing.assert_close(cross_entropy(x, target, **kwargs).double(), per_row.sum() / w_t.sum(), **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_single_class_gives_exact_zeros(dtype):
    x = _logits((5, 1), dtype)
    weight = torch.tensor([0.3], dtype=dtype)
    for reduction in ("mean", "sum", "none"):
        for t in _loss_and_grad(cross_entropy, x, torch.zeros(5, dtype=torch.long), weight=weight,
                                reduction=reduction, label_smoothing=0.1):
            assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("ignore_index", [2, -1, 10**9])
def test_custom_ignore_index(ignore_index):
    x = _logits((8, 5), torch.float64)
    target = _targets((8,), 5, ignored=[0, 3, 5], ignore_index=ignore_index)
    for reduction in ("mean", "sum", "none"):
        upstream = torch.randn(8, dtype=torch.float64) if reduction == "none" else None
        _compare(x, target, upstream, ignore_index=ignore_index, reduction=reduction, label_smoothing=0.1)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_all_rows_ignored(dtype, weighted):
    x = _logits((4, 6), dtype)
    target = torch.full((4,), -100)
    weight = torch.rand(6, dtype=dtype) if weighted else None
    loss, grad = _loss_and_grad(cross_entropy, x, target, weight=weight, label_smoothing=0.1)
    assert loss.dtype == dtype and torch.isnan(loss)
    assert torch.equal(grad, torch.zeros_like(x))
    for reduction in ("sum", "none"):
        ours = _loss_and_grad(cross_entropy, x, target, weight=weight, reduction=reduction, label_smoothing=0.1)
        assert all(torch.equal(t, torch.zeros_like(t)) for t in ours)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(reduction):
    x = torch.randn(0, 5, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long)
    ours, theirs = cross_entropy(x, target, reduction=reduction), F.cross_entropy(x, target, reduction=reduction)
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    ours.sum().backward()
    assert x.grad.shape == (0, 5)


def test_one_dim_input():
    x = _logits((11,), torch.float64)
    for reduction in ("mean", "none"):
        upstream = torch.tensor(0.7, dtype=torch.float64)
        _compare(x, torch.tensor(4), upstream, reduction=reduction, label_smoothing=0.3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_large_and_masked_logits_are_stable(dtype):
    x = _logits((4, 9), dtype, scale=1000.0) + 10_000.0
    target = _targets((4,), 9)
    x[0, (target[0] + 1) % 9] = -math.inf  # a masked class, as in vocabulary masking
    upstream = _logits((4,), scale=1.0, seed=5)
    assert all(t.isfinite().all() for t in _loss_and_grad(cross_entropy, x, target, upstream, reduction="none"))
    _compare(x, target, upstream, reduction="none")


def test_int32_target():
    x = _logits((5, 9), torch.float32)
    target = _targets((5,), 9)
    torch.testing.assert_close(cross_entropy(x, target.int()), F.cross_entropy(x, target))


@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
def test_non_contiguous_input(layout):
    if layout == "transposed":
        x, target = _logits((7, 6)).t(), _targets((6,), 7)
    else:
        x, target = _logits((2, 5, 3, 4)).to(memory_format=torch.channels_last), _targets((2, 3, 4), 5)
    assert not x.is_contiguous()
    _compare(x, target, weight=torch.rand(x.shape[1], dtype=torch.float64), label_smoothing=0.05)


def test_no_grad_skips_the_gradient():
    x = _logits((4, 7), torch.float64)
    target = _targets((4,), 7)
    loss, grad = cross_entropy_fwd(x, target, None, -100, 0.0, "mean", False)
    assert grad.numel() == 0
    with torch.no_grad():
        torch.testing.assert_close(cross_entropy(x.requires_grad_(), target), F.cross_entropy(x, target))


def test_backward_without_computed_gradient_is_an_error():
    x = _logits((4, 7), torch.float64).requires_grad_()
    loss, _ = cross_entropy_fwd(x, _targets((4,), 7), None, -100, 0.0, "mean", False)
    with pytest.raises(RuntimeError, match="compute_grad"):
        loss.backward()


def test_autocast_runs_in_fp32():
    x = _logits((6, 10), torch.bfloat16)
    target = _targets((6,), 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = cross_entropy(x, target), F.cross_entropy(x, target)
        assert cross_entropy(x.double(), target).dtype == torch.float64
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck(reduction):
    x = _logits((5, 4), torch.float64, scale=1.0).requires_grad_()
    target = _targets((5,), 4, ignored=[3])
    weight = torch.rand(4, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda x: cross_entropy(x, target, weight=weight, reduction=reduction, label_smoothing=0.2), (x,))


def test_opcheck():
    x = _logits((5, 4), torch.float32).requires_grad_()
    target = _targets((5,), 4, ignored=[1])
    for weight in (None, torch.rand(4)):
        for reduction in ("mean", "sum", "none"):
            torch.library.opcheck(cross_entropy_fwd, (x, target, weight, -100, 0.1, reduction, True))
    torch.library.opcheck(cross_entropy_fwd, (x.detach(), target, None, -100, 0.0, "mean", False))


def test_compiles_without_graph_breaks():
    x = _logits((6, 5), torch.float32)
    target = _targets((6,), 5, ignored=[2])
    compiled = torch.compile(cross_entropy, fullgraph=True, backend="aot_eager")
    ours = _loss_and_grad(compiled, x, target, label_smoothing=0.1)
    theirs = _loss_and_grad(F.cross_entropy, x, target, label_smoothing=0.1)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t)


def _bad(**overrides):
    args = dict(input=torch.randn(3, 4), target=torch.tensor([0, 1, 2]))
    args.update(overrides)
    return args


@pytest.mark.parametrize("kwargs, error, match", [
    (_bad(target=torch.tensor([0, 1, 4])), IndexError, "target 4"),
    (_bad(target=torch.tensor([0, -3, 1])), IndexError, "target -3"),
    (_bad(target=torch.tensor([0, 1])), ValueError, "target must have shape"),
    (_bad(target=torch.tensor([0.0, 1.0, 2.0])), TypeError, "target"),
    (_bad(target=[0, 1, 2]), TypeError, "target"),
    (_bad(target=torch.tensor([0, 1, 2], device="meta")), RuntimeError, "target is on meta"),
    (_bad(input=torch.ones(3, 4, dtype=torch.long)), TypeError, "input"),
    (_bad(input=torch.tensor(1.0), target=torch.tensor(0)), ValueError, "input"),
    (_bad(input=torch.randn(3, 0), target=torch.full((3,), -100)), ValueError, "input must have at least one class"),
    (_bad(weight=torch.ones(3)), ValueError, "weight"),
    (_bad(weight=torch.ones(4, dtype=torch.float64)), TypeError, "weight"),
    (_bad(weight=torch.ones(4, requires_grad=True)), RuntimeError, "weight"),
    (_bad(reduction="avg"), ValueError, "reduction"),
    (_bad(label_smoothing=1.5), ValueError, "label_smoothing"),
    (_bad(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (_bad(label_smoothing=math.nan), ValueError, "label_smoothing"),
    (_bad(ignore_index=1.5), TypeError, "ignore_index"),
])
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        cross_entropy(**kwargs)
