"""AdamW (the optimizer and its op ``gpukernels::adamw_step_``), the
warmup-cosine schedule and gradient-norm clipping, against PyTorch's
torch.optim.AdamW / SequentialLR / clip_grad_norm_ and a float64 AdamW.

The tests that run the op's kernel take conftest's ``device`` (NumPy on CPU,
Triton on CPU through the interpreter, Triton on CUDA); under the
interpreter they take fewer steps (``_steps``), with the same tolerances."""

from __future__ import annotations

import copy
import io
import math
from typing import Callable

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

import gpukernels as gk
import gpukernels._backend as gk_backend
from gpukernels.backends._layout import in_param_layout
from gpukernels.ops.adamw import adamw_step_
from gpukernels.optim import AdamW, clip_grad_norm_, warmup_cosine
from helpers import TOLERANCES, assert_matches, rel_err

pytestmark = pytest.mark.family("adamw")  # conftest's device fixture skips backends without them
STEPS = 100
INTERPRETER_STEPS = 6  # the interpreter runs each program in Python: a few ms each


def _steps(device: torch.device) -> int:
    interpreting = device.type == "cpu" and gk.backend_name(device) == "triton"
    return INTERPRETER_STEPS if interpreting else STEPS


def _model(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(17, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5)).to(device, dtype)


def _train(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, clip: Callable | None = None
) -> list[torch.Tensor | None]:
    """``steps`` optimizer steps on a fixed regression batch; the grads depend
    on the params, so any difference in an update shows up in the next grads.
    ``clip(params)``, if given, runs between backward and step. Returns each
    step's grad norm: ``clip``'s, else the optimizer's ``grad_norm`` if any."""
    param = next(model.parameters())
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randn(64, features, generator=g).to(param.device, param.dtype) for features in (17, 5))
    norms = []
    for _ in range(steps):
        optimizer.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        norm = clip(model.parameters()) if clip else None
        optimizer.step()
        norms.append(norm if clip else getattr(optimizer, "grad_norm", None))
    return norms


def _split_groups(model: torch.nn.Module) -> list[dict]:
    return [
        {"params": model[0].parameters(), "lr": 3e-3, "weight_decay": 0.0},
        {"params": model[2].parameters(), "lr": 1e-3, "betas": (0.8, 0.99)},
    ]


CONFIGS = {
    "default": {},
    "no_decay": dict(weight_decay=0.0),
    "decay_0.1": dict(weight_decay=0.1),
    "amsgrad": dict(amsgrad=True, lr=3e-3),
    "maximize": dict(maximize=True),
    "small_beta1": dict(betas=(0.3, 0.99)),  # the other branch of PyTorch's lerp
    "param_groups": dict(groups=_split_groups, weight_decay=0.05),
}


def _params(model: torch.nn.Module, config: dict):
    groups = config.get("groups")
    return groups(model) if groups else model.parameters()


def _options(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "groups"}


