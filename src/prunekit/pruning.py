"""Turning a pruning request (named layers, a uniform ratio, a MACs, params or latency target) into removed
channels: the groups come from ``groups.py``, the plan from ``planning.py`` (or the latency planner), the
surgery and its checks from ``surgery.py``; a target is then checked on the measured model, and every change
is undone when anything fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

from .errors import UsageError, arg, arg_values
from .groups import Group, collect_groups, tolerant_reshapes, validate_names
from .importance import ChannelImportance
from .measure import COUNTER_TOLERANCES, count_macs, count_params, macs_by_counters
from .modes import eval_mode
from .planning import (
    MIN_KEEP_FRACTION,
    WIDER_TOLERANCE,
    LayerCosts,
    default_allocation,
    plan_ratio,
    plan_target,
)
from .requests import PruneRequest
from .surgery import (
    KeptChannels,
    SurgeryError,
    apply_checked,
    kept_channels,
    output_shapes,
    restore,
    snapshot,
)


@dataclass
class PruneResult:
    model: nn.Module
    removed: dict[str, int]  # root layer -> channels removed
    changed_layers: list[dict[str, Any]]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    latency: dict[str, Any] | None = None  # what a latency target measured
    # the dense channel indices each pruned conv/linear kept, of its outputs (for recovery) and, in
    # ``kept.inputs``, of its inputs (the classifier's: for distillation's feature term)
    kept: KeptChannels = field(default_factory=lambda: KeptChannels({}, {}))


def prune_model(
    model: nn.Module,
    request: PruneRequest,
    importance: ChannelImportance,
    example: torch.Tensor,
) -> PruneResult:
    """Prune ``model`` in place as ``request`` says, scoring channels with ``importance`` (already calibrated).

    The request is validated and planned before the model changes; if the surgery breaks the model (it no
    longer runs, its output shape changes) or misses a target, every change is undone before the error.
    """
    request.validate()
    validate_names(model, request)
    if request.allocation is None:  # no images at hand at this level: the rule without a scan
        request.allocation = default_allocation(None, request.ratio, 0)
    with eval_mode(model), tolerant_reshapes():  # torch-pruning re-maps reshapes on every group query
        return _prune_planned(model, request, importance, example)


def _prune_planned(
    model: nn.Module, request: PruneRequest, importance: ChannelImportance, example: torch.Tensor
) -> PruneResult:
    from .checkpoint import module_shapes

    with torch.no_grad():
        expected = output_shapes(model(example))
    costs = LayerCosts(model, example)
    before = module_shapes(model)
    macs_before, params_before = int(sum(costs.macs.values())), costs.total_params
    latency = None
    if request.target_latency is not None:
        removed, latency, kept = _prune_to_latency(model, request, importance, example, expected)
    elif request.ratio is not None:
        DG, groups = collect_groups(model, example, importance, request)
        plan = plan_ratio(groups, request.ratio, request.round_to)
        kept = kept_channels(model, groups, plan)
        removed, _ = _surgery(model, request, importance, example, expected, DG, groups, plan)
    else:
        removed, kept = _prune_to_target(model, request, importance, example, expected, costs)
    after = module_shapes(model)
    changed = [
        {"layer": name, **{k: [before[name][k], v] for k, v in attrs.items() if before[name].get(k) != v}}
        for name, attrs in after.items()
        if name in before and attrs != before[name]
    ]
    return PruneResult(
        model=model,
        removed=removed,
        changed_layers=changed,
        macs_before=macs_before,
        macs_after=count_macs(model, example),
        params_before=params_before,
        params_after=count_params(model),
        latency=latency,
        kept=kept,
    )


def _prune_to_target(
    model: nn.Module,
    request: PruneRequest,
    importance: ChannelImportance,
    example: torch.Tensor,
    expected: Any,
    costs: LayerCosts,
) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """Plan and apply a MACs or params target, then check it on the measured model (not on the plan's
    estimate): params by prunekit's count, MACs by every counter of ``COUNTER_TOLERANCES``. Where only
    Torch-Pruning's counter misses, the plan is made again holding its estimate of that counter closer (a
    network copy and a count per try); any other miss undoes the surgery and is one error."""
    metric = "macs" if request.target_macs is not None else "params"
    target = request.target_macs if metric == "macs" else request.target_params
    count = (
        (lambda m: macs_by_counters(m, example))
        if metric == "macs"
        else (lambda m: {"prunekit": count_params(m)})
    )
    dense = _comparable(count(model))
    for attempt in range(3):
        # collected again each try: a surgery also edits torch-pruning's graph (its concat and split sizes),
        # which restoring the model's modules does not undo, so a graph from before a restore is stale
        DG, groups = collect_groups(model, example, importance, request)
        plan = plan_target(
            groups, costs, target, metric, request.round_to, request.allocation, request.sensitivity,
            WIDER_TOLERANCE / 2**attempt,
        )  # fmt: skip
        kept = kept_channels(model, groups, plan)
        removed, state = _surgery(model, request, importance, example, expected, DG, groups, plan)
        reached = {name: n / dense[name] for name, n in count(model).items() if dense.get(name)}
        misses = {n: r for n, r in reached.items() if abs(r - target) > COUNTER_TOLERANCES[n] * target}
        if not misses:
            return removed, kept
        restore(state)
        if set(misses) != {"torch_pruning"}:
            break
    if "prunekit" in misses:
        raise UsageError(
            f"{arg('target_' + metric)} {target}: the closest prunekit got is {misses['prunekit']:.3f} "
            f"(channel steps are too coarse here); try a nearby target or {arg('round_to')} 1"
        )
    name, ratio = next(iter(misses.items()))
    raise UsageError(
        f"{arg('target_macs')} {target}: prunekit's count reads {reached['prunekit']:.3f}, but {name}'s reads "
        f"{ratio:.3f}, more than {COUNTER_TOLERANCES[name]:.0%} off (it counts other operations); try a nearby "
        f"target or {arg('round_to')} 1"
    )


def _comparable(dense: dict[str, int]) -> dict[str, int]:
    """The counters whose reading of the dense model is comparable with prunekit's: a counter that reads
    far less misses layers it does not know (EfficientNet-Lite's padding convs, a subclass of Conv2d, are
    invisible to torchinfo and Torch-Pruning: 66 thousand and 30 million against 599 million MACs), and its
    ratio would say nothing about the plan."""
    ours = dense["prunekit"]
    return {name: n for name, n in dense.items() if name == "prunekit" or 0.9 * ours <= n <= 2 * ours}


def _surgery(
    model: nn.Module,
    request: PruneRequest,
    importance: ChannelImportance,
    example: torch.Tensor,
    expected: Any,
    DG: tp.DependencyGraph,
    groups: list[Group],
    plan: dict[str, torch.Tensor],
) -> tuple[dict[str, int], list]:
    """Apply ``plan`` and check the model still runs and computes the dense model minus those channels;
    returns (channels removed per group, the snapshot that undoes it). A broken model is restored first."""
    probe = torch.randn(example.shape, generator=torch.Generator().manual_seed(0)).to(example)
    state = snapshot(model)
    try:
        removed = apply_checked(model, DG, groups, plan, example, expected, probe, "the pruned model")
    except SurgeryError as exc:
        restore(state)
        bad = _culprits(model, example, probe, importance, request, plan, expected)
        if not bad:  # every group passes alone: only the combination fails, so no layer can be named
            raise UsageError(
                f"the pruned model breaks ({exc.reason}), though no pruned layer breaks it alone. The "
                f"{type(model).__name__} model is unchanged; try another target or {arg('round_to')}"
            ) from None
        raise UsageError(
            f"pruning {', '.join(bad)} breaks the model ({exc.reason}): its channels pass through an operation "
            f"the dependency graph does not see (padding, slicing or reshaping in forward). The "
            f"{type(model).__name__} model is unchanged; leave {'it' if len(bad) == 1 else 'them'} out with "
            f"{arg_values('ignore', bad)}"
        ) from None
    except BaseException:
        restore(state)
        raise
    return removed, state


def _culprits(
    model: nn.Module,
    example: torch.Tensor,
    probe: torch.Tensor,
    importance: ChannelImportance,
    request: PruneRequest,
    plan: dict[str, torch.Tensor],
    expected: Any,
) -> list[str]:
    """The groups whose removal alone breaks the model (each tried on its own and undone)."""
    bad = []
    for root, mask in plan.items():
        if not mask.any():
            continue
        state = snapshot(model)
        try:
            DG, groups = collect_groups(model, example, importance, request)
            group = [g for g in groups if g.root == root]
            apply_checked(model, DG, group, {root: mask}, example, expected, probe, root)
        except (SurgeryError, UsageError):
            bad.append(root)
        finally:
            restore(state)
    return bad


def _prune_to_latency(
    model: nn.Module,
    request: PruneRequest,
    importance: ChannelImportance,
    example: torch.Tensor,
    expected: Any,
) -> tuple[dict[str, int], dict[str, Any], dict[str, torch.Tensor]]:
    """Plan from the latency table, prune, and time the result against the dense model, until the measured
    latency lands within LATENCY_TOLERANCE of the target. The table's prediction is only a guide: the goal
    handed to the planner is re-aimed by each measurement, then bisected between a plan measured too fast and
    one measured too slow. The model is restored between tries and when no plan lands."""
    import copy

    from .latency_plan import (
        ATTEMPTS,
        LATENCY_TOLERANCE,
        LatencyPlanner,
        describe,
        missed,
        unreachable,
    )

    target = request.target_latency
    dense = copy.deepcopy(model)
    DG, groups = collect_groups(model, example, importance, request)
    planner = LatencyPlanner(
        model,
        example,
        groups,
        request.latency_runtime,
        request.latency_batch,
        torch.get_num_threads(),
        round_to=request.round_to,
        min_keep=MIN_KEEP_FRACTION,
    )
    smallest = planner.smallest()
    if smallest > target * (1 + LATENCY_TOLERANCE):
        raise unreachable(target, smallest, request.latency_runtime, request.latency_batch)
    goal, too_fast, too_slow = target, None, None  # goals whose plans measured below / above the target
    measured_plans: dict[tuple, float] = {}
    attempts: list[dict[str, Any]] = []
    for _ in range(4 * ATTEMPTS):  # most tries re-find a plan already measured and cost nothing
        plan, keep, predicted = planner.plan(goal, request.allocation, request.sensitivity)
        key = tuple(sorted(keep.items()))
        measured = measured_plans.get(key)
        if measured is None:
            if len(attempts) == ATTEMPTS:
                break
            if attempts:  # the restored modules get a fresh graph (same scores: the plan stands)
                DG, groups = collect_groups(model, example, importance, request)
                planner.groups = groups
            kept = kept_channels(model, groups, plan)
            removed, state = _surgery(model, request, importance, example, expected, DG, groups, plan)
            dense_ms, pruned_ms = planner.measure([dense, model])
            measured = measured_plans[key] = pruned_ms / dense_ms
            attempts.append(
                {
                    "goal": goal,
                    "predicted": predicted,
                    "dense_ms": dense_ms,
                    "pruned_ms": pruned_ms,
                    "measured": measured,
                }
            )
            if abs(measured - target) <= LATENCY_TOLERANCE * target:
                info = describe(planner, attempts)
                return removed, {**info, "target": target, "measured": measured, "kept": keep}, kept
            restore(state)
        if measured < target:
            too_fast = goal if too_fast is None else max(too_fast, goal)
        else:
            too_slow = goal if too_slow is None else min(too_slow, goal)
        if too_fast is not None and too_slow is not None:
            if too_slow - too_fast < 1e-4:
                break  # two neighbouring plans straddle the target: none lies between them
            goal = (too_fast + too_slow) / 2
        else:  # the table's error is assumed to scale: aim the prediction where the measurement should land
            goal = min(max(goal * target / measured, smallest), 1.0)
    raise missed(target, [a["measured"] for a in attempts], request.latency_runtime, request.latency_batch)
