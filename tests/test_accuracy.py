"""``python -m bench.accuracy`` on CPU: every public op measured, and its errors those of
a correct op (fp64 and fp32 at PyTorch's, bf16 and fp16 no worse than PyTorch's own)."""

import pytest
import torch

import gpukernels as gk
from bench import accuracy

CPU = torch.device("cpu")
EXACT_TOLERANCE = {torch.float64: 1e-11, torch.float32: 1e-4}


def _assert_correct(what: str, dtype: torch.dtype, err: accuracy.Error) -> None:
    if dtype in accuracy.LOW_PRECISION:
        # the dtype's epsilon: one rounding of the result; PyTorch's own (the same
        # formula in bf16/fp16) is the bound where its error is larger
        bound = max(1.25 * err.torch, torch.finfo(dtype).eps)
    else:
        bound = EXACT_TOLERANCE[dtype]
    assert err.ours <= bound, (what, dtype, err.ours, bound)


def test_every_public_op_is_measured():
    measured = {case.function for case in accuracy.cases(CPU)}
    assert measured == set(gk.functional.__all__)


@pytest.fixture(scope="module")
def rows():
    with gk.use_backend("numpy"):
        return accuracy.measure(CPU)


def test_every_case_in_every_dtype(rows):
    names = [case.name for case in accuracy.cases(CPU)]
    assert [(name, dtype) for name, dtype, _, _ in rows] == [(n, d) for n in names for d in accuracy.DTYPES]


def test_errors_are_a_correct_ops(rows):
    for name, dtype, fwd, bwd in rows:
        _assert_correct(f"{name} forward", dtype, fwd)
        _assert_correct(f"{name} backward", dtype, bwd)


def test_adamw_errors_are_a_correct_optimizers():
    with gk.use_backend("numpy"):
        rows = accuracy.measure_adamw(CPU)
    assert [dtype for dtype, _ in rows] == list(accuracy.DTYPES)
    for dtype, err in rows:
        _assert_correct("AdamW", dtype, err)


def test_command_prints_the_ops_asked_for(capsys):
    accuracy.main(["--device", "cpu", "--ops", "swiglu,geglu"])
    out = capsys.readouterr().out
    assert "| swiglu | bfloat16 |" in out and "| geglu[tanh] | float16 |" in out and "(torch " in out
    assert "layer_norm" not in out and "AdamW" not in out
    accuracy.main(["--device", "cpu", "--ops", "adamw"])
    out = capsys.readouterr().out
    assert "| AdamW | float16 |" in out and "| op |" not in out


def test_unknown_op_is_an_error_naming_the_option(capsys):
    with pytest.raises(SystemExit):
        accuracy.main(["--device", "cpu", "--ops", "swiglu,layernorm"])
    assert "--ops: unknown layernorm; choose among" in capsys.readouterr().err
