import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gpukernels as gk
from gpukernels.ops.layer_norm import layer_norm_bwd, layer_norm_fwd
from helpers import (
    applied_to_itself,
    assert_autocast_reads_input_as_it_is,
    assert_matches,
    assert_out_dtype_rounds_once,
    assert_parametrized_weight_read,
    assert_same_output_and_grads,
    count_launches,
    gradcheck,
)

pytestmark = pytest.mark.family("layer_norm")  # conftest's device fixture skips backends without them

SHAPES = [
    ((17,), (17,)),
    ((4, 1), (1,)),
    ((3, 3), (3,)),
    ((2, 5, 17), (17,)),
    ((6, 1000), (1000,)),
    ((9, 64), (64,)),  # a multiple of 16 features: the backward's pipelined row loop (else registers' prefetch)
    ((2, 4097), (4097,)),
    ((2, 3, 4, 5), (4, 5)),
    ((0, 17), (17,)),
    ((3, 9000), (9000,)),
]  # wider than one Triton block: the looped kernels


def _inputs(shape, norm_shape, dtype, affine=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1).to(device, dtype)
    w = torch.randn(norm_shape, generator=g, dtype=torch.float64).to(device, dtype) if affine else None
    b = torch.randn(norm_shape, generator=g, dtype=torch.float64).to(device, dtype) if affine else None
    return x, w, b


def _run(fn, x, norm_shape, w, b, dy):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = fn(leaves[0], norm_shape, leaves[1], leaves[2])
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,norm_shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_matches_torch(device, shape, norm_shape, dtype, affine):
    x, w, b = _inputs(shape, norm_shape, dtype, affine, device=device)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device, dtype)
    ours = _run(gk.layer_norm, x, norm_shape, w, b, dy)
    theirs = _run(F.layer_norm, x, norm_shape, w, b, dy)
    reference = _run(
        F.layer_norm,
        *(t.double() if t is not None else None for t in (x,)),
        norm_shape,
        *(t.double() if t is not None else None for t in (w, b)),
        dy.double(),
    )
    for o, t, r in zip(ours, theirs, reference):
        assert_matches(o, t, r)


@pytest.mark.parametrize("shape", [(6, 33), (3, 9000)])  # one block, looped
@pytest.mark.parametrize("affine", [True, False])
def test_kernel_launches(device, monkeypatch, shape, affine):
    """Forward and backward in one launch each: the backward sums the partials itself, and
    leaves its arrival counters at 0 for the next launch."""
    if gk.backend_name(device) != "triton":
        pytest.skip("Triton kernels only")
    from gpukernels.backends.triton import _common, _norm

    launched = count_launches(_norm, monkeypatch)
    x, w, b = _inputs(shape, shape[-1:], torch.float32, affine, device=device)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    _run(gk.layer_norm, x, shape[-1:], w, b, dy)
    assert launched == ["norm_fwd_kernel", "norm_bwd_kernel"]
    programs = _common.num_programs(x.device, shape[0], per_sm=_norm.BWD_PROGRAMS_PER_SM)
    assert not _common.arrival_counter(x.device, counters=_norm.tree_counters(programs)).any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("d", [1024, 4096, 8192])
def test_backward_grid_is_one_wave_on_gpu(monkeypatch, d):
    """The backward's persistent grid: at most BWD_PROGRAMS_PER_SM programs an SM, and no
    more than an SM of this GPU holds of the kernel it launched (its registers, threads
    and shared memory), so no second wave; the compile the grid was sized from is that kernel."""
    from gpukernels.backends.triton import _norm, _occupancy

    kernel = _norm.norm_bwd_kernel
    grids = []
    launch = kernel.launch
    monkeypatch.setattr(kernel, "launch", lambda grid, *args: grids.append(grid) or launch(grid, *args))
    rows = 4096
    x, w, b = (t.cuda().requires_grad_() for t in _inputs((rows, d), (d,), torch.bfloat16))
    gk.layer_norm(x, (d,), w, b).backward(torch.randn_like(x))
    torch.cuda.synchronize()
    device = torch.cuda.current_device()
    variant = ("layer_norm", *(torch.bfloat16,) * 3, True, rows, d)  # the launcher's key
    launched = kernel._keyed[device, variant][1]
    fits, _ = _occupancy.programs_per_sm(
        launched.n_regs, launched.metadata.num_warps * 32, launched.metadata.shared, _occupancy.device_limits(device)
    )
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    assert grids == [(sms * min(_norm.BWD_PROGRAMS_PER_SM, fits),)], (grids, fits, launched.n_regs)


