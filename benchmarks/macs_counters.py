"""How other MACs counters read prunekit's MACs targets: torchinfo's "Total mult-adds" and Torch-Pruning's
``count_ops_and_params``, as a ratio of each counter's reading to the target, on randomly initialised
torchvision models (the l1 criterion, 32-px inputs; counting needs no trained weights). Every pruned model is
measured by all three inside prunekit, and plans are priced by the elementwise work Torch-Pruning adds, so
every row should read within 2 % (prunekit, torchinfo) and 3 % (Torch-Pruning); MobileNetV2 at 0.3 read
1.052-1.056x by Torch-Pruning before that.

python benchmarks/macs_counters.py        # about a minute; writes results/macs_counters.json
"""

from __future__ import annotations

import json

import torch
import torch_pruning as tp
from torchinfo import summary

from common import RESULTS, machine
from prunekit.importance import make_importance
from prunekit.measure import count_macs
from prunekit.models import build_model
from prunekit.pruning import PruneRequest, prune_model

MODELS, TARGETS, SEEDS = ("resnet18", "mobilenet_v2", "vgg11_bn"), (0.3, 0.5, 0.7), (0, 1, 2)


def readings(name: str, target: float, seed: int) -> dict[str, float]:
    """Each counter's pruned/dense ratio, divided by the target (1.0: exactly on target)."""
    example = torch.zeros(1, 3, 32, 32)
    torch.manual_seed(seed)
    dense = build_model(name, 10).eval()
    pruned = build_model(name, 10).eval()
    pruned.load_state_dict(dense.state_dict())
    prune_model(pruned, PruneRequest(target_macs=target), make_importance("l1"), example)
    counters = {
        "prunekit": lambda m: count_macs(m, example),
        "torchinfo": lambda m: summary(m, input_data=example, verbose=0).total_mult_adds,
        "torch_pruning": lambda m: tp.utils.count_ops_and_params(m, example)[0],
    }
    return {k: round(count(pruned) / count(dense) / target, 4) for k, count in counters.items()}


def main() -> None:
    rows = {
        f"{name}/{target}/seed{seed}": readings(name, target, seed)
        for name in MODELS
        for target in TARGETS
        for seed in SEEDS
    }
    for key, row in rows.items():
        print(key, row, flush=True)
    out = RESULTS / "macs_counters.json"
    out.write_text(json.dumps({"rows": rows, "machine": machine()}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
