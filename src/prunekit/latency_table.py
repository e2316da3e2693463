"""Per-layer latency tables: how long each conv and linear layer takes, on this device and runtime, at
candidate channel counts. A latency target is planned from them (the lookup-table approach of NetAdapt and
HALP) and then checked by timing the pruned model as a whole.

Each layer is timed alone on an input of its own shape, once with every candidate count of output channels
(inputs whole) and once with every candidate count of input channels (outputs whole); a layer with both
sides pruned is estimated as the product of the two relative costs. Layers of the same shape share entries,
and tables are cached per device, runtime, thread count and batch size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .console import progress_bar
from .errors import UsageError, arg
from .files import cache_dir, write_json
from .measure import cpu_name, forward_with_hooks

RUNTIMES = ("pytorch", "onnxruntime")
GRID_POINTS = 64  # candidate counts per side at most: every channel for 64, every 8th for 512
SIDE_BUDGET_MS = 4000  # fewer candidates for slow layers (large images, large batches): ~4 s per side
TABLE_VERSION = 1


@dataclass(frozen=True)
class LayerSpec:
    """What a conv or linear call costs depends on: its shape and the input it sees (per image)."""

    kind: str  # "conv" or "linear"
    in_channels: int
    out_channels: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = False
    input_hw: tuple[int, int] = (1, 1)
    output_hw: tuple[int, int] = (1, 1)

    @property
    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels

    def resized(self, in_channels: int, out_channels: int) -> LayerSpec:
        """The same layer with other channel counts (a depthwise conv keeps one group per channel)."""
        groups = in_channels if self.depthwise else self.groups
        return LayerSpec(
            **{**asdict(self), "in_channels": in_channels, "out_channels": out_channels, "groups": groups}
        )


def layer_specs(model: nn.Module, example: torch.Tensor) -> dict[nn.Module, LayerSpec]:
    """The spec of every conv and linear layer, in call order, from one forward pass on ``example``."""
    specs: dict[nn.Module, LayerSpec] = {}

    def hook(module, inputs, output):
        x = inputs[0]
        if isinstance(module, nn.Conv2d):
            specs[module] = LayerSpec(
                "conv",
                module.in_channels,
                module.out_channels,
                tuple(module.kernel_size),
                tuple(module.stride),
                tuple(module.padding) if not isinstance(module.padding, str) else (0, 0),
                tuple(module.dilation),
                module.groups,
                module.bias is not None,
                tuple(x.shape[-2:]),
                tuple(output.shape[-2:]),
            )
        else:
            specs[module] = LayerSpec(
                "linear", module.in_features, module.out_features, bias=module.bias is not None
            )

    forward_with_hooks(model, example, hook)
    return specs


def grid(channels: int, unit: int = 1, points: int = GRID_POINTS) -> list[int]:
    """Candidate channel counts for a side of ``channels``: evenly spaced multiples of ``unit``, ascending."""
    step = max(unit, math.ceil(channels / points / unit) * unit)
    return sorted({channels, *range(channels - step, 0, -step)})


def side_points(full_ms: float) -> int:
    """Candidate counts to time on one side of a layer that takes ``full_ms`` whole (each timed ~6 times)."""
    return max(8, min(GRID_POINTS, int(SIDE_BUDGET_MS / max(full_ms * 6, 1e-3))))


def device_description(runtime: str, threads: int, device: str = "cpu") -> dict[str, Any]:
    """What a latency figure depends on besides the model: the processor, runtime version, threads."""
    processor = torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_name()
    version = torch.__version__
    if runtime == "onnxruntime":
        from .deploy import require_onnxruntime

        version = require_onnxruntime().__version__
    return {"processor": processor, "runtime": runtime, "version": version, "threads": threads}


class LayerTimer:
    """Times one layer of a given spec in a runtime, alone, on random input of its shape."""

    def __init__(self, runtime: str, batch: int, threads: int, device: str = "cpu"):
        if runtime not in RUNTIMES:
            raise UsageError(
                f"{arg('latency_runtime')} must be one of {', '.join(RUNTIMES)}, got {runtime!r}"
            )
        self.runtime, self.batch, self.threads = runtime, batch, threads
        self.device = torch.device(device if runtime == "pytorch" else "cpu")  # ONNX Runtime: CPU provider
        self.sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        self.inputs: dict[tuple, Any] = {}

    def __call__(self, spec: LayerSpec, min_seconds: float = 0.01, max_repeats: int = 20) -> float:
        """Fastest of several runs, in milliseconds (the minimum is the figure least disturbed by load)."""
        run = self._pytorch(spec) if self.runtime == "pytorch" else self._onnxruntime(spec)
        run()  # warm-up: first calls allocate and pick kernels
        self.sync()
        best, spent, repeats = math.inf, 0.0, 0
        while repeats < 3 or (spent < min_seconds and repeats < max_repeats):
            start = time.perf_counter()
            run()
            self.sync()
            elapsed = time.perf_counter() - start
            best, spent, repeats = min(best, elapsed), spent + elapsed, repeats + 1
        return best * 1e3

    def _input_shape(self, spec: LayerSpec) -> tuple[int, ...]:
        if spec.kind == "linear":
            return (self.batch, spec.in_channels)
        return (self.batch, spec.in_channels, *spec.input_hw)

    def _pytorch(self, spec: LayerSpec):
        shape = self._input_shape(spec)
        x = self.inputs.get(shape)
        if x is None:
            x = torch.randn(shape, device=self.device)
            if spec.kind == "conv":  # the layout prunekit times whole models in
                x = x.contiguous(memory_format=torch.channels_last)
            self.inputs = {shape: x}  # one input at a time: a table's worth would not fit for large models
        bias = torch.zeros(spec.out_channels, device=self.device) if spec.bias else None
        if spec.kind == "linear":
            w = torch.zeros(spec.out_channels, spec.in_channels, device=self.device)
            return lambda: F.linear(x, w, bias)
        w = torch.zeros(
            spec.out_channels, spec.in_channels // spec.groups, *spec.kernel, device=self.device
        ).contiguous(memory_format=torch.channels_last)

        def conv():
            with torch.no_grad():
                F.conv2d(x, w, bias, spec.stride, spec.padding, spec.dilation, spec.groups)

        return conv

    def _onnxruntime(self, spec: LayerSpec):
        import numpy as np
        from onnx import TensorProto, helper, numpy_helper

        from .deploy import require_onnxruntime

        ort = require_onnxruntime()
        shape = self._input_shape(spec)
        if spec.kind == "linear":
            w = np.zeros((spec.out_channels, spec.in_channels), np.float32)
            node = helper.make_node("Gemm", ["x", "w", *(["b"] if spec.bias else [])], ["y"], transB=1)
        else:
            w = np.zeros((spec.out_channels, spec.in_channels // spec.groups, *spec.kernel), np.float32)
            node = helper.make_node(
                "Conv",
                ["x", "w", *(["b"] if spec.bias else [])],
                ["y"],
                kernel_shape=list(spec.kernel),
                strides=list(spec.stride),
                pads=[*spec.padding, *spec.padding],
                dilations=list(spec.dilation),
                group=spec.groups,
            )
        inits = [numpy_helper.from_array(w, "w")]
        if spec.bias:
            inits.append(numpy_helper.from_array(np.zeros(spec.out_channels, np.float32), "b"))
        graph = helper.make_graph(
            [node],
            "layer",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            inits,
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        proto.ir_version = min(proto.ir_version, 8)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        sess = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        return lambda: sess.run(None, {"x": x})


@dataclass
class LatencyTable:
    """Measured milliseconds per layer spec: whole, and at candidate output / input channel counts."""

    device: dict[str, Any]
    batch: int
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)  # spec key -> {"full", "out", "in"}

    def estimate(self, spec: LayerSpec, in_channels: int, out_channels: int) -> float:
        """Milliseconds of ``spec`` with these channel counts: the product of its two relative side costs,
        each relative to the same side's own whole-layer timing (so one unlucky timing cannot skew a side)."""
        entry = self.entries[spec.key]
        full = entry["full"]
        if spec.depthwise:  # ins and outs shrink together
            return full * _relative(entry.get("out"), out_channels, spec.out_channels)
        return (
            full
            * _relative(entry.get("out"), out_channels, spec.out_channels)
            * _relative(entry.get("in"), in_channels, spec.in_channels)
        )

    def to_json(self) -> dict[str, Any]:
        return {"version": TABLE_VERSION, "device": self.device, "batch": self.batch, "entries": self.entries}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LatencyTable:
        if data.get("version") != TABLE_VERSION:
            raise ValueError(f"latency table version {data.get('version')}, expected {TABLE_VERSION}")
        entries = {
            key: {
                "full": float(e["full"]),
                **{
                    side: {int(k): float(v) for k, v in e[side].items()}
                    for side in ("out", "in")
                    if side in e
                },
            }
            for key, e in data["entries"].items()
        }
        return cls(dict(data["device"]), int(data["batch"]), entries)

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        return cls.from_json(json.loads(Path(path).read_text()))


