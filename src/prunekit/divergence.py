"""How far a pruned model's predictions are from the dense model's: one KL divergence, shared by the
sensitivity scan (which scores each try by it) and recovery (which picks BatchNorm statistics by it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_from_dense(dense_logits: torch.Tensor, logits: torch.Tensor, reduction: str = "sum") -> float:
    """KL(dense || pruned) between the softmax predictions of two ``[images, classes]`` logit tensors:
    summed over the images (``reduction`` "sum") or their mean ("batchmean")."""
    return float(
        F.kl_div(logits.log_softmax(1), dense_logits.log_softmax(1), log_target=True, reduction=reduction)
    )
