"""Planning to a latency budget: which channel counts are fast here, and which channels to give up for time.

From a latency table (``latency_table.py``) each group gets its *fast counts*: the candidate counts no larger
count beats in measured time (a count that is slower than a bigger one is never chosen). Channels are then
spread by the chosen allocation (global importance threshold, uniform ratio, or sensitivity), each group's
count snapped up to a fast one, until the latency predicted from the table meets the budget; the pruned model
is then timed to check it.
"""

from __future__ import annotations

import copy
import math
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import UsageError, arg
from .groups import lowest_channels, unit_size
from .latency_table import LatencyTable, LayerSpec, build_table, grid, layer_specs
from .measure import alternate, latency_repeats
from .planning import allocation_knob

LATENCY_TOLERANCE = 0.05  # the pruned model's measured latency must land within 5 % of the target
ATTEMPTS = 6  # pruned models timed at most, each plan re-aimed by what the previous ones measured


@dataclass
class Touch:
    layer: nn.Module
    is_out: bool
    channels: int  # of the layer's channels on that side that belong to the group


class LatencyPlanner:
    """Predicts a plan's latency from the table, and finds the least pruning an allocation needs to meet a budget."""

    def __init__(
        self,
        model: nn.Module,
        example: torch.Tensor,
        groups: list,
        runtime: str,
        batch: int,
        threads: int,
        round_to: int = 1,
        min_keep: float = 0.05,
        progress: bool = True,
    ):
        self.example, self.runtime, self.batch, self.threads = example, runtime, batch, threads
        self.specs = layer_specs(model, example)
        self.groups = groups
        self.touches: dict[str, list[Touch]] = {}
        needed: list[tuple[LayerSpec, str, int]] = [(s, "full", 1) for s in self.specs.values()]
        for g in groups:
            touches = [
                Touch(layer, is_out, len(root_idx))
                for layer, is_out, root_idx in g.members
                if layer in self.specs
            ]
            self.touches[g.root] = touches
            for t in touches:
                needed.append((self.specs[t.layer], "out" if t.is_out else "in", unit_size(g)))
        self.table: LatencyTable = build_table(
            needed, runtime, batch, threads, progress=progress, device=str(example.device)
        )
        self.dense_ms = self.measure([model])[0]
        self.layer_dense = {m: self.table.entries[s.key]["full"] for m, s in self.specs.items()}
        self.activations = {
            m: s.out_channels * s.output_hw[0] * s.output_hw[1] for m, s in self.specs.items()
        }
        # Time the layers alone do not explain (norms, activations, additions, the runtime's own overhead):
        # assumed to shrink with the output channels that carry it.
        self.other_ms = max(self.dense_ms - sum(self.layer_dense.values()), 0.0)
        self.fast = {g.root: self._fast_counts(g, round_to, min_keep) for g in groups}

    # ------------------------------------------------------------------ prediction

    def _layer_ms(self, layer: nn.Module, removed_in: float, removed_out: float) -> float:
        spec = self.specs[layer]
        return self.table.estimate(
            spec, round(spec.in_channels - removed_in), round(spec.out_channels - removed_out)
        )

    def predict(self, keep: dict[str, int]) -> float:
        """Predicted latency of the plan keeping ``keep[root]`` channels per group, as a fraction of dense."""
        removed_in: dict[nn.Module, float] = {}
        removed_out: dict[nn.Module, float] = {}
        for g in self.groups:
            frac = 1 - keep.get(g.root, g.channels) / g.channels
            for t in self.touches[g.root]:
                bucket = removed_out if t.is_out else removed_in
                bucket[t.layer] = bucket.get(t.layer, 0.0) + t.channels * frac
        layers = sum(self._layer_ms(m, removed_in.get(m, 0.0), removed_out.get(m, 0.0)) for m in self.specs)
        act_total = sum(self.activations.values()) or 1
        act_kept = sum(
            a * (1 - removed_out.get(m, 0.0) / max(self.specs[m].out_channels, 1))
            for m, a in self.activations.items()
        )
        return (layers + self.other_ms * act_kept / act_total) / (
            sum(self.layer_dense.values()) + self.other_ms
        )

    def _fast_counts(self, group, round_to: int, min_keep: float) -> list[int]:
        """Counts of the group no larger count beats in measured time (ascending; the full count last)."""
        unit = unit_size(group)
        floor = max(math.ceil(min_keep * group.channels), unit, round_to, 1)
        measured = set()  # the counts the table timed for the group's own channels
        for t in self.touches[group.root]:
            spec = self.specs[t.layer]
            if t.is_out and spec.out_channels == group.channels:
                measured |= set(self.table.entries[spec.key].get("out", {}))
        counts = [
            k
            for k in sorted(measured or grid(group.channels, unit))
            if k >= floor and (k % round_to == 0 or k == group.channels)
        ]
        ms = {k: self._group_ms(group, k) for k in counts}
        fast, best = [], math.inf
        for k in sorted(counts, reverse=True):
            if ms[k] < best:
                fast.append(k)
                best = ms[k]
        return sorted(fast)

    def _group_ms(self, group, keep: int) -> float:
        removed = group.channels - keep
        return sum(
            self._layer_ms(
                t.layer,
                0.0 if t.is_out else removed * t.channels / group.channels,
                removed * t.channels / group.channels if t.is_out else 0.0,
            )
            for t in self.touches[group.root]
        )

    # ------------------------------------------------------------------ allocation

    def smallest(self) -> float:
        """Predicted latency fraction with every group at its smallest fast count."""
        return self.predict({g.root: self.fast[g.root][0] for g in self.groups})

    def plan(
        self, goal: float, allocation: str = "global", sensitivity: dict[str, Any] | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, int], float]:
        """(plan, kept counts, predicted fraction): the least pruning ``allocation`` spreads (see
        ``planning.allocation_knob``) with predicted latency <= ``goal``, every group's count snapped up to its
        next fast count (which the table says costs no time). The knob is found by bisection."""
        counts, lo, hi = allocation_knob(self.groups, allocation, sensitivity)

        def keep_at(x: float) -> dict[str, int]:
            removing = counts(x)
            return {
                g.root: next(k for k in self.fast[g.root] if k >= g.channels - removing[g.root])
                for g in self.groups
            }

        best = keep_at(hi)
        for _ in range(50):
            mid = (lo + hi) / 2
            keep = keep_at(mid)
            if self.predict(keep) <= goal:
                hi, best = mid, keep
            else:
                lo = mid
        by_root = {g.root: g for g in self.groups}
        plan = {root: lowest_channels(by_root[root], by_root[root].channels - k) for root, k in best.items()}
        return plan, best, self.predict(best)

    # ------------------------------------------------------------------ measurement

    def measure(self, models: list[nn.Module], repeats: int | None = None) -> list[float]:
        """Median milliseconds of a forward pass of each model at the planner's batch, timed in alternation."""
        return time_models(models, self.example, self.batch, self.runtime, self.threads, repeats)


