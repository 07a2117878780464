"""The main job on CPU at the cpu preset's sizes: every model trains in each way,
writes its JSON and PNG, and the patched and compiled ways track plain eager
as closely as fp32 rounding allows.

How "track" is judged. Training amplifies rounding differences chaotically
(Adam's first updates are close to sign(g), so a gradient entry near zero
follows its rounding), so after a few steps two correct fp32 runs drift apart
by an amount that varies tenfold from seed to seed: agreement to rounding can
only be asked of the first steps. Over the first ``EXACT_STEPS`` (the forward at
the initial weights and the first two updates: every op forward and backward,
the optimizer, the schedule, the data order), the fp32 rounding floor is the
largest per-step gap among three runs that differ only in rounding: eager fp32,
eager float64, and eager fp32 with each batch's rows reversed (the same math,
other summation orders); never less than the fp32 spacing at the loss, to
which the loss itself is rounded. Another way is one more run of that kind and
must stay within ``TRACKING_FACTOR`` x that floor (over 5 seeds of each model,
and of the compiled MLP ways, the largest ratio measured was 2.4). After those
steps each way must learn (the MLP: to the same test accuracy); the JSON and
the table report the whole run's gaps.
"""

import copy
import json
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import gpukernels as gk
from helpers import assert_matches

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from gpukernels import train  # noqa: E402
from gpukernels.train import data, models, tasks  # noqa: E402
from gpukernels.train.presets import PRESETS  # noqa: E402

LANGUAGE_MODELS = models.LANGUAGE_MODELS
STEPS = {
    "mlp": 88,
    "gpt2": 10,
    "llama": 10,
    "qwen3": 10,
    "gemma3": 10,
    "resnet50": 6,
}  # mlp: 4 epochs, enough for its accuracy
EXACT_STEPS = 3  # see the module docstring
TRACKING_FACTOR = 4


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One tokenizer cache for the module's runs, with the hub offline and Python sockets refused."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", _no_network)
        yield tmp_path_factory.mktemp("gpukernels-cache")


def _no_network(*args, **kwargs):
    raise OSError("the main job must not use the network")


def _needs(model):
    if model in LANGUAGE_MODELS:
        pytest.importorskip("transformers")
        pytest.importorskip("tokenizers")


def _run(model, out, cache_dir, *args) -> dict:
    train.main(
        [
            "--model",
            model,
            "--preset",
            "cpu",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--cache-dir",
            str(cache_dir),
            *args,
        ]
    )
    return json.loads((out / f"{model}-cpu.json").read_text())


def _reversed_rows(batch_order):
    return lambda *args: [rows.flip(0) for rows in batch_order(*args)]


def _assert_tracks(summary: dict, ways, tmp_path, cache_dir, *steps):
    """The ways' first EXACT_STEPS losses within TRACKING_FACTOR x the rounding floor of
    eager's, and every way learning (see the module docstring)."""
    model, eager = summary["model"], summary["ways"]["eager"]["losses"]
    float64 = _run(model, tmp_path / "float64", cache_dir, *steps, "--ways", "eager", "--dtype", "float64")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tasks, "batch_order", _reversed_rows(tasks.batch_order))
        reversed_rows = _run(model, tmp_path / "reversed", cache_dir, *steps, "--ways", "eager")
    runs = [eager[:EXACT_STEPS]] + [r["ways"]["eager"]["losses"][:EXACT_STEPS] for r in (float64, reversed_rows)]
    gaps = [abs(a - b) for i, one in enumerate(runs) for other in runs[i + 1 :] for a, b in zip(one, other)]
    floor = max(*gaps, float(np.spacing(np.float32(max(runs[0])))))
    for way in ways:
        losses = summary["ways"][way]["losses"]
        assert len(losses) == len(eager) == summary["steps"]
        assert summary["ways"][way]["max_loss_diff_vs_eager"] == max(abs(a - b) for a, b in zip(losses, eager))
        gap = max(abs(a - b) for a, b in zip(losses[:EXACT_STEPS], eager))
        assert gap <= TRACKING_FACTOR * floor, (
            f"{way}: loss gap {gap:.3g} over the first {EXACT_STEPS} steps > {TRACKING_FACTOR} x the fp32 rounding "
            f"floor {floor:.3g}"
        )
        assert min(losses[-2:]) < losses[0]  # it learns


