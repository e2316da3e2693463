"""The ``full`` fine-tuning recipe's peak learning rate, probed on the allocation benchmark's models.

    python benchmarks/finetune_lr.py BASELINE --rows sensitivity+refitscan-3x --seeds 0,1 --lrs 0.025
    python benchmarks/finetune_lr.py BASELINE --rows sensitivity+refitscan-3x --lrs 0.01,0.025 --held-out
    python benchmarks/finetune_lr.py runs/parent45k/model.safetensors --rows defaults-3x --lrs 0.01,0.025 --held-out

Each (row, seed, lr) fine-tunes what ``allocation.py`` fine-tunes for that row (its pruned model in
``runs/allocation/ROW/seedS/``, the baseline itself for ``dense-control``) as it does: ``full`` recipe, 10
epochs, no BatchNorm recalibration, distillation off; only the peak learning rate differs. ``--held-out``
fine-tunes on the first 4,500 training images a class and scores the other 500 instead of the test split;
the allocation benchmark's baseline was trained on those 500 too. ``defaults-2x`` / ``defaults-3x`` prune
BASELINE here with prunekit's defaults (on the fine-tuning images only): with a parent trained on the first
4,500 images a class (``prunekit train ... --subset 4500``), the held-out images are unseen by every step.
Rows are resumable and appended to ``results/finetune_lr.json`` (``--commit``: each committed as it lands).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common import FULL_ARCHIVE, RESULTS, ROOT, TARGETS, machine, require, save_results
from prunekit import api
from prunekit.checkpoint import load_checkpoint
from prunekit.commands.evaluate import load_data_for
from prunekit.data import _first_per_class
from prunekit.measure import evaluate
from prunekit.pruning import PruneRequest

RESULT = RESULTS / "finetune_lr.json"
EPOCHS = 10
HELD_OUT_FROM = 4500  # training images a class fine-tuned on with --held-out; the rest are scored


def name(row: str, baseline: Path) -> str:
    """A row's name in keys and run directories: ``defaults-*`` rows carry their parent's run directory."""
    return f"{baseline.parent.name}-{row}" if row.startswith("defaults-") else row


def source(row: str, seed: int, baseline: Path, runs: Path, subset: int | None) -> Path:
    """What ``row`` fine-tunes: allocation.py's pruned model of that seed, the baseline itself
    (``dense-control``), or (``defaults-*``) the baseline pruned here by prunekit's defaults."""
    if row == "dense-control":
        return baseline
    if not row.startswith("defaults-"):
        return ROOT / "runs" / "allocation" / row / f"seed{seed}" / "pruned.safetensors"
    pruned = runs / name(row, baseline) / "pruned.safetensors"
    if not pruned.exists():
        request = PruneRequest(target_macs=TARGETS[row.removeprefix("defaults-")])
        api.prune_checkpoint(
            baseline, request, data=str(FULL_ARCHIVE), subset=subset, out=pruned, overwrite=True
        )
    return pruned


def held_out_accuracy(model_file: Path) -> tuple[float, int]:
    """Top-1 of the fine-tuned model on the training images it was not fine-tuned on."""
    ckpt = load_checkpoint(model_file)
    # every training image: a parent trained on a subset records it, and would bring it back here
    recorded = {k: v for k, v in (ckpt.meta.get("data") or {}).items() if k != "subset"}
    bundle = load_data_for({**ckpt.meta, "data": recorded}, str(FULL_ARCHIVE), None, None)
    labels = bundle.train.labels
    held_out = torch.ones(len(labels), dtype=torch.bool)
    held_out[_first_per_class(labels, HELD_OUT_FROM)] = False  # what --subset fine-tuned on
    bundle.test = bundle.train.subset(torch.nonzero(held_out).flatten())
    if not len(bundle.test):
        raise RuntimeError(f"{model_file}: no training images beyond the first {HELD_OUT_FROM} a class")
    accuracy = evaluate(ckpt.model, bundle.loader("test"), num_classes=len(labels.unique()))["accuracy"]
    return accuracy, len(bundle.test)


def run(row: str, seed: int, lr: float, held_out: bool, baseline: Path, runs: Path) -> dict:
    """One (row, seed, lr) fine-tuned as allocation.py fine-tunes the row (resumed where interrupted)."""
    out = runs / f"{name(row, baseline)}-lr{lr:g}-seed{seed}{'-heldout' if held_out else ''}"
    resume = (out / "checkpoint.safetensors").exists()
    subset = HELD_OUT_FROM if held_out else None
    result = api.finetune_checkpoint(
        source(row, seed, baseline, runs, subset),
        out,
        recipe="full",
        epochs=EPOCHS,
        lr=lr,
        recalibrate=False,
        data=str(FULL_ARCHIVE),
        subset=subset,
        seed=seed,
        distill=False,
        resume=resume,
        overwrite=not resume,
    )
    entry = {"row": row, "seed": seed, "lr": lr, "test": result["accuracy"]["finetuned"]}
    if held_out:
        entry["held_out"], entry["held_out_images"] = held_out_accuracy(out / "model.safetensors")
    return {**entry, "date": machine()["date"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", type=Path)
    parser.add_argument("--rows", default="sensitivity+refitscan-3x")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--lrs", default="0.025")
    parser.add_argument("--held-out", action="store_true")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "finetune_lr")
    parser.add_argument("--commit", action="store_true")
    args = parser.parse_args()
    require(FULL_ARCHIVE)
    for row in args.rows.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            for lr in (float(v) for v in args.lrs.split(",")):
                key = f"{name(row, args.baseline)}/seed{seed}/lr{lr:g}{'/held-out' if args.held_out else ''}"
                results = json.loads(RESULT.read_text()) if RESULT.exists() else {"rows": {}}
                if key in results["rows"]:
                    continue
                entry = run(row, seed, lr, args.held_out, args.baseline, args.runs_dir)
                results = json.loads(RESULT.read_text()) if RESULT.exists() else {"rows": {}}
                results["rows"][key] = entry
                save_results(RESULT, results, f"bench: finetune_lr {key}" if args.commit else None)
                print(json.dumps({key: entry}), flush=True)


if __name__ == "__main__":
    main()
