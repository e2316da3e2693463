"""The seed's experiment and real compression (2x, 3x fewer MACs) through `prunekit run`, plus Torch-Pruning
used as its README shows (BasePruner + GroupMagnitudeImportance + plain full fine-tuning) at the same target
and epochs. All runs reuse one trained baseline.

    python benchmarks/compression.py BASELINE_CHECKPOINT [--finetune-epochs 2] [--only seed,2x,...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import FULL_ARCHIVE, ROOT, require, save, torch_pruning_uniform
from prunekit import api
from prunekit.pipeline import RunConfig, run

RUNS = {
    "seed": dict(),  # the defaults are the seed's experiment, fine-tuned for --finetune-epochs
    "seed-10ep": dict(finetune_epochs=10),  # ... and with the seed's own 10 epochs
    "2x": dict(target_macs=0.5, recipe="full"),
    "2x-distill": dict(target_macs=0.5, recipe="full", distill=True),
    "2x-seed-policy": dict(target_macs=0.5, recipe="full", freeze="blog"),
    "3x": dict(target_macs=1 / 3, recipe="full"),
}


def torch_pruning_reference(baseline: Path, data: str, epochs: int, target: float, out: Path) -> dict:
    """Torch-Pruning's README recipe at ``target`` MACs, then plain full fine-tuning for ``epochs``."""
    pruned = torch_pruning_uniform(baseline, target, out / "pruned.safetensors")
    result = api.finetune_checkpoint(
        out / "pruned.safetensors",
        out / "finetune",
        recipe="full",
        epochs=epochs,
        recalibrate=False,
        data=data,
    )
    final = api.evaluate_checkpoint(out / "finetune" / "model.safetensors", data=data)
    return {
        **pruned,
        "accuracy": result["accuracy"],
        "final_accuracy": final["accuracy"],
        "speedup": final.get("speedup"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", type=Path)
    parser.add_argument("--data", default=str(FULL_ARCHIVE))
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--only", default=",".join([*RUNS, "torch-pruning-2x"]))
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "benchmarks"))
    args = parser.parse_args()
    if args.data == str(FULL_ARCHIVE):
        require(FULL_ARCHIVE)
    results_path = ROOT / "benchmarks" / "results" / "compression.json"
    previous = json.loads(results_path.read_text()) if results_path.exists() else {}
    results = previous.get("runs", {})
    for name in args.only.split(","):
        # Runs with another fine-tuning budget than the default 2 epochs are kept apart: "2x-5ep".
        key = name if args.finetune_epochs == 2 else f"{name}-{args.finetune_epochs}ep"
        start = time.perf_counter()
        if name == "torch-pruning-2x":
            results[key] = torch_pruning_reference(
                args.baseline, args.data, args.finetune_epochs, 0.5, Path(args.runs_dir) / key
            )
        else:
            cfg = RunConfig.from_dict(
                {
                    "name": key,
                    "runs_dir": args.runs_dir,
                    "baseline": str(args.baseline),
                    "data": args.data,
                    "finetune_epochs": args.finetune_epochs,
                    **RUNS[name],
                }
            )
            metrics = run(cfg, resume=True)
            results[key] = {"config": RUNS[name], "finetune_epochs": cfg.finetune_epochs, **metrics}
        results[key]["wall_s"] = time.perf_counter() - start
        name = key
        print(json.dumps({name: results[name].get("accuracy")}, indent=1), flush=True)
        save(
            "compression",
            {
                "commands": sorted(
                    set(previous.get("commands", [previous["command"]] if "command" in previous else []))
                    | {
                        f"python benchmarks/compression.py {args.baseline} --finetune-epochs {args.finetune_epochs}"
                        f" --only {args.only}"
                    }
                ),
                "note": "fine-tuning epochs: 2 unless the run's key ends in -Nep",
                "runs": results,
            },
        )


if __name__ == "__main__":
    main()
