"""One way of training a task: build its copy of the model, run the steps, time them."""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from tqdm import tqdm

from .. import optim as gk_optim
from ..capture import capture_step
from .profile import profile_step


class Way(NamedTuple):
    """How a way builds and runs its step. ``kind``: "plain" (torch layers,
    torch.optim.AdamW, torch's schedulers and clip), "gpukernels" (gk.patch, with the
    fused LM loss; gk.optim, the clip inside AdamW's step) or "liger" (Liger-Kernel's
    patch with torch's optimizer; the transformers module globals it replaces are put
    back after its run). ``compile_mode``: the model and loss under torch.compile in that
    mode ("default"; "reduce-overhead": Inductor replays the forward's and the backward's
    kernels from CUDA graphs), None for eager. ``captured``: after ``CAPTURE_AT`` eager
    steps, the whole step (forward, backward, clip and AdamW) in a CUDA graph,
    ``gk.capture_step``, replayed on each batch: no host time per op, what a host-bound
    step needs. A way with CUDA graphs runs on CUDA only (``graphs_unavailable``).
    ``patch_options``: keyword arguments of ``gk.patch`` (an A/B of one of its choices).
    ``by_default``: run when no ways are named (else only when named). ``autocast``:
    False runs a bfloat16 preset without autocast, in fp32: a reference that tells how
    far bf16 rounding alone moves a loss curve (``FP32_REFERENCES``)."""

    kind: str
    compile_mode: str | None = None
    captured: bool = False
    patch_options: tuple[tuple[str, object], ...] = ()
    by_default: bool = True
    autocast: bool = True

    @property
    def graphs(self) -> bool:
        return self.captured or self.compile_mode == "reduce-overhead"


# In this order: the eager ways, quick to start, before the compiled ones, which compile
# for a minute or more on a GPU, so that a run under a time limit (ci/gpu-check.sh) has
# measured them when it stops.
WAYS = {
    "eager": Way("plain"),
    "patched": Way("gpukernels"),
    # patched, its transformer blocks' norms returning fp32 under autocast, as the models' code does
    "patched-fp32-norms": Way("gpukernels", patch_options=(("autocast_norms", False),), by_default=False),
    # patched, its transformer blocks' residual addition apart from the norm after it, as the models' code has it
    "patched-residual-apart": Way("gpukernels", patch_options=(("residual_norms", False),), by_default=False),
    # patched with patch's default loss: the model's logits, then our cross_entropy (the language models)
    "patched-logits": Way("gpukernels", patch_options=(("loss", "logits"),), by_default=False),
    "captured": Way("gpukernels", captured=True),
    "liger": Way("liger"),
    "compile": Way("plain", "default"),
    "compile-patched": Way("gpukernels", "default"),
    "compile-cudagraphs": Way("plain", "reduce-overhead"),
    "compile-patched-cudagraphs": Way("gpukernels", "reduce-overhead"),
    # the same steps in fp32, no autocast: how far bf16 rounding moves each way's curve
    "eager-fp32": Way("plain", by_default=False, autocast=False),
    # patched in fp32: the reference where eager's fp32 logits do not fit (GPT-2's 50k vocabulary)
    "patched-fp32": Way("gpukernels", by_default=False, autocast=False),
}
FP32_REFERENCES = ("eager-fp32", "patched-fp32")
"""The fp32 ways, in order of preference as the reference the others' bf16 noise is judged by."""
CAPTURE_AT = 1
"""The captured way's eager steps before its capture (Triton compiles the kernels, the
optimizer makes its state); ``capture_step``'s warm-up is the next, on a side stream."""
REFERENCE = "eager"
MAX_GRAD_NORM = 1.0


