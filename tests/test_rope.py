"""gk.apply_rotary_pos_emb against transformers' formula, ``q * cos + rotate_half(q) * sin``
(written out here, so that these tests need no transformers), in each dtype and against
float64, forward and backward, in the layouts attention hands it."""

import pytest
import torch
import torch.nn.functional as F

import gpukernels as gk
from gpukernels.ops.rope import rope
from helpers import assert_matches, gradcheck

pytestmark = pytest.mark.family("rope")  # conftest's device fixture skips backends without them

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_half_interleaved(x):
    """Cohere's and GLM's rotate_half: of adjacent elements."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def torch_rope(q, k, cos, sin, unsqueeze_dim=1, interleaved=False):
    """transformers' apply_rotary_pos_emb, with GPT-NeoX's partial rotation (a cos narrower
    than a head: the rest of the head passes through) and Cohere's interleaved pairs."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rotated = cos.shape[-1]
    rotate = rotate_half_interleaved if interleaved else rotate_half

    def embed(x):
        if rotated == x.shape[-1]:  # Llama's: no cat, whose result would be contiguous
            return x * cos + rotate(x) * sin
        x_rot, x_pass = x[..., :rotated], x[..., rotated:]
        return torch.cat((x_rot * cos + rotate(x_rot) * sin, x_pass), dim=-1)

    return embed(q), embed(k)


def _randn(shape, seed=0, device="cpu", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)