@pytest.mark.parametrize("model", list(PRESETS))
def test_cpu_preset_trains_eager_and_patched(model, tmp_path, cache_dir, capsys):
    _needs(model)
    steps = ["--steps", str(STEPS[model])]
    summary = _run(model, tmp_path, cache_dir, *steps, "--ways", "eager,patched")
    printed = capsys.readouterr().out
    for column in ("final loss", "max |loss - eager|", "median step", "speed vs eager", "peak memory", "n/a (CPU)",
                   "saved for backward"):  # fmt: skip
        assert column in printed
    assert set(summary["ways"]) == {"eager", "patched"} and not summary["failed"]
    assert (tmp_path / f"{model}-cpu-losses.png").stat().st_size > 20_000
    patched = summary["ways"]["patched"]
    assert patched["report"].startswith("swapped") and patched["step_ms"] > 0 and patched["throughput"] > 0
    assert patched["peak_mem_mib"] is None  # CPU: not measured
    saved = {way: summary["ways"][way]["saved_mib"] for way in ("eager", "patched")}
    assert min(saved.values()) > 0
    if model in LANGUAGE_MODELS:  # the fused loss keeps no logits for the backward
        assert saved["patched"] < 0.75 * saved["eager"], saved
    _assert_tracks(summary, ["patched"], tmp_path, cache_dir, *steps)
    if model == "mlp":  # the digits are easy: both runs must learn them
        accuracy = [summary["ways"][w]["evaluation"]["accuracy"] for w in ("eager", "patched")]
        assert min(accuracy) >= 0.95 and abs(accuracy[0] - accuracy[1]) <= 0.01
    if model in LANGUAGE_MODELS:
        assert summary["data"]["tokens"] > summary["units_per_step"] * STEPS[model]
        assert summary["parameters"] == sum(
            p.numel() for p in models.build_language_model(model, PRESETS[model]["cpu"]).parameters()
        )
    if model == "resnet50":
        assert "ResNet (blocks (1, 1, 1, 1), width 16)" in summary["model_source"]
        # the stem's BatchNorm and each block's bn1 and bn2 fused with their ReLUs; bn3 and the downsamples' not,
        # each block's bn3 ending it with the shortcut's addition and act3
        for row in ("BatchNorm2d+ReLU->BatchNorm2d x9", "BatchNorm2d x8", "Bottleneck->ResidualBlock x4"):
            assert row in patched["report"]


def test_patched_way_with_the_default_loss(tmp_path, cache_dir):
    """patch's default loss mode as a way of its own (not run unless named): the model's
    logits, then our cross_entropy, its loss in fp32 from the bf16 logits; the same first
    loss as the fused loss's within bf16 rounding of the logits."""
    _needs("gpt2")
    summary = _run("gpt2", tmp_path, cache_dir, "--steps", "2", "--dtype", "bfloat16", "--ways",
                   "patched,patched-logits")  # fmt: skip
    fused, logits = (summary["ways"][w] for w in ("patched", "patched-logits"))
    assert not summary["failed"]
    assert "CrossEntropyLoss" in logits["report"] and "LinearCrossEntropyLoss" not in logits["report"]
    assert "LinearCrossEntropyLoss" in fused["report"]
    assert abs(logits["losses"][0] - fused["losses"][0]) < 2e-2
    assert not train.WAYS["patched-logits"].by_default


