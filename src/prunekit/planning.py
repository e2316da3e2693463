"""Plans: how many channels each group loses. A ratio removes the same share everywhere; a MACs or params
target is priced analytically from per-layer costs, so the allocation's knob is found by bisection without
trial surgery (the result is measured on the pruned model afterwards, in ``pruning.py``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from .errors import UsageError, arg
from .groups import Group, is_depthwise, lowest_channels, unit_size
from .measure import count_params, forward_with_hooks, layer_macs
from .modes import eval_mode

TOLERANCE = 0.02  # a target is met when the measured figure is within 2 % of it
# Plans aim closer, so the target also holds by counters that count more than convs and linears
# (torchinfo's mult-adds, Torch-Pruning's count_ops_and_params: BatchNorm, biases).
PLAN_TOLERANCE = TOLERANCE / 2
# Torch-Pruning's counter also counts the elementwise work after each layer; a MACs target holds by it within
# 3 %, so plans aim within 2 % of it by prunekit's estimate of that work.
WIDER_TOLERANCE = 0.02


MIN_KEEP_FRACTION = 0.05  # global targets never shrink a group below 5 % of its channels


class LayerCosts:
    """Per-layer MACs and parameters of the dense model, to price a plan without doing the surgery."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        self.macs: dict[nn.Module, int] = {}
        self.order: list[nn.Module] = []

        def hook(module, inputs, output):
            self.order.append(module)
            self.macs[module] = layer_macs(module, output)

        forward_with_hooks(model, example, hook)
        self.total_params = count_params(model)
        self.elementwise = elementwise_work(model, example)

    def priced(self, groups: list[Group], removed: dict[str, torch.Tensor]) -> tuple[float, float]:
        """(MACs, params) after removing ``removed[root]`` (a bool mask over root channels) from each group."""
        out_rm, in_rm = _removed_channels(groups, removed)
        macs = float(sum(self.macs.values()))
        params = float(self.total_params)
        for layer in set(out_rm) | set(in_rm):
            if isinstance(layer, nn.Parameter):  # a bare parameter (a layer scale, a class token)
                removed_here = out_rm.get(layer, 0.0) + in_rm.get(layer, 0.0)
                params -= removed_here * layer.numel() / max(layer.shape)  # pruned along its longest dim
                continue
            fo, fi = _fractions(layer, out_rm.get(layer, 0.0), in_rm.get(layer, 0.0))
            if is_depthwise(layer):  # torch-pruning shrinks a depthwise conv's ins and outs together
                fo = fi = min(fo, fi)
            scale = fo if is_depthwise(layer) else fo * fi
            if layer in self.macs:
                macs -= self.macs[layer] * (1 - scale)
            for name, p in layer.named_parameters(recurse=False):
                kept = scale if (name == "weight" and p.dim() > 1) else fo
                params -= p.numel() * (1 - kept)
        return macs, params

    def priced_with_elementwise(self, groups: list[Group], removed: dict[str, torch.Tensor]) -> float:
        """MACs plus the elementwise work after each layer (``elementwise``) once ``removed`` is pruned: the
        figure Torch-Pruning's ``count_ops_and_params`` reads, to within what that estimate leaves out."""
        out_rm, in_rm = _removed_channels(groups, removed)
        work = self.priced(groups, removed)[0] + float(sum(self.elementwise.values()))
        for layer, elements in self.elementwise.items():
            fo, fi = _fractions(layer, out_rm.get(layer, 0.0), in_rm.get(layer, 0.0))
            work -= elements * (1 - (min(fo, fi) if is_depthwise(layer) else fo))
        return work


def _removed_channels(
    groups: list[Group], removed: dict[str, torch.Tensor]
) -> tuple[dict[nn.Module, float], dict[nn.Module, float]]:
    """Channels each layer loses on its output side and on its input side when ``removed`` is applied."""
    out_rm: dict[nn.Module, float] = {}
    in_rm: dict[nn.Module, float] = {}
    for g in groups:
        mask = removed.get(g.root)
        if mask is None or not mask.any():
            continue
        for layer, is_out, root_idx in g.members:
            n = float(mask[root_idx].sum())
            bucket = out_rm if is_out else in_rm
            bucket[layer] = bucket.get(layer, 0.0) + n
    return out_rm, in_rm


# The elementwise modules Torch-Pruning's counter counts (one operation per element): activations on their
# output, pooling on its input.
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.PReLU, nn.ELU, nn.LeakyReLU, nn.GELU)
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)
CHANNEL_LAYERS = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d)


