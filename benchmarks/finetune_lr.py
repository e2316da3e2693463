"""The ``full`` fine-tuning recipe probed on the allocation benchmark's models (or a parent of its own): its
peak learning rate, and distillation from the parent.

    python benchmarks/finetune_lr.py BASELINE --rows sensitivity+refitscan-3x --seeds 0,1 --lrs 0.025
    python benchmarks/finetune_lr.py BASELINE --rows sensitivity+refitscan-3x --lrs 0.01,0.025 --held-out
    python benchmarks/finetune_lr.py runs/parent45k/model.safetensors --rows defaults-3x --lrs 0.01,0.025 --held-out
    python benchmarks/finetune_lr.py runs/parent1207/model.safetensors --rows defaults-3x --seeds 0,1 --distill
    python benchmarks/finetune_lr.py runs/parent1207/model.safetensors --rows dense-control --epochs 20

Each (row, seed, lr) fine-tunes what ``allocation.py`` fine-tunes for that row (its pruned model in
``runs/allocation/ROW/seedS/``, the baseline itself for ``dense-control``) as it does: ``full`` recipe, 10
epochs, no BatchNorm recalibration, distillation off; only the peak learning rate differs. ``--distill``
fine-tunes with BASELINE as teacher instead (the recipe's soft targets, weight 0.5 at T 4; rows named
``ROW+kd``; ``--distill-weight W``: ``ROW+kdW``, soft targets at that weight). ``--epochs N`` fine-tunes N
epochs instead of 10 (``ROW+eN``: a diagnostic, outside the goal's budget). ``--recipe FIELD=VALUE,...``
changes the ``full`` recipe's fields (rows ``ROW+FIELD=VALUE``; compare with ``dense-control`` run with the
same change). ``--held-out`` fine-tunes on the first 4,500 training images a class and scores the other 500 instead of the test split; the allocation benchmark's baseline was trained on those 500 too. ``defaults-2x``
/ ``defaults-3x`` prune BASELINE here with prunekit's defaults of 2026-12-07 afternoon (``group-l2``,
unrounded; on the fine-tuning images only): with a
parent trained on the first 4,500 images a class (``prunekit train ... --subset 4500``), the held-out images
are unseen by every step.

A BASELINE other than the allocation benchmark's parent (told apart by its SHA-256) is a parent of its own:
its rows are named after its run directory (``parent45k-defaults-3x``), and every other row
(``torch-pruning-3x``, ``sensitivity+refitscan+grid9-3x``, ...) prunes it here as allocation.py prunes that
row. Rows are resumable and appended to ``results/finetune_lr.json`` (``--commit``: each committed as it
lands), each with the torch threads it ran on and its fine-tuning's seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import torch

from allocation import prune_row
from common import (
    FULL_ARCHIVE,
    RESULTS,
    ROOT,
    TARGETS,
    checkpoint_digest,
    machine,
    read_results,
    record_parent,
    require,
    save_row,
)
from prunekit import api, finetuning
from prunekit.checkpoint import load_checkpoint
from prunekit.commands.evaluate import load_data_for
from prunekit.data import _first_per_class
from prunekit.datatypes import DataBundle
from prunekit.measure import evaluate
from prunekit.pruning import PruneRequest
from prunekit.train_config import TrainConfig

RESULT = RESULTS / "finetune_lr.json"
ALLOCATION_RESULT = RESULTS / "allocation.json"  # records the parent of runs/allocation's pruned models
EPOCHS = 10
DISTILLED = "+kd"  # as allocation.py names its distilled rows
HELD_OUT_FROM = 4500  # training images a class fine-tuned on with --held-out; the rest are scored


class Parent(NamedTuple):
    """The checkpoint every row starts from; ``own``: not the parent of allocation.py's pruned models."""

    path: Path
    own: bool
    digest: str

    @classmethod
    def of(cls, path: Path) -> Parent:
        recorded = json.loads(ALLOCATION_RESULT.read_text()).get("baseline_sha256")
        digest = checkpoint_digest(path)
        return cls(path, digest != recorded, digest)


def name(row: str, parent: Parent) -> str:
    """A row's name in keys and run directories: on a parent of its own, prefixed with its run directory."""
    return f"{parent.path.parent.name}-{row}" if parent.own else row