@dataclass
class WayResult:
    losses: list[float] = field(default_factory=list)
    step_ms: float = 0.0  # median, the first steps (compilation, warm-up) left out
    first_step_ms: float = 0.0
    throughput: float = 0.0  # task units (tokens, images, samples) per second at the median step
    peak_mem_mib: float | None = None  # CUDA only
    saved_mib: float | None = None  # eager ways: what the first step's forward keeps for the backward
    report: str = ""  # what was patched
    evaluation: dict = field(default_factory=dict)
    profile: dict | None = None  # --profile: one more step's kernel time by origin (see profile.py)


class SavedForBackward:
    """Within ``hooks()``, the tensors autograd keeps for the backward (activations,
    autocast's copies of weights): their bytes, each storage counted once, the
    parameters' own left out. A memory measure any device gives: the peak on a GPU
    adds the parameters, gradients, optimizer state and what kernels hold for a while."""

    def __init__(self, model: torch.nn.Module):
        self._parameters = {(p.device, p.untyped_storage().data_ptr()) for p in model.parameters()}
        self._storages: dict = {}

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            storage = tensor.untyped_storage()
            key, size = (tensor.device, storage.data_ptr()), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without a storage of its own
            key, size = id(tensor), tensor.numel() * tensor.element_size()
        if key not in self._parameters:
            self._storages[key] = size
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    @property
    def mib(self) -> float:
        return sum(self._storages.values()) / 2**20