@torch.no_grad()
def elementwise_work(model: nn.Module, example: torch.Tensor) -> dict[nn.Module, int]:
    """Per image, the elementwise operations Torch-Pruning's count_ops_and_params adds to MACs, by the layer
    whose output channels they run over: a conv's or linear's bias, a BatchNorm (two per element), and the
    activations and pooling that read that output (one per element). Work after an addition is left out."""
    work: dict[nn.Module, int] = {}
    produced: dict[int, tuple[torch.Tensor, nn.Module]] = {}  # the tensor is kept so its id stays unique

    def hook(module, inputs, output):
        if not isinstance(output, torch.Tensor):
            return
        if isinstance(module, ACTIVATIONS + POOLS):
            source = produced.get(id(inputs[0])) if inputs else None
            if source is None or source[0] is not inputs[0]:
                return
            elements = (output if isinstance(module, ACTIVATIONS) else inputs[0])[0].numel()
            work[source[1]] = work.get(source[1], 0) + elements
            produced[id(output)] = (output, source[1])
            return
        batchnorm = isinstance(module, nn.modules.batchnorm._BatchNorm)
        per_element = 2 if batchnorm else int(getattr(module, "bias", None) is not None)
        work[module] = work.get(module, 0) + per_element * output[0].numel()
        produced[id(output)] = (output, module)

    kinds = ACTIVATIONS + POOLS + CHANNEL_LAYERS
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    with eval_mode(model, handles):
        model(example)
    return work


def _fractions(layer: nn.Module, out_removed: float, in_removed: float) -> tuple[float, float]:
    out_ch = (
        getattr(layer, "out_channels", None)
        or getattr(layer, "out_features", None)
        or getattr(layer, "num_features", None)
        or getattr(layer, "num_channels", None)
        or 1
    )
    in_ch = getattr(layer, "in_channels", None) or getattr(layer, "in_features", None) or 1
    return 1 - out_removed / out_ch, 1 - in_removed / in_ch


def round_removal(channels: int, remove: int, round_to: int) -> int:
    """Channels to remove so the kept count is a multiple of ``round_to`` (nearest, not zero if possible)."""
    if round_to <= 1:
        return remove
    keep = channels - remove
    keep = int(round(keep / round_to)) * round_to
    return channels - min(keep, channels)


def plan_ratio(groups: list[Group], ratio: float, round_to: int) -> dict[str, torch.Tensor]:
    """Remove ``int(C * ratio)`` lowest-scored channels from every group (the blog's rounding)."""
    plan = {}
    for g in groups:
        n = round_removal(g.channels, int(g.channels * ratio), round_to)
        if n >= g.channels:
            raise UsageError(
                f"{arg('ratio')} {ratio} with {arg('round_to')} {round_to} would remove every one of the "
                f"{g.channels} channels of {g.root}; use a smaller ratio or {arg('round_to')}"
            )
        plan[g.root] = lowest_channels(g, n)
    return plan


ALLOCATIONS = ("global", "uniform", "sensitivity")


SENSITIVITY_FROM = 500  # images at hand from which a target's default allocation is a sensitivity scan


def default_allocation(allocation: str | None, ratio: float | None, images_at_hand: int | None) -> str:
    """The default allocation, on the command line and in Python alike: ``sensitivity`` for a target when at
    least ``SENSITIVITY_FROM`` images are at hand (the training split; ``calibration=`` in Python; None:
    uncounted, taken as enough), ``global`` for a ratio or fewer images. ``sensitivity`` (its scan read by
    the divergence from the dense model) kept the most accuracy on 50,000 CIFAR-10 images
    (benchmarks/results/allocation.json, recovery.json) and on 512 unlabelled images of a pretrained
    EfficientNet-Lite1 (fewshot.json, its held-out images); fewer images were not measured."""
    if allocation is not None:
        return allocation
    if ratio is not None or images_at_hand == 0:
        return "global"
    return "sensitivity" if images_at_hand is None or images_at_hand >= SENSITIVITY_FROM else "global"


def allocation_note(allocation: str | None, ratio: float | None, images_at_hand: int | None) -> str | None:
    """One line when the default allocation is ``global`` because too few images are at hand, else None."""
    if allocation is not None or ratio is not None or images_at_hand is None:
        return None
    if not 0 < images_at_hand < SENSITIVITY_FROM:
        return None
    return (
        f"allocation global (the default below {SENSITIVITY_FROM:,} images; {images_at_hand:,} at hand): "
        f"too few to scan; {arg('allocation')} sensitivity scans anyway"
    )


