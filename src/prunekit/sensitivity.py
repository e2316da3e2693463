"""Sensitivity scan: how much accuracy each prunable group costs when it alone loses a share of its channels.

Each point prunes one group of a copy of the model, re-estimates BatchNorm statistics, and measures top-1
on held-out *training* images (never the test set), the classic per-layer sensitivity analysis.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .console import progress_bar
from .errors import UsageError
from .finetuning import recalibrate_batchnorm
from .groups import collect_groups
from .importance import make_importance
from .measure import evaluate
from .planning import LayerCosts
from .pruning import PruneRequest, prune_model
from .surgery import SurgeryError

RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)
SCAN_IMAGES, SCAN_CALIBRATION_IMAGES = 1000, 512  # training images that score / recalibrate a scan


def scan_counts(available: int, images: int, calibration_images: int) -> tuple[int, int, str | None]:
    """The scan's image counts within a training set of ``available`` images: both shrunk in proportion
    when the set holds fewer than they ask, with the line that says so (None when nothing shrank)."""
    if images + calibration_images <= available:
        return images, calibration_images, None
    if available < 2:
        raise UsageError(
            f"a sensitivity scan needs at least 2 training images, the training split holds {available}"
        )
    scale = available / (images + calibration_images)
    fewer = max(1, int(images * scale))
    calibration = max(1, min(int(calibration_images * scale), available - fewer))
    note = (
        f"the training split holds {available} images: the sensitivity scan scores on {fewer} and "
        f"re-estimates BatchNorm on {calibration} (instead of {images} + {calibration_images})"
    )
    return fewer, calibration, note


def prunable_roots(model: nn.Module, example: torch.Tensor, importance: str = "l2") -> list[str]:
    """The root conv of every group network-wide pruning would consider."""
    _, groups = collect_groups(model, example, make_importance(importance), PruneRequest(ratio=0.5))
    modules = dict(model.named_modules())
    return [g.root for g in groups if isinstance(modules[g.root], nn.Conv2d)]


@torch.no_grad()
def _accuracy(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    return evaluate(model, batches)["accuracy"]


def scan(
    model: nn.Module,
    example: torch.Tensor,
    held_out: Sequence[tuple[torch.Tensor, torch.Tensor]],
    calibration: Sequence[torch.Tensor],
    ratios: Sequence[float] = RATIOS,
    importance: str = "l2",
) -> dict[str, Any]:
    """Accuracy on ``held_out`` for every (group, ratio), each group pruned alone after BN recalibration.

    ``model`` itself is not changed. Groups whose surgery fails are recorded with the reason, not scored.
    """
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise UsageError(f"ratios must be fractions between 0 and 1 (exclusive), got {list(ratios)}")
    import time

    from .console import console

    model.eval()
    roots = prunable_roots(model, example, importance)
    costs = LayerCosts(model, example)
    dense_macs = sum(costs.macs.values())
    start = time.perf_counter()
    dense_accuracy = _accuracy(model, held_out)
    seconds = time.perf_counter() - start  # one pass over the scoring images; a point adds BatchNorm's
    per_point = seconds * (1 + sum(len(x) for x in calibration) / max(sum(len(y) for _, y in held_out), 1))
    console.print(
        f"sensitivity scan: {len(roots)} groups x {len(ratios)} ratios on {sum(len(y) for _, y in held_out)} "
        f"scoring + {sum(len(x) for x in calibration)} BatchNorm images, about "
        f"{_duration(per_point * len(roots) * len(ratios))}",
        highlight=False,
    )
    result: dict[str, Any] = {
        "dense_accuracy": dense_accuracy,
        "ratios": list(ratios),
        "importance": importance,
        "held_out_images": sum(len(y) for _, y in held_out),
        "calibration_images": sum(len(x) for x in calibration),
        "groups": {},
    }
    with progress_bar() as bar:
        task = bar.add_task("sensitivity", total=len(roots) * len(ratios), info="")
        for root in roots:
            row: dict[str, Any] = {"accuracy": [], "macs_saved": []}
            for ratio in ratios:
                bar.update(task, advance=1, info=f"{root} {ratio:.0%}")
                pruned = copy.deepcopy(model)
                try:
                    report = prune_model(
                        pruned, PruneRequest(layers=[root], ratio=ratio), make_importance(importance), example
                    )
                except (UsageError, SurgeryError) as exc:
                    row = {"skipped": str(exc)}
                    break
                recalibrate_batchnorm(pruned, calibration)
                row["accuracy"].append(_accuracy(pruned, held_out))
                row["macs_saved"].append((report.macs_before - report.macs_after) / dense_macs)
            row["channels"] = getattr(dict(model.named_modules())[root], "out_channels", None)
            result["groups"][root] = row
    result["seconds"] = time.perf_counter() - start
    return result


def scan_calibration(
    model: nn.Module, example: torch.Tensor, batches: Sequence[tuple[torch.Tensor, torch.Tensor | None]]
) -> dict[str, Any]:
    """A scan on the caller's calibration batches: two thirds score, one third re-estimates BatchNorm (the
    commands' 1,000 : 512). Unlabelled images are scored by agreement with the dense model's predictions."""
    x = torch.cat([b[0] for b in batches])
    labelled = all(y is not None for _, y in batches)
    if labelled:
        y = torch.cat([b[1] for b in batches])
    else:
        with torch.no_grad():
            was_training = model.training
            model.eval()
            y = torch.cat([model(x[i : i + 256]).argmax(1) for i in range(0, len(x), 256)])
            model.train(was_training)
    if len(x) < 3:
        raise UsageError(f"a sensitivity scan needs at least 3 calibration images, got {len(x)}")
    scoring = len(x) * SCAN_IMAGES // (SCAN_IMAGES + SCAN_CALIBRATION_IMAGES)
    held_out = [(x[i : min(i + 250, scoring)], y[i : min(i + 250, scoring)]) for i in range(0, scoring, 250)]
    calibration = [x[i : i + 256] for i in range(scoring, len(x), 256)]
    result = scan(model, example, held_out, calibration)
    result["metric"] = "accuracy" if labelled else "agreement with the dense model"
    return result


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def plot(result: dict[str, Any], path: str | Path) -> Path | None:
    """The sensitivity figure: held-out accuracy against the ratio pruned, one line per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .files import atomic_write

    rows = {k: v for k, v in result["groups"].items() if "skipped" not in v}
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    ratios = [r * 100 for r in result["ratios"]]
    for name, row in rows.items():
        ax.plot(ratios, [a * 100 for a in row["accuracy"]], marker="o", markersize=3, label=name)
    ax.axhline(result["dense_accuracy"] * 100, color="black", linestyle="--", linewidth=1, label="dense")
    ax.set_xlabel("channels removed from that group alone (%)")
    ax.set_ylabel("accuracy on training images (%, never the test set)")
    ax.set_title(f"sensitivity ({result['importance']}, after BatchNorm recalibration)")
    ax.legend(fontsize=6, ncol=2, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
    return Path(path)