def source(row: str, seed: int, parent: Parent, runs: Path, subset: int | None) -> Path:
    """What ``row`` fine-tunes: the parent itself (``dense-control``); the parent pruned here by prunekit's
    defaults (``defaults-*``) or, on a parent of its own, as allocation.py prunes that row; else
    allocation.py's pruned model of that seed."""
    if row == "dense-control":
        return parent.path
    defaults, target = row.startswith("defaults-"), row.rpartition("-")[2]
    if not (defaults or parent.own):
        return ROOT / "runs" / "allocation" / row / f"seed{seed}" / "pruned.safetensors"
    pruned = runs / name(row, parent) / "pruned.safetensors"
    if not pruned.exists() and defaults:
        # pinned to the defaults its committed rows were pruned with (those of 2026-12-07 afternoon); the
        # defaults since are the row sensitivity+refitscan@refit-*
        request = PruneRequest(target_macs=TARGETS[target], round_to=1)
        api.prune_checkpoint(
            parent.path,
            request,
            importance="group-l2",
            data=str(FULL_ARCHIVE),
            subset=subset,
            out=pruned,
            overwrite=True,
        )
    elif not pruned.exists():
        pruned.parent.mkdir(parents=True, exist_ok=True)
        if prune_row(row, parent.path, pruned, {"latency": {}}, str(FULL_ARCHIVE)) is None:
            sys.exit(f"{row}: a latency target needs allocation.py --measure's timings of its parent")
    return pruned


def held_out_bundle(meta: dict) -> DataBundle:
    """The dataset ``meta`` records, its test split replaced by the training images beyond the first
    ``HELD_OUT_FROM`` a class (those ``--held-out`` does not fine-tune on)."""
    # every training image: a parent trained on a subset records it, and would bring it back here
    recorded = {k: v for k, v in (meta.get("data") or {}).items() if k != "subset"}
    bundle = load_data_for({**meta, "data": recorded}, str(FULL_ARCHIVE), None, None)
    labels = bundle.train.labels
    held_out = torch.ones(len(labels), dtype=torch.bool)
    held_out[_first_per_class(labels, HELD_OUT_FROM)] = False  # what --subset fine-tuned on
    bundle.test = bundle.train.subset(torch.nonzero(held_out).flatten())
    if not len(bundle.test):
        raise RuntimeError(f"no training images beyond the first {HELD_OUT_FROM} a class")
    return bundle


def held_out_accuracy(model_file: Path) -> tuple[float, int]:
    """Top-1 of the fine-tuned model on the training images it was not fine-tuned on."""
    ckpt = load_checkpoint(model_file)
    bundle = held_out_bundle(ckpt.meta)
    classes = len(bundle.train.labels.unique())
    return evaluate(ckpt.model, bundle.loader("test"), num_classes=classes)["accuracy"], len(bundle.test)


class Tuning(NamedTuple):
    """How a run fine-tunes beyond its row, seed and rate; each non-default value is named in its key."""

    held_out: bool = False
    distill: bool = False
    distill_weight: float | None = None  # None: the recipe's
    epochs: int = EPOCHS
    recipe: tuple[tuple[str, str], ...] = ()  # (TrainConfig field, value) changed in the `full` recipe

    def suffix(self) -> str:
        """``+kd`` (``+kd0.9`` at a weight of its own) when distilling, ``+e20`` at 20 epochs, then each
        recipe change (``+weight_decay=0.001``)."""
        kd = DISTILLED + (f"{self.distill_weight:g}" if self.distill_weight is not None else "")
        changes = "".join(f"+{field}={value}" for field, value in self.recipe)
        return (kd if self.distill else "") + (f"+e{self.epochs}" if self.epochs != EPOCHS else "") + changes

    def scope(self) -> str:
        """What a key ends with: ``/held-out`` when scored on the held-out training images."""
        return "/held-out" if self.held_out else ""


def changed_recipe(changes: tuple[tuple[str, str], ...]) -> TrainConfig:
    """The `full` recipe's config with ``changes`` (TrainConfig fields, values as text)."""
    cfg = finetuning.RECIPES["full"][0]
    return replace(cfg, **{field: typed_value(getattr(cfg, field), value) for field, value in changes})


def recipe_changed(changes: tuple[tuple[str, str], ...]) -> AbstractContextManager:
    """The `full` recipe with ``changes`` while inside (patched as common.py patches the library's other
    knobs)."""
    freeze = finetuning.RECIPES["full"][1]
    return mock.patch.dict(finetuning.RECIPES, {"full": (changed_recipe(changes), freeze)})


def typed_value(current: object, text: str) -> object:
    """``text`` as a value of ``current``'s type (``bool("false")`` would be True: booleans are spelled)."""
    if isinstance(current, bool):
        if text.lower() not in ("true", "false"):
            raise ValueError(f"a yes/no field takes true or false, got {text}")
        return text.lower() == "true"
    return type(current)(text)


