"""``prunekit sensitivity``: each prunable group pruned alone, scored on held-out training images."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_checkpoint
from ..console import renamed_keyword, warn
from ..files import DirectoryLock, check_outputs
from ..importance import NETWORK_WIDE
from ..options import OPTIONS, SEED, Command, flag, validate
from ..requests import PruneRequest
from ..sensitivity import RATIOS, SCAN_CALIBRATION_IMAGES, SCAN_IMAGES
from .rundir import CHECKPOINT, DATA_FLAGS, default_output, load_data_for, run_printed, scan_batches


def sensitivity_checkpoint(
    path: str | Path,
    out: str | Path | None = None,
    ratios: tuple[float, ...] | None = None,
    images: int | None = None,
    recalibration_images: int | None = None,
    importance: str = NETWORK_WIDE,
    data: str | None = None,
    data_dir: str | None = None,
    subset: int | None = None,
    seed: int = SEED,
    overwrite: bool = False,
    calibration_images: int | None = None,
    scan_recovery: bool = PruneRequest.scan_recovery,
    prune_input_conv: bool = PruneRequest.prune_input_conv,
) -> dict[str, Any]:
    """Sensitivity scan of a checkpoint on held-out training images; writes ``out`` (JSON) and a PNG beside it.
    ``images`` and ``recalibration_images`` (BatchNorm re-estimation after each try) default to
    ``SCAN_IMAGES`` and ``SCAN_CALIBRATION_IMAGES``, both shrunk to finish in about ``SCAN_SECONDS``; counts
    given are used as they are. ``calibration_images`` is ``recalibration_images``' name until 0.2.
    ``scan_recovery``: each try recovered before it is scored (``prunekit prune --no-scan-recovery``: not);
    ``prune_input_conv``: the input conv's group is scanned too (for ``prune --prune-input-conv``)."""
    from ..files import write_json
    from ..sensitivity import SCAN_SECONDS, plot, scan, scan_options

    recalibration_images = renamed_keyword(
        "sensitivity_checkpoint", "calibration_images", "recalibration_images", calibration_images,
        recalibration_images,
    )  # fmt: skip
    seconds = SCAN_SECONDS if images is None and recalibration_images is None else None
    ratios = tuple(ratios or RATIOS)
    images = SCAN_IMAGES if images is None else images
    recalibration_images = SCAN_CALIBRATION_IMAGES if recalibration_images is None else recalibration_images
    validate({"images": images, "recalibration_images": recalibration_images})
    out = default_output(path, out, "-sensitivity.json")
    check_outputs([path], [out, out.with_suffix(".png")], overwrite)
    ckpt = load_checkpoint(path)
    meta = ckpt.meta
    bundle = load_data_for(meta, data, data_dir, subset)
    held_out, calibration = scan_batches(bundle, images, recalibration_images, seed)
    size = meta["input_size"]
    with DirectoryLock(out.parent):
        result = scan(
            ckpt.model,
            torch.zeros(1, 3, size, size),
            held_out,
            calibration,
            ratios,
            importance,
            seconds,
            **scan_options(PruneRequest(prune_input_conv=prune_input_conv, scan_recovery=scan_recovery)),
        )
        result["checkpoint"] = str(path)
        write_json(out, result)
        plot(result, out.with_suffix(".png"))
    return result


FLAGS = [
    CHECKPOINT,
    flag("out", type=Path, default=None, help="JSON (default: <checkpoint>-sensitivity.json); PNG beside"),
    flag("ratios", default=",".join(map(str, RATIOS)), help="comma-separated fractions of channels"),
    flag("images", help=f"held-out training images (default {SCAN_IMAGES})"),
    flag(
        "recalibration_images",
        help=f"training images that re-estimate BatchNorm after each try (default {SCAN_CALIBRATION_IMAGES})",
    ),
    # its name until 0.2: "calibration" is the images that score importance (prune --calibration-images)
    flag("old_recalibration_images", "--calibration-images", type=int, help=argparse.SUPPRESS),
    flag("importance", default=NETWORK_WIDE),
    flag(
        "scan_recovery",
        action=argparse.BooleanOptionalAction,
        default=PruneRequest.scan_recovery,
        help=OPTIONS["scan_recovery"].help,
    ),
    flag(
        "prune_input_conv",
        action="store_true",
        help="scan the input conv's group too (for prune --prune-input-conv)",
    ),
    flag("overwrite", action="store_true", help="replace existing outputs"),
    *DATA_FLAGS,
    flag("seed", default=SEED),
]


def main(args: argparse.Namespace) -> int:
    """``prunekit sensitivity``: the scan written and its table printed."""
    from ..printing import print_scan
    from ..sensitivity import parse_ratios

    recalibration = args.recalibration_images
    if args.old_recalibration_images is not None:
        warn("sensitivity --calibration-images is deprecated: it is --recalibration-images now")
        recalibration = recalibration or args.old_recalibration_images
    return run_printed(
        sensitivity_checkpoint,
        print_scan,
        args,
        args.checkpoint,
        ratios=parse_ratios(args.ratios),
        recalibration_images=recalibration,
    )


COMMAND = Command(
    "sensitivity", "accuracy of each group pruned alone at several ratios (held-out train)", FLAGS, main
)