def test_patched_way_with_fp32_norms_under_autocast(tmp_path, cache_dir):
    """The A/B of patch's autocast_norms: the same first loss bit for bit (the norms' bf16 output is
    what the projections cast their fp32 output to), the reports telling them apart; not run unless named."""
    _needs("llama")
    summary = _run("llama", tmp_path, cache_dir, "--steps", "3", "--dtype", "bfloat16", "--ways",
                   "patched,patched-fp32-norms")  # fmt: skip
    ours, fp32_norms = (summary["ways"][w] for w in ("patched", "patched-fp32-norms"))
    layers = PRESETS["llama"]["cpu"]["layers"]
    assert f"; {2 * layers} norms in the autocast dtype" in ours["report"]
    assert "autocast dtype" not in fp32_norms["report"]
    assert ours["losses"][0] == fp32_norms["losses"][0]
    assert not train.WAYS["patched-fp32-norms"].by_default


def test_patched_way_with_the_residual_apart(tmp_path, cache_dir):
    """The A/B of patch's residual_norms: the same first loss bit for bit (the one op normalises the
    sum as PyTorch's addition rounds it), the reports telling them apart; not run unless named."""
    _needs("llama")
    summary = _run("llama", tmp_path, cache_dir, "--steps", "2", "--dtype", "bfloat16", "--ways",
                   "patched,patched-residual-apart")  # fmt: skip
    ours, apart = (summary["ways"][w] for w in ("patched", "patched-residual-apart"))
    assert f"LlamaDecoderLayer->ResidualNorm x{PRESETS['llama']['cpu']['layers']}" in ours["report"]
    assert "ResidualNorm" not in apart["report"]
    assert ours["losses"][0] == apart["losses"][0]
    assert not train.WAYS["patched-residual-apart"].by_default


def test_fp32_reference_ways_judge_the_bf16_noise(tmp_path, cache_dir, capsys):
    """eager-fp32 and patched-fp32 run a bfloat16 preset without autocast (same seed and
    batches): each way's distance from the fp32 curve is reported beside eager's, and the
    bf16 ways are judged against eager's own distance; not run unless named."""
    _needs("gpt2")
    summary = _run("gpt2", tmp_path, cache_dir, "--steps", "3", "--dtype", "bfloat16", "--ways",
                   "eager,patched,eager-fp32,patched-fp32")  # fmt: skip
    ways = summary["ways"]
    assert not summary["failed"] and list(ways) == ["eager", "patched", "eager-fp32", "patched-fp32"]
    eager, fp32 = ways["eager"], ways["eager-fp32"]
    assert eager["losses"] != fp32["losses"]  # bf16 rounding, which eager-fp32 has none of
    # fp32 both ways: our kernels against PyTorch's ops, closer than bf16 moves either
    noise = eager["max_loss_diff_vs_eager-fp32"]
    assert 0 < ways["patched-fp32"]["max_loss_diff_vs_eager-fp32"] < noise / 10
    for name, way in ways.items():
        assert way["max_loss_diff_vs_eager-fp32"] == max(abs(a - b) for a, b in zip(way["losses"], fp32["losses"]))
    within = ways["patched"]["max_loss_diff_vs_eager-fp32"] <= train.report.NOISE_FACTOR * noise
    assert summary["noise"].startswith(f"bf16 noise: eager's curve is up to {noise:.3g} from eager-fp32's")
    assert ("beyond: patched" in summary["noise"]) != within
    assert "max |loss - eager-fp32|" in capsys.readouterr().out
    assert not train.WAYS["eager-fp32"].by_default and not train.WAYS["patched-fp32"].by_default
    # an fp32 preset has no bf16 noise to judge: the same curves, no verdict
    summary = _run("gpt2", tmp_path / "fp32", cache_dir, "--steps", "2", "--ways", "eager,eager-fp32")
    assert summary["ways"]["eager-fp32"]["losses"] == summary["ways"]["eager"]["losses"] and summary["noise"] is None


