"""The main job at a small size on CPU: both runs learn the digits and track each other."""

import json

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from gpukernels import train  # noqa: E402


def test_train_compares_plain_and_patched(tmp_path, capsys):
    train.main(["--hidden", "64", "--epochs", "6", "--device", "cpu", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    for row in ("final loss", "test accuracy", "step time", "peak memory", "largest per-step loss difference"):
        assert row in printed
    summary = json.loads((tmp_path / "train.json").read_text())
    runs = summary["runs"]
    assert runs["pytorch"]["accuracy"] >= 0.95 and runs["gpukernels"]["accuracy"] >= 0.95
    assert abs(runs["pytorch"]["accuracy"] - runs["gpukernels"]["accuracy"]) <= 0.01
    assert len(runs["pytorch"]["losses"]) == len(runs["gpukernels"]["losses"]) == summary["steps"]
    # fp32 on both sides: step-for-step agreement, drifting only by rounding
    assert summary["max_step_loss_diff"] < 0.02
    assert (tmp_path / "losses.png").stat().st_size > 10_000
