"""The optimizer side of the training recipe: AdamW on the multi-tensor op
``gpukernels::adamw_step_``, the linear-warmup + cosine learning-rate
schedule, and global gradient-norm clipping (on its own, or inside the
AdamW step: ``AdamW(..., max_grad_norm=...)``).

All three are drop-ins for their PyTorch counterparts: ``AdamW`` for
``torch.optim.AdamW`` (state dicts load both ways), ``warmup_cosine`` for a
``SequentialLR`` of ``LinearLR`` and ``CosineAnnealingLR``, and
``clip_grad_norm_`` for ``torch.nn.utils.clip_grad_norm_``.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections import defaultdict
from itertools import chain
from operator import attrgetter, itemgetter
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler

from .errors import ArgumentError, ArgumentTypeError
from .ops._checks import FLOAT_DTYPES, PLAIN_TENSOR_TYPES, check_float, check_int, check_number
from .ops.adamw import adamw_step_, check_hyperparameters, state_dtype

__all__ = ["AdamW", "WarmupCosineLR", "warmup_cosine", "clip_grad_norm_"]


# torch.optim.AdamW's further param-group entries, at its defaults: a state
# dict of ours carries them so that torch.distributed.checkpoint, which loads
# only into entries the checkpoint has, loads ours into torch's (a torch
# without some of them ignores the extra entries).
_TORCH_ADAMW_FLAGS = dict(foreach=None, capturable=False, differentiable=False, fused=None, decoupled_weight_decay=True)


def _check_group_flags(group: dict[str, Any], name: str) -> None:
    """Refuse the torch.optim flags of a group (or a loaded one) that would change the math:
    Adam's L2 weight decay (``decoupled_weight_decay=False``) and a step to differentiate
    (``differentiable=True``). The others (foreach, fused, capturable) say how torch runs the
    same step: ours runs it fused, graph-safe, whatever they say."""
    if group.get("decoupled_weight_decay", True) is not True:
        raise ArgumentError(
            f"{name}['decoupled_weight_decay'] must be True: AdamW decouples the weight decay "
            "(Adam's L2 form, torch.optim.Adam's, is not implemented)"
        )
    if group.get("differentiable", False):
        raise ArgumentError(f"{name}['differentiable'] must be False: the step runs kernels without autograd")


# Per-param work of a step is done by passes over whole lists that run in C (map
# with attrgetter, set, any) rather than by Python code per param: on a GPU a step
# launches one kernel per bucket, and its host time grows with the params. Each
# attrgetter is made where it is used: Dynamo traces one made in the compiled code,
# but not a call of one it finds made (torch.compile(optimizer.step, fullgraph=True)).


def _by_device_and_dtype(tensors: list[Tensor]) -> list[list[Tensor]]:
    """The buckets a multi-tensor op takes, in order of first appearance."""
    keys = list(map(attrgetter("device", "dtype"), tensors))
    if len(set(keys)) == 1:
        return [tensors]
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for key, t in zip(keys, tensors):
        buckets[key].append(t)
    return list(buckets.values())


def _lr_tensor(lr: float | Tensor, device: torch.device) -> Tensor:
    """The op's 0-dim fp64 lr. A tensor lr that already is one is passed as
    is; another is converted by a copy at each step, so updates to it in place
    (schedulers, CUDA-graph replays) are seen either way."""
    if isinstance(lr, Tensor):
        return lr.to(device=device, dtype=torch.float64).reshape(shape=())
    return torch.full((), lr, dtype=torch.float64, device=device)


def _dtensor_class() -> type | None:
    """DTensor, without importing torch.distributed.tensor (a second at import
    time): no DTensor exists before something else has imported it."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def _is_dtensor(t: Any) -> bool:
    dtensor = _dtensor_class()
    return dtensor is not None and isinstance(t, dtensor)


def _has_dtensor(tensors: list[Tensor]) -> bool:
    kinds = set(map(type, tensors))
    if kinds <= PLAIN_TENSOR_TYPES:  # the usual answer, without a generator's host time
        return False
    dtensor = _dtensor_class()
    return dtensor is not None and any(issubclass(kind, dtensor) for kind in kinds)


