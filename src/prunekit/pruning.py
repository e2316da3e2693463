"""Turning a pruning request (named layers, a uniform ratio, a MACs or params target) into removed channels.

torch-pruning's dependency graph finds every layer coupled to a set of channels (a *group*); a criterion
from ``importance.py`` scores the group's channels; this module decides how many channels each group loses
(a *plan*) and lets torch-pruning do the surgery. For targets, the plan's MACs and parameters are computed
analytically from per-layer costs, so the global threshold is found by bisection without trial surgery; the
result is then measured on the pruned model.
"""

from __future__ import annotations

import contextlib
import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.pruner import function

from .errors import UsageError, arg, arg_values
from .importance import ChannelImportance
from .measure import count_macs, count_params, forward_with_hooks, layer_macs

TOLERANCE = 0.02  # a target is met when the measured figure is within 2 % of it
MIN_KEEP_FRACTION = 0.05  # global targets never shrink a group below 5 % of its channels

_OUT_FNS = (
    function.prune_conv_out_channels,
    function.prune_linear_out_channels,
    function.prune_batchnorm_out_channels,
    function.prune_layernorm_out_channels,
    function.prune_groupnorm_out_channels,
)


@dataclass
class PruneRequest:
    """What to prune: ``layers`` by name (each by ``ratio``), or every prunable layer by ``ratio``, or a target."""

    layers: list[str] = field(default_factory=list)
    ratio: float | None = None
    target_macs: float | None = None
    target_params: float | None = None
    target_latency: float | None = None  # fraction of the dense model's latency measured on this device
    latency_batch: int = 64
    latency_runtime: str = "pytorch"
    ignore: list[str] = field(default_factory=list)
    prune_input_conv: bool = False  # the input conv (and what is coupled to it) is protected by default
    round_to: int = 1
    allocation: str = "global"  # how a target is spread across groups (see plan_target)
    sensitivity: dict[str, Any] | None = None  # a sensitivity scan, for allocation "sensitivity"

    def validate(self) -> None:
        modes = [
            self.ratio is not None,
            self.target_macs is not None,
            self.target_params is not None,
            self.target_latency is not None,
        ]
        if sum(modes) != 1:
            raise UsageError(
                f"give exactly one of {arg('ratio')}, {arg('target_macs')}, {arg('target_params')}, "
                f"{arg('target_latency')}"
            )
        if self.layers and self.ratio is None:
            raise UsageError(
                f"{arg('layers')} takes a {arg('ratio')} (a target applies to the whole network)"
            )
        from .options import validate

        validate(
            vars(self),
            (
                "ratio",
                "target_macs",
                "target_params",
                "target_latency",
                "latency_batch",
                "latency_runtime",
                "round_to",
                "layers",
                "ignore",
                "allocation",
                "prune_input_conv",
            ),
        )
        if self.allocation == "sensitivity" and self.ratio is not None:
            raise UsageError(
                f"{arg('allocation')} sensitivity spreads a target; give {arg('target_macs')}, "
                f"{arg('target_params')} or {arg('target_latency')}"
            )


@dataclass
class Group:
    """One prunable set of coupled channels: its root layer, scores, and every layer it touches."""

    root: str
    module: nn.Module
    handler: Callable
    channels: int
    scores: torch.Tensor
    members: list[tuple[nn.Module, bool, torch.Tensor]]  # (layer, out-channel side?, root index per channel)
    layer_idxs: list[torch.Tensor] = field(default_factory=list)  # each member's own channel indices
    # Where the channels pass through a grouped conv: the removal unit of each root channel. A unit holds
    # one channel per conv group at the same position, so removing whole units keeps every group equal.
    units: torch.Tensor | None = None


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

    def priced(self, groups: list[Group], removed: dict[str, torch.Tensor]) -> tuple[float, float]:
        """(MACs, params) after removing ``removed[root]`` (a bool mask over root channels) from each group."""
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
        macs = float(sum(self.macs.values()))
        params = float(self.total_params)
        for layer in set(out_rm) | set(in_rm):
            if isinstance(layer, nn.Parameter):  # a bare parameter (a layer scale, a class token)
                removed_here = out_rm.get(layer, 0.0) + in_rm.get(layer, 0.0)
                params -= removed_here * layer.numel() / max(layer.shape)  # pruned along its longest dim
                continue
            fo, fi = _fractions(layer, out_rm.get(layer, 0.0), in_rm.get(layer, 0.0))
            if _is_depthwise(layer):  # torch-pruning shrinks a depthwise conv's ins and outs together
                fo = fi = min(fo, fi)
            scale = fo if _is_depthwise(layer) else fo * fi
            if layer in self.macs:
                macs -= self.macs[layer] * (1 - scale)
            for name, p in layer.named_parameters(recurse=False):
                kept = scale if (name == "weight" and p.dim() > 1) else fo
                params -= p.numel() * (1 - kept)
        return macs, params


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


