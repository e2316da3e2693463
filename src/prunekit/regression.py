"""Least squares of a layer's output on its inputs at sampled output positions: the regression behind
recovery (``prunekit.reconstruct``) and the ``refit`` criterion (``prunekit.removal``).

A reader's rows are a sample of its output positions (``Rows``), its inputs there the receptive field
(and a 1 for the bias); the normal equations are accumulated chunk by chunk in float64 (``Normal``) and
solved with a ridge term chosen on held-out images (``solve``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from .modes import eval_mode
from .prefix import Start, started

# Ridge terms tried, relative to the mean diagonal of the inputs' Gram matrix: each reader takes the one with
# the lowest error on the images held out of its fit (every fifth), then is solved again on all of them.
RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
HOLD_OUT_EVERY = 5
ROWS_PER_INPUT = 8  # regression rows sampled per input dimension of a reader ...
MIN_ROWS, MAX_ROWS = 4096, 32768  # ... within these bounds (all rows when the images hold fewer)
CHUNK_ROWS = 4096  # rows gathered at once while accumulating a Gram matrix
MEMORY_BUDGET = 6 * 2**30  # bytes of activations one pass may hold (the images go through as one batch)


def refittable(layer: nn.Module) -> bool:
    """A linear, or a conv that mixes all its input channels (not grouped, not depthwise) and pads with zeros."""
    if isinstance(layer, nn.Conv2d):
        return layer.groups == 1 and layer.padding_mode == "zeros"
    return isinstance(layer, nn.Linear)


def in_width(layer: nn.Module) -> int:
    """The input channels of a conv, the input features of a linear."""
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def padding(conv: nn.Conv2d, in_hw: Sequence[int], out_hw: Sequence[int]) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding the conv's input gets, in F.pad's order: the conv's own
    padding ('same'/'valid' included) where it gives the output size seen; otherwise the conv pads in its own
    forward (the static 'same' padding of TensorFlow ports, which leave ``padding=0``) and the padding is
    the one that output size implies, split as TensorFlow's 'same' splits it (the extra pixel after)."""
    own = []
    for axis in (1, 0):  # width first
        k, s, d = conv.kernel_size[axis], conv.stride[axis], conv.dilation[axis]
        if conv.padding == "valid":
            before = after = 0
        elif conv.padding == "same":
            before, after = d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2
        else:
            before = after = conv.padding[axis]
        if (in_hw[axis] + before + after - d * (k - 1) - 1) // s + 1 != out_hw[axis]:
            total = max((out_hw[axis] - 1) * s + d * (k - 1) + 1 - in_hw[axis], 0)
            before, after = total // 2, total - total // 2
        own += [before, after]
    return tuple(own)


