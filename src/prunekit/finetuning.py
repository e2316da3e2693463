"""Fine-tuning choices for a pruned model: recipes, freezing policies, BatchNorm recalibration."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace

from .batchnorm import recalibrate_batchnorm  # noqa: F401  (re-exported: prunekit.finetuning's API)
from .console import warn
from .errors import UsageError, arg
from .train_config import TrainConfig

FREEZE_POLICIES = ("blog", "none")
RECIPES = {
    # The blog's fine-tuning: Adam at lr 1e-4 for 10 epochs, only the pruned blocks and the classifier train.
    "blog": (
        TrainConfig(
            epochs=10, optimizer="adam", lr=1e-4, weight_decay=0.0, schedule="constant", label_smoothing=0.0
        ),
        "blog",
    ),
    # Everything trains, SGD with a short cosine schedule from a small learning rate; BatchNorm statistics
    # are re-estimated at the end (TrainConfig.precise_bn_images). 0.025 rather than 0.01: on images no step
    # had seen, two seeds, it kept 0.26 points more at 3x fewer MACs (benchmarks/results/finetune_lr.json).
    "full": (
        TrainConfig(
            epochs=10,
            optimizer="sgd",
            lr=0.025,
            weight_decay=5e-4,
            schedule="cosine",
            warmup_epochs=0.0,
            label_smoothing=0.1,
            precise_bn_images=512,
        ),
        "none",
    ),
}


def default_recipe(pruning: list[dict] | None) -> str:
    """The default fine-tuning recipe, on the command line and in Python alike: ``blog`` for a model pruned
    only at named layers (the blog's experiment, whose recipe retrains what was pruned), ``full`` for a
    target or a network-wide ratio, or a model with no pruning record (``pruning``: a checkpoint's)."""
    records = pruning or []
    named = bool(records) and all((r.get("request") or {}).get("layers") for r in records)
    return "blog" if named else "full"


# What a recipe changes when it distils on a small training split (``distils_few``): the few-shot rows, where
# prunekit distils by default, were measured from 0.01 (benchmarks/results/fewshot.json; fewshot_recipes.json
# found 0.02 ambiguous there). With all 50,000 CIFAR-10 images a 3x-pruned ResNet-18 distilled to 83.29 %
# from 0.025, the rate without distillation, and to 82.66 % from 0.01 (finetune_lr.json, parent1207 rows).
WHEN_DISTILLING_FEW = {"full": {"lr": 0.01}}

RENAMED = {"seed": "blog"}  # the blog experiment's recipe and freezing policy were called "seed" until 0.2
ACCEPTED_RECIPES = (*RECIPES, *RENAMED)  # what --recipe and --freeze take, deprecated names included
ACCEPTED_FREEZE = (*FREEZE_POLICIES, *RENAMED)


def current_name(option: str, value: str | None, warn_user: bool = True) -> str | None:
    """``value`` under its current name; a deprecated one is mapped, with a warning when the user wrote it."""
    if value not in RENAMED:
        return value
    if warn_user:
        warn(f"{arg(option)} {value} is deprecated: it is called {RENAMED[value]} now (the blog post's)")
    return RENAMED[value]


def recipe(name: str, distilling_few: bool = False, **overrides) -> tuple[TrainConfig, str]:
    """A fine-tuning preset (config, freezing policy), as it is when distilling on a small training split
    (``distilling_few``, ``WHEN_DISTILLING_FEW``) or not, with ``overrides`` applied where not None."""
    name = current_name("recipe", name)
    if name not in RECIPES:
        raise UsageError(f"unknown fine-tuning recipe '{name}'; choose one of {', '.join(RECIPES)}")
    cfg, freeze = RECIPES[name]
    if distilling_few:
        cfg = replace(cfg, **WHEN_DISTILLING_FEW.get(name, {}))
    freeze = current_name("freeze", overrides.pop("freeze", None)) or freeze
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None}), freeze


def pruned_blocks(changed_layers: Iterable[str]) -> list[str]:
    """The blocks holding pruned layers: each layer's parent module (``layer2.0.conv1`` -> ``layer2.0``)."""
    return sorted({name.rpartition(".")[0] for name in changed_layers})


def trainable_filter(
    policy: str, changed_layers: Iterable[str], classifier: str
) -> Callable[[str], bool] | None:
    """Which parameters train under ``policy``; None means all.

    ``blog``: the pruned blocks (their convs and *their* BatchNorms) and the classifier. The blog's own rule,
    ``'bn' in name``, also unfroze every other BatchNorm in the network; prunekit does not, so the layers the
    policy calls frozen really keep their weights and statistics.
    """
    policy = current_name("freeze", policy, warn_user=False)  # also a checkpoint's record, from before 0.2
    if policy == "none":
        return None
    if policy != "blog":
        raise UsageError(f"{arg('freeze')} must be one of {', '.join(FREEZE_POLICIES)}, got {policy}")
    blocks = pruned_blocks(changed_layers)
    prefixes = tuple(f"{b}." for b in blocks if b) + (f"{classifier}.",)
    top_level = {
        name for name in changed_layers if "." not in name
    }  # a pruned top-level layer is its own block

    def trainable(name: str) -> bool:
        return name.startswith(prefixes) or name.rpartition(".")[0] in top_level

    return trainable


RECALIBRATION_IMAGES = 2048  # training images BatchNorm is re-estimated on before fine-tuning
DISTILL_BELOW = 10_000  # training images: below this, fine-tuning distils from the dense parent by default


def distills_by_default(train_images: int) -> bool:
    """Whether fine-tuning on ``train_images`` labelled images distils from the dense parent unless told:
    on 1,000 images it kept 1.5 points more than cross-entropy alone (benchmarks/results/fewshot.json). On
    50,000 it kept 0.145-0.255 more from lr 0.025 (finetune_lr.json, one parent) for steps up to 1.6 times as
    long, where the same time spent on more epochs kept more (the ``+e20`` rows), and from 0.01 the two tied
    (compression.json): larger splits distil only when asked."""
    return train_images < DISTILL_BELOW


def peak_rate(name: str) -> str:
    """A recipe's peak learning rate in words, for help texts: ``0.025 (0.01 when distilling on under 10,000
    images)`` for ``full``."""
    lr, few = RECIPES[name][0].lr, WHEN_DISTILLING_FEW.get(name, {}).get("lr")
    return f"{lr:g}" + (f" ({few:g} when distilling on under {DISTILL_BELOW:,} images)" if few else "")


def distils_few(distilling: bool, train_images: int | None) -> bool:
    """Whether a run distils on a small training split, under ``DISTILL_BELOW`` images (a split of unknown
    size counts as small): the case ``WHEN_DISTILLING_FEW`` changes the recipe for."""
    return distilling and (train_images is None or train_images < DISTILL_BELOW)
