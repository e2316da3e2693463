"""How long recovery and the default allocation's scan take on a 224-px ResNet-50 (random weights and images
serve for timing): recovery at 2x fewer MACs on 512 calibration images, and the sensitivity scan at its
default counts (1,000 scoring + 512 BatchNorm images), timed on its first ``--groups`` groups and the
whole scan's time estimated from them (the estimate is labelled as such in the result).

python benchmarks/scale.py
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torchvision

import prunekit
from common import save
from prunekit import sensitivity
from prunekit.finetuning import recalibrate_batchnorm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument(
        "--groups", type=int, default=0, help="time the scan on its first N groups too (0: skip the scan)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10).eval()
    example = torch.zeros(1, 3, args.size, args.size)
    images = [torch.randn(64, 3, args.size, args.size) for _ in range(args.images // 64)]
    recalibrate_batchnorm(model, images[:2])
    result: dict = {"model": "resnet50 (random weights)", "image_size": args.size}

    pruned = copy.deepcopy(model)
    start = time.perf_counter()
    report = prunekit.prune(pruned, example, target_macs=0.5, allocation="global", calibration=images)
    rec = report.reconstruction
    result["recovery"] = {
        "prune_and_recover_s": time.perf_counter() - start,
        "recovery_s": rec["seconds"],
        "images_given": rec["images_given"],
        "images_used": rec["images"],
        "layers": len(rec["layers"]),
        "macs_ratio": report.macs_ratio,
    }
    print(result["recovery"], flush=True)

    if args.groups:
        result["scan"] = time_scan(model, example, args.size, args.groups)
        print(result["scan"], flush=True)
    save("scale", result)


def time_scan(model: torch.nn.Module, example: torch.Tensor, size: int, groups: int) -> dict:
    """The scan at its default counts over its first ``groups`` groups; the whole scan estimated from them
    (the dense pass once, the per-group time for every group)."""
    roots = sensitivity.prunable_roots(model, example)
    labels = torch.randint(0, 10, (sensitivity.SCAN_IMAGES,))
    held_out = [
        (torch.randn(50, 3, size, size), labels[i : i + 50]) for i in range(0, sensitivity.SCAN_IMAGES, 50)
    ]
    calibration = [torch.randn(64, 3, size, size) for _ in range(sensitivity.SCAN_CALIBRATION_IMAGES // 64)]
    timed = roots[:groups]
    real = sensitivity.prunable_roots
    sensitivity.prunable_roots = lambda *a, **k: timed  # the scan's own loop, over the first groups only
    try:
        start = time.perf_counter()
        dense_pass = time.perf_counter()
        sensitivity._accuracy(model, held_out)
        dense_pass = time.perf_counter() - dense_pass
        scan = sensitivity.scan(model, example, held_out, calibration)
        seconds = time.perf_counter() - start - dense_pass
    finally:
        sensitivity.prunable_roots = real
    return {
        "groups": len(roots),
        "ratios": len(scan["ratios"]),
        "images": sensitivity.SCAN_IMAGES,
        "calibration_images": sensitivity.SCAN_CALIBRATION_IMAGES,
        "groups_timed": len(timed),
        "seconds_for_groups_timed": seconds,
        "dense_pass_s": dense_pass,
        "estimated_seconds_all_groups": dense_pass + (seconds - dense_pass) / len(timed) * len(roots),
    }


if __name__ == "__main__":
    main()
