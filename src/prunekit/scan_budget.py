"""How long a sensitivity scan will take, and the image counts that fit it in a time budget."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn as nn

from .errors import UsageError
from .measure import autocast, bf16_supported
from .planning import LayerCosts
from .prefix import Call, candidate_cuts

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


def suffix_fractions(
    model: nn.Module, calls: dict[str, Call], costs: LayerCosts, groups: dict[str, set[str]]
) -> list[float]:
    """For each group, the share of the dense MACs that runs after its latest possible cut (an estimate:
    the cut is verified only when the scan reaches it)."""
    names = {m: n for n, m in model.named_modules()}
    total = max(sum(costs.macs.values()), 1)
    fractions = []
    for members in groups.values():
        cuts = candidate_cuts(model, calls, first_call(calls, members), limit=1)
        end = calls[cuts[0]].end if cuts else -1
        after = sum(
            m for layer, m in costs.macs.items() if calls.get(names.get(layer, ""), Call(0, 0, 0)).start > end
        )
        fractions.append(after / total)
    return fractions


def estimate(
    per_image: float, counts: tuple[int, int], suffix: Sequence[float], ratios: int, per_try: float
) -> float:
    """Seconds for every try: its surgery, then the scoring and BatchNorm images run from its cut."""
    return (per_image * sum(counts) * sum(suffix) + per_try * len(suffix)) * ratios


def fitted_counts(
    offered: tuple[int, int],
    per_image: float,
    suffix: Sequence[float],
    ratios: int,
    per_try: float,
    seconds: float,
) -> tuple[int, int]:
    """Both image counts scaled alike so the scan's estimate fits ``seconds``, each rounded down to a power
    of two (never below ``MIN_SCAN_IMAGES`` where that many are offered): timings move with the machine's
    load, and without the rounding a busier run scanned on other images and planned another model (37
    against 39 scoring images on the few-shot EfficientNet-Lite1, benchmarks/results/fewshot.json)."""
    tries = per_try * len(suffix) * ratios
    data = estimate(per_image, offered, suffix, ratios, 0.0)
    scale = max(seconds - tries, 0.0) / max(data, 1e-9)
    return tuple(min(n, _power_of_two_below(max(MIN_SCAN_IMAGES, int(n * scale)))) for n in offered)  # type: ignore[return-value]


def _power_of_two_below(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def seconds_per_image(model: nn.Module, held_out: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """The dense model's time per image at the scan's precision, on (up to) 32 scoring images."""
    x = held_out[0][0][:32]
    device = next(model.parameters()).device
    with torch.no_grad(), autocast(device, device.type == "cuda" or bf16_supported()):
        model(x[:2])  # warm-up: the first call pays for kernel selection
        start = time.perf_counter()
        model(x)
    return (time.perf_counter() - start) / len(x)


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
