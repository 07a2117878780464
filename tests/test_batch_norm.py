"""batch_norm (each backend conftest's ``device`` selects) against
torch.nn.functional.batch_norm and the same computation in float64: forward,
gradients, running stats, layouts, the Triton kernels' tilings, autograd
checks, and bad input."""

from __future__ import annotations

import contextlib
import functools
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import gpukernels as gk
from gpukernels._numerics import ncl_strides, ncl_strides_of
from gpukernels.ops.batch_norm import batch_norm, batch_norm_bwd, batch_norm_fwd
from helpers import (
    TOLERANCES,
    TORCH_ACTIVATIONS,
    applied_to_itself,
    assert_matches,
    assert_same_output_and_grads,
    count_launches,
    gradcheck,
    torch_batch_norm_needs_cpu,
)

SHAPES = [(8, 3), (6, 17), (5, 1000), (4, 17, 9), (1, 3, 7), (5, 1, 6), (2, 3, 4097), (2, 3, 4, 5), (3, 1, 1, 2)]
LOW_PRECISION = (torch.bfloat16, torch.float16)

pytestmark = pytest.mark.family("batch_norm")  # conftest's device fixture skips backends without them


def make_inputs(shape, dtype, param_dtype=None, affine=True, seed=0, device="cpu"):
    """x, weight, bias and running stats on ``device``; parameters in
    ``param_dtype`` (default: x's), running var positive."""
    g = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or dtype
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    weight = (torch.randn(c, generator=g, dtype=torch.float64)).to(param_dtype) if affine else None
    bias = (torch.randn(c, generator=g, dtype=torch.float64)).to(param_dtype) if affine else None
    running_mean = torch.randn(c, generator=g, dtype=torch.float64).to(param_dtype)
    running_var = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(param_dtype)
    return [None if t is None else t.to(device) for t in (x, weight, bias, running_mean, running_var)]


def clones(*tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).clone() for t in tensors]


def run(fn, x, weight, bias, running_mean, running_var, dy, **kwargs):
    """Forward and gradients wrt the given input/weight/bias; running stats are updated in place."""
    leaves = [t.requires_grad_() for t in (x, weight, bias) if t is not None]
    y = fn(x, running_mean, running_var, weight, bias, **kwargs)
    return y, torch.autograd.grad(y, leaves, dy)


def check_against_torch(
    x, weight, bias, running_mean, running_var, training, torch_device=None, torch_fn=F.batch_norm, **kwargs
):
    """Our forward, gradients and running stats vs PyTorch's ``torch_fn`` (same dtypes)
    and a float64 run of it, both on ``torch_device`` (default: x's);
    returns (ours, theirs) for further checks."""
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(x.device, x.dtype)
    if torch_device is None and torch_batch_norm_needs_cpu(x, weight, bias):
        torch_device = "cpu"
    tensors = (x, weight, bias, running_mean, running_var)
    theirs_tensors = [None if t is None else t.to(torch_device or x.device) for t in (*tensors, dy)]
    ours_stats = clones(*tensors[3:])
    theirs_stats, ref_stats = clones(*theirs_tensors[3:5]), clones(*theirs_tensors[3:5], dtype=torch.float64)
    ours = run(batch_norm, *clones(*tensors[:3]), *ours_stats, dy, training=training, **kwargs)
    theirs = run(torch_fn, *clones(*theirs_tensors[:3]), *theirs_stats, theirs_tensors[5], training=training, **kwargs)
    ref = run(
        torch_fn,
        *clones(*theirs_tensors[:3], dtype=torch.float64),
        *ref_stats,
        theirs_tensors[5].double(),
        training=training,
        **kwargs,
    )

    def here(t):
        return t.detach().to(x.device)

    assert_matches(here(ours[0]), here(theirs[0]), here(ref[0]))
    for mine, torchs, reference in zip(ours[1], theirs[1], ref[1]):
        assert_matches(mine, here(torchs), here(reference))
    for mine, torchs, reference in zip(ours_stats, theirs_stats, ref_stats):
        if mine is not None:
            assert_matches(mine, here(torchs), here(reference))
    return ours, theirs


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_matches_torch(device, dtype, shape, training):
    check_against_torch(*make_inputs(shape, dtype, device=device), training)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_input_with_fp32_parameters(device, dtype, training):
    """Mixed precision as autocast leaves it: bf16/fp16 activations, fp32 BN
    parameters and running stats; gradients come back fp32."""
    inputs = make_inputs((6, 5, 7), dtype, torch.float32, device=device)
    (_, (dx, dweight, dbias)), _ = check_against_torch(*inputs, training)
    assert dx.dtype == dtype and dweight.dtype == torch.float32 and dbias.dtype == torch.float32


@pytest.mark.parametrize("training", [True, False])
def test_no_affine_and_no_running_stats(device, training):
    x, _, _, running_mean, running_var = make_inputs((4, 3, 5), torch.float32, device=device)
    check_against_torch(x, None, None, running_mean, running_var, training)
    if training:
        check_against_torch(x, None, None, None, None, training)


@pytest.mark.parametrize("momentum, eps", [(0.0, 1e-5), (1.0, 1e-3), (0.3, 0.5)])
def test_momentum_and_eps(device, momentum, eps):
    check_against_torch(*make_inputs((5, 4, 3), torch.float32, device=device), True, momentum=momentum, eps=eps)


def test_zero_eps_is_fine_in_eval(device):
    """F.batch_norm refuses eps=0 (in some releases; their CUDA kernel always does):
    PyTorch's side is its ATen op, on CPU."""

    def aten_batch_norm(x, running_mean, running_var, weight, bias, training, eps):
        return torch.batch_norm(x, weight, bias, running_mean, running_var, training, 0.1, eps, False)

    check_against_torch(
        *make_inputs((5, 4, 3), torch.float64, device=device),
        False,
        torch_device="cpu",
        torch_fn=aten_batch_norm,
        eps=0.0,
    )


@pytest.mark.parametrize("training", [True, False])
def test_channels_last_input_gives_channels_last_output(device, training):
    x, *params = make_inputs((3, 5, 4, 6), torch.float32, device=device)
    x = x.to(memory_format=torch.channels_last)
    assert x.reshape(3, 5, 24).data_ptr() == x.data_ptr()  # the kernel sees a view, no copy
    (y, grads), (y_torch, _) = check_against_torch(x, *params, training)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert grads[0].is_contiguous(memory_format=torch.channels_last)
    assert y_torch.is_contiguous(memory_format=torch.channels_last)
    contiguous = batch_norm(x.contiguous(), *clones(*params[2:]), *params[:2], training=training)
    torch.testing.assert_close(y.detach(), contiguous, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("view", ["sliced_length", "sliced_batch", "transposed_hw", "channels_first_permute"])
def test_non_contiguous_input(device, view, training):
    base, *params = make_inputs((6, 4, 5, 8), torch.float32, device=device)
    x = {
        "sliced_length": lambda: base[:, :, 1, ::2],  # (N, C, L) with stride 2 along L
        "sliced_batch": lambda: base[::2],
        "transposed_hw": lambda: base.transpose(2, 3),  # no (N, C, L) view: copied
        "channels_first_permute": lambda: base.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3),
    }[view]()
    assert not x.is_contiguous()
    check_against_torch(x, *params, training)


