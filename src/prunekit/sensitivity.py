"""Sensitivity scan: how much accuracy each prunable group costs when it alone loses a share of its channels.

Each point prunes one group of a copy of the model, re-estimates BatchNorm statistics, and measures top-1
on held-out *training* images (never the test set), the classic per-layer sensitivity analysis.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .console import progress_bar
from .errors import UsageError, arg
from .groups import collect_groups
from .importance import NETWORK_WIDE, make_importance
from .modes import eval_mode
from .planning import LayerCosts
from .prefix import trace_calls
from .requests import PruneRequest
from .scan_budget import RATIOS, within_budget
from .scan_tries import Cut, cut_for, dense_pass, point, scan_order, top1
from .surgery import SurgeryError

SCAN_IMAGES, SCAN_CALIBRATION_IMAGES = 1000, 512  # training images that score / recalibrate a scan
SCAN_SECONDS = 240.0  # a scan at the default counts shrinks them to finish in about this long
LOSS = "kl"  # what allocation reads from a scan: "kl" (divergence from the dense model) or "accuracy"


def scan_options(request: PruneRequest) -> dict[str, Any]:
    """The keywords of ``scan`` (and ``scan_calibration``) that a pruning request sets, read in one place
    for every caller that scans for a request."""
    return {"prune_input_conv": request.prune_input_conv, "recover": request.scan_recovery}


def prunable_groups(
    model: nn.Module, example: torch.Tensor, importance: str = NETWORK_WIDE, prune_input_conv: bool = False
) -> dict[str, set[str]]:
    """The root conv of every group network-wide pruning would consider (the input conv's with
    ``prune_input_conv``), with the names of its members."""
    request = PruneRequest(ratio=0.5, prune_input_conv=prune_input_conv)
    _, groups = collect_groups(model, example, make_importance(importance), request)
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}
    return {
        g.root: {names[layer] for layer, _, _ in g.members if layer in names}
        for g in groups
        if isinstance(modules[g.root], nn.Conv2d)
    }


def prunable_roots(model: nn.Module, example: torch.Tensor, importance: str = NETWORK_WIDE) -> list[str]:
    """The root conv of every group network-wide pruning would consider."""
    return list(prunable_groups(model, example, importance))


def scan(
    model: nn.Module,
    example: torch.Tensor,
    held_out: Sequence[tuple[torch.Tensor, torch.Tensor]],
    calibration: Sequence[torch.Tensor],
    ratios: Sequence[float] = RATIOS,
    importance: str = NETWORK_WIDE,
    seconds: float | None = None,
    prune_input_conv: bool = False,
    recover: bool = False,
) -> dict[str, Any]:
    """Accuracy on ``held_out`` and divergence from the dense model for every (group, ratio), each group
    pruned alone after BN recalibration. With ``seconds``, both image sets shrink (never below
    ``scan_budget.MIN_SCAN_IMAGES``) so the scan's estimate fits that time; ``prune_input_conv`` scans the
    input conv's group too. ``recover``: each try's readers are re-fitted (``prunekit.reconstruct``, from
    the group's cut) before it is scored, with whichever BatchNorm statistics leave it closer to the dense
    model: the plan then ranks groups by what survives recovery (slower: a recovery a try).

    ``model`` itself is not changed. Groups whose surgery fails are recorded with the reason, not scored.
    """
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise UsageError(f"ratios must be fractions between 0 and 1 (exclusive), got {list(ratios)}")
    model.eval()
    start = time.perf_counter()
    example = _surgery_example(model, example)
    groups = prunable_groups(model, example, importance, prune_input_conv)
    calls = trace_calls(model, example)
    dense_macs = sum(LayerCosts(model, example).macs.values())
    ratios, held_out, calibration, expected = within_budget(
        model, example, groups, importance, ratios, held_out, calibration, seconds, recover, calls
    )
    expected += time.perf_counter() - start  # comparable with the scan's "seconds": timing it took time
    images = dense_pass(model, held_out, calibration)
    scoring, recal = images.counts
    result: dict[str, Any] = {
        "dense_accuracy": top1(images.dense_logits, images.held_out),
        "ratios": list(ratios),
        "importance": importance,
        "held_out_images": scoring,
        "calibration_images": recal,
        "loss": LOSS,
        "recovered": recover,
        "estimated_seconds": expected,
        "groups": {},
    }
    cut: Cut | None = None
    modules = dict(model.named_modules())
    with progress_bar() as bar:
        task = bar.add_task("sensitivity", total=len(groups) * len(ratios), info="")
        for root in scan_order(groups, calls):
            cut = cut_for(model, calls, groups[root], images, cut)
            row: dict[str, Any] = {"accuracy": [], "kl": [], "macs_saved": []}
            dense_side: dict | None = {} if recover else None  # the same for every ratio of the group
            for ratio in ratios:
                bar.update(task, advance=1, info=f"{root} {ratio:.0%}")
                try:
                    accuracy, kl, macs = point(
                        model, example, root, ratio, importance, images, cut, dense_side
                    )
                except (UsageError, SurgeryError) as exc:
                    bar.update(task, advance=len(ratios) - 1 - len(row["accuracy"]))
                    row = {"skipped": str(exc)}
                    break
                row["accuracy"].append(accuracy)
                row["kl"].append(kl)
                row["macs_saved"].append(macs / dense_macs)
            row["channels"] = getattr(modules[root], "out_channels", None)
            result["groups"][root] = row
    result["groups"] = {r: result["groups"][r] for r in groups}  # the graph's order, as before
    result["seconds"] = time.perf_counter() - start
    return result


# What a pruning report says of the scan it planned from; the curves themselves stay in the scan's file.
SCAN_SUMMARY = (
    "held_out_images",
    "calibration_images",
    "ratios",
    "recovered",
    "metric",
    "estimated_seconds",
    "seconds",
)


def scan_summary(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """The image counts, grid and time of a scan (``SCAN_SUMMARY``, with its number of groups), or None."""
    if result is None:
        return None
    return {"groups": len(result.get("groups", {})), **{k: result[k] for k in SCAN_SUMMARY if k in result}}


def _surgery_example(model: nn.Module, example: torch.Tensor) -> torch.Tensor:
    """A smaller input for the tries' surgery (which traces and checks the model on it several times) when
    the model gives the same output shape on it: channel counts, not image size, decide what is removed."""
    size = max(example.shape[-1] // 4, 32)
    if size >= example.shape[-1] or example.dim() != 4:
        return example
    small = example.new_zeros(*example.shape[:2], size, size)
    try:
        with torch.no_grad():
            same = model(small).shape == model(example).shape
    except Exception:  # too small for this model
        return example
    return small if same else example


def scan_calibration(
    model: nn.Module,
    example: torch.Tensor,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
    ratios: Sequence[float] | None = None,
    prune_input_conv: bool = False,
    recover: bool = False,
) -> dict[str, Any]:
    """A scan on the caller's calibration batches: two thirds score, one third re-estimates BatchNorm (the
    commands' 1,000 : 512). Unlabelled images are scored by agreement with the dense model's predictions."""
    x = torch.cat([b[0] for b in batches])
    labelled = all(y is not None for _, y in batches)
    if labelled:
        y = torch.cat([b[1] for b in batches])
    else:
        with torch.no_grad(), eval_mode(model):
            y = torch.cat([model(x[i : i + 256]).argmax(1) for i in range(0, len(x), 256)])
    if len(x) < 3:
        raise UsageError(f"a sensitivity scan needs at least 3 calibration images, got {len(x)}")
    scoring = len(x) * SCAN_IMAGES // (SCAN_IMAGES + SCAN_CALIBRATION_IMAGES)
    held_out = [(x[i : min(i + 250, scoring)], y[i : min(i + 250, scoring)]) for i in range(0, scoring, 250)]
    calibration = [x[i : i + 256] for i in range(scoring, len(x), 256)]
    result = scan(
        model,
        example,
        held_out,
        calibration,
        ratios or RATIOS,
        seconds=SCAN_SECONDS,
        prune_input_conv=prune_input_conv,
        recover=recover,
    )
    result["metric"] = "accuracy" if labelled else "agreement with the dense model"
    return result


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


def parse_ratios(text: str) -> tuple[float, ...]:
    """``0.1,0.5,0.9`` as fractions of channels; a clear error for anything else."""
    try:
        ratios = tuple(float(r) for r in text.split(","))
    except ValueError:
        raise UsageError(f"{arg('ratios')} must be comma-separated numbers, got {text!r}") from None
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise UsageError(f"{arg('ratios')} must be fractions between 0 and 1 (exclusive), got {text!r}")
    return ratios


def read_scan(path: str | Path) -> dict[str, Any]:
    """A ``prunekit sensitivity`` result from its JSON file; a clear error when it is not one."""
    import json

    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read it as JSON ({exc})") from None
    if not isinstance(value, dict) or "groups" not in value or "ratios" not in value:
        raise UsageError(f"{path}: not a `prunekit sensitivity` result")
    return value
