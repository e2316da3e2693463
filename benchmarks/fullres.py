"""Full-resolution image folders: training throughput of the whole pipeline against the model-only ceiling,
and peak memory of ``prunekit train`` at 224 px for a folder and for one 10x larger, in one script run.

    python benchmarks/fullres.py [--per-class 200] [--scale 10]

The folders are CIFAR-10 from ../shared/data upsampled to 224x224 JPEGs (made once under runs/fullres-data).
Every finished row is written to results/fullres.json at once, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import torch
from PIL import Image

from common import FULL_ARCHIVE, RESULTS, ROOT, machine, require
from prunekit.models import build_model
from prunekit.train import TrainConfig, fit

DATA_ROOT = ROOT / "runs" / "fullres-data"
SIZE, BATCH = 224, 64


def make_folder(dest: Path, train_per_class: int, test_per_class: int) -> Path:
    """CIFAR-10 images upsampled to 224x224 JPEGs in train/<class>/ and test/<class>/ (skipped if present)."""
    done = dest / ".complete"
    if done.exists():
        return dest
    wanted = {"train": train_per_class, "test": test_per_class}
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(require(FULL_ARCHIVE)) as tar:
        for member in tar:
            parts = member.name.strip("./").split("/")
            if not member.isfile() or len(parts) != 3 or parts[0] not in wanted:
                continue
            split, cls, name = parts
            if counts.get((split, cls), 0) >= wanted[split]:
                continue
            counts[(split, cls)] = counts.get((split, cls), 0) + 1
            img = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
            out = dest / split / cls / name
            out.parent.mkdir(parents=True, exist_ok=True)
            img.resize((SIZE, SIZE), Image.BICUBIC).save(out, quality=90)
    done.touch()
    return dest


def make_photos(dest: Path, train_per_class: int = 200, val_per_class: int = 50) -> Path:
    """A user's photo folder: two classes, train/ and val/, JPEGs of about 500x375 in various sizes and
    orientations (CIFAR-10 cats and dogs upsampled), the case that once ran at 4 images/s in 13.5 GB."""
    done = dest / ".complete"
    if done.exists():
        return dest
    rng = random.Random(0)
    wanted = {("train", "cat"): train_per_class, ("train", "dog"): train_per_class}
    wanted |= {("test", "cat"): val_per_class, ("test", "dog"): val_per_class}
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(require(FULL_ARCHIVE)) as tar:
        for member in tar:
            parts = member.name.strip("./").split("/")
            if not member.isfile() or len(parts) != 3 or tuple(parts[:2]) not in wanted:
                continue
            key = (parts[0], parts[1])
            if counts.get(key, 0) >= wanted[key]:
                continue
            counts[key] = counts.get(key, 0) + 1
            w, h = rng.randint(420, 640), rng.randint(300, 480)
            if rng.random() < 0.25:
                w, h = h, w  # some portraits
            img = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
            out = dest / ("val" if key[0] == "test" else "train") / key[1] / parts[2]
            out.parent.mkdir(parents=True, exist_ok=True)
            img.resize((w, h), Image.BICUBIC).save(out, quality=90)
    done.touch()
    return dest


def tree_pss_mb(pid: int) -> float:
    """Proportional set size of a process and all its descendants (shared pages counted once), in MB."""
    total, stack = 0.0, [pid]
    while stack:
        p = stack.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):  # children files are cheap: no scan of all of /proc
                stack.extend(int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split())
        except OSError:
            pass
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def run_train(
    data: Path, out: Path, extra: tuple[str, ...] = ("--image-size", str(SIZE), "--batch-size", str(BATCH))
) -> dict:
    """``prunekit train`` (224 px, batch 64 unless ``extra`` says otherwise), one epoch, with the peak memory
    of its whole process tree."""
    cmd = [
        sys.executable, "-m", "prunekit", "train", "--model", "resnet18", "--data", str(data),
        *extra, "--epochs", "1", "--out", str(out),
    ]  # fmt: skip
    peak, stop = [0.0], threading.Event()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_pss_mb(proc.pid))
            time.sleep(1.0)  # the sampler must not steal time from the run it measures

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    images = sum(1 for p in (data / "train").rglob("*.jpg"))
    return {
        "command": " ".join(cmd[2:]),
        "train_images": images,
        "images_per_s": metrics["history"][0]["images_per_s"],
        "peak_memory_mb": round(peak[0], 1),
        "wall_s": round(time.perf_counter() - start, 1),
        "bf16_active": metrics["bf16_active"],
    }


def model_only_ceiling(steps: int) -> dict:
    """The same loop (``fit``) on random 224-px batches already in memory: the fastest the model trains."""
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(BATCH, 3, SIZE, SIZE, generator=gen), torch.randint(0, 10, (BATCH,)))
        for _ in range(steps)
    ]
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=1, batch_size=BATCH)
    result = fit(build_model("resnet18", 10), batches, cfg)
    return {"steps": steps, "images_per_s": result.history[0]["images_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=200, help="training images per class (1x folder)")
    parser.add_argument("--scale", type=int, default=10, help="the larger folder holds this many times more")
    parser.add_argument("--rows", default="ceiling,1x,scaled,photos", help="which rows to (re)measure")
    args = parser.parse_args()
    todo = set(args.rows.split(","))
    path = RESULTS / "fullres.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result.update(
        command=f"python benchmarks/fullres.py --per-class {args.per_class} --scale {args.scale}",
        machine=machine(),
        rows=result.get("rows", {}),
    )

    def record(name: str, row: dict) -> None:
        result["rows"][name] = row
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{name}: {row}", flush=True)

    small = make_folder(DATA_ROOT / f"x1-{args.per_class}", args.per_class, 50)
    large = make_folder(DATA_ROOT / f"x{args.scale}-{args.per_class}", args.per_class * args.scale, 50)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PRUNEKIT_CACHE"] = str(Path(tmp) / "cache")  # index and probe made fresh, in this run
        if "ceiling" in todo:
            record("model_only_ceiling", model_only_ceiling(steps=10 * args.per_class // BATCH))
        if "1x" in todo:
            record("pipeline_1x", run_train(small, Path(tmp) / "x1"))
        if "scaled" in todo:
            record(f"pipeline_{args.scale}x", run_train(large, Path(tmp) / "xN"))
        if "photos" in todo:
            photos = make_photos(DATA_ROOT / "photos")
            record("photos_defaults", run_train(photos, Path(tmp) / "photos", extra=()))
    rows = result["rows"]
    result["pipeline_over_ceiling"] = (
        rows["pipeline_1x"]["images_per_s"] / rows["model_only_ceiling"]["images_per_s"]
    )
    result["memory_growth_at_scale"] = (
        rows[f"pipeline_{args.scale}x"]["peak_memory_mb"] / rows["pipeline_1x"]["peak_memory_mb"]
    )
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("pipeline_over_ceiling", "memory_growth_at_scale")}))


if __name__ == "__main__":
    main()
