"""What a pruning request says (named layers, a uniform ratio, a MACs, params or latency target): a leaf the
pruning modules import, so none of them needs the orchestrator ``pruning.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError, arg
from .options import validate as validate_options


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
    allocation: str | None = None  # how a target is spread (plan_target); None: by the images at hand
    sensitivity: dict[str, Any] | None = None  # a sensitivity scan, for allocation "sensitivity"
    reconstruct: bool | None = None  # recovery without labels after the surgery (None: the default)
    scan_recovery: bool = True  # a sensitivity scan's tries recovered before they are scored

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
        validate_options(
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
                "scan_recovery",
                "reconstruct",
            ),
        )
        if self.allocation == "sensitivity" and self.ratio is not None:
            raise UsageError(
                f"{arg('allocation')} sensitivity spreads a target; give {arg('target_macs')}, "
                f"{arg('target_params')} or {arg('target_latency')}"
            )
