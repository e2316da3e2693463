"""Recovery without labels, no fine-tuning at all: the CIFAR-10 ResNet-18 baseline pruned to 2x and 3x fewer
MACs, its accuracy after BatchNorm recalibration only, after recovery (re-fitting the readers of pruned
channels; with BatchNorm re-estimated after it too), and Torch-Pruning's recipe + BatchNorm recalibration. No label, no gradient step:
every row sees the same 512 unlabelled training images; accuracy is on the full test set.

python benchmarks/recovery.py runs/bench9/baseline/model.safetensors

Resumable row by row: each finished row is written to results/recovery.json at once; rows of another
baseline checkpoint (one trained again) are moved under `earlier_baselines` first.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import prunekit
from common import (
    FULL_ARCHIVE,
    RESULTS,
    for_baseline,
    machine,
    read_results,
    require,
    residual_sums,
    rounding,
    torch_pruning_uniform,
)
from prunekit.api import calibration_batches, load_data_for, scan_batches
from prunekit.checkpoint import load_checkpoint
from prunekit.finetuning import recalibrate_batchnorm
from prunekit.measure import count_macs, evaluate
from prunekit.sensitivity import SCAN_CALIBRATION_IMAGES, SCAN_IMAGES, SCAN_SECONDS, scan

TARGETS = {"2x": 0.5, "3x": 1 / 3}
ALLOCATIONS = ("global", "sensitivity")
IMAGES = 512
OUT = RESULTS / "recovery.json"


def rows() -> list[str]:
    """``torch-pruning-T``, and ``ALLOCATION[+refitscan][+recovery[+bn|+plainsums]][/CRITERION]-T``
    (criterion l2 unless named; ``+refitscan``: the scan's tries recovered before they are scored; ``+roundN``:
    channel counts kept multiples of N; ``+bn``:
    BatchNorm statistics re-estimated on the same images after the re-fit; ``+plainsums``: layers writing
    into residual sums fitted to their own outputs, not to the sums)."""
    names = []
    for target in TARGETS:
        names.append(f"torch-pruning-{target}")
        for allocation in ALLOCATIONS:
            names += [f"{allocation}-{target}", f"{allocation}+recovery-{target}"]
            names.append(f"{allocation}+recovery+bn-{target}")  # BatchNorm re-estimated after the re-fit
            names.append(f"{allocation}+recovery/group-l2-{target}")
            # every layer fitted to its own dense output, residual sums too (recovery before 2026-12-06)
            names.append(f"{allocation}+recovery+plainsums/group-l2-{target}")
        # the same scan, its curves read as points of accuracy instead of divergence from the dense model
        names.append(f"sensitivity(accuracy)+recovery-{target}")
        # the scan's tries recovered before they are scored (scan_recovery, the default since 2026-12-07)
        names.append(f"sensitivity+refitscan+recovery-{target}")
        names.append(f"sensitivity+refitscan+recovery/group-l2-{target}")  # the defaults since 2026-12-07
        names.append(f"sensitivity+refitscan+recovery/refit-{target}")  # scored by the re-fit error
        # channel counts kept multiples of 16 (round_to=16: ONNX Runtime's fast convolutions)
        names.append(f"sensitivity+refitscan+recovery+round16/group-l2-{target}")
    return names


def load() -> dict:
    return read_results(OUT, "rows")


RECOVERY_KEPT = (
    "baseline",
    "dense_accuracy",
    *(f"{scan}_{what}" for scan in ("scan", "recovered_scan") for what in ("seconds", "images")),
    "rows",
    "machine",
)


def write(results: dict) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({**results, "machine": machine()}, indent=1) + "\n")


def prune_row(row: str, dense: torch.nn.Module, context: dict) -> tuple[torch.nn.Module, dict]:
    """The pruned (and recovered, or recalibrated) model of ``row``, and what it took."""
    kind, target = row.rsplit("-", 1)
    images = context["images"]
    start = time.perf_counter()
    if kind == "torch-pruning":
        out = Path(context["runs"]) / f"{row}.safetensors"
        info = torch_pruning_uniform(context["baseline"], TARGETS[target], out)
        model = load_checkpoint(out).model
        recalibrate_batchnorm(model, images)
        return model, {**info, "seconds": time.perf_counter() - start}
    kind, _, criterion = kind.partition("/")
    allocation, *steps = kind.split("+")
    model = copy.deepcopy(dense)
    with residual_sums("plainsums" not in steps):  # +plainsums: each layer fitted to its own output
        report = prunekit.prune(
            model,
            torch.zeros(1, 3, 32, 32),
            target_macs=TARGETS[target],
            allocation=allocation.partition("(")[0],
            sensitivity=read_as(context["recovered_scan" if "refitscan" in steps else "scan"], allocation),
            calibration=images,
            importance=criterion or "l2",
            reconstruct="recovery" in steps,
            round_to=rounding(steps),
        )
    if "recovery" not in steps or "bn" in steps:  # recalibration only, or after the re-fit (+bn)
        recalibrate_batchnorm(model, images)
    info = {"macs_ratio": report.macs_ratio, "seconds": time.perf_counter() - start}
    if report.reconstruction:
        rec = report.reconstruction
        info["reconstruction"] = {
            "seconds": rec["seconds"],
            "images": rec["images"],
            "layers": len(rec["layers"]),
            "mean_error_before": sum(f["error_before"] for f in rec["layers"]) / len(rec["layers"]),
            "mean_error_after": sum(f["error_after"] for f in rec["layers"]) / len(rec["layers"]),
        }
    return model, info


def read_as(scan_result: dict | None, allocation: str) -> dict | None:
    """The scan for a ``sensitivity`` row: as measured, or with its loss read as ``sensitivity(LOSS)`` says."""
    if not allocation.startswith("sensitivity"):
        return None
    loss = allocation.partition("(")[2].rstrip(")")
    return {**scan_result, "loss": loss} if loss else scan_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", type=Path)
    parser.add_argument("--data", default=str(FULL_ARCHIVE))
    parser.add_argument("--runs", default="runs/recovery")
    parser.add_argument("--only", default=None, help="comma-separated rows to (re)do")
    args = parser.parse_args()
    require(Path(args.data)) if args.data != "cifar10" else None
    ckpt = load_checkpoint(args.baseline)
    bundle = load_data_for(ckpt.meta, args.data, None)
    test = bundle.loader("test")
    results = for_baseline(load(), args.baseline, RECOVERY_KEPT)
    results["baseline"] = str(args.baseline)
    if "dense_accuracy" not in results:
        results["dense_accuracy"] = evaluate(ckpt.model, test)["accuracy"]
        write(results)
    images = [x for x, _ in calibration_batches(ckpt.meta, bundle, IMAGES, seed=1)]
    context = {"images": images, "baseline": args.baseline, "runs": args.runs}
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    wanted = args.only.split(",") if args.only else rows()
    todo = [r for r in wanted if args.only or r not in results["rows"]]
    for key, recover in (("scan", False), ("recovered_scan", True)):
        if any(r.startswith("sensitivity") and ("refitscan" in r) == recover for r in todo):
            start = time.perf_counter()
            held_out, recal = scan_batches(bundle, SCAN_IMAGES, SCAN_CALIBRATION_IMAGES, 0)
            example = torch.zeros(1, 3, 32, 32)
            context[key] = scan(ckpt.model, example, held_out, recal, seconds=SCAN_SECONDS, recover=recover)
            results[f"{key}_seconds"] = time.perf_counter() - start
            results[f"{key}_images"] = [context[key]["held_out_images"], context[key]["calibration_images"]]
    for row in todo:
        model, info = prune_row(row, ckpt.model, context)
        acc = evaluate(model, test)["accuracy"]
        results["rows"][row] = {
            **info,
            "accuracy": acc,
            "vs_dense": acc - results["dense_accuracy"],
            "macs_ratio": count_macs(model, 32) / count_macs(ckpt.model, 32),
        }
        write(results)
        print(f"{row}: {acc:.2%} ({acc - results['dense_accuracy']:+.2%} vs dense)", flush=True)


if __name__ == "__main__":
    main()
