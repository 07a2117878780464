"""Every op against PyTorch and float64 on inputs in the layouts models hand it:
each case draws, from its own fixed seed, a dtype, a shape, options, and for
every tensor argument a layout (contiguous, its storage transposed, a view
stepping over elements, one element off the start of its storage, so not
16-byte aligned, expanded along a dim of stride 0, or its last two dims both of
stride 1, elements overlapping as in ``unfold``'s windows), and the upstream
gradient's layout. The output and the gradient of every input that requires one
are checked as the op suites check theirs (``helpers.assert_matches``). The
op suites test each layout on its own; these cases test them together, with
the options, on every backend."""

from __future__ import annotations

import random
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import gpukernels as gk
from helpers import assert_matches, torch_batch_norm_needs_cpu

CASES = range(12)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
LAYOUTS = ("contiguous", "transposed", "stepping", "offset", "expanded", "overlapping")


def _stepping(values: torch.Tensor) -> torch.Tensor:
    storage = values.new_zeros(*values.shape[:-1], 2 * values.shape[-1])
    storage[..., ::2] = values
    return storage


def _offset(values: torch.Tensor) -> torch.Tensor:
    storage = values.new_zeros(values.numel() + 1)
    storage[1:] = values.flatten()
    return storage


def _overlapping_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Strides that read the last two dims both one element apart (``unfold``'s windows:
    the view's element [..., i, j] is storage[... + i + j]), the dims before them packed."""
    strides, span = [1, 1], shape[-2] + shape[-1] - 1
    for size in reversed(shape[:-2]):
        strides.insert(0, span)
        span *= size
    return tuple(strides)


def _overlapping(values: torch.Tensor) -> torch.Tensor:
    """Storage for the overlapping view: as many of ``values`` as it reads, which are then
    not all in the places ``values`` has them (no storage holds every tensor so viewed)."""
    shape, strides = values.shape, _overlapping_strides(values.shape)
    return values.flatten()[: 1 + sum((n - 1) * s for n, s in zip(shape, strides))].clone()


# Each layout: how the leaf tensor stores the values, and how the view reads them from it.
_STORAGE = {
    "contiguous": torch.clone,  # keeps channels-last
    "transposed": lambda values: values.mT.contiguous(),
    "stepping": _stepping,
    "offset": _offset,
    "expanded": lambda values: values[:1].clone(),
    "overlapping": _overlapping,
}
_VIEW = {
    "contiguous": lambda leaf, shape: leaf,
    "transposed": lambda leaf, shape: leaf.mT,
    "stepping": lambda leaf, shape: leaf[..., ::2],
    "offset": lambda leaf, shape: leaf[1:].view(shape),
    "expanded": lambda leaf, shape: leaf.expand(shape),
    "overlapping": lambda leaf, shape: leaf.as_strided(shape, _overlapping_strides(shape)),
}


def laid_out(values: torch.Tensor, layout: str, requires_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(leaf, view)``: a leaf tensor and a view of it holding ``values`` (expanded:
    their first entry along dim 0, repeated), laid out as ``layout`` says (contiguous
    where the layout needs more dims than ``values`` has)."""
    dims_needed = {"transposed": 2, "stepping": 1, "expanded": 1, "overlapping": 2}.get(layout, 0)
    if values.dim() < dims_needed or (layout in ("expanded", "overlapping") and values.numel() == 0):
        layout = "contiguous"
    leaf = _STORAGE[layout](values)
    leaf.requires_grad_(requires_grad and leaf.is_floating_point())
    return leaf, _VIEW[layout](leaf, values.shape)


def check_case(
    rng: random.Random,
    dtype: torch.dtype,
    arguments: dict[str, tuple[torch.Tensor | None, str]],
    ours: Callable,
    theirs: Callable,
    no_grad: tuple[str, ...] = (),
) -> None:
    """``ours(**views)`` against ``theirs(**views)`` in ``dtype`` and ``theirs`` in float64, forward
    and backward: ``arguments`` maps each tensor argument to its values (in ``dtype``, or
    integers) and layout; those named in ``no_grad`` take none. The upstream gradient's
    layout is drawn from ``rng``."""
    gradient_layout = rng.choice(("contiguous", "transposed", "expanded"))
    gradient_seed = rng.randrange(2**31)
    results = []
    for fn, wide in ((ours, False), (theirs, False), (theirs, True)):
        leaves, views = [], {}
        for name, (values, layout) in arguments.items():
            if values is None:
                views[name] = None
                continue
            if wide and values.is_floating_point():
                values = values.double()
            leaf, views[name] = laid_out(values, layout, name not in no_grad)
            if leaf.requires_grad:
                leaves.append(leaf)
        out = fn(**views)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(gradient_seed), dtype=torch.float64)
        upstream = laid_out(upstream.to(dtype).to(out.dtype).to(out.device), gradient_layout, False)[1]
        grads = torch.autograd.grad(out, leaves, upstream) if leaves else ()
        results.append((out.detach(), [g.detach() for g in grads]))
    (out, grads), (torch_out, torch_grads), (reference, reference_grads) = results
    for ours_result, torch_result, reference_result in zip(
        (out, *grads), (torch_out, *torch_grads), (reference, *reference_grads), strict=True
    ):
        assert_matches(*_nans_apart(ours_result, torch_result, reference_result))


def _nans_apart(*results: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``results`` with the nans of the float64 reference (the last: a mean over no rows,
    say) zeroed, after checking that every result has them at the same places."""
    nans = results[-1].isnan()
    for result in results[:-1]:
        assert torch.equal(result.isnan(), nans), "nan where the float64 reference has none, or the reverse"
    return tuple(result.masked_fill(nans, 0) for result in results)


def random_values(rng: random.Random, shape: tuple[int, ...], dtype: torch.dtype, device, scale: float = 1.0):
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype).to(device)


@pytest.mark.family("layer_norm")
@pytest.mark.parametrize("case", CASES)
def test_layer_norm(device, case):
    rng = random.Random(f"layer_norm {case}")
    dtype, d = rng.choice(DTYPES), rng.choice((1, 3, 17, 64, 130))
    shape = rng.choice(((0,), (1,), (5,), (2, 3))) + (d,)
    eps = rng.choice((1e-5, 0.1))
    arguments = {
        "x": (random_values(rng, shape, dtype, device, rng.choice((1.0, 100.0))), rng.choice(LAYOUTS)),
        "weight": (random_values(rng, (d,), dtype, device) if rng.random() < 0.7 else None, rng.choice(LAYOUTS)),
        "bias": (random_values(rng, (d,), dtype, device) if rng.random() < 0.7 else None, rng.choice(LAYOUTS)),
    }
    check_case(
        rng,
        dtype,
        arguments,
        lambda x, weight, bias: gk.layer_norm(x, (d,), weight, bias, eps),
        lambda x, weight, bias: F.layer_norm(x, (d,), weight, bias, eps),
    )


@pytest.mark.family("rms_norm")
@pytest.mark.parametrize("case", CASES)
def test_rms_norm(device, case):
    rng = random.Random(f"rms_norm {case}")
    dtype, d = rng.choice(DTYPES), rng.choice((1, 3, 17, 64, 130))
    shape = rng.choice(((0,), (1,), (5,), (2, 3))) + (d,)
    eps = rng.choice((None, 0.1))
    arguments = {
        "x": (random_values(rng, shape, dtype, device), rng.choice(LAYOUTS)),
        "weight": (random_values(rng, (d,), dtype, device) if rng.random() < 0.7 else None, rng.choice(LAYOUTS)),
    }
    check_case(
        rng,
        dtype,
        arguments,
        lambda x, weight: gk.rms_norm(x, (d,), weight, eps),
        lambda x, weight: F.rms_norm(x, (d,), weight, eps),
    )


@pytest.mark.family("add_norm")
@pytest.mark.parametrize("case", CASES)
def test_add_norm(device, case):
    """add_layer_norm and add_rms_norm: both results stacked, so that one upstream gradient
    reaches both (input and residual of one dtype: the sum has it too)."""
    rng = random.Random(f"add_norm {case}")
    dtype, d = rng.choice(DTYPES), rng.choice((1, 3, 17, 64, 130))
    shape = rng.choice(((0,), (1,), (5,), (2, 3))) + (d,)
    # Not expanded parameters, which test_layer_norm and test_rms_norm draw (the same parameter
    # handling): their gradient is then one sum of d gradients each rounded to bf16/fp16, whose
    # error is that sum's walk of roundings more than the op's.
    parameter_layouts = [layout for layout in LAYOUTS if layout != "expanded"]
    arguments = {
        "x": (random_values(rng, shape, dtype, device), rng.choice(LAYOUTS)),
        "residual": (random_values(rng, shape, dtype, device, 3.0), rng.choice(LAYOUTS)),
        "weight": (random_values(rng, (d,), dtype, device) if rng.random() < 0.7 else None,
                   rng.choice(parameter_layouts)),
        "bias": (random_values(rng, (d,), dtype, device) if rng.random() < 0.7 else None,
                 rng.choice(parameter_layouts)),
    }  # fmt: skip
    if rng.random() < 0.5:
        check_case(
            rng,
            dtype,
            arguments,
            lambda x, residual, weight, bias: torch.stack(gk.add_layer_norm(x, residual, (d,), weight, bias)),
            lambda x, residual, weight, bias: torch.stack(
                (F.layer_norm(residual + x, (d,), weight, bias), residual + x)
            ),
        )
    else:
        arguments["bias"] = (None, "contiguous")
        check_case(
            rng,
            dtype,
            arguments,
            lambda x, residual, weight, bias: torch.stack(gk.add_rms_norm(x, residual, (d,), weight, 0.1)),
            lambda x, residual, weight, bias: torch.stack((F.rms_norm(residual + x, (d,), weight, 0.1), residual + x)),
        )


@pytest.mark.family("batch_norm")
@pytest.mark.parametrize("case", CASES)
def test_batch_norm(device, case):
    rng = random.Random(f"batch_norm {case}")
    dtype, channels = rng.choice(DTYPES), rng.choice((1, 3, 8))
    shape = (rng.choice((2, 5)), channels) + rng.choice(((), (5,), (3, 4), (2, 2, 3)))
    training = rng.random() < 0.7
    momentum, eps = rng.choice((0.1, 0.5)), rng.choice((1e-5, 0.1))
    param_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    layout = rng.choice(LAYOUTS[:4] + ("channels_last",))
    x = random_values(rng, shape, dtype, device)
    if layout == "channels_last":  # stored so, as the contiguous layout's clone keeps it
        layout = "contiguous"
        memory_format = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim(), torch.contiguous_format)
        x = x.contiguous(memory_format=memory_format)
    stats = (random_values(rng, (channels,), param_dtype, device), random_values(rng, (channels,), param_dtype, device))
    arguments = {
        "x": (x, layout),
        "weight": (random_values(rng, (channels,), param_dtype, device) if rng.random() < 0.7 else None, "contiguous"),
        "bias": (random_values(rng, (channels,), param_dtype, device) if rng.random() < 0.7 else None, "contiguous"),
    }

    def batch_norm(function):
        def call(x, weight, bias):
            # each call updates running stats of its own, float64 for the float64 reference
            mean, var = (s.to(torch.float64 if x.dtype == torch.float64 else param_dtype) for s in stats)
            return function(x, mean, var.abs() + 0.5, weight, bias, training, momentum, eps)

        return call

    check_case(rng, dtype, arguments, batch_norm(gk.batch_norm), batch_norm(_torch_batch_norm))


