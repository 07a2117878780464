"""The benchmark (``python -m bench``) in its CPU mode: every op, every column, every output file."""

import ast
import importlib.util
import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from bench import harness, report
from bench.__main__ import main
from bench.cases import OPS
from bench.harness import MODES


def test_cpu_mode_writes_every_op_and_column(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "cpu.json").read_text())
    assert "CPU run" in data["environment"]["note"]
    rows = data["rows"]
    assert list(dict.fromkeys(r["op"] for r in rows)) == list(OPS)
    for op in OPS:
        modes = {r["mode"] for r in rows if r["op"] == op}
        # the fused loss computes its gradients in the forward: no backward to time alone
        expected = {
            "adamw": {"step"},
            "clip_adamw": {"step"},
            "amp_adamw": {"step"},
            "linear_cross_entropy": {"fwd", "fwd+bwd"},
        }
        assert modes == expected.get(op, set(MODES)), op
        providers = {r["provider"] for r in rows if r["op"] == op}
        assert "gpukernels" in providers and len(providers) >= 2, (op, providers)
    for r in rows:
        assert r["ms"] > 0
        assert (r["gbps"] or 0) > 0 or (r["tflops"] or 0) > 0
        if r["provider"] == "gpukernels":
            assert r["speedup"] and all(v > 0 for v in r["speedup"].values())
    for suffix in ("md", "csv"):
        assert (tmp_path / f"cpu.{suffix}").stat().st_size > 0
    for op in OPS:
        assert (tmp_path / f"{op}.png").stat().st_size > 5_000
    out = capsys.readouterr().out
    assert "ours vs this" in out and "GB/s" in out
    main(["--summarize", str(tmp_path / "cpu.json")])
    summary = capsys.readouterr().out
    assert summary.startswith("| op | shape | ours ms | vs eager")
    assert all(f"| {op} |" in summary for op in OPS)
    assert summary in (tmp_path / "cpu.md").read_text()


def test_skip_leaves_out_a_provider(tmp_path):
    main(["--quick", "--device", "cpu", "--ops", "dropout", "--skip", "eager", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "cpu.json").read_text())["rows"]
    assert rows and {r["provider"] for r in rows} == {"gpukernels"}


