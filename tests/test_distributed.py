"""gpukernels inside PyTorch's distributed training, on CPU with gloo.

Two processes (``torch.multiprocessing`` spawn, a FileStore rendezvous) run
every two-rank scenario once per module, each on its half of a global batch
with the NumPy kernels, and save what they saw; the tests compare that with
a single-process run in this process on the whole batch, step by step:

- DDP and FSDP2 (``fully_shard``) training of a patched model (LinearAct,
  SyncBatchNorm, LayerNorm, CrossEntropyLoss) with our AdamW and our global
  gradient clipping, by clip_grad_norm_ or inside the step (max_grad_norm);
- SyncBatchNorm against BatchNorm over the whole batch (uneven and empty
  ranks, layouts, dtypes, momentum=None, eval after training);
- torch.distributed.checkpoint: save, load, identical continuation; and
  checkpoints moving between torch.optim.AdamW and ours both ways.
"""

from __future__ import annotations

import copy
import datetime
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate
from torch.nn.parallel import DistributedDataParallel

import gpukernels as gk
from gpukernels.distributed import SyncBatchNorm, convert_sync_batchnorm, sync_batch_norm
from helpers import TOLERANCES, assert_matches

WORLD = 2
SPAWN_DEADLINE_S = 150
COLLECTIVE_TIMEOUT_S = 30  # a rank that diverged fails the scenarios after it, not the run forever
FEATURES, HIDDEN, CLASSES = 6, 15, 5  # HIDDEN odd: FSDP shards rows 8 + 7
BATCH = 16  # global; each rank takes its half
STEPS = 4
LR, MAX_NORM = 2e-2, 0.5
# fp32 training over a few steps: the ranks sum in another order than one process
TRAIN_TOL = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- shared by ranks and reference


