"""The main job: train one model twice from the same seed, as plain PyTorch
and patched with gpukernels, and compare loss, accuracy, speed and memory.

    python -m gpukernels.train                      # small MLP on digits, CPU or GPU
    python -m gpukernels.train --preset large       # wide residual MLP, bf16: for a GPU

Data: scikit-learn's bundled handwritten digits (1797 8x8 images, 10
classes), shipped inside the package: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import optim as gk_optim
from .patch import patch

PRESETS = {
    "digits": dict(hidden=256, blocks=1, epochs=10, batch_size=64, lr=3e-3, dropout=0.0, dtype="float32"),
    "large": dict(hidden=4096, blocks=4, epochs=20, batch_size=1024, lr=5e-4, dropout=0.1, dtype="bfloat16"),
}


class Residual(torch.nn.Module):
    def __init__(self, body: torch.nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


def build_model(hidden: int, blocks: int, dropout: float, classes: int = 10, features: int = 64) -> torch.nn.Module:
    """An MLP with every layer gpukernels replaces: Linear+ReLU, BatchNorm1d,
    then pre-norm residual blocks (LayerNorm, Linear+GELU, Linear, Dropout)."""
    layers = [torch.nn.Linear(features, hidden), torch.nn.ReLU(), torch.nn.BatchNorm1d(hidden)]
    for _ in range(blocks):
        layers.append(Residual(torch.nn.Sequential(
            torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, 4 * hidden), torch.nn.GELU(),
            torch.nn.Linear(4 * hidden, hidden), torch.nn.Dropout(dropout))))
    layers += [torch.nn.LayerNorm(hidden), torch.nn.Linear(hidden, classes)]
    return torch.nn.Sequential(*layers)


def load_digits(device: torch.device, seed: int = 0):
    """Train/test split (80/20, fixed) of the digits, scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(x))
    train, test = order[:split], order[split:]
    return (x[train].to(device), y[train].to(device)), (x[test].to(device), y[test].to(device))


@dataclass
class RunResult:
    losses: list[float] = field(default_factory=list)
    step_ms: float = 0.0
    peak_mem_mib: float | None = None
    accuracy: float = 0.0


