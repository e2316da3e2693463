"""Measurements of a model: accuracy, parameters, MACs, size, latency."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UsageError
from .modes import eval_mode

REPEATS = 30  # timed runs per model behind every latency median prunekit reports, by default
REPEATS_VARIABLE = "PRUNEKIT_LATENCY_REPEATS"  # sets another count: quicker or steadier timing


def latency_repeats(repeats: int | None = None) -> int:
    """Timed runs per model behind a latency median: ``repeats`` when given, else ``$PRUNEKIT_LATENCY_REPEATS``,
    else ``REPEATS``."""
    if repeats is not None:
        return repeats
    text = os.environ.get(REPEATS_VARIABLE, "").strip()
    if not text:
        return REPEATS
    if not text.isdigit() or int(text) < 1:
        raise UsageError(
            f"${REPEATS_VARIABLE}={text}: timed runs per latency median must be a whole number >= 1"
        )
    return int(text)


def autocast(device: torch.device | str, enabled: bool):
    """bf16 autocast on ``device`` when enabled, else a no-op context."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16) if enabled else nullcontext()


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bf16_supported() -> bool:
    """True where the CPU has native bf16 (AVX512-BF16 or AMX), the only case where it speeds training up."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str | None = None,
    bf16: bool = False,
    num_classes: int | None = None,
    world_size: int = 1,
) -> dict[str, Any]:
    """Top-1 accuracy (overall and per class) and mean loss over ``(images, labels)`` batches.

    Runs on the model's own device unless ``device`` is given; sums over ranks when distributed.
    """
    was_training = model.training
    model.eval()
    if device is None:
        device = next(model.parameters()).device
    correct = torch.zeros(num_classes or 0, dtype=torch.float64)
    count = torch.zeros(num_classes or 0, dtype=torch.float64)
    loss_sum = torch.zeros(1, dtype=torch.float64)
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.cpu().long()
        with autocast(device, bf16):
            logits = model(x).float().cpu()
        if logits.shape[1] > len(correct):  # classes unknown up front: grow with the model's output
            grow = logits.shape[1] - len(correct)
            correct = torch.cat([correct, torch.zeros(grow, dtype=torch.float64)])
            count = torch.cat([count, torch.zeros(grow, dtype=torch.float64)])
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        hit = (logits.argmax(1) == y).double()
        correct.index_add_(0, y, hit)
        count.index_add_(0, y, torch.ones_like(hit))
    if world_size > 1:
        import torch.distributed as dist

        for t in (correct, count, loss_sum):
            dist.all_reduce(t)
    model.train(was_training)
    total = count.sum().clamp_min(1)
    return {
        "accuracy": float(correct.sum() / total),
        "loss": float(loss_sum / total),
        "per_class": (correct / count.clamp_min(1)).tolist(),
        "images": int(count.sum()),
    }


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    """Multiply-accumulates of one conv or linear call, per image."""
    per_image = output[0].numel() if output.dim() > 1 else output.numel()
    if isinstance(module, nn.Conv2d):
        return (
            per_image * (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
        )
    return per_image * module.in_features


@torch.no_grad()
def forward_with_hooks(model: nn.Module, inputs: torch.Tensor, hook: Any) -> Any:
    """One eval-mode, gradient-free forward pass with ``hook(module, inputs, output)`` on every conv and
    linear layer; returns the output. The model's mode is restored and the hooks removed afterwards."""
    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with eval_mode(model, handles):
        return model(inputs)


MACS_MEANING = (
    "MACs: multiply-accumulates of the convolutions and linear layers, per image (BatchNorm, activations, "
    "additions, pooling and biases are not counted); a MACs target is met within 2 % by this count and by "
    "torchinfo's \"Total mult-adds\", and within 3 % by Torch-Pruning's count_ops_and_params (which also "
    "counts BatchNorm, biases and activations): every pruned model is measured by all three."
)


def count_macs(model: nn.Module, inputs: int | torch.Tensor) -> int:
    """Conv and linear multiply-accumulates per image (the figure MACs targets refer to).

    ``inputs`` is an example batch, or the side of a square RGB image.
    """
    total = 0

    def hook(module, _inputs, output):
        nonlocal total
        total += layer_macs(module, output)

    if isinstance(inputs, int):
        inputs = torch.zeros(1, 3, inputs, inputs, device=next(model.parameters()).device)
    forward_with_hooks(model, inputs, hook)
    return total


