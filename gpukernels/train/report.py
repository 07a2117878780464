"""The comparison as a terminal table, and the loss curves of every way on one PNG."""

from __future__ import annotations

import math
from pathlib import Path

from ._deps import require
from .run import FP32_REFERENCES, REFERENCE, WayResult

NOISE_FACTOR = 2.0
"""A bf16 way is within bf16 noise when its curve is at most this many times as far from the
fp32 reference's as eager's bf16 curve is (rounding, not a difference of math, moves it)."""


def loss_differences(results: dict[str, WayResult], reference: str = REFERENCE) -> dict[str, float | None]:
    """Largest per-step |loss - ``reference``'s loss| of each way (None without that way's run)."""
    ran = results.get(reference)
    if ran is None:
        return {name: None for name in results}
    return {name: max(abs(a - b) for a, b in zip(r.losses, ran.losses)) for name, r in results.items()}


def fp32_distances(results: dict[str, WayResult]) -> tuple[str | None, dict[str, float | None]]:
    """The fp32 way the bf16 ways' noise is judged by (None when none ran), and each way's
    largest per-step |loss - its loss| ({} without it)."""
    fp32 = next((name for name in FP32_REFERENCES if name in results), None)
    return fp32, loss_differences(results, fp32) if fp32 else {}


def noise_verdict(summary: dict, results: dict[str, WayResult]) -> str | None:
    """How far bf16 rounding alone moves eager's curve from the fp32 reference's, and which
    ways stay within ``NOISE_FACTOR`` times that; None without both runs or a bf16 preset."""
    fp32, to_fp32 = fp32_distances(results)
    if fp32 is None or REFERENCE not in results or summary["config"]["dtype"] != "bfloat16":
        return None
    noise = to_fp32[REFERENCE]
    bf16_ways = [name for name in results if name not in FP32_REFERENCES and name != REFERENCE]
    within = [name for name in bf16_ways if to_fp32[name] <= NOISE_FACTOR * noise]
    beyond = [name for name in bf16_ways if name not in within]
    return (
        f"bf16 noise: {REFERENCE}'s curve is up to {noise:.3g} from {fp32}'s; within {NOISE_FACTOR:g}x that: "
        f"{', '.join(within) or 'none'}" + (f"; beyond: {', '.join(beyond)}" if beyond else "")
    )


def _mib(value: float | None, reference: float | None, missing: str) -> str:
    """``value`` MiB, and its ratio to the reference way's where that has one."""
    if value is None:
        return missing
    ratio = f" ({value / reference:.2f}x)" if reference else ""
    return f"{value:,.1f} MiB{ratio}"


def _profile_line(profile: dict) -> str:
    """``--profile``'s step: its kernels' time against its wall time, by origin."""
    if "error" in profile:
        return f"failed ({profile['error']})"
    if "kernel_ms" not in profile:  # CPU: no kernels to time
        return f"one step {profile['wall_ms']:.1f} ms"
    origins = ", ".join(f"{k} {v:.1f}" for k, v in profile["by_category_ms"].items())
    return (
        f"kernels {profile['kernel_ms']:.1f} ms of a {profile['wall_ms']:.1f} ms step "
        f"({profile['kernel_ms'] / profile['wall_ms']:.0%}; {origins})"
    )


def table(summary: dict, results: dict[str, WayResult]) -> str:
    reference = results.get(REFERENCE)
    diffs = loss_differences(results)
    fp32, to_fp32 = fp32_distances(results)
    unit = summary["unit"]
    classifier = any("accuracy" in r.evaluation for r in results.values())
    header = [
        "way",
        "final loss",
        f"max |loss - {REFERENCE}|",
        *([f"max |loss - {fp32}|"] if fp32 else []),
        "median step",
        "1st step",
        f"{unit}/s",
        f"speed vs {REFERENCE}",
        "peak memory",
        "saved for backward",
    ] + (["test accuracy"] if classifier else [])
    rows = [header]
    for name, r in results.items():
        diff = "(reference)" if name == REFERENCE else "n/a" if diffs[name] is None else f"{diffs[name]:.3g}"
        speed = f"{reference.step_ms / r.step_ms:.2f}x" if reference else "n/a"
        row = [
            name,
            f"{r.losses[-1]:.4f}",
            diff,
            *(["(reference)" if name == fp32 else f"{to_fp32[name]:.3g}"] if fp32 else []),
            f"{r.step_ms:.1f} ms",
            f"{r.first_step_ms / 1e3:.2f} s",
            f"{r.throughput:,.0f}",
            speed,
            _mib(r.peak_mem_mib, reference and reference.peak_mem_mib, "n/a (CPU)"),
            _mib(r.saved_mib, reference and reference.saved_mib, "n/a (compiled)"),
        ]
        rows.append(row + ([f"{r.evaluation['accuracy']:.4f}"] if classifier else []))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    cfg = summary["config"]
    shape = f"{cfg['batch_size']} x {cfg['seq_len']} tokens" if "seq_len" in cfg else f"{cfg['batch_size']} {unit}"
    lines.insert(
        0,
        f"{summary['model']} ({summary['model_source']}), preset {summary['preset']}: "
        f"{summary['parameters'] / 1e6:.2f}M parameters, {summary['steps']} steps of {shape}, "
        f"{cfg['dtype']}, on {summary['device_name']} (torch {summary['torch']})",
    )
    patched_as: dict[str, str] = {}
    for name, r in results.items():
        if r.report != "torch layers":
            lines.append(f"{name}: " + (f"as {patched_as[r.report]}" if r.report in patched_as else r.report))
            patched_as.setdefault(r.report, name)
    verdict = noise_verdict(summary, results)
    lines += [verdict] if verdict else []
    for name, r in results.items():
        lines += [f"profile {name}: {_profile_line(r.profile)}"] if r.profile else []
    lines += [f"skipped {name}: {why}" for name, why in summary["skipped"].items()]
    lines += [f"FAILED {name}: {why}" for name, why in summary["failed"].items()]
    return "\n".join(lines)


def plot(summary: dict, results: dict[str, WayResult], path: Path) -> None:
    """Left: every way's loss per step. Right: each way's |loss - eager's| per step."""
    matplotlib = require("matplotlib", "the loss-curve plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, gaps) = plt.subplots(1, 2, figsize=(12, 4.5))
    reference = results.get(REFERENCE)
    for i, (name, r) in enumerate(results.items()):
        style = dict(label=name, linestyle=("-", "--", ":", "-.")[i % 4], linewidth=1.2)
        curves.plot(range(1, len(r.losses) + 1), r.losses, **style)
        if reference is not None and name != REFERENCE:
            # Steps where the losses are equal have no place on a log axis.
            gap = [abs(a - b) or math.nan for a, b in zip(r.losses, reference.losses)]
            gaps.plot(range(1, len(gap) + 1), gap, marker=".", **style)
    losses = [loss for r in results.values() for loss in r.losses]
    wide = min(losses) > 0 and max(losses) / min(losses) > 10  # a classifier's loss falls by decades
    curves.set(
        xlabel="step",
        ylabel="training loss",
        yscale="log" if wide else "linear",
        title=f"{summary['model']}, preset {summary['preset']}, {summary['config']['dtype']}, {summary['device_name']}",
    )
    gaps.set(
        xlabel="step", ylabel=f"|loss - {REFERENCE} loss|", yscale="log", title=f"difference from {REFERENCE}, per step"
    )
    curves.legend()
    if gaps.lines:
        gaps.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
