"""Re-estimating BatchNorm statistics: after pruning (what flows into a BatchNorm changed) and after
training (a small momentum leaves the running statistics behind the final weights). A leaf module."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn


def batchnorms(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer of ``model``."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, batches: Iterable[torch.Tensor], norms: list[nn.Module] | None = None
) -> int:
    """Re-estimate the running mean/var of ``norms`` (every BatchNorm when None) on ``batches``, with no
    gradient step; returns the images seen. Only those BatchNorms run in training mode: dropout and
    stochastic depth stay off, so the statistics are the ones the model meets at inference."""
    norms = batchnorms(model) if norms is None else norms
    momenta = [(m, m.momentum) for m in norms]
    modes = [(m, m.training) for m in model.modules()]  # restored exactly: frozen norms may be in eval mode
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over all calibration batches
    model.eval()
    for m in norms:
        m.train()
    seen = 0
    try:
        for x in batches:
            model(x)
            seen += len(x)
    finally:
        for m, momentum in momenta:
            m.momentum = momentum
        for m, training in modes:
            m.training = training
    return seen
