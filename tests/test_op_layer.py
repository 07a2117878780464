"""The op-definition layer: every backend meets every op's kernel contract, and
a backward runs on its forward's backend."""

import contextlib
import importlib
import importlib.util
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import gpukernels as gk
from gpukernels._backend import BACKENDS
from gpukernels.backends.numpy.philox import element_halves
from gpukernels.ops._op import OPS, KernelOp


def _backend_kernels():
    for op in OPS.values():
        for backend in BACKENDS:
            module = f"gpukernels.backends.{backend}.{op.family}"
            if backend == "cupy" and importlib.util.find_spec(module) is None:
                continue  # the CuPy backend has some families only
            yield pytest.param(op, backend, id=f"{backend}-{op.name}")


def test_backend_for_a_tensor_is_backend_name_of_its_device(monkeypatch):
    """The ops resolve the backend from their first tensor without reading its device
    where the default does not need it: the same answer as backend_name, selected,
    from the environment, by default, or a BackendError."""
    from gpukernels._backend import backend_for, backend_name

    monkeypatch.delenv("GPUKERNELS_BACKEND", raising=False)
    tensors = [torch.ones(2), torch.ones(2, device="meta")]
    if torch.cuda.is_available():
        tensors.append(torch.ones(2, device="cuda"))
    for setting in [lambda: gk.use_backend(None), lambda: gk.use_backend("numpy")]:
        with setting():
            for env in (None, "triton"):
                if env is not None:
                    monkeypatch.setenv("GPUKERNELS_BACKEND", env)
                for t in tensors:
                    try:
                        expected = backend_name(t.device)
                    except gk.BackendError as e:
                        with pytest.raises(gk.BackendError, match=str(e)):
                            backend_for(t)
                        continue
                    assert backend_for(t) == expected, (t.device, env)
                monkeypatch.delenv("GPUKERNELS_BACKEND", raising=False)
    assert backend_for(torch.ones(2)) == "numpy"


def test_every_op_is_declared():
    assert {"dropout_fwd", "batch_norm_fwd", "batch_norm_bwd"} <= set(OPS)
    assert {"linear_act_fwd", "linear_act_bwd", "adamw_step_"} <= set(OPS)
    assert {
        "layer_norm_fwd",
        "layer_norm_bwd",
        "rms_norm_fwd",
        "rms_norm_bwd",
        "gated_act_fwd",
        "gated_act_bwd",
        "rope",
    } <= set(OPS)
    assert {
        "cross_entropy_fwd",
        "cross_entropy_bwd",
        "cross_entropy_probs_fwd",
        "cross_entropy_probs_bwd",
        "linear_cross_entropy_fwd",
        "linear_cross_entropy_bwd",
    } <= set(OPS)


