"""Which fine-tuning recipe keeps most of a pretrained model with 1,000 labelled images: the few-shot
benchmark's pruned EfficientNet-Lite1 (`fewshot.py`'s parent and its `prunekit` row, pruned once), fine-tuned
5 epochs by each recipe below, chosen on 1,000 *held-out training* images (the next 100 a class of the
training split, which no row trains on); the test accuracy is recorded beside it, never used to choose.

python benchmarks/fewshot_recipes.py [--recipes kd0.5,kd1,kd0.5-mixup,kd0.5-feat1,kd0.5-feat4,ce] [--seed 0]

Needs fewshot.py's dense parent in --runs (`python benchmarks/fewshot.py` makes it). Resumable recipe by
recipe: each finished one is written to results/fewshot_recipes.json at once.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import prunekit
from common import FULL_ARCHIVE, RESULTS, machine, require
from fewshot import (
    EPOCHS,
    LR,
    PER_CLASS_TEST,
    PER_CLASS_TRAIN,
    Upsampled,
    held_out,
    per_class,
    pretrained,
    pruned_once,
)
from prunekit.data import load_data
from prunekit.finetuning import recipe
from prunekit.measure import evaluate

OUT = RESULTS / "fewshot_recipes.json"
# TrainConfig overrides of the `full` recipe, by name; every recipe but `ce` distils from the dense parent
RECIPES = {
    "ce": {},  # cross-entropy on the labels only
    "kd0.5": {},  # the defaults before 2026-12-03: half cross-entropy, half soft targets
    "kd1": {"distill_weight": 1.0},  # soft targets only
    "kd0.5-mixup": {"distill_mixup": 1.0},
    # the soft targets and the classifier's input features matched at this weight (losses.FeatureMatch)
    "kd0.5-feat1": {"distill_features": 1.0},
    "kd0.5-feat4": {"distill_features": 4.0},
    # the learning rate (0.01 in the `full` recipe) and a warm-up from zero over the first epoch
    "kd0.5-lr0.005": {"lr": 0.005},
    "kd0.5-lr0.02": {"lr": 0.02},
    "kd0.5-warmup1": {"warmup_epochs": 1.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(FULL_ARCHIVE))
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="runs/fewshot")
    args = parser.parse_args()
    require(Path(args.data))
    runs = Path(args.runs)
    if not (runs / "dense.safetensors").exists():
        raise SystemExit(
            f"{runs / 'dense.safetensors'} is missing: run benchmarks/fewshot.py first (its parent)"
        )
    bundle = load_data(args.data)
    train = per_class(bundle.train, PER_CLASS_TRAIN)
    val = Upsampled(*held_out(bundle.train, PER_CLASS_TRAIN, PER_CLASS_TRAIN), batch=50, train=False)
    test = Upsampled(*per_class(bundle.test, PER_CLASS_TEST), batch=50, train=False)
    dense = prunekit.load(runs / "dense.safetensors", model=pretrained()).eval()
    calibration = [x for x, _ in Upsampled(*train, 64, False)][:8]  # fewshot.py's 512 unlabelled images
    start, _ = pruned_once("prunekit", dense, calibration, runs)  # its `prunekit` row, pruned once
    results = json.loads(OUT.read_text()) if OUT.exists() else {"recipes": {}}
    parent = {"held_out": evaluate(dense, val)["accuracy"], "test": evaluate(dense, test)["accuracy"]}
    if results.get("dense") != parent:  # another dense transfer: its recipes are kept apart
        if results.get("recipes"):
            earlier = {
                "dense": results.get("dense"),
                "recipes": results["recipes"],
                "machine": results.get("machine"),
            }
            results.setdefault("earlier_parents", []).append(earlier)
        results["dense"], results["recipes"] = parent, {}
    for name in (r for r in args.recipes.split(",") if f"{r}/seed{args.seed}" not in results["recipes"]):
        began, model = time.perf_counter(), copy.deepcopy(start)
        config, _ = recipe("full", **{"epochs": EPOCHS, "lr": LR, "seed": args.seed, **RECIPES[name]})
        teacher = None if name == "ce" else dense
        prunekit.finetune(model, Upsampled(*train, 32, True, args.seed), config=config, teacher=teacher,
                          recalibrate=False)  # fmt: skip
        model.eval()
        row = {"held_out": evaluate(model, val)["accuracy"], "test": evaluate(model, test)["accuracy"]}
        if OUT.exists():  # rows another process wrote meanwhile are kept (one process a recipe list)
            results["recipes"] = {**json.loads(OUT.read_text()).get("recipes", {}), **results["recipes"]}
        results["recipes"][f"{name}/seed{args.seed}"] = {**row, "overrides": RECIPES[name],
                                                         "seconds": time.perf_counter() - began}  # fmt: skip
        OUT.write_text(json.dumps({**results, "machine": machine()}, indent=1) + "\n")
        print(f"{name}/seed{args.seed}: {row['held_out']:.2%} held-out, {row['test']:.2%} test", flush=True)


if __name__ == "__main__":
    main()
