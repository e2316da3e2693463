"""The training losses beyond cross-entropy: distillation from a teacher and mixup of the inputs."""

from __future__ import annotations

import random

import torch
import torch.nn as nn
import torch.nn.functional as F

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


def with_distillation(
    cfg: TrainConfig, teacher: nn.Module, x: torch.Tensor, logits: torch.Tensor, loss: torch.Tensor
) -> torch.Tensor:
    """``loss`` blended with the soft-target loss against ``teacher`` on ``x`` (called under the step's autocast)."""
    with torch.no_grad():
        soft = teacher(x).float()
    kd = distillation_loss(logits.float(), soft, cfg.distill_temperature)
    return (1 - cfg.distill_weight) * loss + cfg.distill_weight * kd
