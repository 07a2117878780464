"""Host time per op, gated: bench/host_time.py counts, under callgrind, the host
instructions of each op's forward and backward (AdamW: a step) through
Triton's real launch path against a stub libcuda, ours and PyTorch's, and this
test fails when ours / PyTorch's passes its bound.

Bounds: the target where it is met with room to spare; otherwise, not met or met
by less than 5%, the ratio measured when the bound was set plus 5% (counts vary by
a fraction of a percent between environments: a target met by 0.5% would make CI
fail by chance), so that host time cannot creep back; lower a bound when a change
brings its ratio down. The test prints which targets are met. Needs gcc and valgrind.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# ours / PyTorch's, host instructions per call
TARGETS = {
    **{(op, "standalone"): 1.5 for op in ("layer_norm", "dropout", "cross_entropy", "linear_act")},
    ("batch_norm", "standalone"): 2.0,
    # one op where PyTorch runs an addition and F.rms_norm (on CPU tensors: its composite form)
    ("add_rms_norm", "standalone"): 1.0,
    # a gated MLP's activation and product, one op where PyTorch runs two (on a packed gate-up tensor, its chunks too)
    **{("gated_act", mode): 1.5 for mode in ("standalone", "packed")},
    **{(op, "chain"): 2.5 for op in ("layer_norm", "batch_norm", "dropout", "cross_entropy", "linear_act")},
    ("adamw", "step"): 1.5,
}
# Targets not met, or met by less than 5%: measured + 5% (bench/results/host-time-2026-12-03-inline-checks:
# Python 3.11, torch 2.13, Triton 3.9, no backend selected, kernels launched by backends/triton/_launch.py;
# host-time-2026-12-03-contiguous-params: 1.63x and 1.93x with the parameters made contiguous).
BOUNDS = {
    ("layer_norm", "standalone"): 1.69,  # 1.61
    ("cross_entropy", "standalone"): 1.96,  # 1.87
    ("gated_act", "standalone"): 1.55,  # 1.48 (bench/results/host-time-2026-12-07-gated-act-rows)
}


def load_host_time():
    """bench/host_time.py as a module."""
    spec = importlib.util.spec_from_file_location("host_time", ROOT / "bench" / "host_time.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_host_time_ratios_within_bounds(tmp_path):
    host_time = load_host_time()
    reason = host_time.missing_tools()
    if reason:
        pytest.skip(f"cannot count host instructions: {reason}")
    result = host_time.main(["--out", str(tmp_path), "--calls", "10"])
    assert not result["errors"], f"ops not measured: {result['errors']}"
    measured = {(r["op"], r["mode"]): r for r in result["rows"]}
    assert set(TARGETS) <= set(measured)
    over = []
    print(f"\n{'op':14} {'what':11} {'ratio':>6} {'target':>7} {'bound':>6}")
    for key, target in TARGETS.items():
        bound = BOUNDS.get(key) or target
        ratio = measured[key]["ratio"]
        print(
            f"{key[0]:14} {key[1]:11} {ratio:6.2f} {target:7.2f} {bound:6.2f}"
            + ("" if ratio <= target else "  (target not met)")
        )
        if ratio > bound:
            over.append(f"{key}: {ratio:.2f}x > bound {bound:.2f}x (target {target:.2f}x)")
    assert not over, "host time over its bound:\n" + "\n".join(over)
    assert (tmp_path / "host_time.json").exists() and (tmp_path / "host_time.md").exists()


def test_bytecodes_by_function_counts_each_function_apart():
    """``--bytecodes``' count: every bytecode a call executes, per function, callees apart."""
    host_time = load_host_time()

    def inner(n):
        total = 0
        for i in range(n):
            total += i
        return total

    def outer():
        return inner(3) + inner(30)

    counts = host_time.bytecodes_by_function(outer)
    by_name = {where.rsplit(" ", 1)[1]: n for where, n in counts.items()}
    assert set(by_name) == {"outer", "inner"}
    # inner's loop body runs 33 times in all, outer runs a fixed few bytecodes
    assert by_name["inner"] > 33 * 4 > by_name["outer"] > 0
    assert host_time.bytecodes_by_function(lambda: inner(30)).most_common(1)[0][1] > by_name["inner"] / 2


@pytest.mark.parametrize("model", ["resnet50_step", "llama_step", "gpt2_step"])
def test_model_step_cases_train_alike(model):
    """The model-step cases (counted when named: ``--ops resnet50_step``) build both ways
    from the same weights and train on the same batch: here on the NumPy backend, the
    same losses step after step (the first from the same weights)."""
    pytest.importorskip("transformers")
    import gpukernels as gk

    host_time = load_host_time()
    with gk.use_backend("numpy"):
        torch.manual_seed(0)
        ours, pytorch = host_time.STEPS[model]()["train_step"]
        losses = [(ours().item(), pytorch().item()) for _ in range(3)]
    assert losses[0][0] == pytest.approx(losses[0][1], rel=1e-5)
    assert all(a == pytest.approx(b, rel=1e-3) for a, b in losses)
    assert losses[-1][1] < losses[0][1]


# torch functions whose parser, given one positional argument, first tries the ints-as-arguments
# form (``view(2, 3)``): a tuple or torch.Size there raises and clears a TypeError (ops/_op.py, reshaped)
_SIZE_FIRST = {"view", "reshape", "new_empty", "new_zeros", "new_ones", "empty", "zeros", "ones", "expand", "repeat"}
_HOT_PATHS = ["gpukernels/ops", "gpukernels/backends/triton", "gpukernels/_numerics.py", "gpukernels/nn.py",
              "gpukernels/optim.py", "gpukernels/patch.py", "gpukernels/functional.py"]  # fmt: skip


def _is_size_tuple(node) -> bool:
    """Whether ``node`` is, as written, a tuple of sizes: a tuple display, a ``.shape`` (or a
    slice of one), a name ending in ``shape``, or a conditional choosing between them."""
    import ast

    if isinstance(node, ast.IfExp):
        return _is_size_tuple(node.body) or _is_size_tuple(node.orelse)
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Slice):  # shape[1:], not shape[1]
        node = node.value
    return (
        isinstance(node, ast.Tuple)
        or (isinstance(node, ast.Attribute) and node.attr == "shape")
        or (isinstance(node, ast.Name) and node.id.endswith("shape"))
    )


def test_sizes_given_by_keyword_or_as_ints():
    """No op passes a size to torch's view, reshape, new_empty, empty, ... as one positional
    tuple (3,500 host instructions a call more than by keyword, 13,000 for a torch.Size)."""
    import ast

    files = [p for path in _HOT_PATHS for p in ([ROOT / path] if path.endswith(".py") else (ROOT / path).rglob("*.py"))]
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in _SIZE_FIRST
                and not (isinstance(node.func.value, ast.Name) and node.func.value.id in ("np", "numpy"))
                and len(node.args) == 1
                and _is_size_tuple(node.args[0])
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert len(files) > 20
    assert not found, "a size given as one positional tuple:\n" + "\n".join(found)
