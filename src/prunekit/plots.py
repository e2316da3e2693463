"""The run report's figures: channels before and after pruning, training curves, accuracy against latency."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .files import atomic_write


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (imported late: only a report draws)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_channels(changes: dict[str, tuple[int, int]], path: Path) -> Path | None:
    """Bar chart of output channels before and after pruning, one bar pair per layer."""
    if not changes:
        return None
    plt = _pyplot()

    names = list(changes)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names) + 2), 4))
    xs = range(len(names))
    ax.bar(xs, [changes[n][0] for n in names], color="#cccccc", label="dense")
    ax.bar(xs, [changes[n][1] for n in names], color="#1f77b4", label="pruned")
    ax.set_xticks(list(xs), names, rotation=90, fontsize=7)
    ax.set_ylabel("output channels")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(curves: dict[str, list[dict[str, Any]]], path: Path) -> Path | None:
    """Training loss and test accuracy per epoch for each training stage."""
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    plt = _pyplot()

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    offset = 0  # stages follow each other on one epoch axis: baseline, then each fine-tuning round
    for stage, history in curves.items():
        epochs = [offset + h["epoch"] for h in history]
        offset = epochs[-1]
        loss_ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label=stage)
        acc_ax.plot(epochs, [100 * h["test_accuracy"] for h in history], marker="o", label=stage)
    from matplotlib.ticker import MaxNLocator

    loss_ax.set(xlabel="epoch", ylabel="training loss")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    acc_ax.set(xlabel="epoch", ylabel="test accuracy (%)")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_tradeoff(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Accuracy against ONNX Runtime latency at batch 64 (PyTorch where ORT is absent), one point a stage."""
    points = []
    for row in rows:
        runtime = "ort" if (row["latency"].get("ort") or {}).get("batch64") else "torch"
        lat = (row["latency"].get(runtime) or {}).get("batch64")
        if lat and row["accuracy"] is not None:
            points.append((row["stage"], lat["median_ms"], row["accuracy"] * 100, runtime))
    if len(points) < 2:
        return None
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, ms, acc, runtime in points:
        ax.scatter(ms, acc, s=50)
        ax.annotate(
            f"{name} ({'ORT' if runtime == 'ort' else 'PyTorch'})",
            (ms, acc),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=8,
        )
    ax.margins(x=0.45, y=0.1)  # room for the labels right of each point
    ax.set_xlabel("latency at batch 64 (ms, lower is better)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy against measured latency")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
    return path
