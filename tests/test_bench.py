"""The benchmark harness in its CPU mode: every op, every column, every output file."""

import json

import pytest

pytest.importorskip("matplotlib")

from gpukernels import bench  # noqa: E402


def test_cpu_mode_writes_every_op_and_column(tmp_path, capsys):
    bench.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "cpu.json").read_text())
    assert "CPU run" in data["environment"]["note"]
    rows = data["rows"]
    assert {r["op"] for r in rows} == set(bench.OPS)
    for op in bench.OPS:
        modes = {r["mode"] for r in rows if r["op"] == op}
        assert modes == ({"step"} if op == "adamw" else set(bench.MODES)), op
        providers = {r["provider"] for r in rows if r["op"] == op}
        assert "gpukernels" in providers and len(providers) >= 2, (op, providers)
    for r in rows:
        assert r["ms"] > 0
        assert (r["gbps"] or 0) > 0 or (r["tflops"] or 0) > 0
        if r["provider"] == "gpukernels":
            assert r["speedup"] and all(v > 0 for v in r["speedup"].values())
    for suffix in ("md", "csv"):
        assert (tmp_path / f"cpu.{suffix}").stat().st_size > 0
    for op in bench.OPS:
        assert (tmp_path / f"{op}.png").stat().st_size > 5_000
    out = capsys.readouterr().out
    assert "ours vs this" in out and "GB/s" in out
    bench.main(["--summarize", str(tmp_path / "cpu.json")])
    summary = capsys.readouterr().out
    assert summary.startswith("| op | shape | ours ms | vs eager")
    assert all(f"| {op} |" in summary for op in bench.OPS)
    assert summary in (tmp_path / "cpu.md").read_text()


def test_skip_leaves_out_a_provider(tmp_path):
    bench.main(["--quick", "--device", "cpu", "--ops", "dropout", "--skip", "eager", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "cpu.json").read_text())["rows"]
    assert rows and {r["provider"] for r in rows} == {"gpukernels"}


def test_cuda_graph_timing_needs_a_gpu(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--cuda-graph", "--device", "cpu", "--out", str(tmp_path)])
    assert "--cuda-graph needs a CUDA device" in capsys.readouterr().err


def test_profile_writes_each_case_for_ours_and_eager(tmp_path):
    bench.main(["--profile", "--quick", "--device", "cpu", "--ops", "layer_norm,dropout", "--out", str(tmp_path)])
    text = (tmp_path / "profile.txt").read_text()
    for op in ("layer_norm", "dropout"):
        assert f"== {op} " in text and f"-- {op} " in text
    assert "fwd+bwd gpukernels: host" in text
    assert "fwd+bwd eager: host" in text
