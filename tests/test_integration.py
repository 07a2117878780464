"""Every op together: torch.compile(fullgraph=True), and a short training run
that tracks the same model built from torch.nn step for step."""

import pytest
import torch

import gpukernels as gk
from gpukernels import nn as gnn

pytestmark = pytest.mark.family("linear_act", "layer_norm", "dropout", "batch_norm", "cross_entropy", "adamw")


class Net(torch.nn.Module):
    """LinearAct -> LayerNorm -> Dropout -> LinearAct -> BatchNorm1d -> Linear, built from
    gpukernels.nn or from the torch.nn modules it replaces."""

    def __init__(self, ours: bool, d_in=12, hidden=32, classes=5, p=0.0, seed=None):
        super().__init__()
        if ours:
            self.fc1 = gnn.LinearAct(d_in, hidden, "gelu")
            self.act1 = torch.nn.Identity()
            self.norm1 = gnn.LayerNorm(hidden)
            self.drop = gnn.Dropout(p, seed=seed)
            self.fc2 = gnn.LinearAct(hidden, hidden, "silu")
            self.act2 = torch.nn.Identity()
            self.norm2 = gnn.BatchNorm1d(hidden)
            self.loss = gnn.CrossEntropyLoss(label_smoothing=0.1)
        else:
            self.fc1 = torch.nn.Linear(d_in, hidden)
            self.act1 = torch.nn.GELU()
            self.norm1 = torch.nn.LayerNorm(hidden)
            self.drop = torch.nn.Dropout(p)
            self.fc2 = torch.nn.Linear(hidden, hidden)
            self.act2 = torch.nn.SiLU()
            self.norm2 = torch.nn.BatchNorm1d(hidden)
            self.loss = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
        self.head = torch.nn.Linear(hidden, classes)

    def forward(self, x, target):
        h = self.drop(self.norm1(self.act1(self.fc1(x))))
        h = self.norm2(self.act2(self.fc2(h)))
        return self.loss(self.head(h), target)


def _pair(device="cpu", **kw):
    torch.manual_seed(0)
    theirs = Net(ours=False, **kw).to(device)
    ours = Net(ours=True, **kw).to(device)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


_TEACHER = torch.randn(12, 5, generator=torch.Generator().manual_seed(99))


def _batch(step, n=16, device="cpu"):
    """A learnable task: labels from a fixed linear teacher."""
    x = torch.randn(n, _TEACHER.shape[0], generator=torch.Generator().manual_seed(step))
    return x.to(device), (x @ _TEACHER).argmax(1).to(device)


def test_state_dict_keys_are_torch_names():
    ours, theirs = _pair()
    assert list(ours.state_dict()) == list(theirs.state_dict())


def test_compile_fullgraph_matches_eager(device):
    ours, _ = _pair(device, p=0.3, seed=123)
    x, t = _batch(0, device=device)
    eager_loss = ours(x, t)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in ours.parameters()]
    ours.zero_grad()
    ours2, _ = _pair(device, p=0.3, seed=123)  # fresh running stats: the eager call updated ours'
    compiled = torch.compile(ours2, fullgraph=True, backend="aot_eager")
    loss = compiled(x, t)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    for p, g in zip(ours2.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g)
    torch.testing.assert_close(ours2.norm2.running_mean, ours.norm2.running_mean)


@pytest.mark.slow
def test_compile_inductor_matches_eager():
    ours, _ = _pair(p=0.3, seed=7)
    ours.eval()
    x, t = _batch(1)
    compiled = torch.compile(ours, fullgraph=True)
    torch.testing.assert_close(compiled(x, t), ours(x, t))


def test_training_tracks_torch_nn(device):
    ours, theirs = _pair(device)
    opt_ours = gk.optim.AdamW(ours.parameters(), lr=3e-3, weight_decay=0.01)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=3e-3, weight_decay=0.01)
    for step in range(40):
        x, t = _batch(step, device=device)
        losses = []
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            loss = model(x, t)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-4 * abs(losses[1]), (step, losses)
    assert losses[1] < 1.0  # it learned: ln(5) = 1.61 at the start


def test_compiled_training_step_matches_eager(device):
    """Forward, backward, AdamW with its clip and zero_grad in one compiled function, as a
    user compiles a training step: the eager steps' losses, params and grad norms."""
    runs = []
    for compiled in (False, True):
        ours, _ = _pair(device)
        opt = gk.optim.AdamW(ours.parameters(), lr=3e-3, max_grad_norm=0.5)

        def step(x, t):
            loss = ours(x, t)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

        step = torch.compile(step, backend="aot_eager") if compiled else step
        losses = [step(*_batch(i, device=device)).detach() for i in range(3)]
        runs.append((losses, [p.detach() for p in ours.parameters()], opt.grad_norm))
    (eager_losses, eager_params, eager_norm), (losses, params, norm) = runs
    torch.testing.assert_close(losses, eager_losses)
    torch.testing.assert_close(params, eager_params)
    torch.testing.assert_close(norm, eager_norm)


def test_compile_fullgraph_with_a_float_argument_that_changes():
    """A float that changes between calls becomes symbolic when dynamo recompiles:
    the argument checks must trace it."""
    x = torch.randn(4, 8)
    compiled = torch.compile(lambda x, eps: gk.layer_norm(x, (8,), eps=eps), fullgraph=True, backend="aot_eager")
    for eps in (1e-5, 1e-6, 1e-3):
        torch.testing.assert_close(compiled(x, eps), torch.nn.functional.layer_norm(x, (8,), eps=eps))


def test_meta_tensors_as_torch_nn():
    """On meta tensors (a model built under ``torch.device("meta")``, say, for its shapes)
    the modules and the loss give what torch.nn's give, forward and backward, with no
    kernel run; the optimizer steps too."""
    outputs = []
    for ours in (True, False):
        torch.manual_seed(0)
        with torch.device("meta"):
            net = Net(ours)
            loss = net(torch.empty(8, 12), torch.empty(8, dtype=torch.long))
        loss.backward()
        optimizer = (gk.optim.AdamW if ours else torch.optim.AdamW)(net.parameters())
        optimizer.step()
        outputs.append([(t.shape, t.dtype, t.device) for t in (loss, *(p.grad for p in net.parameters()))])
    assert outputs[0] == outputs[1]
