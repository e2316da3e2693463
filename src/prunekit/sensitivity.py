"""Sensitivity scan: how much accuracy each prunable group costs when it alone loses a share of its channels.

Each point prunes one group of a copy of the model, re-estimates BatchNorm statistics, and measures top-1
on held-out *training* images (never the test set), the classic per-layer sensitivity analysis.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .batchnorm import recalibrate_batchnorm
from .console import console, progress_bar
from .divergence import kl_from_dense
from .errors import UsageError, arg
from .groups import collect_groups
from .importance import NETWORK_WIDE, make_importance
from .measure import autocast, bf16_supported, evaluate
from .modes import eval_mode
from .planning import LayerCosts
from .prefix import Call, Start, candidate_cuts, capture, running_from, trace_calls, verified
from .pruning import prune_model
from .reconstruct import reconstruct
from .requests import PruneRequest
from .scan_budget import ScanCost, duration, first_call, timed_pass
from .surgery import SurgeryError

RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)
SCAN_IMAGES, SCAN_CALIBRATION_IMAGES = 1000, 512  # training images that score / recalibrate a scan
SCAN_SECONDS = 240.0  # a scan at the default counts shrinks them to finish in about this long
CACHE_BYTES = 4 << 30  # a cut's cached outputs stay below this; past it, tries run the whole model
LOSS = "kl"  # what allocation reads from a scan: "kl" (divergence from the dense model) or "accuracy"
RECOVERY_IMAGES = 64  # a recovered try (scan_recovery) re-fits on the first this many BatchNorm images


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


@torch.no_grad()
def _accuracy(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    return evaluate(model, batches)["accuracy"]


@dataclass
class _Images:
    """The scan's images: scoring batches with labels and the dense model's logits, BatchNorm batches."""

    held_out: list[tuple[torch.Tensor, torch.Tensor]]
    calibration: list[torch.Tensor]
    dense_logits: list[torch.Tensor]
    bf16: bool

    @property
    def counts(self) -> tuple[int, int]:
        return sum(len(y) for _, y in self.held_out), sum(len(x) for x in self.calibration)


@dataclass
class _Cut:
    """Where a group's tries start: the cut's cached outputs for every scoring and BatchNorm batch."""

    name: str
    skipped: list[str]
    held_out: list[torch.Tensor]
    calibration: list[torch.Tensor]


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
    ratios, held_out, calibration, expected = _within_budget(
        model, example, groups, importance, ratios, held_out, calibration, seconds, recover, calls
    )
    expected += time.perf_counter() - start  # comparable with the scan's "seconds": timing it took time
    images = _dense_pass(model, held_out, calibration)
    scoring, recal = images.counts
    result: dict[str, Any] = {
        "dense_accuracy": _top1(images.dense_logits, images.held_out),
        "ratios": list(ratios),
        "importance": importance,
        "held_out_images": scoring,
        "calibration_images": recal,
        "loss": LOSS,
        "recovered": recover,
        "estimated_seconds": expected,
        "groups": {},
    }
    cut: _Cut | None = None
    modules = dict(model.named_modules())
    with progress_bar() as bar:
        task = bar.add_task("sensitivity", total=len(groups) * len(ratios), info="")
        for root in sorted(groups, key=lambda r: first_call(calls, groups[r])):
            cut = _cut_for(model, calls, groups[root], images, cut)
            row: dict[str, Any] = {"accuracy": [], "kl": [], "macs_saved": []}
            dense_side: dict | None = {} if recover else None  # the same for every ratio of the group
            for ratio in ratios:
                bar.update(task, advance=1, info=f"{root} {ratio:.0%}")
                try:
                    accuracy, kl, macs = _point(
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


def _within_budget(
    model: nn.Module,
    example: torch.Tensor,
    groups: dict[str, set[str]],
    importance: str,
    ratios: Sequence[float],
    held_out: Sequence[tuple[torch.Tensor, torch.Tensor]],
    calibration: Sequence[torch.Tensor],
    seconds: float | None,
    recover: bool,
    calls: dict[str, Call],
) -> tuple[Sequence[float], list, list, float]:
    """The ratios and images a scan uses: as given, or (over ``seconds``) a coarser default grid and fewer
    images; and how long it will take, said in one line."""
    cost = _scan_cost(model, example, groups, calls, importance, held_out, calibration, recover)
    offered = (sum(len(y) for _, y in held_out), sum(len(x) for x in calibration))
    counts = offered
    if seconds is not None and cost.seconds(counts, len(ratios)) > seconds:
        if tuple(ratios) == RATIOS:
            ratios = RATIOS[::2]  # a coarser grid first: the planner interpolates between the points
        counts = cost.fitted_counts(offered, len(ratios), seconds)
        if counts[0] < len(held_out[0][1]):  # smaller batches now: timed again at the size the scan runs
            timed = timed_pass(model, _first(held_out, counts[0]), groups)
            cost = replace(timed, per_try=cost.per_try, per_group=cost.per_group, passes=cost.passes)
            counts = cost.fitted_counts(offered, len(ratios), seconds)
        held_out = _first(held_out, counts[0])
        calibration = _first(calibration, counts[1])
    expected = cost.seconds(counts, len(ratios))
    shrunk = (
        f" (of {offered[0]} + {offered[1]}, to finish in about {duration(seconds)})"
        if counts != offered
        else ""
    )
    console.print(
        f"sensitivity scan: {len(groups)} groups x {len(ratios)} ratios on {counts[0]} scoring + {counts[1]} "
        f"BatchNorm images, about {duration(expected)}{shrunk}",
        highlight=False,
    )
    return ratios, list(held_out), list(calibration), expected


def _scan_cost(
    model: nn.Module,
    example: torch.Tensor,
    groups: dict[str, set[str]],
    calls: dict[str, Call],
    importance: str,
    held_out: Sequence[tuple[torch.Tensor, torch.Tensor]],
    calibration: Sequence[torch.Tensor],
    recover: bool,
) -> ScanCost:
    """The scan's cost, timed before it starts: a dense pass, and a try's fixed work on the first, middle
    and last group the scan reaches, averaged (a residual stream's try costs several times a single conv's,
    so one group is a poor sample)."""
    order = sorted(groups, key=lambda r: first_call(calls, groups[r]))
    sampled = list(dict.fromkeys(order[i * (len(order) - 1) // 2] for i in range(3))) if order else []
    timings = []
    with progress_bar() as bar:  # about 15 s on a 224-px ResNet-50
        task = bar.add_task("timing the scan", total=2 + len(sampled), info="")
        cost = timed_pass(model, held_out, groups)
        bar.advance(task)
        if sampled:  # the first surgery pays once for what later ones reuse (tracing set-up): not counted
            _timed_try(model, example, groups, calls, importance, sampled[0], calibration, False)
        bar.advance(task)
        for root in sampled:
            timings.append(_timed_try(model, example, groups, calls, importance, root, calibration, recover))
            bar.advance(task)
    timings = [t for t in timings if t is not None] or [(0.0, 0.0)]
    cost.per_try = sum(t[0] for t in timings) / len(timings)
    cost.per_group = sum(t[1] for t in timings) / len(timings)
    cost.passes = 2 if recover else 1
    return cost


def _timed_try(
    model: nn.Module,
    example: torch.Tensor,
    groups: dict[str, set[str]],
    calls: dict[str, Call],
    importance: str,
    root: str,
    calibration: Sequence[torch.Tensor],
    recover: bool,
) -> tuple[float, float] | None:
    """Seconds of a try's fixed work on ``root``'s group: its surgery and, with ``recover``, its recovery
    from the group's cut; and those of the dense side of recovery that every ratio of the group shares.
    None where the group cannot be pruned (the scan skips it too)."""
    timer = time.perf_counter()
    pruned = copy.deepcopy(model)
    try:
        report = prune_model(
            pruned, PruneRequest(layers=[root], ratio=0.5), make_importance(importance), example
        )
    except (UsageError, SurgeryError):
        return None
    surgery = time.perf_counter() - timer
    if not recover:
        return surgery, 0.0
    images = _first(calibration, RECOVERY_IMAGES)
    probe = [(images[0][:2], torch.zeros(2, dtype=torch.long))]  # verifies the cut; only ``images`` cached
    cut = _cut_for(model, calls, groups[root], _dense_pass(model, probe, images, logits=False), None)
    dense_side: dict = {}
    taken = []
    for _ in range(2):  # the first time computes the dense side, the second reuses it as later ratios do
        timer = time.perf_counter()
        _recover(model, pruned, report.kept, images, cut, dense_side)
        taken.append(time.perf_counter() - timer)
    return surgery + taken[1], max(taken[0] - taken[1], 0.0)


def _dense_pass(
    model: nn.Module,
    held_out: Sequence[tuple[torch.Tensor, torch.Tensor]],
    calibration: Sequence[torch.Tensor],
    logits: bool = True,
) -> _Images:
    """The dense model's logits on the scoring images (without ``logits``: none), at the precision every try
    will run at."""
    device = next(model.parameters()).device
    bf16 = device.type == "cuda" or bf16_supported()
    with torch.no_grad(), autocast(device, bf16):
        dense = [model(x).float() for x, _ in held_out] if logits else []
    return _Images(list(held_out), list(calibration), dense, bf16)


def _top1(logits: Sequence[torch.Tensor], held_out: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    hits = sum(
        int((lg.argmax(1) == y.to(lg.device)).sum()) for lg, (_, y) in zip(logits, held_out, strict=True)
    )
    return hits / max(sum(len(y) for _, y in held_out), 1)


def _point(
    model: nn.Module,
    example: torch.Tensor,
    root: str,
    ratio: float,
    importance: str,
    images: _Images,
    cut: _Cut | None,
    dense_side: dict | None,
) -> tuple[float, float, int]:
    """One try: ``root``'s group pruned by ``ratio`` in a copy, BatchNorm re-estimated (with ``dense_side``,
    the dense side of the group's recoveries: its readers re-fitted first, and the dense statistics kept
    where they leave it closer to the dense model), then (accuracy, mean KL divergence from the dense
    model's predictions, MACs saved) on the scoring images."""
    pruned = copy.deepcopy(model)
    report = prune_model(
        pruned, PruneRequest(layers=[root], ratio=ratio), make_importance(importance), example
    )
    device = next(model.parameters()).device
    if dense_side is not None:
        _recover(model, pruned, report.kept, images.calibration, cut, dense_side)
        recovered = _scored(pruned, images, cut)
    with _from_cut(pruned, cut) as feed, torch.no_grad(), autocast(device, images.bf16):
        recalibrate_batchnorm(pruned, feed(images.calibration, cut.calibration if cut else None))
    # with recover, as recovery does: the statistics that leave the model closer to the dense one
    tried = [_scored(pruned, images, cut), *([recovered] if dense_side is not None else [])]
    kl, logits = min(((_divergence(lg, images), lg) for lg in tried), key=lambda c: c[0])
    return (
        _top1(logits, images.held_out),
        kl / max(images.counts[0], 1),
        report.macs_before - report.macs_after,
    )


def _recover(
    dense: nn.Module,
    pruned: nn.Module,
    kept: dict[str, torch.Tensor],
    calibration: Sequence[torch.Tensor],
    cut: _Cut | None = None,
    dense_side: dict | None = None,
) -> None:
    """A try's recovery: ``pruned``'s readers of what was removed re-fitted on the first BatchNorm images,
    both passes run from the cut where there is one (the dense pass once for the tries sharing
    ``dense_side``). The BatchNorm statistics are left to the try, which re-estimates them after the cut
    only (the prefix its cached outputs stand for must stay the dense model's)."""
    images = _first(calibration, RECOVERY_IMAGES)
    start = None
    if cut is not None:  # cached at the scan's precision; recovery runs in float32
        start = Start(cut.name, cut.skipped, torch.cat(_first(cut.calibration, RECOVERY_IMAGES)).float())
    reconstruct(dense, pruned, kept, images, quiet=True, settle=False, start=start, dense_cache=dense_side)


def _divergence(logits: Sequence[torch.Tensor], images: _Images) -> float:
    """The summed KL divergence of ``logits`` from the dense model's on the scoring images."""
    return sum(kl_from_dense(d, p) for p, d in zip(logits, images.dense_logits, strict=True))


def _scored(pruned: nn.Module, images: _Images, cut: _Cut | None) -> list[torch.Tensor]:
    """``pruned``'s logits on the scoring images (run from the cut where there is one)."""
    device = next(pruned.parameters()).device
    pruned.eval()
    with _from_cut(pruned, cut) as feed, torch.no_grad(), autocast(device, images.bf16):
        return [pruned(x).float() for x, _ in feed(images.held_out, cut.held_out if cut else None)]


@contextmanager
def _from_cut(model: nn.Module, cut: _Cut | None):
    """A function that yields each batch's input, with the cut's cached output set for it when there is one."""
    if cut is None:
        yield lambda batches, cached: iter(batches)
        return

    with running_from(model, cut.name, cut.skipped) as holder:

        def feed(batches, cached):
            for batch, value in zip(batches, cached, strict=True):
                holder.value = value
                yield batch

        yield feed


def _cut_for(
    model: nn.Module, calls: dict[str, Call], members: set[str], images: _Images, previous: _Cut | None
) -> _Cut | None:
    """The latest verified cut before the group's first member, with its outputs cached (reused from
    ``previous`` when it is the same cut); None when no cut works or its cache would not fit in memory."""
    for name in candidate_cuts(model, calls, first_call(calls, members)):
        if previous is not None and previous.name == name:
            return previous
        first = images.held_out[0][0]
        skipped = verified(model, calls, name, first[:2])
        if skipped is None:
            continue
        per_image = capture(model, name, first[:1]).numel() * (2 if images.bf16 else 4)
        if per_image * sum(images.counts) > CACHE_BYTES:
            return None
        device = next(model.parameters()).device
        with torch.no_grad(), autocast(device, images.bf16):
            held = [capture(model, name, x) for x, _ in images.held_out]
            recal = [capture(model, name, x) for x in images.calibration]
        return _Cut(name, skipped, held, recal)
    return None


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


def _first(batches: Sequence[Any], n: int) -> list[Any]:
    """The first ``n`` images of ``batches`` (of tensors, or of (images, labels) pairs)."""
    kept, left = [], n
    for batch in batches:
        if left <= 0:
            break
        kept.append(tuple(t[:left] for t in batch) if isinstance(batch, tuple) else batch[:left])
        left -= len(batch[1] if isinstance(batch, tuple) else batch)
    return kept


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