def plan_target(
    groups: list[Group],
    costs: LayerCosts,
    target: float,
    metric: str,
    round_to: int,
    allocation: str = "global",
    sensitivity: dict[str, Any] | None = None,
    wider_tolerance: float = WIDER_TOLERANCE,
) -> dict[str, torch.Tensor]:
    """A plan whose priced metric meets ``target``, channels spread across groups by ``allocation``:

    - ``global``: one threshold on normalized importance scores, network-wide;
    - ``uniform``: one ratio for every group (Torch-Pruning's README recipe);
    - ``sensitivity``: every group pruned as far as its measured sensitivity curve predicts a loss of at most
      one common budget, so no group is pushed past the accuracy the others give up.

    Each has one knob, monotone in what it removes, found by bisection on the analytic price. A MACs plan
    must also hold by counters that add the elementwise work after each layer (Torch-Pruning's), within
    ``wider_tolerance``: where it does not (depthwise networks pruned hard keep a larger share of that work
    than of their MACs), the allocation is tilted, step by step, towards the groups whose channels carry
    most of it, until it does.
    """
    dense_macs, dense_params = costs.priced(groups, {})
    base = dense_macs if metric == "macs" else dense_params
    plan = _bisect_plan(groups, costs, target, metric, round_to, allocation, sensitivity, 0.0, strict=True)
    if metric != "macs":
        return plan
    dense_work = costs.priced_with_elementwise(groups, {})
    candidates = []
    for tilt in TILTS:
        if tilt:
            plan = _bisect_plan(groups, costs, target, metric, round_to, allocation, sensitivity, tilt)
        if plan is None:
            continue
        off = abs(costs.priced_with_elementwise(groups, plan) / dense_work / target - 1)
        reached = abs(costs.priced(groups, plan)[0] / base / target - 1)
        if off <= wider_tolerance and reached <= TOLERANCE:
            return plan
        candidates.append((max(off - wider_tolerance, reached - TOLERANCE), plan))
    return min(candidates, key=lambda c: c[0])[1]


# Tilts tried in turn when a MACs plan misses by a counter of elementwise work: 0 is the allocation as it is.
TILTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def _bisect_plan(
    groups: list[Group],
    costs: LayerCosts,
    target: float,
    metric: str,
    round_to: int,
    allocation: str,
    sensitivity: dict[str, Any] | None,
    tilt: float,
    strict: bool = False,
) -> dict[str, torch.Tensor] | None:
    """The ``allocation`` plan (tilted by ``tilt``) whose priced ``metric`` is nearest ``target``; None when
    even the smallest plan misses it (a UsageError instead when ``strict``)."""
    dense_macs, dense_params = costs.priced(groups, {})
    base = dense_macs if metric == "macs" else dense_params
    goal = target * base

    def limit(g: Group) -> int:
        keep = max(round_to, math.ceil(MIN_KEEP_FRACTION * g.channels), unit_size(g), 1)
        return max(g.channels - keep, 0)

    def plan_removing(counts: dict[str, int]) -> dict[str, torch.Tensor]:
        return {
            g.root: lowest_channels(
                g, min(round_removal(g.channels, min(counts[g.root], limit(g)), round_to), limit(g))
            )
            for g in groups
        }

    factors = elementwise_tilt(groups, costs, tilt) if tilt else None
    counts, lo, hi = allocation_knob(groups, allocation, sensitivity, factors)
    knob = lambda x: plan_removing(counts(x))

    def value(plan) -> float:
        macs, params = costs.priced(groups, plan)
        return macs if metric == "macs" else params

    smallest = value(knob(hi))
    if smallest > goal * (1 + TOLERANCE):
        if not strict:
            return None
        raise UsageError(
            f"{arg('target_' + metric)} {target} cannot be reached with {allocation} allocation: pruning every "
            f"prunable layer to its minimum ({MIN_KEEP_FRACTION:.0%} of channels) leaves {smallest / base:.3f} "
            f"of the dense {metric}"
        )
    best = knob(hi)
    closest = (abs(smallest - goal), best)  # where channel steps are coarse, the nearest plan on either side
    for _ in range(60):
        mid = (lo + hi) / 2
        plan = knob(mid)
        v = value(plan)
        if abs(v - goal) <= PLAN_TOLERANCE * goal:
            return plan
        closest = min(closest, (abs(v - goal), plan), key=lambda c: c[0])
        if v > goal:
            lo = mid
        else:
            hi, best = mid, plan
    return closest[1] if closest[0] <= TOLERANCE * goal else best