def train_once(model, loss_fn, optimizer, scheduler, clip, train_data, test_data, *, epochs, batch_size,
               max_norm, autocast_dtype, seed, label) -> RunResult:
    device = train_data[0].device
    x, y = train_data
    result = RunResult()
    step_seconds = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    order_gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=order_gen).to(device)
        batches = [order[i:i + batch_size] for i in range(0, len(x) - batch_size + 1, batch_size)]
        for idx in tqdm(batches, desc=f"{label} epoch {epoch + 1}/{epochs}", leave=False, disable=None):
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = loss_fn(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip(model.parameters(), max_norm)
            optimizer.step()
            scheduler.step()
            result.losses.append(loss.item())  # .item() synchronises, so the step time is real
            step_seconds.append(time.perf_counter() - start)
    # The first steps include kernel compilation and allocator warm-up.
    result.step_ms = 1e3 * statistics.median(step_seconds[min(5, len(step_seconds) - 1):])
    if device.type == "cuda":
        result.peak_mem_mib = torch.cuda.max_memory_allocated() / 2**20
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        result.accuracy = (model(test_data[0]).argmax(1) == test_data[1]).float().mean().item()
    return result


def compare(preset: str = "digits", *, hidden=None, blocks=None, epochs=None, batch_size=None, lr=None,
            dropout=None, dtype=None, device=None, seed=0, out="out/train") -> dict:
    cfg = dict(PRESETS[preset])
    overrides = dict(hidden=hidden, blocks=blocks, epochs=epochs, batch_size=batch_size, lr=lr, dropout=dropout, dtype=dtype)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # bf16/fp16 mean autocast: parameters and optimizer state stay fp32.
    autocast_dtype = None if cfg["dtype"] == "float32" else getattr(torch, cfg["dtype"])
    train_data, test_data = load_digits(device, seed)
    steps = cfg["epochs"] * (len(train_data[0]) // cfg["batch_size"])
    warmup = max(1, steps // 10)

    torch.manual_seed(seed)
    plain = build_model(cfg["hidden"], cfg["blocks"], cfg["dropout"]).to(device)
    ours = copy.deepcopy(plain)
    report = patch(ours)
    loss_ours = torch.nn.CrossEntropyLoss(label_smoothing=0.05)
    report_loss = patch(loss_ours)

    plain_opt = torch.optim.AdamW(plain.parameters(), lr=cfg["lr"], weight_decay=0.01)
    plain_sched = torch.optim.lr_scheduler.SequentialLR(plain_opt, [
        torch.optim.lr_scheduler.LinearLR(plain_opt, 1.0 / warmup, 1.0, max(warmup - 1, 1)),
        torch.optim.lr_scheduler.CosineAnnealingLR(plain_opt, steps - warmup, eta_min=cfg["lr"] * 0.01)],
        milestones=[warmup])
    ours_opt = gk_optim.AdamW(ours.parameters(), lr=cfg["lr"], weight_decay=0.01)
    ours_sched = gk_optim.warmup_cosine(ours_opt, warmup, steps, min_lr=cfg["lr"] * 0.01)

    common = dict(train_data=train_data, test_data=test_data, epochs=cfg["epochs"], batch_size=cfg["batch_size"],
                  max_norm=1.0, autocast_dtype=autocast_dtype, seed=seed)
    results = {
        "pytorch": train_once(plain, torch.nn.CrossEntropyLoss(label_smoothing=0.05), plain_opt, plain_sched,
                              torch.nn.utils.clip_grad_norm_, label="pytorch", **common),
        "gpukernels": train_once(ours, loss_ours, ours_opt, ours_sched, gk_optim.clip_grad_norm_,
                                 label="gpukernels", **common),
    }
    summary = {
        "preset": preset, "config": cfg, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "steps": steps,
        "patch_report": str(report) + "\n" + str(report_loss),
        "max_step_loss_diff": max(abs(a - b) for a, b in zip(results["pytorch"].losses, results["gpukernels"].losses)),
        "runs": {name: asdict(r) for name, r in results.items()},
    }
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train.json").write_text(json.dumps(summary, indent=1))
    _plot(results, cfg, device, out_dir / "losses.png")
    print(report)
    print(_table(results, summary))
    print(f"loss curves: {out_dir / 'losses.png'}")
    return summary


def _table(results: dict[str, RunResult], summary: dict) -> str:
    plain, ours = results["pytorch"], results["gpukernels"]

    def mem(r: RunResult) -> str:
        return "n/a (CPU)" if r.peak_mem_mib is None else f"{r.peak_mem_mib:.1f} MiB"

    ratio_mem = "n/a" if plain.peak_mem_mib is None else f"{ours.peak_mem_mib / plain.peak_mem_mib:.3f}"
    rows = [
        ("", "pytorch", "gpukernels", "gpukernels / pytorch"),
        ("final loss", f"{plain.losses[-1]:.4f}", f"{ours.losses[-1]:.4f}", ""),
        ("test accuracy", f"{plain.accuracy:.4f}", f"{ours.accuracy:.4f}", ""),
        ("step time", f"{plain.step_ms:.2f} ms", f"{ours.step_ms:.2f} ms", f"{ours.step_ms / plain.step_ms:.3f}"),
        ("peak memory", mem(plain), mem(ours), ratio_mem),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"largest per-step loss difference: {summary['max_step_loss_diff']:.3g} over {summary['steps']} steps "
                 f"on {summary['device_name']}")
    return "\n".join(lines)


def _plot(results: dict[str, RunResult], cfg: dict, device: torch.device, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        ax.plot(r.losses, label=f"{name} (acc {r.accuracy:.3f})", linestyle="-" if name == "pytorch" else "--")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title(f"digits, hidden {cfg['hidden']}, {cfg['dtype']}, {device.type}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="digits")
    p.add_argument("--hidden", type=int, help="model width")
    p.add_argument("--blocks", type=int, help="residual MLP blocks")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--dropout", type=float)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="bf16/fp16 run under autocast")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/train", help="folder for train.json and losses.png")
    a = p.parse_args(argv)
    compare(a.preset, hidden=a.hidden, blocks=a.blocks, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
            dropout=a.dropout, dtype=a.dtype, device=a.device, seed=a.seed, out=a.out)


if __name__ == "__main__":
    main()
