"""Recovery without labels: after the surgery, every layer that reads pruned channels is re-fitted so that its
output on calibration images matches the dense model's.

As in channel pruning with reconstruction (He et al. 2017), ThiNet (Luo et al. 2017) and AIMET's channel
pruning with weight reconstruction: for each reader, least squares of the dense layer's output on the pruned
layer's inputs, over the kept input channels (and the bias), with a small ridge term that pulls the solution
towards the surgery's weights where the images do not determine it. Readers are solved in forward order, and
each sees the inputs of the *pruned* model with every earlier reader already re-fitted, so the errors of one
layer are corrected by the next instead of piling up; a layer that writes into a residual sum is fitted so
that the *sum* matches the dense one, which also corrects the error its shortcut carries in
(``prunekit.shortcuts``). A depthwise conv reads each channel alone: pruning a
channel removes its filter and there is nothing to re-fit, so the conv after it is re-fitted instead.

BatchNorm statistics are then kept or re-estimated, whichever leaves the pruned model's predictions closer
to the dense model's on calibration images no regression fitted (``settle_batchnorm``): where the re-fits are
close, the dense statistics are right for their outputs (re-estimating them cost 1.1-1.6 points on the
CIFAR ResNet-18, benchmarks/results/recovery.json, rows ``+bn``); where they are loose, least squares
shrinks each layer's output variance and the shrink compounds, which fresh statistics undo (19.45 % ->
47.25 % on the few-shot EfficientNet-Lite1 before any fine-tuning, l2 scores).

Memory is bounded: each reader's regression uses a sample of output positions (rows), Gram matrices are
accumulated per chunk of rows, and the images pass the model as one batch no larger than a memory budget.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .batchnorm import batchnorms, recalibrate_batchnorm
from .divergence import kl_from_dense
from .errors import UsageError, arg
from .modes import eval_mode
from .prefix import Start, started
from .shortcuts import ShortcutTargets, select_kept

# Ridge terms tried, relative to the mean diagonal of the inputs' Gram matrix: each reader takes the one with
# the lowest error on the images held out of its fit (every fifth), then is solved again on all of them.
RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
HOLD_OUT_EVERY = 5
ROWS_PER_INPUT = 8  # regression rows sampled per input dimension of a reader ...
MIN_ROWS, MAX_ROWS = 4096, 32768  # ... within these bounds (all rows when the images hold fewer)
CHUNK_ROWS = 4096  # rows gathered at once while accumulating a Gram matrix
MEMORY_BUDGET = 6 * 2**30  # bytes of activations one pass may hold (the images go through as one batch)
# A layer writing into a residual sum is fitted to the dense sum, not to its own output (benchmarks/results:
# the -plainsums rows of fewshot.json and +plainsums rows of recovery.json measure without it).
SHORTCUTS = True


@dataclass
class LayerFit:
    """One re-fitted reader: its regression size and relative output error on held-out images, before and
    after the fit."""

    layer: str
    inputs: int
    rows: int
    error_before: float
    error_after: float


@dataclass
class ReconstructionReport:
    """What recovery did: the images it used, each reader it re-fitted, and how long it took."""

    images: int
    layers: list[LayerFit] = field(default_factory=list)
    seconds: float = 0.0
    images_given: int = 0
    batchnorm: dict[str, Any] | None = None  # the statistics kept or re-estimated: ``settle_batchnorm``
    started: float = field(default_factory=time.perf_counter, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "images_given": self.images_given,
            "seconds": self.seconds,
            "layers": [vars(f) for f in self.layers],
            "batchnorm": self.batchnorm,
        }

    def __str__(self) -> str:
        if not self.layers:
            return "reconstruction: no layer reads pruned channels"
        before = sum(f.error_before for f in self.layers) / len(self.layers)
        after = sum(f.error_after for f in self.layers) / len(self.layers)
        return (
            f"reconstruction: re-fitted {len(self.layers)} layers on {self.images} unlabelled images in "
            f"{self.seconds:.1f} s (mean relative output error {before:.3f} -> {after:.3f})"
        )


def refittable(layer: nn.Module) -> bool:
    """A linear, or a conv that mixes all its input channels (not grouped, not depthwise) and pads with zeros."""
    if isinstance(layer, nn.Conv2d):
        return layer.groups == 1 and layer.padding_mode == "zeros"
    return isinstance(layer, nn.Linear)


def readers(dense: nn.Module, pruned: nn.Module) -> list[str]:
    """Names of the re-fittable layers whose inputs the surgery shrank."""
    dense_modules = dict(dense.named_modules())
    names = []
    for name, layer in pruned.named_modules():
        before = dense_modules.get(name)
        if not refittable(layer) or before is None:
            continue
        if in_width(layer) != in_width(before):
            names.append(name)
    return names


def in_width(layer: nn.Module) -> int:
    """The input channels of a conv, the input features of a linear."""
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _padding(conv: nn.Conv2d, in_hw: Sequence[int], out_hw: Sequence[int]) -> tuple[int, int, int, int]:
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


class _Rows:
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


def _flat_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as (outputs, inputs), with the bias as one more input column."""
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1).float()
    if layer.bias is not None:
        w = torch.cat([w, layer.bias.detach().float()[:, None]], dim=1)
    return w


