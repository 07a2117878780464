import importlib

import pytest
import torch
import torch.nn.functional as F

import gpukernels as gk
from gpukernels.ops.rms_norm import rms_norm_bwd, rms_norm_fwd
from helpers import (
    TOLERANCES,
    applied_to_itself,
    assert_autocast_reads_input_as_it_is,
    assert_matches,
    assert_out_dtype_rounds_once,
    assert_parametrized_weight_read,
    assert_same_output_and_grads,
    count_launches,
    gradcheck,
)

pytestmark = pytest.mark.family("rms_norm")  # conftest's device fixture skips backends without them

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
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
# (offset, cast_before_weight) of transformers' RMSNorm classes
LLAMA = dict(cast_before_weight=True)
GEMMA = dict(offset=1.0)
VARIANTS = {"plain": {}, "llama": LLAMA, "gemma": GEMMA}


def _stats(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inputs(shape, norm_shape, dtype, weight=True, seed=0, device="cpu", weight_dtype=None, weight_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1).to(device, dtype)
    w = (
        (torch.randn(norm_shape, generator=g, dtype=torch.float64) * weight_scale).to(device, weight_dtype or dtype)
        if weight
        else None
    )
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
    return x, w, dy


def _run(fn, x, w, dy):
    """fn(x, w)'s output and the gradients of x and w (when there is one) for the output gradient dy."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w)]
    y = fn(*leaves)
    y.backward(dy.to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves if t is not None]


def _double(*tensors):
    return [t.double() if t is not None else None for t in tensors]


# transformers' formulas (LlamaRMSNorm.forward, GemmaRMSNorm.forward) with their fp32 statistics
# as a parameter: float32 reproduces them, float64 makes them the float64 reference
def llama_formula(x, weight, eps, stats=torch.float32):
    h = x.to(stats)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def gemma_formula(x, weight, eps, stats=torch.float32):
    out = x.to(stats)
    out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + eps)
    out = out * (1.0 + weight.to(stats))
    return out.type_as(x)


def plain_formula(x, weight, eps, stats=torch.float32):
    return F.rms_norm(x, x.shape[-1:], weight, eps)  # its statistics dtype follows x's: stats is unused


FORMULAS = {"plain": plain_formula, "llama": llama_formula, "gemma": gemma_formula}


def assert_same_roundings(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """``ours`` rounds as ``theirs`` does: fp32/fp64 within the tolerances; bf16/fp16 equal
    but for at most 0.1% of the elements (where a last-bit difference of the fp32
    statistics, summed in another order, tips a rounding). Rounding in another place
    than the formula does (before or after the weight multiply) changes about a quarter."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, (ours.shape, ours.dtype, theirs.dtype)
    if ours.dtype in TOLERANCES:
        torch.testing.assert_close(ours, theirs, **TOLERANCES[ours.dtype])
    elif ours.numel():
        differ = (ours != theirs).double().mean().item()
        assert differ <= 1e-3, f"{differ:.2%} of the elements differ"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,norm_shape", SHAPES)
@pytest.mark.parametrize("weight", [True, False])
def test_matches_torch(device, shape, norm_shape, dtype, weight):
    x, w, dy = _inputs(shape, norm_shape, dtype, weight, device=device)
    ours = _run(lambda x, w: gk.rms_norm(x, norm_shape, w), x, w, dy)
    theirs = _run(lambda x, w: F.rms_norm(x, norm_shape, w), x, w, dy)
    # eps=None is the epsilon of the statistics dtype (fp32 for bf16/fp16): the same eps in float64
    eps = torch.finfo(_stats(dtype)).eps
    reference = _run(lambda x, w: F.rms_norm(x, norm_shape, w, eps), *_double(x, w, dy))
    for o, t, r in zip(ours, theirs, reference):
        assert_matches(o, t, r)


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_eps_is_the_statistics_dtypes(device, dtype):
    """eps=None: PyTorch's default, the epsilon of fp32 for bf16/fp16 input (not of the input's
    dtype, which for bf16 would be 2**-7), of fp64 for fp64: it shows on a row of small values."""
    x, w, dy = _inputs((4, 16), (16,), dtype, device=device)
    x = x * 1e-3
    ours = _run(lambda x, w: gk.rms_norm(x, (16,), w), x, w, dy)
    theirs = _run(lambda x, w: F.rms_norm(x, (16,), w), x, w, dy)
    eps = torch.finfo(_stats(dtype)).eps
    reference = _run(lambda x, w: F.rms_norm(x, (16,), w, eps), *_double(x, w, dy))
    for o, t, r in zip(ours, theirs, reference):
        assert_matches(o, t, r)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 1), (16, 1000), (3, 9000)])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_match_the_transformers_formulas(device, shape, dtype, variant):
    formula = FORMULAS[variant]
    x, w, dy = _inputs(shape, shape[-1:], dtype, device=device, weight_scale=0.1 if variant == "gemma" else 1.0)
    eps = 1e-6
    ours = _run(lambda x, w: gk.rms_norm(x, shape[-1:], w, eps, **VARIANTS[variant]), x, w, dy)
    theirs = _run(lambda x, w: formula(x, w, eps, _stats(dtype)), x, w, dy)
    reference = _run(lambda x, w: formula(x, w, eps, torch.float64), *_double(x, w, dy))
    assert_same_roundings(ours[0], theirs[0])
    for o, t, r in zip(ours, theirs, reference):
        assert_matches(o, t, r)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_result_dtypes_with_a_float32_weight(device, variant):
    """bf16 input, fp32 weight: F.rms_norm and Gemma give bf16, Llama the promoted fp32."""
    x, w, dy = _inputs((16, 300), (300,), torch.bfloat16, device=device, weight_dtype=torch.float32)
    ours = _run(lambda x, w: gk.rms_norm(x, (300,), w, 1e-6, **VARIANTS[variant]), x, w, dy)
    theirs = _run(lambda x, w: FORMULAS[variant](x, w, 1e-6), x, w, dy)
    reference = _run(lambda x, w: FORMULAS[variant](x, w, 1e-6, torch.float64), *_double(x, w, dy))
    assert ours[0].dtype == (torch.float32 if variant == "llama" else torch.bfloat16)
    assert (ours[1].dtype, ours[2].dtype) == (torch.bfloat16, torch.float32)
    assert_same_roundings(ours[0], theirs[0])
    for o, t, r in zip(ours, theirs, reference):
        assert_matches(o, t, r)


