"""``prunekit eval``: accuracy, summary, MACs and latency of a checkpoint (and of its dense parent)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_checkpoint
from ..console import stages
from ..errors import UsageError, arg
from ..files import DirectoryLock, check_outputs
from ..measure import count_macs, count_params, latency, latency_repeats, summary
from ..models import build_model
from ..options import Command, flag
from .rundir import CHECKPOINT, DATA_FLAGS, load_data_for, overwrite_flag, run_printed


def evaluate_checkpoint(
    path: str | Path,
    data: str | None = None,
    data_dir: str | None = None,
    subset: int | None = None,
    batch_size: int | None = None,
    measure_latency: bool = True,
    out: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Accuracy (overall, per class), the torchinfo summary, MACs and CPU latency of a checkpoint; also
    written to the JSON file ``out`` when given (refused if it exists, unless ``overwrite``)."""
    if out is not None:
        check_outputs([path], [out], overwrite)
    ckpt = load_checkpoint(path)
    meta = ckpt.meta
    bundle = load_data_for(meta, data, data_dir, subset)
    model = ckpt.model
    from ..core import evaluate as evaluate_model

    acc = evaluate_model(model, bundle.loader("test", batch_size), num_classes=meta["num_classes"])
    size = meta["input_size"]
    table = summary(model, size)
    results: dict[str, Any] = {
        "checkpoint": str(path),
        "model": meta["model"],
        "accuracy": acc["accuracy"],
        "per_class": dict(zip(meta["classes"], acc["per_class"], strict=True)),
        "test_images": acc["images"],
        "params": count_params(model),
        "macs": count_macs(model, size),
        "file_size_mb": Path(path).stat().st_size / 1e6,
        "summary": {k: v for k, v in table.items() if k != "table"},
        "summary_table": table["table"],
    }
    if measure_latency:
        dense = dense_parent_architecture(meta)
        with stages() as stage:
            # The dense parent's architecture, timed in alternation with the pruned model on the same input.
            models = [model] if dense is None else [model, dense]
            pairs = {
                f"batch{b}": latency(
                    models, size, b, advance=stage(f"PyTorch latency, batch {b}", latency_repeats())
                )
                for b in (1, 64)
            }
            results["latency"] = {k: v[0] for k, v in pairs.items()}
            if dense is not None:
                results["parent_latency"] = {k: v[1] for k, v in pairs.items()}
                results["speedup"] = {k: v[1]["median_ms"] / v[0]["median_ms"] for k, v in pairs.items()}
            results.update(onnxruntime_latency(model, meta, dense, stage=stage))
            if dense is not None:
                results["off_block_counts"] = off_block_counts(model, dense)
            odd = results.get("off_block_counts")
            results["note"] = slower_in_onnxruntime(results.get("ort_speedup", {}), odd)
    if out is not None:
        from ..files import write_json

        with DirectoryLock(Path(out).parent):
            write_json(out, {k: v for k, v in results.items() if k != "summary_table"})
    return results


def dense_parent_architecture(meta: dict[str, Any]) -> torch.nn.Module | None:
    """The dense parent's architecture (random weights: latency does not depend on them), if pruned."""
    parent = meta.get("parent")
    return build_model(parent["model"], meta["num_classes"]).eval() if parent else None


# ONNX Runtime's fast CPU convolutions work on blocks of this many channels (AVX512; AVX2's 8 divides it): a
# pruned model with other counts measured slower than its dense parent (results/deploy-round1-global.json)
ORT_CHANNEL_BLOCK = 16


def off_block_counts(model: torch.nn.Module, dense: torch.nn.Module) -> list[int]:
    """The distinct output channel counts of ``model``'s pruned convs (those narrower than in ``dense``) that
    are not multiples of ``ORT_CHANNEL_BLOCK``."""
    widths = {n: m.out_channels for n, m in dense.named_modules() if isinstance(m, torch.nn.Conv2d)}
    return sorted(
        {
            m.out_channels
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Conv2d)
            and m.out_channels != widths.get(n)
            and m.out_channels % ORT_CHANNEL_BLOCK
        }
    )


