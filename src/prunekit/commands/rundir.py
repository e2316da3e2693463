"""What every command shares: a checkpoint's model and data record, its run directory (claimed,
cleared), its dataset reloaded, and the training images drawn for scoring, scans and recalibration."""

from __future__ import annotations

import argparse
import datetime as _dt
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..console import note
from ..data import DataBundle, load_data
from ..errors import UsageError, arg
from ..files import check_outputs, clean_stale_temps, is_main_process
from ..options import Flag, flag, validate_given
from ..training_state import MODEL_FILE, STATE_FILE

RUN_FILES = (STATE_FILE, MODEL_FILE, "metrics.json", "train_log.txt")  # what fit writes in its out_dir

# The flags of the commands that read images: the dataset, where it is downloaded, a per-class subset.
DATA_FLAGS = [flag("data"), flag("data_dir"), flag("subset")]
CHECKPOINT = flag("checkpoint", "checkpoint", type=Path)  # the positional input of every command but train


def overwrite_flag(what: str) -> Flag:
    """``--overwrite``: replace ``what`` if it exists (default: refuse)."""
    return flag("overwrite", action="store_true", help=f"replace {what} if it exists (default: refuse)")


def asked_only(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with every option the user did not write set to None (for a resumed run: not asked)."""
    return argparse.Namespace(**{k: None if k in args.defaulted else v for k, v in vars(args).items()})


def default_output(path: str | Path, out: str | Path | None, suffix: str) -> Path:
    """``out``, else beside the checkpoint ``path``: its stem and ``suffix`` (``-pruned.safetensors``)."""
    return Path(out) if out else Path(path).with_name(Path(path).stem + suffix)


def run_printed(
    function: Callable[..., Any],
    printer: Callable[[Any], None],
    args: argparse.Namespace,
    *positional: Any,
    **given: Any,
) -> int:
    """A command's body: ``function`` called with ``positional``, then each of its other parameters from the
    flag of the same name in ``args`` (``given`` instead, for one computed or named otherwise); its result
    shown by ``printer``. The exit code: 0."""
    parameters = list(inspect.signature(function).parameters)[len(positional) :]
    flags = vars(args)
    keywords = {name: flags[name] for name in parameters if name in flags and name not in given}
    printer(function(*positional, **keywords, **given))
    return 0


def model_meta(
    model_name: str, data: DataBundle, data_args: dict[str, Any], weights: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What a checkpoint must know about its model and data to be rebuilt and evaluated later."""
    return {
        "model": model_name,
        "num_classes": len(data.classes),
        "classes": data.classes,
        "input_size": data.image_size,
        "mean": list(data.mean),
        "std": list(data.std),
        "preprocess": data.preprocess,
        "split": data.split_info,
        "weights": weights,
        "data": data_args,
        "prunekit_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def run_outputs(out: Path) -> list[Path]:
    return [out / name for name in RUN_FILES]


def claim_run_dir(out: Path, inputs: list[Any], resume: bool, overwrite: bool) -> None:
    """Refuse a run directory that would destroy an input, or that holds a run we neither resume nor replace.

    Under torchrun only rank 0 judges (the others would see rank 0's first files).
    """
    if not is_main_process():
        return
    clean_stale_temps(out)
    check_outputs(inputs, run_outputs(out), overwrite=True)
    held = [p.name for p in run_outputs(out) if p.exists()]
    if held and not (resume or overwrite):
        raise UsageError(
            f"{out} already holds a training run ({', '.join(held)}); continue it with {arg('resume')} "
            f"or replace it with {arg('overwrite')}"
        )


def clear_run_dir(out: Path) -> None:
    """Remove a replaced run's outputs first, so a new run never sits half-done beside the old model."""
    if not is_main_process():
        return
    for p in run_outputs(out):
        p.unlink(missing_ok=True)


def load_data_for(
    meta: dict[str, Any], data: str | None = None, data_dir: str | None = None, subset: int | None = None
) -> DataBundle:
    """The dataset a checkpoint was trained on (or ``data`` instead), with the checkpoint's input pipeline."""
    recorded = meta.get("data") or {}
    spec = data or recorded.get("spec")
    if spec is None:
        raise UsageError(f"this checkpoint does not record its dataset; pass {arg('data')}")
    try:
        bundle = load_data(
            spec,
            data_dir=data_dir or recorded.get("data_dir"),
            subset=subset if subset is not None else recorded.get("subset"),
            image_size=meta["input_size"],
            val_split=recorded.get("val_split"),
            seed=(meta.get("split") or {}).get("seed", 0),
            preprocess=meta.get("preprocess"),
        )
    except UsageError as exc:
        if data:
            raise
        raise UsageError(
            f"the checkpoint's dataset is not available here ({exc}); pass {arg('data')}"
        ) from None
    if len(bundle.classes) != meta["num_classes"]:
        raise UsageError(
            f"{arg('data')} {spec} has {len(bundle.classes)} classes; the checkpoint has {meta['num_classes']}"
        )
    # Normalize with the statistics the model was trained with, not the new data's.
    if meta.get("mean") and meta.get("std"):
        bundle.mean, bundle.std = tuple(meta["mean"]), tuple(meta["std"])
    return bundle


def calibration_batches(
    meta: dict[str, Any], bundle: DataBundle | None, images: int, batch_size: int = 128, seed: int = 0
) -> list[tuple[Any, Any]]:
    """Labelled, normalized, unaugmented training images for importance scoring; noise when ``bundle`` is None.

    Noise reproduces the blog exactly: one ``torch.randn(128, 3, H, W)`` batch, with random labels.
    """
    size = meta["input_size"]
    if bundle is None:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(128, 3, size, size, generator=gen)
        return [(x, torch.randint(0, meta["num_classes"], (128,), generator=gen))]
    validate_given({"calibration_images": images})
    return bundle.sample_batches(images, batch_size, seed)


def scan_batches(
    bundle: DataBundle, images: int, calibration_images: int, seed: int
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
    """One seeded draw of training images (never the test set): the first ``images`` score the scan, the
    next ``calibration_images`` recalibrate BatchNorm. Both shrink to what the training split holds, and
    a line says so."""
    from ..scan_budget import scan_counts

    images, calibration_images, shrunk = scan_counts(len(bundle.train), images, calibration_images)
    note(shrunk)
    batches = bundle.sample_batches(images + calibration_images, 250, seed)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    held_out = [(x[i : min(i + 250, images)], y[i : min(i + 250, images)]) for i in range(0, images, 250)]
    calibration = [x[i : i + 256] for i in range(images, images + calibration_images, 256)]
    return held_out, calibration
