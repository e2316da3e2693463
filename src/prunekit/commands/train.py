"""``prunekit train``: a baseline trained (or its interrupted run continued) in a run directory."""

from __future__ import annotations

import argparse
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import description, load_checkpoint
from ..console import console, info
from ..data import describe, load_data
from ..errors import UsageError, arg
from ..files import DirectoryLock, clean_stale_temps, is_main_process
from ..models import min_input_size
from ..options import Command, Flag, flag, validate
from ..resume import refuse_changes
from ..train import FitResult, fit
from ..train_config import TrainConfig
from ..training_state import STATE_FILE
from .rundir import DATA_FLAGS, claim_run_dir, clear_run_dir, load_data_for, model_meta, overwrite_flag

MODEL = "resnet18"  # the baseline --model of prunekit train and prunekit run (the blog's)


def train(
    model: str | None,
    data: str | None,
    out: str | Path,
    config: TrainConfig | None = None,
    data_dir: str | None = None,
    subset: int | None = None,
    image_size: int | None = None,
    resume: bool = False,
    weights: str | None = None,
    val_split: float | None = None,
    overwrite: bool = False,
) -> FitResult:
    """Train ``model`` on ``data`` (from ``weights`` when given: transfer learning); writes checkpoints, log
    and metrics under ``out``, which is locked against other processes meanwhile. A directory holding a run
    is refused unless ``resume`` (continue it) or ``overwrite`` (replace it). A resumed run keeps its recorded
    settings: any argument given (not None) that differs from them is refused."""
    out = Path(out)
    if resume:
        requested = {"model": model, "data": data, "data_dir": data_dir, "subset": subset}
        requested |= {"image_size": image_size, "weights": weights, "val_split": val_split}
        requested |= asdict(config) if config is not None else {}
        return resume_training(out, requested)
    if model is None or data is None:
        raise UsageError("a new training run needs a model and a dataset")
    config = config or TrainConfig()
    config.validate()
    validate({"image_size": image_size})
    weights_file = Path(weights) if weights and Path(weights).is_file() else None
    with DirectoryLock(out):
        claim_run_dir(out, [weights_file], resume, overwrite)
        return _train_fresh(model, data, out, config, data_dir, subset, image_size, weights, val_split)


def resume_training(out: str | Path, requested: dict[str, Any] | None = None) -> FitResult:
    """Continue the training run in ``out`` with its recorded settings; ``requested`` (settings by option
    name, as ``train`` takes them) that differ from the record are refused, naming each."""
    out = Path(out)
    with DirectoryLock(out):
        if is_main_process():  # under torchrun, rank 0 tidies the directory, as for a new run
            clean_stale_temps(out)
        return _resume_training(out, requested or {})


def _resume_training(out: Path, requested: dict[str, Any]) -> FitResult:
    state = out / STATE_FILE
    if not state.exists():
        raise UsageError(
            f"{arg('resume')}: no interrupted run in {out} (no {STATE_FILE}); start it without {arg('resume')}"
        )
    ckpt = load_checkpoint(state)
    recorded_data = ckpt.meta.get("data") or {}
    recorded = {"model": ckpt.meta["model"], "data": recorded_data.get("spec"), **recorded_data}
    recorded["weights"] = (ckpt.meta.get("weights") or {}).get("requested")
    refuse_changes(out, recorded | ckpt.meta["train"]["config"], requested)
    config = TrainConfig.from_dict(ckpt.meta["train"]["config"])
    if (ckpt.meta.get("train_state") or {}).get("epoch", 0) >= config.epochs:
        info(f"the run in {out} has finished its {config.epochs} epochs: nothing to continue")
    bundle = load_data_for(ckpt.meta)
    return fit(ckpt.model, bundle, config, out, description(ckpt.meta), resume=ckpt)


