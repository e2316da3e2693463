"""``prunekit sensitivity``: each prunable group pruned alone, scored on held-out training images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_checkpoint
from ..errors import UsageError, arg
from ..files import DirectoryLock, check_outputs
from .rundir import load_data_for, scan_batches


def sensitivity_checkpoint(
    path: str | Path,
    out: str | Path | None = None,
    ratios: tuple[float, ...] | None = None,
    images: int | None = None,
    calibration_images: int | None = None,
    importance: str = "l2",
    data: str | None = None,
    data_dir: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Sensitivity scan of a checkpoint on held-out training images; writes ``out`` (JSON) and a PNG beside it.
    ``images`` and ``calibration_images`` default to ``SCAN_IMAGES`` and ``SCAN_CALIBRATION_IMAGES``, both
    shrunk to finish in about ``SCAN_SECONDS``; counts given are used as they are."""
    from ..files import write_json
    from ..sensitivity import RATIOS, SCAN_CALIBRATION_IMAGES, SCAN_IMAGES, SCAN_SECONDS, plot, scan

    seconds = SCAN_SECONDS if images is None and calibration_images is None else None
    ratios = tuple(ratios or RATIOS)
    images = SCAN_IMAGES if images is None else images
    calibration_images = SCAN_CALIBRATION_IMAGES if calibration_images is None else calibration_images
    for name, value in (("images", images), ("calibration_images", calibration_images)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{arg(name)} must be a positive whole number, got {value!r}")
    out = Path(out) if out else Path(path).with_name(Path(path).stem + "-sensitivity.json")
    check_outputs([path], [out, out.with_suffix(".png")], overwrite)
    ckpt = load_checkpoint(path)
    meta = ckpt.meta
    bundle = load_data_for(meta, data, data_dir)
    held_out, calibration = scan_batches(bundle, images, calibration_images, seed)
    size = meta["input_size"]
    with DirectoryLock(out.parent):
        result = scan(
            ckpt.model, torch.zeros(1, 3, size, size), held_out, calibration, ratios, importance, seconds
        )
        result["checkpoint"] = str(path)
        write_json(out, result)
        plot(result, out.with_suffix(".png"))
    return result
