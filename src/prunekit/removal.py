"""The ``refit`` criterion: each input channel of a layer scored by the output error its removal leaves once
the layer's other inputs are re-fitted by least squares (ThiNet's idea, in closed form)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .regression import CHUNK_ROWS, Rows, images_per_pass, in_width, padding, refittable, run_with_hooks

MAX_SCORED_INPUTS = 8192  # a wider reader (a classifier over flattened maps) is left to the other criteria


@torch.no_grad()
def removal_errors(model: nn.Module, images: torch.Tensor, seed: int = 0) -> dict[nn.Module, torch.Tensor]:
    """For every re-fittable layer, per input channel: the squared output error on ``images`` that removing
    the channel leaves once the layer's other inputs are re-fitted by least squares (the structured Optimal
    Brain Surgeon score of Optimal Brain Compression; ThiNet's criterion in closed form):
    ``tr(W_c [H^-1]_cc^-1 W_c^T) - lam ||W_c||^2``, with ``H`` the Gram matrix of the layer's inputs plus a
    ridge ``lam`` of 1 % of its mean diagonal."""
    x = images[: images_per_pass(model, images)]
    generator = torch.Generator().manual_seed(seed)
    errors: dict[nn.Module, torch.Tensor] = {}

    def hook(module, inputs, output):
        width = in_width(module) * (math.prod(module.kernel_size) if isinstance(module, nn.Conv2d) else 1)
        if module in errors or width > MAX_SCORED_INPUTS:
            return
        rows = Rows(module, output, generator)
        x = inputs[0]
        if isinstance(module, nn.Conv2d):
            x = F.pad(x, padding(module, x.shape[2:], output.shape[2:]))
        gram = torch.zeros(width, width, dtype=torch.float64)
        for begin in range(0, len(rows.index), CHUNK_ROWS):
            xs = rows.inputs(x, begin, min(begin + CHUNK_ROWS, len(rows.index)))[:, :width]  # no bias column
            gram += (xs.T @ xs).double()
        errors[module] = _channel_errors(module.weight.detach(), gram)

    modules = [m for m in model.modules() if refittable(m)]
    run_with_hooks(model, x, dict.fromkeys(modules, hook), pre=False)
    return errors


def _channel_errors(weight: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``tr(W_c [H^-1]_cc^-1 W_c^T)`` for each input channel ``c`` (its block of kernel taps)."""
    channels = weight.shape[1]
    taps = gram.shape[0] // channels
    lam = 0.01 * float(torch.diagonal(gram).mean().clamp_min(1e-12))
    factor, info = torch.linalg.cholesky_ex(gram + lam * torch.eye(len(gram), dtype=torch.float64))
    if int(info):  # non-finite inputs: no ranking from these images
        return torch.zeros(channels)
    inverse = torch.cholesky_inverse(factor).reshape(channels, taps, channels, taps)
    index = torch.arange(channels)
    blocks = inverse[index, :, index, :]  # (channels, taps, taps): each channel's diagonal block
    w = weight.reshape(weight.shape[0], channels, taps).double()
    # minus the ridge on the removed weights themselves: what is left is the re-fit's output error (plus
    # the ridge on the weights that moved), as ``solve`` would leave it
    total = torch.einsum("oci,cij,ocj->c", w, torch.linalg.inv(blocks), w)
    return (total - lam * (w**2).sum((0, 2))).clamp_min(0).float()
