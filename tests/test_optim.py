"""AdamW (the optimizer and its op ``gpukernels::adamw_step_``), the
warmup-cosine schedule and gradient-norm clipping, against PyTorch's
torch.optim.AdamW / SequentialLR / clip_grad_norm_ and a float64 AdamW."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

import gpukernels.backends.numpy.adamw as numpy_adamw
from gpukernels.optim import AdamW, clip_grad_norm_, warmup_cosine
from gpukernels.ops.adamw import adamw_step_
from helpers import assert_matches, rel_err

STEPS = 100


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(17, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5)).to(dtype)


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    """``steps`` optimizer steps on a fixed regression batch; the grads depend
    on the params, so any difference in an update shows up in the next grads."""
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 17, generator=g).to(dtype), torch.randn(64, 5, generator=g).to(dtype)
    for _ in range(steps):
        optimizer.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        optimizer.step()


def _split_groups(model: torch.nn.Module) -> list[dict]:
    return [{"params": model[0].parameters(), "lr": 3e-3, "weight_decay": 0.0},
            {"params": model[2].parameters(), "lr": 1e-3, "betas": (0.8, 0.99)}]


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
def test_matches_torch_adamw(config, dtype):
    ours_model, theirs_model = _model(dtype), _model(dtype)
    ours = AdamW(_params(ours_model, config), **_options(config))
    theirs = torch.optim.AdamW(_params(theirs_model, config), **_options(config))
    _train(ours_model, ours, STEPS)
    _train(theirs_model, theirs, STEPS)
    _assert_same_trajectory(ours_model, theirs_model)
    _assert_same_state(ours, theirs, dtype)


@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64], ids=str)
def test_tensor_lr_matches_float_lr_and_is_read_at_each_step(lr_dtype):
    lr = torch.tensor(3e-3, dtype=lr_dtype)
    ours_model, theirs_model = _model(), _model()
    ours = AdamW(ours_model.parameters(), lr=lr)
    theirs = torch.optim.AdamW(theirs_model.parameters(), lr=lr.item())
    for new_lr in (3e-3, 1e-2):
        lr.fill_(new_lr)
        theirs.param_groups[0]["lr"] = lr.item()
        _train(ours_model, ours, STEPS // 2)
        _train(theirs_model, theirs, STEPS // 2)
    assert ours.param_groups[0]["lr"] is lr
    _assert_same_trajectory(ours_model, theirs_model)


def test_beta1_zero_makes_exp_avg_the_last_grad_exactly():
    """PyTorch's lerp switches formula for weights >= 0.5 so that weight 1
    gives the end point exactly; ours does the same."""
    param = torch.nn.Parameter(torch.zeros(1000))
    optimizer = AdamW([param], betas=(0.0, 0.99))
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        param.grad = torch.randn(1000, generator=g)
        optimizer.step()
        assert torch.equal(optimizer.state[param]["exp_avg"], param.grad)


def _reference_adamw(param: torch.Tensor, grads: list[torch.Tensor], lr: float, betas: tuple[float, float],
                     eps: float, weight_decay: float, amsgrad: bool, maximize: bool):
    """SPEC.md's update in float64, the param rounded to its dtype after each step."""
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
def test_matches_float64_reference_with_fp32_state(dtype, amsgrad):
    """Fixed grads, so that each optimizer's trajectory depends on its own
    arithmetic only; the lr is large enough for updates to survive bf16
    rounding. PyTorch's own AdamW on the same dtype (its state in that dtype;
    in fp16 its eps underflows to 0 and it divides by zero) is the yardstick."""
    options = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, amsgrad=amsgrad, maximize=False)
    g = torch.Generator().manual_seed(2)
    start = torch.randn(4097, generator=g).to(dtype)
    grads = [torch.randn(4097, generator=g).to(dtype) for _ in range(STEPS)]
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    ours_opt, theirs_opt = AdamW([ours], **options), torch.optim.AdamW([theirs], **options)
    for grad in grads:
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        ours_opt.step()
        theirs_opt.step()
    ref_param, ref_m, ref_v = _reference_adamw(start, grads, **options)

    state = ours_opt.state[ours]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    torch.testing.assert_close(state["exp_avg"].double(), ref_m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state["exp_avg_sq"].double(), ref_v, rtol=1e-5, atol=1e-6)
    assert_matches(ours.detach(), theirs.detach(), ref_param.double())
    if dtype != torch.float32:
        # Rounding the same value once per step, ours and the reference part
        # only where fp32 and fp64 fall on either side of a rounding boundary:
        # a few elements, so far less error than one rounding of each.
        assert (ours.detach() != ref_param).float().mean() < 0.01
        assert rel_err(ours.detach(), ref_param) < torch.finfo(dtype).eps / 10


