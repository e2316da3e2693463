"""Training throughput: prunekit's loop (uint8 tensors in memory, batched augmentation) against a plain
torchvision ImageFolder + PIL transforms + DataLoader loop, same model, same images, one script run.

    python benchmarks/throughput.py [--per-class 300] [--steps 20]
"""

from __future__ import annotations

import argparse
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Subset
from torchvision import transforms

from common import FULL_ARCHIVE, require, save
from prunekit.data import load_data
from prunekit.models import build_model
from prunekit.train import TrainConfig, fit


def torchvision_loop(
    root: Path, per_class: int, batch_size: int, steps: int, workers: int, mean, std
) -> float:
    """Images/s of the classic per-image PIL pipeline feeding the same model and optimizer."""
    tf = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    ds = torchvision.datasets.ImageFolder(str(root / "train"), transform=tf)
    keep = [
        i for c in range(len(ds.classes)) for i in [j for j, t in enumerate(ds.targets) if t == c][:per_class]
    ]
    loader = DataLoader(
        Subset(ds, keep),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
    )
    torch.manual_seed(0)
    model = build_model("resnet18", 10).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()
    seen, start, step = 0, None, 0
    while step < steps + 2:
        for x, y in loader:
            if step == 2:  # the first steps warm up allocators and workers
                start, seen = time.perf_counter(), 0
            x = x.contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(y)
            step += 1
            if step >= steps + 2:
                break
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=300, help="training images per class in both loops")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of the torchvision loop")
    args = parser.parse_args()
    archive = require(FULL_ARCHIVE)
    bundle = load_data(str(archive), subset=args.per_class)
    cfg = TrainConfig(epochs=1, batch_size=128, lr=0.05, schedule="constant", device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        start = time.perf_counter()
        result = fit(
            build_model("resnet18", 10),
            bundle,
            cfg,
            Path(tmp) / "run",
            {"model": "resnet18", "num_classes": 10},
        )
        prunekit_ips = result.history[0]["images_per_s"]
        prunekit_wall = time.perf_counter() - start
        root = Path(tmp) / "images"
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
        rows = {"prunekit loop (fit)": prunekit_ips}
        for workers in (0, 2):
            rows[f"torchvision ImageFolder+PIL, DataLoader workers={workers}"] = torchvision_loop(
                root, args.per_class, 128, args.steps, workers, bundle.mean, bundle.std
            )
    for name, ips in rows.items():
        print(f"{name:55s} {ips:8.1f} images/s")
    save(
        "throughput",
        {
            "command": "python benchmarks/throughput.py "
            + f"--per-class {args.per_class} --steps {args.steps}",
            "model": "resnet18 (seed), batch 128, SGD, channels_last, fp32 on this CPU (bf16 off: no native bf16)",
            "images_per_s": rows,
            "prunekit_epoch_wall_s_incl_eval": prunekit_wall,
        },
    )


if __name__ == "__main__":
    main()
