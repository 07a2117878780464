"""dropout (each backend conftest's ``device`` selects): the Philox4x32-10
generator against Random123's known answers and Triton's tl.rand, the integer
keep test against the uniform one, the mask's statistics, the inverted scaling
against PyTorch and float64, autograd, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gpukernels as gk
from gpukernels.backends._dropout import keep_threshold
from gpukernels.backends.numpy.philox import element_halves, philox4x32, uniform
from gpukernels.ops.dropout import dropout, dropout_fwd
from helpers import assert_matches, gradcheck

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# Offsets at and past 2**32 exercise the counter's high word.
OFFSETS = [0, 1, 2, 3, 1000, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 3, 2**62 + 7]

pytestmark = pytest.mark.family("dropout")  # conftest's device fixture skips backends without them


def philox_mask(seed: int, n: int, p: float) -> torch.Tensor:
    """Which of n flattened elements a seed keeps, straight from the generator:
    element i takes the 16-bit half i % 2 (low first) of word (i % 8) // 2 of the
    Philox call on counter i // 8, and is kept when that half / 2**16 is at least p."""
    i = np.arange(n, dtype=np.int64)
    words = np.stack(philox4x32(seed, (i // 8) & 0xFFFFFFFF, (i // 8) >> 32), axis=1)
    halves = (words[i, (i % 8) // 2] >> (16 * (i % 2)).astype(np.uint32)) & 0xFFFF
    return torch.from_numpy(halves / 2**16 >= p)


def expected(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The contract: kept elements times 1/(1-p), both in the compute dtype
    (float64 for float64, float32 otherwise), rounded to x's dtype; dropped ones
    times 0 (PyTorch's x * mask * scale: a dropped inf or nan gives nan)."""
    x = x.cpu()
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale = torch.tensor(1.0, dtype=compute) / (1 - torch.tensor(p, dtype=compute))
    kept = philox_mask(seed, x.numel(), p).view(x.shape)
    return (x.to(compute) * torch.where(kept, scale, 0.0)).to(x.dtype)


# Random123's kat_vectors for philox4x32 with 10 rounds: counter (c0..c3), key (k0, k1), output.
# Triton's key is (seed lo, seed hi) and its counter the same word order, so seed = k1 << 32 | k0.
RANDOM123_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter, key, want", RANDOM123_KAT)
def test_philox_random123_known_answers(counter, key, want):
    got = philox4x32(key[1] << 32 | key[0], *counter)
    assert tuple(int(w) for w in got) == want


@pytest.mark.interpreter
@pytest.mark.parametrize("seed", [0, 1, 123456789, 2**32 + 17, 2**62 - 1, -5])
def test_uniform_equals_triton_tl_rand(seed):
    triton = pytest.importorskip("triton")
    tl = pytest.importorskip("triton.language")

    @triton.jit
    def store_rand(seed_ptr, offsets_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = i < n
        offsets = tl.load(offsets_ptr + i, mask=inside)
        tl.store(out_ptr + i, tl.rand(tl.load(seed_ptr), offsets), mask=inside)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    offsets = torch.tensor(OFFSETS, dtype=torch.int64, device=device)
    out = torch.empty(len(OFFSETS), dtype=torch.float32, device=device)
    store_rand[(2,)](torch.tensor(seed, dtype=torch.int64, device=device), offsets, out, len(OFFSETS), BLOCK=8)
    ours = uniform(seed, np.array(OFFSETS, dtype=np.int64))
    np.testing.assert_array_equal(out.cpu().numpy().view(np.uint32), ours.view(np.uint32))


def test_element_halves_take_the_eight_halves_of_each_call_in_turn():
    halves = element_halves(7, 8 * 5 + 3)
    assert halves.dtype == np.uint16
    for call in (0, 3, 5):
        for j, word in enumerate(philox4x32(7, call, 0)):
            for half, value in enumerate((int(word) & 0xFFFF, int(word) >> 16)):
                if 8 * call + 2 * j + half < halves.size:
                    assert halves[8 * call + 2 * j + half] == value
    # a longer draw extends a shorter one: the mask does not depend on the size
    np.testing.assert_array_equal(element_halves(7, 1001)[:43], halves)


def threshold_test_ps() -> list[float]:
    """p where the keep test changes its mind: the ends, multiples of 2**-16 and the
    floats either side of them, tiny and near-1 p, and random p."""
    rng = np.random.default_rng(0)
    ps = [0.0, 1.0, 1e-300, 1e-10, 0.1, 0.25, 0.3, 0.4, 0.5, 0.9, 1 - 2**-17, 1 - 2**-16, 1 - 2**-60]
    ps += rng.random(300).tolist()
    for k in [*range(0, 5), *rng.integers(0, 2**16, 200).tolist(), 2**16 - 2, 2**16 - 1, 2**16]:
        at = k / 2**16
        ps += [at, float(np.nextafter(at, 0.0)), float(np.nextafter(at, 1.0))]
    return [p for p in ps if 0 <= p <= 1]


def test_integer_keep_test_is_the_uniform_test_for_every_half():
    """Exhaustively over the 2**16 halves, for each of ~1000 p: ``h > keep_threshold(p)``
    exactly when the uniform ``h / 2**16`` (exact in float64) is at least p."""
    halves = np.arange(2**16, dtype=np.int64)
    for p in threshold_test_ps():
        np.testing.assert_array_equal(halves > keep_threshold(p), halves / 2**16 >= p, err_msg=f"p={p!r}")


def test_integer_keep_test_ends():
    assert keep_threshold(0.0) == -1  # every half kept
    assert keep_threshold(2**-16) == 0  # the half 0 alone dropped
    assert keep_threshold(0.5) == 2**15 - 1
    assert keep_threshold(1 - 2**-16) == 2**16 - 2  # the largest half alone kept
    assert keep_threshold(1 - 2**-17) == keep_threshold(1.0) == 2**16 - 1  # nothing is kept


def test_kernels_decide_an_element_at_its_threshold(device):
    """p equal to an element's uniform keeps it, the float just above drops it: the
    kernels' integer test at the very threshold, on real halves."""
    seed, n = 2024, 4096
    halves = element_halves(seed, n)
    element = int(np.flatnonzero(halves > 1000)[100])
    at = int(halves[element]) / 2**16
    x = torch.rand(n, dtype=torch.float64) + 0.5  # no zeros, so y != 0 is the mask
    for p in (at, float(np.nextafter(at, 1.0))):
        kept = dropout(x.to(device), p, seed=seed).cpu() != 0
        assert torch.equal(kept, philox_mask(seed, n, p))
        assert bool(kept[element]) == (p == at)


def test_uniform_in_unit_interval_and_offset_addressed():
    u = uniform(2024, 4097)
    assert u.dtype == np.float32 and u.min() >= 0.0 and u.max() < 1.0
    # a count is arange(count): any slice of offsets gives the same numbers
    np.testing.assert_array_equal(uniform(2024, np.arange(100, 200)), u[100:200])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3,), (17, 1000), (4097,), (2, 3, 4, 5), ()])
def test_forward_matches_contract_pytorch_and_float64(device, dtype, shape):
    p, seed = 0.3, 1234
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    y = dropout(x.to(device), p, seed=seed).cpu()
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y, expected(x, p, seed), rtol=0, atol=0)
    # PyTorch's own inverted-dropout arithmetic with this mask, and the same in float64
    mask = philox_mask(seed, x.numel(), p).view(shape)
    theirs = x * mask.to(dtype) * (1.0 / (1 - p))
    reference = x.double() * mask.double() / (1 - p)
    assert_matches(y, theirs.to(dtype), reference)


def test_mask_follows_flattened_index_whatever_the_layout(device):
    x = torch.randn(6, 7, device=device).t()  # non-contiguous
    y = dropout(x, 0.5, seed=9)
    torch.testing.assert_close(y, dropout(x.contiguous(), 0.5, seed=9), rtol=0, atol=0)
    torch.testing.assert_close(y.reshape(-1), dropout(x.reshape(-1), 0.5, seed=9), rtol=0, atol=0)


def test_same_mask_for_every_dtype(device):
    x = torch.rand(1000, device=device) + 0.5  # no zeros, so y != 0 is the mask
    masks = [dropout(x.to(dtype), 0.4, seed=77) != 0 for dtype in DTYPES]
    for mask in masks[1:]:
        assert torch.equal(mask, masks[0])


def test_same_seed_same_mask_other_seed_other_mask(device):
    x = torch.ones(4096, device=device)
    assert torch.equal(dropout(x, 0.5, seed=5), dropout(x, 0.5, seed=5))
    assert torch.equal(dropout(x, 0.5, seed=torch.tensor(5, device=device)), dropout(x, 0.5, seed=5))
    assert not torch.equal(dropout(x, 0.5, seed=5), dropout(x, 0.5, seed=6))
    assert not torch.equal(dropout(x, 0.5, seed=5), dropout(x, 0.5, seed=5 + 2**32))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_fraction_and_mean_within_four_sigma(p):
    n = 10**6
    y = dropout(torch.ones(n), p, seed=31337)
    kept = (y != 0).sum().item()
    assert abs(kept / n - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n)
    # the scale is 1/(1-p) worked out in float32, p included
    assert torch.all(y[y != 0] == 1 / (1 - torch.tensor(p, dtype=torch.float32)))
    # inverted dropout keeps the expectation: each y is 1/(1-p) w.p. 1-p, variance p/(1-p)
    assert abs(y.double().mean().item() - 1) < 4 * math.sqrt(p / (1 - p) / n)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_applies_the_forward_mask(device, dtype):
    p, seed = 0.25, 42
    x = (torch.rand(3, 333, dtype=torch.float64) + 0.5).to(device, dtype).requires_grad_()
    dy = torch.randn(3, 333, dtype=torch.float64).to(dtype)
    y = dropout(x, p, seed=seed)
    y.backward(dy.to(device))
    mask = y.detach().cpu() != 0
    assert torch.equal(mask, philox_mask(seed, x.numel(), p).view(x.shape))
    grad = x.grad.cpu()
    torch.testing.assert_close(grad, expected(dy, p, seed), rtol=0, atol=0)
    reference = dy.double() * mask / (1 - p)
    assert_matches(grad, (dy * mask.to(dtype) * (1.0 / (1 - p))).to(dtype), reference)


def test_p_zero_and_eval_return_the_input():
    x = torch.randn(5, requires_grad=True)
    assert dropout(x, 0.0, seed=1) is x
    assert dropout(x, 0.7, training=False) is x


def test_p_one_multiplies_by_zero_as_pytorch(device):
    x = torch.tensor([1.0, -2.0, float("inf"), float("nan")], device=device, requires_grad=True)
    y = dropout(x, 1.0, seed=3)
    want = torch.nn.functional.dropout(x.detach().cpu(), 1.0)  # 0, -0, nan, nan
    torch.testing.assert_close(y.detach().cpu(), want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(y.detach().cpu().signbit(), want.signbit())
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros(4, device=device))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropped_inf_and_nan_give_nan_forward_and_backward_as_pytorch(device, dtype):
    """PyTorch multiplies by the mask, so a dropped inf or nan (an overflowing step) stays nan
    for nan checks and loss scaling to see, in the output and in the gradient."""
    p, seed, n = 0.5, 9, 64
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), -3.0])
    x = special.repeat(n // 4).to(dtype)
    kept = philox_mask(seed, n, p)
    assert kept.any() and not kept.all()
    xd = x.to(device).requires_grad_()
    y = dropout(xd, p, seed=seed)
    torch.testing.assert_close(y.detach().cpu(), expected(x, p, seed), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(y.detach().cpu().isnan(), x.isnan() | (x.isinf() & ~kept))
    y.backward(x.to(device))  # the same inf and nan as gradients
    assert torch.equal(xd.grad.cpu().isnan(), x.isnan() | (x.isinf() & ~kept))
    torch.testing.assert_close(xd.grad.cpu(), expected(x, p, seed), rtol=0, atol=0, equal_nan=True)


def test_empty_input(device):
    x = torch.randn(0, 3, device=device, requires_grad=True)
    y = dropout(x, 0.5, seed=0)
    assert y.shape == (0, 3)
    y.sum().backward()
    assert x.grad.shape == (0, 3)


def test_seed_none_repeats_under_manual_seed(device):
    x = torch.ones(2000, device=device)
    torch.manual_seed(0)
    first, second = dropout(x), dropout(x)
    torch.manual_seed(0)
    assert torch.equal(dropout(x), first) and torch.equal(dropout(x), second)
    assert not torch.equal(first, second)


def test_gradcheck_and_gradgradcheck_fp64(device):
    x = torch.randn(4, 7, dtype=torch.float64, device=device, requires_grad=True)
    assert gradcheck(lambda t: dropout(t, 0.4, seed=11), (x,))
    assert torch.autograd.gradgradcheck(lambda t: dropout(t, 0.4, seed=11), (x,))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype, requires_grad):
    x = torch.randn(5, 9, dtype=dtype, device=device, requires_grad=requires_grad)
    seed = torch.tensor(2**40 + 1, dtype=torch.int64, device=device)
    torch.library.opcheck(dropout_fwd.custom_op, (x, 0.3, seed, gk.backend_name(device)))


def test_torch_compile_fullgraph_with_drawn_seed(device):
    x = torch.rand(64, 33, device=device) + 0.5
    x.requires_grad_()
    compiled = torch.compile(lambda t: dropout(t, 0.5), backend="aot_eager", fullgraph=True)
    y = compiled(x)
    kept = y.detach() != 0
    torch.testing.assert_close(y.detach()[kept], 2 * x.detach()[kept], rtol=0, atol=0)
    y.sum().backward()
    torch.testing.assert_close(x.grad, 2.0 * kept, rtol=0, atol=0)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), float("inf")])
def test_p_out_of_range(p):
    with pytest.raises(ValueError, match="p must"):
        dropout(torch.randn(3), p)


@pytest.mark.parametrize(
    "seed, error",
    [
        (1.5, TypeError),
        (True, TypeError),
        (2**63, ValueError),
        (torch.tensor(1.0), TypeError),
        (torch.tensor([1, 2]), TypeError),
    ],
)
def test_bad_seed(seed, error):
    with pytest.raises(error, match="seed"):
        dropout(torch.randn(3), 0.5, seed=seed)


@pytest.mark.parametrize("bad, error", [(torch.arange(3), TypeError), ([1.0, 2.0], TypeError)])
def test_bad_input(bad, error):
    with pytest.raises(error, match="input"):
        dropout(bad, 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_keeps_the_input_dtype(dtype):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dropout(torch.randn(8, dtype=dtype), 0.5, seed=0).dtype == dtype