def test_compiled_ways_track_eager(tmp_path, cache_dir):
    steps = ["--steps", "20"]
    summary = _run("mlp", tmp_path, cache_dir, *steps, "--ways", "eager,compile,compile-patched")
    assert list(summary["ways"]) == ["eager", "compile", "compile-patched"] and not summary["failed"]
    assert summary["ways"]["compile"]["saved_mib"] is None  # not measured under torch.compile
    _assert_tracks(summary, ["compile", "compile-patched"], tmp_path, cache_dir, *steps)


def test_captured_way_replays_the_patched_step(tmp_path, cache_dir, monkeypatch):
    """The captured way's plumbing on CPU, with gk.capture_step (CUDA only, tested in
    test_capture.py) stood in for by the eager step it captures: its steps are patched's,
    on the same batches with the same schedule (its lr a tensor the schedule fills),
    exactly; the capture comes after CAPTURE_AT eager steps, with one warm-up step."""
    warmups = []

    def eager_capture(step, *inputs, optimizer, warmup_steps):
        warmups.append(warmup_steps)
        for _ in range(warmup_steps):
            optimizer.zero_grad(set_to_none=True)
            step(*inputs)

        def replay(*batch):
            optimizer.zero_grad(set_to_none=False)
            return step(*batch)

        return replay

    monkeypatch.setattr(train.run, "capture_step", eager_capture)
    monkeypatch.setattr(train, "graphs_unavailable", lambda device: None)
    summary = _run("mlp", tmp_path, cache_dir, "--steps", "12", "--ways", "patched,captured")
    assert list(summary["ways"]) == ["patched", "captured"] and not summary["failed"] and warmups == [1]
    assert summary["ways"]["captured"]["losses"] == summary["ways"]["patched"]["losses"]
    assert summary["ways"]["captured"]["saved_mib"] == summary["ways"]["patched"]["saved_mib"] > 0


def test_reduce_overhead_way_runs_its_compiled_step(tmp_path, cache_dir, monkeypatch):
    """compile-patched-cudagraphs' plumbing on CPU, where Inductor makes no CUDA graphs:
    torch.compile in mode reduce-overhead, a step marked at each step's start; its first
    loss (the forward at the initial weights) is patched's to fp32 rounding."""
    monkeypatch.setattr(train, "graphs_unavailable", lambda device: None)
    compiles = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiles.append(kw) or real_compile(fn, **kw))
    summary = _run("mlp", tmp_path, cache_dir, "--steps", "3", "--ways", "patched,compile-patched-cudagraphs")
    assert list(summary["ways"]) == ["patched", "compile-patched-cudagraphs"] and not summary["failed"]
    assert compiles == [{"mode": "reduce-overhead"}]
    first = [summary["ways"][way]["losses"][0] for way in summary["ways"]]
    assert abs(first[0] - first[1]) <= 1e-5 * abs(first[0])


def test_ways_with_cuda_graphs_are_skipped_off_cuda(tmp_path, cache_dir, capsys):
    ways = ["captured", "compile-cudagraphs", "compile-patched-cudagraphs"]
    summary = _run("mlp", tmp_path, cache_dir, "--steps", "2", "--ways", ",".join(["eager", *ways]))
    assert list(summary["ways"]) == ["eager"] and sorted(summary["skipped"]) == sorted(ways)
    printed = capsys.readouterr().out
    for way in ways:
        assert f"skipping {way}: CUDA graphs need a CUDA device, not cpu" in printed