@pytest.mark.parametrize("training", [True, False])
def test_strided_params_and_running_stats(device, training):
    """Parameters and running stats that are views stepping over elements are read as such;
    the gradients reach the parameters, and the running stats are updated in their place."""
    x = torch.randn(6, 4, 5, dtype=torch.float64, device=device)
    params = torch.randn(2, 8, dtype=torch.float64, device=device, requires_grad=True)
    weight, bias = params[0, ::2], params[1, ::2]
    stats = torch.rand(2, 8, dtype=torch.float64, device=device) + 0.5
    # PyTorch's own on CPU: its cuDNN path drops updates of strided running stats
    # (pytorch/pytorch#33867; seen with torch 2.11 on an H200)
    their_stats = stats.cpu()
    assert not stats[0, ::2].is_contiguous()
    assert_same_output_and_grads(
        lambda: gk.batch_norm(x, stats[0, ::2], stats[1, ::2], weight, bias, training=training),
        lambda: F.batch_norm(
            x.cpu(), their_stats[0, ::2], their_stats[1, ::2], weight.cpu(), bias.cpu(), training=training
        ).to(device),
        params,
    )
    torch.testing.assert_close(stats, their_stats.to(device), **TOLERANCES[torch.float64])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "shape, channels_last", [((6, 4), False), ((6, 4, 5), False), ((2, 4, 3, 5), False), ((2, 4, 3, 5), True)]
)
def test_input_reaches_the_kernels_without_views(device, shape, channels_last, training):
    """(N, C, *) input whose dims after C make one axis goes to the kernels as it is:
    no view of it around the op (each an autograd node with host time of its own)."""
    x, weight, bias, running_mean, running_var = make_inputs(shape, torch.float32, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    assert applied_to_itself(
        batch_norm(x.requires_grad_(), running_mean, running_var, weight, bias, training=training), x
    )


@pytest.mark.parametrize("training", [True, False])
def test_output_grad_whose_dims_after_c_make_no_axis(device, training):
    """A dy whose (H, W) steps make no one axis (transposed) is copied before the kernels read it."""
    x, weight, bias, running_mean, running_var = make_inputs((3, 4, 5, 6), torch.float64, device=device)
    dy = torch.randn(3, 4, 6, 5, dtype=torch.float64, device=device).transpose(2, 3)
    grads = []
    for fn in (batch_norm, F.batch_norm):
        leaves = [t.requires_grad_() for t in clones(x, weight, bias)]
        y = fn(leaves[0], *clones(running_mean, running_var), *leaves[1:], training=training)
        grads.append(torch.autograd.grad(y, leaves, dy))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize(
    "shape, strides, expected",
    [
        ((2, 3, 4, 5), (60, 20, 5, 1), (60, 20, 1)),  # NCHW
        ((2, 3, 4, 5), (60, 1, 15, 3), (60, 1, 3)),  # channels-last
        ((2, 3, 4, 5), (60, 20, 1, 4), None),  # H and W transposed
        ((2, 3, 1, 5), (15, 5, 99, 1), (15, 5, 1)),  # a dim of one element steps nowhere
        ((2, 3, 4, 1), (12, 4, 1, 7), (12, 4, 1)),
        ((2, 3), (3, 1), (3, 1, 1)),  # (N, C): L == 1
        ((2, 3, 4, 5, 6), (360, 120, 30, 6, 1), (360, 120, 1)),
        ((2, 3, 4, 5, 6), (360, 120, 36, 6, 1), None),  # D sliced from 5 of 6: no one axis
    ],
)
def test_ncl_strides(shape, strides, expected):
    assert ncl_strides(shape, strides) == expected
    # the tensor form, kept per layout: the same answer on a second read, None included
    t = torch.empty_strided(shape, strides)
    assert ncl_strides_of(t) == expected
    assert ncl_strides_of(t) == expected


def test_ncl_strides_of_tells_layouts_of_one_shape_apart():
    nchw = torch.empty(2, 3, 4, 5)
    for t, expected in (
        (nchw, (60, 20, 1)),
        (nchw.to(memory_format=torch.channels_last), (60, 1, 3)),
        (nchw.transpose(2, 3).contiguous().transpose(2, 3), None),
        (nchw, (60, 20, 1)),
    ):
        assert ncl_strides_of(t) == expected


def tiled_input(layout, dtype, device):
    """Inputs that walk the Triton kernels' tilings: several tiles per program,
    several programs per channel block (merged partials), a partial last
    channel block, and tiles spanning both n and l."""
    if layout == "2d_wide":  # (N, C): folds to a row-major (M, C) matrix, channel blocks of 64
        return make_inputs((300, 70), dtype, device=device)
    if layout == "nchw_short_rows":  # L=40: tiles of (n, l) spanning several n
        return make_inputs((130, 3, 40), dtype, device=device)
    x, *params = make_inputs((6, 70, 3, 5), dtype, device=device)
    return [x.to(memory_format=torch.channels_last)[::2], *params]  # channels-last, n and l not foldable


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["2d_wide", "nchw_short_rows", "channels_last_sliced_batch"])
def test_tilings(device, layout, training):
    """In fp64, where a wrong index or merge cannot hide in rounding noise (in
    fp32, dweight sums of a few hundred terms already differ from PyTorch's by
    about its own error)."""
    check_against_torch(*tiled_input(layout, torch.float64, device), training)


@pytest.fixture
def triton_kernels(device, monkeypatch):
    """The Triton batch_norm module (Triton targets only), its tilings worked
    out afresh so that the constants a test patches take effect."""
    if gk.backend_name(device) != "triton":
        pytest.skip("Triton kernels only")
    from gpukernels.backends.triton import batch_norm as kernels

    kernels._tiling_of.cache_clear()
    yield kernels
    kernels._tiling_of.cache_clear()


