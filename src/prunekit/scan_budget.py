"""How long a sensitivity scan will take, and the image counts that fit it in a time budget."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from .errors import UsageError
from .measure import autocast, bf16_supported
from .prefix import Call, candidate_cuts, trace_calls

MIN_SCAN_IMAGES = 32  # a scan shrunk to its time budget still scores and recalibrates on this many


def first_call(calls: dict[str, Call], members: set[str]) -> int:
    """The call index at which the first of ``members`` runs (0 when none ran)."""
    starts = [calls[m].start for m in members if m in calls]
    return min(starts) if starts else 0


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