def make_model() -> torch.nn.Module:
    """A torch model, patched: Linear+GELU -> LinearAct, BatchNorm1d and
    LayerNorm ours, the last Linear left as PyTorch's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, HIDDEN),
        torch.nn.GELU(),
        torch.nn.BatchNorm1d(HIDDEN),
        torch.nn.LayerNorm(HIDDEN),
        torch.nn.Linear(HIDDEN, CLASSES),
    )
    gk.patch(model)
    return model


def batches(steps: int = STEPS, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(BATCH, FEATURES, generator=g) * 2, torch.randint(0, CLASSES, (BATCH,), generator=g))
        for _ in range(steps)
    ]


def rank_slice(t: torch.Tensor, rank: int) -> torch.Tensor:
    half = t.shape[0] // WORLD
    return t[rank * half : (rank + 1) * half]


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's global value (a collective), a plain tensor itself; detached copy."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: full(t) for name, t in model.state_dict().items()}


def train(model, optimizer, data, loss_mean=lambda loss: loss.detach()) -> dict[str, list]:
    """Steps of forward, backward, clip_grad_norm_, AdamW (or AdamW that clips
    itself: ``max_grad_norm``); per step the loss (``loss_mean`` makes it the
    global batch's), total grad norm and every parameter and buffer."""
    loss_fn = gk.nn.CrossEntropyLoss()
    record = {"loss": [], "norm": [], "state": []}
    clips_in_step = getattr(optimizer, "max_grad_norm", None) is not None
    for x, y in data:
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        norm = None if clips_in_step else gk.optim.clip_grad_norm_(model.parameters(), MAX_NORM)
        optimizer.step()
        norm = optimizer.grad_norm if clips_in_step else norm
        record["loss"].append(loss_mean(loss))
        record["norm"].append(full(norm))
        record["state"].append(full_state(model))
    return record


def single_process_training(steps: int = STEPS) -> dict[str, list]:
    model = make_model()
    return train(model, gk.optim.AdamW(model.parameters(), lr=LR), batches(steps))


# ---------------------------------------------------------------- the two-rank scenarios


def _global_mean(loss: torch.Tensor) -> torch.Tensor:
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total / WORLD


def _local_batches(rank: int, steps: int = STEPS, seed: int = 1):
    return [(rank_slice(x, rank), rank_slice(y, rank)) for x, y in batches(steps, seed)]


def _fsdp_model():
    model = convert_sync_batchnorm(make_model())
    for layer in model:
        if next(layer.parameters(), None) is not None:
            fully_shard(layer)
    return fully_shard(model)


def scenario_ddp(rank: int, _: Path, max_grad_norm: float | None = None) -> dict:
    model = DistributedDataParallel(convert_sync_batchnorm(make_model()))
    optimizer = gk.optim.AdamW(model.parameters(), lr=LR, max_grad_norm=max_grad_norm)
    record = train(model, optimizer, _local_batches(rank), _global_mean)
    record["state"] = [{k.removeprefix("module."): v for k, v in s.items()} for s in record["state"]]
    record["sync_bn"] = type(model.module[2]).__name__
    return record


def scenario_ddp_max_grad_norm(rank: int, tmp: Path) -> dict:
    return scenario_ddp(rank, tmp, max_grad_norm=MAX_NORM)


def scenario_fsdp_max_grad_norm(rank: int, _: Path) -> dict:
    """Each rank's grads are shards (DTensors): the norm AdamW measures and
    clips with must be the whole model's, a plain tensor on every rank."""
    model = _fsdp_model()
    optimizer = gk.optim.AdamW(model.parameters(), lr=LR, max_grad_norm=MAX_NORM)
    record = train(model, optimizer, _local_batches(rank), _global_mean)
    record["grad_norm_type"] = type(optimizer.grad_norm).__name__
    record["grads_unclipped"] = full(model[0].weight.grad).norm() > MAX_NORM
    return record


def scenario_fsdp(rank: int, _: Path) -> dict:
    model = _fsdp_model()
    optimizer = gk.optim.AdamW(model.parameters(), lr=LR)
    record = train(model, optimizer, _local_batches(rank), _global_mean)
    weight = model[0].weight
    state = optimizer.state[weight]
    record["layout"] = {
        "param": type(weight).__name__,
        "local_rows": weight.to_local().shape[0],
        "exp_avg": type(state["exp_avg"]).__name__,
        "step": type(state["step"]).__name__,
    }
    weight.grad = torch.zeros_like(weight).redistribute(placements=[Replicate()])
    try:
        optimizer.step()
        record["placement_error"] = None
    except RuntimeError as e:
        record["placement_error"] = str(e)
    return record


def _dcp_save(model, optimizer, path: Path) -> None:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def _dcp_load(model, optimizer, path: Path) -> None:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


OPTIMIZERS = {"ours": gk.optim.AdamW, "torch": torch.optim.AdamW}


def _save_and_continue(rank: int, path: Path, save_with: str, load_with: str) -> dict:
    """Train 2 steps with ``save_with``, checkpoint, train 2 more; then a
    model and ``load_with`` optimizer built afresh (other init) load the
    checkpoint and train the same 2 steps."""
    first, then = _local_batches(rank, 2, seed=1), _local_batches(rank, 2, seed=2)
    model = _fsdp_model()
    optimizer = OPTIMIZERS[save_with](model.parameters(), lr=LR)
    train(model, optimizer, first, _global_mean)
    _dcp_save(model, optimizer, path)
    continued = train(model, optimizer, then, _global_mean)
    torch.manual_seed(123)
    fresh = _fsdp_model()
    for p in fresh.parameters():
        torch.nn.init.normal_(p.to_local())
    fresh_optimizer = OPTIMIZERS[load_with](fresh.parameters(), lr=LR * 3, weight_decay=0.5)
    _dcp_load(fresh, fresh_optimizer, path)
    return {"continued": continued, "resumed": train(fresh, fresh_optimizer, then, _global_mean)}


def scenario_checkpoint_round_trip(rank: int, tmp: Path) -> dict:
    return _save_and_continue(rank, tmp / "ours", "ours", "ours")


def scenario_checkpoint_torch_to_ours(rank: int, tmp: Path) -> dict:
    return _save_and_continue(rank, tmp / "torch-to-ours", "torch", "ours")


def scenario_checkpoint_ours_to_torch(rank: int, tmp: Path) -> dict:
    return _save_and_continue(rank, tmp / "ours-to-torch", "ours", "torch")


def scenario_optimizer_state_dict_layout(rank: int, _: Path) -> dict:
    """What DCP's get_optimizer_state_dict gives for each optimizer after a step."""
    layouts = {}
    for name, cls in OPTIMIZERS.items():
        model = _fsdp_model()
        optimizer = cls(model.parameters(), lr=LR)
        train(model, optimizer, _local_batches(rank, 1))
        state = get_optimizer_state_dict(model, optimizer)["state"]
        layouts[name] = {
            (fqn, key): (type(v).__name__, tuple(v.shape), v.dtype, str(getattr(v, "placements", "")))
            for fqn, entry in state.items()
            for key, v in entry.items()
        }
    return layouts


# SyncBatchNorm cases: module class, per-rank batch sizes, feature dims, dtype, options
BN_CASES = {
    "1d-uneven-fp64": (torch.nn.BatchNorm1d, (3, 5), (7,), torch.float64, {}),
    "1d-3d-input-fp32": (torch.nn.BatchNorm1d, (2, 2), (4, 9), torch.float32, {}),
    "2d-channels-last-fp32": (torch.nn.BatchNorm2d, (1, 3), (3, 4, 5), torch.float32, {"channels_last": True}),
    "2d-empty-rank-fp64": (torch.nn.BatchNorm2d, (0, 4), (3, 2, 3), torch.float64, {}),
    "1d-cumulative-momentum-no-affine-fp64": (
        torch.nn.BatchNorm1d,
        (4, 2),
        (5,),
        torch.float64,
        {"momentum": None, "affine": False},
    ),
    "2d-no-running-stats-fp32": (
        torch.nn.BatchNorm2d,
        (2, 3),
        (4, 3, 3),
        torch.float32,
        {"track_running_stats": False},
    ),
    "1d-bf16-input-fp32-params": (torch.nn.BatchNorm1d, (6, 4), (8, 3), torch.bfloat16, {}),
}
BN_STEPS = 2


def bn_case(name: str):
    """A torch BatchNorm with random affine params and running stats (fp32
    for bf16 input), and per step a global input and upstream gradient."""
    cls, sizes, dims, dtype, options = BN_CASES[name]
    g = torch.Generator().manual_seed(len(name))
    param_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    bn = cls(
        dims[0],
        momentum=options.get("momentum", 0.1),
        affine=options.get("affine", True),
        track_running_stats=options.get("track_running_stats", True),
        dtype=param_dtype,
    )
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            if t is not None:
                t.copy_(torch.randn(t.shape, generator=g))
        if bn.running_var is not None:
            bn.running_var.copy_(torch.rand(dims[0], generator=g) + 0.5)
    layout = torch.channels_last if options.get("channels_last") else torch.contiguous_format
    steps = []
    for _ in range(BN_STEPS):
        x = (torch.randn(sum(sizes), *dims, generator=g, dtype=torch.float64) * 3 + 1).to(dtype)
        dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
        steps.append((x.contiguous(memory_format=layout), dy.contiguous(memory_format=layout)))
    return bn, sizes, steps


def _rows(t: torch.Tensor, sizes: tuple[int, ...], rank: int) -> torch.Tensor:
    return t[sum(sizes[:rank]) : sum(sizes[: rank + 1])]


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    formats = [torch.contiguous_format] + ([torch.channels_last] if a.dim() == 4 else [])
    return all(a.is_contiguous(memory_format=f) == b.is_contiguous(memory_format=f) for f in formats)


def run_bn(bn: torch.nn.Module, steps, sizes=None, rank=0) -> dict:
    """Training steps then one eval forward (with running stats: without,
    eval uses each rank's batch, as torch.nn.SyncBatchNorm); per step y and
    the gradients of input, weight, bias; then the buffers (``sizes`` slices
    this rank's rows)."""
    record = {"y": [], "dx": [], "dweight": [], "dbias": [], "layout_kept": True}
    for x, dy in steps:
        if sizes is not None:
            x, dy = _rows(x, sizes, rank), _rows(dy, sizes, rank)
        x = x.clone().requires_grad_()
        bn.zero_grad()
        y = bn(x)
        y.backward(dy)
        record["layout_kept"] &= same_layout(y, x) and same_layout(x.grad, x)
        record["y"].append(y.detach())
        record["dx"].append(x.grad)
        record["dweight"].append(None if bn.weight is None else bn.weight.grad.clone())
        record["dbias"].append(None if bn.bias is None else bn.bias.grad.clone())
    bn.eval()
    x = steps[0][0] if sizes is None else _rows(steps[0][0], sizes, rank)
    record["eval_y"] = bn(x).detach() if bn.track_running_stats else None
    record["buffers"] = {k: v.clone() for k, v in bn.named_buffers()}
    return record


def scenario_sync_batchnorm(rank: int, _: Path) -> dict:
    results = {}
    for name in BN_CASES:
        bn, sizes, steps = bn_case(name)
        sync = convert_sync_batchnorm(bn)
        results[name] = run_bn(sync, steps, sizes, rank) | {"type": type(sync).__name__}
    return results


def scenario_sync_batchnorm_too_few_values(rank: int, _: Path) -> dict:
    """One sample in the whole group: every rank raises (none hangs)."""
    bn = SyncBatchNorm(3)
    try:
        bn(torch.randn(1 - rank, 3))
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


SCENARIOS = {name.removeprefix("scenario_"): fn for name, fn in dict(globals()).items() if name.startswith("scenario_")}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    try:
        for name, scenario in SCENARIOS.items():
            work = Path(out_dir) / "work"
            try:
                result = {"value": scenario(rank, work)}
            except Exception:
                result = {"error": traceback.format_exc()}
            torch.save(result, Path(out_dir) / f"{name}-{rank}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


@dataclass
class TwoRanks:
    results: dict[str, list | None]  # per scenario, each rank's saved result (None: not saved)
    crash: str | None  # why a rank exited early, if one did


def _join(context: mp.ProcessContext) -> str | None:
    """Wait for both ranks; the error of a rank that crashed, if one did."""
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):  # True once all have exited
            if time.monotonic() >= deadline:
                for process in context.processes:
                    process.kill()
                return f"the two ranks did not finish within {SPAWN_DEADLINE_S} s"
    except mp.ProcessRaisedException as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> TwoRanks:
    """Every scenario's per-rank results, from one spawn of two processes."""
    out = tmp_path_factory.mktemp("distributed")
    context = mp.start_processes(
        _worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=False, start_method="spawn"
    )
    crash = _join(context)

    def load(name: str) -> list | None:
        files = [out / f"{name}-{rank}.pt" for rank in range(WORLD)]
        return [torch.load(f, weights_only=False) for f in files] if all(f.exists() for f in files) else None

    return TwoRanks({name: load(name) for name in SCENARIOS}, crash)


def results_of(ranks: TwoRanks, name: str) -> list:
    per_rank = ranks.results[name]
    if per_rank is None:
        pytest.fail(f"scenario {name!r} left no results; a rank ended early:\n{ranks.crash}")
    for rank, result in enumerate(per_rank):
        if "error" in result:
            pytest.fail(f"scenario {name!r} failed on rank {rank}:\n{result['error']}")
    return [result["value"] for result in per_rank]


def assert_tracks(record: dict, reference: dict, **tol) -> None:
    """Loss, grad norm and every parameter and buffer match, step by step."""
    for step, (loss, ref_loss) in enumerate(zip(record["loss"], reference["loss"], strict=True)):
        torch.testing.assert_close(loss, ref_loss, **tol, msg=lambda m: f"loss at step {step}: {m}")
        torch.testing.assert_close(
            record["norm"][step], reference["norm"][step], **tol, msg=lambda m: f"grad norm at step {step}: {m}"
        )
        assert record["state"][step].keys() == reference["state"][step].keys()
        for key, value in reference["state"][step].items():
            torch.testing.assert_close(
                record["state"][step][key], value, **tol, msg=lambda m: f"{key} after step {step}: {m}"
            )


# ---------------------------------------------------------------- tests: two ranks


@pytest.fixture(scope="module")
def reference() -> dict:
    record = single_process_training()
    assert max(record["norm"]) > MAX_NORM, "the grad norm never exceeds max_norm: clipping is not tested"
    return record


def test_ddp_training_tracks_single_process(ranks, reference):
    for record in results_of(ranks, "ddp"):
        assert record["sync_bn"] == "SyncBatchNorm"
        assert_tracks(record, reference, **TRAIN_TOL)


def test_fsdp2_training_tracks_single_process(ranks, reference):
    for rank, record in enumerate(results_of(ranks, "fsdp")):
        assert record["layout"] == {
            "param": "DTensor",
            "local_rows": (8, 7)[rank],
            "exp_avg": "DTensor",
            "step": "Tensor",
        }
        assert_tracks(record, reference, **TRAIN_TOL)


def test_fsdp2_adamw_rejects_grad_sharded_unlike_its_param(ranks):
    for record in results_of(ranks, "fsdp"):
        assert record["placement_error"] is not None and "placements" in record["placement_error"]


def test_fsdp2_clip_grad_norm_is_global_norm(ranks, reference):
    """Each rank holds half of every gradient; the norm it returns and
    clips with is the whole model's (the single-process one)."""
    for record in results_of(ranks, "fsdp"):
        torch.testing.assert_close(torch.stack(record["norm"]), torch.stack(reference["norm"]), **TRAIN_TOL)


@pytest.mark.parametrize("scenario", ["ddp_max_grad_norm", "fsdp_max_grad_norm"])
def test_adamw_max_grad_norm_tracks_clip_grad_norm_single_process(ranks, reference, scenario):
    """AdamW(max_grad_norm=...) on two ranks against clip_grad_norm_ + AdamW in
    one process: the same norms (under FSDP2, global over the shards) and
    training; the grads are left unclipped."""
    for record in results_of(ranks, scenario):
        assert_tracks(record, reference, **TRAIN_TOL)
        if scenario.startswith("fsdp"):
            assert record["grad_norm_type"] == "Tensor" and record["grads_unclipped"]


@pytest.mark.parametrize("case", list(BN_CASES))
def test_sync_batchnorm_equals_batchnorm_over_whole_batch(ranks, case):
    per_rank = [results[case] for results in results_of(ranks, "sync_batchnorm")]
    bn, sizes, steps = bn_case(case)
    theirs = run_bn(bn, steps)
    reference = run_bn(bn_case(case)[0].double(), [(x.double(), dy.double()) for x, dy in steps])
    assert all(r["type"] == "SyncBatchNorm" for r in per_rank)
    for key in ("y", "dx"):
        for step in range(BN_STEPS):
            ours = torch.cat([r[key][step] for r in per_rank])
            assert_matches(ours, theirs[key][step], reference[key][step])
    for key in ("dweight", "dbias"):
        for step in range(BN_STEPS):
            if theirs[key][step] is None:
                assert all(r[key][step] is None for r in per_rank)
                continue
            # each rank's local sum, as DDP/FSDP then average
            ours = sum(r[key][step] for r in per_rank)
            torch.testing.assert_close(ours, theirs[key][step], **TOLERANCES[ours.dtype])
    for r in per_rank:
        assert r["buffers"].keys() == theirs["buffers"].keys()
        for key, value in theirs["buffers"].items():
            torch.testing.assert_close(r["buffers"][key], value, **TOLERANCES.get(value.dtype, {}))
        assert r["layout_kept"]
    if theirs["eval_y"] is not None:
        eval_y = torch.cat([r["eval_y"] for r in per_rank])
        assert_matches(eval_y, theirs["eval_y"], reference["eval_y"])


def test_sync_batchnorm_one_value_in_group_raises_on_every_rank(ranks):
    for record in results_of(ranks, "sync_batchnorm_too_few_values"):
        assert record["error"] is not None and "more than 1 value per channel" in record["error"]


def test_checkpoint_round_trip_continues_identically(ranks):
    for record in results_of(ranks, "checkpoint_round_trip"):
        for key in ("loss", "norm"):
            assert torch.equal(torch.stack(record["resumed"][key]), torch.stack(record["continued"][key])), key
        for resumed, continued in zip(record["resumed"]["state"], record["continued"]["state"], strict=True):
            for key, value in continued.items():
                assert torch.equal(resumed[key], value), key


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_checkpoint_moves_between_torch_adamw_and_ours(ranks, direction):
    """Saved by one optimizer, loaded into the other: training continues as
    the saving optimizer would have (the same math, in another order)."""
    for record in results_of(ranks, f"checkpoint_{direction}"):
        assert_tracks(record["resumed"], record["continued"], **TRAIN_TOL)


def test_optimizer_state_dict_layout_matches_torch_adamw(ranks):
    """DCP sees the same entries from ours as from torch.optim.AdamW: DTensor
    moments sharded as the params, a plain step."""
    for layouts in results_of(ranks, "optimizer_state_dict_layout"):
        assert layouts["ours"] == layouts["torch"]
        assert any(kind == "DTensor" for kind, *_ in layouts["ours"].values())


# ---------------------------------------------------------------- tests: one process


def test_numpy_kernels_leave_parameter_storage_resizable():
    """FSDP2 frees each unsharded parameter by resizing its storage to 0,
    which fails for storage that ``Tensor.numpy()`` has seen (it marks it
    non-resizable for good): the NumPy kernels must view tensors otherwise."""
    layer = gk.nn.LinearAct(4, 3, "gelu")
    layer(torch.randn(2, 4)).sum().backward()
    assert layer.weight.untyped_storage().resizable()


def test_convert_sync_batchnorm_shares_parameters_and_buffers():
    model = make_model()
    model.add_module("nested", torch.nn.Sequential(torch.nn.SyncBatchNorm(2), torch.nn.BatchNorm2d(3, affine=False)))
    model.eval()
    before = dict(model.named_parameters()) | dict(model.named_buffers())
    keys = list(model.state_dict())
    converted = convert_sync_batchnorm(model, process_group="group")
    assert converted is model
    for bn in (model[2], model.nested[0], model.nested[1]):
        assert type(bn) is SyncBatchNorm and bn.process_group == "group" and not bn.training
    assert list(model.state_dict()) == keys
    after = dict(model.named_parameters()) | dict(model.named_buffers())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    root = torch.nn.BatchNorm1d(4)
    assert type(SyncBatchNorm.convert_sync_batchnorm(root)) is SyncBatchNorm


def test_convert_sync_batchnorm_refuses_a_batchnorm_built_with_an_activation():
    """A BatchNorm built with an activation cannot become a SyncBatchNorm, which applies
    none: an error, not a model that silently drops the ReLU."""
    model = torch.nn.Sequential(gk.nn.BatchNorm2d(3, activation="relu"))
    with pytest.raises(ValueError, match="activation 'relu'.*build it without"):
        convert_sync_batchnorm(model)
    assert type(model[0]) is gk.nn.BatchNorm2d


@pytest.mark.parametrize("convert", [convert_sync_batchnorm, torch.nn.SyncBatchNorm.convert_sync_batchnorm])
def test_convert_sync_batchnorm_after_patch_keeps_the_fused_activation(convert):
    """BatchNorm -> ReLU that gk.patch fused, then converted (ours or torch's conversion): the
    activation module patch left applies the ReLU after the SyncBatchNorm, which has none
    (evaluated: both SyncBatchNorms then normalise by the running statistics on a CPU)."""
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3), torch.nn.ReLU()).double()
    with torch.no_grad():
        plain[1].running_mean.uniform_(-1, 1)
        plain[1].running_var.uniform_(0.5, 2)
    patched = copy.deepcopy(plain)
    gk.patch(patched)
    assert patched[1].activation == "relu"
    plain, patched = convert(plain).eval(), convert(patched).eval()
    assert isinstance(patched[1], torch.nn.SyncBatchNorm) or type(patched[1]) is SyncBatchNorm
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    assert (plain(x) == 0).any()  # the ReLU clamps some
    torch.testing.assert_close(patched(x), plain(x))