@pytest.mark.parametrize(
    "shape, layout, vec",
    [
        ((2, 3, 40), "contiguous", 8),  # L = 40: runs of 8 (16 bytes of bf16)
        ((2, 3, 4, 5), "contiguous", 4),  # L = 20
        ((5, 1, 6), "contiguous", 2),
        ((256, 256, 14, 14), "contiguous", 4),  # ResNet's 14x14 stage in NCHW
        ((4, 17, 9), "contiguous", 1),  # odd L
        ((4, 3, 40), "sliced batch", 8),  # x[::2]: the n stride doubled, still a multiple
        ((2, 3, 41), "sliced l", 1),  # x[..., 1:]: L = 40 but rows start one element in
        ((2, 3, 4, 5), "channels_last", 1),  # channels inner: c is the contiguous axis
        ((2, 3, 4, 5), "mixed", 1),  # x NCHW, dy channels-last: l is not every tensor's
    ],
)
def test_vector_runs_along_l(device, triton_kernels, shape, layout, vec):
    """The kernels' VEC: where every tensor has l contiguous, the largest of 8, 4, 2 that L
    and every n and c stride are multiples of (vector loads the JIT's own specialisation,
    multiples of 16, would miss), else 1."""
    x = torch.empty(shape)
    others = ()
    if layout == "sliced batch":
        x = x[::2]
    elif layout == "sliced l":
        x = x[..., 1:]
    elif layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "mixed":
        others = (torch.empty(shape).to(memory_format=torch.channels_last),)
    assert triton_kernels._tiling(x, *others).vec == vec


def test_int64_offsets_give_the_same_result(device, triton_kernels, monkeypatch):
    """The int64-offset variant (inputs past 2**31 elements) on an input small enough to test."""
    monkeypatch.setattr(triton_kernels, "INT32_OFFSETS_BELOW", 0)
    inputs = tiled_input("channels_last_sliced_batch", torch.float64, device)
    check_against_torch(*inputs, True)
    x = inputs[0]
    assert triton_kernels._tiling(x.reshape(*x.shape[:2], -1)).offset_dtype == triton_kernels.tl.int64


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["2d_wide", "nchw_short_rows"])  # channels inner, channels outer
def test_elementwise_programs_taking_several_tiles(device, triton_kernels, monkeypatch, layout, training):
    """The normalize and dx kernels with fewer programs than tiles, each program
    merging its channels' partials (more than one) once for all its tiles."""
    monkeypatch.setattr(triton_kernels, "MAX_GRID_Y", 2)
    inputs = tiled_input(layout, torch.float64, device)
    check_against_torch(*inputs, training)
    x = inputs[0]
    tiling = triton_kernels._tiling(x.reshape(*x.shape[:2], -1))
    assert tiling.programs == 2 < tiling.tiles and tiling.splits > 1


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "layout, programs, partials_tile",
    [
        ("2d_wide", 6, 128),  # 2 channel blocks of 64: 3 splits, their partials read 2 splits at a time
        ("nchw_short_rows", 9, 2),  # 3 channels: 3 splits, 2 at a time
        ("nchw_short_rows", 9, 2048),  # eval's dweight and dbias (1024 channels a program): 2 at a time
    ],
)
def test_partials_merged_a_block_of_splits_at_a_time(
    device, triton_kernels, monkeypatch, layout, programs, partials_tile, training
):
    """The elementwise kernels read their channels' partials several splits at once, the last
    block part empty; every block merged into the running statistics and sums: fp64 against
    PyTorch's."""
    monkeypatch.setattr(triton_kernels, "num_programs", lambda device, work, per_sm: programs)
    monkeypatch.setattr(triton_kernels, "PARTIALS_TILE", partials_tile)
    inputs = tiled_input(layout, torch.float64, device)
    tiling = triton_kernels._tiling(inputs[0])
    block_c = tiling.block_c if partials_tile < 2048 else triton_kernels.PARAM_GRADS_BLOCK
    assert tiling.splits == 3 and triton_kernels._split_block(tiling.splits, block_c) == 2
    check_against_torch(*inputs, training)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["2d_wide", "nchw_short_rows"])  # channels inner, channels outer
def test_reduction_grids_fit_what_an_sm_holds(device, triton_kernels, monkeypatch, layout, training):
    """Where an SM holds fewer of a reduction kernel's programs than the grid assumes
    (on a GPU, the compiled kernel's occupancy says so), its tiling is worked out again
    with that many programs an SM: fewer splits, results as PyTorch's."""
    asked = []

    def fitting_per_sm(device, per_sm, kernel, key, constexprs, *args):
        asked.append(kernel)
        assert per_sm == triton_kernels.PROGRAMS_PER_SM and isinstance(key[0], triton_kernels._Tiling)
        return 1

    monkeypatch.setattr(triton_kernels, "fitting_per_sm", fitting_per_sm)
    # the grid of a GPU of 8 SMs (the interpreter's is of 2, too few for the splits to fall)
    monkeypatch.setattr(triton_kernels, "num_programs", lambda device, work, per_sm: max(1, min(work, 8 * per_sm)))
    inputs = tiled_input(layout, torch.float64, device)
    x = inputs[0]
    assert triton_kernels._tiling(x, per_sm=1).splits < triton_kernels._tiling(x).splits
    check_against_torch(*inputs, training)
    reductions = [triton_kernels.batch_norm_stats_kernel] if training else []
    assert asked == [*reductions, triton_kernels.batch_norm_bwd_reduce_kernel]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["2d_wide", "nchw_short_rows", "channels_last_sliced_batch"])
def test_one_split_reduces_several_tiles_in_one_program(device, triton_kernels, monkeypatch, layout, training):
    """With one program per channel block in the reduction grid (a GPU's worth of
    channel blocks), training's normalize and dx kernels reduce their channels'
    tiles themselves, several tiles a program: fp64 against PyTorch's."""
    monkeypatch.setattr(triton_kernels, "num_programs", lambda device, work, per_sm: 1)
    inputs = tiled_input(layout, torch.float64, device)
    x = inputs[0]
    tiling = triton_kernels._tiling(x.reshape(*x.shape[:2], -1))
    assert tiling.one_split and (tiling.tiles > 1 or layout == "channels_last_sliced_batch")
    check_against_torch(*inputs, training)