def _local(tensors: list[Tensor]) -> list[Tensor]:
    """The tensors with each DTensor replaced by the shard this rank holds (a
    view: updating it updates the DTensor); the list itself when it has none."""
    if not _has_dtensor(tensors):
        return tensors
    return [t.to_local() if _is_dtensor(t) else t for t in tensors]


def _zero_state(param: Tensor) -> Tensor:
    return torch.zeros_like(param, dtype=state_dtype(param.dtype), memory_format=torch.preserve_format)


def _loaded_state_value(value: Any, param: Tensor, key: str) -> Any:
    """A saved state entry as this optimizer keeps it: ``step`` a 0-dim fp32
    tensor on the param's device, tensors in ``state_dtype``; always a copy,
    so the loaded state never aliases the state dict's."""
    if key == "step":
        return torch.as_tensor(value).to(device=param.device, dtype=torch.float32, copy=True).reshape(shape=())
    if isinstance(value, Tensor):
        return value.to(device=param.device, dtype=state_dtype(param.dtype), copy=True)
    return value


class AdamW(torch.optim.Optimizer):
    """``torch.optim.AdamW`` with the update of every param of a (device,
    dtype) bucket done by one call of the fused op ``gpukernels::adamw_step_``.

    State per param is named and shaped as PyTorch's (``step``, ``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq`` with amsgrad) but is fp32 also for
    bf16/fp16 params (fp64 for fp64 params), including state loaded from a
    PyTorch state dict; ``step`` lives on the param's device. ``lr`` may be a
    float or a one-element tensor.

    DTensor params (FSDP2's ``fully_shard``) get DTensor state, as in
    PyTorch, so ``torch.distributed.checkpoint`` state dicts of the two load
    into each other; each rank updates its local shards.

    ``max_grad_norm`` (None: no clipping) clips the gradients inside the step
    as ``clip_grad_norm_(params, max_grad_norm)`` before it would: the L2 norm
    of every grad of every group is measured in one read of the gradients
    (``clip_grad_norm_``'s code), and the update kernel multiplies each grad
    by ``min(1, max_grad_norm / (norm + 1e-6))`` as it reads it, instead of a
    pass that scales every grad in place. So, unlike ``clip_grad_norm_``, the
    grads are left unclipped. The results are ``clip_grad_norm_`` + ``step``'s
    up to rounding: the same for fp32 and fp64 grads (on a GPU, within an ulp
    where Triton fuses a multiply-add); bf16/fp16 grads times the factor stay
    fp32, where ``clip_grad_norm_`` rounds them back to the grads' dtype.
    ``grad_norm`` is the norm measured by the last step, a tensor on the
    first grad's device, as ``clip_grad_norm_`` returns it (read it without
    a host sync, e.g. to log it). Everything stays on the device, so a
    captured step clips too (with the ``max_grad_norm`` of the capture). Under
    DDP the grads are already reduced; under FSDP2 the norm of the sharded
    grads is the global one (DTensor's norm ops reduce over the mesh) and
    ``grad_norm`` is its plain value. A non-finite norm makes the params nan,
    as with ``clip_grad_norm_`` (its ``error_if_nonfinite`` needs a sync).

    AMP's ``torch.amp.GradScaler`` takes the step's fused path, as with
    ``torch.optim.AdamW(fused=True)``: ``scaler.step(optimizer)`` does not
    unscale the grads in place nor read on the host whether they overflowed.
    It hands the step its scale (``self.grad_scale``) and overflow flag
    (``self.found_inf``) as device tensors; the kernel divides each grad by
    the scale as it reads it (with the clip factor: ``max_grad_norm`` clips the
    unscaled grads, and ``grad_norm`` is their norm) and, where the flag is
    set, changes nothing (params, state, steps). The grads are left scaled.
    After ``scaler.unscale_(optimizer)`` (to clip by hand) the step reads the
    flag only. The results are those of ``GradScaler``'s unscale-then-step up
    to rounding (the same where the scale is a power of two, as GradScaler's
    are unless given another ``init_scale``).
    """

    _step_supports_amp_scaling = True  # GradScaler: see above

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        maximize: bool = False,
        max_grad_norm: float | None = None,
    ):
        # not a group entry: one norm spans every group, and loading a state dict
        # replaces the groups with the saved ones (torch.optim.AdamW's lack it)
        self.max_grad_norm = max_grad_norm
        # grad_norm's value, kept in a list that steps update, not an attribute they set:
        # torch.compile(optimizer.step) drops (torch 2.13) or refuses (2.11) a store into an
        # attribute of an optimizer, but replays a list's update
        self._grad_norm: list[Tensor | None] = [None]
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            **_TORCH_ADAMW_FLAGS,
        )
        super().__init__(params, defaults)

    @property
    def max_grad_norm(self) -> float | None:
        return self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: float | None) -> None:
        self._max_grad_norm = None if value is None else _check_max_norm(value, "max_grad_norm")

    @property
    def grad_norm(self) -> Tensor | None:
        """The norm of the grads the last step with ``max_grad_norm`` measured (None before one)."""
        return self._grad_norm[0]

    def __getstate__(self) -> dict[str, Any]:
        """``Optimizer``'s (defaults, state, groups), and ``max_grad_norm``
        (copies and pickles of the optimizer clip as it does)."""
        return {**super().__getstate__(), "_max_grad_norm": self._max_grad_norm}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Also called by ``load_state_dict``, which leaves ``max_grad_norm`` as it is."""
        super().__setstate__(state)
        self.__dict__.setdefault("_max_grad_norm", None)  # an optimizer pickled before the option
        self.__dict__.setdefault("_grad_norm", [None])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validates each group's hyperparameters, not only the defaults."""
        merged = {**self.defaults, **param_group}
        param_group["betas"] = check_hyperparameters(
            merged["lr"], merged["betas"], merged["eps"], merged["weight_decay"]
        )
        _check_group_flags(merged, "param_group")
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``Optimizer.load_state_dict``, then the state recast from the saved
        tensors: the base class casts state to each param's dtype, which for a
        bf16 param would round fp32 moments to bf16."""
        for i, group in enumerate(state_dict["param_groups"]):
            _check_group_flags(group, f"state_dict['param_groups'][{i}]")
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, param in zip(saved_ids, params):
            if saved_id in state_dict["state"]:
                self.state[param] = {
                    key: _loaded_state_value(value, param, key) for key, value in state_dict["state"][saved_id].items()
                }

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with_grad = [self._params_with_grad(group, index) for index, group in enumerate(self.param_groups)]
        # set by GradScaler.step for the duration of this call (_step_supports_amp_scaling); read from
        # the instance's dict: getattr's default for a missing attribute costs a raised AttributeError
        amp_scale, found_inf = self.__dict__.get("grad_scale"), self.__dict__.get("found_inf")
        unscale = None if amp_scale is None else amp_scale.double().reciprocal()
        grad_scale = (
            unscale if self._max_grad_norm is None else self._clip_scale(list(chain.from_iterable(with_grad)), unscale)
        )
        for group, params in zip(self.param_groups, with_grad):
            for bucket in _by_device_and_dtype(params):
                self._update(group, bucket, grad_scale, found_inf)
        return loss

    def _clip_scale(self, params: list[Tensor], unscale: Tensor | None) -> Tensor | None:
        """Sets ``grad_norm`` to the L2 norm of the params' grads, times ``unscale``
        (AMP's 1/scale, fp64) when given; returns what multiplies each grad: the
        factor that clips them to ``max_grad_norm``, times ``unscale``, as the op's
        0-dim fp64 ``grad_scale`` (None without grads: nothing to update)."""
        if not params:
            self._grad_norm[0] = torch.tensor(0.0)  # what clip_grad_norm_ returns
            return None
        total_norm = _total_norm(list(map(attrgetter("grad"), params)), 2.0)
        total_norm = total_norm.full_tensor() if _is_dtensor(total_norm) else total_norm
        if unscale is not None:
            total_norm = total_norm * unscale.to(device=total_norm.device, dtype=total_norm.dtype)
        self._grad_norm[0] = total_norm
        clip = _clip_coef(total_norm, self.max_grad_norm).to(torch.float64)
        return clip if unscale is None else clip * unscale.to(clip.device)

    @staticmethod
    def _params_with_grad(group: dict[str, Any], index: int) -> list[Tensor]:
        params = [p for p in group["params"] if p.grad is not None]
        grads = list(map(attrgetter("grad"), params))
        if (
            set(map(attrgetter("dtype"), params)) <= set(FLOAT_DTYPES)
            and not any(map(attrgetter("is_sparse"), grads))
            and not _has_dtensor(params)
        ):
            return params
        # the param to blame, by name
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            name = names[i] if names else f"param_groups[{index}]['params'][{i}]"
            check_float(name, p)
            if p.grad.is_sparse:
                raise ArgumentError(f"AdamW does not support sparse gradients, but {name} has one")
            if _is_dtensor(p) and getattr(p.grad, "placements", None) != p.placements:
                raise ArgumentError(
                    f"{name} is a DTensor with placements {p.placements}, so its grad must be one "
                    f"with the same placements, got {getattr(p.grad, 'placements', 'a plain tensor')}"
                )
        return params

    def _state_of(self, param: Tensor, amsgrad: bool) -> dict[str, Tensor]:
        state = self.state[param]
        if not state:
            state.update(
                step=torch.zeros(size=(), dtype=torch.float32, device=param.device),
                exp_avg=_zero_state(param),
                exp_avg_sq=_zero_state(param),
            )
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = _zero_state(param)
        return state

    def _update(
        self, group: dict[str, Any], params: list[Tensor], grad_scale: Tensor | None, found_inf: Tensor | None
    ) -> None:
        amsgrad = bool(group["amsgrad"])
        states = list(map(self.state.__getitem__, params))
        if not all(states) or (amsgrad and not all("max_exp_avg_sq" in s for s in states)):
            states = [self._state_of(p, amsgrad) for p in params]

        def local_state(key: str) -> list[Tensor]:
            return _local(list(map(itemgetter(key), states)))

        beta1, beta2 = group["betas"]
        adamw_step_(
            _local(params),
            _local(list(map(attrgetter("grad"), params))),
            local_state("exp_avg"),
            local_state("exp_avg_sq"),
            local_state("max_exp_avg_sq") if amsgrad else [],
            local_state("step"),
            _lr_tensor(group["lr"], params[0].device),
            float(beta1),
            float(beta2),
            float(group["eps"]),
            float(group["weight_decay"]),
            amsgrad,
            bool(group["maximize"]),
            None if grad_scale is None else grad_scale.to(params[0].device),
            None if found_inf is None else found_inf.to(device=params[0].device, dtype=torch.float32),
        )


class WarmupCosineLR(LRScheduler):
    """Linear warmup, then cosine decay to ``min_lr``, in closed form.

    At scheduler step ``t`` (0 at construction) the lr of a group whose
    initial lr is ``base_lr`` is ``base_lr * (t+1)/warmup_steps`` for
    ``t < warmup_steps``; then
    ``min_lr + (base_lr - min_lr) * (1 + cos(pi*(t-warmup_steps)/(total_steps-warmup_steps)))/2``
    up to ``t = total_steps``, where it reaches ``min_lr`` and stays.

    This equals ``SequentialLR([LinearLR(start_factor=1/warmup_steps,
    total_iters=warmup_steps-1), CosineAnnealingLR(T_max=total_steps-warmup_steps,
    eta_min=min_lr)], milestones=[warmup_steps])`` up to ``total_steps``
    (beyond it, CosineAnnealingLR climbs back up; this stays at ``min_lr``).
    ``warmup_steps=1`` starts at ``base_lr`` and decays from step 1;
    ``warmup_steps=0`` is no warmup: ``CosineAnnealingLR(T_max=total_steps)``
    from step 0.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int,
        total_steps: int,
        min_lr: float = 0.0,
        last_epoch: int = -1,
    ):
        warmup_steps = check_int("warmup_steps", warmup_steps, low=0, not_int=ArgumentError)
        total_steps = check_int("total_steps", total_steps, not_int=ArgumentError)
        if total_steps <= warmup_steps:
            raise ArgumentError(f"total_steps must be an int > warmup_steps ({warmup_steps}), got {total_steps}")
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.min_lr = check_number("min_lr", min_lr, low=0.0)
        super().__init__(optimizer, last_epoch)

    def _lr_at(self, base_lr: float, t: int) -> float:
        if t < self.warmup_steps:
            return base_lr * (t + 1) / self.warmup_steps
        if t >= self.total_steps:
            return self.min_lr
        progress = (t - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.min_lr + (base_lr - self.min_lr) * (1 + math.cos(math.pi * progress)) / 2

    def _get_closed_form_lr(self) -> list[float]:
        return [self._lr_at(float(base_lr), self.last_epoch) for base_lr in self.base_lrs]

    def get_lr(self) -> list[float]:
        return self._get_closed_form_lr()


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr: float = 0.0
) -> WarmupCosineLR:
    """Linear warmup over ``warmup_steps``, cosine decay to ``min_lr`` at
    ``total_steps`` (see ``WarmupCosineLR``); call its ``step()`` after each
    ``optimizer.step()``."""
    return WarmupCosineLR(optimizer, warmup_steps, total_steps, min_lr)