def _assert_same_trajectory(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert_matches(p.detach(), q.detach())


def _assert_same_state(ours: torch.optim.Optimizer, theirs: torch.optim.Optimizer, state_dtype: torch.dtype) -> None:
    for p, q in zip(ours.state, theirs.state, strict=True):
        ours_state, theirs_state = ours.state[p], theirs.state[q]
        assert ours_state.keys() == theirs_state.keys()
        assert ours_state["step"].shape == () and ours_state["step"].dtype == torch.float32
        assert ours_state["step"].item() == theirs_state["step"].item()
        for key in ours_state.keys() - {"step"}:
            assert ours_state[key].dtype == state_dtype
            assert_matches(ours_state[key], theirs_state[key].to(state_dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_matches_torch_adamw(device, config, dtype):
    ours_model, theirs_model = _model(dtype, device), _model(dtype, device)
    ours = AdamW(_params(ours_model, config), **_options(config))
    theirs = torch.optim.AdamW(_params(theirs_model, config), **_options(config))
    _train(ours_model, ours, _steps(device))
    _train(theirs_model, theirs, _steps(device))
    _assert_same_trajectory(ours_model, theirs_model)
    _assert_same_state(ours, theirs, dtype)


@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64], ids=str)
def test_tensor_lr_matches_float_lr_and_is_read_at_each_step(device, lr_dtype):
    lr = torch.tensor(3e-3, dtype=lr_dtype, device=device)
    ours_model, theirs_model = _model(device=device), _model(device=device)
    ours = AdamW(ours_model.parameters(), lr=lr)
    theirs = torch.optim.AdamW(theirs_model.parameters(), lr=lr.item())
    for new_lr in (3e-3, 1e-2):
        lr.fill_(new_lr)
        theirs.param_groups[0]["lr"] = lr.item()
        _train(ours_model, ours, _steps(device) // 2)
        _train(theirs_model, theirs, _steps(device) // 2)
    assert ours.param_groups[0]["lr"] is lr
    _assert_same_trajectory(ours_model, theirs_model)


def test_beta1_zero_makes_exp_avg_the_last_grad_exactly(device):
    """PyTorch's lerp switches formula for weights >= 0.5 so that weight 1
    gives the end point exactly; ours does the same."""
    param = torch.nn.Parameter(torch.zeros(1000, device=device))
    optimizer = AdamW([param], betas=(0.0, 0.99))
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        param.grad = torch.randn(1000, generator=g).to(device)
        optimizer.step()
        assert torch.equal(optimizer.state[param]["exp_avg"], param.grad)


def _reference_adamw(
    param: torch.Tensor,
    grads: list[torch.Tensor],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
):
    """AdamW's update in float64, the param rounded to its dtype after each step."""
    beta1, beta2 = betas
    p = param.double()
    m, v, vmax = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
    for t, grad in enumerate(grads, start=1):
        g = -grad.double() if maximize else grad.double()
        p = p * (1 - lr * weight_decay)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        vmax = torch.maximum(vmax, v)
        second = vmax if amsgrad else v
        p = p - lr * (m / (1 - beta1**t)) / ((second / (1 - beta2**t)).sqrt() + eps)
        p = p.to(param.dtype).double()
    return p.to(param.dtype), m, v


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_matches_float64_reference_with_fp32_state(device, dtype, amsgrad):
    """Fixed grads, so that each optimizer's trajectory depends on its own
    arithmetic only; the lr is large enough for updates to survive bf16
    rounding. PyTorch's own AdamW on the same dtype (its state in that dtype;
    in fp16 its eps underflows to 0 and it divides by zero) is the yardstick."""
    options = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, amsgrad=amsgrad, maximize=False)
    g = torch.Generator().manual_seed(2)
    start = torch.randn(4097, generator=g).to(dtype)
    grads = [torch.randn(4097, generator=g).to(dtype) for _ in range(_steps(device))]
    ours, theirs = (torch.nn.Parameter(start.to(device, copy=True)) for _ in range(2))
    ours_opt, theirs_opt = AdamW([ours], **options), torch.optim.AdamW([theirs], **options)
    for grad in grads:
        ours.grad, theirs.grad = grad.to(device, copy=True), grad.to(device, copy=True)
        ours_opt.step()
        theirs_opt.step()
    ref_param, ref_m, ref_v = _reference_adamw(start, grads, **options)

    state = ours_opt.state[ours]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    torch.testing.assert_close(state["exp_avg"].cpu().double(), ref_m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state["exp_avg_sq"].cpu().double(), ref_v, rtol=1e-5, atol=1e-6)
    ours, theirs = ours.detach().cpu(), theirs.detach().cpu()
    assert_matches(ours, theirs, ref_param.double())
    if dtype != torch.float32:
        # Rounding the same value once per step, ours and the reference part
        # only where fp32 and fp64 fall on either side of a rounding boundary:
        # a few elements, so far less error than one rounding of each.
        assert (ours != ref_param).float().mean() < 0.01
        assert rel_err(ours, ref_param) < torch.finfo(dtype).eps / 10


# ---------------------------------------------------------------- clipping inside the step: max_grad_norm

CLIP_NORM = 0.3  # below _train's grad norm at its first steps (about 0.5), above it at its last (about 0.14)
CLIP_CONFIGS = {
    "clipped": dict(max_norm=CLIP_NORM),
    "amsgrad_maximize": dict(max_norm=CLIP_NORM, amsgrad=True, maximize=True),
    "param_groups": dict(max_norm=CLIP_NORM, groups=_split_groups),  # one norm over both groups
    "tensor_lr": dict(max_norm=CLIP_NORM, lr=3e-3, tensor_lr=True),
    "not_clipped": dict(max_norm=10.0),
    "inf_max_norm": dict(max_norm=float("inf")),
}


def _clip_options(config: dict, device: torch.device, lr_as_tensor: bool) -> dict:
    """An entry's optimizer options; its lr a tensor where it asks and ``lr_as_tensor``
    (ours; torch.optim.AdamW's foreach path on CUDA takes none)."""
    options = {k: v for k, v in config.items() if k not in ("groups", "max_norm", "tensor_lr")}
    if lr_as_tensor and config.get("tensor_lr"):
        options["lr"] = torch.tensor(options["lr"], dtype=torch.float64, device=device)
    return options


# fp64 for the first config only: the others change nothing that depends on the dtype
CLIP_CASES_BY_DTYPE = [
    pytest.param(config, dtype, id=f"{name}-{str(dtype).removeprefix('torch.')}")
    for i, (name, config) in enumerate(CLIP_CONFIGS.items())
    for dtype in ([torch.float32, torch.float64] if i == 0 else [torch.float32])
]


@pytest.mark.parametrize("config, dtype", CLIP_CASES_BY_DTYPE)
def test_max_grad_norm_equals_clip_grad_norm_then_step(device, config, dtype):
    """AdamW(max_grad_norm=m) against clip_grad_norm_(m) + step: with our AdamW
    the same trajectory and norms, bit for bit on CPU (the grad times the factor
    rounds as _foreach_mul_'s product does; on a GPU Triton may fuse it into a
    multiply-add); with PyTorch's clip and AdamW, to the dtype's tolerance."""
    max_norm = config["max_norm"]
    models = [_model(dtype, device) for _ in range(3)]
    fused = AdamW(_params(models[0], config), max_grad_norm=max_norm, **_clip_options(config, device, True))
    unfused = AdamW(_params(models[1], config), **_clip_options(config, device, True))
    theirs = torch.optim.AdamW(_params(models[2], config), **_clip_options(config, device, False))
    steps = _steps(device)
    fused_norms = _train(models[0], fused, steps)
    unfused_norms = _train(models[1], unfused, steps, lambda params: clip_grad_norm_(params, max_norm))
    theirs_norms = _train(models[2], theirs, steps, lambda params: torch.nn.utils.clip_grad_norm_(params, max_norm))
    if max_norm == CLIP_NORM:
        assert fused_norms[0] > max_norm, "no clipping to test"
    assert fused_norms[-1] is fused.grad_norm and fused.grad_norm.device.type == device.type
    if device.type == "cpu":
        assert torch.equal(torch.stack(fused_norms), torch.stack(unfused_norms))
        for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
            assert torch.equal(p, q)
            assert all(torch.equal(fused.state[p][key], unfused.state[q][key]) for key in fused.state[p])
    else:
        _assert_same_trajectory(models[0], models[1])
    torch.testing.assert_close(torch.stack(fused_norms), torch.stack(theirs_norms), **TOLERANCES[dtype])
    _assert_same_trajectory(models[0], models[2])
    _assert_same_state(fused, theirs, dtype)


FIXED_GRAD_DTYPES = {
    "bf16": [torch.bfloat16] * 2,
    "fp16": [torch.float16] * 2,
    "mixed": [torch.float32, torch.bfloat16, torch.float16, torch.float64],
}
FIXED_GRAD_SIZES = (4097, 33, 130, 5)
# (grads' scale, max_norm); the grads' norm is about 64 times their scale. Huge grads: a
# factor of about 1e-20 (fp16 grads at most 100 times: clip_grad_norm_ takes their norm in fp16)
FP16_GRAD_SCALE_MAX = 100.0
CLIP_CASES = {
    "clipped": (1.0, 1.0),
    "not_clipped": (1.0, 1e4),
    "huge_grads": (1e15, 1e-3),
    "zero_grads": (0.0, 1.0),
    "inf_max_norm": (1.0, float("inf")),
    "zero_max_norm": (1.0, 0.0),
}


def _fixed_grads(dtypes: list[torch.dtype], scale: float, steps: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    scales = [min(scale, FP16_GRAD_SCALE_MAX) if dtype == torch.float16 else scale for dtype in dtypes]
    return [
        [
            (torch.randn(n, generator=g, dtype=torch.float64) * dtype_scale).to(dtype)
            for n, dtype, dtype_scale in zip(FIXED_GRAD_SIZES, dtypes, scales)
        ]
        for _ in range(steps)
    ]


def _torch_clip_coef(grads: list[torch.Tensor], max_norm: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.nn.utils.clip_grad_norm_'s norm of copies of ``grads`` on ``device`` (its
    per-tensor norms are the device's: CUDA's sum in another order than the CPU's),
    and its factor as fp64, both on the CPU."""
    params = [torch.nn.Parameter(torch.empty_like(grad, device=device)) for grad in grads]
    for p, grad in zip(params, grads):
        p.grad = grad.to(device, copy=True)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm).cpu()
    return norm, torch.clamp(max_norm / (norm + 1e-6), max=1.0).double()


@pytest.mark.parametrize("case", CLIP_CASES.values(), ids=CLIP_CASES.keys())
@pytest.mark.parametrize("dtypes", FIXED_GRAD_DTYPES.values(), ids=FIXED_GRAD_DTYPES.keys())
def test_max_grad_norm_with_fixed_grads_matches_float64_clipping(device, dtypes, case):
    """Fixed grads, so that each trajectory depends on its own arithmetic only.
    The reference: PyTorch's clip factor (its norm in the grads' promoted dtype)
    times the grads, then AdamW, in float64. Each step's norm is clip_grad_norm_'s
    and the grads are left as they were. fp32/fp64 params: as clip_grad_norm_ +
    our AdamW (bit for bit on CPU); bf16/fp16 ones: the clipped grad is not
    rounded to their dtype, so within a rounding of that (by norm) and closer to
    the reference."""
    scale, max_norm = case
    options = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, amsgrad=False, maximize=False)
    steps = _steps(device)
    g = torch.Generator().manual_seed(8)
    starts = [torch.randn(n, generator=g).to(dtype) for n, dtype in zip(FIXED_GRAD_SIZES, dtypes)]
    fused_params, unfused_params = ([torch.nn.Parameter(s.to(device, copy=True)) for s in starts] for _ in range(2))
    fused, unfused = AdamW(fused_params, max_grad_norm=max_norm, **options), AdamW(unfused_params, **options)
    all_grads, coefs = _fixed_grads(dtypes, scale, steps), []
    for grads in all_grads:
        for p, q, grad in zip(fused_params, unfused_params, grads):
            p.grad, q.grad = grad.to(device, copy=True), grad.to(device, copy=True)
        fused.step()
        clip_grad_norm_(unfused_params, max_norm)
        unfused.step()
        norm, coef = _torch_clip_coef(grads, max_norm, device)
        coefs.append(coef)
        assert fused.grad_norm.dtype == norm.dtype
        torch.testing.assert_close(fused.grad_norm.cpu(), norm, rtol=4 * torch.finfo(norm.dtype).eps, atol=0)
        assert all(torch.equal(p.grad.cpu(), grad) for p, grad in zip(fused_params, grads))
    if scale and max_norm == 1.0:
        assert coefs[0] < 0.1, "no clipping to test"

    for i, (start, p, q) in enumerate(zip(starts, fused_params, unfused_params)):
        clipped = [grads[i].double() * coef for grads, coef in zip(all_grads, coefs)]
        ref_param, ref_m, ref_v = _reference_adamw(start, clipped, **options)
        state = fused.state[p]
        for key, ref in (("exp_avg", ref_m), ("exp_avg_sq", ref_v)):
            tolerance = TOLERANCES[torch.float64] if p.dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
            atol = tolerance["atol"] * ref.abs().max().item()  # the moments scale with the clipped grads
            torch.testing.assert_close(state[key].cpu().double(), ref, rtol=tolerance["rtol"], atol=atol)
        ours, theirs = p.detach().cpu(), q.detach().cpu()
        if p.dtype in (torch.float32, torch.float64):
            assert torch.equal(ours, theirs) if device.type == "cpu" else assert_matches(ours, theirs, ref_param) >= 0
            assert_matches(ours, ref_param, ref_param)
        else:
            # clip_grad_norm_'s rounding of each clipped grad moves its trajectory by a fraction
            # of an ulp (by norm; near zero, elementwise, by more): ours stays on the reference's
            assert rel_err(ours, theirs) < torch.finfo(p.dtype).eps
            assert (ours != ref_param).float().mean() < 0.01
            assert rel_err(ours, ref_param) <= min(rel_err(theirs, ref_param), torch.finfo(p.dtype).eps / 10)


@pytest.mark.parametrize(
    "value, error",
    [
        (-1.0, gk.ArgumentError),
        (float("nan"), gk.ArgumentError),
        ("1.0", gk.ArgumentTypeError),
        (True, gk.ArgumentTypeError),
    ],
)
def test_bad_max_grad_norm(value, error):
    with pytest.raises(error, match="max_grad_norm"):
        AdamW(_model().parameters(), max_grad_norm=value)
    optimizer = AdamW(_model().parameters(), max_grad_norm=1.0)
    with pytest.raises(error, match="max_grad_norm"):
        optimizer.max_grad_norm = value
    assert optimizer.max_grad_norm == 1.0


def test_max_grad_norm_is_the_optimizers_kept_by_copies_and_loads():
    """Not a param-group entry (one norm spans every group), so neither in
    state dicts nor lost by loading one; copies and pickles keep it."""
    model = _model()
    optimizer = AdamW(model.parameters(), max_grad_norm=0.5)
    _train(model, optimizer, 2)
    assert "max_grad_norm" not in optimizer.param_groups[0]
    assert "max_grad_norm" not in optimizer.state_dict()["param_groups"][0]
    copied = copy.deepcopy(optimizer)
    assert copied.max_grad_norm == 0.5 and copied.grad_norm is None
    optimizer.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())
    assert optimizer.max_grad_norm == 0.5
    assert AdamW(model.parameters()).grad_norm is None


@pytest.mark.parametrize("max_grad_norm", [None, CLIP_NORM])
def test_compiled_step_matches_eager(monkeypatch, max_grad_norm):
    """``torch.compile(optimizer.step, fullgraph=True)``: the steps of the eager optimizer.
    With nothing cached yet (the first step of a process): a cache filled while Dynamo
    traces diverged a restarted trace."""
    monkeypatch.setattr(gk_backend, "_device_types", {})
    models = [_model() for _ in range(2)]
    compiled, eager = (AdamW(m.parameters(), max_grad_norm=max_grad_norm) for m in models)
    monkeypatch.setattr(compiled, "step", torch.compile(compiled.step, backend="aot_eager", fullgraph=True))
    _train(models[0], compiled, 3)
    _train(models[1], eager, 3)
    for p, q in zip(*(m.parameters() for m in models), strict=True):
        assert torch.equal(p, q)
    if max_grad_norm is not None:
        assert torch.equal(compiled.grad_norm, eager.grad_norm)


def test_max_grad_norm_without_grads_updates_nothing():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = AdamW([param], max_grad_norm=1.0)
    optimizer.step()
    assert torch.equal(optimizer.grad_norm, torch.nn.utils.clip_grad_norm_([param], 1.0))
    assert torch.equal(param, torch.ones(3)) and not optimizer.state


@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_one_op_call_per_device_dtype_bucket(monkeypatch, max_grad_norm):
    """And with clipping, one norm pass over the grads of all groups: a
    _foreach_norm per bucket, the op scaling each grad as it reads it."""
    calls, norm_calls = [], []

    def counting_op(params, *args):
        calls.append([p.dtype for p in params])
        return adamw_step_(params, *args)

    def counting_norm(tensors, *args):
        norm_calls.append([t.dtype for t in tensors])
        return foreach_norm(tensors, *args)

    foreach_norm = torch._foreach_norm
    monkeypatch.setattr(gk.optim, "adamw_step_", counting_op)
    monkeypatch.setattr(torch, "_foreach_norm", counting_norm)
    fp32, bf16 = _model(), _model(torch.bfloat16)
    frozen = torch.nn.Parameter(torch.ones(3))
    optimizer = AdamW(
        [{"params": [*fp32.parameters(), *bf16[0].parameters(), frozen]}, {"params": bf16[2].parameters()}],
        max_grad_norm=max_grad_norm,
    )
    for model in (fp32, bf16):
        model(torch.randn(2, 17, dtype=next(model.parameters()).dtype)).sum().backward()
    optimizer.step()
    assert calls == [[torch.float32] * 4, [torch.bfloat16] * 2, [torch.bfloat16] * 2]
    assert norm_calls == ([] if max_grad_norm is None else [[torch.float32] * 4, [torch.bfloat16] * 4])
    assert frozen.grad is None and torch.equal(frozen, torch.ones(3)) and frozen not in optimizer.state


def _train_scaled(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, overflow_at: int, clip: Callable | None = None
) -> list[float]:
    """``_train``'s steps in AMP's recipe, with a ``GradScaler`` whose scale (a power of two)
    grows every second step; the loss is inf at step ``overflow_at``, whose update the
    scaler skips (halving the scale). ``clip(params)``, if given, runs after
    ``scaler.unscale_``. Asserts that a step taking the fused path (ours) leaves the grads
    as they were, scaled. Returns the scale after each step."""
    param = next(model.parameters())
    scaler = torch.amp.GradScaler(param.device.type, init_scale=2.0**12, growth_interval=2)
    fused = getattr(optimizer, "_step_supports_amp_scaling", False)
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randn(64, features, generator=g).to(param.device, param.dtype) for features in (17, 5))
    scales = []
    for step in range(steps):
        optimizer.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        scaler.scale(loss * math.inf if step == overflow_at else loss).backward()
        if clip:
            scaler.unscale_(optimizer)
            clip(model.parameters())
        grads = [p.grad.clone() for p in model.parameters()]
        scaler.step(optimizer)
        if fused:
            assert all(p.grad.equal(g) or step == overflow_at for p, g in zip(model.parameters(), grads))
        scaler.update()
        scales.append(scaler.get_scale())
    return scales


def _unfused(optimizer: AdamW) -> AdamW:
    """Our AdamW as GradScaler drives an optimizer without a fused step: it unscales
    the grads in place and skips the step after reading the overflow flag on the host."""
    optimizer._step_supports_amp_scaling = False
    return optimizer


@pytest.mark.parametrize("overflow_at", [0, 2])
@pytest.mark.parametrize("max_grad_norm", [None, CLIP_NORM])
def test_grad_scaler_takes_the_fused_step(device, max_grad_norm, overflow_at):
    """GradScaler hands our step its scale and overflow flag (it leaves the grads scaled):
    the trajectory, norms and scales of its unscale-then-step, bit for bit on CPU (a power
    of two scale), and torch.optim.AdamW's to fp32 tolerance, the overflowed step skipped."""
    models = [_model(device=device) for _ in range(3)]
    ours = AdamW(models[0].parameters(), max_grad_norm=max_grad_norm)
    unfused = _unfused(AdamW(models[1].parameters(), max_grad_norm=max_grad_norm))
    theirs = torch.optim.AdamW(models[2].parameters())

    def torch_clip(params):
        return torch.nn.utils.clip_grad_norm_(params, max_grad_norm)

    steps = _steps(device)
    scales = _train_scaled(models[0], ours, steps, overflow_at)
    assert scales == _train_scaled(models[1], unfused, steps, overflow_at)
    assert scales == _train_scaled(models[2], theirs, steps, overflow_at, torch_clip if max_grad_norm else None)
    before = scales[overflow_at - 1] if overflow_at else 2.0**12
    assert scales[overflow_at] == before / 2 and max(scales) > 2.0**12, "no overflow or no growth to test"
    assert all(state["step"].item() == steps - 1 for state in ours.state.values())
    if device.type == "cpu":
        for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
            assert torch.equal(p, q)
            assert all(torch.equal(ours.state[p][key], unfused.state[q][key]) for key in ours.state[p])
        if max_grad_norm:
            assert torch.equal(ours.grad_norm, unfused.grad_norm)
    _assert_same_trajectory(models[0], models[1])
    _assert_same_trajectory(models[0], models[2])
    _assert_same_state(ours, theirs, torch.float32)


def test_grad_scaler_trains_fp16_params(device):
    """fp16 params, whose fp16 grads GradScaler refuses to unscale in place: on the fused path
    each step equals our step on the grads unscaled by hand (exact: a power-of-two scale)."""
    g = torch.Generator().manual_seed(2)
    params = [torch.nn.Parameter(torch.randn(33, generator=g).to(device, torch.float16)) for _ in range(2)]
    expected = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours, reference = AdamW(params), AdamW(expected)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**8)
    scaler.scale(torch.ones((), device=device))  # the scale is made on first use
    for _ in range(3):
        grads = [torch.randn(33, generator=g).to(device, torch.float16) for _ in params]
        for p, q, grad in zip(params, expected, grads):
            p.grad, q.grad = grad * scaler.get_scale(), grad.clone()
        scaler.step(ours)
        scaler.update()
        reference.step()
    assert all(ours.state[p]["exp_avg"].dtype == torch.float32 for p in params)
    for p, q in zip(params, expected):
        assert torch.equal(p, q)


def test_grad_scaler_after_unscale_by_hand(device):
    """``scaler.unscale_`` then ``clip_grad_norm_`` by hand, then ``scaler.step``: the step
    reads the overflow flag only (the grads are unscaled already)."""
    models = [_model(device=device) for _ in range(2)]
    ours, theirs = AdamW(models[0].parameters()), torch.optim.AdamW(models[1].parameters())
    steps = _steps(device)

    def clip(params):
        return torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)

    assert _train_scaled(models[0], ours, steps, 1, clip) == _train_scaled(models[1], theirs, steps, 1, clip)
    assert all(state["step"].item() == steps - 1 for state in ours.state.values())
    _assert_same_trajectory(models[0], models[1])
    _assert_same_state(ours, theirs, torch.float32)


@pytest.mark.parametrize(
    "first, second", [(AdamW, torch.optim.AdamW), (torch.optim.AdamW, AdamW)], ids=["ours_to_torch", "torch_to_ours"]
)
def test_state_dict_moves_between_torch_and_ours(device, first, second):
    options = dict(lr=3e-3, weight_decay=0.1, amsgrad=True)
    model, uninterrupted_model = _model(device=device), _model(device=device)
    steps = _steps(device)
    optimizer = first(model.parameters(), **options)
    _train(model, optimizer, steps // 2)
    resumed = second(model.parameters(), **options)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    _train(model, resumed, steps // 2)
    _train(uninterrupted_model, torch.optim.AdamW(uninterrupted_model.parameters(), **options), steps)
    _assert_same_trajectory(model, uninterrupted_model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_resuming_from_a_checkpoint_gives_the_same_trajectory(device, dtype):
    """Exactly the same: the bf16 case shows that loading keeps the fp32 state
    (Optimizer.load_state_dict alone would round it to bf16)."""
    options = dict(lr=1e-2, amsgrad=True)
    model, uninterrupted_model = _model(dtype, device), _model(dtype, device)
    steps = _steps(device)
    optimizer = AdamW(model.parameters(), **options)
    _train(model, optimizer, steps // 2)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    model = _model(dtype, device)
    model.load_state_dict(checkpoint["model"])
    optimizer = AdamW(model.parameters(), **options)
    optimizer.load_state_dict(checkpoint["optimizer"])
    _train(model, optimizer, steps // 2)
    uninterrupted = AdamW(uninterrupted_model.parameters(), **options)
    _train(uninterrupted_model, uninterrupted, steps)
    for p, q in zip(model.parameters(), uninterrupted_model.parameters(), strict=True):
        assert torch.equal(p, q)
        assert all(torch.equal(a, b) for a, b in zip(optimizer.state[p].values(), uninterrupted.state[q].values()))


@pytest.mark.parametrize("step", [2.0**31, 2.0**40, 2.0**70])
def test_step_counts_past_int32(device, step):
    """A step count loaded from a checkpoint may pass 2**31 (the kernels' powers of the
    betas must not overflow): the same update as torch.optim.AdamW's."""
    params = [torch.nn.Parameter(torch.linspace(-1, 1, 5, device=device)) for _ in range(2)]
    grad = torch.linspace(0.5, -0.5, 5, device=device)
    optimizers = AdamW([params[0]], lr=0.1), torch.optim.AdamW([params[1]], lr=0.1)
    for p, optimizer in zip(params, optimizers):
        p.grad = grad.clone()
        optimizer.step()
        optimizer.state[p]["step"].fill_(step)
        optimizer.step()
    assert params[0].isfinite().all()
    torch.testing.assert_close(params[0], params[1])


def test_loading_torch_bf16_state_casts_it_to_fp32(device):
    model = _model(torch.bfloat16, device)
    theirs = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, theirs, 3)
    ours = AdamW(model.parameters(), lr=1e-2)
    ours.load_state_dict(theirs.state_dict())
    for p in model.parameters():
        assert theirs.state[p]["exp_avg"].dtype == torch.bfloat16
        for key in ("exp_avg", "exp_avg_sq"):
            assert ours.state[p][key].dtype == torch.float32
            assert torch.equal(ours.state[p][key], theirs.state[p][key].float())
        assert ours.state[p]["step"].dtype == torch.float32 and ours.state[p]["step"].item() == 3
    _train(model, ours, 3)
    assert all(ours.state[p]["step"].item() == 6 for p in model.parameters())


def _op_inputs(
    dtype: torch.dtype,
    amsgrad: bool,
    device: torch.device | str = "cpu",
    maximize: bool = False,
    grad_scale: float | None = None,
    found_inf: float | None = None,
) -> list:
    """Arguments of ``adamw_step_`` but the backend: five tensors of awkward
    shapes (one empty, one of several Triton blocks), at different steps."""
    g = torch.Generator().manual_seed(3)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    shapes = [(3,), (4, 5), (0,), (1, 17), (2, 1100)]

    def tensors(dt: torch.dtype, positive: bool = False) -> list[torch.Tensor]:
        return [
            (torch.rand(s, generator=g) if positive else torch.randn(s, generator=g)).to(device, dt) for s in shapes
        ]

    steps = [torch.tensor(float(k), dtype=torch.float32, device=device) for k in range(len(shapes))]
    return [
        tensors(dtype),
        tensors(dtype),
        tensors(state_dtype),
        tensors(state_dtype, True),
        tensors(state_dtype, True) if amsgrad else [],
        steps,
        torch.tensor(1e-2, dtype=torch.float64, device=device),
        0.9,
        0.999,
        1e-8,
        0.1,
        amsgrad,
        maximize,
        None if grad_scale is None else torch.tensor(grad_scale, dtype=torch.float64, device=device),
        None if found_inf is None else torch.tensor(found_inf, dtype=torch.float32, device=device),
    ]


def _cpu_copy(args: list) -> list:
    return [
        [t.cpu().clone() for t in a] if isinstance(a, list) else a.cpu().clone() if isinstance(a, torch.Tensor) else a
        for a in args
    ]


def _assert_op_results_equal(ours: list, theirs: list) -> None:
    """The tensor lists of ``adamw_step_``'s arguments, ``ours`` (any device)
    as ``theirs`` (CPU), to the tolerance of each dtype; bf16 and fp16: within
    one ulp (fp32 values a few ulps apart may round to neighbouring values)."""
    for ours_list, theirs_list in zip(ours[:6], theirs[:6], strict=True):
        for a, b in zip(ours_list, theirs_list, strict=True):
            if a.dtype in (torch.bfloat16, torch.float16):
                torch.testing.assert_close(a.cpu(), b, rtol=torch.finfo(a.dtype).eps, atol=0)
            else:
                torch.testing.assert_close(a.cpu(), b, **TOLERANCES[a.dtype])


@pytest.mark.parametrize(
    "maximize, grad_scale, found_inf", [(False, None, None), (True, None, None), (False, 0.3, 0.0)], ids=str
)
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck(device, dtype, amsgrad, maximize, grad_scale, found_inf):
    args = _op_inputs(dtype, amsgrad, device, maximize, grad_scale, found_inf)
    torch.library.opcheck(adamw_step_.custom_op, (*args, gk.backend_name(device)))


def test_op_compiles_without_graph_breaks(device):
    args, eager_args = (_op_inputs(torch.float32, amsgrad=True, device=device, grad_scale=0.3) for _ in range(2))
    torch.compile(adamw_step_, fullgraph=True, backend="aot_eager")(*args)
    adamw_step_(*eager_args)
    for ours, eager in zip(args[:6], eager_args[:6], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ours, eager, strict=True))


def test_op_increments_steps_and_updates_every_tensor(device):
    args = _op_inputs(torch.float32, amsgrad=False, device=device)
    params_before, steps_before = [p.clone() for p in args[0]], [s.item() for s in args[5]]
    adamw_step_(*args)
    assert [s.item() for s in args[5]] == [s + 1 for s in steps_before]
    assert all(not torch.equal(p, q) for p, q in zip(args[0], params_before) if p.numel())


def _skip_unless_kernel_under_test(device: torch.device) -> None:
    if gk.backend_name(device) == "numpy":
        pytest.skip("compares a backend with the NumPy one")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_op_matches_numpy_backend_on_any_memory_layout(device, dtype):
    """Channels-last and transposed params with state and grads laid out
    otherwise, a param that does not fill its memory (a strided slice)."""
    _skip_unless_kernel_under_test(device)
    args = _op_inputs(dtype, amsgrad=True, device=device, maximize=True, grad_scale=0.3)
    channels_last = torch.randn(2, 3, 4, 5).to(device, dtype).contiguous(memory_format=torch.channels_last)
    args[0][1] = args[0][1].t().contiguous().t()  # (4, 5) with strides (1, 4)
    args[2][1] = args[2][1].t().contiguous().t()  # its exp_avg too, its grad not
    args[0][4] = torch.randn(2, 2200).to(device, dtype)[:, ::2]  # does not fill its memory
    args[3][4] = args[3][4].t().contiguous().t()
    for column, positive in zip(args[:5], (False, False, False, True, True)):
        like = channels_last if column is args[0] else torch.randn(2, 3, 4, 5).to(device, column[0].dtype)
        column.append(like.abs() if positive else like)
    args[5].append(torch.tensor(7.0, device=device))
    expected = _cpu_copy(args)
    adamw_step_(*args)
    with gk.use_backend("numpy"):
        adamw_step_(*expected)
    assert args[0][4].stride() == (2200, 2) and args[0][5].is_contiguous(memory_format=torch.channels_last)
    _assert_op_results_equal(args, expected)


def test_params_and_state_laid_out_alike_are_not_copied():
    """Each tensor with its param's strides over memory the param fills (a channels-last
    model's conv weights, their grads and state): taken as they are. The same strides
    over memory not filled (slices), or another layout beside them, are staged."""
    g = torch.Generator().manual_seed(0)

    def channels_last():
        return torch.randn(2, 3, 4, 5, generator=g).contiguous(memory_format=torch.channels_last)

    columns = [[channels_last(), torch.randn(7, generator=g)] for _ in range(4)]
    assert in_param_layout(columns) is columns
    sliced = [[torch.randn(2, 2200, generator=g)[:, ::2]] for _ in range(4)]
    staged = in_param_layout(sliced)
    assert all(column[0].is_contiguous() and torch.equal(column[0], s[0]) for column, s in zip(staged, sliced))
    columns[2][0] = columns[2][0].contiguous()
    staged = in_param_layout(columns)
    assert staged[2][0].stride() == columns[0][0].stride() and torch.equal(staged[2][0], columns[2][0])
    assert all(staged[i][0] is columns[i][0] for i in (0, 1, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_op_on_channels_last_params_and_state_matches_numpy_backend(device, dtype):
    """Every param, grad and state tensor channels-last (taken as they are: no staging)."""
    _skip_unless_kernel_under_test(device)
    args = _op_inputs(dtype, amsgrad=True, device=device)
    for i in range(5):
        args[i] = [
            t.reshape(1, 1, 1, -1).contiguous(memory_format=torch.channels_last) if t.numel() > 1 else t
            for t in args[i]
        ] + [torch.rand(2, 3, 4, 5).to(device, args[i][0].dtype).contiguous(memory_format=torch.channels_last)]
    args[5].append(torch.tensor(2.0, device=device))
    expected = _cpu_copy(args)
    adamw_step_(*args)
    with gk.use_backend("numpy"):
        adamw_step_(*expected)
    assert args[0][-1].is_contiguous(memory_format=torch.channels_last)
    _assert_op_results_equal(args, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_op_grad_scale_multiplies_each_grad_as_it_reads_it(device, dtype):
    """With ``grad_scale`` c the op leaves the grads and updates as on grads
    times c (fp32/fp64: the same product, so bit for bit on CPU); c = 1 as
    without a scale."""
    c = 0.3
    scaled, unit, unscaled = (_op_inputs(dtype, True, device, grad_scale=scale) for scale in (c, 1.0, None))
    grads = [g.clone() for g in scaled[1]]
    adamw_step_(*scaled)
    adamw_step_(*unit)
    assert all(torch.equal(a, b) for a, b in zip(scaled[1], grads, strict=True))
    compared = [(unit, unscaled)]
    if dtype != torch.bfloat16:  # a bf16 grad times c would be rounded to bf16
        prescaled = _op_inputs(dtype, True, device)
        prescaled[1] = [g * torch.tensor(c, dtype=dtype) for g in prescaled[1]]
        compared.append((scaled, prescaled))
    for ours, expected in compared:
        adamw_step_(*expected)
        updated = [ours[i] for i in (0, 2, 3, 4, 5)], _cpu_copy([expected[i] for i in (0, 2, 3, 4, 5)])
        if device.type == "cpu":
            for ours_list, expected_list in zip(*updated, strict=True):
                assert all(torch.equal(a, b) for a, b in zip(ours_list, expected_list, strict=True))
        else:
            _assert_op_results_equal(*updated)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_op_found_inf_skips_the_update(device, dtype):
    """A nonzero ``found_inf`` (AMP's overflow flag, 1.0 or a sum over devices) leaves
    params, state and steps as they were; 0.0 updates as without the flag, bit for bit."""
    for flag in (1.0, 2.0):
        args = _op_inputs(dtype, True, device, grad_scale=0.3, found_inf=flag)
        before = _cpu_copy(args)
        adamw_step_(*args)
        for ours, kept in zip(args[:6], before[:6], strict=True):
            assert all(torch.equal(a.cpu(), b) for a, b in zip(ours, kept, strict=True))
    flagged, plain = _op_inputs(dtype, True, device, found_inf=0.0), _op_inputs(dtype, True, device)
    adamw_step_(*flagged)
    adamw_step_(*plain)
    for ours, expected in zip(flagged[:6], plain[:6], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ours, expected, strict=True))
    assert [s.item() for s in flagged[5]] == [k + 1.0 for k in range(len(flagged[5]))]


def test_op_follows_tensors_to_new_addresses(device):
    """A kernel that keeps tables of addresses must not reuse those of
    earlier tensors of the same sizes: both calls update their own tensors."""
    _skip_unless_kernel_under_test(device)
    first = _op_inputs(torch.float32, amsgrad=True, device=device)
    second = [[t.clone() for t in a] if isinstance(a, list) else a for a in first]
    expected = _cpu_copy(first)
    adamw_step_(*first)
    adamw_step_(*second)
    with gk.use_backend("numpy"):
        adamw_step_(*expected)
    _assert_op_results_equal(first, expected)
    _assert_op_results_equal(second, expected)


def test_op_updates_params_of_mixed_dtypes(device):
    """One call on params of several dtypes (the Triton kernel launches once per
    dtype) equals one NumPy call per param."""
    dtypes = [torch.bfloat16, torch.float32, torch.float64, torch.bfloat16, torch.float16]
    columns = [_op_inputs(dtype, amsgrad=True, device=device, grad_scale=0.3) for dtype in dtypes]
    args = [[column[k][i] for i, column in enumerate(columns)] for k in range(6)] + columns[0][6:]
    expected = _cpu_copy(args)
    adamw_step_(*args)
    with gk.use_backend("numpy"):
        for i in range(len(dtypes)):
            adamw_step_(*([column[i]] for column in expected[:6]), *expected[6:])
    _assert_op_results_equal(args, expected)


def test_one_triton_launch_per_device_dtype_bucket(device, monkeypatch):
    """Each launch covers every tensor of its bucket (one program per 1024
    elements), and later steps reuse the tables of addresses."""
    if gk.backend_name(device) != "triton":
        pytest.skip("counts Triton kernel launches")
    import gpukernels.backends.triton.adamw as triton_adamw

    grids = []
    kernel = triton_adamw.adamw_kernel

    class CountingKernel:
        def launch(self, grid, *args, **kwargs):
            grids.append(grid)
            return kernel.launch(grid, *args, **kwargs)

    monkeypatch.setattr(triton_adamw, "adamw_kernel", CountingKernel())
    fp32, bf16 = _model(device=device), _model(torch.bfloat16, device)
    optimizer = AdamW([{"params": [*fp32.parameters(), *bf16[0].parameters()]}, {"params": bf16[2].parameters()}])
    for model in (fp32, bf16):
        model(torch.randn(2, 17, dtype=next(model.parameters()).dtype, device=device)).sum().backward()
    optimizer.step()
    assert grids == [(4,), (2,), (2,)]  # every param has fewer than 1024 elements
    tables = set(triton_adamw._tables_cache)
    optimizer.step()  # same grads, same state: the same addresses
    assert grids == [(4,), (2,), (2,)] * 2 and set(triton_adamw._tables_cache) == tables


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_step_captured_in_a_cuda_graph_replays_as_eager_steps(max_grad_norm):
    """The whole step reads lr and the steps from device memory: a captured
    step replayed with new grads and a new lr (written into the same tensors)
    gives exactly the eager steps; with clipping, the norm is measured and the
    factor applied on the device at each replay (the grads' norm is about 27)."""
    device = torch.device("cuda")
    options = dict(weight_decay=0.1, amsgrad=True, max_grad_norm=max_grad_norm)
    lrs = [1e-2, 3e-3, 5e-3, 1e-3]
    graphed_model, eager_model = _model(device=device), _model(device=device)
    g = torch.Generator().manual_seed(6)
    grads = [[torch.randn(p.shape, generator=g).to(device) for p in eager_model.parameters()] for _ in lrs]
    lr = torch.tensor(lrs[0], dtype=torch.float64, device=device)
    graphed, eager = AdamW(graphed_model.parameters(), lr=lr, **options), AdamW(eager_model.parameters(), **options)
    for p, grad in zip(graphed_model.parameters(), grads[0]):
        p.grad = grad.clone()
    # Warm-up on a side stream (as torch.cuda.graphs asks): creates the state
    # and the kernel's tables, and compiles the kernel, outside the capture.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graphed.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    for step_grads, step_lr in zip(grads[1:], lrs[1:]):
        for p, grad in zip(graphed_model.parameters(), step_grads):
            p.grad.copy_(grad)
        lr.fill_(step_lr)
        graph.replay()
    for step_grads, step_lr in zip(grads, lrs):
        for p, grad in zip(eager_model.parameters(), step_grads):
            p.grad = grad.clone()
        eager.param_groups[0]["lr"] = step_lr
        eager.step()
    torch.cuda.synchronize()
    for p, q in zip(graphed_model.parameters(), eager_model.parameters(), strict=True):
        assert torch.equal(p, q)
        assert graphed.state[p].keys() == eager.state[q].keys()
        assert all(torch.equal(graphed.state[p][k], eager.state[q][k]) for k in eager.state[q])
    assert graphed.state[p]["step"].item() == len(lrs)
    if max_grad_norm is not None:
        assert eager.grad_norm > max_grad_norm and torch.equal(graphed.grad_norm, eager.grad_norm)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grad_scaler_step_captured_in_a_cuda_graph_replays_as_eager_steps():
    """``scaler.step`` + ``scaler.update`` with our AdamW make no host sync, so they can be
    captured: replays with new scaled grads (one step's overflowed) take or skip the step
    and move the scale exactly as the eager steps do."""
    device = torch.device("cuda")
    models = [_model(device=device) for _ in range(2)]
    optimizers = [AdamW(m.parameters(), max_grad_norm=CLIP_NORM) for m in models]
    scalers = [torch.amp.GradScaler("cuda", init_scale=2.0**10, growth_interval=2) for _ in models]
    g = torch.Generator().manual_seed(6)
    grads = [[torch.randn(p.shape, generator=g).to(device) * 2.0**10 for p in models[0].parameters()] for _ in range(6)]
    grads[3][0][0, 0] = math.inf

    def step(optimizer, scaler):
        scaler.step(optimizer)
        scaler.update()

    (graphed_model, eager_model), (graphed, eager), (graphed_scaler, eager_scaler) = models, optimizers, scalers
    for scaler in scalers:
        scaler.scale(torch.ones((), device=device))  # the scale is made on first use
    for p, grad in zip(graphed_model.parameters(), grads[0]):
        p.grad = grad.clone()
    stream = torch.cuda.Stream()  # the warm-up step, on a side stream, makes the state and tables
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(graphed, graphed_scaler)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(graphed, graphed_scaler)
    scales = []
    for step_grads in grads[1:]:
        for p, grad in zip(graphed_model.parameters(), step_grads):
            p.grad.copy_(grad)
        graph.replay()
        scales.append(graphed_scaler.get_scale())
    eager_scales = []
    for step_grads in grads:
        for p, grad in zip(eager_model.parameters(), step_grads):
            p.grad = grad.clone()
        step(eager, eager_scaler)
        eager_scales.append(eager_scaler.get_scale())
    assert scales == eager_scales[1:] and eager_scales[3] == eager_scales[2] / 2
    for p, q in zip(graphed_model.parameters(), eager_model.parameters(), strict=True):
        assert torch.equal(p, q)
        assert all(torch.equal(graphed.state[p][k], eager.state[q][k]) for k in eager.state[q])
    assert graphed.state[p]["step"].item() == len(grads) - 1


def _set(args: list, index: int, value) -> None:
    args[index] = value


SPOILERS = {
    "grads_short": (lambda args: args[1].pop(), "grads"),
    "grad_on_other_device": (lambda args: args[1].__setitem__(0, args[1][0].to("meta")), r"grads\[0\]"),
    "bf16_state": (lambda args: args[2].__setitem__(1, args[2][1].bfloat16()), r"exp_avgs\[1\]"),
    "state_shape": (lambda args: args[3].__setitem__(0, args[3][0][:2]), r"exp_avg_sqs\[0\]"),
    "step_shape": (lambda args: args[5].__setitem__(1, args[5][1].reshape(1)), r"steps\[1\]"),
    "fp64_step": (lambda args: args[5].__setitem__(4, args[5][4].double()), r"steps\[4\]"),
    "grad_dtype": (lambda args: args[1].__setitem__(3, args[1][3].double()), r"grads\[3\]"),
    "grad_shape": (lambda args: args[1].__setitem__(1, args[1][1].t()), r"grads\[1\]"),
    "integer_param": (lambda args: args[0].__setitem__(2, args[0][2].long()), r"params\[2\]"),
    "param_on_other_device": (lambda args: args[0].__setitem__(1, args[0][1].to("meta")), r"params\[1\]"),
    "fp32_lr": (lambda args: _set(args, 6, args[6].float()), "lr"),
    "amsgrad_without_max": (lambda args: _set(args, 11, True), "max_exp_avg_sqs"),
    "fp32_grad_scale": (lambda args: _set(args, 13, torch.tensor(0.5)), "grad_scale"),
    "grad_scale_shape": (lambda args: _set(args, 13, torch.ones(1, dtype=torch.float64)), "grad_scale"),
    "grad_scale_on_other_device": (lambda args: _set(args, 13, torch.ones((), device="meta")), "grad_scale"),
    "fp64_found_inf": (lambda args: _set(args, 14, torch.zeros((), dtype=torch.float64)), "found_inf"),
    "found_inf_shape": (lambda args: _set(args, 14, torch.zeros(1)), "found_inf"),
}


@pytest.mark.parametrize("spoil, match", SPOILERS.values(), ids=SPOILERS.keys())
def test_op_rejects_inconsistent_lists(spoil, match):
    args = _op_inputs(torch.float32, amsgrad=False)
    spoil(args)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        adamw_step_(*args)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(lr=-1e-3), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(lr=float("inf")), "lr"),
        (dict(lr=torch.tensor([1e-3, 1e-3])), "lr"),
        (dict(eps=-1e-8), "eps"),
        (dict(betas=(1.0, 0.999)), r"betas\[0\]"),
        (dict(betas=(-0.1, 0.999)), r"betas\[0\]"),
        (dict(betas=(0.9, 1.5)), r"betas\[1\]"),
        (dict(betas=(0.9,)), "betas"),
        (dict(weight_decay=-0.01), "weight_decay"),
        (dict(weight_decay=float("inf")), "weight_decay"),
    ],
)
def test_bad_hyperparameters(options, match):
    with pytest.raises(ValueError, match=match):
        AdamW(_model().parameters(), **options)
    optimizer = AdamW(_model()[0].parameters())
    with pytest.raises(ValueError, match=match):
        optimizer.add_param_group({"params": _model()[2].parameters(), **options})


@pytest.mark.parametrize("named", [False, True])
def test_sparse_grad_is_an_error_naming_the_param(named):
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    optimizer = AdamW(embedding.named_parameters() if named else embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"weight" if named else r"param_groups\[0\]\['params'\]\[0\]"):
        optimizer.step()


def test_complex_param_is_an_error():
    param = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    param.grad = torch.ones_like(param)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\]"):
        AdamW([param]).step()


def _sequential_lr(optimizer, warmup, total, min_lr):
    if warmup == 0:
        return CosineAnnealingLR(optimizer, T_max=total, eta_min=min_lr)
    warmup_lr = LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1)
    return SequentialLR(
        optimizer, [warmup_lr, CosineAnnealingLR(optimizer, T_max=total - warmup, eta_min=min_lr)], milestones=[warmup]
    )


def _lrs(optimizer, scheduler, steps: int) -> list[list[float]]:
    lrs = []
    for _ in range(steps):
        lrs.append([float(group["lr"]) for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return lrs


def _two_group_sgd(lr0: float | torch.Tensor = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        [
            {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr0},
            {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.03},
        ]
    )


@pytest.mark.parametrize(
    "warmup, total, min_lr", [(5, 20, 0.0), (3, 50, 1e-4), (10, 11, 1e-3), (1, 10, 0.0), (0, 12, 2e-3)]
)
def test_warmup_cosine_matches_sequential_lr(warmup, total, min_lr):
    ours_opt, theirs_opt = _two_group_sgd(), _two_group_sgd()
    ours = _lrs(ours_opt, warmup_cosine(ours_opt, warmup, total, min_lr), total + 5)
    theirs = _lrs(theirs_opt, _sequential_lr(theirs_opt, warmup, total, min_lr), total + 1)
    torch.testing.assert_close(ours[: total + 1], theirs, rtol=1e-9, atol=1e-15)
    assert ours[total:] == [[min_lr, min_lr]] * 5
    assert ours[0] == ([0.1 / warmup, 0.03 / warmup] if warmup else [0.1, 0.03])


def test_warmup_cosine_fills_a_tensor_lr_in_place():
    lr = torch.tensor(0.1)
    ours_opt, theirs_opt = _two_group_sgd(lr), _two_group_sgd()
    ours = _lrs(ours_opt, warmup_cosine(ours_opt, 4, 16), 16)
    theirs = _lrs(theirs_opt, warmup_cosine(theirs_opt, 4, 16), 16)
    assert ours_opt.param_groups[0]["lr"] is lr
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=0.0)  # lr is fp32 here


@pytest.mark.parametrize(
    "args, match",
    [
        ((-1, 10), "warmup_steps"),
        ((2.5, 10), "warmup_steps"),
        ((5, 5), "total_steps"),
        ((5, 3), "total_steps"),
        ((0, 0), "total_steps"),
        ((2, 10, -1e-3), "min_lr"),
        ((2, 10, float("nan")), "min_lr"),
    ],
)
def test_warmup_cosine_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        warmup_cosine(_two_group_sgd(), *args)


def _params_with_grads(with_grads: bool = True) -> list[torch.nn.Parameter]:
    """Mixed dtypes, one param without a grad."""
    g = torch.Generator().manual_seed(4)
    params = [
        torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype))
        for shape, dtype in [
            ((17, 3), torch.float32),
            ((5,), torch.float64),
            ((33,), torch.bfloat16),
            ((4, 4), torch.float32),
            ((2,), torch.float32),
        ]
    ]
    for p in params[:-1] if with_grads else []:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
    return params