def recipe_changes(text: str | None) -> tuple[tuple[str, str], ...]:
    """``--recipe``'s ``FIELD=VALUE,...`` as pairs, each field one of TrainConfig's."""
    pairs = tuple(tuple(item.split("=", 1)) for item in text.split(",")) if text else ()
    recipe = finetuning.RECIPES["full"][0]
    for pair in pairs:
        if len(pair) != 2 or not hasattr(recipe, pair[0]):
            sys.exit(f"--recipe {text}: each change is FIELD=VALUE with FIELD a TrainConfig field")
        try:
            typed_value(getattr(recipe, pair[0]), pair[1])  # refused now, not after the first rows
        except ValueError:
            sys.exit(f"--recipe {text}: {pair[1]} is not a value of {pair[0]}")
    # one spelling of a yes/no value, so that False and false name the same rows
    bools = {f for f, _ in pairs if isinstance(getattr(recipe, f), bool)}
    return tuple((f, v.lower() if f in bools else v) for f, v in pairs)


def label(row: str, parent: Parent, tuning: Tuning) -> str:
    """A run's row in keys and run directories: ``name``, with what its fine-tuning changes."""
    return name(row, parent) + tuning.suffix()


def key(row: str, seed: int, lr: float, tuning: Tuning, parent: Parent) -> str:
    """A run's key in the results file."""
    return f"{label(row, parent, tuning)}/seed{seed}/lr{lr:g}{tuning.scope()}"


def run(row: str, seed: int, lr: float, tuning: Tuning, parent: Parent, runs: Path) -> dict:
    """One (row, seed, lr) fine-tuned as allocation.py fine-tunes the row (resumed where interrupted)."""
    held_out, distill = tuning.held_out, tuning.distill
    out = runs / f"{label(row, parent, tuning)}-lr{lr:g}-seed{seed}{'-heldout' if held_out else ''}"
    resume = (out / "checkpoint.safetensors").exists()
    subset = HELD_OUT_FROM if held_out else None
    pruned = source(row, seed, parent, runs, subset)
    with recipe_changed(tuning.recipe):
        result = api.finetune_checkpoint(
            pruned,
            out,
            recipe="full",
            epochs=tuning.epochs,
            lr=lr,
            recalibrate=False,
            data=str(FULL_ARCHIVE),
            subset=subset,
            seed=seed,
            teacher=parent.path if distill else None,
            distill=distill,
            distill_weight=tuning.distill_weight if distill else None,
            resume=resume,
            overwrite=not resume,
        )
    entry = {"row": row + tuning.suffix(), "seed": seed, "lr": lr, "epochs": tuning.epochs}
    entry["test"] = result["accuracy"]["finetuned"]
    # every epoch's, a resumed run's included: rows compare at equal time as well as equal epochs
    entry["train_seconds"] = sum(epoch["seconds"] for epoch in result["history"])
    if held_out:
        entry["held_out"], entry["held_out_images"] = held_out_accuracy(out / "model.safetensors")
    return {**entry, "torch_threads": torch.get_num_threads(), "date": machine()["date"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", type=Path)
    parser.add_argument("--rows", default="sensitivity+refitscan-3x")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--lrs", default="0.025")
    parser.add_argument("--held-out", action="store_true")
    parser.add_argument("--distill", action="store_true", help="BASELINE as teacher")
    parser.add_argument(
        "--distill-weight", type=float, help="the soft targets' weight (default: the recipe's)"
    )
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="a diagnostic: the goal's budget is 10")
    parser.add_argument("--recipe", help="FIELD=VALUE,...: changes to the `full` recipe (rows +FIELD=VALUE)")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "finetune_lr")
    parser.add_argument("--commit", action="store_true")
    args = parser.parse_args()
    if args.distill_weight is not None and not args.distill:
        parser.error("--distill-weight is for --distill")
    require(FULL_ARCHIVE)
    parent = Parent.of(args.baseline)
    if parent.own:  # refused now rather than after the first row
        record_parent(read_results(RESULT, "rows"), parent.path, parent.digest)
    tuning = Tuning(
        args.held_out, args.distill, args.distill_weight, args.epochs, recipe_changes(args.recipe)
    )
    for row in args.rows.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            for lr in (float(v) for v in args.lrs.split(",")):
                at = key(row, seed, lr, tuning, parent)
                if at in read_results(RESULT, "rows")["rows"]:
                    continue
                entry = run(row, seed, lr, tuning, parent, args.runs_dir)
                # on a parent of its own, which checkpoint the prefix of its rows names
                named = (parent.path, parent.digest) if parent.own else None
                save_row(RESULT, at, entry, f"bench: finetune_lr {at}" if args.commit else None, named)
                print(json.dumps({at: entry}), flush=True)


if __name__ == "__main__":
    main()