def _train_fresh(
    model: str,
    data: str,
    out: Path,
    config: TrainConfig,
    data_dir: str | None,
    subset: int | None,
    image_size: int | None,
    weights: str | None,
    val_split: float | None,
) -> FitResult:
    from ..weights import build_with_weights

    data_args = {
        "spec": data,
        "data_dir": data_dir,
        "subset": subset,
        "image_size": image_size,
        "val_split": val_split,
    }
    load = dict(
        data_dir=data_dir, subset=subset, image_size=image_size, seed=config.seed, val_split=val_split
    )
    bundle = load_data(data, **load)
    torch.manual_seed(config.seed)
    net, preprocess, record = build_with_weights(model, len(bundle.classes), weights)
    if record is not None:
        record["requested"] = weights  # as written, for a resumed run to compare with
    if preprocess is not None:
        # The weights' own input pipeline from now on; an explicit image size keeps only their statistics.
        wanted = preprocess.to_dict()
        if image_size is not None:
            wanted = {k: wanted[k] for k in ("mean", "std", "interpolation")}
        bundle = load_data(data, **load, preprocess=wanted)
    if bundle.image_size < min_input_size(model):
        raise UsageError(
            f"{model} needs inputs of at least {min_input_size(model)} px, and {data} is read at "
            f"{bundle.image_size} px (the size most of its images have); pass {arg('image_size')} "
            f"{min_input_size(model)} (or more) to resize them"
        )
    if is_main_process():
        info(describe(bundle))
    meta = model_meta(model, bundle, data_args, record)
    clear_run_dir(out)
    return fit(net, bundle, config, out, meta)


def training_flags(defaults: TrainConfig) -> list[Flag]:
    """The training recipe's flags, at ``defaults``' values."""
    names = ("epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "schedule")
    names += ("warmup_epochs", "label_smoothing")
    flags = [flag(n, default=getattr(defaults, n)) for n in names]
    flags += [
        flag("bf16", "--no-bf16", action="store_false",
             help="train in fp32 (bf16 autocast is on where the CPU supports it)"),
        flag("channels_last", "--no-channels-last", action="store_false"),
        flag("seed", default=defaults.seed),
        flag("device", default=defaults.device),
    ]  # fmt: skip
    return [replace(f, group="training recipe") for f in flags]


FLAGS = [
    flag("model", default=MODEL,
         help="resnet18 (the blog's), resnet18-cifar, or any torchvision classification model name"),
    *DATA_FLAGS,  # required for a new run; a resumed one reads its own
    flag("weights", help="start from pretrained weights: a torchvision weight name (DEFAULT, IMAGENET1K_V1, ...), "
         "'pretrained' for timm:NAME models, or a state-dict file (.safetensors, .pth, .pt)"),
    flag("image_size", help="model input size (default: native for small uniform images such as CIFAR, else 224 "
         "or the weights' own)"),
    flag("val_split", help="hold out this fraction of train/ when there is no test/"),
    flag("out", type=Path, default=None, help="output directory (default: runs/<model>-baseline)"),
    flag("resume", action="store_true", help="continue the interrupted run in --out"),
    overwrite_flag("the run in --out"),
    *training_flags(TrainConfig()),
]  # fmt: skip


def main(args: argparse.Namespace) -> int:
    """``prunekit train``: a new run, or (``--resume``) the interrupted one in ``--out``."""
    out = args.out or Path("runs") / f"{args.model}-baseline"
    if args.resume:
        asked = {k: getattr(args, k) for k in args.given - {"resume", "out", "overwrite"}}
        result = resume_training(out, asked)
        _print_trained(result, out)
        return 0
    if args.data is None:
        raise UsageError(
            "--data is required for a new training run (a --resume run reads the one it recorded)"
        )
    cfg = TrainConfig.from_dict(vars(args))
    result = train(
        model=args.model,
        data=args.data,
        out=out,
        config=cfg,
        data_dir=args.data_dir,
        subset=args.subset,
        image_size=args.image_size,
        weights=args.weights,
        val_split=args.val_split,
        overwrite=args.overwrite,
    )
    _print_trained(result, out)
    return 0


def _print_trained(result, out: Path) -> None:
    if is_main_process():  # under torchrun: one line per job, not per process
        console.print(f"test accuracy {result.test['accuracy']:.2%}; checkpoint {out / 'model.safetensors'}")


COMMAND = Command("train", "train a baseline classifier", FLAGS, main)