@pytest.mark.parametrize("programs", [1, 8, 9, 64, 70])  # one node; one level; a partial node; two; three
@pytest.mark.parametrize("shape", [(75, 33), (70, 9000)])  # one block, looped
def test_param_grads_summed_through_the_tree(device, monkeypatch, programs, shape):
    """dweight and dbias from every program's partial rows, summed through the backward's
    tree over the programs (FAN_IN children a node) at grids of several levels, against
    float64; every node's arrival counter left at 0 (the second backward would go wrong
    otherwise)."""
    if gk.backend_name(device) != "triton":
        pytest.skip("Triton kernels only")
    from gpukernels.backends.triton import _common, _norm

    monkeypatch.setattr(_norm, "num_programs", lambda device, rows, per_sm: min(rows, programs))
    monkeypatch.setattr(_common, "_plans", {})  # no grid kept from an earlier test
    x, w, b = _inputs(shape, shape[-1:], torch.float64, device=device)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    expected = _run(F.layer_norm, x.cpu(), shape[-1:], w.cpu(), b.cpu(), dy.cpu())[2:]
    for _ in range(2):
        for got, want in zip(_run(gk.layer_norm, x, shape[-1:], w, b, dy)[2:], expected):
            torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12)
    counters = _common.arrival_counter(x.device, counters=_norm.tree_counters(programs))
    assert counters.numel() == {1: 1, 8: 1, 9: 2 + 1, 64: 8 + 1, 70: 9 + 2 + 1}[programs]  # nodes a level
    assert not counters.any()


@pytest.mark.parametrize("shape", [(64, 33), (5, 9000)])
def test_param_grads_are_deterministic(device, shape):
    x, w, b = _inputs(shape, shape[-1:], torch.float32, device=device)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    first, second = (_run(gk.layer_norm, x, shape[-1:], w, b, dy)[2:] for _ in range(2))
    for one, other in zip(first, second):
        assert torch.equal(one, other)


def test_non_contiguous_input(device):
    x = torch.randn(17, 8, dtype=torch.float64, device=device).t()  # (8, 17), stride (1, 8)
    assert not x.is_contiguous()
    torch.testing.assert_close(gk.layer_norm(x, (17,)), F.layer_norm(x, (17,)), rtol=1e-12, atol=1e-12)


def test_strided_params(device):
    """Parameters that are views stepping over elements are read as such; their gradients reach them."""
    x = torch.randn(5, 7, dtype=torch.float64, device=device)
    params = torch.randn(2, 14, dtype=torch.float64, device=device, requires_grad=True)
    weight, bias = params[0, ::2], params[1, ::2]
    assert not weight.is_contiguous()
    assert_same_output_and_grads(
        lambda: gk.layer_norm(x, (7,), weight, bias), lambda: F.layer_norm(x, (7,), weight, bias), params
    )


def test_weight_without_bias_and_mixed_param_dtype(device):
    x, w, _ = _inputs((5, 17), (17,), torch.bfloat16, device=device)
    w32 = w.float().requires_grad_()
    y = gk.layer_norm(x, 17, w32)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w32.grad.dtype == torch.float32
    ref = F.layer_norm(x.double(), (17,), w32.detach().double())
    assert (y.double() - ref).abs().max() < 0.05


@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck(device, affine):
    x, w, b = _inputs((3, 2, 7), (7,), torch.float64, affine, device=device)
    args = [t.requires_grad_() for t in (x, w, b) if t is not None]
    fn = (lambda x, w, b: gk.layer_norm(x, (7,), w, b, eps=1e-3)) if affine else (lambda x: gk.layer_norm(x, (7,)))
    assert gradcheck(fn, args)


@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16])
def test_opcheck(device, out_dtype):
    x, w, b = _inputs((5, 17), (17,), torch.float32, device=device)
    backend = gk.backend_name(device)
    torch.library.opcheck(
        layer_norm_fwd.custom_op,
        (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), 1e-5, out_dtype, backend),
    )
    y, stats = layer_norm_fwd(x.detach(), w.detach(), b.detach(), 1e-5, out_dtype)
    torch.library.opcheck(layer_norm_bwd.custom_op, (torch.randn_like(y), x.detach(), w.detach(), stats, True, backend))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(6, 40), (3, 9000)])  # one block, looped
def test_autocast_runs_in_fp32_from_the_input_as_it_is(device, dtype, shape):
    x, w, b = _inputs(shape, shape[-1:], dtype, device=device)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    op = functools.partial(gk.layer_norm, normalized_shape=shape[-1:])
    assert_autocast_reads_input_as_it_is(lambda x, w, b: op(x, weight=w, bias=b), x, (w.float(), b.float()), dy)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(6, 33), (3, 9000)])  # one block, looped
@pytest.mark.parametrize("affine", [True, False])
def test_out_dtype_is_the_fp32_result_rounded_once(device, shape, affine, out_dtype):
    x, w, b = _inputs(shape, shape[-1:], torch.float32, affine, device=device)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device, out_dtype)
    params = (w, b) if affine else ()
    assert_out_dtype_rounds_once(lambda x, *p, **out: gk.layer_norm(x, shape[-1:], *p, **out), x, params, out_dtype, dy)


