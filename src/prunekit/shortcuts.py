"""Residual sums for recovery: which re-fittable layers write, through their BatchNorm, into a sum with a
shortcut, and the shortcut's values in a forward pass.

Re-fitting such a layer to its own dense output leaves the error the shortcut carries in from earlier
blocks in the sum; re-fitting it to the dense *sum* minus the pruned model's shortcut corrects that error
block by block (the target ``z* = z_dense + (s_dense - s_pruned) / a`` on each kept channel, ``a`` the
BatchNorm's scale in eval mode). Found with ``torch.fx``; a model it cannot trace has none.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Collection, Sequence
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


def shortcut_sums(model: nn.Module, leaves: Collection[str] = ()) -> tuple[Any, dict[str, ShortcutSum]]:
    """The traced model (None when ``torch.fx`` cannot trace it) and, by layer name, the sums its layers
    write into; the modules named in ``leaves`` stay whole (a pass that starts at a cut patches them). Only a shortcut computed before the layer counts: its pruned value is known by the time the
    layer is re-fitted (torchvision's ResNet computes its downsample shortcut after the main branch, so
    there the downsample conv is the one re-fitted to the sum)."""
    import torch.fx as fx

    from .modes import eval_mode

    class Tracer(fx.Tracer):
        # a conv subclass that pads in its own forward (TensorFlow ports) stays one node, as torch's own do
        def is_leaf_module(self, m: nn.Module, name: str) -> bool:
            return isinstance(m, _LEAVES) or name in leaves or super().is_leaf_module(m, name)

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
    norm = modules[node.target] if getattr(node, "op", None) == "call_module" else None
    if not isinstance(norm, nn.BatchNorm2d) or norm.running_var is None:  # batch statistics: no fixed scale
        return None
    layer = node.args[0] if node.args else None
    if len(node.users) != 1 or getattr(layer, "op", None) != "call_module" or len(layer.users) != 1:
        return None
    return layer if isinstance(modules[layer.target], (nn.Conv2d, nn.Linear)) else None


def batchnorm_scale(norm: nn.BatchNorm2d) -> torch.Tensor:
    """The per-channel factor an eval-mode BatchNorm multiplies its input by."""
    weight = norm.weight.detach() if norm.weight is not None else torch.ones_like(norm.running_var)
    return (weight / torch.sqrt(norm.running_var + norm.eps)).float().cpu()


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


def select_kept(y: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """The columns (channels) of ``y`` that ``kept`` names; all of them for None."""
    return y[:, kept] if kept is not None else y


class ShortcutTargets:
    """Recovery's targets for the layers that write into residual sums: the shortcuts' values recorded in
    each pass (through the traced graphs), and each such layer's target moved by its shortcut's error.
    ``rows`` are recovery's sampled output positions of a layer (``outputs(tensor)``: rows x channels)."""

    def __init__(
        self,
        dense: nn.Module,
        pruned: nn.Module,
        layers: Sequence[str],
        enabled: bool = True,
        leaves: Collection[str] = (),
    ):
        self.dense_traced, found = shortcut_sums(dense, leaves) if enabled else (None, {})
        self.sums = {n: s for n, s in found.items() if n in layers}
        self.pruned_traced = shortcut_sums(pruned, leaves)[0] if self.sums else None
        if self.pruned_traced is None:
            self.sums = {}
        self.values: dict[str, torch.Tensor] = {}  # shortcut node -> its value in the pass running
        self.uses: Counter[str] = Counter()  # shortcut node -> layers yet to read it in this pass

    def runner(self, dense: bool) -> Any:
        """How a pass runs the model: through the traced graph, recording the shortcuts, where there are
        sums; else None (the model itself)."""
        if not self.sums:
            return None
        traced = self.dense_traced if dense else self.pruned_traced
        self.uses = Counter(s.shortcut for s in self.sums.values())
        self.values = {}
        return lambda x: run_recording(traced, x, set(self.uses), self.values)

    def _read(self, name: str, rows: Any) -> torch.Tensor:
        """Layer ``name``'s shortcut at its rows; a whole shortcut tensor is let go once read by every layer
        that reads it (at 224 px a ResNet-50's shortcuts hold gigabytes)."""
        node = self.sums[name].shortcut
        value = rows.outputs(self.values[node])
        self.uses[node] -= 1
        if not self.uses[node]:
            del self.values[node]
        return value

    def dense_value(self, name: str, rows: Any) -> torch.Tensor | None:
        """In the dense pass: the shortcut of layer ``name`` at its rows (None for a layer writing into no
        sum)."""
        return self._read(name, rows) if name in self.sums else None

    def target(
        self,
        name: str,
        rows: Any,
        y: torch.Tensor,
        modules: dict[str, nn.Module],
        dense_shortcut: torch.Tensor,
    ) -> torch.Tensor:
        """In the pruned pass, for a layer writing into a sum: what makes the sum the dense one,
        ``y + (s_dense - s_pruned) / a`` (``y``: the dense layer's output, ``dense_shortcut``: ``s_dense``, both
        on the channels the layer keeps)."""
        total = self.sums[name]
        error = dense_shortcut - self._read(name, rows)
        scale = batchnorm_scale(modules[total.norm])
        safe = torch.where(scale < 0, -1.0, 1.0) * scale.abs().clamp_min(1e-6)  # a dead channel: no blow-up
        return y + error / safe
