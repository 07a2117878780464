"""The two ways into an op (ops/_op.py): directly in plain eager mode, through
the torch.library custom op wherever its dispatch is needed. Both give the same
results to the bit, and each is taken exactly where it should be."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import gpukernels as gk
import gpukernels.ops._op as eager
from gpukernels.ops._op import needs_dispatch


def _randn(*shape, seed=0, **kwargs):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def _layer_norm():
    x, w, b = _randn(6, 10), _randn(10, seed=1), _randn(10, seed=2)
    return (x, w, b), lambda x, w, b: gk.layer_norm(x, (10,), w, b)


def _cross_entropy():
    x, target = _randn(6, 9), torch.tensor([0, 3, -100, 8, 2, 2])
    weight = _randn(9, seed=1).abs() + 0.1
    return (x,), lambda x: gk.cross_entropy(x, target, weight=weight, label_smoothing=0.1)


def _dropout():
    return (_randn(5, 7),), lambda x: gk.dropout(x, 0.3, seed=5)


def _batch_norm():
    x, w, b = _randn(4, 3, 5), _randn(3, seed=1), _randn(3, seed=2)
    running = (torch.zeros(3), torch.ones(3))
    return (x, w, b), lambda x, w, b: gk.batch_norm(x, *running, w, b, training=True)


def _linear_act():
    x, w, b = _randn(6, 8), _randn(5, 8, seed=1), _randn(5, seed=2)
    return (x, w, b), lambda x, w, b: gk.linear_act(x, w, b, "gelu")


def _linear_cross_entropy():
    x, w, target = _randn(6, 8), _randn(11, 8, seed=1), torch.tensor([0, 10, 3, -100, 5, 5])
    return (x, w), lambda x, w: gk.linear_cross_entropy(x, w, target, label_smoothing=0.1, z_loss=1e-3)


CASES = {
    "layer_norm": _layer_norm,
    "cross_entropy": _cross_entropy,
    "dropout": _dropout,
    "batch_norm": _batch_norm,
    "linear_act": _linear_act,
    "linear_cross_entropy": _linear_cross_entropy,
}


def _forward_backward(case):
    inputs, fn = case()
    inputs = [t.requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.backward(_randn(*out.shape, seed=9))
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("op", CASES)
def test_direct_and_dispatched_calls_agree_to_the_bit(op, monkeypatch):
    direct = _forward_backward(CASES[op])
    monkeypatch.setattr(eager, "needs_dispatch", lambda args: True)
    dispatched = _forward_backward(CASES[op])
    assert torch.equal(direct[0], dispatched[0])
    for d, g in zip(direct[1], dispatched[1]):
        assert torch.equal(d, g)


def _op_events(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("gpukernels::")}


def test_plain_eager_calls_skip_the_dispatcher(monkeypatch):
    assert _op_events(lambda: _forward_backward(_layer_norm)) == set()
    monkeypatch.setattr(eager, "needs_dispatch", lambda args: True)
    assert {"gpukernels::layer_norm_fwd", "gpukernels::layer_norm_bwd"} <= _op_events(
        lambda: _forward_backward(_layer_norm)
    )


def test_adamw_step_takes_the_direct_path_and_matches_the_op(monkeypatch):
    def step():
        params = [torch.nn.Parameter(_randn(4, 3))]
        params[0].grad = _randn(4, 3, seed=1)
        gk.optim.AdamW(params, lr=0.1).step()
        return params[0].detach()

    assert _op_events(step) == set()
    direct = step()
    monkeypatch.setattr(eager, "needs_dispatch", lambda args: True)
    assert "gpukernels::adamw_step_" in _op_events(step)
    assert torch.equal(step(), direct)


def test_needs_dispatch_for_plain_tensors_and_parameters_is_false():
    assert not needs_dispatch((torch.ones(2), torch.nn.Parameter(torch.ones(2)), None, 1.0, [torch.ones(1)], "x"))


def test_needs_dispatch_under_fake_and_meta_tensors_and_modes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = torch.ones(2)
        assert needs_dispatch((fake,))
    assert needs_dispatch((mode.from_tensor(torch.ones(2)),))
    assert needs_dispatch((torch.ones(2, device="meta"),))
    assert needs_dispatch(([torch.ones(2), torch.ones(2, device="meta")],))
    with torch.device("cpu"):  # a torch-function mode
        assert needs_dispatch((torch.ones(2),))


def test_needs_dispatch_inside_vmap_and_under_compile():
    seen = []

    def record(x):
        seen.append(needs_dispatch((x,)))
        return x * 2

    torch.vmap(record)(torch.ones(3, 2))
    torch.compile(record, backend="eager")(torch.ones(2))
    assert seen == [True, True]


def test_needs_dispatch_for_a_tensor_subclass():
    class Tagged(torch.Tensor):
        pass

    assert needs_dispatch((torch.ones(2).as_subclass(Tagged),))


def _no_autograd_functions(monkeypatch):
    """Every op's autograd.Function (and batch_norm's) raises when applied."""

    def refuse(*args):
        raise AssertionError("an autograd.Function ran with grad mode off")

    for op in eager.OPS.values():
        if op._eager is not op._run:
            monkeypatch.setattr(op, "_eager", refuse)
    monkeypatch.setattr(gk.ops.batch_norm, "_apply_eagerly", refuse)


@pytest.mark.parametrize("op", CASES)
def test_with_grad_mode_off_no_autograd_function_runs(op, monkeypatch):
    """Inference (grad mode off): the op's implementation runs without an
    autograd.Function around it (its context and saved tensors cost host time and
    serve nothing), with the result to the bit."""
    inputs, fn = CASES[op]()
    expected = fn(*(t.requires_grad_() for t in inputs)).detach()
    _no_autograd_functions(monkeypatch)
    with torch.no_grad():
        assert torch.equal(fn(*inputs), expected)


def test_dropouts_backward_runs_no_autograd_function(monkeypatch):
    """Dropout's backward is dropout again: without create_graph (grad mode off in the
    backward) it makes no autograd node of its own."""
    (x,), fn = _dropout()
    x.requires_grad_()
    (expected,) = torch.autograd.grad(fn(x).sum(), x)
    y = fn(x)
    _no_autograd_functions(monkeypatch)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(grad, expected)
