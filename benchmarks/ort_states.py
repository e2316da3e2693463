"""How steady ONNX Runtime latency is on this machine: the deploy benchmark's dense fp32 model and its pruned
int8 model timed again and again for a while, on 2 threads and on 1, to show a slow state of the machine
when it comes and which models it hits.

    python benchmarks/ort_states.py [--seconds 240]   # after benchmarks/deploy.py (reads runs/deploy/)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import ROOT, require, save
from prunekit.checkpoint import load_checkpoint
from prunekit.deploy import ort_latency, write_onnx

RUN = ROOT / "runs" / "deploy"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=240)
    args = parser.parse_args()
    int8 = require(RUN / "model-round16-sensitivity-int8.onnx")
    dense = load_checkpoint(require(RUN / "baseline" / "model.safetensors")).model.eval()
    ticks = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = [write_onnx(dense, 32, Path(tmp) / "dense.onnx"), int8]
        start = time.time()
        while time.time() - start < args.seconds:
            tick: dict = {"t": round(time.time() - start, 1)}
            for threads in (2, 1):
                for batch in (1, 64):
                    rows = ort_latency(paths, 32, batch, threads, repeats=20 if batch == 1 else 10)
                    tick[f"threads{threads}_batch{batch}"] = {
                        "dense_fp32": rows[0]["median_ms"],
                        "int8": rows[1]["median_ms"],
                    }
            ticks.append(tick)
            two, one = tick["threads2_batch64"], tick["threads1_batch64"]
            print(
                f"t={tick['t']:6.1f}s  2 threads: int8 {tick['threads2_batch1']['int8']:.3f} / {two['int8']:.2f} ms, "
                f"dense {two['dense_fp32']:.2f} ms  |  1 thread: int8 {one['int8']:.2f}, dense {one['dense_fp32']:.2f} ms",
                flush=True,
            )
    save("ort_states", summary(ticks, args.seconds, str(int8)))


def summary(ticks: list[dict], seconds: float, int8: str) -> dict:
    """The batch-1 speed-up's spread, and every tick's medians as columns (ms, rounded to 0.1 us)."""
    speedups = [t["threads2_batch1"]["dense_fp32"] / t["threads2_batch1"]["int8"] for t in ticks]
    series = [k for k in ticks[0] if k != "t"]
    return {
        "command": f"python benchmarks/ort_states.py --seconds {seconds:g}",
        "int8_model": int8,
        "batch1_speedup_2_threads": {
            "median": statistics.median(speedups),
            "min": min(speedups),
            "max": max(speedups),
            "share_at_least_2.5x": sum(s >= 2.5 for s in speedups) / len(speedups),
        },
        "ticks_s": [t["t"] for t in ticks],
        "median_ms": {
            k: {model: [round(t[k][model], 4) for t in ticks] for model in ("dense_fp32", "int8")}
            for k in series
        },
    }


if __name__ == "__main__":
    main()
