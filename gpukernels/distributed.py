"""Training across processes: ``SyncBatchNorm`` (batch statistics over a
process group, as ``torch.nn.SyncBatchNorm``) and ``convert_sync_batchnorm``.

The rest of the library needs nothing from here to run distributed: our
modules run inside ``DistributedDataParallel`` and FSDP2 (``fully_shard``
hands each module its unsharded parameters as plain tensors for forward and
backward); ``gpukernels.optim.AdamW`` steps DTensor parameters on their local
shards, keeping DTensor state as ``torch.optim.AdamW`` does (so
``torch.distributed.checkpoint`` state dicts move between the two); and
``gpukernels.optim.clip_grad_norm_`` reduces the norm of DTensor gradients
over their mesh, as ``torch.nn.utils.clip_grad_norm_`` does.

SyncBatchNorm: the forward all-gathers each rank's per-channel (count, mean,
M2) and combines them (Chan et al.'s parallel variance: stable where sums of
x and x**2 would cancel), then normalises with the custom op
``gpukernels::batch_norm_fwd`` in its eval mode, which takes the statistics
to normalise with (here the global ones). The backward is plain torch ops in
the stats dtype: it all-reduces the per-channel sums of dy and dy*xhat and
removes their global means from dy. The batch_norm kernels cannot serve it:
their training-mode backward removes the local means, and correcting their
result afterwards would round twice (badly, in bf16, where the terms cancel).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from ._numerics import stats_dtype
from .errors import ArgumentError
from .nn import BatchNormForward
from .ops._checks import check_float, check_number, contiguous_param
from .ops._op import refuse_second_derivative
from .ops.batch_norm import batch_norm_fwd, check_params

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "sync_batch_norm"]


def _all_gather_flat(output: Tensor, input: Tensor, group: Any) -> None:
    """``all_gather_into_tensor`` under its new name where torch has it (the
    old name warns from torch 2.13 on)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, input, group=group)


def _per_channel(v: Tensor) -> Tensor:
    """A (C,) vector broadcast against (N, C, L)."""
    return v.view(1, -1, 1)


def _local_moments(x: Tensor) -> Tensor:
    """This rank's ``[count, mean (C), M2 (C)]`` of the (N, C, L) input, in
    fp64 so that counts past 2**24 stay exact; zeros for an empty batch."""
    count = x.shape[0] * x.shape[2]
    if count == 0:
        return x.new_zeros(1 + 2 * x.shape[1], dtype=torch.float64)
    var, mean = torch.var_mean(x.to(stats_dtype(x.dtype)), dim=(0, 2), correction=0)
    return torch.cat([x.new_full((1,), count, dtype=torch.float64), mean.double(), var.double() * count])


def _global_moments(x: Tensor, group: Any) -> tuple[int, Tensor, Tensor]:
    """The count, mean and biased variance per channel of the inputs of all
    ranks of ``group`` together (one all-gather)."""
    local = _local_moments(x)
    gathered = local.new_empty(dist.get_world_size(group) * local.numel())
    _all_gather_flat(gathered, local, group=group)
    gathered = gathered.view(-1, local.numel())
    channels = x.shape[1]
    counts, means, m2s = gathered[:, :1], gathered[:, 1 : 1 + channels], gathered[:, 1 + channels :]
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    m2 = (m2s + counts * (means - mean).square()).sum(0)
    return int(total.item()), mean, m2 / total


def _update_running(running: Tensor, batch: Tensor, momentum: float) -> None:
    """running = (1-momentum)*running + momentum*batch, as the batch_norm kernels do."""
    running.copy_(momentum * batch + (1.0 - momentum) * running.to(batch.dtype))