def _torch_batch_norm(x, mean, var, weight, bias, *options):
    """F.batch_norm, on CPU copies where its CUDA backward fails (torch_batch_norm_needs_cpu)."""
    if not torch_batch_norm_needs_cpu(x, weight, bias):
        return F.batch_norm(x, mean, var, weight, bias, *options)
    on_cpu = (None if t is None else t.cpu() for t in (x, mean, var, weight, bias))
    return F.batch_norm(*on_cpu, *options).to(x.device)


@pytest.mark.family("cross_entropy")
@pytest.mark.parametrize("case", CASES)
def test_cross_entropy(device, case):
    rng = random.Random(f"cross_entropy {case}")
    dtype, classes, rows = rng.choice(DTYPES), rng.choice((1, 2, 5, 33, 130)), rng.choice((0, 1, 4, 7))
    shape, target_shape = rng.choice((((rows, classes), (rows,)), ((rows, classes, 3), (rows, 3)), ((classes,), ())))
    probabilities = rng.random() < 0.25
    options = dict(
        reduction=rng.choice(("mean", "sum", "none")),
        label_smoothing=rng.choice((0.0, 0.1, 1.0)),
        ignore_index=-100 if probabilities else rng.choice((-100, 0, 1)),
        weight=random_values(rng, (classes,), dtype, device).abs() if rng.random() < 0.3 else None,
    )
    if probabilities:
        class_dim = 0 if len(shape) == 1 else 1
        target = random_values(rng, shape, torch.float64, device).softmax(class_dim).to(dtype)
    else:
        generator = torch.Generator().manual_seed(rng.randrange(2**31))
        target = torch.randint(0, classes, target_shape, generator=generator).to(rng.choice(TARGET_DTYPES)).to(device)
    arguments = {
        "input": (random_values(rng, shape, dtype, device, 3.0), rng.choice(LAYOUTS)),
        "target": (target, rng.choice(LAYOUTS[:4])),
    }
    check_case(
        rng,
        dtype,
        arguments,
        lambda input, target: gk.cross_entropy(input, target, **options),
        # PyTorch's takes int64 class indices only
        lambda input, target: F.cross_entropy(
            input, target if target.is_floating_point() else target.long(), **_widened(options, input)
        ),
        no_grad=("target",),
    )