def elementwise_tilt(groups: list[Group], costs: LayerCosts, tilt: float) -> dict[str, float]:
    """Per group, how much harder to prune it (1: as the allocation says): ``tilt`` raises the share of
    elementwise work in what one of its channels costs, relative to the mean share over groups."""
    dense = costs.priced(groups, {})[0]
    dense_work = costs.priced_with_elementwise(groups, {})
    share = {}
    for g in groups:
        one = {g.root: torch.arange(g.channels) == 0}
        macs = dense - costs.priced(groups, one)[0]
        work = dense_work - costs.priced_with_elementwise(groups, one)
        share[g.root] = max(work - macs, 0.0) / work if work > 0 else 0.0
    mean = sum(share.values()) / max(len(share), 1)
    if mean <= 0:
        return {g.root: 1.0 for g in groups}
    return {root: ((s + mean) / (2 * mean)) ** tilt for root, s in share.items()}


def allocation_knob(
    groups: list[Group],
    allocation: str,
    sensitivity: dict[str, Any] | None,
    factors: dict[str, float] | None = None,
) -> tuple[Callable[[float], dict[str, int]], float, float]:
    """``allocation`` as one knob: (channels to remove per group at a knob value, lowest, highest value),
    monotone in what it removes, so any budget is met by bisection on the knob. ``factors`` (per group, 1
    when absent) make a group that much easier to prune: its scores divided, its ratio or budget scaled."""
    f = {g.root: (factors or {}).get(g.root, 1.0) for g in groups}
    stretch = 1 / min(f.values(), default=1.0)
    if allocation == "global":
        normalized = {g.root: g.scores / g.scores.abs().mean().clamp_min(1e-12) for g in groups}
        scaled = {r: torch.where(s >= 0, s / f[r], s * f[r]) for r, s in normalized.items()}
        lo = min(float(s.min()) for s in scaled.values()) - 1
        hi = max(float(s.max()) for s in scaled.values()) + 1
        return lambda t: {g.root: int((scaled[g.root] < t).sum()) for g in groups}, lo, hi
    if allocation == "uniform":
        return lambda r: {g.root: int(g.channels * min(r * f[g.root], 1.0)) for g in groups}, 0.0, stretch
    if allocation == "sensitivity":
        curves, worst = _loss_curves(groups, sensitivity)
        # the knob is a budget of loss (points of accuracy, or hundredths of a nat of divergence)
        return (
            lambda budget: {g.root: int(g.channels * curves[g.root](budget * f[g.root])) for g in groups},
            -1.0,
            (worst + 1) * stretch,
        )
    raise UsageError(f"{arg('allocation')} must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")


def _loss_curves(
    groups: list[Group], sensitivity: dict[str, Any] | None
) -> tuple[dict[str, Callable[[float], float]], float]:
    """For each group, the largest ratio whose measured loss (made non-decreasing) stays within a budget,
    interpolated between the scanned ratios; groups the scan lacks are not pruned. The loss is the scan's
    ``loss``: divergence from the dense model ("kl", x100) or points of accuracy (older scans); with the
    largest loss any curve reaches."""
    if not sensitivity or "groups" not in sensitivity:
        raise UsageError(f"{arg('allocation')} sensitivity needs a sensitivity scan (prunekit sensitivity)")
    ratios = [0.0, *sensitivity["ratios"]]
    by_kl = sensitivity.get("loss") == "kl"
    dense = sensitivity["dense_accuracy"]
    curves, highest = {}, 100.0
    for g in groups:
        row = sensitivity["groups"].get(g.root)
        if not row or "accuracy" not in row or (by_kl and "kl" not in row):
            curves[g.root] = lambda budget: 0.0
            continue
        measured = (
            [kl * 100 for kl in row["kl"]] if by_kl else [(dense - acc) * 100 for acc in row["accuracy"]]
        )
        losses, worst = [0.0], 0.0
        for ratio, loss in zip(sensitivity["ratios"], measured, strict=True):
            # Non-decreasing, plus a tiny slope: flat or noisy curves still give a continuous knob.
            worst = max(worst, loss)
            losses.append(worst + 0.01 * ratio)
        highest = max(highest, losses[-1])

        def ratio_within(budget: float, losses=losses) -> float:
            if budget < 0:
                return 0.0
            for i in range(1, len(ratios)):
                if losses[i] > budget:  # interpolate inside the segment that crosses the budget
                    span = losses[i] - losses[i - 1]
                    frac = (budget - losses[i - 1]) / span if span > 0 else 0.0
                    return ratios[i - 1] + frac * (ratios[i] - ratios[i - 1])
            return ratios[-1]

        curves[g.root] = ratio_within
    return curves, highest
