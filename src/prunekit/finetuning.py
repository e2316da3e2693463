"""Fine-tuning choices for a pruned model: recipes, freezing policies, BatchNorm recalibration."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace

import torch
import torch.nn as nn

from .errors import UsageError, arg
from .train import TrainConfig

FREEZE_POLICIES = ("seed", "none")
RECIPES = {
    # The seed's fine-tuning: Adam at lr 1e-4 for 10 epochs, only the pruned blocks and the classifier train.
    "seed": (
        TrainConfig(
            epochs=10, optimizer="adam", lr=1e-4, weight_decay=0.0, schedule="constant", label_smoothing=0.0
        ),
        "seed",
    ),
    # Everything trains, SGD with a short cosine schedule from a small learning rate.
    "full": (
        TrainConfig(
            epochs=10,
            optimizer="sgd",
            lr=0.01,
            weight_decay=5e-4,
            schedule="cosine",
            warmup_epochs=0.0,
            label_smoothing=0.1,
        ),
        "none",
    ),
}


def recipe(name: str, **overrides) -> tuple[TrainConfig, str]:
    """A fine-tuning preset (config, freezing policy), with ``overrides`` applied where not None."""
    if name not in RECIPES:
        raise UsageError(f"unknown fine-tuning recipe '{name}'; choose one of {', '.join(RECIPES)}")
    cfg, freeze = RECIPES[name]
    freeze = overrides.pop("freeze", None) or freeze
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None}), freeze


def pruned_blocks(changed_layers: Iterable[str]) -> list[str]:
    """The blocks holding pruned layers: each layer's parent module (``layer2.0.conv1`` -> ``layer2.0``)."""
    return sorted({name.rpartition(".")[0] for name in changed_layers})


def trainable_filter(
    policy: str, changed_layers: Iterable[str], classifier: str
) -> Callable[[str], bool] | None:
    """Which parameters train under ``policy``; None means all.

    ``seed``: the pruned blocks (their convs and *their* BatchNorms) and the classifier. The seed's own rule,
    ``'bn' in name``, also unfroze every other BatchNorm in the network; prunekit does not, so the layers the
    policy calls frozen really keep their weights and statistics.
    """
    if policy == "none":
        return None
    if policy != "seed":
        raise UsageError(f"{arg('freeze')} must be one of {', '.join(FREEZE_POLICIES)}, got {policy}")
    blocks = pruned_blocks(changed_layers)
    prefixes = tuple(f"{b}." for b in blocks if b) + (f"{classifier}.",)
    top_level = {
        name for name in changed_layers if "." not in name
    }  # a pruned top-level layer is its own block

    def trainable(name: str) -> bool:
        return name.startswith(prefixes) or name.rpartition(".")[0] in top_level

    return trainable


DISTILL_BELOW = 10_000  # training images: below this, fine-tuning distils from the dense parent by default


def distills_by_default(train_images: int) -> bool:
    """Whether fine-tuning on ``train_images`` labelled images distils from the dense parent unless told:
    on 1,000 images it kept 1.5 points more than cross-entropy alone (benchmarks/results/fewshot.json), on
    50,000 the two tied (compression.json)."""
    return train_images < DISTILL_BELOW


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate every BatchNorm's running mean/var on ``batches`` (no gradient steps); returns images seen.

    Pruning changes what flows into later BatchNorms, so their stored statistics no longer match.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over all calibration batches
    was_training = model.training
    model.train()
    seen = 0
    try:
        for x in batches:
            model(x)
            seen += len(x)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    return seen
