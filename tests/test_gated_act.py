import math

import pytest
import torch
import torch.nn.functional as F

import gpukernels as gk
from gpukernels.ops.gated_act import gated_act_bwd, gated_act_fwd
from helpers import assert_matches, gradcheck

pytestmark = pytest.mark.family("gated_act")  # conftest's device fixture skips backends without them

# name -> (ours, the PyTorch expression it replaces)
GATED = {
    "swiglu": (gk.swiglu, lambda gate, up: F.silu(gate) * up),
    "geglu": (gk.geglu, lambda gate, up: F.gelu(gate) * up),
    "geglu_tanh": (
        lambda gate, up: gk.geglu(gate, up, approximate="tanh"),
        lambda gate, up: F.gelu(gate, approximate="tanh") * up,
    ),
}
ACTIVATION_OF = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# no elements, one (0-d and 1-d), odd sizes, 3-D, and more than one Triton block (1024) with the last one partial
SHAPES = [(0,), (4, 0, 3), (), (1,), (17,), (3, 33), (2, 3, 5), (4097,), (3, 7, 201)]


def _randn(shape, scale=1.0, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(device)


def _output_and_grads(fn, gate, up, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in (gate, up)]
    y = fn(*leaves)
    return [y.detach(), *torch.autograd.grad(y, leaves, upstream.to(y.dtype))]


def _compare(name, gate, up, upstream, ours_fn=None):
    """[y, dgate, dup] of ours (``ours_fn``, default GATED's) against the PyTorch expression
    in the inputs' dtype and in fp64 on the same (rounded) values; returns the errors measured."""
    torch_fn = GATED[name][1]
    ours = _output_and_grads(ours_fn or GATED[name][0], gate, up, upstream)
    theirs = _output_and_grads(torch_fn, gate, up, upstream)
    reference = _output_and_grads(torch_fn, gate.double(), up.double(), upstream.double())
    return [assert_matches(o, t, r) for o, t, r in zip(ours, theirs, reference)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", GATED)
def test_matches_torch(device, name, dtype, shape):
    gate, up, upstream = (_randn(shape, scale, seed, device).to(dtype) for seed, scale in enumerate((3.0, 1.0, 1.0)))
    _compare(name, gate, up, upstream)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", GATED)
def test_gates_in_the_tails(device, name, dtype):
    """Gates where sigmoid and the normal CDF saturate (exp(-gate) overflows fp32 past
    88), the tanh form's cubic is in the thousands, and around 0."""
    gate = torch.cat([torch.linspace(-100, 100, 401, dtype=torch.float64), torch.tensor([0.0, -0.0, 1e-4, -1e-4])])
    up = _randn(gate.shape, seed=1)
    upstream = _randn(gate.shape, seed=2)
    _compare(name, *(t.to(device, dtype) for t in (gate, up, upstream)))


def _grads_through_views(fn, bases, views, upstream):
    y = fn(*views(*bases))
    return [y.detach(), *torch.autograd.grad(y, bases, upstream)]


@pytest.mark.parametrize("name", GATED)
def test_non_contiguous_inputs(device, name):
    """A transposed gate and a strided up, and gate and up as the halves of one fused
    gate_up projection (as LLaMA-style models with a fused projection have them)."""
    layouts = [
        ([_randn((33, 5), 3.0, 0, device), _randn((5, 66), 1.0, 1, device)], lambda g, u: (g.t(), u[:, ::2])),
        ([_randn((2, 5, 66), 3.0, 2, device)], lambda fused: fused.chunk(2, dim=-1)),
    ]
    for bases, views in layouts:
        assert not any(v.is_contiguous() for v in views(*bases))
        bases = [b.requires_grad_() for b in bases]
        upstream = _randn((5, 33) if len(bases) == 2 else (2, 5, 33), seed=3, device=device)
        ours, theirs = (_grads_through_views(fn, bases, views, upstream) for fn in GATED[name])
        for o, t in zip(ours, theirs):
            assert_matches(o, t)


# the packed gate-up tensor's shape: no elements, one row (1-d), odd widths, a row per program and more
PACKED_SHAPES = [(4, 0, 6), (2,), (34,), (3, 34), (2, 3, 10), (3, 2, 402), (2, 2050)]


def _packed(name):
    """Ours on a packed gate-up tensor, and the PyTorch expression on its chunks."""
    ours, theirs = GATED[name]
    return (lambda x: ours(x, None)), (lambda x: theirs(*x.chunk(2, dim=-1)))


def _compare_packed(name, x, upstream, layout=lambda x: x, ours_fn=None):
    """[y, dx] of ours (``ours_fn``, default ``_packed``'s) on ``layout(x)`` (x packed) against
    PyTorch's on its chunks, in x's dtype and in fp64; returns the errors measured."""
    ours, theirs = _packed(name)
    results = []
    for fn, dtype in zip((ours_fn or ours, theirs, theirs), (x.dtype, x.dtype, torch.float64)):
        leaf = x.detach().to(dtype).requires_grad_()
        y = fn(layout(leaf))
        results.append([y.detach(), *torch.autograd.grad(y, leaf, upstream.to(dtype))])
    return [assert_matches(o, t, r) for o, t, r in zip(*results)]


@pytest.mark.parametrize("shape", PACKED_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", GATED)
def test_packed_gate_up_matches_its_chunks(device, name, dtype, shape):
    x = _randn(shape, 3.0, 0, device).to(dtype)
    upstream = _randn((*shape[:-1], shape[-1] // 2), 1.0, 1, device)
    _compare_packed(name, x, upstream)


@pytest.mark.parametrize("name", GATED)
def test_packed_gate_up_laid_out_otherwise(device, name):
    """Packed rows apart (a wider tensor's columns, a single-element dim of any stride
    between), rows of stride 0 (expanded), and rows that make no one axis (a transpose: copied)."""
    x = _randn((3, 5, 20), 3.0, 0, device)
    upstream = _randn((3, 5, 8), 1.0, 1, device)
    layouts = [
        lambda x: torch.cat([x, x[..., :6]], dim=-1)[..., :16],
        lambda x: torch.cat([x, x[..., :6]], dim=-1)[..., :16].unsqueeze(2).transpose(1, 2).squeeze(1),
        lambda x: x[:1, :1, :16].expand(3, 5, 16),
        lambda x: x[..., :16].transpose(0, 1),
    ]
    for layout in layouts:
        out_shape = layout(x).shape[:-1] + (8,)
        _compare_packed(name, x, upstream.reshape(-1)[: math.prod(out_shape)].reshape(out_shape), layout)


@pytest.mark.parametrize("name", GATED)
def test_row_counts_that_tile_apart_in_one_process(device, name):
    """Rows of one width and strides, fewer and more than a tile holds (1, 2, 3, 5, 40 rows):
    each launch specialized for its own tiling (under the tests' launch-key check a shared key
    would raise), packed and as chunks."""
    for rows in (1, 2, 3, 5, 40, 3):
        x = _randn((rows, 68), 3.0, rows, device)
        upstream = _randn((rows, 34), 1.0, rows + 1, device)
        _compare_packed(name, x, upstream)
        ours, theirs = (
            _grads_through_views(fn, [x.clone().requires_grad_()], lambda x: x.chunk(2, dim=-1), upstream)
            for fn in GATED[name]
        )
        for o, t in zip(ours, theirs):
            assert_matches(o, t)


def _aten_ops(fn, *inputs) -> set[str]:
    """The aten ops a forward and backward of ``fn`` dispatch (our ops' insides unseen)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = set()

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(func.__name__)
            return func(*args, **(kwargs or {}))

    leaves = [t.detach().requires_grad_() for t in inputs]
    y = fn(*leaves)
    upstream = torch.ones_like(y)  # contiguous: sum()'s would be expanded, which the backward copies
    with Watch():
        fn(*leaves).backward(upstream)
    return seen


@pytest.mark.parametrize("name", GATED)
def test_halves_of_a_projection_are_read_and_their_gradient_written_where_they_lie(device, name):
    """Chunks of a gate-up projection go to the kernels as they are (no copies), and the
    packed form's gradient is written whole (no concatenation or filled slices); PyTorch's
    expression on the chunks makes its gradient from two."""
    x = _randn((2, 3, 40), 3.0, 0, device)
    ours, theirs = GATED[name]
    copies = {"clone.default", "contiguous.default", "copy_.default", "cat.default", "slice_backward.default"}
    assert not _aten_ops(lambda x: ours(x, None), x) & copies
    assert not _aten_ops(lambda x: ours(*x.chunk(2, dim=-1)), x) & {"clone.default", "contiguous.default"}
    assert _aten_ops(lambda x: theirs(*x.chunk(2, dim=-1)), x) & copies


@pytest.mark.parametrize("needs_grad", ["gate", "up"])
def test_one_input_needs_grad(device, needs_grad):
    gate, up = _randn((4, 9), 3.0, 0, device), _randn((4, 9), 1.0, 1, device)
    """The other gradient is not asked for; the upstream gradient of sum() is an expanded,
    stride-0 tensor."""
    leaf = (gate if needs_grad == "gate" else up).requires_grad_()
    gk.swiglu(gate, up).sum().backward()
    ours = leaf.grad.clone()
    leaf.grad = None
    (F.silu(gate) * up).sum().backward()
    assert_matches(ours, leaf.grad)


@pytest.mark.parametrize("name", GATED)
def test_gradcheck(device, name):
    gate = _randn((3, 5), 3.0, 0, device).requires_grad_()
    up = _randn((3, 5), 1.0, 1, device).requires_grad_()
    assert gradcheck(GATED[name][0], (gate, up))


@pytest.mark.parametrize("activation", ACTIVATION_OF.values())
def test_opcheck(device, activation):
    gate, up, upstream = (_randn((5, 17), 3.0, seed, device).float() for seed in range(3))
    backend = gk.backend_name(device)
    torch.library.opcheck(gated_act_fwd.custom_op, (gate.requires_grad_(), up.requires_grad_(), activation, backend))
    torch.library.opcheck(gated_act_bwd.custom_op, (upstream, gate.detach(), up.detach(), activation, backend))
    packed = torch.cat([gate, up], dim=-1).detach()
    torch.library.opcheck(gated_act_fwd.custom_op, (packed.requires_grad_(), None, activation, backend))
    torch.library.opcheck(gated_act_bwd.custom_op, (upstream, packed.detach(), None, activation, backend))
    halves = packed.detach().chunk(2, dim=-1)  # rows apart
    torch.library.opcheck(gated_act_fwd.custom_op, (*halves, activation, backend))


@pytest.mark.parametrize("name", GATED)
def test_compiles_without_graph_breaks(device, name):
    gate, up, upstream = (_randn((2, 3, 7), 3.0, seed, device).float() for seed in range(3))
    _compare(name, gate, up, upstream, torch.compile(GATED[name][0], fullgraph=True, backend="aot_eager"))
    packed = torch.compile(_packed(name)[0], fullgraph=True, backend="aot_eager")
    _compare_packed(name, torch.cat([gate, up], dim=-1), upstream, ours_fn=packed)


@pytest.mark.parametrize("name", GATED)
def test_autocast_runs_in_the_inputs_dtype(device, name):
    """As PyTorch's expression: bf16 gate and up from autocast's linears give a bf16
    result, fp32 inputs an fp32 one."""
    ours_fn, torch_fn = GATED[name]
    x, weight_gate, weight_up = (
        _randn(shape, 1.0, seed, device).float().requires_grad_()
        for seed, shape in enumerate([(6, 16), (24, 16), (24, 16)])
    )
    with torch.autocast(device.type, dtype=torch.bfloat16):
        gate, up = F.linear(x, weight_gate), F.linear(x, weight_up)
        assert gate.dtype == up.dtype == torch.bfloat16
        ours, theirs = ours_fn(gate, up), torch_fn(gate, up)
        assert ours_fn(x, x).dtype == torch_fn(x, x).dtype == torch.float32
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert_matches(ours, theirs, torch_fn(gate.detach().double(), up.detach().double()))
    ours.float().sum().backward()
    assert x.grad.dtype == weight_gate.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden_act", ["silu", "gelu_pytorch_tanh"])
def test_matches_transformers_llama_mlp(device, hidden_act, dtype):
    """transformers' LlamaMLP, ``down_proj(ACT2FN[hidden_act](gate_proj(x)) * up_proj(x))``,
    against the same module with ours in the middle, forward and every gradient."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(
        transformers.LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=2, hidden_act=hidden_act)
    )
    ours_fn = gk.swiglu if hidden_act == "silu" else GATED["geglu_tanh"][0]
    x = _randn((2, 3, 16), 2.0, 0, device).to(dtype)
    upstream = _randn((2, 3, 16), 1.0, 1, device).to(dtype)

    def outputs_and_grads(module, dtype, forward):
        module = module.to(device, dtype)
        leaves = [x.to(dtype, copy=True).requires_grad_(), *module.parameters()]
        y = forward(module, leaves[0])
        return [y.detach(), *torch.autograd.grad(y, leaves, upstream.to(dtype))]

    def ours_forward(module, inputs):
        return module.down_proj(ours_fn(module.gate_proj(inputs), module.up_proj(inputs)))

    ours = outputs_and_grads(mlp, dtype, ours_forward)
    theirs = outputs_and_grads(mlp, dtype, LlamaMLP.forward)
    reference = outputs_and_grads(mlp, torch.float64, LlamaMLP.forward)
    for o, t, r in zip(ours, theirs, reference):
        assert_matches(o, t, r)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_more_than_2_to_the_31_elements():
    """Offsets past 2**31 (int64 in the kernels): the elements around and beyond it."""
    n = 2**31 + 3000
    if torch.cuda.mem_get_info()[0] < 6 * n * 2 + 2**30:
        pytest.skip("needs 26 GiB of free GPU memory")
    g = torch.Generator("cuda").manual_seed(0)
    gate, up = (torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    tail = slice(2**31 - 5000, n)
    y = gated_act_fwd(gate, up, "silu")
    want = F.silu(gate[tail].float()) * up[tail].float()
    torch.testing.assert_close(y[tail], want.bfloat16())
    del y
    dgate, dup = gated_act_bwd(up, gate, up, "silu")  # upstream: up again, to spare 4 GiB
    sigmoid = torch.sigmoid(gate[tail].float())
    torch.testing.assert_close(dup[tail], (up[tail].float() * F.silu(gate[tail].float())).bfloat16())
    want_dgate = up[tail].float() ** 2 * sigmoid * (1 + gate[tail].float() * (1 - sigmoid))
    torch.testing.assert_close(dgate[tail], want_dgate.bfloat16())


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: gk.swiglu(torch.ones(4, dtype=torch.int64), torch.ones(4)), "gate must be"),
        (lambda: gk.swiglu(torch.ones(4), torch.ones(4, dtype=torch.int32)), "up must be"),
        (lambda: gk.swiglu([1.0], torch.ones(1)), "gate must be a torch.Tensor"),
        (lambda: gk.swiglu(torch.ones(4), 2.0), "up must be a torch.Tensor"),
        (lambda: gk.swiglu(torch.ones(4), torch.ones(4, dtype=torch.float16)), "up has dtype"),
        (lambda: gk.geglu(torch.ones(4), torch.ones(4, device="meta")), "up is on meta but gate is on cpu"),
        (lambda: gk.swiglu(torch.ones(4, 3), torch.ones(3, 4)), r"up must have shape \(4, 3\)"),
        (lambda: gk.swiglu(torch.ones(4, 3), torch.ones(3)), r"up must have shape \(4, 3\)"),
        (lambda: gk.geglu(torch.ones(4), torch.ones(4), approximate="erf"), "approximate must be one of"),
        (lambda: gk.swiglu(torch.ones(3, 5)), r"gate without up must hold gate and up .* got shape \(3, 5\)"),
        (lambda: gk.geglu(torch.tensor(1.0)), r"gate without up .* of even size, got shape \(\)"),
        (lambda: gk.swiglu(torch.ones(4, dtype=torch.int32)), "gate must be"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call()