def test_compile_mode_times_ours_compiled_against_inductors_kernels(tmp_path, capsys):
    main(["--quick", "--compile", "--device", "cpu", "--ops", "dropout,adamw", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "--compile: adamw left out: the step stays one opaque op under torch.compile" in out
    assert "skipped" not in out  # the compiled result matched ours eager, and every provider ran
    data = json.loads((tmp_path / "cpu-compile.json").read_text())
    assert "CPU run" in data["environment"]["note"] and "torch.compile" in data["environment"]["compile"]
    rows = data["rows"]
    assert {r["op"] for r in rows} == {"dropout"}
    timed = {(r["shape"], r["mode"], r["provider"]) for r in rows}
    shapes = {r["shape"] for r in rows}
    providers = ("gpukernels", "gpukernels-compile", "eager", "compile")
    assert len(shapes) == 2 and timed == set(itertools.product(shapes, ("fwd", "fwd+bwd"), providers))
    for r in rows:
        assert math.isfinite(r["ms"]) and r["ms"] > 0 and math.isfinite(r["gbps"]) and r["gbps"] > 0
        if r["provider"].startswith("gpukernels"):
            assert set(r["speedup"]) == {"eager", "compile"}
            assert all(math.isfinite(v) and v > 0 for v in r["speedup"].values())
    summary, table = (tmp_path / "cpu-compile.md").read_text().split("Every provider and mode:")
    assert "| op | shape | ours | ours ms | vs eager | vs compile |" in summary
    assert summary.count("| dropout |") == 4 and summary.count("| gpukernels-compile |") == 2
    assert "ours vs this | compiled ours vs this" in table


def test_compile_mode_leaves_out_a_compiled_result_that_differs_from_eager(tmp_path, capsys, monkeypatch):
    def doubled_when_fullgraph(fn, mode=None, fullgraph=False):  # ours "compiled" into a wrong result
        return (lambda: 2 * fn()) if fullgraph else fn

    monkeypatch.setattr(harness, "_compiled", doubled_when_fullgraph)
    main(["--quick", "--compile", "--device", "cpu", "--ops", "dropout", "--out", str(tmp_path)])
    assert "gpukernels-compile: skipped (differs from gpukernels: output: largest difference" in capsys.readouterr().out
    rows = json.loads((tmp_path / "cpu-compile.json").read_text())["rows"]
    assert {r["provider"] for r in rows} == {"gpukernels", "eager", "compile"}


def test_runs_without_tqdm_and_matplotlib(tmp_path, capsys, monkeypatch):
    for optional in ("tqdm", "matplotlib"):
        monkeypatch.setitem(sys.modules, optional, None)  # its import now raises ImportError
    main(["--quick", "--device", "cpu", "--ops", "dropout", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "cpu.json").read_text())["rows"]
    assert not list(tmp_path.glob("*.png"))
    assert "no plots: matplotlib is not installed" in capsys.readouterr().out


def test_unknown_op_is_refused_naming_the_choices(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--ops", "layer_norm,softmax", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "unknown ops ['softmax']" in err and "layer_norm" in err


def test_cuda_graph_timing_needs_a_gpu(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--cuda-graph", "--device", "cpu", "--out", str(tmp_path)])
    assert "--cuda-graph needs a CUDA device" in capsys.readouterr().err


def test_targets_need_a_gpu_and_an_op_with_targets(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--targets", "--device", "cpu", "--out", str(tmp_path)])
    assert "--targets needs a CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--targets", "--device", "cpu", "--ops", "dropout,adamw", "--out", str(tmp_path)])
    assert "--targets: ['adamw'] have no targets" in capsys.readouterr().err


def test_target_table_says_met_not_met_and_not_measured():
    targets = {"dropout": [("fwd", "bandwidth", 0.85), ("fwd+bwd", "eager", 1.3), ("fwd+bwd", "liger", 1.2)]}
    rows = [
        harness.Row("dropout", "64", 64, "fwd", "gpukernels", 1.0, fraction_of_peak=0.9),
        harness.Row("dropout", "64", 64, "fwd+bwd", "gpukernels", 1.0, speedup={"eager": 1.25}),
        harness.Row("dropout", "64", 64, "fwd+bwd", "eager", 1.25),
        harness.Row("dropout", "128", 128, "fwd", "gpukernels", 1.0, fraction_of_peak=0.5),
    ]
    lines = report.target_table(rows, targets).splitlines()[2:]
    assert lines == [
        "| dropout | 64 | fwd | >= 85% of copy bandwidth | 90% | yes |",
        "| dropout | 64 | fwd+bwd | >= 1.30x eager | 1.25x | no |",
        "| dropout | 64 | fwd+bwd | >= 1.20x liger |  | not measured |",  # Liger not installed
        "| dropout | 128 | fwd | >= 85% of copy bandwidth | 50% | no |",
        "| dropout | 128 | fwd+bwd | >= 1.30x eager |  | not measured |",  # no fwd+bwd row ran
        "| dropout | 128 | fwd+bwd | >= 1.20x liger |  | not measured |",
    ]


def test_target_cases_are_the_issues_shapes():
    """Every op with targets names its target shapes; batch_norm's are each shape in both
    layouts, and its channels-last case times a channels-last input against a
    channels-last output gradient."""
    targeted = {name: module for name, module in OPS.items() if hasattr(module, "TARGETS")}
    assert set(targeted) == {"layer_norm", "batch_norm", "dropout", "cross_entropy", "linear_cross_entropy"}
    assert OPS["linear_cross_entropy"].TARGET_SHAPES == [(8192, 4096, v) for v in (32768, 131072, 262144)]
    assert OPS["layer_norm"].TARGET_SHAPES == [(16384, d) for d in (1024, 2048, 4096, 8192)]
    assert OPS["batch_norm"].TARGET_SHAPES[:2] == [(256, 64, 56, "nchw"), (256, 64, 56, "channels_last")]
    case = OPS["batch_norm"].case((2, 3, 4, "channels_last"), torch.device("cpu"), torch.float32)
    x = case.grad_inputs[0]
    assert case.shape == "2x3x4x4-channels-last" and x.is_contiguous(memory_format=torch.channels_last)
    y = case.providers["gpukernels"]()
    assert harness._grad_like(y).is_contiguous(memory_format=torch.channels_last)
    nchw = OPS["batch_norm"].case((2, 3, 4, "nchw"), torch.device("cpu"), torch.float32)
    assert nchw.shape == "2x3x4x4" and harness._grad_like(nchw.providers["gpukernels"]()).is_contiguous()


def _fake_quack(monkeypatch, rmsnorm):
    """``quack`` and ``quack.rmsnorm`` as importable modules, the latter holding ``rmsnorm``'s names."""
    import importlib.machinery
    import types

    package = types.ModuleType("quack")
    package.__spec__ = importlib.machinery.ModuleSpec("quack", None, is_package=True)
    module = types.ModuleType("quack.rmsnorm")
    module.__dict__.update(rmsnorm)
    package.rmsnorm = module
    monkeypatch.setitem(sys.modules, "quack", package)
    monkeypatch.setitem(sys.modules, "quack.rmsnorm", module)


def test_quack_layer_norm_provider_calls_its_kernels_as_documented(monkeypatch):
    """The QuACK provider's autograd function against F.layer_norm, forward and backward,
    with QuACK's layernorm_fwd/layernorm_bwd stood in for by their documented contract
    (quack 0.6.5: fp32 weight and bias; (out, rstd, mean); (dx, dw, db) from x, weight,
    dout, rstd, mean). On a GPU the real ones run (bench --targets)."""
    seen = {}

    def layernorm_fwd(x, weight, bias=None, eps=1e-6, return_rstd=False, return_mean=False):
        assert weight.dtype == bias.dtype == torch.float32 and return_rstd and return_mean
        seen["eps"] = eps
        mean = x.float().mean(-1)
        rstd = (x.float().var(-1, unbiased=False) + eps).rsqrt()
        out = ((x.float() - mean[:, None]) * rstd[:, None] * weight + bias).to(x.dtype)
        return out, rstd, mean

    def layernorm_bwd(x, weight, dout, rstd, mean, has_bias=True):
        assert weight.dtype == torch.float32 and dout.is_contiguous()
        xhat = (x.float() - mean[:, None]) * rstd[:, None]
        g = dout.float() * weight
        dx = rstd[:, None] * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
        return dx.to(x.dtype), (dout.float() * xhat).sum(0), dout.float().sum(0) if has_bias else None

    _fake_quack(monkeypatch, dict(layernorm_fwd=layernorm_fwd, layernorm_bwd=layernorm_bwd))
    from bench.cases.layer_norm import QuackLayerNorm

    torch.manual_seed(0)
    x, w, b = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((6, 10), (10,), (10,)))
    dy = torch.randn(6, 10, dtype=torch.float64).t().contiguous().t()  # strided: the provider hands it contiguous
    got = torch.autograd.grad(QuackLayerNorm.apply(x, w, b, 1e-5), (x, w, b), dy)
    want = torch.autograd.grad(torch.nn.functional.layer_norm(x, (10,), w, b, 1e-5), (x, w, b), dy)
    assert seen["eps"] == 1e-5
    for g, r in zip(got, want):
        assert g.dtype == torch.float64  # the parameters' gradients cast back to theirs
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_quack_provider_is_offered_when_installed_and_a_failure_is_reported(monkeypatch, capsys):
    """On CUDA the providers include QuACK's call when ``quack`` imports; a provider that
    raises (no CUTLASS DSL, an older GPU) is left out with the reason printed."""
    _fake_quack(monkeypatch, {})
    cuda = torch.device("cuda")  # providers() only builds the calls: nothing runs on it here
    offered = harness.providers(lambda: 0, lambda: 1, cuda, "layer_norm", quack=lambda: "quack call")
    assert offered["quack"] == "quack call"

    def broken():
        raise ImportError("no module named cutlass")

    offered = harness.providers(lambda: 0, lambda: 1, cuda, "layer_norm", quack=broken)
    assert "quack" not in offered
    assert "quack: not timed (layer_norm): ImportError: no module named cutlass" in capsys.readouterr().err


def test_profile_writes_each_case_for_ours_and_eager(tmp_path):
    main(["--profile", "--quick", "--device", "cpu", "--ops", "layer_norm,dropout", "--out", str(tmp_path)])
    text = (tmp_path / "profile.txt").read_text()
    for op in ("layer_norm", "dropout"):
        assert f"== {op} " in text and f"-- {op} " in text
    assert "fwd+bwd gpukernels: host" in text
    assert "fwd+bwd eager: host" in text


def test_the_installed_package_neither_holds_nor_imports_the_benchmark():
    import gpukernels

    assert importlib.util.find_spec("gpukernels.bench") is None
    imported = set()
    for path in Path(gpukernels.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {(path.name, alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add((path.name, node.module))
    assert imported
    assert [(name, module) for name, module in imported if module.split(".")[0] == "bench"] == []


def test_an_uncapturable_provider_is_timed_with_events_under_graph_timing(monkeypatch, capsys):
    """A provider whose call cannot be captured (Liger's cross_entropy copies from the host)
    is timed with events, said so, and never captured: a failed capture can leave PyTorch's
    CUDA generator unusable for the rest of the run."""
    timings = []
    monkeypatch.setattr(harness, "time_ms", lambda fn, cuda, quick, timing: timings.append(timing) or 1.0)
    case = harness.Case("4", 4, {"gpukernels": lambda: None, "liger": lambda: None}, uncapturable={"liger": "why"})
    rows = harness._timed_mode("op", case, "fwd", frozenset(), {}, False, True, "graph-flushed")
    assert [r.provider for r in rows] == ["gpukernels", "liger"]
    assert timings == ["graph-flushed", "events"]
    assert "op 4 fwd liger: timed with events, host included (why)" in capsys.readouterr().out
