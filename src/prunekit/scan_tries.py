"""One try of a sensitivity scan: a group pruned in a copy of the model, run from a cut whose outputs are
cached, optionally recovered, re-estimated and scored against the dense model's predictions."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .batchnorm import recalibrate_batchnorm
from .divergence import kl_from_dense
from .importance import make_importance
from .measure import autocast, bf16_supported
from .prefix import Call, Start, candidate_cuts, capture, first_call, running_from, verified
from .pruning import prune_model
from .reconstruct import reconstruct
from .requests import PruneRequest

CACHE_BYTES = 4 << 30  # a cut's cached outputs stay below this; past it, tries run the whole model
RECOVERY_IMAGES = 64  # a recovered try (scan_recovery) re-fits on the first this many BatchNorm images


@dataclass
class Images:
    """The scan's images: scoring batches with labels and the dense model's logits, BatchNorm batches."""

    held_out: list[tuple[torch.Tensor, torch.Tensor]]
    calibration: list[torch.Tensor]
    dense_logits: list[torch.Tensor]
    bf16: bool

    @property
    def counts(self) -> tuple[int, int]:
        return sum(len(y) for _, y in self.held_out), sum(len(x) for x in self.calibration)


@dataclass
class Cut:
    """Where a group's tries start: the cut's cached outputs for every scoring and BatchNorm batch."""

    name: str
    skipped: list[str]
    held_out: list[torch.Tensor]
    calibration: list[torch.Tensor]


def dense_pass(
    model: nn.Module,
    held_out: Sequence[tuple[torch.Tensor, torch.Tensor]],
    calibration: Sequence[torch.Tensor],
    logits: bool = True,
) -> Images:
    """The dense model's logits on the scoring images (without ``logits``: none), at the precision every try
    will run at."""
    device = next(model.parameters()).device
    bf16 = device.type == "cuda" or bf16_supported()
    with torch.no_grad(), autocast(device, bf16):
        dense = [model(x).float() for x, _ in held_out] if logits else []
    return Images(list(held_out), list(calibration), dense, bf16)


def top1(logits: Sequence[torch.Tensor], held_out: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    hits = sum(
        int((lg.argmax(1) == y.to(lg.device)).sum()) for lg, (_, y) in zip(logits, held_out, strict=True)
    )
    return hits / max(sum(len(y) for _, y in held_out), 1)


def point(
    model: nn.Module,
    example: torch.Tensor,
    root: str,
    ratio: float,
    importance: str,
    images: Images,
    cut: Cut | None,
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
        recover_try(model, pruned, report.kept, images.calibration, cut, dense_side)
        recovered = scored(pruned, images, cut)
    with from_cut(pruned, cut) as feed, torch.no_grad(), autocast(device, images.bf16):
        recalibrate_batchnorm(pruned, feed(images.calibration, cut.calibration if cut else None))
    # with recover, as recovery does: the statistics that leave the model closer to the dense one
    tried = [scored(pruned, images, cut), *([recovered] if dense_side is not None else [])]
    kl, logits = min(((divergence(lg, images), lg) for lg in tried), key=lambda c: c[0])
    return (
        top1(logits, images.held_out),
        kl / max(images.counts[0], 1),
        report.macs_before - report.macs_after,
    )


def recover_try(
    dense: nn.Module,
    pruned: nn.Module,
    kept: dict[str, torch.Tensor],
    calibration: Sequence[torch.Tensor],
    cut: Cut | None = None,
    dense_side: dict | None = None,
) -> None:
    """A try's recovery: ``pruned``'s readers of what was removed re-fitted on the first BatchNorm images,
    both passes run from the cut where there is one (the dense pass once for the tries sharing
    ``dense_side``). The BatchNorm statistics are left to the try, which re-estimates them after the cut
    only (the prefix its cached outputs stand for must stay the dense model's)."""
    images = first_of(calibration, RECOVERY_IMAGES)
    start = None
    if cut is not None:  # cached at the scan's precision; recovery runs in float32
        start = Start(cut.name, cut.skipped, torch.cat(first_of(cut.calibration, RECOVERY_IMAGES)).float())
    reconstruct(dense, pruned, kept, images, quiet=True, settle=False, start=start, dense_cache=dense_side)


def divergence(logits: Sequence[torch.Tensor], images: Images) -> float:
    """The summed KL divergence of ``logits`` from the dense model's on the scoring images."""
    return sum(kl_from_dense(d, p) for p, d in zip(logits, images.dense_logits, strict=True))


def scored(pruned: nn.Module, images: Images, cut: Cut | None) -> list[torch.Tensor]:
    """``pruned``'s logits on the scoring images (run from the cut where there is one)."""
    device = next(pruned.parameters()).device
    pruned.eval()
    with from_cut(pruned, cut) as feed, torch.no_grad(), autocast(device, images.bf16):
        return [pruned(x).float() for x, _ in feed(images.held_out, cut.held_out if cut else None)]


@contextmanager
def from_cut(model: nn.Module, cut: Cut | None):
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


def cut_for(
    model: nn.Module, calls: dict[str, Call], members: set[str], images: Images, previous: Cut | None
) -> Cut | None:
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
        return Cut(name, skipped, held, recal)
    return None


def scan_order(groups: dict[str, set[str]], calls: dict[str, Call]) -> list[str]:
    """The groups in the order a scan tries them, the order their first members run (so cuts are reused)."""
    return sorted(groups, key=lambda r: first_call(calls, groups[r]))


def first_of(batches: Sequence[Any], n: int) -> list[Any]:
    """The first ``n`` images of ``batches`` (of tensors, or of (images, labels) pairs)."""
    kept, left = [], n
    for batch in batches:
        if left <= 0:
            break
        kept.append(tuple(t[:left] for t in batch) if isinstance(batch, tuple) else batch[:left])
        left -= len(batch[1] if isinstance(batch, tuple) else batch)
    return kept
