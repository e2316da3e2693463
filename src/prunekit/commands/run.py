"""``prunekit run``: its flags and how they become a ``RunConfig``; the pipeline itself is ``prunekit.pipeline``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..console import console
from ..finetuning import DISTILL_BELOW, peak_rate
from ..options import Command, flag
from ..pipeline import RunConfig
from .prune import IMPORTANCE_HELP, latency_flags, reconstruct_flags

# No defaults here: a flag not given leaves its key out, so a --config file (or RunConfig's default) holds;
# the help names RunConfig's defaults.
_DEFAULT = RunConfig()
_LAYERS = ", ".join(_DEFAULT.layers)
FLAGS = [
    flag("config", type=Path, help="YAML file holding any of these flags (flags given here win)"),
    flag("resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR where it stopped"),
    flag("name", help=f"run directory name under --runs-dir (default: {_DEFAULT.name})"),
    flag("runs_dir", help=f"where run directories go (default: {_DEFAULT.runs_dir})"),
    flag("model", help=f"default: {_DEFAULT.model}"),
    flag("data", help=f"default: {_DEFAULT.data}"),
    flag("data_dir"),
    flag("subset"),
    flag("baseline", help="reuse this dense checkpoint instead of training one"),
    flag("weights", help="train the baseline from these pretrained weights (see train --weights)"),
    flag("image_size", help="model input size (see train --image-size)"),
    flag("val_split", help="hold out this fraction of train/ when there is no test/"),
    flag("epochs", help="baseline training epochs"),
    flag("layers", "--layer", action="append", help=f"default: {_LAYERS}"),
    flag("ratio", help=f"with --layer: per named layer (default: {_LAYERS} by {_DEFAULT.ratio:g}); alone: every "
         "prunable layer, as in prune"),
    flag("target_macs"),
    flag("target_params"),
    flag("target_latency", help="see prune --target-latency"),
    *latency_flags(defaults=False),
    flag("ignore", action="append"),
    flag("prune_input_conv", action="store_true", help="see prune --prune-input-conv"),
    flag("round_to"),
    flag("allocation", help="see prune --allocation"),
    flag("scan_recovery", action=argparse.BooleanOptionalAction, help="see prune --scan-recovery"),
    flag("importance", help=IMPORTANCE_HELP),
    flag("calibration"),
    flag("calibration_images"),
    *reconstruct_flags(defaults=False),
    flag("steps", help="reach the target in this many prune/fine-tune rounds"),
    flag("recipe", help="fine-tuning preset (default: blog for named layers, as the blog's experiment; full for a "
         "target)"),
    flag("finetune_epochs"),
    flag("finetune_lr",
         help=f"fine-tuning's peak learning rate (default: the recipe's; full: {peak_rate('full')})"),
    flag("freeze"),
    flag("distill", action=argparse.BooleanOptionalAction, default=None,
         help=f"distil from the dense baseline (default: when the training split holds under {DISTILL_BELOW:,} "
         "images)"),
    flag("distill_temperature"),
    flag("distill_weight"),
    flag("distill_features"),
    flag("recalibrate", "--no-recalibrate", action="store_false"),
    flag("quantize", action="store_true", help="add an int8 ONNX Runtime stage (see prunekit quantize)"),
    flag("calibration_method"),
    flag("seed"),
    flag("device"),
]  # fmt: skip


def main(args: argparse.Namespace) -> int:
    """``prunekit run``: the config (a file, then the flags given here), run or resumed; a line of results."""
    from ..pipeline import load_config, resumed_config, run

    skip = ("func", "config", "resume", "command", "given", "defaulted")
    values = load_config(args.config) if getattr(args, "config", None) is not None else {}
    values |= {k: v for k, v in vars(args).items() if k not in skip}  # flags given here win
    resume = getattr(args, "resume", None)
    cfg = resumed_config(resume, values) if resume is not None else RunConfig.from_dict(values)
    metrics = run(cfg, resume=resume is not None)
    acc = metrics["accuracy"]
    console.print(
        f"dense {acc['dense']:.2%} -> final {acc['final']:.2%}; MACs {metrics['macs_reduction']:.2f}x fewer",
        highlight=False,
    )
    return 0


COMMAND = Command(
    "run",
    "the whole pipeline: train, prune, recalibrate, fine-tune, evaluate, report",
    FLAGS,
    main,
    suppress_defaults=True,
)