@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)])
def test_out_dtype_from_low_precision_input(device, dtype, out_dtype):
    shape = (6, 1000)
    x, w, b = _inputs(shape, shape[-1:], dtype, device=device)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device, out_dtype)
    ours = _run(functools.partial(gk.layer_norm, out_dtype=out_dtype), x, shape[-1:], w, b, dy)
    theirs = _run(lambda *args: F.layer_norm(*args).to(out_dtype), x, shape[-1:], w, b, dy)
    reference = _run(F.layer_norm, x.double(), shape[-1:], w.double(), b.double(), dy.double())
    assert ours[0].dtype == out_dtype and all(g.dtype == dtype for g in ours[1:])
    for o, t, r in zip(ours, theirs, reference):
        assert_matches(o, t, r)


def test_out_dtype_under_autocast_is_the_autocast_cast():
    x, w, b = _inputs((5, 24), (24,), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = gk.layer_norm(x, (24,), w, b, out_dtype=torch.bfloat16)
        cast = gk.layer_norm(x, (24,), w, b).to(torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, cast)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x: gk.layer_norm(x.long(), (8,)), "input must be"),
        (lambda x: gk.layer_norm(x, (7,)), "normalized_shape"),
        (lambda x: gk.layer_norm(x, (8,), out_dtype=torch.int32), "out_dtype must be one of"),
        (lambda x: gk.layer_norm(x, (8,), out_dtype="bfloat16"), "out_dtype must be a torch.dtype"),
        (lambda x: gk.layer_norm(x.double(), (8,), out_dtype=torch.bfloat16), "out_dtype=torch.bfloat16 needs"),
        (lambda x: gk.layer_norm(x, (0,)), "normalized_shape"),
        (lambda x: gk.layer_norm(x, (8,), torch.ones(7)), "weight must have shape"),
        (lambda x: gk.layer_norm(x, (8,), None, torch.ones(2, 4)), "bias must have shape"),
        (lambda x: gk.layer_norm(x, (8,), torch.ones(8, dtype=torch.int32)), "weight must be"),
        (lambda x: gk.layer_norm(x, (8,), eps=-1.0), "eps must be"),
        (lambda x: gk.layer_norm(x, (8,), eps=float("nan")), "eps must be finite"),
        (lambda x: gk.layer_norm(x, (8,), eps=float("inf")), "eps must be finite"),
        (lambda x: gk.layer_norm(x, (8,), torch.ones(8, device="meta")), "weight is on meta"),
        (lambda x: gk.layer_norm(x, (8.0,)), "normalized_shape"),
        (lambda x: gk.layer_norm(x, 8.0), "normalized_shape must be an int or a sequence of ints"),
        (lambda x: gk.layer_norm(x, None), "normalized_shape must be an int or a sequence of ints"),
        (lambda x: gk.layer_norm(x, (True,)), "normalized_shape must be an int or a sequence of ints"),
        (lambda x: gk.layer_norm(x, ()), "normalized_shape must be positive ints"),
        (lambda x: gk.layer_norm(x[0, 0], (8,)), "normalized_shape"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call(torch.randn(4, 8))


@pytest.mark.parametrize(
    "normalized_shape,dims",
    [
        (8, (8,)),
        ((8,), (8,)),
        ([8], (8,)),
        (torch.Size([8]), (8,)),
        ((2, 4), (2, 4)),
        (np.int64(8), (8,)),
        ((np.int32(2), 4), (2, 4)),
        (torch.tensor(8), (8,)),
    ],
)
def test_normalized_shape_forms(normalized_shape, dims):
    """Every form of normalized_shape (the usual int or 1-tuple, checked in one pass, and
    the rest, checked one by one, NumPy's ints as torch takes them) normalises the same
    trailing dims."""
    x = torch.randn(3, *dims)
    torch.testing.assert_close(gk.layer_norm(x, normalized_shape), F.layer_norm(x, dims))


@pytest.mark.parametrize("shape", [(2, 5, 17), (17,)])
def test_rows_of_any_shape_reach_the_kernels_without_views(device, shape):
    """Input of any shape goes to the kernels as it is, its last dim the row."""
    x = torch.randn(shape, device=device, requires_grad=True)
    assert applied_to_itself(gk.layer_norm(x, shape[-1:]), x)


def test_module_with_a_parametrized_weight(device):
    """gk.nn.LayerNorm reads its parameters from the module's table of them; a parametrized
    weight, no longer there, through its parametrization, as torch's LayerNorm."""
    assert_parametrized_weight_read(gk.nn.LayerNorm(6), torch.nn.LayerNorm(6), device)
