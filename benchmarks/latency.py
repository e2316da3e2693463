"""CPU latency of pruned checkpoints against their dense architecture, timed in alternation (batch 1 and 64).

python benchmarks/latency.py CHECKPOINT [CHECKPOINT ...] [--repeats 50]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import save
from prunekit.checkpoint import load_checkpoint
from prunekit.measure import count_macs, latency
from prunekit.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    rows = {}
    for path in args.checkpoints:
        ckpt = load_checkpoint(path)
        size = ckpt.meta["input_size"]
        dense = build_model(ckpt.meta["model"], ckpt.meta["num_classes"])
        row = {"macs_reduction": count_macs(dense, size) / count_macs(ckpt.model, size)}
        for batch in (1, 64):
            pruned_t, dense_t = latency(
                [ckpt.model, dense], size, batch_size=batch, warmup=10, repeats=args.repeats
            )
            row[f"batch{batch}"] = {
                "pruned_ms": pruned_t["median_ms"],
                "dense_ms": dense_t["median_ms"],
                "speedup": dense_t["median_ms"] / pruned_t["median_ms"],
            }
        rows[str(path)] = row
        print(
            f"{path}: MACs {row['macs_reduction']:.2f}x fewer; speed-up batch 1 {row['batch1']['speedup']:.2f}x, "
            f"batch 64 {row['batch64']['speedup']:.2f}x",
            flush=True,
        )
    save(
        "latency",
        {
            "command": "python benchmarks/latency.py " + " ".join(map(str, args.checkpoints)),
            "repeats": args.repeats,
            "checkpoints": rows,
        },
    )


if __name__ == "__main__":
    main()
