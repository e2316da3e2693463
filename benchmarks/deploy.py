"""Pruning plus int8, measured where it is deployed: the CIFAR-10 ResNet-18 pruned 2x and fine-tuned, then
quantized to int8 with ONNX Runtime; accuracy, size on disk and ONNX Runtime latency (batch 1 and 64) for
dense fp32 -> pruned fp32 -> pruned int8, timed in one run (repeated --runs times, every run recorded).

    python benchmarks/deploy.py [--epochs 10] [--finetune-epochs 3]

Stages are skipped when their output exists under runs/deploy/ (delete it to start over), so an
interrupted run continues; the latency and quantization step runs last and is the one to rerun alone.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from common import FULL_ARCHIVE, ROOT, require, save
from prunekit import api, load
from prunekit.measure import count_macs
from prunekit.options import choices
from prunekit.pruning import PruneRequest
from prunekit.train import TrainConfig

RUN = ROOT / "runs" / "deploy"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10, help="baseline training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--calibration-images", type=int, default=512)
    parser.add_argument(
        "--round-to",
        type=int,
        default=16,
        help="keep channel counts multiples of N (1: as the threshold leaves them)",
    )
    parser.add_argument(
        "--allocation",
        default="sensitivity",
        choices=choices("allocation"),
        help="how the 2x is spread across layers (default: the command line's, sensitivity)",
    )
    parser.add_argument(
        "--target-latency",
        type=float,
        default=None,
        help="prune to this fraction of the dense latency instead of half the MACs (see prunekit prune)",
    )
    parser.add_argument("--latency-batch", type=int, default=PruneRequest.latency_batch)
    parser.add_argument(
        "--latency-runtime", default=PruneRequest.latency_runtime, choices=choices("latency_runtime")
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=5,
        help="quantize-and-time runs; the first is the report, every run's times and speed-ups are recorded",
    )
    return parser.parse_args()


def latency_tag(args: argparse.Namespace) -> str:
    """What a latency target adds to the run's file names and result name ("" for half the MACs)."""
    if args.target_latency is None:
        return ""
    return f"-latency{args.target_latency:g}-{args.latency_runtime}-b{args.latency_batch}"


def prepared_models(args: argparse.Namespace, tag: str) -> tuple[Path, Path]:
    """The dense baseline and the pruned, fine-tuned model (each stage trained, pruned or fine-tuned here
    unless its output exists)."""
    data = str(require(FULL_ARCHIVE))
    dense = RUN / "baseline" / "model.safetensors"
    if not dense.exists():
        resume = (RUN / "baseline" / "checkpoint.safetensors").exists()
        api.train("resnet18", data, RUN / "baseline", TrainConfig(epochs=args.epochs), resume=resume)
    pruned = RUN / f"pruned{tag}.safetensors"
    if not pruned.exists():
        target = (
            {"target_macs": 0.5}
            if args.target_latency is None
            else {
                "target_latency": args.target_latency,
                "latency_batch": args.latency_batch,
                "latency_runtime": args.latency_runtime,
            }
        )
        request = PruneRequest(**target, round_to=args.round_to, allocation=args.allocation)
        api.prune_checkpoint(dense, request, importance="l2", out=pruned)
    finetuned = RUN / f"finetune{tag}" / "model.safetensors"
    if not finetuned.exists():
        resume = (RUN / f"finetune{tag}" / "checkpoint.safetensors").exists()
        api.finetune_checkpoint(
            pruned, RUN / f"finetune{tag}", recipe="full", epochs=args.finetune_epochs, resume=resume
        )
    return dense, finetuned


def quantized_report(args: argparse.Namespace, tag: str, dense: Path, finetuned: Path) -> dict:
    """``--runs`` quantize-and-time runs of ``finetuned``: the first's report, with every run's times and
    speed-ups, both models' PyTorch accuracy, the command and the MACs ratio."""
    runs = [
        api.quantize_checkpoint(
            finetuned,
            out=RUN / f"model{tag}-int8.onnx",
            calibration_images=args.calibration_images,
            threads=torch.get_num_threads(),
            overwrite=True,
        )
        for _ in range(args.runs)
    ]
    report = runs[0]
    # Latency at batch 1 is a tenth of a millisecond: say how much it moves from one whole run to the next.
    report["runs"] = [
        {
            "int8_accuracy": r["rows"]["int8"]["accuracy"],
            "median_ms": {
                name: {b: t["median_ms"] for b, t in row["latency"].items()}
                for name, row in r["rows"].items()
            },
            "speedup_vs_dense_fp32": r["speedup_vs_dense_fp32"],
        }
        for r in runs
    ]
    report["median_speedup_over_runs"] = {
        b: statistics.median(r["speedup_vs_dense_fp32"][b] for r in runs) for b in ("batch1", "batch64")
    }
    dense_model, finetuned_model = load(dense), load(finetuned)
    report["pytorch_fp32_accuracy"] = {
        "dense": dense_model.prunekit_meta["metrics"]["test_accuracy"],
        "pruned_finetuned": finetuned_model.prunekit_meta["metrics"]["test_accuracy"],
    }
    report["command"] = (
        f"python benchmarks/deploy.py --epochs {args.epochs} --finetune-epochs {args.finetune_epochs} "
        f"--calibration-images {args.calibration_images} --round-to {args.round_to} --allocation {args.allocation} "
        f"--runs {args.runs}"
        + (
            f" --target-latency {args.target_latency:g} --latency-runtime {args.latency_runtime} "
            f"--latency-batch {args.latency_batch}"
            if args.target_latency is not None
            else ""
        )
    )
    report["round_to"], report["allocation"] = args.round_to, args.allocation
    report["macs_ratio"] = count_macs(finetuned_model, 32) / count_macs(dense_model, 32)
    return report


def print_report(report: dict) -> None:
    """One line a model (accuracy, size, latency at batch 1 and 64), then each run's int8 speed-ups."""
    for name, row in report["rows"].items():
        lat = row["latency"]
        acc = "n/a" if row["accuracy"] is None else f"{row['accuracy']:.2%}"
        print(
            f"{name:12s} {acc:>8s} {row['size_mb']:7.2f} MB  {lat['batch1']['median_ms']:7.3f} ms  {lat['batch64']['median_ms']:8.2f} ms"
        )
    for i, r in enumerate(report["runs"]):
        speedup = r["speedup_vs_dense_fp32"]
        print(
            f"run {i + 1}: int8 vs dense fp32 {speedup['batch1']:.2f}x at batch 1, {speedup['batch64']:.2f}x at 64"
        )


def main() -> None:
    args = parse_args()
    latency = latency_tag(args)
    tag = (
        ("" if args.round_to == 1 else f"-round{args.round_to}")
        + ("" if args.allocation == "global" else f"-{args.allocation}")
        + latency
    )
    dense, finetuned = prepared_models(args, tag)
    report = quantized_report(args, tag, dense, finetuned)
    name = "deploy" if args.round_to == 16 else f"deploy-round{args.round_to}"
    save((name if args.allocation == "sensitivity" else f"{name}-{args.allocation}") + latency, report)
    print_report(report)


if __name__ == "__main__":
    main()