TARGET_DTYPES = (torch.int64, torch.int32)


def _widened(options: dict, input: torch.Tensor) -> dict:
    """``options`` with a class weight in ``input``'s dtype (the float64 reference's)."""
    weight = options["weight"]
    return {**options, "weight": None if weight is None else weight.to(input.dtype)}


@pytest.mark.family("gated_act")
@pytest.mark.parametrize("case", CASES)
def test_gated_act(device, case):
    rng = random.Random(f"gated_act {case}")
    dtype = rng.choice(DTYPES)
    shape = rng.choice(((0, 4), (1,), (5, 7), (2, 3, 130)))
    activation = rng.choice(("silu", "none", "tanh"))
    ours = (lambda g, u: gk.swiglu(g, u)) if activation == "silu" else (lambda g, u: gk.geglu(g, u, activation))
    theirs = (
        (lambda g, u: F.silu(g) * u) if activation == "silu" else (lambda g, u: F.gelu(g, approximate=activation) * u)
    )
    if rng.random() < 0.4:  # gate and up as the halves of one projection's output
        arguments = {"hidden": (random_values(rng, shape[:-1] + (2 * shape[-1],), dtype, device), "contiguous")}
        check_case(
            rng,
            dtype,
            arguments,
            lambda hidden: ours(*hidden.chunk(2, -1)),
            lambda hidden: theirs(*hidden.chunk(2, -1)),
        )
        return
    arguments = {
        "g": (random_values(rng, shape, dtype, device), rng.choice(LAYOUTS)),
        "u": (random_values(rng, shape, dtype, device), rng.choice(LAYOUTS)),
    }
    check_case(rng, dtype, arguments, ours, theirs)