def _relative(points: dict[int, float] | None, channels: int, whole: int) -> float:
    """Time at ``channels`` over time at ``whole`` channels, both from the same side's measurements."""
    if not points or whole not in points or points[whole] <= 0:
        return 1.0
    return _interpolate(points, channels) / points[whole]


def _interpolate(points: dict[int, float], channels: int) -> float:
    """Linear interpolation between measured counts (a count between grid points, as after a concat)."""
    if channels in points:
        return points[channels]
    counts = sorted(points)
    if channels <= counts[0]:
        return points[counts[0]] * channels / counts[0]
    if channels >= counts[-1]:
        return points[counts[-1]]
    for lo, hi in zip(counts, counts[1:], strict=False):
        if lo < channels < hi:
            return points[lo] + (points[hi] - points[lo]) * (channels - lo) / (hi - lo)
    raise AssertionError("unreachable: counts cover channels")


def table_path(device: dict[str, Any], batch: int, specs: Iterable[tuple[LayerSpec, str, int]]) -> Path:
    """Where the table for these layers lies in the cache: one file per device, runtime, batch and model."""
    ident = json.dumps(
        [device, batch, sorted((s.key, side, unit) for s, side, unit in specs)], sort_keys=True
    )
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return cache_dir() / "latency" / f"{device['runtime']}-b{batch}-{digest}.json"