# (module, class, the variant that reproduces it): every RMSNorm of these models is Llama's or Gemma's
TRANSFORMERS_CLASSES = [
    ("llama", "LlamaRMSNorm", "llama"),
    ("qwen2", "Qwen2RMSNorm", "llama"),
    ("qwen3", "Qwen3RMSNorm", "llama"),
    ("mistral", "MistralRMSNorm", "llama"),
    ("phi3", "Phi3RMSNorm", "llama"),
    ("gemma", "GemmaRMSNorm", "gemma"),
    ("gemma2", "Gemma2RMSNorm", "gemma"),
    ("gemma3", "Gemma3RMSNorm", "gemma"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model,name,variant", [pytest.param(*c, id=c[1]) for c in TRANSFORMERS_CLASSES])
def test_reproduces_the_transformers_classes(device, model, name, variant, dtype):
    """Each class built directly, its weight in the model's dtype. The classes compute in fp32
    whatever the input; ours in fp64 for fp64 input, so there they agree to fp32's tolerance."""
    pytest.importorskip("transformers")
    d = 600
    norm = getattr(importlib.import_module(f"transformers.models.{model}.modeling_{model}"), name)(d, eps=1e-5)
    with torch.no_grad():  # Gemma's weights sit around 0 (its scale is 1 + weight), Llama's around 1
        norm.weight.copy_(
            torch.randn(d, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 0.1
            + (0.0 if variant == "gemma" else 1.0)
        )
    norm.to(device, dtype)
    eps = norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps
    x, _, dy = _inputs((12, d), (d,), dtype, device=device)
    ours = _run(lambda x, w: gk.rms_norm(x, (d,), w, eps, **VARIANTS[variant]), x, norm.weight, dy)
    theirs = _run(lambda x, w: torch.func.functional_call(norm, {"weight": w}, (x,)), x, norm.weight, dy)
    reference = _run(lambda x, w: FORMULAS[variant](x, w, eps, torch.float64), *_double(x, norm.weight, dy))
    if dtype == torch.float64:
        for o, t in zip(ours, theirs):
            torch.testing.assert_close(o, t, **TOLERANCES[torch.float32])
        theirs = reference
    assert_same_roundings(ours[0], theirs[0])
    for o, t, r in zip(ours, theirs, reference):
        assert_matches(o, t, r)


def test_non_contiguous_input(device):
    x = torch.randn(17, 8, dtype=torch.float64, device=device).t()  # (8, 17), stride (1, 8)
    assert not x.is_contiguous()
    w = torch.randn(17, dtype=torch.float64, device=device)
    torch.testing.assert_close(gk.rms_norm(x, (17,), w), F.rms_norm(x, (17,), w), rtol=1e-12, atol=1e-12)


def test_strided_weight(device):
    """A weight that is a view stepping over elements is read as such; its gradient reaches it."""
    x = torch.randn(5, 7, dtype=torch.float64, device=device)
    params = torch.randn(14, dtype=torch.float64, device=device, requires_grad=True)
    weight = params[::2]
    assert not weight.is_contiguous()
    assert_same_output_and_grads(lambda: gk.rms_norm(x, (7,), weight), lambda: F.rms_norm(x, (7,), weight), params)


def test_offset_reaches_the_kernels_whole(device):
    """An offset that fp32 cannot hold (0.1) scales fp64 rows by itself, not by its fp32
    rounding (a compiled Triton kernel takes a float argument as fp32: 1e-9 off)."""
    x = torch.randn(4, 24, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(24, dtype=torch.float64, device=device)

    def formula():
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * (0.1 + w)

    # the gradient of x: the backward's scale is offset + w too
    assert_same_output_and_grads(lambda: gk.rms_norm(x, (24,), w, eps=1e-6, offset=0.1), formula, x)


@pytest.mark.parametrize(
    "kwargs,weight,norm_shape",
    [
        pytest.param({}, False, (3,), id="no-weight"),
        pytest.param({}, True, (2, 3), id="plain-2d"),
        pytest.param(GEMMA, True, (3,), id="gemma"),
        pytest.param(LLAMA, True, (2, 3), id="llama-2d"),
        pytest.param(dict(offset=0.5, cast_before_weight=True), True, (3,), id="offset-and-cast"),
    ],
)
def test_gradcheck(device, kwargs, weight, norm_shape):
    x, w, _ = _inputs((2, 2, 3), norm_shape, torch.float64, weight, device=device)
    args = [t.requires_grad_() for t in (x, w) if t is not None]
    assert gradcheck(lambda *a: gk.rms_norm(a[0], norm_shape, *a[1:], eps=1e-3, **kwargs), args)


@pytest.mark.parametrize(
    "weight,offset,cast_before_weight,out_dtype",
    [(True, 0.0, False, None), (True, 1.0, True, None), (False, 0.0, False, None), (True, 0.0, True, torch.float16)],
)
def test_opcheck(device, weight, offset, cast_before_weight, out_dtype):
    x, w, _ = _inputs((5, 17), (17,), torch.float32, weight, device=device, weight_dtype=torch.bfloat16)
    backend = gk.backend_name(device)
    w = w.requires_grad_() if weight else None
    torch.library.opcheck(
        rms_norm_fwd.custom_op, (x.requires_grad_(), w, 1e-5, offset, cast_before_weight, out_dtype, backend)
    )
    y, rstd = rms_norm_fwd(x.detach(), None if w is None else w.detach(), 1e-5, offset, cast_before_weight, out_dtype)
    torch.library.opcheck(
        rms_norm_bwd.custom_op,
        (torch.randn_like(y), x.detach(), None if w is None else w.detach(), rstd, offset, cast_before_weight, backend),
    )


@pytest.mark.parametrize("kwargs", [{}, dict(offset=1.0, cast_before_weight=True)])
def test_compiles_without_graph_breaks(device, kwargs):
    # A recompile for another float argument makes it a symbolic float, which check_number
    # cannot check under fullgraph: each case starts from a fresh cache.
    torch._dynamo.reset()
    compiled = torch.compile(gk.rms_norm, fullgraph=True, backend="aot_eager")
    x, w, dy = _inputs((4, 6, 33), (6, 33), torch.float32, device=device)
    ours = _run(lambda x, w: compiled(x, (6, 33), w, **kwargs), x, w, dy)
    eager = _run(lambda x, w: gk.rms_norm(x, (6, 33), w, **kwargs), x, w, dy)
    for o, e in zip(ours, eager):
        torch.testing.assert_close(o, e, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(64, 33), (5, 9000)])
def test_dweight_is_deterministic(device, shape):
    x, w, dy = _inputs(shape, shape[-1:], torch.float32, device=device)
    first, second = (_run(lambda x, w: gk.rms_norm(x, shape[-1:], w), x, w, dy)[2] for _ in range(2))
    assert torch.equal(first, second)


@pytest.mark.parametrize("shape", [(6, 33), (3, 9000)])  # one block, looped
@pytest.mark.parametrize("weight", [True, False])
def test_kernel_launches(device, monkeypatch, shape, weight):
    """Forward and backward in one launch each: the backward sums the partials itself, and
    leaves its arrival counters at 0 for the next launch."""
    if gk.backend_name(device) != "triton":
        pytest.skip("Triton kernels only")

    from gpukernels.backends.triton import _common, _norm

    launched = count_launches(_norm, monkeypatch)
    x, w, dy = _inputs(shape, shape[-1:], torch.float32, device=device)
    _run(lambda x, w: gk.rms_norm(x, shape[-1:], w), x, w if weight else None, dy)
    assert launched == ["norm_fwd_kernel", "norm_bwd_kernel"]
    programs = _common.num_programs(x.device, shape[0], per_sm=_norm.BWD_PROGRAMS_PER_SM)
    assert not _common.arrival_counter(x.device, counters=_norm.tree_counters(programs)).any()


@pytest.mark.parametrize("programs", [1, 9, 70])  # one node; a partial node; three levels
@pytest.mark.parametrize("shape", [(75, 33), (70, 9000)])  # one block, looped
def test_dweight_summed_through_the_tree(device, monkeypatch, programs, shape):
    """dweight from every program's partial row, summed through the backward's tree over
    the programs, against float64, twice (the counters are back at 0 after each)."""
    if gk.backend_name(device) != "triton":
        pytest.skip("Triton kernels only")
    from gpukernels.backends.triton import _common, _norm

    monkeypatch.setattr(_norm, "num_programs", lambda device, rows, per_sm: min(rows, programs))
    monkeypatch.setattr(_common, "_plans", {})  # no grid kept from an earlier test
    x, w, dy = _inputs(shape, shape[-1:], torch.float64, device=device)
    expected = _run(lambda x, w: F.rms_norm(x, shape[-1:], w), x.cpu(), w.cpu(), dy.cpu())[2]
    for _ in range(2):
        got = _run(lambda x, w: gk.rms_norm(x, shape[-1:], w), x, w, dy)[2]
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-12, atol=1e-12)


def test_autocast(device):
    """Plain: fp32, as PyTorch's CUDA autocast runs F.rms_norm (its CPU autocast leaves it in
    the input's dtype). With offset or cast_before_weight: as without autocast, as the model
    code does (its explicit casts decide)."""
    x, w, _ = _inputs((4, 32), (32,), torch.bfloat16, device=device, weight_dtype=torch.float32)
    expected = {
        "plain": gk.rms_norm(x.float(), (32,), w),
        "llama": gk.rms_norm(x, (32,), w, **LLAMA),
        "gemma": gk.rms_norm(x, (32,), w, **GEMMA),
    }
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = {
            "plain": gk.rms_norm(x, (32,), w),
            "llama": gk.rms_norm(x, (32,), w, **LLAMA),
            "gemma": gk.rms_norm(x, (32,), w, **GEMMA),
        }
    assert (got["plain"].dtype, got["llama"].dtype, got["gemma"].dtype) == (
        torch.float32,
        torch.float32,
        torch.bfloat16,
    )
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(6, 40), (3, 9000)])  # one block, looped
def test_plain_autocast_runs_in_fp32_from_the_input_as_it_is(device, dtype, shape):
    x, w, _ = _inputs(shape, shape[-1:], dtype, device=device, weight_dtype=torch.float32)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    assert_autocast_reads_input_as_it_is(lambda x, w: gk.rms_norm(x, shape[-1:], w), x, (w,), dy)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(6, 33), (3, 9000)])  # one block, looped