def _normalize(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """y and rstd: the batch_norm op in eval mode, which normalises with the
    statistics it is given (the global ones here) and updates nothing."""
    if x.numel() == 0:  # a rank with no samples: nothing to launch a kernel on
        return torch.empty_like(x), torch.rsqrt(var + eps)
    y, stats = batch_norm_fwd(x, weight, bias, mean, var, None, False, 0.0, eps, "none")
    return y, stats[1]


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
        group: Any,
    ) -> Tensor:
        count, mean, var = _global_moments(x, group)
        if count <= 1:
            raise ArgumentError(
                f"Expected more than 1 value per channel when training, got {count} over the "
                f"process group (input of shape {tuple(x.shape)} on this rank)"
            )
        mean, var = mean.to(stats_dtype(x.dtype)), var.to(stats_dtype(x.dtype))
        if running_mean is not None:
            _update_running(running_mean, mean, momentum)
            _update_running(running_var, var * (count / (count - 1)), momentum)
        y, rstd = _normalize(x, weight, bias, mean, var, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.count, ctx.group = count, group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @refuse_second_derivative("sync_batch_norm")
    def backward(ctx, dy: Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        # in the stats dtype, rounded once at the end (module docstring)
        dy = dy.to(rstd.dtype)
        xhat = (x.to(rstd.dtype) - _per_channel(mean)) * _per_channel(rstd)
        local_sums = torch.stack([dy.sum(dim=(0, 2)), (dy * xhat).sum(dim=(0, 2))])
        sums = local_sums.clone()
        dist.all_reduce(sums, group=ctx.group)
        mean_dy, mean_dy_xhat = sums / ctx.count
        gain = rstd * weight.to(rstd.dtype) if weight is not None else rstd
        dx = (dy - _per_channel(mean_dy) - xhat * _per_channel(mean_dy_xhat)) * _per_channel(gain)
        # weight and bias get this rank's sums, as any other parameter its
        # local gradient: DDP and FSDP average gradients over the ranks
        local_dbias, local_dweight = local_sums
        return (
            dx.to(x.dtype),
            local_dweight.to(weight.dtype) if weight is not None else None,
            local_dbias.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None,
            None,
            None,
            None,
            None,
            None,
        )


def sync_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group: Any = None,
) -> Tensor:
    """Training-mode ``batch_norm`` of ``(N, C, *)`` input with statistics
    over the inputs of all ranks of ``process_group`` (default: the world);
    ``running_mean`` and ``running_var`` (when given) take ``momentum`` of
    the global mean and unbiased variance. Every rank of the group must call
    it, with the same C; N may differ from rank to rank, and be 0."""
    check_float("input", input)
    if input.dim() < 2:
        raise ArgumentError(f"input must have shape (N, C), (N, C, L) or (N, C, H, W), got {tuple(input.shape)}")
    channels = input.shape[1]
    check_params(input, (weight, bias, running_mean, running_var))
    eps = check_number("eps", eps, low=0.0, low_open=True)
    momentum = check_number("momentum", momentum)
    group = process_group or dist.group.WORLD
    x = input.reshape(input.shape[0], channels, math.prod(input.shape[2:]))
    weight, bias = contiguous_param(weight), contiguous_param(bias)  # the kernels read them element after element
    y = _SyncBatchNormFunction.apply(x, weight, bias, running_mean, running_var, momentum, eps, group)
    return y.view(input.shape)


class SyncBatchNorm(BatchNormForward, _BatchNorm):
    """``torch.nn.SyncBatchNorm`` on gpukernels' ops, for ``(N, C, *)``
    input on any device (PyTorch's needs a GPU). In training, with a process
    group of more than one rank, batch statistics are the whole group's;
    otherwise (eval, one process, no process group) it is our BatchNorm.

    Parameter and buffer names are PyTorch's. It is not a subclass of
    ``torch.nn.SyncBatchNorm``: DistributedDataParallel refuses those on CPU.
    ``kwargs`` go to ``torch.nn.modules.batchnorm._BatchNorm`` (``bias=False``
    where this torch has it).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device=None,
        dtype=None,
        **kwargs: Any,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ArgumentError(f"input must have at least 2 dims (N, C, *), got shape {tuple(input.shape)}")

    def _sync_group(self) -> Any:
        """The group to share batch statistics over, or None to use local ones."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def _momentum(self) -> float:
        """This step's momentum, counting the batch: the rule of
        ``torch.nn.modules.batchnorm._BatchNorm.forward``."""
        if not (self.track_running_stats and self.num_batches_tracked is not None):
            return 0.0 if self.momentum is None else self.momentum
        self.num_batches_tracked.add_(1)
        return 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

    def fused(self, input: Tensor, activation: str, residual: Tensor | None = None) -> Tensor:
        """BatchNorm's ``fused`` without a process group to share statistics over; with
        one, an error: the synced op applies no activation and adds no residual."""
        if (activation != "none" or residual is not None) and self._sync_group() is not None:
            raise ArgumentError(
                "SyncBatchNorm.fused with an activation or a residual runs on local batch statistics only; "
                "with a process group, call the module and apply the activation after it"
            )
        return super().fused(input, activation, residual)

    def forward(self, input: Tensor) -> Tensor:
        group = self._sync_group()
        if group is None:
            return super().forward(input)
        self._check_input_dim(input)
        tracked = self.track_running_stats
        return sync_batch_norm(
            input,
            self.running_mean if tracked else None,
            self.running_var if tracked else None,
            self.weight,
            self.bias,
            self._momentum(),
            self.eps,
            group,
        )

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group: Any = None) -> torch.nn.Module:
        """``convert_sync_batchnorm(module, process_group)``."""
        return convert_sync_batchnorm(module, process_group)


