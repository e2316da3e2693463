"""One short check of a device's path (meant for CUDA where a GPU is lent; runs on CPU too): in-memory
pruning and fine-tuning on the device, ``prunekit train`` from a local weights file on a streamed
full-resolution folder with --val-split, and latency of the pruned against the dense model.

    python benchmarks/device_check.py [--device cuda] [--out OUT.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import prunekit
from prunekit import api
from prunekit.measure import latency
from prunekit.train import TrainConfig


def photo_folder(root: Path, per_class: int = 24) -> Path:
    """Two classes of random-sized JPEGs (train/ only: the check uses --val-split)."""
    rng = np.random.default_rng(0)
    for c, cls in enumerate(("cats", "dogs")):
        for i in range(per_class):
            w, h = int(rng.integers(200, 500)), int(rng.integers(150, 400))
            pixels = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
            pixels[..., c] += 150  # learnable: one colour per class
            (root / "train" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / "train" / cls / f"{i}.jpg")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dev = torch.device(args.device)
    gpu = torch.cuda.get_device_name(0) if dev.type == "cuda" else None
    out: dict = {"device": args.device, "gpu": gpu, "torch": torch.__version__}

    model = torchvision.models.resnet18(num_classes=10).to(dev)
    example = torch.randn(1, 3, 224, 224, device=dev)
    calib = [torch.randn(16, 3, 224, 224, device=dev) for _ in range(2)]
    report = prunekit.prune(model, example, target_macs=0.5, importance="activation", calibration=calib)
    out["prune"] = {
        "macs_ratio": report.macs_ratio,
        "seconds": report.seconds,
        "device": str(next(model.parameters()).device),
    }
    prunekit.recalibrate_bn(model, calib)

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(256) % 10
    images = torch.randn(256, 3, 64, 64, generator=gen) * 0.3
    images[torch.arange(256), labels % 3] += 1 + labels[:, None, None] * 0.2
    loader = DataLoader(TensorDataset(images, labels), batch_size=32)
    start = time.perf_counter()
    fit = prunekit.finetune(model, loader, val=loader, epochs=3, lr=0.05, device=args.device)
    out["finetune"] = {
        "accuracy": fit.test["accuracy"],
        "history": [h["train_loss"] for h in fit.history],
        "seconds": time.perf_counter() - start,
    }

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = tmp / "imagenet-like.pth"
        torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), weights)
        cfg = TrainConfig(epochs=2, batch_size=16, lr=0.01, device=args.device)
        result = api.train(
            "resnet18", str(photo_folder(tmp / "photos")), tmp / "run", cfg, image_size=128,
            weights=str(weights), val_split=0.25,
        )  # fmt: skip
        meta = prunekit.load(tmp / "run" / "model.safetensors").prunekit_meta
        out["train_stream"] = {
            "test_accuracy": result.test["accuracy"],
            "images_per_s": [h["images_per_s"] for h in result.history],
            "preprocess": meta["preprocess"],
            "split": meta["split"],
            "weights": meta["weights"],
        }

    dense = torchvision.models.resnet18(num_classes=10).to(dev)
    pruned_ms, dense_ms = latency([model, dense], 224, batch_size=64, device=dev)
    out["latency_batch64_ms"] = {"pruned": pruned_ms["median_ms"], "dense": dense_ms["median_ms"]}
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
