"""The README's usage example runs as written, on the CPU: a user can copy it whole."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def _usage_example() -> str:
    """The first Python block under the README's "## Using it"."""
    section = README.read_text().split("\n## Using it\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_usage_example_runs(capsys):
    pytest.importorskip("transformers")  # the example patches a transformers causal LM
    torch.manual_seed(0)
    exec(compile(_usage_example(), str(README), "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    assert "LinearAct 1" in printed  # print(report): the Linear + GELU it fused
    assert re.search(r"tensor\([0-9.]+\)", printed)  # print(opt.grad_norm): the step saw the gradients
