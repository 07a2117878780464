"""The op-definition layer: every backend meets every op's kernel contract, and
a backward runs on its forward's backend."""

import importlib
import importlib.util
import inspect

import pytest
import torch
import torch.nn.functional as F

import gpukernels as gk
from gpukernels._backend import BACKENDS
from gpukernels.ops._op import OPS, KernelOp


def _backend_kernels():
    for op in OPS.values():
        for backend in BACKENDS:
            module = f"gpukernels.backends.{backend}.{op.family}"
            if backend == "cupy" and importlib.util.find_spec(module) is None:
                continue  # the CuPy backend has some families only
            yield pytest.param(op, backend, id=f"{backend}-{op.name}")


def test_every_op_is_declared():
    assert {"layer_norm_fwd", "layer_norm_bwd"} <= set(OPS)


@pytest.mark.parametrize("op,backend", list(_backend_kernels()))
def test_backend_meets_the_kernel_contract(op: KernelOp, backend: str):
    """kernel(*inputs, *outputs) -> None: the op's inputs but the backend, then one
    argument per output of the op's schema, in order."""
    module = importlib.import_module(f"gpukernels.backends.{backend}.{op.family}")
    kernel = getattr(module, op.name, None)
    assert callable(kernel), f"backend {backend!r} has no kernel {op.name!r}"
    outputs = len(op.custom_op._opoverload._schema.returns)
    params = [p for p in inspect.signature(kernel).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert len(params) == len(op.kernel_inputs) + outputs, \
        f"{backend}.{op.family}.{op.name}{inspect.signature(kernel)}: want {op.kernel_inputs} + {outputs} output(s)"


# (name, forward+backward on CPU tensors): each op family with a backward
FORWARD_BACKWARD = {
    "layer_norm": (lambda x: gk.layer_norm(x, (x.shape[-1],)), lambda x: F.layer_norm(x, (x.shape[-1],))),
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