# How far from a MACs target each counter may read (prunekit's own count, torchinfo's "Total mult-adds",
# Torch-Pruning's count_ops_and_params); a plan is measured by all three.
COUNTER_TOLERANCES = {"prunekit": 0.02, "torchinfo": 0.02, "torch_pruning": 0.03}


def macs_by_counters(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """The MACs of ``model`` on ``example`` by each counter of ``COUNTER_TOLERANCES`` (per batch, so compare
    ratios only); a counter that fails on this model (an operation it does not know) is left out."""
    import torch_pruning as tp
    import torchinfo

    counts = {"prunekit": count_macs(model, example)}
    others = {
        "torchinfo": lambda: torchinfo.summary(model, input_data=example, verbose=0).total_mult_adds,
        "torch_pruning": lambda: tp.utils.count_ops_and_params(model, example)[0],
    }
    with eval_mode(model):
        for name, count in others.items():
            try:
                counts[name] = int(count())
            except Exception:  # another tool's limit is not a reason to refuse a plan
                continue
    return counts


def summary(model: nn.Module, input_size: int) -> dict[str, Any]:
    """The blog's torchinfo figures: total params, mult-adds, params size, estimated total size (input 1x3xHxW)."""
    import torchinfo

    with eval_mode(model):
        stats = torchinfo.summary(model, input_size=(1, 3, input_size, input_size), verbose=0, device="cpu")
    params_bytes = stats.total_param_bytes
    total_bytes = stats.total_input + stats.total_output_bytes + params_bytes
    return {
        "total_params": int(stats.total_params),
        "mult_adds": int(stats.total_mult_adds),
        "params_size_mb": params_bytes / 1e6,
        "forward_backward_size_mb": stats.total_output_bytes / 1e6,
        "input_size_mb": stats.total_input / 1e6,
        "estimated_total_size_mb": total_bytes / 1e6,
        "table": str(stats),
    }


@torch.no_grad()  # not inference_mode: converting the model to channels_last there would make its
# parameters inference tensors, which later tracing (ONNX export) refuses
def latency(
    model: nn.Module | Sequence[nn.Module],
    input_size: int,
    batch_size: int = 1,
    warmup: int = 5,
    repeats: int | None = None,
    device: torch.device | str = "cpu",
    channels_last: bool = True,
    advance: Callable[[], Any] = lambda: None,
) -> dict[str, float] | list[dict[str, float]]:
    """Median wall time of a forward pass (fp32, eval mode) after warm-up, in milliseconds, over ``repeats``
    timed runs (``latency_repeats``).

    Given several models, times them in alternation, so a change in machine load hits each the same; the
    speed-up of a pruned model is only meaningful measured this way.
    """
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    x = torch.randn(batch_size, 3, input_size, input_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for m in models:
        m.eval()
        if channels_last:
            m.to(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    runs = [lambda m=m: (m(x), sync()) for m in models]
    times = alternate(runs, latency_repeats(repeats), warmup, advance)
    results = [timing_row(t, batch_size, torch.get_num_threads()) for t in times]
    return results if isinstance(model, (list, tuple)) else results[0]


def alternate(
    runs: Sequence[Any], repeats: int, warmup: int = 5, advance: Callable[[], Any] = lambda: None
) -> list[list[float]]:
    """Seconds per call of each ``run``, timed call by call in alternation after ``warmup`` calls each, so a
    change in machine load hits every run the same. For runs sharing one thread pool (PyTorch); ONNX Runtime
    sessions each have their own and are timed one at a time (``deploy.ort_times``)."""
    times: list[list[float]] = [[] for _ in runs]
    for run in runs:
        for _ in range(warmup):
            run()
    for _ in range(repeats):
        for run, bucket in zip(runs, times, strict=True):
            start = time.perf_counter()
            run()
            bucket.append(time.perf_counter() - start)
        advance()  # once a round: ``repeats`` in all
    return times


def timing_row(seconds: Sequence[float], batch_size: int, threads: int) -> dict[str, Any]:
    """The latency record of one model: median and fastest call in ms, throughput, and how it was timed."""
    median = statistics.median(seconds)
    return {
        "batch_size": batch_size,
        "median_ms": median * 1e3,
        "min_ms": min(seconds) * 1e3,
        "images_per_s": batch_size / median,
        "repeats": len(seconds),
        "threads": threads,
    }
