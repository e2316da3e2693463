"""How long a sensitivity scan will take, and the image counts that fit it in a time budget."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from .console import console, progress_bar
from .errors import UsageError
from .importance import make_importance
from .measure import autocast, bf16_supported
from .prefix import Call, candidate_cuts, first_call, trace_calls
from .pruning import prune_model
from .requests import PruneRequest
from .scan_tries import RECOVERY_IMAGES, cut_for, dense_pass, first_of, recover_try, scan_order
from .surgery import SurgeryError

RATIOS = (0.1, 0.3, 0.5, 0.7, 0.9)  # a scan's default grid, coarsened to every other over its budget
MIN_SCAN_IMAGES = 32  # a scan shrunk to its time budget still scores and recalibrates on this many


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


@dataclass
class ScanCost:
    """What a scan will take, from timings made before it starts: seconds per image through the dense
    model; each group's ``suffix``, the share of that time spent after its cut (the part a try runs);
    ``per_try``, a try's surgery and recovery; ``per_group``, the dense side of a group's recoveries, once
    for all its ratios; ``passes``, how often a try scores (twice when recovered: with the dense and
    with re-estimated BatchNorm statistics)."""

    per_image: float
    suffix: list[float]
    prefixes: float = 0.0  # the cuts' share of a pass: each distinct cut runs the images up to it once
    per_try: float = 0.0
    per_group: float = 0.0
    passes: int = 1

    def seconds(self, counts: tuple[int, int], ratios: int) -> float:
        """The whole scan on ``counts`` (scoring, BatchNorm) images and ``ratios`` ratios a group."""
        held_out, calibration = counts
        groups = len(self.suffix)
        tries = self.per_image * (self.passes * held_out + calibration) * sum(self.suffix)
        tries += self.per_try * groups
        cuts = self.per_image * (held_out + calibration) * self.prefixes
        return ratios * tries + cuts + self.per_group * groups + self.per_image * held_out  # + dense logits

    def fitted_counts(self, offered: tuple[int, int], ratios: int, seconds: float) -> tuple[int, int]:
        """Both image counts scaled alike so the scan fits ``seconds``, each rounded down to a power of two
        (never below ``MIN_SCAN_IMAGES`` where that many are offered): timings move with the machine's load,
        and without the rounding a busier run scanned on other images and planned another model (37 against
        39 scoring images on the few-shot EfficientNet-Lite1, benchmarks/results/fewshot.json)."""
        fixed = self.seconds((0, 0), ratios)
        scale = max(seconds - fixed, 0.0) / max(self.seconds(offered, ratios) - fixed, 1e-9)
        return tuple(min(n, _power_of_two_below(max(MIN_SCAN_IMAGES, int(n * scale)))) for n in offered)  # type: ignore[return-value]


def _power_of_two_below(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def timed_pass(
    model: nn.Module, held_out: Sequence[tuple[torch.Tensor, torch.Tensor]], groups: dict[str, set[str]]
) -> ScanCost:
    """The dense model's seconds per image at the scan's precision and batch size (its first scoring batch,
    up to 256 images: a 32-px ResNet-18 takes a third less per image at 250 than at 32, a 240-px
    EfficientNet-Lite1 more), and each group's suffix: the share of that pass's time spent in the calls
    after the group's latest possible cut (an estimate: the cut is verified only when the scan reaches it).
    Time, not MACs: a 224-px ResNet-50's early layers take a larger share of the time than of the MACs."""
    x = held_out[0][0][:256]
    device = next(model.parameters()).device
    durations: list[tuple[int, float]] = []
    with torch.no_grad(), autocast(device, device.type == "cuda" or bf16_supported()):
        model(x)  # warm-up at this batch size: the first call pays for kernel selection
        start = time.perf_counter()
        model(x)
        seconds = time.perf_counter() - start
        calls = trace_calls(model, x, durations)
    total = max(sum(d for _, d in durations), 1e-12)
    ends = []
    for members in groups.values():
        cuts = candidate_cuts(model, calls, first_call(calls, members), limit=1)
        ends.append(calls[cuts[0]].end if cuts else -1)
    after = {end: sum(d for tick, d in durations if tick > end) / total for end in set(ends)}
    # groups that share a cut share its cached outputs (the scan goes in call order): counted once
    prefixes = sum(1 - share for end, share in after.items() if end != -1)
    return ScanCost(seconds / len(x), [after[end] for end in ends], prefixes)


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def within_budget(
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
            timed = timed_pass(model, first_of(held_out, counts[0]), groups)
            cost = replace(timed, per_try=cost.per_try, per_group=cost.per_group, passes=cost.passes)
            counts = cost.fitted_counts(offered, len(ratios), seconds)
        held_out = first_of(held_out, counts[0])
        calibration = first_of(calibration, counts[1])
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
    order = scan_order(groups, calls)
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
    images = first_of(calibration, RECOVERY_IMAGES)
    probe = [(images[0][:2], torch.zeros(2, dtype=torch.long))]  # verifies the cut; only ``images`` cached
    cut = cut_for(model, calls, groups[root], dense_pass(model, probe, images, logits=False), None)
    dense_side: dict = {}
    taken = []
    for _ in range(2):  # the first time computes the dense side, the second reuses it as later ratios do
        timer = time.perf_counter()
        recover_try(model, pruned, report.kept, images, cut, dense_side)
        taken.append(time.perf_counter() - timer)
    return surgery + taken[1], max(taken[0] - taken[1], 0.0)
