"""The main job: train a real architecture from the same seed and the same
batches in several ways, and compare loss curves, speed and memory.

    python -m gpukernels.train --model gpt2 --preset cpu     # tiny GPT-2 on CPU, about a minute
    python -m gpukernels.train --model llama                 # ~150M Llama layout on the GPU (preset gpu)
    python -m gpukernels.train --model resnet50 --ways eager,patched

Models: mlp (residual MLP on the digits), gpt2 (transformers GPT2LMHeadModel),
llama (transformers LlamaForCausalLM), qwen3 and gemma3 (Qwen3ForCausalLM,
Gemma3ForCausalLM at the llama preset's sizes), resnet50 (timm, else torchvision, else
the bottleneck ResNet defined here), all from random weights.
Ways, in this order: eager (plain PyTorch), patched (gk.patch with the fused LM
loss and gk.optim.AdamW), captured (patched, its whole step replayed from a CUDA
graph: gk.capture_step; CUDA only), liger (Liger-Kernel's patch, when installed;
CUDA only), compile (torch.compile of plain), compile-patched, and both compiled
with mode="reduce-overhead" (compile-cudagraphs, compile-patched-cudagraphs; CUDA only).
Only when named: patched-fp32-norms (patched, the transformer blocks' norms returning
fp32 under autocast), patched-residual-apart (patched, the blocks' residual addition
apart from the norm after it), and eager-fp32 and patched-fp32 (a bfloat16 preset run in fp32,
no autocast: the reference that tells how far bf16 rounding alone moves each curve, its
distance reported beside eager's and judged against eager's own).
Data (nothing is downloaded): the Python standard library's .py sources,
tokenized by a byte-level BPE trained here and cached (--cache-dir); images:
scikit-learn's bundled digits, resized.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import ArgumentError
from ._deps import MissingPackage, require
from .data import default_cache_dir, load_digits
from .models import LANGUAGE_MODELS, build_model
from .presets import PRESETS
from .report import fp32_distances, loss_differences, noise_verdict, plot, table
from .run import WAYS, graphs_unavailable, run_way
from .tasks import make_task

__all__ = ["PRESETS", "WAYS", "MissingPackage", "build_model", "compare", "load_digits", "main"]

DTYPES = ("float32", "bfloat16", "float64")


def _config(model: str, preset: str, overrides: dict) -> dict:
    if model not in PRESETS or preset not in PRESETS[model]:
        raise ArgumentError(f"unknown model or preset {model!r}/{preset!r}: models {list(PRESETS)}, presets cpu, gpu")
    cfg = dict(PRESETS[model][preset])
    if overrides.get("seq_len") is not None and "seq_len" not in cfg:
        raise ArgumentError(f"--seq-len applies to the language models ({', '.join(LANGUAGE_MODELS)}), not {model}")
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    if cfg["steps"] < 2:
        raise ArgumentError(f"--steps must be at least 2 (warm-up, then decay), got {cfg['steps']}")
    if cfg["dtype"] not in DTYPES:
        raise ArgumentError(f"--dtype must be one of {DTYPES}, got {cfg['dtype']!r}")
    return cfg


def compare(
    model: str = "gpt2",
    preset: str | None = None,
    *,
    steps: int | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    lr: float | None = None,
    dtype: str | None = None,
    ways: list[str] | None = None,
    device: str | None = None,
    seed: int = 0,
    out: str | Path = "out/train",
    cache_dir: str | Path | None = None,
    profile: bool = False,
) -> dict:
    """Train ``model`` once per way and write ``<out>/<model>-<preset>.json`` and
    ``-losses.png``; returns the summary written to the JSON. ``dtype``: bfloat16
    runs under autocast (parameters and optimizer state fp32); float64 makes
    parameters and data float64 (a reference for rounding). ``profile``: after each way's
    run, one more step under torch.profiler, its kernels written to
    ``<out>/<model>-<preset>-<way>-profile.txt`` and summed by origin into the JSON."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = preset or ("gpu" if device.type == "cuda" else "cpu")
    cfg = _config(model, preset, dict(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, dtype=dtype))
    unknown = [w for w in ways or () if w not in WAYS]
    if unknown:
        raise ArgumentError(f"unknown way(s) {unknown}: choose from {list(WAYS)}")
    require("matplotlib", "the loss-curve plot")  # before training, not after
    autocast_dtype = torch.bfloat16 if cfg["dtype"] == "bfloat16" else None
    param_dtype = torch.float64 if cfg["dtype"] == "float64" else torch.float32

    task = make_task(model, cfg, device, seed, Path(cache_dir or default_cache_dir()), param_dtype)
    torch.manual_seed(seed)
    base_model = task.build().to(param_dtype)
    summary = {
        "model": model,
        "preset": preset,
        "config": cfg,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "parameters": sum(p.numel() for p in base_model.parameters()),
        "steps": cfg["steps"],
        "unit": task.unit,
        "units_per_step": task.units_per_step,
        **task.describe(),
        "skipped": {},
        "failed": {},
    }
    if "transformers" in sys.modules:
        summary["transformers"] = sys.modules["transformers"].__version__
    print(f"data: {json.dumps(summary['data'])}", flush=True)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{model}-{preset}"
    summary_path = Path(f"{stem}.json")
    results = {}
    # written before the first way and after each: a run stopped early (a time limit) keeps what it finished
    _write_summary(summary, results, summary_path)
    for way in (w for w in WAYS if (WAYS[w].by_default if ways is None else w in ways)):
        spec = WAYS[way]
        why_not = (
            graphs_unavailable(device) if spec.graphs else task.liger_unavailable() if spec.kind == "liger" else None
        )
        if why_not:
            summary["skipped"][way] = why_not
            print(f"skipping {way}: {why_not}", flush=True)
        else:
            torch.manual_seed(seed)  # the same random stream (dropout) for every way
            try:
                profile_to = Path(f"{stem}-{way}-profile.txt") if profile else None
                results[way] = run_way(task, way, base_model, cfg, autocast_dtype, device, profile_to)
            except Exception as error:  # one way failing (OOM, a compile error) must not lose the others
                traceback.print_exc()
                summary["failed"][way] = f"{type(error).__name__}: {error}".splitlines()[0]
        _write_summary(summary, results, summary_path)
    if results:
        plot(summary, results, Path(f"{stem}-losses.png"))
        print(table(summary, results))
        print(f"written: {stem}.json, {stem}-losses.png")
    return summary