def build_table(
    needed: Sequence[tuple[LayerSpec, str, int]],
    runtime: str,
    batch: int,
    threads: int,
    cache: bool = True,
    progress: bool = True,
    device: str = "cpu",
) -> LatencyTable:
    """Measure (or read from the cache) every ``(spec, side, unit)``: side ``"full"`` times the layer whole,
    ``"out"``/``"in"`` time it at each candidate count of that side, in steps of ``unit`` channels."""
    timer = LayerTimer(runtime, batch, threads, device)
    description = device_description(runtime, threads, str(timer.device))
    path = table_path(description, batch, needed)
    if cache and path.exists():
        try:
            return LatencyTable.load(path)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is measured again
    table = LatencyTable(description, batch)
    jobs = sorted(set(needed), key=lambda job: (job[0].key, job[1]))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        bar = progress_bar()
        task = bar.add_task("measuring layer latencies", total=len(jobs), info="")
        with bar if progress else contextlib.nullcontext():
            for spec, side, unit in jobs:
                entry = table.entries.setdefault(spec.key, {})
                if "full" not in entry:
                    entry["full"] = timer(spec)
                points = side_points(entry["full"])
                if side == "out" or (side == "in" and spec.depthwise):
                    entry["out"] = {
                        k: timer(spec.resized(k if spec.depthwise else spec.in_channels, k))
                        for k in grid(spec.out_channels, unit, points)
                    }
                elif side == "in":
                    entry["in"] = {
                        k: timer(spec.resized(k, spec.out_channels))
                        for k in grid(spec.in_channels, unit, points)
                    }
                # Each side timed the whole layer again: keep the least disturbed figure everywhere, since
                # every other count of the side is priced relative to it.
                out_pts, in_pts = entry.get("out", {}), entry.get("in", {})
                whole = [out_pts.get(spec.out_channels), in_pts.get(spec.in_channels)]
                entry["full"] = min([entry["full"], *(w for w in whole if w is not None)])
                if spec.out_channels in out_pts:
                    out_pts[spec.out_channels] = entry["full"]
                if spec.in_channels in in_pts:
                    in_pts[spec.in_channels] = entry["full"]
                bar.advance(task)
    finally:
        torch.set_num_threads(previous)
    if cache:  # a read-only cache costs the next run a measurement, nothing else
        with contextlib.suppress(OSError, UsageError):
            table.save(path)
    return table
