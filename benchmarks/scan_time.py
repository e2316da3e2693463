"""How long the sensitivity scan behind `prunekit prune`'s default allocation takes on the CIFAR-10 ResNet-18
baseline at its default counts (1,000 scoring + 512 BatchNorm training images, its 4-minute budget), with its
tries recovered (the default) and without (`--no-scan-recovery`). Run it on a quiet machine.

python benchmarks/scan_time.py runs/bench9/baseline/model.safetensors
python benchmarks/scan_time.py --fewshot

``--fewshot`` times the few-shot benchmark's scan instead (fewshot.py's ``prunekit.prune`` defaults: the
pretrained EfficientNet-Lite1 scanned on 512 unlabelled 240-px images, tries recovered; random images, as
timing does not depend on them; needs ``pip install -e '.[bench]'``), the image counts its budget fits
included; its result is added to ``results/scan_time.json`` under ``fewshot`` (the few-shot rows ran at one
thread with the other core fine-tuning: run it so to see the counts they got).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import FULL_ARCHIVE, RESULTS, machine, require, save
from prunekit.api import load_data_for, scan_batches
from prunekit.checkpoint import load_checkpoint
from prunekit.sensitivity import (
    SCAN_CALIBRATION_IMAGES,
    SCAN_IMAGES,
    SCAN_SECONDS,
    scan,
    scan_calibration,
)


def fewshot() -> None:
    """The few-shot benchmark's scan, timed; added to the results file under ``fewshot``."""
    from fewshot import EXAMPLE, SIZE, pretrained  # the benchmark-only packages: imported only here

    model = pretrained().eval()
    images = torch.randn(512, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    got = scan_calibration(model, EXAMPLE, [(x, None) for x in images.split(64)], recover=True)
    entry = {
        "seconds": time.perf_counter() - start,  # the dense model's predictions on the images included
        "scan_s": got["seconds"],
        "estimated_s": got["estimated_seconds"],
        "ratios": len(got["ratios"]),
        "images_used": [got["held_out_images"], got["calibration_images"]],
        "machine": machine(),  # the file's own "machine" is the CIFAR run's
    }
    print(entry, flush=True)
    save("scan_time", {**json.loads((RESULTS / "scan_time.json").read_text()), "fewshot": entry})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", type=Path, nargs="?")
    parser.add_argument("--data", default=str(FULL_ARCHIVE))
    parser.add_argument("--fewshot", action="store_true", help="time the few-shot benchmark's scan instead")
    args = parser.parse_args()
    if args.fewshot:
        return fewshot()
    if args.baseline is None:
        parser.error("the baseline checkpoint is required (or --fewshot)")
    require(Path(args.data))
    ckpt = load_checkpoint(args.baseline)
    bundle = load_data_for(ckpt.meta, args.data, None)
    held_out, calibration = scan_batches(bundle, SCAN_IMAGES, SCAN_CALIBRATION_IMAGES, 0)
    size = ckpt.meta["input_size"]
    result: dict = {"baseline": str(args.baseline), "budget_s": SCAN_SECONDS}
    for recover in (True, False):
        start = time.perf_counter()
        example = torch.zeros(1, 3, size, size)
        got = scan(ckpt.model, example, held_out, calibration, seconds=SCAN_SECONDS, recover=recover)
        result["recovered" if recover else "plain"] = {
            "seconds": time.perf_counter() - start,
            "estimated_s": got["estimated_seconds"],  # what the scan printed before it started
            "groups": len(got["groups"]),
            "ratios": len(got["ratios"]),
            "images_used": [got["held_out_images"], got["calibration_images"]],
        }
        print(recover, result["recovered" if recover else "plain"], flush=True)
    earlier = RESULTS / "scan_time.json"  # runs replaced stay in the file: timings move between machines
    if earlier.exists():
        previous = json.loads(earlier.read_text())
        result["earlier"] = [*previous.pop("earlier", []), previous]
    save("scan_time", result)


if __name__ == "__main__":
    main()