def test_tokenizer_trained_offline_then_reused(tmp_path, cache_dir, monkeypatch):
    tokenizers = pytest.importorskip("tokenizers")
    first = data.stdlib_tokens(vocab_size=512, max_bytes=100_000, cache_dir=tmp_path)
    assert first.trained and first.vocab_size == 512 and first.folder.parent == tmp_path
    # The ids are the corpus: decoding the first file's ids gives its text back.
    tokenizer = tokenizers.Tokenizer.from_file(str(first.folder / "tokenizer.json"))
    eot = tokenizer.token_to_id(data.END_OF_TEXT)
    first_file = data.stdlib_sources(100_000)[0]
    ids = first.tokens[: list(first.tokens).index(eot)].tolist()
    assert tokenizer.decode(ids) == first_file.read_text(encoding="utf-8", errors="replace")

    trainings = []
    train_tokenizer = data._train_tokenizer
    monkeypatch.setattr(
        data, "_train_tokenizer", lambda texts, vocab: trainings.append(vocab) or train_tokenizer(texts, vocab)
    )
    second = data.stdlib_tokens(vocab_size=512, max_bytes=100_000, cache_dir=tmp_path)
    assert not second.trained and np.array_equal(second.tokens, first.tokens) and trainings == []
    data.stdlib_tokens(vocab_size=600, max_bytes=100_000, cache_dir=tmp_path)  # another key: trains
    assert trainings == [600]