ACTIVATIONS = {
    "none": lambda y: y,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    "silu": F.silu,
}


@pytest.mark.family("linear_act")
@pytest.mark.parametrize("case", CASES)
def test_linear_act(device, case):
    rng = random.Random(f"linear_act {case}")
    dtype, features, outputs = rng.choice(DTYPES), rng.choice((1, 5, 16, 33)), rng.choice((1, 7, 16))
    activation = rng.choice(tuple(ACTIVATIONS))
    arguments = {
        "x": (
            random_values(rng, rng.choice(((0,), (1,), (6,), (2, 3))) + (features,), dtype, device),
            rng.choice(LAYOUTS),
        ),
        "weight": (random_values(rng, (outputs, features), dtype, device), rng.choice(LAYOUTS[:4])),
        "bias": (random_values(rng, (outputs,), dtype, device) if rng.random() < 0.6 else None, "contiguous"),
    }
    check_case(
        rng,
        dtype,
        arguments,
        lambda x, weight, bias: gk.linear_act(x, weight, bias, activation),
        lambda x, weight, bias: ACTIVATIONS[activation](F.linear(x, weight, bias)),
    )


@pytest.mark.family("linear_cross_entropy")
@pytest.mark.parametrize("case", CASES)
def test_linear_cross_entropy(device, case):
    rng = random.Random(f"linear_cross_entropy {case}")
    dtype, hidden, vocab = rng.choice(DTYPES), rng.choice((1, 8, 33)), rng.choice((1, 5, 130))
    rows = rng.choice((0, 1, 6))
    batch = rng.choice(((rows,), (2, rows)))
    options = dict(
        ignore_index=rng.choice((-100, 0)),
        reduction=rng.choice(("mean", "sum", "none")),
        label_smoothing=rng.choice((0.0, 0.1)),
    )
    chunk_size = rng.choice((None, 1, 2))
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    arguments = {
        "x": (random_values(rng, batch + (hidden,), dtype, device), rng.choice(LAYOUTS)),
        "weight": (random_values(rng, (vocab, hidden), dtype, device), rng.choice(LAYOUTS[:4])),
        "target": (torch.randint(0, vocab, batch, generator=generator).to(device), rng.choice(LAYOUTS[:4])),
        "bias": (random_values(rng, (vocab,), dtype, device) if rng.random() < 0.4 else None, "contiguous"),
    }

    def theirs(x, weight, target, bias):
        logits = F.linear(x, weight, bias).flatten(0, -2)
        # in fp32 for bf16/fp16, as ours computes the loss; the loss in x's dtype
        loss = F.cross_entropy(logits.float() if logits.dtype in DTYPES[2:] else logits, target.flatten(), **options)
        return loss.to(x.dtype)

    def ours(x, weight, target, bias):
        loss = gk.linear_cross_entropy(x, weight, target, bias, chunk_size=chunk_size, **options)
        return loss.flatten() if options["reduction"] == "none" else loss

    check_case(rng, dtype, arguments, ours, theirs, no_grad=("target",))
