"""``prunekit finetune``: BatchNorm recalibration, then fine-tuning of a pruned checkpoint (resumable)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import Checkpoint, description, load_checkpoint
from ..console import console, renamed_keyword
from ..errors import UsageError, arg
from ..files import DirectoryLock
from ..finetuning import DISTILL_BELOW, RECALIBRATION_IMAGES, peak_rate
from ..measure import evaluate
from ..options import SEED, Command, flag
from ..resume import refuse_changes
from ..train import fit
from ..train_config import TrainConfig
from ..training_state import STATE_FILE
from .rundir import (
    CHECKPOINT,
    DATA_FLAGS,
    asked_only,
    calibration_batches,
    claim_run_dir,
    clear_run_dir,
    default_output,
    load_data_for,
    overwrite_flag,
    run_printed,
)


def finetune_checkpoint(
    path: str | Path,
    out: str | Path,
    recipe: str | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    optimizer: str | None = None,
    freeze: str | None = None,
    teacher: str | Path | None = None,
    distill: bool | None = None,
    distill_temperature: float | None = None,
    distill_weight: float | None = None,
    distill_features: float | None = None,
    recalibrate: bool | None = None,
    recalibration_images: int | None = None,
    data: str | None = None,
    data_dir: str | None = None,
    subset: int | None = None,
    seed: int | None = None,
    device: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    recipe_name: str | None = None,
) -> dict[str, Any]:
    """Recalibrate BatchNorm (``recalibrate``, default True, on ``recalibration_images``, default ``RECALIBRATION_IMAGES``), then
    fine-tune a pruned checkpoint (``recipe`` default: ``finetuning.default_recipe``; ``recipe_name`` is its
    name until 0.2); returns accuracy at each stage. Resumed (``resume`` and an interrupted run in ``out``),
    any argument given (not None) that differs from the run's record is refused.

    ``distill`` None distils from ``teacher``, or else from the dense parent the checkpoint was pruned from,
    when the training split holds fewer than ``DISTILL_BELOW`` images; False never distils.

    ``out`` (a directory) is locked meanwhile; one holding a run is refused unless ``resume`` or ``overwrite``.
    """
    from ..finetuning import default_recipe

    out = Path(out)
    recipe_name = renamed_keyword("finetune_checkpoint", "recipe_name", "recipe", recipe_name, recipe)
    if distill is False and (teacher is not None or distill_features):
        off = "--no-distill" if arg("distill").startswith("--") else "distill=False"
        asked_for = arg("teacher") if teacher is not None else arg("distill_features")
        raise UsageError(f"{asked_for} is for distillation: it cannot go with {off}")
    asked = {"checkpoint": str(path), "recipe": recipe_name, "epochs": epochs, "lr": lr}
    asked |= {"optimizer": optimizer, "freeze": freeze, "teacher": teacher, "distill": distill}
    asked |= {"distill_temperature": distill_temperature, "distill_weight": distill_weight, "seed": seed}
    asked |= {"distill_features": distill_features}
    asked |= {"recalibrate": recalibrate, "recalibration_images": recalibration_images, "device": device}
    asked |= {"data": data, "data_dir": data_dir, "subset": subset}
    recalibrate = True if recalibrate is None else recalibrate
    recalibration_images = RECALIBRATION_IMAGES if recalibration_images is None else recalibration_images
    seed = SEED if seed is None else seed
    # A fresh run's (config, freezing policy) and source checkpoint, read once; a resumed one reads its state.
    planned = source = None
    if resume and (out / STATE_FILE).exists():
        _refuse_finetune_changes(out, asked)
    else:
        source = load_checkpoint(path)
        recipe_name = recipe_name or default_recipe(source.meta.get("pruning"))
        overrides = {"epochs": epochs, "lr": lr, "optimizer": optimizer, "freeze": freeze, "seed": seed}
        overrides |= {"distill_temperature": distill_temperature, "distill_weight": distill_weight}
        overrides |= {"distill_features": distill_features}
        planned = _planned_configs(recipe_name, device=device, **overrides)
    with DirectoryLock(out):
        claim_run_dir(out, [path, teacher], resume, overwrite)
        if planned is not None:
            clear_run_dir(out)
        fresh = None if planned is None else (source, planned)
        return _finetune(
            path, out, recipe_name, fresh, (teacher, distill), recalibrate, recalibration_images,
            data, data_dir, subset, seed,
        )  # fmt: skip


def _planned_configs(recipe_name: str, **overrides: Any) -> dict[bool, tuple[TrainConfig, str]]:
    """The recipe's (config, freezing policy) as it is when distilling on a small split and as it is
    otherwise, each checked: which applies is known only once the data is read (``_teacher_for``)."""
    from ..finetuning import current_name
    from ..finetuning import recipe as recipe_config

    # deprecated names mapped (and warned about) once, not once a config
    recipe_name, freeze = current_name("recipe", recipe_name), current_name("freeze", overrides.pop("freeze"))
    planned = {few: recipe_config(recipe_name, few, freeze=freeze, **overrides) for few in (False, True)}
    for cfg, _ in planned.values():
        cfg.validate()  # before the BatchNorm recalibration and evaluations
    return planned


def _finetune(
    path: str | Path,
    out: Path,
    recipe_name: str,
    planned: tuple[Checkpoint, dict[bool, tuple[TrainConfig, str]]] | None,
    distillation: tuple[str | Path | None, bool | None],
    recalibrate: bool,
    recalibration_images: int,
    data: str | None,
    data_dir: str | None,
    subset: int | None,
    seed: int,
) -> dict[str, Any]:
    from ..finetuning import distils_few, recalibrate_batchnorm, trainable_filter
    from ..groups import output_layer

    if planned is None:
        ckpt = load_checkpoint(out / STATE_FILE)
        cfg = TrainConfig.from_dict(ckpt.meta["train"]["config"])
        stages = dict(ckpt.meta["finetune"]["accuracy"])
        settings = ckpt.meta["finetune"]
    else:
        ckpt, configs = planned
    meta, model = ckpt.meta, ckpt.model
    bundle = load_data_for(meta, data, data_dir, subset)
    if planned is not None:
        teacher = _teacher_for(meta, len(bundle.train), *distillation)
        cfg, policy = configs[distils_few(teacher is not None, len(bundle.train))]
        stages = {}
        settings = {"recipe": recipe_name, "freeze": policy, "recalibrate": recalibrate, "source": str(path)}
        settings |= {"recalibration_images": recalibration_images, "data": data, "data_dir": data_dir}
        settings |= {"subset": subset, "teacher": teacher}
    size = meta["input_size"]
    example = torch.zeros(1, 3, size, size)
    classifier = output_layer(model, example)
    changed = [name for record in meta.get("pruning", []) for name in record.get("changed_layers", [])]
    trainable = trainable_filter(settings["freeze"], changed, classifier)
    teacher_model = load_checkpoint(settings["teacher"]).model if settings["teacher"] else None
    if not stages:
        test = bundle.loader("test")
        stages["pruned"] = evaluate(model, test, num_classes=meta["num_classes"])["accuracy"]
        if recalibrate:
            batches = calibration_batches(meta, bundle, recalibration_images, seed=seed)
            recalibrate_batchnorm(model, [x for x, _ in batches])
            stages["recalibrated"] = evaluate(model, test, num_classes=meta["num_classes"])["accuracy"]
    settings = {**settings, "accuracy": stages}
    base_meta = description(meta)
    base_meta["finetune"] = settings
    result = fit(
        model,
        bundle,
        cfg,
        out,
        base_meta,
        teacher=teacher_model,
        trainable=trainable,
        resume=ckpt if planned is None else None,
    )
    stages["finetuned"] = result.test["accuracy"]
    return {
        "accuracy": stages,
        "history": result.history,
        "checkpoint": str(out / "model.safetensors"),
        "settings": settings,
        "trainable_params": sum(
            p.numel() for n, p in model.named_parameters() if trainable is None or trainable(n)
        ),
    }


def _refuse_finetune_changes(out: Path, asked: dict[str, Any]) -> None:
    """A resumed fine-tuning keeps its recipe, data and source: refuse a request for others."""
    state = load_checkpoint(out / STATE_FILE)
    settings = state.meta["finetune"]
    recorded = {**state.meta["train"]["config"], **settings, "checkpoint": settings["source"]}
    recorded["distill"] = settings.get("teacher") is not None
    for key in ("checkpoint", "teacher"):  # the same file, however it is written
        if asked[key] and recorded.get(key) and Path(asked[key]).resolve() == Path(recorded[key]).resolve():
            asked = {**asked, key: recorded[key]}
    refuse_changes(out, recorded, asked)


def _teacher_for(
    meta: dict[str, Any], train_images: int, teacher: str | Path | None, distill: bool | None
) -> str | None:
    """The checkpoint to distil from: ``teacher`` when given; else, unless ``distill`` is False, the dense
    parent on a small training split (``distills_by_default``), said in one line either way."""
    from ..finetuning import DISTILL_BELOW, distills_by_default

    if teacher is not None or distill is False:
        return str(teacher) if teacher else None
    if distill is None and not distills_by_default(train_images):
        return None
    parent = (meta.get("parent") or {}).get("checkpoint")
    if parent and Path(parent).is_file():
        if distill is None:
            off = "--no-distill" if arg("distill").startswith("--") else "distill=False"
            console.print(
                f"note: {train_images} training images (fewer than {DISTILL_BELOW}): distilling from the "
                f"dense parent {parent} ({off} for cross-entropy alone)",
                highlight=False,
            )
        return parent
    if distill:
        raise UsageError(
            f"{arg('distill')} needs the dense parent, and {parent or 'no parent'} is not a file here: "
            f"pass {arg('teacher')}"
        )
    console.print(
        f"note: {train_images} training images: distillation would help, but the dense parent "
        f"({parent or 'not recorded'}) is not at hand; pass {arg('teacher')} to distil",
        highlight=False,
    )
    return None


FLAGS = [
    CHECKPOINT,
    flag("out", type=Path, default=None, help="output directory (default: <checkpoint>-finetuned)"),
    flag("recipe", default=None,
         help=f"blog: Adam lr 1e-4, 10 epochs, the blog's freezing; full: SGD cosine lr {peak_rate('full')}, "
         "everything trains, BatchNorm re-estimated at the end (default: blog for a model pruned at named "
         "layers, full otherwise; seed: the old name of blog, deprecated)"),
    flag("epochs", default=None),
    flag("lr", default=None),
    flag("optimizer", default=None),
    flag("freeze", default=None,
         help="blog: train only pruned blocks (with their BatchNorms) and the classifier; none: all "
         "(seed: the old name of blog, deprecated)"),
    flag("teacher", type=Path, default=None, help="distil from this (dense) checkpoint"),
    flag("distill", action=argparse.BooleanOptionalAction, default=None,
         help=f"distil from the dense parent (default: when the training split holds under {DISTILL_BELOW:,} images)"),
    flag("distill_temperature", default=None),
    flag("distill_weight", default=None),
    flag("distill_features", default=None),
    flag("recalibrate", "--no-recalibrate", action="store_false",
         help="skip re-estimating BatchNorm statistics before fine-tuning"),
    flag("recalibration_images", default=RECALIBRATION_IMAGES),
    *DATA_FLAGS,
    flag("seed", default=SEED),
    flag("device", default=None),
    flag("resume", action="store_true", help="continue an interrupted fine-tuning in --out"),
    overwrite_flag("the run in --out"),
]  # fmt: skip


def main(args: argparse.Namespace) -> int:
    """``prunekit finetune``: accuracy at each stage printed, and the checkpoint; a resumed run is asked only
    what the user wrote."""
    out = default_output(args.checkpoint, args.out, "-finetuned")
    if args.resume:
        args = asked_only(args)
        args.resume = True
    return run_printed(finetune_checkpoint, _print_stages, args, args.checkpoint, out)


def _print_stages(result: dict[str, Any]) -> None:
    for stage, acc in result["accuracy"].items():
        console.print(f"{stage:>13}: {acc:.2%}", highlight=False)
    console.print(f"checkpoint {result['checkpoint']}", highlight=False)


COMMAND = Command("finetune", "recalibrate BatchNorm and fine-tune a pruned checkpoint", FLAGS, main)