def time_models(
    models: list[nn.Module],
    example: torch.Tensor,
    batch: int,
    runtime: str,
    threads: int,
    repeats: int | None = None,
) -> list[float]:
    """Median milliseconds per forward pass of each model (copies of them: the originals are not touched)."""
    repeats = latency_repeats(repeats)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if runtime == "onnxruntime":
            return _time_onnxruntime(models, example, batch, threads, repeats)
        x = torch.randn(batch, *example.shape[1:], device=example.device)
        x = x.contiguous(memory_format=torch.channels_last)
        copies = [copy.deepcopy(m).eval().to(memory_format=torch.channels_last) for m in models]
        sync = torch.cuda.synchronize if example.device.type == "cuda" else (lambda: None)
        with torch.no_grad():
            times = alternate([lambda m=m: (m(x), sync()) for m in copies], repeats, warmup=3)
        return [statistics.median(t) * 1e3 for t in times]
    finally:
        torch.set_num_threads(previous)


def _time_onnxruntime(
    models: list[nn.Module], example: torch.Tensor, batch: int, threads: int, repeats: int
) -> list[float]:
    import numpy as np

    from .deploy import ort_times, write_onnx

    x = np.random.default_rng(0).standard_normal((batch, *example.shape[1:]), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [
            write_onnx(copy.deepcopy(m), example, Path(tmp) / f"m{i}.onnx") for i, m in enumerate(models)
        ]
        return [statistics.median(t) * 1e3 for t in ort_times(paths, x, threads, repeats)]


def unreachable(target: float, smallest: float, runtime: str, batch: int) -> UsageError:
    return UsageError(
        f"{arg('target_latency')} {target} cannot be reached in {runtime} at batch {batch}: with every prunable "
        f"layer at its smallest fast channel count the model is predicted at {smallest:.3f} of the dense "
        f"latency (the rest is layers prunekit leaves whole and the runtime's fixed cost); ask for more, "
        f"or a larger {arg('latency_batch')}"
    )


def missed(target: float, measured: list[float], runtime: str, batch: int) -> UsageError:
    below = [m for m in measured if m < target]
    above = [m for m in measured if m > target]
    closest = " and ".join(
        f"{m:.3f}" for m in ([max(below)] if below else []) + ([min(above)] if above else [])
    )
    return UsageError(
        f"{arg('target_latency')} {target}: no plan landed within {LATENCY_TOLERANCE:.0%} of it in {runtime} at "
        f"batch {batch}; the closest measured were {closest} of the dense latency (channel counts that are fast "
        f"here come in steps, and timings vary with the machine's load). The model is unchanged; ask for "
        f"one of those"
    )


def describe(planner: LatencyPlanner, attempts: list[dict[str, Any]]) -> dict[str, Any]:
    """What a latency-targeted prune measured, for its report."""
    return {
        "runtime": planner.runtime,
        "batch": planner.batch,
        "threads": planner.threads,
        "device": planner.table.device,
        "dense_ms": planner.dense_ms,
        "attempts": attempts,
        "fast_counts": planner.fast,
    }
