"""How long the sensitivity scan behind `prunekit prune`'s default allocation takes on the CIFAR-10 ResNet-18
baseline at its default counts (1,000 scoring + 512 BatchNorm training images, its 4-minute budget), with its
tries recovered (the default) and without (`--no-scan-recovery`). Run it on a quiet machine.

python benchmarks/scan_time.py runs/bench9/baseline/model.safetensors
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import FULL_ARCHIVE, RESULTS, require, save
from prunekit.api import load_data_for, scan_batches
from prunekit.checkpoint import load_checkpoint
from prunekit.sensitivity import SCAN_CALIBRATION_IMAGES, SCAN_IMAGES, SCAN_SECONDS, scan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", type=Path)
    parser.add_argument("--data", default=str(FULL_ARCHIVE))
    args = parser.parse_args()
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