def _check_max_norm(max_norm: float, name: str = "max_norm") -> float:
    """Unlike PyTorch, a negative or nan max norm (which would flip or poison
    every gradient) is an error; inf is allowed: it measures without clipping."""
    if isinstance(max_norm, bool) or not isinstance(max_norm, (numbers.Real, Tensor)):
        raise ArgumentTypeError(f"{name} must be a real number, got {type(max_norm).__name__}")
    if isinstance(max_norm, Tensor) and max_norm.numel() != 1:
        raise ArgumentError(f"{name} must be a number or a one-element tensor, got shape {tuple(max_norm.shape)}")
    max_norm = float(max_norm)
    if not max_norm >= 0:
        raise ArgumentError(f"{name} must be >= 0, got {max_norm}")
    return max_norm


def _total_norm(grads: list[Tensor], norm_type: float) -> Tensor:
    """The ``norm_type``-norm of the per-tensor norms of ``grads`` (not empty),
    on the first grad's device, in their promoted dtype, as PyTorch's foreach
    path: one ``_foreach_norm`` per (device, dtype) bucket, a single read of the
    grads. DTensor grads (FSDP2) go through DTensor's own norm ops, which
    reduce over the mesh: the result is the global norm, a replicated DTensor."""
    device = grads[0].device
    buckets = _by_device_and_dtype(grads)
    norms = list(chain.from_iterable(torch._foreach_norm(bucket, norm_type) for bucket in buckets))
    if any(bucket[0].device != device for bucket in buckets):  # else no .to per grad: host time
        norms = [n.to(device) for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


def _clip_coef(total_norm: Tensor, max_norm: float) -> Tensor:
    """torch.nn.utils.clip_grad_norm_'s factor, in ``total_norm``'s dtype."""
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


@torch.no_grad()
def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor], max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_``: scale the gradients in place by
    ``min(1, max_norm / (total_norm + 1e-6))``, where ``total_norm`` is the
    ``norm_type``-norm of the per-tensor norms (``_total_norm``); returns
    ``total_norm``. Multi-tensor ops per (device, dtype) bucket, as PyTorch's
    foreach path. With DTensor gradients (FSDP2), ``total_norm`` is the global
    norm, a replicated DTensor as PyTorch's, and every rank clips with it."""
    max_norm = _check_max_norm(max_norm)
    norm_type = float(norm_type)
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total_norm = _total_norm(grads, norm_type)
    if error_if_nonfinite and not torch.isfinite(total_norm):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, "
            "so it cannot be clipped. To scale by it anyway, set error_if_nonfinite=False"
        )
    clip_coef = _clip_coef(total_norm, max_norm)
    for bucket in _by_device_and_dtype(grads):
        torch._foreach_mul_(bucket, clip_coef.to(bucket[0].device))
    return total_norm
