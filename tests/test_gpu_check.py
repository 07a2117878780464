import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "ci" / "gpu-check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_check_fails_fast_and_clearly_without_cuda(tmp_path):
    result = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
    )
    assert result.returncode == 2
    assert "no CUDA GPU is visible" in result.stderr
    assert not any(tmp_path.iterdir())  # it ran nothing


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    """GPU_CHECK_DRY_RUN=1: each step's command and limit from the call's knobs, no GPU needed;
    an unknown step still fails, so a plan can be checked before it spends device time."""
    knobs = {
        "PATH": "/usr/bin:/bin",
        "PYTHON": sys.executable,
        "GPU_CHECK_DRY_RUN": "1",
        "GPU_CHECK_STEPS": "tests targets models",
        "GPU_CHECK_TESTS_K": "norm and not cupy",
        "GPU_CHECK_TARGET_OPS": "batch_norm",
        "GPU_CHECK_LIMIT_targets": "140",
        "GPU_CHECK_MODELS": "resnet50 llama",
        "GPU_CHECK_TRAIN_WAYS_llama": "eager,patched-logits",
    }
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True,
                            timeout=60, env=knobs)  # fmt: skip
    assert result.returncode == 0, result.stderr
    plan = result.stdout
    assert "-m pytest -m gpu" in plan and "-k norm and not cupy" in plan
    assert "--targets --quick --skip cupy --ops batch_norm" in plan and "limit 140 s" in plan
    assert (
        "--model resnet50 --preset gpu" in plan
        and "--model llama --preset gpu --steps 30 --ways eager,patched-logits" in plan
    )
    assert plan.count("(dry run: not run)") == 4 and not (tmp_path / "out").exists()
    bad = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                         env={**knobs, "GPU_CHECK_STEPS": "tests bogus"})  # fmt: skip
    assert bad.returncode == 2 and "unknown step bogus" in bad.stderr


def test_every_module_the_check_runs_exists():
    # pip (which installs carried wheels there) is the GPU image's, not looked up here: under
    # Python < 3.12, looking pip up makes setuptools' distutils shim step aside for the rest of
    # the process, and Inductor's CPU compile then fails to import setuptools in a later test
    modules = set(re.findall(r'"\$py" -m ([\w.]+)', SCRIPT.read_text())) - {"pip"}
    assert {"bench", "bench.host_overhead", "gpukernels.train", "pytest"} <= modules
    assert [m for m in modules if importlib.util.find_spec(m) is None] == []


def test_every_default_step_is_one_the_check_has():
    text = SCRIPT.read_text()
    defaults = re.search(r"\$\{GPU_CHECK_STEPS:-([\w ]+)\}", text).group(1).split()
    assert "compile" in defaults
    assert [name for name in defaults if not re.search(rf"^\s+{name}\) ", text, re.M)] == []


def test_every_default_model_has_a_gpu_preset():
    from gpukernels.train.presets import PRESETS

    models = re.search(r"\$\{GPU_CHECK_MODELS:-([\w ]+)\}", SCRIPT.read_text()).group(1).split()
    assert models == ["gpt2", "llama", "resnet50"]
    assert [m for m in models if "gpu" not in PRESETS.get(m, {})] == []


def test_tokenizers_are_trained_ahead_for_every_language_model():
    from gpukernels.train.models import LANGUAGE_MODELS

    listed = re.search(r"language_models=\$\(for m in ([\w ]+);", SCRIPT.read_text()).group(1).split()
    assert listed == list(LANGUAGE_MODELS)


def test_the_benchmark_accepts_every_option_the_check_passes(capsys):
    from bench.__main__ import main

    with pytest.raises(SystemExit):
        main(["--help"])
    options = set(re.findall(r"--[a-z][\w-]*", capsys.readouterr().out))
    invocations = re.findall(r'"\$py" -m bench ((?:.|\\\n)*?);;', SCRIPT.read_text())  # to the case's end
    passed = {flag for line in invocations for flag in re.findall(r"--[a-z][\w-]*", line)}
    assert {"--quick", "--compile", "--cuda-graph", "--targets", "--skip", "--out"} <= passed
    assert passed - options == set()


def test_host_overhead_times_every_ops_case():
    """The check's ``host`` step: µs per call of every op's host-time case, ours and
    PyTorch's; on CPU tensors here (a few calls), to find a broken case before a GPU does."""
    from bench.host_overhead import per_op_us
    from bench.host_time import CASES, MODE_LABELS

    rows = per_op_us(torch.device("cpu"), calls=2)
    expected = {(op, MODE_LABELS[mode]) for op, make in CASES.items() for mode in make()}
    assert {(r["op"], r["what"]) for r in rows} == expected
    assert all(r["ours"] > 0 and r["pytorch"] > 0 for r in rows)