class Rows:
    """The regression rows of one reader: sampled output positions, and how to read them from tensors."""

    def __init__(self, layer: nn.Module, output: torch.Tensor, generator: torch.Generator):
        self.layer = layer
        if isinstance(layer, nn.Conv2d):
            n, _, h, w = output.shape
            total = n * h * w
            self.out_hw = (h, w)
        else:
            total = output.numel() // output.shape[-1]
        dims = in_width(layer) * (math.prod(layer.kernel_size) if isinstance(layer, nn.Conv2d) else 1)
        want = min(max(MIN_ROWS, ROWS_PER_INPUT * dims), MAX_ROWS)
        picked = torch.randperm(total, generator=generator)[:want] if total > want else torch.arange(total)
        self.index = picked.sort().values
        if isinstance(layer, nn.Conv2d):
            self.n = self.index // (h * w)
            self.h = self.index % (h * w) // w
            self.w = self.index % w
            image = self.n
        else:
            image = self.index // (total // output.shape[0])
        self.held_out = image % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1

    def outputs(self, output: torch.Tensor) -> torch.Tensor:
        """The layer's output at the sampled positions: rows x channels."""
        if isinstance(self.layer, nn.Conv2d):
            return output[self.n, :, self.h, self.w].float().cpu()
        return output.reshape(-1, output.shape[-1])[self.index].float().cpu()

    def inputs(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the layer's flattened input (its receptive field, and a 1 for the bias)."""
        layer = self.layer
        if isinstance(layer, nn.Conv2d):
            kh, kw = layer.kernel_size
            sh, sw = layer.stride
            dh, dw = layer.dilation
            rows = self.h[start:stop, None] * sh + torch.arange(kh) * dh
            cols = self.w[start:stop, None] * sw + torch.arange(kw) * dw
            patch = x[self.n[start:stop, None, None], :, rows[:, :, None], cols[:, None, :]]
            flat = patch.permute(0, 3, 1, 2).reshape(stop - start, -1)  # (channel, kh, kw) like the weight
        else:
            flat = x.reshape(-1, x.shape[-1])[self.index[start:stop]]
        flat = flat.float().cpu()  # the normal equations live on the CPU in float64, whatever the device
        if layer.bias is not None:
            flat = torch.cat([flat, torch.ones(len(flat), 1)], dim=1)
        return flat


def flat_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as (outputs, inputs), with the bias as one more input column."""
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1).float()
    if layer.bias is not None:
        w = torch.cat([w, layer.bias.detach().float()[:, None]], dim=1)
    return w


def set_flat_weight(layer: nn.Module, flat: torch.Tensor) -> None:
    """New parameter objects, never an in-place edit: a parameter the surgery did not replace (a reader's
    bias) is still the caller's, and undoing a failed call puts those objects back as they were."""

    def fresh(old: nn.Parameter, value: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(value.reshape(old.shape).to(old), requires_grad=old.requires_grad)

    if layer.bias is not None:
        layer.bias = fresh(layer.bias, flat[:, -1])
        flat = flat[:, :-1]
    layer.weight = fresh(layer.weight, flat)


class Normal:
    """The normal equations of one regression: G = X^T X, C = X^T Y and ||Y||^2, accumulated by rows."""

    def __init__(self, inputs: int, outputs: int):
        self.gram = torch.zeros(inputs, inputs, dtype=torch.float64)
        self.cross = torch.zeros(inputs, outputs, dtype=torch.float64)
        self.energy = 0.0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.gram += (x.T @ x).double()
        self.cross += (x.T @ y).double()
        self.energy += float((y.double() ** 2).sum())

    def __add__(self, other: Normal) -> Normal:
        total = Normal(0, 0)
        total.gram, total.cross = self.gram + other.gram, self.cross + other.cross
        total.energy = self.energy + other.energy
        return total

    def error(self, w: torch.Tensor) -> float:
        """||X W^T - Y||^2 relative to ||Y||^2."""
        value = (w @ self.gram * w).sum() - 2 * (w * self.cross.T).sum() + self.energy
        return max(float(value), 0.0) / max(self.energy, 1e-30)

    def solve(self, w0: torch.Tensor, ridge: float, active: torch.Tensor) -> torch.Tensor:
        """Ridge least squares towards ``w0``: argmin ||X W^T - Y||^2 + lam ||W - w0||^2.

        Only the ``active`` inputs are solved for: an input that is zero on every row (a kernel tap that
        only ever reads padding, as a 3x3 conv on a 1x1 map does) keeps its weight, which is what the ridge
        alone would give it, at a fraction of the cost."""
        g = self.gram[active][:, active]
        lam = ridge * float(torch.diagonal(g).mean().clamp_min(1e-12))
        factor, info = torch.linalg.cholesky_ex(g + lam * torch.eye(len(g), dtype=torch.float64))
        w = w0.clone()
        if int(info):  # positive definite for any lam > 0; a failure means non-finite inputs
            return torch.full_like(w0, float("nan"))
        w[:, active] = torch.cholesky_solve(self.cross[active] + lam * w0[:, active].T, factor).T
        return w


def solve(fit: Normal, held_out: Normal, w0: torch.Tensor) -> tuple[torch.Tensor | None, float, float]:
    """The ridge term with the lowest error on ``held_out`` when fitted on ``fit``, applied to both; returns
    (the new weights, or None where no ridge beats ``w0`` on the held-out images; error before; error after),
    the errors measured on the held-out images."""
    w0 = w0.double()
    best, best_error = None, held_out.error(w0)
    before = best_error
    active = torch.diagonal(fit.gram + held_out.gram) > 0
    if not active.any():
        return None, before, before
    for ridge in RIDGES:
        w = fit.solve(w0, ridge, active)
        e = held_out.error(w)
        if torch.isfinite(w).all() and e < best_error:
            best, best_error = ridge, e
    if best is None:
        return None, before, before
    w = (fit + held_out).solve(w0, best, active)
    return (w.float() if torch.isfinite(w).all() else None), before, best_error


def images_per_pass(model: nn.Module, example: torch.Tensor, budget: int = MEMORY_BUDGET) -> int:
    """How many images one pass may hold within ``budget``: activations of one image, summed over the conv
    and linear outputs (what a gradient-free pass holds at most, and more), priced in float32."""
    from .measure import forward_with_hooks

    total = 0

    def hook(_module, _inputs, output):
        nonlocal total
        total += output[:1].numel() * 4

    forward_with_hooks(model, example[:1], hook)
    return max(1, budget // max(total, 1))


def run_with_hooks(
    model: nn.Module,
    x: torch.Tensor,
    hooks: dict[nn.Module, Any],
    pre: bool,
    run: Any = None,
    start: Start | None = None,
) -> None:
    register = (
        (lambda m, h: m.register_forward_pre_hook(h)) if pre else (lambda m, h: m.register_forward_hook(h))
    )
    handles = [register(m, h) for m, h in hooks.items()]
    with eval_mode(model, handles), started(model, start), contextlib.suppress(PassDone):
        (run or model)(x)


class PassDone(Exception):
    """Raised by a hook once a pass has given recovery all it needs from it."""
