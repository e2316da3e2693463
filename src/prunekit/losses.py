"""The training losses beyond cross-entropy: distillation from a teacher and mixup of the inputs."""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .schema import KEPT_ATTRIBUTE
from .train_config import TrainConfig


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target loss: KL(teacher || student) at temperature T, scaled by T^2."""
    t = temperature
    return (
        F.kl_div(
            F.log_softmax(student / t, 1),
            F.log_softmax(teacher / t, 1),
            reduction="batchmean",
            log_target=True,
        )
        * t
        * t
    )


def mixup(
    x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, step: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``x`` mixed with a shuffled copy of itself by a Beta(a, a) weight drawn for ``step`` (the same on
    resume), the shuffled labels, and the weight."""
    seed = cfg.seed * 1_000_003 + step  # drawn from the step, not the global RNG: the same on resume
    weight = random.Random(seed).betavariate(cfg.distill_mixup, cfg.distill_mixup)
    weight = max(weight, 1 - weight)  # the first image dominates: its label is the running accuracy's
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(x.device)
    return weight * x + (1 - weight) * x[order], y[order], weight


class FeatureMatch:
    """The student's classifier inputs against the teacher's, at the features the student kept: the
    penultimate features carry far more of what the teacher knows than its ten logits, which is what lets
    MiR (Wang et al. 2022, "Compressing Models with Few Samples: Mimicking then Replacing") recover a pruned
    model from a few hundred images. Both classifiers are watched by forward pre-hooks; ``close`` removes them."""

    def __init__(self, student: nn.Module, teacher: nn.Module, kept: torch.Tensor | None):
        """``student`` and ``teacher``: the two classifiers; ``kept``: the teacher's inputs the student's
        reads, in order (None: all)."""
        self.kept = kept
        self.inputs: dict[str, torch.Tensor] = {}
        self.handles = [
            student.register_forward_pre_hook(self._watch("student")),
            teacher.register_forward_pre_hook(self._watch("teacher")),
        ]

    def _watch(self, side: str):
        def hook(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            self.inputs[side] = inputs[0]

        return hook

    def loss(self) -> torch.Tensor:
        """Squared error of the last step's features relative to the teacher's energy (1: no match at all)."""
        s, t = self.inputs["student"].float(), self.inputs["teacher"].float()
        if self.kept is not None:
            t = t.index_select(1, self.kept.to(t.device))
        return ((s - t) ** 2).mean() / (t**2).mean().clamp_min(1e-12)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def feature_match(
    cfg: TrainConfig, student: nn.Module, teacher: nn.Module | None
) -> tuple[FeatureMatch | None, str | None]:
    """The feature term ``cfg.distill_features`` asks for, or None with the reason when the student's
    classifier inputs cannot be matched to the teacher's (no teacher, no record of which features a
    pruning kept)."""
    from .regression import in_width
    from .weights import find_classifier

    if teacher is None or not cfg.distill_features:
        return None, None
    name, layer = find_classifier(student)
    theirs = dict(teacher.named_modules()).get(name)
    if theirs is None or type(theirs) is not type(layer):
        return None, f"the teacher has no {type(layer).__name__} called {name} to match features at"
    kept = getattr(student, KEPT_ATTRIBUTE, None)
    width, dense = in_width(layer), in_width(theirs)
    if kept is not None and (len(kept) != width or int(kept.max()) >= dense):
        kept = None  # a record from another pruning than the one this student came from
    if kept is None and width != dense:
        return None, (
            f"the student's {name} reads {width} features, the teacher's {dense}, and no record says which of "
            f"them the student kept (prunekit.prune keeps one on the model)"
        )
    return FeatureMatch(layer, theirs, kept if width != dense else None), None


def with_distillation(
    cfg: TrainConfig,
    teacher: nn.Module,
    x: torch.Tensor,
    logits: torch.Tensor,
    loss: torch.Tensor,
    features: FeatureMatch | None = None,
) -> torch.Tensor:
    """``loss`` blended with the soft-target loss against ``teacher`` on ``x``, plus the feature term when
    ``features`` watches the two classifiers (called under the step's autocast)."""
    with torch.no_grad():
        soft = teacher(x).float()
    kd = distillation_loss(logits.float(), soft, cfg.distill_temperature)
    total = (1 - cfg.distill_weight) * loss + cfg.distill_weight * kd
    return total + cfg.distill_features * features.loss() if features is not None else total