def _assert_clips_as_torch(ours_params, theirs_params, max_norm, as_generators=False, **options):
    """The same norm and clipped grads. Not bit for bit: PyTorch takes the
    norm of the per-bucket norms in its hash map's order of buckets."""
    wrap = (lambda params: (p for p in params)) if as_generators else (lambda params: params)
    ours = clip_grad_norm_(wrap(ours_params), max_norm, **options)
    theirs = torch.nn.utils.clip_grad_norm_(wrap(theirs_params), max_norm, **options)
    torch.testing.assert_close(ours, theirs, rtol=1e-14, atol=0, equal_nan=True)
    for p, q in zip(ours_params, theirs_params, strict=True):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0, equal_nan=True)


@pytest.mark.parametrize("max_norm", [0.5, 1e3, float("inf")])
@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.5, 0.5, float("inf"), "inf"])
def test_clip_grad_norm_matches_torch(norm_type, max_norm):
    _assert_clips_as_torch(_params_with_grads(), _params_with_grads(), max_norm, norm_type=norm_type)


def test_clip_grad_norm_single_tensor_and_generator():
    ours, theirs = _params_with_grads(), _params_with_grads()
    ours_norm, theirs_norm = clip_grad_norm_(ours[0], 0.1), torch.nn.utils.clip_grad_norm_(theirs[0], 0.1)
    torch.testing.assert_close(ours_norm, theirs_norm, rtol=1e-14, atol=0)
    torch.testing.assert_close(ours[0].grad, theirs[0].grad, rtol=1e-12, atol=0)
    _assert_clips_as_torch(ours, theirs, 0.1, as_generators=True)


def test_clip_grad_norm_without_grads():
    ours, theirs = _params_with_grads(False), _params_with_grads(False)
    _assert_clips_as_torch(ours, theirs, 1.0)
    _assert_clips_as_torch([], [], 1.0)


def test_clip_grad_norm_nonfinite():
    ours, theirs = _params_with_grads(), _params_with_grads()
    for params in (ours, theirs):
        params[3].grad[1, 2] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(ours, 1.0, error_if_nonfinite=True)
    _assert_clips_as_torch(ours, theirs, 1.0)


@pytest.mark.parametrize("max_norm", [-1.0, float("nan")])
def test_clip_grad_norm_bad_max_norm(max_norm):
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_(_params_with_grads(), max_norm)
