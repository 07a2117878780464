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


def test_every_module_the_check_runs_exists():
    modules = set(re.findall(r'"\$py" -m ([\w.]+)', SCRIPT.read_text()))
    assert {"bench", "bench.host_overhead", "gpukernels.train", "pytest"} <= modules
    assert [m for m in modules if importlib.util.find_spec(m) is None] == []
