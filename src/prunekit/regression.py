"""Least squares of a layer's output on its inputs at sampled output positions: the regression behind
recovery (``prunekit.reconstruct``) and the ``refit`` criterion (``prunekit.removal``).

A reader's rows are a sample of its output positions (``Rows``), its inputs there the receptive field
(and a 1 for the bias); the normal equations are accumulated chunk by chunk in float64 (``Normal``) and
solved with a ridge term chosen on held-out images (``solve``), in the dual form where the rows are fewer
than the inputs.
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
    """The normal equations of one regression, accumulated by rows: G = X^T X, C = X^T Y and ||Y||^2.

    While it holds no more rows than inputs, the rows themselves are kept instead (``rows_x``, ``rows_y``):
    ``solve`` then works on them in the dual form, which costs far less when the rows are well below the
    inputs (a scan's few images at a wide 3x3 reader's 7x7 output)."""

    def __init__(self, inputs: int, outputs: int):
        self.inputs, self.outputs = inputs, outputs
        self.rows_x: list[torch.Tensor] = []
        self.rows_y: list[torch.Tensor] = []
        self.rows = 0
        self.gram: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None
        self.energy = 0.0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.energy += float((y.double() ** 2).sum())
        self.rows += len(x)
        if self.gram is None and self.rows <= self.inputs:
            self.rows_x.append(x)
            self.rows_y.append(y)
            return
        self.to_gram()
        self.gram += (x.T @ x).double()
        self.cross += (x.T @ y).double()

    def to_gram(self) -> Normal:
        """Itself, its kept rows folded into G and C."""
        if self.gram is None:
            self.gram = torch.zeros(self.inputs, self.inputs, dtype=torch.float64)
            self.cross = torch.zeros(self.inputs, self.outputs, dtype=torch.float64)
            for x, y in zip(self.rows_x, self.rows_y, strict=True):
                self.gram += (x.T @ x).double()
                self.cross += (x.T @ y).double()
            self.rows_x, self.rows_y = [], []
        return self

    def kept_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows (X, Y) of a Normal that has not folded them into G."""
        x = torch.cat(self.rows_x) if self.rows_x else torch.zeros(0, self.inputs)
        y = torch.cat(self.rows_y) if self.rows_y else torch.zeros(0, self.outputs)
        return x, y

    def __add__(self, other: Normal) -> Normal:
        total = Normal(self.inputs, self.outputs).to_gram()
        for part in (self.to_gram(), other.to_gram()):
            total.gram += part.gram
            total.cross += part.cross
            total.energy += part.energy
            total.rows += part.rows
        return total

    def error(self, w: torch.Tensor) -> float:
        """||X W^T - Y||^2 relative to ||Y||^2."""
        self.to_gram()
        value = (w @ self.gram * w).sum() - 2 * (w * self.cross.T).sum() + self.energy
        return max(float(value), 0.0) / max(self.energy, 1e-30)

    def solve(self, w0: torch.Tensor, ridge: float, active: torch.Tensor) -> torch.Tensor:
        """Ridge least squares towards ``w0``: argmin ||X W^T - Y||^2 + lam ||W - w0||^2.

        Only the ``active`` inputs are solved for: an input that is zero on every row (a kernel tap that
        only ever reads padding, as a 3x3 conv on a 1x1 map does) keeps its weight, which is what the ridge
        alone would give it, at a fraction of the cost."""
        self.to_gram()
        g = self.gram[active][:, active]
        lam = ridge * _mean(torch.diagonal(g))
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
    if fit.gram is None and held_out.gram is None and fit.rows + held_out.rows <= fit.inputs:
        return _solve_dual(fit, held_out, w0)
    best, best_error = None, held_out.error(w0)
    before = best_error
    active = torch.diagonal(fit.to_gram().gram + held_out.to_gram().gram) > 0
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


def _solve_dual(fit: Normal, held_out: Normal, w0: torch.Tensor) -> tuple[torch.Tensor | None, float, float]:
    """``solve`` for fewer rows than inputs, in the dual form: W^T = w0^T + X^T (X X^T + lam I)^-1 (Y - X w0^T)
    gives the same weights (an inactive input's column of X is zero, so it keeps w0's weight; lam is scaled
    by the same mean diagonal of G), and the held-out images' outputs of each ridge's weights come from the
    kernel X_held X_fit^T, never forming the weights until the last solve."""
    (xf, yf), (xh, yh) = fit.kept_rows(), held_out.kept_rows()
    x, y, n = torch.cat([xf, xh]), torch.cat([yf, yh]), len(xf)
    # float32 products, as the Gram matrix's are; the solves in float64
    kernel = (x @ x.T).double()
    residual = (y - x @ w0.float().T).double()
    column_energy = x.double() ** 2
    fit_energy, all_energy = column_energy[:n].sum(0), column_energy.sum(0)
    active = all_energy > 0
    before = held_out_error = float((residual[n:] ** 2).sum()) / max(held_out.energy, 1e-30)
    if not active.any():
        return None, before, before
    best = None
    for ridge in RIDGES:
        alpha = _kernel_solve(kernel[:n, :n], ridge * _mean(fit_energy[active]), residual[:n])
        e = float(((residual[n:] - kernel[n:, :n] @ alpha) ** 2).sum()) / max(held_out.energy, 1e-30)
        if torch.isfinite(alpha).all() and e < held_out_error:
            best, held_out_error = ridge, e
    if best is None:
        return None, before, before
    alpha = _kernel_solve(kernel, best * _mean(all_energy[active]), residual)
    w = w0 + (alpha.T.float() @ x).double()
    return (w.float() if torch.isfinite(w).all() else None), before, held_out_error


def _mean(diagonal: torch.Tensor) -> float:
    """The mean of G's diagonal, the scale of every ridge term."""
    return float(diagonal.mean().clamp_min(1e-12))


def _kernel_solve(kernel: torch.Tensor, lam: float, rhs: torch.Tensor) -> torch.Tensor:
    """(K + lam I)^-1 rhs, NaN where K + lam I is not positive definite (non-finite inputs)."""
    factor, info = torch.linalg.cholesky_ex(kernel + lam * torch.eye(len(kernel), dtype=kernel.dtype))
    if int(info):
        return torch.full_like(rhs, float("nan"))
    return torch.cholesky_solve(rhs, factor)


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
