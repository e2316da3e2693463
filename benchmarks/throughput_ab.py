"""Has the CIFAR-10 training loop slowed down? Times ``fit`` on the in-memory CIFAR path for this checkout and
for another source tree (e.g. a worktree of an older commit), alternating runs in fresh processes.

    git worktree add ../before 9ac7488
    python benchmarks/throughput_ab.py ../before/src [--pairs 3] [--per-class 300]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

from common import FULL_ARCHIVE, ROOT, require, save

RUN = """
import sys, tempfile, torch
from pathlib import Path
from prunekit.data import load_data
from prunekit.models import build_model
from prunekit.train import TrainConfig, fit
bundle = load_data(sys.argv[1], subset=int(sys.argv[2]))
cfg = TrainConfig(epochs=1, batch_size=128, lr=0.05, schedule="constant", device="cpu")
with tempfile.TemporaryDirectory() as tmp:
    torch.manual_seed(0)
    r = fit(build_model("resnet18", 10), bundle, cfg, Path(tmp) / "run", {"model": "resnet18", "num_classes": 10})
print(r.history[0]["images_per_s"])
"""


def images_per_s(src: str, per_class: int) -> float:
    env = {**os.environ, "PYTHONPATH": src}
    out = subprocess.run(
        [sys.executable, "-c", RUN, str(require(FULL_ARCHIVE)), str(per_class)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before_src", help="the src/ folder of the code to compare against")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=300)
    args = parser.parse_args()
    rows: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(args.pairs):
        rows["before"].append(images_per_s(os.path.abspath(args.before_src), args.per_class))
        rows["after"].append(images_per_s(str(ROOT / "src"), args.per_class))
        print({k: [round(v, 1) for v in vs] for k, vs in rows.items()}, flush=True)
    medians = {k: statistics.median(v) for k, v in rows.items()}
    save(
        "throughput_ab",
        {
            "command": f"python benchmarks/throughput_ab.py {args.before_src} --pairs {args.pairs} "
            f"--per-class {args.per_class}",
            "what": "images/s of fit on the in-memory CIFAR-10 path (resnet18, batch 128), alternating fresh processes",
            "images_per_s": rows,
            "median": medians,
            "after_over_before": medians["after"] / medians["before"],
        },
    )


if __name__ == "__main__":
    main()
