"""``prunekit prune``: a checkpoint pruned as a ``PruneRequest`` says, with its JSON report."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import description, load_checkpoint
from ..console import note
from ..errors import UsageError, arg
from ..files import DirectoryLock, check_outputs, clean_stale_temps
from ..importance import NETWORK_WIDE, WITH_IMAGES
from ..measure import summary
from ..options import OPTIONS, SEED, UNSET, Command, Flag, flag
from ..planning import SENSITIVITY_FROM
from ..requests import PruneRequest
from ..training_state import check_finite
from .rundir import (
    CHECKPOINT,
    DATA_FLAGS,
    calibration_batches,
    default_output,
    load_data_for,
    overwrite_flag,
    run_printed,
    scan_batches,
)

# The defaults of prune_checkpoint, its flags and prunekit run's config, stated once.
CALIBRATION = "data"  # what data-driven criteria score on: training images ("random": the blog's noise)
CALIBRATION_IMAGES = 256  # training images that score importance
RECONSTRUCTION_IMAGES = 512  # training images recovery re-fits on


@dataclass(frozen=True)
class _Settings:
    """What ``prune_checkpoint`` was asked beside the request, checked and with its defaults resolved."""

    importance: str
    calibration: str
    calibration_images: int
    reconstruction_images: int
    data: str | None
    data_dir: str | None
    subset: int | None
    seed: int

    @property
    def scores_on_data(self) -> bool:
        """Whether the criterion scores channels on training images (not on the blog's noise)."""
        from ..importance import NEEDS_CALIBRATION

        return self.importance in NEEDS_CALIBRATION and self.calibration == "data"


def prune_checkpoint(
    path: str | Path,
    request: Any,
    importance: str | None = None,
    data: str | None = None,
    data_dir: str | None = None,
    subset: int | None = None,
    calibration: str = CALIBRATION,
    calibration_images: int = CALIBRATION_IMAGES,
    reconstruction_images: int = RECONSTRUCTION_IMAGES,
    out: str | Path | None = None,
    seed: int = SEED,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Prune a checkpoint as ``request`` (a ``PruneRequest``) says; write the pruned checkpoint and its report
    (``out`` with a ``.json`` suffix). Outputs that exist are refused unless ``overwrite``.
    Recovery (``request.reconstruct``) re-fits on ``reconstruction_images`` training images."""
    from ..core import default_importance
    from ..options import validate

    request.validate()
    validate({"reconstruction_images": reconstruction_images, "calibration": calibration})
    if request.reconstruct is None:
        from ..core import default_reconstruct

        request.reconstruct = default_reconstruct(calibration == "data", request.layers)
    if request.reconstruct and calibration == "random":
        raise UsageError(
            f"{arg('reconstruct')} re-fits layers on training images; drop {arg('calibration')} random "
            f"(or {arg('reconstruct')} off)"
        )
    importance = importance or default_importance(request.layers, calibration == "data")
    if importance == "taylor" and calibration == "random":
        raise UsageError(
            f"{arg('importance')} taylor needs labelled images; drop {arg('calibration')} random"
        )
    out = default_output(path, out, "-pruned.safetensors")
    report_file = report_path(out)
    check_outputs([path], [out, report_file], overwrite)
    settings = _Settings(
        importance, calibration, calibration_images, reconstruction_images, data, data_dir, subset, seed
    )
    with DirectoryLock(out.parent):
        clean_stale_temps(out.parent)
        return _prune(path, out, request, settings)


def report_path(out: Path) -> Path:
    """Where prune's JSON report goes: beside the checkpoint, never onto it (``--out p.json``)."""
    report = out.with_suffix(".json")
    return out.with_name(out.stem + ".report.json") if report == out else report


def _prune(path: str | Path, out: Path, request: Any, settings: _Settings) -> dict[str, Any]:
    from ..checkpoint import save_checkpoint
    from ..core import prune
    from ..files import write_json

    ckpt = load_checkpoint(path)
    meta, model = ckpt.meta, ckpt.model
    batches, refit = _pruning_images(meta, model, request, settings)
    size = meta["input_size"]
    before = summary(model, size)
    result = prune(  # every field of the request is a keyword of core.prune
        model,
        torch.zeros(1, 3, size, size),
        **vars(request),
        importance=settings.importance,
        calibration=batches,
        reconstruction=refit,
        seed=settings.seed,
    )
    after = summary(model, size)
    report = _prune_report(path, out, meta, request, settings, result, (before, after))
    new_meta = _pruned_meta(path, meta, report, result)
    check_finite(model, f"the pruned model ({out})")
    save_checkpoint(out, model, new_meta)
    write_json(report_path(out), report)
    report["tables"] = {"before": before["table"], "after": after["table"]}
    return report


def _pruning_images(
    meta: dict[str, Any], model: torch.nn.Module, request: Any, settings: _Settings
) -> tuple[list[tuple[Any, Any]] | None, list[Any] | None]:
    """The scoring batches and the re-fit images the request needs (None where it needs none); scans the
    model for a sensitivity allocation into ``request.sensitivity`` first when it has none."""
    from ..importance import NEEDS_CALIBRATION

    seed = settings.seed
    spreads_by_default = request.allocation is None and request.ratio is None  # by the split's size
    scans = request.allocation == "sensitivity" and request.sensitivity is None
    needs_data = settings.scores_on_data or scans or request.reconstruct or spreads_by_default
    # loaded once for all of them
    bundle = load_data_for(meta, settings.data, settings.data_dir, settings.subset) if needs_data else None
    _resolve_allocation(request, len(bundle.train) if bundle is not None else 0)
    scans = request.allocation == "sensitivity" and request.sensitivity is None
    batches = refit = None
    if settings.importance in NEEDS_CALIBRATION:
        scoring = bundle if settings.scores_on_data else None
        batches = calibration_batches(meta, scoring, settings.calibration_images, seed=seed)
    if request.reconstruct:
        images = settings.reconstruction_images
        refit = [x for x, _ in calibration_batches(meta, bundle, images, seed=seed + 1)]
    if scans:
        from ..sensitivity import SCAN_CALIBRATION_IMAGES, SCAN_IMAGES, SCAN_SECONDS, scan, scan_options

        example = torch.zeros(1, 3, meta["input_size"], meta["input_size"])
        held_out, recal = scan_batches(bundle, SCAN_IMAGES, SCAN_CALIBRATION_IMAGES, seed)
        request.sensitivity = scan(
            model, example, held_out, recal, seconds=SCAN_SECONDS, **scan_options(request)
        )
    return batches, refit


def _resolve_allocation(request: Any, training_images: int) -> None:
    """The default allocation, from the training split's size, into ``request``; a line says when it is
    ``global`` for want of images."""
    from ..planning import allocation_note, default_allocation

    note(allocation_note(request.allocation, request.ratio, training_images))
    request.allocation = default_allocation(request.allocation, request.ratio, training_images)


def _prune_report(
    path: str | Path,
    out: Path,
    meta: dict[str, Any],
    request: Any,
    settings: _Settings,
    result: Any,
    summaries: tuple[dict[str, Any], dict[str, Any]],
) -> dict[str, Any]:
    """prune's JSON report: the settings and request, the summaries (before, after), the measured cost
    and what changed."""
    from ..importance import NEEDS_CALIBRATION

    before, after = summaries
    return {
        "checkpoint": str(path),
        "pruned_checkpoint": str(out),
        "model": meta["model"],
        "importance": settings.importance,
        "calibration": settings.calibration if settings.importance in NEEDS_CALIBRATION else None,
        "calibration_images": settings.calibration_images if settings.scores_on_data else None,
        "request": {k: v for k, v in vars(request).items() if k != "sensitivity"},
        "before": {k: v for k, v in before.items() if k != "table"},
        "after": {k: v for k, v in after.items() if k != "table"},
        "macs": {
            "before": result.macs_before,
            "after": result.macs_after,
            "ratio": result.macs_after / result.macs_before,
        },
        "params": {
            "before": result.params_before,
            "after": result.params_after,
            "ratio": result.params_after / result.params_before,
        },
        "removed_channels": result.removed,
        "changed_layers": result.changed_layers,
        "latency": result.latency,
        "reconstruction": result.reconstruction,
        "scan": result.scan,
    }


# What a pruned checkpoint keeps of each pruning's report (the tables and per-layer details stay in the report)
RECORDED = ("importance", "calibration", "request", "macs", "params", "removed_channels", "scan")


def _pruned_meta(
    path: str | Path, meta: dict[str, Any], report: dict[str, Any], result: Any
) -> dict[str, Any]:
    """The pruned checkpoint's metadata: its description, its dense parent, and this pruning appended."""
    parent = meta.get("parent") or {
        "checkpoint": str(path),
        "model": meta["model"],
        "params": result.params_before,
        "macs": result.macs_before,
        "metrics": meta.get("metrics", {}),
    }
    new_meta = description(meta)
    new_meta.update(
        parent=parent,
        pruning=[
            *meta.get("pruning", []),
            {
                **{k: report[k] for k in RECORDED},
                "changed_layers": [c["layer"] for c in result.changed_layers],
            },
        ],
    )
    return new_meta


def latency_flags(defaults: bool = True) -> list[Flag]:
    """--latency-batch and --latency-runtime; ``defaults`` False leaves them to the parser (run's config)."""
    batch, runtime = PruneRequest.latency_batch, PruneRequest.latency_runtime
    return [
        flag("latency_batch", default=batch if defaults else UNSET,
             help=f"batch size --target-latency is measured at (default {batch})"),
        flag("latency_runtime", default=runtime if defaults else UNSET,
             help=f"where --target-latency is measured (default {runtime}; onnxruntime needs prunekit[export])"),
    ]  # fmt: skip


def reconstruct_flags(defaults: bool) -> list[Flag]:
    """--reconstruct/--no-reconstruct and --reconstruction-images (with its default unless ``defaults`` False)."""
    return [
        flag("reconstruct", action=argparse.BooleanOptionalAction, default=None,
             help=f"recovery without labels: {OPTIONS['reconstruct'].help}"),
        flag("reconstruction_images", default=RECONSTRUCTION_IMAGES if defaults else UNSET,
             help=f"{OPTIONS['reconstruction_images'].help} (default {RECONSTRUCTION_IMAGES})"),
    ]  # fmt: skip


BUDGET = "budget"  # the group of flags of which prune takes exactly one
IMPORTANCE_HELP = (
    f"channel importance criterion (default: activation with --layer, else {WITH_IMAGES}, or "
    f"{NETWORK_WIDE} with --calibration random)"
)
FLAGS = [
    CHECKPOINT,
    flag("layers", "--layer", action="append", default=[], metavar="LAYER",
         help="prune this conv (repeatable); default: every prunable layer"),
    flag("ratio", group=BUDGET),
    flag("target_macs", group=BUDGET, help="keep this fraction of the MACs (0.5 = half), globally"),
    flag("target_params", group=BUDGET, help="keep this fraction of the parameters, globally"),
    flag("target_latency", group=BUDGET,
         help="keep this fraction of the dense model's latency, measured on this machine "
         "(per-layer latency tables, cached; the pruned model is timed to check)"),
    *latency_flags(),
    flag("importance", default=None, help=IMPORTANCE_HELP),
    flag("calibration", default=CALIBRATION,
         help="score activations on training images (data) or on the blog's random noise"),
    flag("calibration_images", default=CALIBRATION_IMAGES),
    *reconstruct_flags(defaults=True),
    flag("ignore", action="append", default=[], help="never prune this layer (repeatable)"),
    flag("prune_input_conv", action="store_true",
         help="let a target or ratio prune the input conv's output channels (protected by default)"),
    flag("round_to", default=PruneRequest.round_to),
    flag("allocation", default=None,
         help="how a target is spread across layers: one importance threshold, one ratio, or equal predicted "
         "loss from a sensitivity scan (default for a target: sensitivity, scanned on training images first, "
         f"from {SENSITIVITY_FROM:,} training images; global below that)"),
    flag("sensitivity", type=Path, default=None, help="a `prunekit sensitivity` JSON (default: scan now)"),
    flag("scan_recovery", action=argparse.BooleanOptionalAction, default=PruneRequest.scan_recovery,
         help=OPTIONS["scan_recovery"].help),
    *DATA_FLAGS,
    flag("seed", default=SEED),
    flag("out", type=Path, default=None,
         help="pruned checkpoint (default: <checkpoint>-pruned.safetensors); a JSON report is written beside it"),
    overwrite_flag("the pruned checkpoint and its report"),
]  # fmt: skip


def main(args: argparse.Namespace) -> int:
    """``prunekit prune``: the request the flags make, pruned, and the report printed."""
    from ..printing import print_prune
    from ..sensitivity import read_scan

    request = PruneRequest(
        layers=args.layers,
        ratio=args.ratio,
        target_macs=args.target_macs,
        target_params=args.target_params,
        target_latency=args.target_latency,
        latency_batch=args.latency_batch,
        latency_runtime=args.latency_runtime,
        ignore=args.ignore,
        round_to=args.round_to,
        allocation=args.allocation,
        sensitivity=read_scan(args.sensitivity) if args.sensitivity else None,
        prune_input_conv=args.prune_input_conv,
        reconstruct=args.reconstruct,
        scan_recovery=args.scan_recovery,
    )
    return run_printed(prune_checkpoint, print_prune, args, args.checkpoint, request)


COMMAND = Command("prune", "remove channels from a trained checkpoint", FLAGS, main, one_of=BUDGET)