def test_sync_batchnorm_fuses_only_without_a_group_to_sync_over(monkeypatch):
    """.fused with an activation or a residual would skip the synced statistics: refused
    while a process group is there to sync over; without one it is our BatchNorm's."""
    bn = SyncBatchNorm(3, dtype=torch.float64)
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    expected = torch.relu(torch.nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, training=True))
    torch.testing.assert_close(bn.fused(x, "relu"), expected, **TOLERANCES[torch.float64])
    monkeypatch.setattr(SyncBatchNorm, "_sync_group", lambda self: "group")
    with pytest.raises(ValueError, match="local batch statistics"):
        bn.fused(x, "relu")
    with pytest.raises(ValueError, match="local batch statistics"):
        bn.fused(x, "none", x)


@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5)], ids=["2d", "3d"])
def test_sync_batchnorm_without_process_group_is_batchnorm(shape):
    """No process group (or eval): plain BatchNorm, as torch.nn.SyncBatchNorm."""
    assert not dist.is_initialized()
    x = torch.randn(shape, dtype=torch.float64)
    ours, theirs = SyncBatchNorm(4, dtype=torch.float64), torch.nn.BatchNorm1d(4, dtype=torch.float64)
    for _ in range(2):
        torch.testing.assert_close(ours(x), theirs(x), **TOLERANCES[torch.float64])
    torch.testing.assert_close(ours.running_var, theirs.running_var, **TOLERANCES[torch.float64])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        pytest.param(dict(input=torch.randn(5)), ValueError, "input", id="1d-input"),
        pytest.param(dict(input=torch.arange(6).view(2, 3)), TypeError, "input", id="integer-input"),
        pytest.param(dict(weight=torch.ones(4)), ValueError, "weight", id="weight-shape"),
        pytest.param(dict(bias=torch.ones(3, dtype=torch.float64)), TypeError, "bias", id="bias-dtype"),
        pytest.param(dict(running_var=None), ValueError, "running_mean", id="one-running-stat"),
        pytest.param(dict(eps=0.0), ValueError, "eps", id="eps-zero"),
        pytest.param(dict(momentum=float("nan")), ValueError, "momentum", id="momentum-nan"),
    ],
)
def test_sync_batch_norm_bad_input(kwargs, error, match):
    """Checked before any collective, so no process group is needed to see it."""
    args = (
        dict(
            input=torch.randn(4, 3),
            running_mean=torch.zeros(3),
            running_var=torch.ones(3),
            weight=torch.ones(3),
            bias=torch.zeros(3),
        )
        | kwargs
    )
    with pytest.raises(error, match=match):
        sync_batch_norm(**args)


def test_sync_batchnorm_rejects_1d_input():
    with pytest.raises(ValueError, match="input"):
        SyncBatchNorm(3)(torch.randn(3))