def _is_depthwise(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and layer.groups > 1 and layer.groups == layer.in_channels


def _is_grouped(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and layer.groups > 1 and not _is_depthwise(layer)


def forward_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of conv and linear layers in the order a forward pass calls them."""
    names = {m: n for n, m in model.named_modules()}
    return [names[m] for m in LayerCosts(model, example).order]


def output_layer(model: nn.Module, example: torch.Tensor) -> str:
    """The conv/linear whose output the model returns (its channels are classes): found by tracing, not guessed.

    When the returned tensor is not any layer's own output (e.g. flattened after a 1x1 conv classifier), the
    last conv/linear the forward pass calls is the output layer.
    """
    outputs: dict[int, nn.Module] = {}
    order: list[nn.Module] = []

    def hook(module, _inputs, output):
        order.append(module)
        if isinstance(output, torch.Tensor):
            outputs[id(output)] = module

    out = forward_with_hooks(model, example, hook)
    if not order:
        raise UsageError(f"{type(model).__name__} has no Conv2d or Linear layer to prune")
    names = {m: n for n, m in model.named_modules()}
    result = out if isinstance(out, torch.Tensor) else None
    module = outputs.get(id(result)) if result is not None else None
    return names[module if module is not None else order[-1]]


def default_ignored(model: nn.Module, example: torch.Tensor, input_conv: bool = True) -> list[str]:
    """The output layer, and (``input_conv``) the input conv: never pruned unless named.

    Protecting the input conv keeps every channel coupled to its output whole: in a ResNet, the residual
    stream of the whole first stage."""
    first = forward_order(model, example)[0]
    last = output_layer(model, example)
    return [first, last] if input_conv and first != last else [last]


def resolve_layer(model: nn.Module, name: str, option: str = "layers") -> nn.Module:
    """The module called ``name``, or a UsageError suggesting close names."""
    modules = dict(model.named_modules())
    if not isinstance(name, str) or name not in modules or not name:
        convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
        close = difflib.get_close_matches(str(name), convs, n=3, cutoff=0.5)
        hint = (
            f" Did you mean {', '.join(close)}?"
            if close
            else f" Convs in this model: {', '.join(convs[:8])}{', ...' if len(convs) > 8 else ''}"
        )
        raise UsageError(f"{arg(option)} {name}: no such layer.{hint}")
    return modules[name]


def _to_group(
    DG: tp.DependencyGraph, name: str, module: nn.Module, raw, importance: ChannelImportance
) -> Group | None:
    scores = importance(raw)
    if scores is None:
        return None
    members, layer_idxs = [], []
    for item in raw:
        root_idxs = getattr(item, "root_idxs", None) or item.idxs
        if any(r is None for r in root_idxs):
            return None
        members.append(
            (item.dep.layer, item.dep.pruning_fn in _OUT_FNS, torch.tensor(root_idxs, dtype=torch.long))
        )
        layer_idxs.append(torch.tensor(item.idxs, dtype=torch.long))
    channels = len(raw[0].idxs)
    group = Group(name, module, raw[0].dep.handler, channels, scores.float(), members, layer_idxs)
    if any(_is_grouped(layer) for layer, _, _ in members):
        group.units = group_units(group)
        if group.units is None:
            return None  # the grouped conv's groups cannot all lose the same channels here: left alone
    return group


def group_units(group: Group) -> torch.Tensor | None:
    """Unit id per root channel, so that removing whole units removes the same positions from every group
    of each grouped conv the channels pass through; None when no split into equal units exists."""
    parent = list(range(group.channels))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for (layer, is_out, root_idx), idxs in zip(group.members, group.layer_idxs, strict=True):
        if not _is_grouped(layer):
            continue
        width = (layer.out_channels if is_out else layer.in_channels) // layer.groups
        if len(idxs) != width * layer.groups:
            return None  # only part of the conv's channels are in this group
        first: dict[int, int] = {}
        for r, c in zip(root_idx.tolist(), idxs.tolist(), strict=True):
            position = c % width  # the same position in every conv group shares a unit
            if position in first:
                parent[find(r)] = find(first[position])
            else:
                first[position] = r
    roots = torch.tensor([find(i) for i in range(group.channels)])
    _, units = torch.unique(roots, return_inverse=True)
    sizes = torch.bincount(units)
    if int(sizes.max()) != int(sizes.min()):
        return None
    return units


def lowest_channels(group: Group, n: int) -> torch.Tensor:
    """A mask of the ``n`` lowest-scored channels; in a grouped group, of whole units (rounded down to them)."""
    if group.units is None:
        return _lowest(group.scores, n)
    count = int(group.units.max()) + 1
    size = group.channels // count
    unit_scores = torch.zeros(count).index_add_(0, group.units, group.scores) / size
    take = min(n // size, count - 1)  # whole units only, and one always stays
    return _lowest(unit_scores, take)[group.units]


def unit_size(group: Group) -> int:
    """Channels removed together: 1, or the number of conv groups the channels pass through."""
    return 1 if group.units is None else group.channels // (int(group.units.max()) + 1)


def validate_names(model: nn.Module, request: PruneRequest) -> None:
    """Every layer the request names exists and is a conv: checked before any forward pass or scoring."""
    for name in request.ignore:
        resolve_layer(model, name, "ignore")
    for name in request.layers:
        module = resolve_layer(model, name, "layers")
        if not isinstance(module, nn.Conv2d):
            raise UsageError(
                f"{arg('layers')} {name} is a {type(module).__name__}, not a prunable conv; name a Conv2d"
            )


@contextlib.contextmanager
def _tolerant_reshapes():
    """torch-pruning divides by a reshape's inferred channel count, which is 0 after a channel shuffle
    (ShuffleNet); such a reshape keeps its default one-to-one mapping instead of aborting the whole graph.
    Groups coupled wrongly through it are caught by the equivalence check after surgery."""
    from torch_pruning.dependency import index_mapping

    original = index_mapping.update_reshape_index_mapping

    def guarded(graph, node):
        with contextlib.suppress(ZeroDivisionError):  # raised before any mapping is assigned
            original(graph, node)

    index_mapping.update_reshape_index_mapping = guarded
    try:
        yield
    finally:
        index_mapping.update_reshape_index_mapping = original


def build_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """torch-pruning's dependency graph; its failures become one-line errors instead of tracebacks."""
    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs=example)
    except Exception as exc:
        raise UsageError(
            f"cannot trace {type(model).__name__} to find coupled layers ({type(exc).__name__}: {exc})"
        ) from None


def collect_groups(
    model: nn.Module,
    example: torch.Tensor,
    importance: ChannelImportance,
    request: PruneRequest,
) -> tuple[tp.DependencyGraph, list[Group]]:
    """Build the dependency graph and score the groups the request covers."""
    validate_names(model, request)
    DG = build_graph(model, example)
    names = {m: n for n, m in model.named_modules()}
    groups: list[Group] = []
    if request.layers:
        protected = {resolve_layer(model, n, "ignore") for n in request.ignore}
        output = resolve_layer(model, output_layer(model, example))
        seen = set()
        for name in request.layers:
            module = resolve_layer(model, name)
            try:
                raw = DG.get_pruning_group(
                    module, function.prune_conv_out_channels, list(range(module.out_channels))
                )
            except Exception as exc:
                raise UsageError(
                    f"{arg('layers')} {name}: torch-pruning cannot follow its channels "
                    f"({type(exc).__name__}: {exc})"
                ) from None
            outs = {item.dep.layer for item in raw if item.dep.pruning_fn in _OUT_FNS}
            if output in outs:
                raise UsageError(
                    f"{arg('layers')} {name} is coupled to the model's output layer; its channels are classes"
                )
            if outs & protected:
                blocked = sorted(names[m] for m in outs & protected)
                raise UsageError(
                    f"{arg('layers')} {name} is coupled to {', '.join(blocked)}, which {arg('ignore')} protects"
                )
            if outs & seen:
                raise UsageError(
                    f"{arg('layers')} {name} is coupled to another named layer; name only one of them"
                )
            seen |= outs
            group = _to_group(DG, name, module, raw, importance)
            if group is None:
                raise UsageError(
                    f"{arg('layers')} {name} cannot be pruned with this criterion (grouped conv or no scores)"
                )
            groups.append(group)
        return DG, groups
    protected = default_ignored(model, example, input_conv=not request.prune_input_conv)
    ignored = [resolve_layer(model, n) for n in protected + request.ignore]
    for raw in all_groups(model, DG, ignored, names):
        module = raw[0].dep.target.module
        group = _to_group(DG, names[module], module, raw, importance)
        if group is not None:
            groups.append(group)
    if not groups:
        raise UsageError("nothing in this model can be pruned with these settings")
    return DG, groups


def all_groups(
    model: nn.Module, DG: tp.DependencyGraph, ignored: list[nn.Module], names: dict[nn.Module, str]
) -> list:
    """Every group rooted at a conv/linear that touches no ignored layer (torch-pruning's ``get_all_groups``,
    one root at a time: a root torch-pruning cannot follow is left alone instead of failing the model).

    When no root can be followed, the UsageError names the model and the first layer that failed.
    """
    ignored = [*ignored, *DG.IGNORED_LAYERS_IN_TRACING]
    visited: set[nn.Module] = set()
    groups, failure = [], None
    for module in list(DG.module2node):
        if module in ignored or module in visited or not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        pruner = DG.get_pruner_of_module(module)
        channels = pruner.get_out_channels(module) if pruner is not None else None
        if channels is None:
            continue
        try:
            raw = DG.get_pruning_group(module, pruner.prune_out_channels, list(range(channels)))
        except Exception as exc:
            failure = failure or (
                f"torch-pruning cannot follow the channels of {type(model).__name__} at layer "
                f"{names.get(module, '?')} ({type(exc).__name__}: {' '.join(str(exc).split())}); "
                f"the model is unchanged"
            )
            continue
        outs = {item.dep.target.module for item in raw if DG.is_out_channel_pruning_fn(item.dep.handler)}
        visited |= outs
        if not outs & set(ignored):
            groups.append(raw)
    if not groups and failure:
        raise UsageError(failure)
    return groups


def _round_removal(channels: int, remove: int, round_to: int) -> int:
    """Channels to remove so the kept count is a multiple of ``round_to`` (nearest, not zero if possible)."""
    if round_to <= 1:
        return remove
    keep = channels - remove
    keep = int(round(keep / round_to)) * round_to
    return channels - min(keep, channels)


def _lowest(scores: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.zeros(len(scores), dtype=torch.bool)
    if n > 0:
        mask[torch.topk(scores, n, largest=False).indices] = True
    return mask


def plan_ratio(groups: list[Group], ratio: float, round_to: int) -> dict[str, torch.Tensor]:
    """Remove ``int(C * ratio)`` lowest-scored channels from every group (the seed's rounding)."""
    plan = {}
    for g in groups:
        n = _round_removal(g.channels, int(g.channels * ratio), round_to)
        if n >= g.channels:
            raise UsageError(
                f"{arg('ratio')} {ratio} with {arg('round_to')} {round_to} would remove every one of the "
                f"{g.channels} channels of {g.root}; use a smaller ratio or {arg('round_to')}"
            )
        plan[g.root] = lowest_channels(g, n)
    return plan


ALLOCATIONS = ("global", "uniform", "sensitivity")


def command_line_allocation(allocation: str | None, ratio: float | None) -> str:
    """The command line's default allocation: ``sensitivity`` for a target (it kept the most accuracy in
    benchmarks/results/allocation.json; its scan needs the training images the commands have), ``global``
    for a ratio. The Python API, which has no data to scan, defaults to ``global``."""
    if allocation is not None:
        return allocation
    return "global" if ratio is not None else "sensitivity"


def plan_target(
    groups: list[Group],
    costs: LayerCosts,
    target: float,
    metric: str,
    round_to: int,
    allocation: str = "global",
    sensitivity: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """A plan whose priced metric meets ``target``, channels spread across groups by ``allocation``:

    - ``global``: one threshold on normalized importance scores, network-wide;
    - ``uniform``: one ratio for every group (Torch-Pruning's README recipe);
    - ``sensitivity``: every group pruned as far as its measured sensitivity curve predicts a loss of at most
      one common budget, so no group is pushed past the accuracy the others give up.

    Each has one knob, monotone in what it removes, found by bisection on the analytic price.
    """
    dense_macs, dense_params = costs.priced(groups, {})
    base = dense_macs if metric == "macs" else dense_params
    goal = target * base

    def limit(g: Group) -> int:
        keep = max(round_to, math.ceil(MIN_KEEP_FRACTION * g.channels), unit_size(g), 1)
        return max(g.channels - keep, 0)

    def plan_removing(counts: dict[str, int]) -> dict[str, torch.Tensor]:
        return {
            g.root: lowest_channels(
                g, min(_round_removal(g.channels, min(counts[g.root], limit(g)), round_to), limit(g))
            )
            for g in groups
        }

    counts, lo, hi = allocation_knob(groups, allocation, sensitivity)
    knob = lambda x: plan_removing(counts(x))

    def value(plan) -> float:
        macs, params = costs.priced(groups, plan)
        return macs if metric == "macs" else params

    smallest = value(knob(hi))
    if smallest > goal * (1 + TOLERANCE):
        raise UsageError(
            f"{arg('target_' + metric)} {target} cannot be reached with {allocation} allocation: pruning every "
            f"prunable layer to its minimum ({MIN_KEEP_FRACTION:.0%} of channels) leaves {smallest / base:.3f} "
            f"of the dense {metric}"
        )
    best = knob(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        plan = knob(mid)
        v = value(plan)
        if abs(v - goal) <= TOLERANCE * goal:
            return plan
        if v > goal:
            lo = mid
        else:
            hi, best = mid, plan
    return best


def allocation_knob(
    groups: list[Group], allocation: str, sensitivity: dict[str, Any] | None
) -> tuple[Callable[[float], dict[str, int]], float, float]:
    """``allocation`` as one knob: (channels to remove per group at a knob value, lowest, highest value),
    monotone in what it removes, so any budget is met by bisection on the knob."""
    if allocation == "global":
        normalized = {g.root: g.scores / g.scores.abs().mean().clamp_min(1e-12) for g in groups}
        lo = min(float(s.min()) for s in normalized.values()) - 1
        hi = max(float(s.max()) for s in normalized.values()) + 1
        return lambda t: {g.root: int((normalized[g.root] < t).sum()) for g in groups}, lo, hi
    if allocation == "uniform":
        return lambda r: {g.root: int(g.channels * r) for g in groups}, 0.0, 1.0
    if allocation == "sensitivity":
        curves = _loss_curves(groups, sensitivity)
        # the knob is a budget in points of accuracy
        return lambda budget: {g.root: int(g.channels * curves[g.root](budget)) for g in groups}, -1.0, 101.0
    raise UsageError(f"{arg('allocation')} must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")


def _loss_curves(
    groups: list[Group], sensitivity: dict[str, Any] | None
) -> dict[str, Callable[[float], float]]:
    """For each group, the largest ratio whose measured accuracy loss (points, made non-decreasing) stays
    within a budget, interpolated between the scanned ratios; groups the scan lacks are not pruned."""
    if not sensitivity or "groups" not in sensitivity:
        raise UsageError(f"{arg('allocation')} sensitivity needs a sensitivity scan (prunekit sensitivity)")
    ratios = [0.0, *sensitivity["ratios"]]
    dense = sensitivity["dense_accuracy"]
    curves = {}
    for g in groups:
        row = sensitivity["groups"].get(g.root)
        if not row or "accuracy" not in row:
            curves[g.root] = lambda budget: 0.0
            continue
        losses, worst = [0.0], 0.0
        for ratio, acc in zip(sensitivity["ratios"], row["accuracy"], strict=True):
            # Non-decreasing, plus a tiny slope: flat or noisy curves still give a continuous knob.
            worst = max(worst, (dense - acc) * 100)
            losses.append(worst + 0.01 * ratio)

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
    return curves


def apply_plan(DG: tp.DependencyGraph, groups: list[Group], plan: dict[str, torch.Tensor]) -> dict[str, int]:
    """Do the surgery: remove each group's planned channels through torch-pruning."""
    removed = {}
    for g in groups:
        mask = plan.get(g.root)
        if mask is None or not mask.any():
            continue
        if int(mask.sum()) >= g.channels:
            raise UsageError(f"the plan would remove every channel of {g.root}")
        idxs = torch.nonzero(mask).flatten().tolist()
        try:
            DG.get_pruning_group(g.module, g.handler, idxs).prune()
        except Exception as exc:
            raise SurgeryError(g.root, f"torch-pruning failed ({type(exc).__name__}: {exc})") from None
        removed[g.root] = len(idxs)
    return removed


class SurgeryError(Exception):
    """Removing a group's channels broke the model; the caller undoes the surgery and names ``layer``."""

    def __init__(self, layer: str, reason: str):
        super().__init__(f"{layer}: {reason}")
        self.layer, self.reason = layer, reason


def snapshot(model: nn.Module) -> list[tuple[nn.Module, dict[str, Any]]]:
    """Each module's attributes, parameters and buffers: enough to undo a surgery exactly.

    torch-pruning assigns new tensors rather than editing the old ones in place, so holding references to
    the old parameter objects (not copies) restores the model, and a caller's optimizer still points at them.
    """
    state = []
    for m in model.modules():
        attrs = {k: v for k, v in vars(m).items() if k not in ("_parameters", "_buffers", "_modules")}
        state.append((m, {"attrs": attrs, "params": dict(m._parameters), "buffers": dict(m._buffers)}))
    return state


def restore(state: list[tuple[nn.Module, dict[str, Any]]]) -> None:
    """Undo everything done to the modules since ``snapshot``."""
    for m, saved in state:
        for key in [k for k in vars(m) if k not in ("_parameters", "_buffers", "_modules")]:
            if key not in saved["attrs"]:
                delattr(m, key)
        vars(m).update(saved["attrs"])
        m._parameters.clear()
        m._parameters.update(saved["params"])
        m._buffers.clear()
        m._buffers.update(saved["buffers"])


def _output_shapes(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, dict):
        return {k: _output_shapes(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return [_output_shapes(v) for v in out]
    return type(out).__name__


@torch.no_grad()
def check_runs(model: nn.Module, example: torch.Tensor, expected: Any, layer: str) -> None:
    """The pruned model must run on the example and return outputs of the dense model's shapes."""
    try:
        got = _output_shapes(model(example))
    except Exception as exc:
        raise SurgeryError(layer, f"the model no longer runs ({type(exc).__name__}: {exc})") from None
    if got != expected:
        raise SurgeryError(layer, f"the output shape changed from {expected} to {got}")


@contextlib.contextmanager
def _full_precision():
    """Disable TF32 on GPUs while comparing outputs: its 10-bit mantissa would blur the equivalence check."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# Norms that mix channels: removing a channel legitimately changes the others, so zeroing is no reference.
_CHANNEL_MIXING = (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)


@torch.no_grad()
def zeroed_reference(
    model: nn.Module, groups: list[Group], plan: dict[str, torch.Tensor], probe: torch.Tensor
) -> Any:
    """The dense model's output with the planned channels zeroed instead of removed.

    A correct surgery computes exactly this (a zero channel contributes nothing downstream), so comparing
    it with the pruned model's output catches couplings the dependency graph missed (channels padded or
    sliced in ``forward``) even when the pruned model still runs. None where no such reference exists.
    """
    if any(isinstance(m, _CHANNEL_MIXING) for m in model.modules()):
        return None
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        for g in groups:
            mask = plan.get(g.root)
            if mask is None or not mask.any():
                continue
            for (layer, is_out, root_idx), idxs in zip(g.members, g.layer_idxs, strict=True):
                if not is_out:
                    continue
                chans = idxs[mask[root_idx]]
                tensors = [getattr(layer, "weight", None), getattr(layer, "bias", None)]
                if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                    tensors.append(layer.running_mean)  # so the channel leaves BatchNorm as exactly 0
                for t in tensors:
                    if isinstance(t, torch.Tensor):
                        saved.setdefault(id(t), (t, t.detach().clone()))
                        t.data[chans] = 0
        with _full_precision():
            return model(probe)
    finally:
        for t, original in saved.values():
            t.data.copy_(original)


def _same_outputs(expected: Any, got: Any) -> bool:
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
            return False
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        return bool(torch.allclose(got.float(), expected.float(), rtol=1e-3, atol=1e-3 * scale + 1e-5))
    if isinstance(expected, (list, tuple)):
        return len(expected) == len(got) and all(
            _same_outputs(e, g) for e, g in zip(expected, got, strict=True)
        )
    if isinstance(expected, dict):
        return expected.keys() == got.keys() and all(_same_outputs(expected[k], got[k]) for k in expected)
    return True


def check_equivalent(model: nn.Module, probe: torch.Tensor, reference: Any, layer: str) -> None:
    """The pruned model must compute what the dense model computes with the removed channels zeroed."""
    if reference is None:
        return
    with torch.no_grad(), _full_precision():
        got = model(probe)
    if not _same_outputs(reference, got):
        raise SurgeryError(
            layer, "the pruned model computes something else than the dense model without those channels"
        )


def _apply_checked(
    model: nn.Module,
    DG: tp.DependencyGraph,
    groups: list[Group],
    plan: dict[str, torch.Tensor],
    example: torch.Tensor,
    expected: Any,
    probe: torch.Tensor,
    label: str,
) -> dict[str, int]:
    """Apply ``plan``; a SurgeryError (naming ``label``) unless the model still runs with the dense model's
    output shapes and computes what the dense model computes with those channels zeroed."""
    reference = zeroed_reference(model, groups, plan, probe)
    removed = apply_plan(DG, groups, plan)
    check_runs(model, example, expected, label)
    check_equivalent(model, probe, reference, label)
    return removed


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
            _apply_checked(model, DG, group, {root: mask}, example, expected, probe, root)
        except (SurgeryError, UsageError):
            bad.append(root)
        finally:
            restore(state)
    return bad


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
    was_training = model.training
    model.eval()
    try:
        with _tolerant_reshapes():  # torch-pruning re-maps reshapes on every group query, not only once
            return _prune_planned(model, request, importance, example)
    finally:
        model.train(was_training)


def _prune_planned(
    model: nn.Module, request: PruneRequest, importance: ChannelImportance, example: torch.Tensor
) -> PruneResult:
    from .checkpoint import module_shapes

    with torch.no_grad():
        expected = _output_shapes(model(example))
    costs = LayerCosts(model, example)
    before = module_shapes(model)
    macs_before, params_before = int(sum(costs.macs.values())), costs.total_params
    latency = None
    if request.target_latency is not None:
        removed, latency = _prune_to_latency(model, request, importance, example, expected)
    else:
        DG, groups = collect_groups(model, example, importance, request)
        if request.ratio is not None:
            plan = plan_ratio(groups, request.ratio, request.round_to)
        else:
            metric = "macs" if request.target_macs is not None else "params"
            target = request.target_macs if metric == "macs" else request.target_params
            plan = plan_target(
                groups, costs, target, metric, request.round_to, request.allocation, request.sensitivity
            )
        removed, state = _surgery(model, request, importance, example, expected, DG, groups, plan)
        if request.ratio is None:  # the target is checked on the measured model, not on the plan's estimate
            reached = (
                count_macs(model, example) / macs_before
                if metric == "macs"
                else count_params(model) / params_before
            )
            if abs(reached - target) > TOLERANCE * target:
                restore(state)
                raise UsageError(
                    f"{arg('target_' + metric)} {target}: the closest prunekit got is {reached:.3f} (channel "
                    f"steps are too coarse here); try a nearby target or {arg('round_to')} 1"
                )
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
    )


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
        removed = _apply_checked(model, DG, groups, plan, example, expected, probe, "the pruned model")
    except SurgeryError as exc:
        restore(state)
        bad = _culprits(model, example, probe, importance, request, plan, expected) or [exc.layer]
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


def _prune_to_latency(
    model: nn.Module,
    request: PruneRequest,
    importance: ChannelImportance,
    example: torch.Tensor,
    expected: Any,
) -> tuple[dict[str, int], dict[str, Any]]:
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
                return removed, {**info, "target": target, "measured": measured, "kept": keep}
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
