"""Residual sums for recovery: which re-fittable layers write, through their BatchNorm, into a sum with a
shortcut, and the shortcut's values in a forward pass.

Re-fitting such a layer to its own dense output leaves the error the shortcut carries in from earlier
blocks in the sum; re-fitting it to the dense *sum* minus the pruned model's shortcut corrects that error
block by block (the target ``z* = z_dense + (s_dense - s_pruned) / a`` on each kept channel, ``a`` the
BatchNorm's scale in eval mode). Found with ``torch.fx``; a model it cannot trace has none.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

_ADDS = (operator.add, operator.iadd, torch.add)
_LEAVES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)


@dataclass(frozen=True)
class ShortcutSum:
    """``layer`` (a conv or linear) feeds ``norm`` (a BatchNorm), whose output is added to node ``shortcut``."""

    layer: str
    norm: str
    shortcut: str


def shortcut_sums(model: nn.Module) -> tuple[Any, dict[str, ShortcutSum]]:
    """The traced model (None when ``torch.fx`` cannot trace it) and, by layer name, the sums its layers
    write into. Only a shortcut computed before the layer counts: its pruned value is known by the time the
    layer is re-fitted (torchvision's ResNet computes its downsample shortcut after the main branch, so
    there the downsample conv is the one re-fitted to the sum)."""
    import torch.fx as fx

    from .modes import eval_mode

    class Tracer(fx.Tracer):
        # a conv subclass that pads in its own forward (TensorFlow ports) stays one node, as torch's own do
        def is_leaf_module(self, m: nn.Module, name: str) -> bool:
            return isinstance(m, _LEAVES) or super().is_leaf_module(m, name)

    try:
        with eval_mode(model):  # a mode read in forward is fixed at tracing: eval, as recovery runs
            traced = fx.GraphModule(model, Tracer().trace(model))
    except Exception:  # data-dependent control flow and the like: plain targets
        return None, {}
    modules = dict(traced.named_modules())
    order = {node: i for i, node in enumerate(traced.graph.nodes)}
    found: dict[str, ShortcutSum] = {}
    for node in traced.graph.nodes:
        if node.op != "call_function" or node.target not in _ADDS or len(node.args) != 2 or node.kwargs:
            continue
        a, b = node.args
        for mine, other in ((a, b), (b, a)):
            layer = _normalized_layer(mine, modules)
            if layer is not None and isinstance(other, fx.Node) and order[other] < order[layer]:
                found[layer.target] = ShortcutSum(layer.target, mine.target, other.name)
    return traced, found


def _normalized_layer(node: Any, modules: dict[str, nn.Module]) -> Any:
    """The layer node behind ``node`` when ``node`` is a BatchNorm applied to a layer's only use."""
    if getattr(node, "op", None) != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
        return None
    layer = node.args[0] if node.args else None
    if len(node.users) != 1 or getattr(layer, "op", None) != "call_module" or len(layer.users) != 1:
        return None
    return layer if isinstance(modules[layer.target], (nn.Conv2d, nn.Linear)) else None


def batchnorm_scale(norm: nn.BatchNorm2d) -> torch.Tensor:
    """The per-channel factor an eval-mode BatchNorm multiplies its input by."""
    return (norm.weight.detach() / torch.sqrt(norm.running_var + norm.eps)).float().cpu()


def run_recording(traced: Any, x: torch.Tensor, wanted: set[str], store: dict[str, torch.Tensor]) -> None:
    """Run the traced model on ``x`` (the hooks of its modules fire as in the model itself), putting the
    value of each node named in ``wanted`` into ``store`` as soon as it is computed."""
    import torch.fx as fx

    class Recorder(fx.Interpreter):
        def run_node(self, n: Any) -> Any:
            value = super().run_node(n)
            if n.name in wanted:
                store[n.name] = value
            return value

    Recorder(traced).run(x)