def _write_summary(summary: dict, results: dict, path: Path) -> None:
    """The summary, with every way run so far and its largest loss difference against eager
    (and against the fp32 reference, when one ran: ``noise`` says how the ways compare)."""
    diffs = loss_differences(results)
    fp32, to_fp32 = fp32_distances(results)
    summary["ways"] = {
        name: {
            **asdict(r),
            "max_loss_diff_vs_eager": diffs[name],
            **({f"max_loss_diff_vs_{fp32}": to_fp32[name]} if fp32 else {}),
        }
        for name, r in results.items()
    }
    summary["noise"] = noise_verdict(summary, results)
    path.write_text(json.dumps(summary, indent=1))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m gpukernels.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", choices=sorted(PRESETS), default="gpt2")
    p.add_argument("--preset", choices=["cpu", "gpu"], help="default: gpu on a CUDA device, else cpu")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int, help="tokens per sequence (the language models)")
    p.add_argument("--lr", type=float)
    p.add_argument("--dtype", choices=DTYPES, help="bfloat16: autocast (fp32 parameters); float64: parameters and data")
    asked_only = ",".join(w for w, spec in WAYS.items() if not spec.by_default)
    p.add_argument(
        "--ways", help=f"comma-separated, from {','.join(WAYS)} (default: every available one but {asked_only})"
    )
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/train", help="folder for <model>-<preset>.json and -losses.png")
    p.add_argument("--cache-dir", help=f"tokenizer cache (default: {default_cache_dir()})")
    p.add_argument(
        "--profile", action="store_true", help="profile one more step of each way: its kernels, by origin, vs wall time"
    )
    a = p.parse_args(argv)
    try:
        summary = compare(
            a.model,
            a.preset,
            steps=a.steps,
            batch_size=a.batch_size,
            seq_len=a.seq_len,
            lr=a.lr,
            dtype=a.dtype,
            ways=a.ways.split(",") if a.ways else None,
            device=a.device,
            seed=a.seed,
            out=a.out,
            cache_dir=a.cache_dir,
            profile=a.profile,
        )
    except (MissingPackage, ValueError) as error:
        p.exit(2, f"{p.prog}: error: {error}\n")
    if not summary["ways"]:
        p.exit(1, f"{p.prog}: no way ran (skipped: {summary['skipped']})\n")
    if summary["failed"]:
        p.exit(1, f"{p.prog}: way(s) failed: {', '.join(summary['failed'])}\n")
