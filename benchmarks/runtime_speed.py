"""Speed-ups of pruned checkpoints over their dense parent in PyTorch and in ONNX Runtime, as ``prunekit eval``
measures them (the parent's architecture timed in alternation with each, batch 1 and 64), with the pruned
distinct channel counts that are not multiples of 16 (the blocks ONNX Runtime's fast CPU convolutions work in).

    python benchmarks/runtime_speed.py PRUNED.safetensors [PRUNED.safetensors ...]

Each checkpoint is a row of ``results/runtime_speed.json`` (keyed by its run directory and file name), written
as it lands; run it on a quiet machine, nothing else running.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common import RESULTS, machine, read_results, require, save_results
from prunekit import api
from prunekit.commands.evaluate import ORT_CHANNEL_BLOCK

RESULT = RESULTS / "runtime_speed.json"


def row(path: Path) -> dict:
    """What ``prunekit eval`` measured of ``path``: its test accuracy, speed-ups and latencies in both runtimes."""
    results = api.evaluate_checkpoint(path)
    keys = ("speedup", "ort_speedup", "latency", "parent_latency", "ort_latency", "ort_parent_latency")
    return {
        "accuracy": results["accuracy"],  # as the checkpoint is: after pruning (and recovery) alone, if so
        "macs": results["macs"],
        **{k: results[k] for k in keys},
        "off_block_counts": results["off_block_counts"],
        "note": results["note"],
        "torch_threads": torch.get_num_threads(),
        "date": machine()["date"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--commit", action="store_true")
    args = parser.parse_args()
    for path in args.checkpoints:
        require(path)
        key = f"{path.resolve().parent.name}/{path.name}"
        entry = row(path)
        results = read_results(RESULT, "rows")
        results["rows"][key] = {"checkpoint": str(path), **entry}
        save_results(RESULT, results, f"bench: runtime_speed {key}" if args.commit else None)
        speed = {f"{rt} {b}": f"{s:.2f}x" for rt in ("speedup", "ort_speedup") for b, s in entry[rt].items()}
        print(key, speed, f"{len(entry['off_block_counts'])} counts off {ORT_CHANNEL_BLOCK}", flush=True)


if __name__ == "__main__":
    main()
