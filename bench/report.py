"""A run's rows as a plain table, a Markdown summary, JSON/CSV/Markdown files and one
plot per op; the rows of a results file read back for ``--summarize``."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

from .harness import OURS, Row

SUMMARY_BASELINES = ("eager", "compile", "compile-max", "liger", "cupy", "torch-fused", "cublas-matmul")
OURS_COLUMNS = {"gpukernels": "ours vs this", "gpukernels-compile": "compiled ours vs this"}


def table(rows: list[Row]) -> str:
    """Every row, with the speed-up of each of ours that ran (one column each) over it."""
    present = [p for p in OURS if any(r.provider == p for r in rows)]
    header = ("op", "shape", "mode", "provider", "ms", "GB/s", "TFLOP/s", "of peak", "mem MiB")
    lines = [header + tuple(OURS_COLUMNS[p] for p in present)]
    ours = {(r.op, r.shape, r.mode, r.provider): r for r in rows if r.provider in OURS}
    for r in rows:
        mine = [ours.get((r.op, r.shape, r.mode, p)) for p in present]
        ratios = tuple("" if m is None or r.provider in OURS else f"{r.ms / m.ms:.2f}x" for m in mine)
        lines.append(
            (
                r.op,
                r.shape,
                r.mode,
                r.provider,
                f"{r.ms:.3f}",
                "" if r.gbps is None else f"{r.gbps:.3g}",
                "" if r.tflops is None else f"{r.tflops:.3g}",
                "" if r.fraction_of_peak is None else f"{100 * r.fraction_of_peak:.0f}%",
                "" if r.peak_mem_mib is None else f"{r.peak_mem_mib:.0f}",
            )
            + ratios
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]))]
    out = [" | ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines]
    out.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join(out)


def summary(rows: list[Row]) -> str:
    """A Markdown table, one line per op and shape (and per way of calling ours, when
    ``--compile`` ran ours compiled too), of forward+backward (AdamW: a step): our time,
    our speed-up over each baseline that ran (>1: ours is faster), our share of the
    measured peak, and peak memory against eager's."""
    summarized = [r for r in rows if r.provider in OURS and r.mode in ("fwd+bwd", "step")]
    baselines = [b for b in SUMMARY_BASELINES if any(b in r.speedup for r in summarized)]
    by_provider = any(r.provider != "gpukernels" for r in summarized)
    lines = [
        "| op | shape | "
        + ("ours | " if by_provider else "")
        + "ours ms | "
        + "".join(f"vs {b} | " for b in baselines)
        + "of peak | mem MiB (eager) |",
        "|---" * (len(baselines) + 5 + by_provider) + "|",
    ]
    for r in summarized:
        eager = next(
            (
                e
                for e in rows
                if (e.op, e.shape, e.mode, e.provider) == (r.op, r.shape, r.mode, "eager")
                and e.peak_mem_mib is not None
            ),
            None,
        )
        ratios = [f"{r.speedup[b]:.2f}x" if b in r.speedup else "" for b in baselines]
        mem = (
            ""
            if r.peak_mem_mib is None
            else f"{r.peak_mem_mib:.0f}" + (f" ({eager.peak_mem_mib:.0f})" if eager else "")
        )
        peak = "" if r.fraction_of_peak is None else f"{100 * r.fraction_of_peak:.0f}%"
        ours = f"{r.provider} | " if by_provider else ""
        lines.append(
            f"| {r.op} | {r.shape} | {ours}{r.ms:.3f} | " + "".join(f"{x} | " for x in ratios) + f"{peak} | {mem} |"
        )
    return "\n".join(lines)


def read_rows(path: Path) -> list[Row]:
    """The rows of a results file that ``write`` made."""
    return [Row(**r) for r in json.loads(Path(path).read_text())["rows"]]


def target_table(rows: list[Row], targets: dict[str, list[tuple[str, str, float]]]) -> str:
    """Each of our rows against its op's targets (``targets``: op -> the case module's
    ``TARGETS``, (mode, "bandwidth" or a baseline provider, threshold)): the fraction of
    the copy bandwidth measured in the run, or the speed-up over that baseline; a target
    whose row or baseline did not run is "not measured", never met."""
    lines = ["| op | shape | mode | target | measured | met |", "|---|---|---|---|--:|---|"]
    ours = {(r.op, r.shape, r.mode): r for r in rows if r.provider == "gpukernels"}
    shapes = dict.fromkeys((r.op, r.shape) for r in rows)
    for op, shape in shapes:
        for mode, criterion, threshold in targets.get(op, ()):
            row = ours.get((op, shape, mode))
            if criterion == "bandwidth":
                wanted = f">= {100 * threshold:.0f}% of copy bandwidth"
                value = None if row is None else row.fraction_of_peak
                shown = "" if value is None else f"{100 * value:.0f}%"
            else:
                wanted = f">= {threshold:.2f}x {criterion}"
                value = None if row is None else row.speedup.get(criterion)
                shown = "" if value is None else f"{value:.2f}x"
            met = "not measured" if value is None else "yes" if value >= threshold else "no"
            lines.append(f"| {op} | {shape} | {mode} | {wanted} | {shown} | {met} |")
    return "\n".join(lines) + "\n"


def write(rows: list[Row], peaks: dict, env: dict, out: Path, stem: str, targets: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(
        json.dumps({"environment": env, "peaks": peaks, "rows": [asdict(r) for r in rows]}, indent=1)
    )
    with open(out / f"{stem}.csv", "w", newline="") as f:
        fields = [k for k in asdict(rows[0]) if k != "speedup"] + ["speedup"]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            d = asdict(r)
            d["speedup"] = json.dumps(d["speedup"])
            writer.writerow(d)
    header = [
        f"# gpukernels benchmark — {env['device']}",
        "",
        "| " + " | ".join(f"{k}: {v}" for k, v in env.items()) + " |",
        "",
    ]
    if peaks:
        header += [
            f"Measured in this run: copy {peaks['copy_gbps']:.0f} GB/s, "
            f"cuBLAS bf16 matmul {peaks['bf16_matmul_tflops']:.0f} TFLOP/s.",
            "",
        ]
    if targets:
        header += ["Targets:", "", targets]
    (out / f"{stem}.md").write_text(
        "\n".join(header) + summary(rows) + "\n\nEvery provider and mode:\n\n```\n" + table(rows) + "\n```\n"
    )


def plot(rows: list[Row], out: Path, env: dict) -> list[Path]:
    """``<out>/<op>.png`` per op: each provider's GB/s or TFLOP/s against the size, forward+backward
    (AdamW: a step); none when matplotlib (the ``bench`` extra) is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("no plots: matplotlib is not installed (the `bench` extra)")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for op in dict.fromkeys(r.op for r in rows):
        mode = "step" if any(r.op == op and r.mode == "step" for r in rows) else "fwd+bwd"
        op_rows = [r for r in rows if r.op == op and r.mode == mode]
        metric = "tflops" if any(r.tflops is not None for r in op_rows) else "gbps"
        fig, ax = plt.subplots(figsize=(7, 4))
        for provider in dict.fromkeys(r.provider for r in op_rows):
            pts = sorted((r.size, getattr(r, metric)) for r in op_rows if r.provider == provider)
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                label=provider,
                linewidth=2.5 if provider in OURS else 1.2,
            )
        ax.set_xscale("log")
        ax.set_xlabel("parameters" if mode == "step" else "elements")
        ax.set_ylabel("TFLOP/s" if metric == "tflops" else "GB/s")
        ax.set_title(f"{op} {mode} — {env['device']}, {env['date']}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