@pytest.mark.parametrize("variant", [*VARIANTS, "no weight"])
def test_out_dtype_is_the_fp32_result_rounded_once(device, shape, variant, out_dtype):
    x, w, _ = _inputs(shape, shape[-1:], torch.float32, variant != "no weight", device=device)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device, out_dtype)
    options = VARIANTS.get(variant, {})
    assert_out_dtype_rounds_once(
        lambda x, *w, **out: gk.rms_norm(x, shape[-1:], *w, **options, **out),
        x,
        (w,) if w is not None else (),
        out_dtype,
        dy,
    )


@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)])
def test_out_dtype_from_low_precision_input(device, dtype, out_dtype):
    shape = (6, 1000)
    x, w, _ = _inputs(shape, shape[-1:], dtype, device=device)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device, out_dtype)
    ours = _run(lambda x, w: gk.rms_norm(x, shape[-1:], w, out_dtype=out_dtype), x, w, dy)
    theirs = _run(lambda x, w: F.rms_norm(x, shape[-1:], w).to(out_dtype), x, w, dy)
    reference = _run(lambda x, w: F.rms_norm(x, shape[-1:], w), x.double(), w.double(), dy)
    assert ours[0].dtype == out_dtype and all(g.dtype == dtype for g in ours[1:])
    for o, t, r in zip(ours, theirs, reference):
        assert_matches(o, t, r)


