"""How long the default criterion's scoring, recovery and the default allocation's scan take on a 224-px
ResNet-50 (random weights and images serve for timing): the `refit` scores and recovery at 2x fewer MACs on
512 calibration images, and the whole sensitivity scan at its
default counts (1,000 scoring + 512 BatchNorm images offered, shrunk to its time budget).

python benchmarks/scale.py [--plain-sums]   (--plain-sums: recovery timed again without residual-sum targets)
python benchmarks/scale.py --scan-only [--no-scan-recovery]   (only the scan, merged into the last full run's
figures; --no-scan-recovery: its tries not recovered, the default before 2026-12-07, kept as scan_plain)
python benchmarks/scale.py --recovery-only   (only the refit scores and recovery, merged the same way)
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torchvision

import prunekit
from common import RESULTS, machine, residual_sums, save
from prunekit import sensitivity
from prunekit.finetuning import recalibrate_batchnorm
from prunekit.requests import PruneRequest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--no-scan", action="store_true", help="time recovery only")
    parser.add_argument(
        "--plain-sums", action="store_true", help="time recovery again without residual-sum targets"
    )
    parser.add_argument(
        "--scan-only", action="store_true", help="time only the scan (merged into scale.json)"
    )
    parser.add_argument(
        "--recovery-only",
        action="store_true",
        help="time only the default criterion's scores and recovery (merged into scale.json)",
    )
    parser.add_argument(
        "--scan-recovery",
        action=argparse.BooleanOptionalAction,
        default=PruneRequest.scan_recovery,
        help="the scan's tries recovered before they are scored (the default)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10).eval()
    example = torch.zeros(1, 3, args.size, args.size)
    images = [torch.randn(64, 3, args.size, args.size) for _ in range(args.images // 64)]
    recalibrate_batchnorm(model, images[:2])
    key = "scan" if args.scan_recovery else "scan_plain"
    if args.scan_only:
        merge({key: time_scan(model, example, args.size, args.scan_recovery)})
        return
    if args.recovery_only:
        merge(
            {
                "refit_scoring": time_refit_scoring(model, images),
                "recovery": time_recovery(model, example, images),
            }
        )
        return
    result: dict = {"model": "resnet50 (random weights)", "image_size": args.size}

    result["refit_scoring"] = time_refit_scoring(model, images)
    print(result["refit_scoring"], flush=True)
    result["recovery"] = time_recovery(model, example, images)
    print(result["recovery"], flush=True)
    if args.plain_sums:  # the same, residual sums not targeted: what fitting them costs
        with residual_sums(False):
            result["recovery_plain_sums"] = time_recovery(model, example, images)
        print(result["recovery_plain_sums"], flush=True)

    if not args.no_scan:
        result[key] = time_scan(model, example, args.size, args.scan_recovery)
        print(result[key], flush=True)
    save("scale", result)


def merge(measured: dict) -> None:
    """``measured`` merged into the last full run's figures, each with its own machine and date; a
    measurement replaced stays in the file under ``KEY_earlier`` (timings move between runs)."""
    kept = json.loads(RESULTS.joinpath("scale.json").read_text())
    for key, value in measured.items():
        if key in kept:
            kept.setdefault(f"{key}_earlier", []).append(kept[key])
        kept[key] = {"machine": machine(), **value}
        print(key, kept[key], flush=True)
    RESULTS.joinpath("scale.json").write_text(json.dumps(kept, indent=2) + "\n")


def time_refit_scoring(model: torch.nn.Module, images: list[torch.Tensor]) -> dict:
    """The ``refit`` criterion's scores (the default with images since 2026-12-07) on ``images``, as
    ``prunekit.prune`` computes them: one pass, capped by the activation budget."""
    from prunekit.importance import make_importance
    from prunekit.regression import images_per_pass

    start = time.perf_counter()
    make_importance("refit").calibrate(model, images)
    x = torch.cat(images)
    return {
        "seconds": time.perf_counter() - start,
        "images_given": len(x),
        "images_used": min(len(x), images_per_pass(model, x)),
    }


def time_recovery(model: torch.nn.Module, example: torch.Tensor, images: list[torch.Tensor]) -> dict:
    """Pruning a copy of ``model`` to 2x fewer MACs (``global``: no scan) with recovery on ``images``, with
    the default criterion (``refit`` since 2026-12-07: its scoring is in ``prune_and_recover_s``)."""
    pruned = copy.deepcopy(model)
    start = time.perf_counter()
    report = prunekit.prune(pruned, example, target_macs=0.5, allocation="global", calibration=images)
    rec = report.reconstruction
    return {
        "importance": report.importance,
        "prune_and_recover_s": time.perf_counter() - start,
        "recovery_s": rec["seconds"],
        "images_given": rec["images_given"],
        "images_used": rec["images"],
        "layers": len(rec["layers"]),
        "macs_ratio": report.macs_ratio,
    }


def time_scan(model: torch.nn.Module, example: torch.Tensor, size: int, recover: bool) -> dict:
    """The whole scan as ``prunekit prune`` runs it by default (``recover``: its tries recovered, as by
    default; else as with --no-scan-recovery): 1,000 scoring + 512 BatchNorm images offered, shrunk to its
    time budget."""
    gen = torch.Generator().manual_seed(1)
    held_out = [
        (torch.randn(50, 3, size, size, generator=gen), torch.randint(0, 10, (50,), generator=gen))
        for _ in range(sensitivity.SCAN_IMAGES // 50)
    ]
    calibration = [
        torch.randn(64, 3, size, size, generator=gen)
        for _ in range(sensitivity.SCAN_CALIBRATION_IMAGES // 64)
    ]
    start = time.perf_counter()
    scan = sensitivity.scan(
        model, example, held_out, calibration, seconds=sensitivity.SCAN_SECONDS, recover=recover
    )
    return {
        "seconds": time.perf_counter() - start,
        "estimated_s": scan["estimated_seconds"],  # what the scan printed before it started
        "groups": len(scan["groups"]),
        "ratios": len(scan["ratios"]),
        "images_offered": [sensitivity.SCAN_IMAGES, sensitivity.SCAN_CALIBRATION_IMAGES],
        "images_used": [scan["held_out_images"], scan["calibration_images"]],
        "budget_s": sensitivity.SCAN_SECONDS,
        "recovered_tries": recover,
    }


if __name__ == "__main__":
    main()
