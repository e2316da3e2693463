"""Coupled channels: torch-pruning's dependency graph finds every layer tied to a set of channels (a *group*),
a criterion from ``importance.py`` scores the group's channels, and this module names, protects and collects
the groups a pruning request covers."""

from __future__ import annotations

import contextlib
import difflib
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.pruner import function

from .errors import UsageError, arg
from .importance import ChannelImportance
from .measure import forward_with_hooks
from .requests import PruneRequest

OUT_FNS = (
    function.prune_conv_out_channels,
    function.prune_linear_out_channels,
    function.prune_batchnorm_out_channels,
    function.prune_layernorm_out_channels,
    function.prune_groupnorm_out_channels,
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


def is_depthwise(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and layer.groups > 1 and layer.groups == layer.in_channels


def is_grouped(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and layer.groups > 1 and not is_depthwise(layer)


def forward_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of conv and linear layers in the order a forward pass calls them."""
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []
    forward_with_hooks(model, example, lambda module, _inputs, _output: order.append(names[module]))
    return order


def output_layer(model: nn.Module, example: torch.Tensor) -> str:
    """The conv/linear whose output the model returns (its channels are classes): found by tracing, not guessed.

    When the returned tensor is not any layer's own output (e.g. flattened after a 1x1 conv classifier), the
    last conv/linear the forward pass calls is the output layer.
    """
    # Weak references, compared by identity: an id alone is reused once a layer's output is freed, and the
    # returned tensor could take the id of an earlier layer's output (SqueezeNet, in 83 passes of 200).
    outputs: list[tuple[weakref.ref, nn.Module]] = []
    order: list[nn.Module] = []

    def hook(module, _inputs, output):
        order.append(module)
        if isinstance(output, torch.Tensor):
            outputs.append((weakref.ref(output), module))

    out = forward_with_hooks(model, example, hook)
    if not order:
        raise UsageError(f"{type(model).__name__} has no Conv2d or Linear layer to prune")
    names = {m: n for n, m in model.named_modules()}
    module = next((m for ref, m in outputs if isinstance(out, torch.Tensor) and ref() is out), order[-1])
    return names[module]


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
            (item.dep.layer, item.dep.pruning_fn in OUT_FNS, torch.tensor(root_idxs, dtype=torch.long))
        )
        layer_idxs.append(torch.tensor(item.idxs, dtype=torch.long))
    channels = len(raw[0].idxs)
    group = Group(name, module, raw[0].dep.handler, channels, scores.float(), members, layer_idxs)
    if any(is_grouped(layer) for layer, _, _ in members):
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
        if not is_grouped(layer):
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
        return lowest(group.scores, n)
    count = int(group.units.max()) + 1
    size = group.channels // count
    unit_scores = torch.zeros(count).index_add_(0, group.units, group.scores) / size
    take = min(n // size, count - 1)  # whole units only, and one always stays
    return lowest(unit_scores, take)[group.units]


def lowest(scores: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.zeros(len(scores), dtype=torch.bool)
    if n > 0:
        mask[torch.topk(scores, n, largest=False).indices] = True
    return mask


def unit_size(group: Group) -> int:
    """Channels removed together: 1, or the number of conv groups the channels pass through."""
    return 1 if group.units is None else group.channels // (int(group.units.max()) + 1)


@contextlib.contextmanager
def tolerant_reshapes():
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
            outs = {item.dep.layer for item in raw if item.dep.pruning_fn in OUT_FNS}
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