def test_one_op_call_per_device_dtype_bucket(monkeypatch):
    calls = []

    def counting_kernel(params, *args):
        calls.append([p.dtype for p in params])
        return original(params, *args)

    original = numpy_adamw.adamw_step_
    monkeypatch.setattr(numpy_adamw, "adamw_step_", counting_kernel)
    fp32, bf16 = _model(), _model(torch.bfloat16)
    frozen = torch.nn.Parameter(torch.ones(3))
    optimizer = AdamW([{"params": [*fp32.parameters(), *bf16[0].parameters(), frozen]},
                       {"params": bf16[2].parameters()}])
    for model in (fp32, bf16):
        model(torch.randn(2, 17, dtype=next(model.parameters()).dtype)).sum().backward()
    optimizer.step()
    assert calls == [[torch.float32] * 4, [torch.bfloat16] * 2, [torch.bfloat16] * 2]
    assert frozen.grad is None and torch.equal(frozen, torch.ones(3)) and frozen not in optimizer.state


@pytest.mark.parametrize("first, second", [(AdamW, torch.optim.AdamW), (torch.optim.AdamW, AdamW)],
                         ids=["ours_to_torch", "torch_to_ours"])
def test_state_dict_moves_between_torch_and_ours(first, second):
    options = dict(lr=3e-3, weight_decay=0.1, amsgrad=True)
    model, uninterrupted_model = _model(), _model()
    optimizer = first(model.parameters(), **options)
    _train(model, optimizer, STEPS // 2)
    resumed = second(model.parameters(), **options)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    _train(model, resumed, STEPS // 2)
    _train(uninterrupted_model, torch.optim.AdamW(uninterrupted_model.parameters(), **options), STEPS)
    _assert_same_trajectory(model, uninterrupted_model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_resuming_from_a_checkpoint_gives_the_same_trajectory(dtype):
    """Exactly the same: the bf16 case shows that loading keeps the fp32 state
    (Optimizer.load_state_dict alone would round it to bf16)."""
    options = dict(lr=1e-2, amsgrad=True)
    model, uninterrupted_model = _model(dtype), _model(dtype)
    optimizer = AdamW(model.parameters(), **options)
    _train(model, optimizer, STEPS // 2)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    model = _model(dtype)
    model.load_state_dict(checkpoint["model"])
    optimizer = AdamW(model.parameters(), **options)
    optimizer.load_state_dict(checkpoint["optimizer"])
    _train(model, optimizer, STEPS // 2)
    uninterrupted = AdamW(uninterrupted_model.parameters(), **options)
    _train(uninterrupted_model, uninterrupted, STEPS)
    for p, q in zip(model.parameters(), uninterrupted_model.parameters(), strict=True):
        assert torch.equal(p, q)
        assert all(torch.equal(a, b) for a, b in zip(optimizer.state[p].values(), uninterrupted.state[q].values()))


def test_loading_torch_bf16_state_casts_it_to_fp32():
    model = _model(torch.bfloat16)
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


def _op_inputs(dtype: torch.dtype, amsgrad: bool) -> list:
    """Arguments of ``adamw_step_`` but ``maximize``: four tensors of awkward
    shapes (one empty), at different steps."""
    g = torch.Generator().manual_seed(3)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    shapes = [(3,), (4, 5), (0,), (1, 17)]

    def tensors(dt: torch.dtype, positive: bool = False) -> list[torch.Tensor]:
        return [(torch.rand(s, generator=g) if positive else torch.randn(s, generator=g)).to(dt) for s in shapes]

    steps = [torch.tensor(float(k), dtype=torch.float32) for k in range(len(shapes))]
    return [tensors(dtype), tensors(dtype), tensors(state_dtype), tensors(state_dtype, True),
            tensors(state_dtype, True) if amsgrad else [], steps, torch.tensor(1e-2, dtype=torch.float64),
            0.9, 0.999, 1e-8, 0.1, amsgrad]


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck(dtype, amsgrad, maximize):
    torch.library.opcheck(adamw_step_, (*_op_inputs(dtype, amsgrad), maximize))


def test_op_compiles_without_graph_breaks():
    args, eager_args = _op_inputs(torch.float32, amsgrad=True), _op_inputs(torch.float32, amsgrad=True)
    torch.compile(lambda *a: adamw_step_(*a, False), fullgraph=True, backend="aot_eager")(*args)
    adamw_step_(*eager_args, False)
    for ours, eager in zip(args[:6], eager_args[:6], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ours, eager, strict=True))


def test_op_increments_steps_and_updates_every_tensor():
    args = _op_inputs(torch.float32, amsgrad=False)
    params_before, steps_before = [p.clone() for p in args[0]], [s.item() for s in args[5]]
    adamw_step_(*args, False)
    assert [s.item() for s in args[5]] == [s + 1 for s in steps_before]
    assert all(not torch.equal(p, q) for p, q in zip(args[0], params_before) if p.numel())


def _set(args: list, index: int, value) -> None:
    args[index] = value


SPOILERS = {
    "grads_short": (lambda args: args[1].pop(), "grads"),
    "grad_on_other_device": (lambda args: args[1].__setitem__(0, args[1][0].to("meta")), r"grads\[0\]"),
    "bf16_state": (lambda args: args[2].__setitem__(1, args[2][1].bfloat16()), r"exp_avgs\[1\]"),
    "state_shape": (lambda args: args[3].__setitem__(0, args[3][0][:2]), r"exp_avg_sqs\[0\]"),
    "step_shape": (lambda args: args[5].__setitem__(1, args[5][1].reshape(1)), r"steps\[1\]"),
    "fp32_lr": (lambda args: _set(args, 6, args[6].float()), "lr"),
    "amsgrad_without_max": (lambda args: _set(args, 11, True), "max_exp_avg_sqs"),
}


@pytest.mark.parametrize("spoil, match", SPOILERS.values(), ids=SPOILERS.keys())
def test_op_rejects_inconsistent_lists(spoil, match):
    args = _op_inputs(torch.float32, amsgrad=False)
    spoil(args)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        adamw_step_(*args, False)


@pytest.mark.parametrize("options, match", [
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
])
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
    return SequentialLR(optimizer, [LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1),
                                    CosineAnnealingLR(optimizer, T_max=total - warmup, eta_min=min_lr)],
                        milestones=[warmup])


def _lrs(optimizer, scheduler, steps: int) -> list[list[float]]:
    lrs = []
    for _ in range(steps):
        lrs.append([float(group["lr"]) for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return lrs


def _two_group_sgd(lr0: float | torch.Tensor = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr0},
                            {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.03}])


@pytest.mark.parametrize("warmup, total, min_lr", [(5, 20, 0.0), (3, 50, 1e-4), (10, 11, 1e-3), (1, 10, 0.0),
                                                   (0, 12, 2e-3)])
def test_warmup_cosine_matches_sequential_lr(warmup, total, min_lr):
    ours_opt, theirs_opt = _two_group_sgd(), _two_group_sgd()
    ours = _lrs(ours_opt, warmup_cosine(ours_opt, warmup, total, min_lr), total + 5)
    theirs = _lrs(theirs_opt, _sequential_lr(theirs_opt, warmup, total, min_lr), total + 1)
    torch.testing.assert_close(ours[:total + 1], theirs, rtol=1e-9, atol=1e-15)
    assert ours[total:] == [[min_lr, min_lr]] * 5
    assert ours[0] == ([0.1 / warmup, 0.03 / warmup] if warmup else [0.1, 0.03])


def test_warmup_cosine_fills_a_tensor_lr_in_place():
    lr = torch.tensor(0.1)
    ours_opt, theirs_opt = _two_group_sgd(lr), _two_group_sgd()
    ours = _lrs(ours_opt, warmup_cosine(ours_opt, 4, 16), 16)
    theirs = _lrs(theirs_opt, warmup_cosine(theirs_opt, 4, 16), 16)
    assert ours_opt.param_groups[0]["lr"] is lr
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=0.0)  # lr is fp32 here


@pytest.mark.parametrize("args, match", [
    ((-1, 10), "warmup_steps"), ((2.5, 10), "warmup_steps"), ((5, 5), "total_steps"), ((5, 3), "total_steps"),
    ((0, 0), "total_steps"), ((2, 10, -1e-3), "min_lr"), ((2, 10, float("nan")), "min_lr"),
])
def test_warmup_cosine_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        warmup_cosine(_two_group_sgd(), *args)


def _params_with_grads(with_grads: bool = True) -> list[torch.nn.Parameter]:
    """Mixed dtypes, one param without a grad."""
    g = torch.Generator().manual_seed(4)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype))
              for shape, dtype in [((17, 3), torch.float32), ((5,), torch.float64), ((33,), torch.bfloat16),
                                   ((4, 4), torch.float32), ((2,), torch.float32)]]
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