@pytest.mark.parametrize(
    "shape, strides, fill_limited",
    [
        # (N, C, L) and the strides of such a tensor
        ((256, 64, 3136), (64 * 3136, 3136, 1), True),  # NCHW: a channel a program, partials cost nothing
        ((256, 3, 3136), (3 * 3136, 3136, 1), True),
        ((256, 64, 3136), (3136 * 64, 1, 64), False),  # channels-last: 64 channels a program
        ((256, 64, 256), (256 * 64, 1, 64), False),
        ((256, 4096, 1), (4096, 1, 1), False),  # BatchNorm1d input
        ((8192, 64, 1), (64, 1, 1), False),
    ],
)
def test_grids_keep_partial_reads_within_their_share(monkeypatch, shape, strides, fill_limited):
    """On an H100-sized grid (132 SMs, 4 programs each): the elementwise
    programs, each reading all its channels' partials, read at most
    1/PARTIAL_SHARE as many of them as elements, taking several tiles each
    where needed; where partials cost nothing the grids are what filling the
    GPU asks; the largest get at least a program per SM in both kernels."""
    kernels = pytest.importorskip("gpukernels.backends.triton.batch_norm")
    target = 132 * 4
    monkeypatch.setattr(kernels, "num_programs", lambda device, work, per_sm: max(1, min(work, 132 * per_sm)))
    kernels._tiling_of.cache_clear()
    try:
        t = kernels._tiling_of(shape, (strides,), torch.device("cuda"), kernels.PROGRAMS_PER_SM)
    finally:
        kernels._tiling_of.cache_clear()
    assert 1 <= t.splits <= min(t.tiles, max(1, target // t.channel_blocks))
    assert 1 <= t.programs <= t.tiles
    assert t.programs * t.splits * t.block_c * kernels.PARTIAL_SHARE <= t.tiles * kernels.TILE
    if fill_limited:
        assert t.splits == min(t.tiles, max(1, target // t.channel_blocks)) and t.programs == t.tiles
    if shape[0] * shape[2] * shape[1] >= 2**25:
        assert t.channel_blocks * min(t.splits, t.programs) >= 132


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("channels_last", [False, True])
def test_backward_reduction_grid_is_one_wave_on_gpu(monkeypatch, channels_last):
    """At a ResNet shape (256x256x14x14 bf16), the backward's reduction grid, when it is
    launched, is no more programs than the GPU holds at once of the kernel it launched (4
    an SM at most). (Where fewer fit, the grid may fall to one program per channel: the dx
    kernel then sums its channel itself, with no reduction launch.)"""
    from gpukernels.backends.triton import _occupancy
    from gpukernels.backends.triton import batch_norm as kernels

    kernel = kernels.batch_norm_bwd_reduce_kernel
    grids = []
    launch = kernel.launch
    monkeypatch.setattr(kernel, "launch", lambda grid, *args: grids.append(grid) or launch(grid, *args))
    x = torch.randn(256, 256, 14, 14, device="cuda", dtype=torch.bfloat16)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    params = [torch.ones(256, device="cuda", requires_grad=True), torch.zeros(256, device="cuda", requires_grad=True)]
    y = gk.batch_norm(x.requires_grad_(), None, None, *params, training=True)
    y.backward(torch.randn_like(y))
    torch.cuda.synchronize()
    assert torch.isfinite(x.grad).all() and len(grids) <= 1
    device = torch.cuda.current_device()
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    # x, dy, dx, stats, weight, bias; training, activation
    dtypes = (torch.bfloat16,) * 3 + (torch.float32,) * 3 + (True, "none")
    for grid in grids:
        [launched] = [entry[1] for (on, key), entry in kernel._keyed.items()
                      if on == device and key[0].reduction_grid == grid and key[1:] == dtypes]  # fmt: skip
        fits, _ = _occupancy.programs_per_sm(
            launched.n_regs,
            launched.metadata.num_warps * 32,
            launched.metadata.shared,
            _occupancy.device_limits(device),
        )
        assert grid[0] * grid[1] <= sms * min(kernels.PROGRAMS_PER_SM, fits), (grid, fits, launched.n_regs)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["2d_wide", "nchw_short_rows", "channels_last_sliced_batch"])
def test_kernel_launches(device, triton_kernels, monkeypatch, layout, training):
    """Training forward+backward in 4 launches, the statistics' finalisation
    folded into the kernels that read it, and in 2 with one split (one program
    per channel block reduces all its tiles); eval in 3."""
    launched = count_launches(triton_kernels, monkeypatch)
    x, weight, bias, running_mean, running_var = tiled_input(layout, torch.float32, device)
    one_split = triton_kernels._tiling(x.reshape(*x.shape[:2], -1)).one_split
    assert one_split == (layout == "channels_last_sliced_batch")  # a single tile; the others take several
    x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()
    y = batch_norm(x, running_mean, running_var, weight, bias, training=training)
    forward = list(launched)
    y.backward(torch.ones_like(y))
    backward = launched[len(forward) :]
    if training and one_split:
        assert forward == ["batch_norm_normalize_kernel"]
        assert backward == ["batch_norm_dx_kernel"]
    elif training:
        assert forward == ["batch_norm_stats_kernel", "batch_norm_normalize_kernel"]
        assert backward == ["batch_norm_bwd_reduce_kernel", "batch_norm_dx_kernel"]
    else:
        assert forward == ["batch_norm_normalize_kernel"]
        assert backward == ["batch_norm_bwd_reduce_kernel", "batch_norm_param_grads_kernel"]


def test_large_mean_small_variance(device):
    """fp32 statistics of data far from 0: from a sum of squares the variance
    would lose ~1e-1 to cancellation; sums of squares about a shift near the
    mean (the Triton kernels': the first tile's mean) do not."""
    x = make_inputs((4, 3, 2000), torch.float32, device=device)[0] * 0.5 + 1000
    exact = x.double().transpose(0, 1).reshape(3, -1)
    _, (mean, rstd) = batch_norm_fwd(x, None, None, None, None, None, True, 0.1, 1e-5, "none")
    torch.testing.assert_close(mean.double(), exact.mean(1), rtol=1e-7, atol=0)
    torch.testing.assert_close(rstd.double(), (exact.var(1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-5, atol=0)


def triton_grid_of(device, monkeypatch, programs):
    """On the Triton backend, reduction grids of ``programs`` programs in all (tilings worked
    out afresh); other backends as they are."""
    if gk.backend_name(device) == "triton":
        from gpukernels.backends.triton import batch_norm as kernels

        monkeypatch.setattr(kernels, "num_programs", lambda device, work, per_sm: programs)
        monkeypatch.setattr(kernels, "_tiling_of", functools.lru_cache(kernels._tiling_of.__wrapped__))


def test_first_tile_far_from_the_rest(device, monkeypatch):
    """fp32 statistics where the first of 16 tiles (one program's, on Triton) lies
    1000 standard deviations of the rest away from them: as far from the mean, in
    the data's own standard deviation, as a first tile can be (sqrt(16 - 1)), so
    the Triton kernels' shift by its mean loses the most it can."""
    triton_grid_of(device, monkeypatch, programs=1)  # one split
    x = make_inputs((256, 3, 200), torch.float32, device=device)[0]  # NCHW: 16 tiles of 16 x 256
    x[:16] += 1000
    exact = x.double().transpose(0, 1).reshape(3, -1)
    _, (mean, rstd) = batch_norm_fwd(x, None, None, None, None, None, True, 0.1, 1e-5, "none")
    # the mean within a millionth of the data's standard deviation (it is 16 of them from the shift)
    assert ((mean.double() - exact.mean(1)).abs() <= 1e-6 * exact.std(1)).all()
    torch.testing.assert_close(rstd.double(), (exact.var(1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-5, atol=0)


def test_first_tile_of_one_column_is_not_the_shift(device, monkeypatch):
    """fp32 statistics where a program's first tile is a row's last column (L = 4097 in
    tiles of 4096: its l-tail) and holds an outlier: a shift by that tile's one value would
    cancel 12 bits of the variance, so the Triton kernels shift by a whole tile's mean."""
    # 3 splits of a channel's 8 tiles: the second program's are 1 (a tail), 4 (whole) and 7 (a tail)
    triton_grid_of(device, monkeypatch, programs=6)
    x = make_inputs((4, 2, 4097), torch.float32, device=device)[0]  # 2 channels: n and l do not fold
    x[0, 0, 4096] = 1e4
    exact = x.double().transpose(0, 1).reshape(2, -1)
    _, (mean, rstd) = batch_norm_fwd(x, None, None, None, None, None, True, 0.1, 1e-5, "none")
    assert ((mean.double() - exact.mean(1)).abs() <= 1e-6 * exact.std(1)).all()
    torch.testing.assert_close(rstd.double(), (exact.var(1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("programs", [1, 6])
def test_nan_in_a_channel_is_kept(device, monkeypatch, programs):
    """A nan in a channel makes that channel's batch statistics, output and running stats
    nan, as PyTorch's; the other channels are untouched (one split, and several that
    merge their statistics)."""
    triton_grid_of(device, monkeypatch, programs=programs)
    x, weight, bias, running_mean, running_var = make_inputs((4, 2, 300), torch.float32, device=device)
    x[1, 0, 7] = float("nan")
    outputs = []
    for fn in (batch_norm, F.batch_norm):
        stats = clones(running_mean, running_var)
        y = fn(x, *stats, weight, bias, training=True, momentum=0.5)
        outputs.append((y, *stats))
    for ours, theirs in zip(*outputs):
        assert ours[:, 0].isnan().all() if ours.dim() > 1 else ours[0].isnan()
        torch.testing.assert_close(ours, theirs, equal_nan=True, **TOLERANCES[torch.float32])


def test_running_stats_made_under_inference_mode(device):
    """Running stats made under torch.inference_mode (a model built there, say) are updated by
    training outside it, as PyTorch's batch norm updates them."""
    x = make_inputs((4, 3, 5), torch.float32, device=device)[0]
    results = []
    for fn in (batch_norm, F.batch_norm):
        with torch.inference_mode():
            stats = torch.zeros(3, device=device), torch.ones(3, device=device)
        results.append((fn(x, *stats, training=True), *stats))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, **TOLERANCES[torch.float32])


def test_running_stats_as_checkpointed_inputs(device):
    """The running stats' version counters are left as they were, as PyTorch's batch norm
    leaves them: non-reentrant checkpointing given them as inputs checks them when it
    recomputes the forward (the NumPy kernels' update bumped them: an autograd error)."""
    from torch.utils.checkpoint import checkpoint

    x, weight, bias, _, _ = make_inputs((4, 3, 2, 2), torch.float64, device=device)
    results = []
    for fn in (batch_norm, F.batch_norm):
        leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
        stats = torch.zeros(3, dtype=torch.float64, device=device), torch.ones(3, dtype=torch.float64, device=device)
        y = checkpoint(lambda x, w, b, m, v: fn(x, m, v, w, b, training=True), *leaves, *stats, use_reentrant=False)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=device).view(y.shape)).sum().backward()
        assert [t._version for t in stats] == [0, 0]
        results.append([*(t.grad for t in leaves), *stats])
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("training", [True, False])
def test_relu_passes_the_gradient_of_a_nan(device, training):
    """relu's backward is PyTorch's threshold_backward: 0 where the output is <= 0, the
    gradient elsewhere, a nan output's included."""
    x, weight, bias, running_mean, running_var = make_inputs((3, 2, 5), torch.float32, device=device)
    x[0, 1, 2] = float("nan")
    grads = []
    for fn in (
        functools.partial(batch_norm, activation="relu"),
        lambda *args, **kwargs: F.relu(F.batch_norm(*args, **kwargs)),
    ):
        leaves = clones(x, weight, bias)
        y = fn(leaves[0].requires_grad_(), *clones(running_mean, running_var), *leaves[1:], training=training)
        grads.append(torch.autograd.grad(y, leaves[0], torch.ones_like(y)))
    assert not grads[1][0].isnan().all() and not (grads[1][0] == 0).all()  # the case tells the two rules apart
    torch.testing.assert_close(grads[0], grads[1], equal_nan=True, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("training", [True, False])
def test_broadcast_output_grad(device, training):
    """y.sum() sends back dy with all strides 0, unlike x's channels-last ones."""
    x, weight, bias, running_mean, running_var = make_inputs((3, 5, 4, 6), torch.float32, device=device)
    x = x.to(memory_format=torch.channels_last)
    grads = []
    for fn in (batch_norm, F.batch_norm):
        leaves = clones(x, weight, bias)
        y = fn(leaves[0].requires_grad_(), *clones(running_mean, running_var), *leaves[1:], training=training)
        grads.append(torch.autograd.grad(y.sum(), leaves[0]))
    torch.testing.assert_close(grads[0], grads[1], **TOLERANCES[torch.float32])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy's mean of an empty slice
@pytest.mark.parametrize("training", [True, False])
def test_kernels_on_empty_input_agree_with_numpy(device, training):
    """The public function never calls the kernels with M == 0, the ops may be:
    every backend then gives what the NumPy kernels give (nan batch stats)."""
    inputs = make_inputs((0, 3, 4), torch.float32, device=device)
    results = []
    for backend, where in ((None, device), ("numpy", torch.device("cpu"))):
        x, weight, bias, running_mean, running_var = (t.to(where) for t in inputs)
        with gk.use_backend(backend) if backend else contextlib.nullcontext():
            stats = clones(running_mean, running_var)
            fwd = batch_norm_fwd(*clones(x, weight, bias), *stats, None, training, 0.1, 1e-5, "none")
            bwd = batch_norm_bwd(x.clone(), x, weight, bias, fwd[1], training, "none")
            results.append([t.cpu() for t in (*fwd, *stats, *bwd)])
    for ours, numpys in zip(*results):
        torch.testing.assert_close(ours, numpys, equal_nan=True)


@pytest.mark.parametrize("training", [True, False])
def test_empty_batch(device, training):
    x, weight, bias, running_mean, running_var = make_inputs((0, 3, 4), torch.float32, device=device)
    before = running_mean.clone(), running_var.clone()
    weight.requires_grad_()
    y = batch_norm(x, running_mean, running_var, weight, bias, training=training)
    assert y.shape == (0, 3, 4) and y.dtype == torch.float32
    assert torch.equal(running_mean, before[0]) and torch.equal(running_var, before[1])
    (dweight,) = torch.autograd.grad(y.sum(), weight)
    assert torch.equal(dweight, torch.zeros(3, device=device))


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_fp64(device, training):
    x, weight, bias, running_mean, running_var = make_inputs((3, 2, 4), torch.float64, device=device)
    inputs = [t.requires_grad_() for t in (x, weight, bias)]
    assert gradcheck(lambda x, w, b: batch_norm(x, running_mean, running_var, w, b, training=training), inputs)


@pytest.mark.parametrize("activation", ["none", "relu"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_forward(device, dtype, training, activation):
    x, weight, bias, running_mean, running_var = make_inputs((4, 3, 5), dtype, device=device)
    # opcheck runs the op several times: give it its own running stats
    stats = clones(running_mean, running_var)
    args = (x, weight, bias, *stats, None, training, 0.1, 1e-5, activation, gk.backend_name(device))
    torch.library.opcheck(batch_norm_fwd.custom_op, args)


def test_opcheck_forward_channels_last_view(device):
    x, *params = make_inputs((2, 3, 4, 5), torch.float32, device=device)
    x3 = x.to(memory_format=torch.channels_last).reshape(2, 3, 20)
    torch.library.opcheck(
        batch_norm_fwd.custom_op,
        (x3, *params[:2], *clones(*params[2:]), None, True, 0.1, 1e-5, "none", gk.backend_name(device)),
    )


@pytest.mark.parametrize("activation", ["none", "silu"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_opcheck_backward(device, affine, training, activation):
    x, weight, bias, _, _ = make_inputs((4, 3, 5), torch.float32, affine=affine, device=device)
    dy = torch.randn(4, 3, 5, device=device)
    stats = torch.stack((torch.randn(3), torch.rand(3) + 0.5)).to(device)  # mean, then rstd
    args = (dy, x, weight, bias, stats, training, activation, gk.backend_name(device))
    torch.library.opcheck(batch_norm_bwd.custom_op, args)


def test_torch_compile_fullgraph_updates_running_stats_once(device):
    x, weight, bias, running_mean, running_var = make_inputs((4, 3, 5), torch.float32, device=device)
    expected_stats = clones(running_mean, running_var)
    expected = F.batch_norm(x, *expected_stats, weight, bias, training=True)
    compiled = torch.compile(batch_norm, backend="aot_eager", fullgraph=True)
    y = compiled(x, running_mean, running_var, weight, bias, training=True)
    torch.testing.assert_close(y, expected, **TOLERANCES[torch.float32])
    torch.testing.assert_close(running_mean, expected_stats[0], **TOLERANCES[torch.float32])
    torch.testing.assert_close(running_var, expected_stats[1], **TOLERANCES[torch.float32])


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_fullgraph_compile_of_a_layout_not_seen_eagerly(monkeypatch, memory_format):
    """The layouts' cache is not written while Dynamo traces: a miss inside the backward,
    which Dynamo traces as part of the autograd.Function, failed the fullgraph compile."""
    import gpukernels._numerics as numerics

    monkeypatch.setattr(numerics, "_ncl_of_layouts", {})
    bn = gk.nn.BatchNorm2d(4, activation="relu")
    x = torch.randn(2, 4, 3, 3).contiguous(memory_format=memory_format).requires_grad_()
    torch.compile(bn, backend="aot_eager", fullgraph=True)(x).square().sum().backward()
    y = bn(x.detach().requires_grad_())
    assert x.grad is not None and torch.isfinite(x.grad).all() and y.shape == x.shape


def test_torch_compile_warns_of_nothing_in_our_code():
    """Tracing a BatchNorm module warns of nothing of ours (dynamo warns once a process of
    each lru_cache it traces through: a fresh interpreter)."""
    code = (
        "import warnings, torch, gpukernels as gk\n"
        "warnings.simplefilter('always')\n"
        "bn = gk.nn.BatchNorm2d(4, activation='relu')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    torch.compile(bn, backend='aot_eager', fullgraph=True)(torch.randn(2, 4, 3, 3))\n"
        "print([str(w.message) for w in caught if 'gpukernels' in str(w.message) or 'gpukernels' in w.filename])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def bad_call(**overrides):
    x, weight, bias, running_mean, running_var = make_inputs((4, 3, 5), torch.float32)
    kwargs = dict(input=x, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias, training=True)
    kwargs.update(overrides)
    batch_norm(**kwargs)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(weight=torch.ones(4)), ValueError, "weight"),
        (dict(bias=torch.ones(3, 1)), ValueError, "bias"),
        (dict(running_mean=torch.zeros(2)), ValueError, "running_mean"),
        (dict(running_var=torch.ones(5)), ValueError, "running_var"),
        (dict(running_var=None), ValueError, "running_mean and running_var"),
        (dict(running_mean=None, running_var=None, training=False), ValueError, "running_mean"),
        (dict(input=torch.randn(1, 3)), ValueError, "more than 1 value per channel"),
        (dict(input=torch.randn(1, 3, 1)), ValueError, "more than 1 value per channel"),
        (dict(input=torch.randn(1, 3, 1, 1)), ValueError, "more than 1 value per channel"),
        (dict(input=torch.randn(3)), ValueError, "input"),
        (dict(input=torch.ones(4, 3, 5, dtype=torch.int64)), TypeError, "input"),
        (dict(weight=torch.ones(3, dtype=torch.int32)), TypeError, "weight"),
        (dict(running_mean=torch.zeros(3, dtype=torch.float64)), TypeError, "running_mean"),
        (dict(input=torch.randn(4, 3, 5, dtype=torch.float64)), TypeError, "weight"),
        (
            dict(input=torch.randn(4, 3, dtype=torch.bfloat16), weight=torch.ones(3, dtype=torch.bfloat16)),
            TypeError,
            "bias",
        ),
        (dict(weight=torch.ones(3, device="meta")), RuntimeError, "weight"),
        (dict(eps=-1e-5), ValueError, "eps"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(eps=-1e-5, training=False), ValueError, "eps"),
        (dict(momentum=float("nan")), ValueError, "momentum"),
        (dict(momentum=float("inf")), ValueError, "momentum"),
        (dict(momentum=None), TypeError, "momentum"),
        (dict(activation="tanh"), ValueError, "activation"),
        (dict(activation=None), ValueError, "activation"),
    ],
)
def test_bad_input(overrides, error, match):
    with pytest.raises(error, match=match):
        bad_call(**overrides)


def test_one_value_per_channel_is_fine_in_eval(device):
    x, *params = make_inputs((1, 3), torch.float32, device=device)
    check_against_torch(x, *params, False)


def test_autocast_leaves_dtypes_as_pytorch_does():
    x, weight, bias, running_mean, running_var = make_inputs((4, 3, 5), torch.bfloat16, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = batch_norm(x, *clones(running_mean, running_var), weight, bias, training=True)
        theirs = F.batch_norm(x, *clones(running_mean, running_var), weight, bias, training=True)
    assert ours.dtype == theirs.dtype == torch.bfloat16


# ---- the fused activation: act(batch_norm(x)) in the same kernels ----

FUSED_ACTIVATIONS = ["relu", "silu", "gelu", "gelu_tanh"]


def torch_batch_norm_act(x, running_mean, running_var, weight=None, bias=None, activation="none", **kwargs):
    """PyTorch's unfused form: F.batch_norm, then the activation on its output."""
    return TORCH_ACTIVATIONS[activation](F.batch_norm(x, running_mean, running_var, weight, bias, **kwargs))


def check_activation(inputs, training, activation):
    return check_against_torch(*inputs, training, torch_fn=torch_batch_norm_act, activation=activation)


@pytest.mark.parametrize("activation", FUSED_ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(6, 17), (4, 17, 9), (2, 3, 4, 5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_activation_matches_torch(device, dtype, shape, training, activation):
    """Forward, gradients of x, weight and bias, and running stats against PyTorch's
    batch_norm followed by the activation, and the same in float64."""
    check_activation(make_inputs(shape, dtype, device=device), training, activation)


@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["2d_wide", "nchw_short_rows", "channels_last_sliced_batch"])
def test_activation_tilings(device, layout, training, activation):
    """Every tiling's kernels (partials merged across splits) with the activation, in fp64."""
    check_activation(tiled_input(layout, torch.float64, device), training, activation)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["2d_wide", "nchw_short_rows", "channels_last_sliced_batch"])
def test_activation_with_one_split(device, triton_kernels, monkeypatch, layout, training):
    """The one-launch forward and backward (OWN_STATS, OWN_SUMS) with the activation."""
    monkeypatch.setattr(triton_kernels, "num_programs", lambda device, work, per_sm: 1)
    check_activation(tiled_input(layout, torch.float64, device), training, "silu")


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("affine", [True, False])
def test_activation_without_weight_or_bias(device, affine, activation):
    """z = xhat * weight + bias with either missing: what the backward recomputes for act'(z)."""
    x, weight, bias, running_mean, running_var = make_inputs((5, 4, 6), torch.float64, device=device)
    check_activation((x, weight if affine else None, None, running_mean, running_var), True, activation)
    check_activation((x, None, bias if affine else None, running_mean, running_var), True, activation)


@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_activation_on_low_precision_input_with_fp32_parameters(device, dtype, activation):
    """Autocast's mixed precision: the activation reads z rounded to x's dtype, as
    PyTorch's activation reads F.batch_norm's output."""
    check_activation(make_inputs((6, 5, 7), dtype, torch.float32, device=device), True, activation)


@pytest.mark.parametrize("training", [True, False])
def test_activation_channels_last(device, training):
    x, *params = make_inputs((3, 5, 4, 6), torch.float32, device=device)
    x = x.to(memory_format=torch.channels_last)
    (y, _), _ = check_activation((x, *params), training, "relu")
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("training", [True, False])
def test_activation_gradcheck_fp64(device, training, activation):
    x, weight, bias, running_mean, running_var = make_inputs((3, 2, 4), torch.float64, device=device)
    inputs = [t.requires_grad_() for t in (x, weight, bias)]
    assert gradcheck(
        lambda x, w, b: batch_norm(x, running_mean, running_var, w, b, training=training, activation=activation),
        inputs,
    )


def test_activation_keeps_nothing_more_for_the_backward(device):
    """The backward recomputes z from x and the statistics: the tensors saved are the
    same with and without the activation (x, the parameters, the (2, C) statistics)."""
    x, weight, bias, running_mean, running_var = make_inputs((4, 3, 5), torch.float32, device=device)
    x.requires_grad_()
    saved = {}
    for activation in ("none", "relu"):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            batch_norm(x, running_mean, running_var, weight, bias, training=True, activation=activation)
        saved[activation] = shapes
    assert saved["relu"] == saved["none"] == [(4, 3, 5), (3,), (3,), (2, 3)]


@pytest.mark.parametrize("activation", ["none", "relu", "silu"])
def test_module_activation(device, activation):
    """gk.nn.BatchNorm2d(..., activation=) against torch's BatchNorm2d and the activation:
    output, gradients, running stats; torch's state_dict keys."""
    torch.manual_seed(0)
    ours = gk.nn.BatchNorm2d(4, activation=activation)
    theirs = torch.nn.BatchNorm2d(4)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    with torch.no_grad():  # drawn on the CPU (its generator), then moved
        for module in (ours, theirs):
            module.weight.normal_(generator=torch.Generator().manual_seed(1))
            module.bias.normal_(generator=torch.Generator().manual_seed(2))
    ours, theirs = ours.to(device), theirs.to(device)
    x = torch.randn(3, 4, 5, 6, device=device, requires_grad=True)
    y_ours, y_theirs = ours(x), TORCH_ACTIVATIONS[activation](theirs(x))
    torch.testing.assert_close(y_ours, y_theirs, **TOLERANCES[torch.float32])
    dy = torch.randn_like(y_ours)
    for a, b in zip(torch.autograd.grad(y_ours, (x, ours.weight, ours.bias), dy),
                    torch.autograd.grad(y_theirs, (x, theirs.weight, theirs.bias), dy)):  # fmt: skip
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float32])
    torch.testing.assert_close(ours.running_var, theirs.running_var, **TOLERANCES[torch.float32])
    assert (f"activation={activation!r}" in repr(ours)) == (activation != "none")


def test_module_refuses_an_unknown_activation():
    with pytest.raises(ValueError, match="activation"):
        gk.nn.BatchNorm1d(3, activation="tanh")


# ---- the residual: act(batch_norm(x) + residual), a ResNet block's end ----


def torch_batch_norm_add_act(x, running_mean, running_var, weight, bias, residual, activation="none", **kwargs):
    """PyTorch's form, as a ResNet block ends: bn, then ``x += shortcut``, then the activation."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, **kwargs)
    y += residual
    return TORCH_ACTIVATIONS[activation](y)


def check_residual(inputs, training, activation, residual=None):
    """Ours against PyTorch's form (same dtypes) and its float64 run: output, the gradients of
    x, weight, bias and the residual, and the running stats."""
    x, weight, bias, running_mean, running_var = inputs
    if residual is None:
        g = torch.Generator().manual_seed(2)
        residual = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.device, x.dtype)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(x.device, x.dtype)
    results = []
    for fn, dtype in ((batch_norm, None), (torch_batch_norm_add_act, None), (torch_batch_norm_add_act, torch.float64)):
        x_, weight_, bias_, residual_ = clones(x, weight, bias, residual, dtype=dtype)
        leaves = [t.requires_grad_() for t in (x_, weight_, bias_, residual_) if t is not None]
        stats = clones(running_mean, running_var, dtype=dtype)
        if fn is batch_norm:
            y = batch_norm(x_, *stats, weight_, bias_, training=training, activation=activation, residual=residual_)
        else:
            y = fn(x_, *stats, weight_, bias_, residual_, activation, training=training)
        results.append((y, torch.autograd.grad(y, leaves, dy.to(y.dtype)), stats))
    (y, grads, stats), (their_y, their_grads, their_stats), (ref_y, ref_grads, ref_stats) = results
    assert_matches(y.detach(), their_y.detach(), ref_y.detach())
    for mine, theirs, reference in zip((*grads, *stats), (*their_grads, *their_stats), (*ref_grads, *ref_stats)):
        assert_matches(mine, theirs, reference)
    return y


@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(6, 17), (4, 17, 9), (2, 3, 4, 5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_residual_matches_torch(device, dtype, shape, training, activation):
    check_residual(make_inputs(shape, dtype, device=device), training, activation)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["2d_wide", "nchw_short_rows", "channels_last_sliced_batch"])
def test_residual_tilings(device, layout, training):
    check_residual(tiled_input(layout, torch.float64, device), training, "relu")


@pytest.mark.parametrize("residual_layout", ["channels_last", "nchw", "strided"])
def test_residual_in_its_own_layout(device, residual_layout):
    """The residual is read through its own strides: channels-last input beside an NCHW,
    a channels-last or a strided residual; the output keeps the input's layout."""
    x, *params = make_inputs((3, 5, 4, 6), torch.float64, device=device)
    x = x.to(memory_format=torch.channels_last)
    residual = torch.randn(3, 5, 4, 12, dtype=torch.float64, device=device)[..., ::2]
    if residual_layout != "strided":
        residual = residual.contiguous()
    if residual_layout == "channels_last":
        residual = residual.to(memory_format=torch.channels_last)
    y = check_residual((x, *params), True, "relu", residual)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_residual_with_bf16_input_rounds_as_pytorch_does(device):
    """bf16 activations, fp32 parameters: the normalised value rounded, then the sum rounded,
    as ``x = bn(x); x += shortcut`` rounds: the same bits as PyTorch's own result."""
    x, *params = make_inputs((6, 5, 7), torch.bfloat16, torch.float32, device=device)
    residual = torch.randn(6, 5, 7, device=device).to(torch.bfloat16)
    ours = batch_norm(x, *clones(*params[2:]), *params[:2], training=True, activation="relu", residual=residual)
    theirs = torch_batch_norm_add_act(x, *clones(*params[2:]), *params[:2], residual.clone(), "relu", training=True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False])
def test_residual_gradcheck_fp64(device, training):
    x, weight, bias, running_mean, running_var = make_inputs((3, 2, 4), torch.float64, device=device)
    residual = torch.randn(3, 2, 4, dtype=torch.float64, device=device)
    inputs = [t.requires_grad_() for t in (x, weight, bias, residual)]
    assert gradcheck(
        lambda x, w, b, r: batch_norm(
            x, running_mean, running_var, w, b, training=training, activation="relu", residual=r
        ),
        inputs,
    )


def test_residual_relu_keeps_only_the_output_more(device):
    """With a residual, relu's backward reads its mask off the output (which the next layer
    holds anyway); nothing else is saved but what the plain op saves."""
    x, weight, bias, running_mean, running_var = make_inputs((4, 3, 5), torch.float32, device=device)
    x.requires_grad_()
    residual = torch.randn(4, 3, 5, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = batch_norm(x, running_mean, running_var, weight, bias, training=True, activation="relu", residual=residual)
    assert [tuple(t.shape) for t in saved] == [(4, 3, 5), (3,), (3,), (2, 3), (4, 3, 5)]
    assert saved[0] is x and saved[-1] is y


@pytest.mark.parametrize(
    "residual, activation, error, match",
    [
        (torch.ones(4, 3, 6), "relu", ValueError, "residual must have the input's shape"),
        (torch.ones(4, 3, 5, dtype=torch.float64), "relu", TypeError, "residual must have the input's dtype"),
        (torch.ones(4, 3, 5), "silu", ValueError, "activation with a residual"),
        ([1.0], "relu", TypeError, "residual must be a Tensor"),
    ],
)
def test_bad_residual(residual, activation, error, match):
    with pytest.raises(error, match=match):
        bad_call(residual=residual, activation=activation)


def test_module_fused_with_a_residual(device):
    """BatchNorm2d.fused(x, "relu", shortcut): the module's state as its forward keeps it."""
    torch.manual_seed(0)
    ours, theirs = gk.nn.BatchNorm2d(4).to(device), torch.nn.BatchNorm2d(4).to(device)
    x = torch.randn(3, 4, 5, 6, device=device, requires_grad=True)
    shortcut = torch.randn(3, 4, 5, 6, device=device)
    y = ours.fused(x, "relu", shortcut)
    expected = F.relu(theirs(x) + shortcut)
    torch.testing.assert_close(y, expected, **TOLERANCES[torch.float32])
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, **TOLERANCES[torch.float32])
    assert ours.num_batches_tracked == theirs.num_batches_tracked == 1


@pytest.mark.parametrize("parametrized", ["weight", "running_mean"])
def test_module_with_a_parametrization(device, parametrized):
    """A parametrized weight (or buffer) is no longer in the module's table of parameters
    (buffers), where the forward reads its state first: read as torch's forward reads it,
    through the parametrization."""
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, t):
            return 2 * t

    torch.manual_seed(0)
    ours, theirs = gk.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.running_mean.uniform_(-1, 1)
    theirs.load_state_dict(ours.state_dict())
    ours, theirs = ours.to(device), theirs.to(device)
    for module in (ours, theirs):
        parametrize.register_parametrization(module, parametrized, Doubled())
    x = torch.randn(3, 4, 5, 6, device=device)
    for training in (True, False):
        ours.train(training), theirs.train(training)
        torch.testing.assert_close(ours(x), theirs(x), **TOLERANCES[torch.float32])
    assert ours.num_batches_tracked == theirs.num_batches_tracked == 1