@pytest.mark.parametrize("variant", VARIANTS)
def test_out_dtype_under_autocast_is_the_autocast_cast(variant):
    """Llama's RMSNorm under autocast: its fp32 result feeds matmuls that cast it."""
    x, w, _ = _inputs((5, 24), (24,), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = gk.rms_norm(x, (24,), w, **VARIANTS[variant], out_dtype=torch.bfloat16)
        cast = gk.rms_norm(x, (24,), w, **VARIANTS[variant]).to(torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, cast)


@pytest.mark.parametrize("normalized_shape,affine,eps", [(8, True, None), ((2, 8), True, 1e-4), (8, False, None)])
def test_module_is_torch_rmsnorm(device, normalized_shape, affine, eps):
    ours = gk.nn.RMSNorm(normalized_shape, eps=eps, elementwise_affine=affine, device=device, dtype=torch.float64)
    theirs = torch.nn.RMSNorm(normalized_shape, eps=eps, elementwise_affine=affine, device=device, dtype=torch.float64)
    assert isinstance(ours, torch.nn.RMSNorm)
    if affine:
        with torch.no_grad():
            ours.weight.normal_()
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(3, 2, 8, dtype=torch.float64, device=device, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), theirs(x_ref)
    torch.testing.assert_close(y, y_ref, **TOLERANCES[torch.float64])
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **TOLERANCES[torch.float64])
    if affine:
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **TOLERANCES[torch.float64])


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x: gk.rms_norm(x.long(), (8,)), "input must be"),
        (lambda x: gk.rms_norm(x, (7,)), "normalized_shape"),
        (lambda x: gk.rms_norm(x, (0,)), "normalized_shape"),
        (lambda x: gk.rms_norm(x, (4, 4, 8)), "normalized_shape"),
        (lambda x: gk.rms_norm(x, (8,), torch.ones(7)), "weight must have shape"),
        (lambda x: gk.rms_norm(x, (8,), torch.ones(8, dtype=torch.int32)), "weight must be"),
        (lambda x: gk.rms_norm(x, (8,), torch.ones(8, device="meta")), "weight is on meta"),
        (lambda x: gk.rms_norm(x, (8,), eps=-1.0), "eps must be"),
        (lambda x: gk.rms_norm(x, (8,), eps=float("nan")), "eps must be finite"),
        (lambda x: gk.rms_norm(x, (8,), torch.ones(8), offset=float("inf")), "offset must be finite"),
        (lambda x: gk.rms_norm(x, (8,), offset=1.0), "offset.*needs a weight"),
        (lambda x: gk.rms_norm(x, (8,), torch.ones(8), cast_before_weight=1), "cast_before_weight must be a bool"),
        (lambda x: gk.rms_norm(x, (8,), out_dtype=torch.float64), "out_dtype must be one of"),
        (lambda x: gk.rms_norm(x.double(), (8,), out_dtype=torch.float32), "out_dtype=torch.float32 needs"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call(torch.randn(4, 8))


@pytest.mark.parametrize("shape", [(2, 5, 17), (17,)])
def test_rows_of_any_shape_reach_the_kernels_without_views(device, shape):
    """Input of any shape goes to the kernels as it is, its last dim the row."""
    x = torch.randn(shape, device=device, requires_grad=True)
    assert applied_to_itself(gk.rms_norm(x, shape[-1:]), x)


def test_module_with_a_parametrized_weight(device):
    """gk.nn.RMSNorm reads its weight from the module's table of parameters; a parametrized
    weight, no longer there, through its parametrization, as torch's RMSNorm."""
    assert_parametrized_weight_read(gk.nn.RMSNorm(6), torch.nn.RMSNorm(6), device)