@pytest.mark.parametrize("op,backend", list(_backend_kernels()))
def test_backend_meets_the_kernel_contract(op: KernelOp, backend: str):
    """kernel(*inputs, *outputs) -> None: the op's inputs but the backend, then one
    argument per output of the op's schema, in order."""
    module = importlib.import_module(f"gpukernels.backends.{backend}.{op.family}")
    kernel = getattr(module, op.name, None)
    assert callable(kernel), f"backend {backend!r} has no kernel {op.name!r}"
    outputs = len(op.custom_op._opoverload._schema.returns)
    params = [
        p
        for p in inspect.signature(kernel).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    assert len(params) == len(op.kernel_inputs) + outputs, (
        f"{backend}.{op.family}.{op.name}{inspect.signature(kernel)}: want {op.kernel_inputs} + {outputs} output(s)"
    )


def _dropout_reference(x, p=0.3, seed=5):
    """x times the mask of the uniform keep test, scaled: inverted dropout in torch ops."""
    keep = element_halves(seed, x.numel()) / 2**16 >= p
    return x * torch.from_numpy(keep).view(x.shape) / (1 - p)


_ANGLES = torch.linspace(0.0, 3.0, 32, dtype=torch.float64).view(1, 4, 8)


def _rope_of_x(rope, x):
    """q (2, 3, 4, 8) and k (2, 1, 4, 8) cut from x (6, 33), rotated, as one flat tensor."""
    q, k = x[:, :32].reshape(2, 3, 4, 8), x[:2, :32].reshape(2, 1, 4, 8)
    return torch.cat([t.flatten() for t in rope(q, k, _ANGLES.cos(), _ANGLES.sin())])


def _torch_rope(q, k, cos, sin):
    def rotate_half(t):
        return torch.cat((-t[..., 4:], t[..., :4]), dim=-1)

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# (name, forward+backward on CPU tensors): each op family with a backward
FORWARD_BACKWARD = {
    "rope": (lambda x: _rope_of_x(gk.apply_rotary_pos_emb, x), lambda x: _rope_of_x(_torch_rope, x)),
    "layer_norm": (lambda x: gk.layer_norm(x, (x.shape[-1],)), lambda x: F.layer_norm(x, (x.shape[-1],))),
    "dropout": (lambda x: gk.dropout(x, 0.3, seed=5), _dropout_reference),
    "batch_norm": (
        lambda x: gk.batch_norm(x, None, None, training=True),
        lambda x: F.batch_norm(x, None, None, training=True),
    ),
    "rms_norm": (lambda x: gk.rms_norm(x, (x.shape[-1],)), lambda x: F.rms_norm(x, (x.shape[-1],))),
    "swiglu": (lambda x: gk.swiglu(x, x.flip(-1)), lambda x: F.silu(x) * x.flip(-1)),
    "geglu": (lambda x: gk.geglu(x, x.flip(-1)), lambda x: F.gelu(x) * x.flip(-1)),
    # weight and bias cut from x: its grad takes dx, dweight and dbias
    "linear_act": (
        lambda x: gk.linear_act(x, x[:4], x[-1, :4], "gelu"),
        lambda x: F.gelu(F.linear(x, x[:4], x[-1, :4])),
    ),
    "cross_entropy": (
        lambda x: gk.cross_entropy(x, torch.tensor([0, 32, 5, -100, 17, 1]), label_smoothing=0.1),
        lambda x: F.cross_entropy(x, torch.tensor([0, 32, 5, -100, 17, 1]), label_smoothing=0.1),
    ),
    # class probabilities cut from x: its grad takes the target's too
    "cross_entropy_probs": (
        lambda x: gk.cross_entropy(x, x.flip(-1).softmax(-1), label_smoothing=0.1),
        lambda x: F.cross_entropy(x, x.flip(-1).softmax(-1), label_smoothing=0.1),
    ),
    "linear_cross_entropy": (
        lambda x: gk.linear_cross_entropy(x, x[:5], torch.tensor([0, 4, 2, -100, 1, 3])),
        lambda x: F.cross_entropy(F.linear(x, x[:5]), torch.tensor([0, 4, 2, -100, 1, 3])),
    ),
}


@pytest.mark.parametrize("name", sorted(FORWARD_BACKWARD))
def test_backward_runs_on_the_forwards_backend(name, monkeypatch):
    """Forward on NumPy, a backend that cannot run here selected by the environment
    when the backward runs: the forward's backend runs the backward."""
    ours, theirs = FORWARD_BACKWARD[name]
    monkeypatch.setenv("GPUKERNELS_BACKEND", "cupy")
    x = torch.randn(6, 33, dtype=torch.float64, requires_grad=True)
    with gk.use_backend("numpy"):
        y = ours(x)
    assert gk.backend_name(x.device) == "cupy"
    y.backward(torch.ones_like(y))
    reference = x.detach().clone().requires_grad_()
    theirs(reference).backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, reference.grad)


class _PassThroughMode(TorchDispatchMode):
    """Any dispatch mode sends an op through the custom op instead of the eager bypass."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", sorted(FORWARD_BACKWARD))
@pytest.mark.parametrize("through", ["eager", "custom_op"])
def test_second_derivative_is_exact_or_refused(name, through):
    """A second derivative through an op's backward: dropout's (linear, its backward
    is dropout again) equals PyTorch's; every other op's backward runs kernels
    without autograd, so it must raise rather than leave that op's term out of a
    sum of terms (here ``f(x)**3 + x**3``: the second term alone would go unnoticed)."""
    ours, theirs = FORWARD_BACKWARD[name]
    x = torch.randn(6, 33, dtype=torch.float64, requires_grad=True)

    def second_derivative(f, x):
        (grad,) = torch.autograd.grad((f(x) ** 3).sum() + (x**3).sum(), x, create_graph=True)
        (second,) = torch.autograd.grad(grad.sum(), x)
        return second

    with _PassThroughMode() if through == "custom_op" else contextlib.nullcontext():
        if name != "dropout":
            with pytest.raises(RuntimeError, match="differentiate twice"):
                second_derivative(ours, x)
            return
        second = second_derivative(ours, x)
    torch.testing.assert_close(second, second_derivative(theirs, x))