def _set_flat_weight(layer: nn.Module, flat: torch.Tensor) -> None:
    """New parameter objects, never an in-place edit: a parameter the surgery did not replace (a reader's
    bias) is still the caller's, and undoing a failed call puts those objects back as they were."""

    def fresh(old: nn.Parameter, value: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(value.reshape(old.shape).to(old), requires_grad=old.requires_grad)

    if layer.bias is not None:
        layer.bias = fresh(layer.bias, flat[:, -1])
        flat = flat[:, :-1]
    layer.weight = fresh(layer.weight, flat)


class _Normal:
    """The normal equations of one regression: G = X^T X, C = X^T Y and ||Y||^2, accumulated by rows."""

    def __init__(self, inputs: int, outputs: int):
        self.gram = torch.zeros(inputs, inputs, dtype=torch.float64)
        self.cross = torch.zeros(inputs, outputs, dtype=torch.float64)
        self.energy = 0.0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.gram += (x.T @ x).double()
        self.cross += (x.T @ y).double()
        self.energy += float((y.double() ** 2).sum())

    def __add__(self, other: _Normal) -> _Normal:
        total = _Normal(0, 0)
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


def solve(fit: _Normal, held_out: _Normal, w0: torch.Tensor) -> tuple[torch.Tensor | None, float, float]:
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


@torch.no_grad()
def reconstruct(
    dense: nn.Module,
    pruned: nn.Module,
    kept_outputs: dict[str, torch.Tensor],
    images: torch.Tensor | Sequence[torch.Tensor],
    seed: int = 0,
    shortcuts: bool | None = None,
    quiet: bool = False,
    settle: bool = True,
    start: Start | None = None,
    dense_cache: dict[tuple[str, ...], DenseSide] | None = None,
) -> ReconstructionReport:
    """Re-fit every layer of ``pruned`` that reads pruned channels to ``dense``'s outputs on ``images``.

    ``kept_outputs``: for each layer whose own outputs were pruned, the dense channel indices it kept.
    ``images`` are unlabelled input batches; they pass both models as one batch (as many as fit in
    ``MEMORY_BUDGET``). ``pruned`` is changed in place; ``dense`` is not. ``shortcuts`` (default
    ``SHORTCUTS``) fits a layer that writes into a residual sum to the dense sum (``prunekit.shortcuts``);
    ``quiet``: no progress bar; ``settle``: then choose the BatchNorm statistics (``settle_batchnorm``; else
    the dense ones stay). ``start``: both passes start at a cut whose output for ``images`` is given (the
    models must compute the same before it), as a sensitivity scan's tries do. ``dense_cache``: the dense
    side of the recovery is read from it, or computed and put there (for prunings of one group on the same
    images and start, whose dense side is the same).
    """
    every, x = _pass_images(dense, images)
    names = readers(dense, pruned)
    report = ReconstructionReport(images=len(x), images_given=len(every))
    if not names:
        report.seconds = time.perf_counter() - report.started
        return report
    enabled = SHORTCUTS if shortcuts is None else shortcuts
    sums = ShortcutTargets(dense, pruned, names, enabled, start.leaves if start else ())
    start = start.first(len(x)) if start else None
    pruned_modules = dict(pruned.named_modules())
    done: set[str] = set()

    def refit(name: str):
        def pre_hook(module, inputs):
            if name not in side.rows or name in done:
                return
            done.add(name)
            bar.update(task, info=name)
            kept = kept_outputs.get(name)
            y = select_kept(side.outputs[name], kept)
            if name in side.shortcuts:  # a layer writing into a residual sum: fitted to the dense sum
                dense_shortcut = select_kept(side.shortcuts[name], kept)
                y = sums.target(name, side.rows[name], y, pruned_modules, dense_shortcut)
            report.layers.append(_refit_layer(name, module, inputs[0], side.rows[name], y))
            bar.update(task, advance=1)
            if done >= side.rows.keys():
                raise _PassDone  # every reader re-fitted: the rest of the pass is not needed

        return pre_hook

    from .console import progress_bar

    with progress_bar(quiet=quiet) as bar:
        task = bar.add_task("recovery", total=len(names) + 1, info="dense outputs")
        key = tuple(names)
        side = dense_cache.get(key) if dense_cache is not None else None
        if side is None:
            side = _dense_side(dense, x, names, sums, seed, start)
            if dense_cache is not None:
                dense_cache[key] = side
        bar.update(task, advance=1)
        hooks = {pruned_modules[n]: refit(n) for n in names}
        _run_with_hooks(pruned, x, hooks, pre=True, run=sums.runner(dense=False), start=start)
    if settle:
        report.batchnorm = settle_batchnorm(dense, pruned, *_check_split(every, len(x)), batch=len(x))
    report.seconds = time.perf_counter() - report.started
    return report


@dataclass
class DenseSide:
    """What recovery reads from the dense model: each reader's sampled rows, the dense output there (every
    channel), and for a layer writing into a residual sum the dense shortcut there."""

    rows: dict[str, _Rows] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    shortcuts: dict[str, torch.Tensor] = field(default_factory=dict)


def _dense_side(
    dense: nn.Module, x: torch.Tensor, names: list[str], sums: ShortcutTargets, seed: int, start: Start | None
) -> DenseSide:
    """One pass of ``dense`` recording its side of the recovery of the readers ``names``."""
    generator = torch.Generator().manual_seed(seed)
    side = DenseSide()

    def record(name: str):
        def hook(module, _inputs, output):
            if name in side.rows:  # a layer called twice is fitted to its first call
                return
            rows = side.rows[name] = _Rows(module, output, generator)
            side.outputs[name] = rows.outputs(output)
            shortcut = sums.dense_value(name, rows)
            if shortcut is not None:
                side.shortcuts[name] = shortcut
            if len(side.rows) == len(names):
                raise _PassDone  # the rest of the network holds nothing to record

        return hook

    modules = dict(dense.named_modules())
    hooks = {modules[n]: record(n) for n in names}
    _run_with_hooks(dense, x, hooks, pre=False, run=sums.runner(dense=True), start=start)
    return side


def _pass_images(
    dense: nn.Module, images: torch.Tensor | Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(every image given, the first of them one pass holds); a clear error for none, or for images the model
    cannot run."""
    try:
        every = images if isinstance(images, torch.Tensor) else torch.cat(list(images))
        x = every[: images_per_pass(dense, every)]
    except RuntimeError as exc:
        shapes = sorted({tuple(b.shape) for b in ([images] if isinstance(images, torch.Tensor) else images)})
        raise UsageError(
            f"the {arg('calibration')} images (batches of shape {', '.join(map(str, shapes[:3]))}) do not run "
            f"through the model: {' '.join(str(exc).split())[:200]}"
        ) from None
    if not len(every):
        raise UsageError(f"reconstruction needs {arg('calibration')} images; none were given")
    return every, x


MIN_CHECK_IMAGES, MAX_CHECK_IMAGES = 8, 256  # images the BatchNorm choice compares the models on


def _check_split(images: torch.Tensor, fitted: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images to re-estimate statistics on, images to compare on): the comparison takes images past the
    re-fit's pass where there are some, else the pass's held-out images (every fifth, which no regression
    fitted); the statistics take the rest."""
    if len(images) - fitted >= MIN_CHECK_IMAGES:
        check = slice(fitted, fitted + MAX_CHECK_IMAGES)
        return torch.cat([images[:fitted], images[check.stop :]]), images[check]
    held_out = torch.arange(len(images)) % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1
    return images[~held_out], images[held_out][:MAX_CHECK_IMAGES]


@torch.no_grad()
def settle_batchnorm(
    dense: nn.Module, pruned: nn.Module, fit: torch.Tensor, check: torch.Tensor, batch: int
) -> dict[str, Any] | None:
    """Keep the dense BatchNorm statistics, which a close re-fit matches, or re-estimate them on ``fit``,
    which a loose one needs (least squares shrinks a layer's output variance, and the shrink compounds
    block after block): whichever leaves ``pruned``'s predictions closer to ``dense``'s on ``check``
    (KL divergence, images no regression fitted). None when there is nothing to choose."""
    norms = batchnorms(pruned)
    if not norms or len(check) < MIN_CHECK_IMAGES or not len(fit):
        return None
    want = _predictions(dense, check, batch)
    if want is None:
        return None
    kept = kl_from_dense(want, _predictions(pruned, check, batch), "batchmean")
    saved = [
        {k: v.clone() for k, v in m.state_dict().items() if "running" in k or "tracked" in k} for m in norms
    ]
    recalibrate_batchnorm(pruned, fit.split(batch), norms)
    re_estimated = kl_from_dense(want, _predictions(pruned, check, batch), "batchmean")
    chosen = "re-estimated" if re_estimated < kept else "kept"
    if chosen == "kept":
        for m, state in zip(norms, saved, strict=True):
            m.load_state_dict(state, strict=False)
    return {"chosen": chosen, "kl_kept": kept, "kl_re_estimated": re_estimated, "images": len(check)}


def _predictions(model: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor | None:
    """Logits of ``model`` (eval mode) on ``x``, as float; None for an output that is not one tensor of
    logits."""
    with eval_mode(model):
        outs = [model(chunk) for chunk in x.split(batch)]
    if not all(isinstance(o, torch.Tensor) and o.dim() == 2 for o in outs):
        return None
    return torch.cat(outs).float()


def _refit_layer(name: str, layer: nn.Module, x: torch.Tensor, rows: _Rows, y: torch.Tensor) -> LayerFit:
    """Accumulate the normal equations of one reader chunk by chunk, solve, and write the new weights."""
    if isinstance(layer, nn.Conv2d):
        x = F.pad(x, _padding(layer, x.shape[2:], rows.out_hw))
    w0 = _flat_weight(layer).cpu()
    if y.shape[1] != w0.shape[0]:
        raise RuntimeError(f"{name}: {y.shape[1]} dense outputs kept, but the layer has {w0.shape[0]}")
    fit, held_out = _Normal(*w0.shape[::-1]), _Normal(*w0.shape[::-1])
    for begin in range(0, len(y), CHUNK_ROWS):
        end = min(begin + CHUNK_ROWS, len(y))
        xs, ys, out = rows.inputs(x, begin, end), y[begin:end], rows.held_out[begin:end]
        fit.add(xs[~out], ys[~out])
        held_out.add(xs[out], ys[out])
    w, before, after = solve(fit, held_out, w0)
    if w is not None:  # never make a layer worse than the surgery left it
        _set_flat_weight(layer, w)
    return LayerFit(name, w0.shape[1], len(y), before, after)


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
        rows = _Rows(module, output, generator)
        x = inputs[0]
        if isinstance(module, nn.Conv2d):
            x = F.pad(x, _padding(module, x.shape[2:], output.shape[2:]))
        gram = torch.zeros(width, width, dtype=torch.float64)
        for begin in range(0, len(rows.index), CHUNK_ROWS):
            xs = rows.inputs(x, begin, min(begin + CHUNK_ROWS, len(rows.index)))[:, :width]  # no bias column
            gram += (xs.T @ xs).double()
        errors[module] = _channel_errors(module.weight.detach(), gram)

    modules = [m for m in model.modules() if refittable(m)]
    _run_with_hooks(model, x, dict.fromkeys(modules, hook), pre=False)
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


def _run_with_hooks(
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
    with eval_mode(model, handles), started(model, start), contextlib.suppress(_PassDone):
        (run or model)(x)


class _PassDone(Exception):
    """Raised by a hook once a pass has given recovery all it needs from it."""
