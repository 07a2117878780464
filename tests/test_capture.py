"""gk.capture_step: a whole training step (forward, backward, clipping, AdamW)
captured in a CUDA graph. The requirements' errors run everywhere; the
replays need a GPU."""

from __future__ import annotations

import math

import pytest
import torch

import gpukernels as gk
from gpukernels.capture import capture_step


def _model(dropout: float, device, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.LayerNorm(32),
        torch.nn.Linear(32, 64),
        torch.nn.GELU(),
        torch.nn.Dropout(dropout),
        torch.nn.Linear(64, 10),
    ).to(device)
    gk.patch(model)
    return model


def _step_fn(model, optimizer, loss_fn):
    def step(x, y):
        loss = loss_fn(model(x), y)
        loss.backward()
        gk.optim.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.detach()

    return step


def test_inputs_must_be_cuda_tensors():
    with pytest.raises(ValueError, match=r"example_inputs\[0\] is on cpu"):
        capture_step(lambda x, y: x, torch.ones(2), torch.ones(2))
    with pytest.raises(TypeError, match=r"example_inputs\[0\] must be a tensor"):
        capture_step(lambda x: x, 3.0)


def test_a_float_lr_is_refused_with_the_fix():
    optimizer = gk.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=1e-3)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['lr'\] is float.*torch.tensor"):
        capture_step(lambda: None, optimizer=optimizer)


def test_warmup_steps_must_be_positive():
    with pytest.raises(ValueError, match="warmup_steps"):
        capture_step(lambda: None, warmup_steps=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_no_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        capture_step(lambda: None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captured_steps_equal_eager_steps_without_dropout():
    """50 replays against 50 eager steps of a twin model, step by step, lr changed in place."""
    device = torch.device("cuda")
    data = [(torch.randn(16, 32, device=device), torch.randint(0, 10, (16,), device=device)) for _ in range(53)]
    eager_model, graphed_model = _model(0.0, device), _model(0.0, device)
    loss_fn = gk.nn.CrossEntropyLoss()
    lr = torch.tensor(1e-2, dtype=torch.float64, device=device)
    eager_opt = gk.optim.AdamW(eager_model.parameters(), lr=torch.tensor(1e-2, dtype=torch.float64, device=device))
    graphed_opt = gk.optim.AdamW(graphed_model.parameters(), lr=lr)
    eager_step, graphed_step = _step_fn(eager_model, eager_opt, loss_fn), _step_fn(graphed_model, graphed_opt, loss_fn)
    captured = capture_step(graphed_step, *data[0], optimizer=graphed_opt, warmup_steps=3)
    for _ in range(3):  # the warm-up steps ran on the example inputs
        eager_opt.zero_grad(set_to_none=True)
        eager_step(*data[0])
    for i, (x, y) in enumerate(data[3:]):
        lr.fill_(1e-2 / (1 + i))
        eager_opt.param_groups[0]["lr"].fill_(1e-2 / (1 + i))
        eager_opt.zero_grad(set_to_none=True)
        expected = eager_step(x, y)
        assert torch.equal(captured(x, y), expected), f"step {i}"
    for p, q in zip(graphed_model.parameters(), eager_model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dropout_draws_a_new_mask_on_every_replay():
    device, p, n = torch.device("cuda"), 0.3, 1 << 16
    x = torch.ones(n, device=device)
    captured = capture_step(gk.nn.Dropout(p), x, warmup_steps=2)
    masks = [captured(x).ne(0).clone() for _ in range(5)]
    sigma = math.sqrt(n * p * (1 - p))
    for mask in masks:
        assert abs(mask.sum().item() - n * (1 - p)) < 4 * sigma
    for a, b in zip(masks, masks[1:]):
        assert not torch.equal(a, b)


def test_capture_step_is_exported():
    assert gk.capture_step is capture_step
