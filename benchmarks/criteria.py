"""Which importance criterion keeps the most accuracy right after pruning (no fine-tuning)?

Prunes a trained checkpoint three ways (layer2.0.conv1 by 20 % and 50 %, and globally to half the MACs) with
every criterion and evaluates test accuracy on the full CIFAR-10 test split: straight after pruning, and
again after BatchNorm recalibration on 2,048 training images (no gradient steps), as `prunekit run` does.

    python benchmarks/criteria.py CHECKPOINT
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import FULL_ARCHIVE, require, save
from prunekit import api
from prunekit.checkpoint import load_checkpoint
from prunekit.finetuning import recalibrate_batchnorm
from prunekit.measure import evaluate
from prunekit.pruning import PruneRequest

SETTINGS = {
    "layer2.0.conv1 20%": dict(layers=["layer2.0.conv1"], ratio=0.2),
    "layer2.0.conv1 50%": dict(layers=["layer2.0.conv1"], ratio=0.5),
    "global 2x MACs": dict(target_macs=0.5),
}
CRITERIA = [
    ("activation (seed: raw mean, random noise)", "activation", "random"),
    ("activation (raw mean, 256 real images)", "activation", "data"),
    ("activation-post (ReLU(BN) mean, real images)", "activation-post", "data"),
    ("l1", "l1", "data"),
    ("l2", "l2", "data"),
    ("bn", "bn", "data"),
    ("taylor (256 real images)", "taylor", "data"),
    ("random", "random", "data"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", default=str(FULL_ARCHIVE))
    args = parser.parse_args()
    if args.data == str(FULL_ARCHIVE):
        require(FULL_ARCHIVE)
    dense = load_checkpoint(args.checkpoint)
    bundle = api.load_data_for(dense.meta, args.data)
    dense_acc = evaluate(dense.model, bundle.loader("test", 500))["accuracy"]
    print(f"dense: {dense_acc:.2%}")
    table: dict[str, dict[str, float]] = {}
    recalibrated: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, criterion, calibration in CRITERIA:
            table[label] = {}
            for setting, request in SETTINGS.items():
                start = time.perf_counter()
                out = Path(tmp) / "pruned.safetensors"
                report = api.prune_checkpoint(
                    args.checkpoint,
                    PruneRequest(**request),
                    importance=criterion,
                    data=args.data,
                    calibration=calibration,
                    out=out,
                )
                pruned = load_checkpoint(out)
                acc = evaluate(pruned.model, bundle.loader("test", 500))["accuracy"]
                batches = api.calibration_batches(pruned.meta, bundle, 2048)
                recalibrate_batchnorm(pruned.model, [x for x, _ in batches])
                recal = evaluate(pruned.model, bundle.loader("test", 500))["accuracy"]
                table[label][setting] = acc
                recalibrated.setdefault(label, {})[setting] = recal
                print(
                    f"{label:48s} {setting:20s} {acc:.2%} -> {recal:.2%} recalibrated "
                    f"(MACs x{report['macs']['ratio']:.3f}, {time.perf_counter() - start:.0f}s)",
                    flush=True,
                )
    lines = ["| criterion | " + " | ".join(SETTINGS) + " |", "|---|" + "---:|" * len(SETTINGS)]
    lines += [
        f"| {label} | " + " | ".join(f"{row[s]:.2%} ({recalibrated[label][s]:.2%})" for s in SETTINGS) + " |"
        for label, row in table.items()
    ]
    print("\n".join(lines))
    save(
        "criteria",
        {
            "command": f"python benchmarks/criteria.py {args.checkpoint}",
            "checkpoint_test_accuracy": dense_acc,
            "note": "test accuracy right after pruning, no fine-tuning; in brackets after BatchNorm recalibration",
            "accuracy": table,
            "accuracy_after_bn_recalibration": recalibrated,
            "markdown": "\n".join(lines),
        },
    )


if __name__ == "__main__":
    main()