@pytest.mark.parametrize(
    "module,model,extra",
    [
        ("transformers", "gpt2", "train"),
        ("tokenizers", "llama", "train"),
        ("matplotlib", "mlp", "train"),
        ("sklearn", "resnet50", "train"),
    ],
)
def test_missing_package_names_it_and_the_extra(module, model, extra, tmp_path, monkeypatch, capsys):
    for name in [n for n in sys.modules if n == module or n.startswith(f"{module}.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(SystemExit) as exit_info:
        train.main(
            [
                "--model",
                model,
                "--preset",
                "cpu",
                "--device",
                "cpu",
                "--out",
                str(tmp_path),
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    package = {"sklearn": "scikit-learn"}.get(module, module)
    assert f"'{package}' package" in message and f"gpukernels[{extra}]" in message, message


def test_liger_skipped_with_the_reason(tmp_path, cache_dir, monkeypatch, capsys):
    pytest.importorskip("transformers")
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    summary = _run("gpt2", tmp_path, cache_dir, "--steps", "2", "--ways", "eager,liger")
    assert list(summary["ways"]) == ["eager"]
    assert "liger-kernel" in summary["skipped"]["liger"] and "gpukernels[models]" in summary["skipped"]["liger"]
    assert "skipped liger: liger_kernel is not importable" in capsys.readouterr().out


def test_a_run_stopped_early_keeps_the_ways_it_finished(tmp_path, cache_dir, monkeypatch):
    """A time limit (ci/gpu-check.sh's steps) stops a run between ways: the JSON holds those done."""
    real_run_way = train.run_way

    def stopped_in_the_second_way(task, way, *args):
        if way == "patched":
            raise KeyboardInterrupt  # as a kill would, past `except Exception`
        return real_run_way(task, way, *args)

    monkeypatch.setattr(train, "run_way", stopped_in_the_second_way)
    with pytest.raises(KeyboardInterrupt):
        _run("mlp", tmp_path, cache_dir, "--steps", "4", "--ways", "eager,patched")
    summary = json.loads((tmp_path / "mlp-cpu.json").read_text())
    assert list(summary["ways"]) == ["eager"] and len(summary["ways"]["eager"]["losses"]) == 4
    assert summary["ways"]["eager"]["max_loss_diff_vs_eager"] == 0 and not summary["failed"]


def test_bad_options_are_errors_naming_them(tmp_path, capsys):
    for argv, words in (
        (["--model", "mlp", "--seq-len", "32"], "--seq-len"),
        (["--ways", "eager,fast"], "fast"),
        (["--steps", "1"], "--steps"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            train.main([*argv, "--device", "cpu", "--out", str(tmp_path)])
        assert exit_info.value.code == 2 and words in capsys.readouterr().err


def _parameters(build, *args) -> int:
    with torch.device("meta"):  # counted without allocating
        return sum(p.numel() for p in build(*args).parameters())


def test_resnet50_layout_has_resnet50s_parameters():
    assert _parameters(lambda: models.ResNet((3, 4, 6, 3), 64, classes=1000)) == 25_557_032  # torchvision's count
    assert _parameters(lambda: models.build_resnet((3, 4, 6, 3), 64, 1000)[0]) == 25_557_032


def test_resnet_batch_norms_fuse_with_their_relus_and_match_unpatched(monkeypatch):
    """Our ResNet has timm's activation modules, one per activation: gk.patch fuses the stem's
    BatchNorm and each Bottleneck's bn1 and bn2 with their ReLUs; bn3 (added to the shortcut
    before its ReLU) and the downsamples' BatchNorms are swapped unfused, and each Bottleneck
    ends in bn3.fused(x, "relu", shortcut), as timm's."""
    calls, fused_op = [], gk.nn.BatchNormForward.fused

    def recording(self, input, activation, residual=None):
        calls.append((activation, residual is not None))
        return fused_op(self, input, activation, residual)

    monkeypatch.setattr(gk.nn.BatchNormForward, "fused", recording)
    torch.manual_seed(0)
    plain = models.ResNet((1, 2, 1, 1), width=8, classes=10).double()
    for block in plain.layers:
        nn.init.normal_(block.bn3.weight)  # not zero-initialised: every block's body counts in the output
    patched = copy.deepcopy(plain)
    report = gk.patch(patched)
    blocks = range(sum((1, 2, 1, 1)))
    fused = {name for name, old, _ in report.swapped if old == "BatchNorm2d+ReLU"}
    assert fused == {"bn1"} | {f"layers.{i}.bn{k}" for i in blocks for k in (1, 2)}
    downsamples = [f"layers.{i}.downsample.1" for i in (0, 1, 3, 4)]  # each stage's first block
    unfused = {name for name, old, _ in report.swapped if old == "BatchNorm2d"}
    assert unfused == {f"layers.{i}.bn3" for i in blocks} | set(downsamples)
    assert report.counts == {"BatchNorm2d": 1 + 3 * len(blocks) + len(downsamples), "ResidualBlock": len(blocks)}
    assert {(name, old) for name, old, kind in report.swapped if kind == "ResidualBlock"} == {
        (f"layers.{i}", "Bottleneck") for i in blocks
    }
    # 64 pixels: the last stage normalises 2x2 of them an image (at 32, one: batch statistics of 2 values,
    # whose backward amplifies rounding, fused or not)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    out, expected = patched(x), plain(x)
    assert sorted(calls) == sorted([("none", False)] * 4 + [("relu", False)] * 11 + [("relu", True)] * 5)
    assert_matches(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    for ours, theirs in zip(patched.parameters(), plain.parameters(), strict=True):
        assert_matches(ours.grad, theirs.grad)


def test_gpu_presets_are_the_named_sizes():
    pytest.importorskip("transformers")
    assert _parameters(models.build_language_model, "gpt2", PRESETS["gpt2"]["gpu"]) == 124_439_808  # GPT-2 small
    assert 140e6 < _parameters(models.build_language_model, "llama", PRESETS["llama"]["gpu"]) < 160e6
    assert 140e6 < _parameters(models.build_language_model, "qwen3", PRESETS["qwen3"]["gpu"]) < 160e6
    # Gemma 3's head is its embeddings, counted once
    assert 120e6 < _parameters(models.build_language_model, "gemma3", PRESETS["gemma3"]["gpu"]) < 130e6


@pytest.mark.parametrize("kind", LANGUAGE_MODELS)
def test_language_models_train_without_a_kv_cache(kind):
    """A training step copies no keys and values into a cache it never reads (the H200's
    patched Llama step spent 3.9 ms on those copies)."""
    pytest.importorskip("transformers")
    cfg = PRESETS[kind]["cpu"]
    model = models.build_language_model(kind, cfg)
    ids = torch.zeros(1, 8, dtype=torch.long)
    assert model(input_ids=ids, labels=ids).past_key_values is None


@pytest.mark.slow
def test_ci_train_command_runs_every_way_of_gpt2(tmp_path):
    """What ci/train.sh runs after setting up: the gpt2 cpu preset in every available way."""
    pytest.importorskip("transformers")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpukernels.train",
            "--model",
            "gpt2",
            "--preset",
            "cpu",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "gpt2-cpu.json").read_text())
    assert list(summary["ways"]) == ["eager", "patched", "compile", "compile-patched"]
    for way in summary["ways"]:
        assert f"\n{way} " in done.stdout


def test_patch_summary_counts_a_reason_once_for_every_layer():
    """The report's line counts modules left for the same reason in different layers as one
    reason (layer indices in its module paths shown as ``*``); other numbers stay."""
    from gpukernels.patch import PatchReport

    report = PatchReport(
        swapped=[("h.0.ln_1", "LayerNorm", "LayerNorm"), ("h.1.ln_1", "LayerNorm", "LayerNorm")],
        left=[
            (f"h.{i}.attn.c_attn", "Conv1D", f"the forward of h.{i}.attn did not trace (ValueError: v2.0 at 1.5)")
            for i in (0, 1, 11)
        ]
        + [("h.3.mlp.c_proj", "Conv1D", "followed by Dropout h.3.mlp.dropout: not an activation module")],
    )
    assert tasks.summarize(report) == (
        "swapped 2: LayerNorm x2; left 4: Conv1D (the forward of h.*.attn did not trace (ValueError: v2.0 at 1.5)) x3, "
        "Conv1D (followed by Dropout h.*.mlp.dropout: not an activation module) x1"
    )


def test_profile_writes_each_ways_step_and_leaves_the_run_as_it_was(tmp_path, cache_dir, capsys):
    """``--profile`` profiles one step after the run: the losses and evaluation are those of a run without it."""
    ways = ["--steps", "4", "--ways", "eager,patched"]
    profiled = _run("mlp", tmp_path / "profiled", cache_dir, *ways, "--profile")
    assert "profile patched: one step" in capsys.readouterr().out
    plain = _run("mlp", tmp_path / "plain", cache_dir, *ways)
    for way in ("eager", "patched"):
        assert profiled["ways"][way]["losses"] == plain["ways"][way]["losses"]
        assert profiled["ways"][way]["evaluation"] == plain["ways"][way]["evaluation"]
        assert profiled["ways"][way]["profile"]["wall_ms"] > 0 and plain["ways"][way]["profile"] is None
        text = (tmp_path / "profiled" / f"mlp-cpu-{way}-profile.txt").read_text()
        assert text.startswith(f"{way}: one step") and "aten::" in text


@pytest.mark.parametrize(
    "kernel, origin",
    [
        ("norm_bwd_kernel", "gpukernels"),
        ("cross_entropy_fwd_kernel_0", "gpukernels"),  # as Inductor names a user kernel it emits
        ("sum_partial_rows", "gpukernels"),
        ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_3", "inductor"),
        ("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_TNT", "matmul"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "matmul"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>(Flash_fwd_params)", "attention"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64_kernel0_0", "attention"),
        ("_rms_norm_forward_kernel", "other triton"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>(int)", "aten/other"),
    ],
)
def test_profile_names_each_kernels_origin(kernel, origin):
    from gpukernels.train.profile import category

    assert category(kernel) == origin


def test_profile_line_says_how_much_of_the_step_the_kernels_fill():
    from gpukernels.train.report import _profile_line

    gpu = {"wall_ms": 50.0, "kernel_ms": 40.0, "launches": 700, "by_category_ms": {"gpukernels": 25.0, "matmul": 15.0}}
    assert _profile_line(gpu) == "kernels 40.0 ms of a 50.0 ms step (80%; gpukernels 25.0, matmul 15.0)"
    assert _profile_line({"wall_ms": 5.0}) == "one step 5.0 ms"
    assert _profile_line({"error": "RuntimeError: boom"}) == "failed (RuntimeError: boom)"