def slower_in_onnxruntime(speedups: dict[str, float], odd: list[int] | None) -> str | None:
    """One line when the pruned model measured slower than its dense parent in ONNX Runtime: which of its
    pruned channel counts are off ``ORT_CHANNEL_BLOCK`` (``odd``, from ``off_block_counts``; None without
    a dense parent), and how to prune for this runtime."""
    slower = [batch for batch, speedup in speedups.items() if speedup < 1]
    if not slower or odd is None:
        return None
    counts = ", ".join(map(str, odd[:4])) + (", ..." if len(odd) > 4 else "")
    why = (
        f"its pruned channel counts ({counts}) are not multiples of {ORT_CHANNEL_BLOCK}, the blocks its fast "
        f"convolutions work in; prune with {arg('round_to')} {ORT_CHANNEL_BLOCK}, or with"
        if odd
        else "prune with"
    )
    return (
        f"slower than its dense parent in ONNX Runtime at {' and '.join(slower)}: {why} "
        f"{arg('target_latency')} ... {arg('latency_runtime')} onnxruntime, which measures what this runtime "
        f"runs fast"
    )


def onnxruntime_latency(
    model: torch.nn.Module,
    meta: dict[str, Any],
    dense: torch.nn.Module | None = None,
    threads: int | None = None,
    stage: Callable[[str, int], Callable[[], None]] | None = None,
) -> dict[str, Any]:
    """Latency in ONNX Runtime (CPU), at batch 1 and 64, against ``dense`` (the parent's architecture) when
    given; empty when ONNX Runtime is not installed. ``stage`` adds progress lines (``console.stages``)."""
    import contextlib
    import tempfile

    from ..deploy import require_onnxruntime, write_onnx

    try:
        require_onnxruntime()
    except UsageError:
        return {}
    threads = threads or torch.get_num_threads()
    size = meta["input_size"]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        stage = stage or stack.enter_context(stages())
        paths = [write_onnx(model, size, Path(tmp) / "model.onnx")]
        if dense is not None:
            paths.append(write_onnx(dense, size, Path(tmp) / "dense.onnx"))
        pairs = _ort_timing(paths, size, threads, stage)
    results: dict[str, Any] = {"ort_latency": {k: v[0] for k, v in pairs.items()}}
    if dense is not None:
        results["ort_parent_latency"] = {k: v[1] for k, v in pairs.items()}
        results["ort_speedup"] = {k: v[1]["median_ms"] / v[0]["median_ms"] for k, v in pairs.items()}
    return results


def _ort_timing(
    paths: list[Path], size: int, threads: int, stage: Callable[[str, int], Callable[[], None]]
) -> dict[str, list[dict[str, Any]]]:
    """ONNX Runtime latency records of ``paths`` at batch 1 and 64, each batch size a progress line."""
    from ..deploy import ort_blocks, ort_latency

    blocks = ort_blocks(len(paths))
    return {
        f"batch{b}": ort_latency(
            paths, size, b, threads, advance=stage(f"ONNX Runtime latency, batch {b}", blocks)
        )
        for b in (1, 64)
    }


FLAGS = [
    CHECKPOINT,
    *DATA_FLAGS,
    flag("batch_size", default=None, help="default: 500 at 32 px, 64 at 224 px"),
    flag("measure_latency", "--no-latency", action="store_false", help="skip the latency measurement"),
    flag("out", "--json", type=Path, default=None, help="also write the results to this JSON file"),
    overwrite_flag("the --json file"),
]


def main(args: argparse.Namespace) -> int:
    """``prunekit eval``: the figures, printed (and kept in ``--json``)."""
    from ..printing import print_eval

    return run_printed(evaluate_checkpoint, print_eval, args, args.checkpoint)


COMMAND = Command("eval", "accuracy, model summary and latency of a checkpoint", FLAGS, main)
