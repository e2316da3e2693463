"""Record a finished `prunekit train` run (test accuracy, wall time, per-epoch history) as a benchmark result.

python benchmarks/record_baseline.py RUN_DIR
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

from common import save
from prunekit.checkpoint import read_meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    metrics = json.loads((args.run_dir / "metrics.json").read_text())
    meta = read_meta(args.run_dir / "model.safetensors")
    history = metrics["history"]
    started = dt.datetime.fromisoformat(meta["created"])
    finished = dt.datetime.fromtimestamp(
        (args.run_dir / "model.safetensors").stat().st_mtime, dt.timezone.utc
    )
    save(
        "baseline",
        {
            "command": f"prunekit train --model {meta['model']} --data {meta['data']['spec']} "
            f"--epochs {len(history)} --out {args.run_dir}",
            "model": meta["model"],
            "config": meta["train"]["config"],
            "test_accuracy": metrics["test_accuracy"],
            "train_seconds": metrics["train_seconds"],
            "wall_seconds_incl_evaluation": (finished - started).total_seconds(),
            "mean_images_per_s": sum(h["images_per_s"] for h in history) / len(history),
            "per_class_accuracy": metrics["per_class_accuracy"],
            "history": history,
        },
    )


if __name__ == "__main__":
    main()