# The forwards of the BatchNorms a SyncBatchNorm computes what they do: torch's, ours, torch's SyncBatchNorm.
_CONVERTIBLE_FORWARDS = (_BatchNorm.forward, BatchNormForward.forward, torch.nn.SyncBatchNorm.forward)


def _to_sync(bn: _BatchNorm, process_group: Any) -> SyncBatchNorm:
    """A SyncBatchNorm holding ``bn``'s own parameters and buffers (the same
    tensors, so an optimizer built on the model still steps them)."""
    if type(bn).forward not in _CONVERTIBLE_FORWARDS:
        raise ArgumentError(
            f"{type(bn).__name__} is a BatchNorm subclass with a forward of its own (timm's BatchNormAct2d applies "
            "an activation), which SyncBatchNorm would drop: convert it with its library's conversion "
            "(timm.layers.convert_sync_batchnorm)"
        )
    # one gk.patch fused an activation module into is fine: the FusedActivation patch left in the
    # module's place applies it once the BatchNorm is no longer in its own
    if getattr(bn, "activation", "none") != "none" and "fused_at" not in bn.__dict__:
        raise ArgumentError(
            f"{type(bn).__name__} applies activation {bn.activation!r}, which SyncBatchNorm does not: "
            "build it without, with the activation module after it"
        )
    kwargs = {} if bn.bias is not None or not bn.affine else {"bias": False}
    sync = SyncBatchNorm(
        bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, process_group, **kwargs
    )
    for name, param in bn.named_parameters(recurse=False):
        setattr(sync, name, param)
    for name, buffer in bn.named_buffers(recurse=False):
        setattr(sync, name, buffer)
    sync.train(bn.training)
    if hasattr(bn, "qconfig"):
        sync.qconfig = bn.qconfig
    return sync


def convert_sync_batchnorm(module: torch.nn.Module, process_group: Any = None) -> torch.nn.Module:
    """``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` to our
    ``SyncBatchNorm``: every BatchNorm layer in ``module`` (PyTorch's, ours,
    or PyTorch's SyncBatchNorm) is replaced by one that shares its
    parameters, buffers and training flag. Returns ``module``, or the new
    layer if ``module`` itself is a BatchNorm."""
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        return _to_sync(module, process_group)
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module