def _trig(batch, time, head_dim, device, dtype, seed=10, interleaved=False):
    """cos and sin as models make them (cat of the angles' halves, or each angle twice in a
    row for interleaved pairs), times a scale as some rope variants apply, so that the
    rotation is not orthogonal: its transpose is the backward, not its inverse."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    positions = torch.arange(time, dtype=torch.float64)[None, :] + _randn((batch, 1), seed).abs() * 7
    angles = positions[..., None] * inv_freq
    angles = angles.repeat_interleave(2, dim=-1) if interleaved else torch.cat((angles, angles), dim=-1)
    return (1.3 * angles.cos()).to(device, dtype), (1.3 * angles.sin()).to(device, dtype)


def _outputs_and_grads(fn, q, k, cos, sin, upstream, unsqueeze_dim, interleaved):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k)]
    outputs = fn(*leaves, cos, sin, unsqueeze_dim, interleaved=interleaved)
    grads = torch.autograd.grad(outputs, leaves, [u.to(o.dtype) for u, o in zip(upstream, outputs)])
    return [o.detach() for o in outputs] + list(grads)


def _compare(q, k, cos, sin, unsqueeze_dim=1, ours_fn=gk.apply_rotary_pos_emb, interleaved=False):
    """[q_embed, k_embed, dq, dk] of ours against the formula in the inputs' dtypes and in
    float64 on the same (rounded) values."""
    shapes = torch_rope(q.detach(), k.detach(), cos, sin, unsqueeze_dim)
    upstream = [_randn(s.shape, 20 + i, q.device) for i, s in enumerate(shapes)]
    ours = _outputs_and_grads(ours_fn, q, k, cos, sin, upstream, unsqueeze_dim, interleaved)
    theirs = _outputs_and_grads(torch_rope, q, k, cos, sin, upstream, unsqueeze_dim, interleaved)
    reference = _outputs_and_grads(
        torch_rope, q.double(), k.double(), cos.double(), sin.double(), upstream, unsqueeze_dim, interleaved
    )
    for o, t, r in zip(ours, theirs, reference):
        assert_matches(o, t, r.to(o.dtype) if o.dtype == torch.float64 else r)
    return ours


# (batch, q heads, k heads, time, head_dim): grouped-query k, one position, a half that is no
# power of two, head_dim 2, and more heads than one tile of 2048 elements (two loops)
SHAPES = [(2, 4, 2, 5, 8), (1, 3, 3, 1, 16), (2, 2, 1, 7, 12), (3, 1, 1, 4, 2), (1, 40, 8, 3, 128)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_transformers_formula(device, dtype, unsqueeze_dim, shape):
    batch, q_heads, k_heads, time, head_dim = shape

    def layout(heads):
        return (batch, heads, time, head_dim) if unsqueeze_dim == 1 else (batch, time, heads, head_dim)

    q, k = _randn(layout(q_heads), 0, device, dtype), _randn(layout(k_heads), 1, device, dtype)
    _compare(q, k, *_trig(batch, time, head_dim, device, dtype), unsqueeze_dim)


def _one_tensor_a_call(q, k, cos, sin, unsqueeze_dim, interleaved):
    """Ours with ``k=None``, once for q and once for k (Gemma 4's apply_rotary_pos_emb)."""
    rotated = [gk.apply_rotary_pos_emb(x, None, cos, sin, unsqueeze_dim, interleaved=interleaved) for x in (q, k)]
    assert [none for _, none in rotated] == [None, None]
    return tuple(x for x, _ in rotated)


@pytest.mark.parametrize("shape", SHAPES[:3] + SHAPES[-1:], ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_tensor_without_k(device, dtype, interleaved, shape):
    """``k=None`` rotates q alone: each of q and k so, forward and backward, as the formula."""
    batch, q_heads, k_heads, time, head_dim = shape
    for unsqueeze_dim in (1, 2):

        def layout(heads):
            return (batch, heads, time, head_dim) if unsqueeze_dim == 1 else (batch, time, heads, head_dim)

        q, k = _randn(layout(q_heads), 0, device, dtype), _randn(layout(k_heads), 1, device, dtype)
        cos, sin = _trig(batch, time, head_dim, device, dtype, interleaved=interleaved)
        _compare(q, k, cos, sin, unsqueeze_dim, ours_fn=_one_tensor_a_call, interleaved=interleaved)


# (batch, q heads, k heads, time, head_dim, rotated): GPT-NeoX's quarter of a head, half of one
# (GLM's), a pair, none, and a rest wider than the rotated part's half
PARTIAL = [(2, 4, 2, 5, 8, 2), (1, 3, 1, 4, 16, 4), (2, 2, 2, 3, 12, 8), (1, 2, 1, 3, 6, 0), (1, 40, 8, 3, 128, 32)]


@pytest.mark.parametrize("shape", PARTIAL, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_partial_and_interleaved_rotations(device, dtype, interleaved, shape):
    """A cos narrower than a head rotates its leading elements and passes the rest through
    (``rotated`` of ``head_dim``: transformers' partial rotary embeddings); interleaved pairs
    as Cohere's rotate_half; both ways, heads before and after time."""
    batch, q_heads, k_heads, time, head_dim, rotated = shape
    for unsqueeze_dim in (1, 2):

        def layout(heads):
            return (batch, heads, time, head_dim) if unsqueeze_dim == 1 else (batch, time, heads, head_dim)

        q, k = _randn(layout(q_heads), 0, device, dtype), _randn(layout(k_heads), 1, device, dtype)
        cos, sin = _trig(batch, time, rotated, device, dtype, interleaved=interleaved)
        _compare(q, k, cos, sin, unsqueeze_dim, interleaved=interleaved)


def test_interleaved_reads_each_element_s_own_cos(device):
    """Random cos and sin (not each angle twice): the interleaved rotation reads the cos
    and sin of each element's own place, as Cohere's formula does."""
    q, k = _randn((2, 3, 4, 8), 0, device), _randn((2, 1, 4, 8), 1, device)
    cos, sin = _randn((2, 4, 6), 2, device), _randn((2, 4, 6), 3, device)
    for interleaved in (False, True):
        _compare(q, k, cos, sin, interleaved=interleaved)


@pytest.mark.parametrize("q_dtype, trig_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float64)])
def test_mixed_dtypes_promote_as_pytorch(device, q_dtype, trig_dtype):
    """bf16 q and k with fp32 cos and sin (a model's rotary embedding in its params' dtype):
    the results in the promoted dtype, as PyTorch's expression; the gradients in q's."""
    q, k = _randn((2, 3, 4, 8), 0, device, q_dtype), _randn((2, 1, 4, 8), 1, device, q_dtype)
    q_embed, k_embed, dq, dk = _compare(q, k, *_trig(1, 4, 8, device, trig_dtype))
    assert q_embed.dtype == k_embed.dtype == trig_dtype
    assert dq.dtype == dk.dtype == q_dtype


def test_layouts_attention_hands_it(device):
    """q and k as Llama's attention makes them (a projection's output viewed as (batch,
    time, heads, head_dim), transposed), a slice of a wider tensor (last stride 1, not
    dense), a view whose last dim steps over elements, and cos and sin expanded over the
    batch; the results' values as the formula's."""
    projection = _randn((2, 5, 6 * 8), 0, device)
    q = projection.view(2, 5, 6, 8).transpose(1, 2)
    k = _randn((2, 5, 2, 12), 1, device)[..., 2:10].transpose(1, 2)
    cos, sin = (t.expand(2, 5, 8) for t in _trig(1, 5, 8, device, torch.float64))
    _compare(q, k, cos, sin)
    steps = _randn((2, 3, 5, 16), 2, device)[..., ::2]
    assert steps.stride(-1) == 2
    _compare(steps, steps, cos, sin)


def test_overlapping_elements(device):
    """q whose elements overlap (time and head_dim both of stride 1, where empty_like would
    lay its results out with a head's elements apart): the results and the gradient of the
    tensor under q as the formula's."""
    base = _randn((64,), 3, device).requires_grad_()
    k = _randn((2, 3, 5, 8), 4, device)
    cos, sin = _trig(1, 5, 8, device, torch.float64)
    results = []
    for fn in (gk.apply_rotary_pos_emb, torch_rope):
        q_embed, _ = fn(base.as_strided((2, 3, 5, 8), (15, 5, 1, 1)), k, cos, sin)
        (grad,) = torch.autograd.grad(q_embed, base, _randn(q_embed.shape, 5, device))
        results.append((q_embed.detach(), grad))
    for ours, theirs in zip(*results):
        assert_matches(ours, theirs)


def test_outputs_keep_the_layout_of_dense_inputs(device):
    """A transposed q's results are transposed alike, as PyTorch's elementwise ops keep them:
    attention reads them as they would be."""
    q = _randn((2, 5, 4, 8), 0, device).transpose(1, 2)
    q_embed, k_embed = gk.apply_rotary_pos_emb(q, q, *_trig(2, 5, 8, device, torch.float64))
    assert q_embed.stride() == q.stride() == torch_rope(q, q, *_trig(2, 5, 8, device, torch.float64))[0].stride()


def test_only_one_output_used(device):
    """k's result unused: k gets no gradient, as in PyTorch, and q's is right."""
    q, k = (_randn((1, 2, 3, 4), seed, device).requires_grad_() for seed in range(2))
    cos, sin = _trig(1, 3, 4, device, torch.float64)
    gk.apply_rotary_pos_emb(q, k, cos, sin)[0].square().sum().backward()
    assert k.grad is None
    ours = q.grad
    q.grad = None
    torch_rope(q, k, cos, sin)[0].square().sum().backward()
    assert_matches(ours, q.grad)


def test_empty(device):
    for shape in [(0, 2, 3, 4), (2, 2, 0, 4), (2, 0, 3, 4)]:
        q = _randn(shape, 0, device).requires_grad_()
        cos, sin = _trig(shape[0], shape[2], 4, device, torch.float64)
        q_embed, _ = gk.apply_rotary_pos_emb(q, q, cos, sin)
        assert q_embed.shape == shape
        q_embed.sum().backward()
        assert q.grad.shape == shape


def test_gradcheck(device):
    # small: the NumPy backend's check takes a backward an output element
    q, k = (_randn(s, seed, device).requires_grad_() for seed, s in enumerate([(2, 2, 3, 4), (2, 1, 3, 4)]))
    cos, sin = _trig(2, 3, 4, device, torch.float64)
    assert gradcheck(lambda q, k: gk.apply_rotary_pos_emb(q, k, cos, sin), (q, k))


def test_opcheck(device):
    q, k = (_randn((2, 3, 4, 8), seed, device, torch.float32) for seed in range(2))
    cos, sin = _trig(2, 4, 8, device, torch.float32)
    backend = gk.backend_name(device)
    for transpose, interleaved, rotated in ((False, False, 8), (True, False, 8), (False, True, 4), (True, True, 4)):
        args = (q.requires_grad_(not transpose), k, cos[..., :rotated], sin[..., :rotated], 1, transpose)
        torch.library.opcheck(rope.custom_op, (*args, interleaved, torch.float32, backend))


def test_compiles_without_graph_breaks(device):
    q, k = (_randn((2, 3, 4, 8), seed, device, torch.float32) for seed in range(2))
    cos, sin = _trig(2, 4, 8, device, torch.float32)
    _compare(q, k, cos, sin, ours_fn=torch.compile(gk.apply_rotary_pos_emb, fullgraph=True, backend="aot_eager"))


def test_autocast_gives_q_dtype(device):
    """Under autocast, bf16 q and k from autocast's linears with fp32 cos and sin: PyTorch's
    expression gives fp32, which attention then casts to bf16; ours gives those bf16 values
    directly, and fp32 gradients reach the linears' weights."""
    x, w_q, w_k = (
        _randn(s, seed, device, torch.float32).requires_grad_() for seed, s in enumerate([(6, 16), (16, 16), (16, 16)])
    )
    cos, sin = _trig(1, 3, 8, device, torch.float32)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        q, k = (F.linear(x, w).view(2, 3, 2, 8).transpose(1, 2) for w in (w_q, w_k))
        ours = gk.apply_rotary_pos_emb(q, k, cos, sin)
        theirs = torch_rope(q, k, cos, sin)
    assert [o.dtype for o in ours] == [torch.bfloat16] * 2 and [t.dtype for t in theirs] == [torch.float32] * 2
    for o, t in zip(ours, theirs):
        reference = t.detach().double()
        assert_matches(o, t.to(torch.bfloat16), reference)
    sum(o.float().sum() for o in ours).backward()
    assert w_q.grad.dtype == w_k.grad.dtype == torch.float32


def _bad_call(case):
    q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 1, 4, 8)
    cos, sin = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    args = {"q": q, "k": k, "cos": cos, "sin": sin, "unsqueeze_dim": 1}
    args.update(case)
    return args


BAD = [
    ({"unsqueeze_dim": 3}, gk.ArgumentError, "unsqueeze_dim must be 1"),
    ({"unsqueeze_dim": True}, gk.ArgumentError, "unsqueeze_dim must be 1"),
    ({"q": torch.randn(3, 4, 8)}, gk.ArgumentError, "q must be 4-D"),
    ({"cos": torch.randn(2, 4, 7), "sin": torch.randn(2, 4, 7)}, gk.ArgumentError, "cos's last dim must be even"),
    ({"cos": torch.randn(2, 4, 10), "sin": torch.randn(2, 4, 10)}, gk.ArgumentError, "at most 8"),
    ({"interleaved": 1}, gk.ArgumentTypeError, "interleaved must be a bool"),
    ({"q": torch.ones(2, 3, 4, 8, dtype=torch.long)}, gk.ArgumentTypeError, "q must be float"),
    ({"k": [1.0]}, gk.ArgumentTypeError, "k must be a torch.Tensor"),
    ({"k": torch.randn(2, 1, 4, 8).double()}, gk.ArgumentTypeError, "k has dtype torch.float64 but q"),
    ({"k": torch.randn(2, 1, 5, 8)}, gk.ArgumentError, "k of shape .* must have q's batch, time"),
    ({"k": torch.randn(2, 1, 4, 8, device="meta")}, gk.ArgumentError, "k is on meta"),
    ({"cos": torch.randn(2, 5, 8)}, gk.ArgumentError, r"cos must have shape \(2 or 1, 4, at most 8\)"),
    ({"cos": torch.randn(4, 8), "sin": torch.randn(4, 8)}, gk.ArgumentError, "cos must have shape"),
    ({"sin": torch.randn(1, 4, 8)}, gk.ArgumentError, "sin must have cos's shape"),
    ({"sin": torch.randn(2, 4, 8).double()}, gk.ArgumentTypeError, "sin has dtype"),
    ({"cos": torch.randn(2, 4, 8, requires_grad=True)}, gk.ArgumentError, "cos and sin must not require grad"),
]


@pytest.mark.parametrize("case, error, match", BAD, ids=[m for _, _, m in BAD])
def test_bad_input(case, error, match):
    with pytest.raises(error, match=match):
        gk.apply_rotary_pos_emb(**_bad_call(case))