def timed_steps(steps: int) -> slice:
    """Steps the median is taken over: the first ones compile kernels and warm the allocator."""
    return slice(min(5, steps // 2), steps)


def _plain_optimizer(model: torch.nn.Module, lr: float, steps: int, warmup: int):
    """torch.optim.AdamW on a warm-up then cosine schedule, and the clip function to call
    before each step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        [
            torch.optim.lr_scheduler.LinearLR(optimizer, 1.0 / warmup, 1.0, max(warmup - 1, 1)),
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps - warmup, eta_min=lr * 0.01),
        ],
        milestones=[warmup],
    )
    return optimizer, scheduler, lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)


def graphs_unavailable(device: torch.device) -> str | None:
    """Why a way with CUDA graphs cannot run on ``device``, or None."""
    return None if device.type == "cuda" else f"CUDA graphs need a CUDA device, not {device.type}"


def _gpukernels_optimizer(model: torch.nn.Module, lr: float | torch.Tensor, steps: int, warmup: int):
    """The same schedule in closed form (see gk.optim.WarmupCosineLR); the clip inside the
    step (``max_grad_norm``: the update kernel scales each grad as it reads it, so no
    pass over the grads scales them first), nothing to call before it. A tensor ``lr``
    (a captured step's) is the one the schedule changes in place."""
    optimizer = gk_optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, max_grad_norm=MAX_GRAD_NORM)
    return optimizer, gk_optim.warmup_cosine(optimizer, warmup, steps, min_lr=lr * 0.01), lambda: None


def _captured_steps(loss_of, optimizer, scheduler, autocast, saved: SavedForBackward) -> Callable[[int, tuple], float]:
    """The captured way's ``one_step(step, batch)``: ``CAPTURE_AT`` eager steps (the
    first measures what its forward saves), then
    ``capture_step`` (its warm-up is that step's training step, on a side stream; the
    capture itself runs nothing), then a replay per batch. The schedule steps outside
    the graph, writing the lr tensor the graph reads."""
    replay = None

    def graph_step(*batch: torch.Tensor) -> torch.Tensor:
        with autocast:
            loss = loss_of(*batch)
        loss.backward()
        optimizer.step()  # the clip is inside it (gk.optim.AdamW's max_grad_norm)
        return loss.detach()

    def one_step(step: int, batch: tuple) -> float:
        nonlocal replay
        if replay is not None:
            loss = replay(*batch)
        elif step < CAPTURE_AT:
            optimizer.zero_grad(set_to_none=True)
            with saved.hooks() if step == 0 else contextlib.nullcontext():
                loss = graph_step(*batch)
        else:
            losses = []  # the warm-up's loss, then the graph's output (written by each replay)

            def recorded_step(*b: torch.Tensor) -> torch.Tensor:
                losses.append(graph_step(*b))
                return losses[-1]

            replay = capture_step(recorded_step, *batch, optimizer=optimizer, warmup_steps=1)
            loss = losses[0]
        scheduler.step()
        return loss.item()

    return one_step


def run_way(
    task,
    way: str,
    base_model: torch.nn.Module,
    cfg: dict,
    autocast_dtype: torch.dtype | None,
    device: torch.device,
    profile_to: Path | None = None,
) -> WayResult:
    """``profile_to``: after the evaluation, profile one more step and write its kernel
    table there."""
    spec = WAYS[way]
    kind, compile_mode, captured, patch_options = spec.kind, spec.compile_mode, spec.captured, spec.patch_options
    compiled = compile_mode is not None
    steps, result = cfg["steps"], WayResult()
    warmup = max(1, steps // 10)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with contextlib.ExitStack() as stack:
        model = copy.deepcopy(base_model).to(device)
        if kind == "plain":
            loss_of, result.report = task.plain(model), "torch layers"
        elif kind == "gpukernels":
            loss_of, result.report = task.gpukernels(model, **dict(patch_options))
        else:
            loss_of, result.report = task.liger(model, stack)
        if compiled:
            loss_of = torch.compile(loss_of, mode=compile_mode)
            stack.callback(torch._dynamo.reset)  # compiled code keeps this model's tensors alive
        make_optimizer = _plain_optimizer if kind != "gpukernels" else _gpukernels_optimizer
        # a captured step reads the lr from device memory, where the schedule writes it
        lr = torch.tensor(cfg["lr"], dtype=torch.float64, device=device) if captured else cfg["lr"]
        optimizer, scheduler, clip = make_optimizer(model, lr, steps, warmup)
        autocast = torch.autocast(
            device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None and spec.autocast
        )
        seconds = []
        # measured in the first step, which the median leaves out; not under torch.compile,
        # whose graphs would be traced with the hooks
        saved = None if compiled else SavedForBackward(model)
        model.train()

        def eager_step(step: int, batch: tuple) -> float:
            if compile_mode == "reduce-overhead":  # the last step's graph outputs (its loss) are read: a new step
                torch.compiler.cudagraph_mark_step_begin()
            with autocast, saved.hooks() if saved is not None and step == 0 else contextlib.nullcontext():
                loss = loss_of(*batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip()
            optimizer.step()
            scheduler.step()
            return loss.item()  # .item() waits for the GPU, so the step time is real

        one_step = _captured_steps(loss_of, optimizer, scheduler, autocast, saved) if captured else eager_step

        progress = tqdm(range(steps), desc=way, leave=False, disable=None)
        for step in progress:
            batch = task.batch(step)
            start = time.perf_counter()
            result.losses.append(one_step(step, batch))
            seconds.append(time.perf_counter() - start)
            progress.set_postfix(loss=f"{result.losses[-1]:.4f}")
        with autocast:
            result.evaluation = task.evaluate(model)
        if profile_to is not None:
            model.train()  # the evaluation may have left it in eval mode
            try:
                result.profile, text = profile_step(lambda: one_step(steps, batch), device)
            except Exception as error:  # the way's own numbers stand without it
                traceback.print_exc()
                result.profile, text = {"error": f"{type(error).__name__}: {error}"}, f"profile failed: {error}\n"
            profile_to.write_text(f"{way}: {text}")
    result.first_step_ms = 1e3 * seconds[0]
    result.step_ms = 1e3 * statistics.median(seconds[timed_steps(steps)])
    result.throughput = task.units_per_step / (result.step_ms / 1e3)
    if device.type == "cuda":
        result.peak_mem_mib = torch.cuda.max_memory_allocated(device) / 2**20
    if saved is not None:
        result.saved_mib = saved.mib
    return result
