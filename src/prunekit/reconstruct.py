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
from .prefix import Start
from .regression import (
    CHUNK_ROWS,
    HOLD_OUT_EVERY,
    Normal,
    PassDone,
    Rows,
    flat_weight,
    images_per_pass,
    in_width,
    padding,
    refittable,
    run_with_hooks,
    set_flat_weight,
    solve,
)
from .shortcuts import ShortcutTargets, select_kept

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
    ``regression.MEMORY_BUDGET``). ``pruned`` is changed in place; ``dense`` is not. ``shortcuts`` (default
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
                raise PassDone  # every reader re-fitted: the rest of the pass is not needed

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
        run_with_hooks(pruned, x, hooks, pre=True, run=sums.runner(dense=False), start=start)
    if settle:
        report.batchnorm = settle_batchnorm(dense, pruned, *_check_split(every, len(x)), batch=len(x))
    report.seconds = time.perf_counter() - report.started
    return report


@dataclass
class DenseSide:
    """What recovery reads from the dense model: each reader's sampled rows, the dense output there (every
    channel), and for a layer writing into a residual sum the dense shortcut there."""

    rows: dict[str, Rows] = field(default_factory=dict)
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
            rows = side.rows[name] = Rows(module, output, generator)
            side.outputs[name] = rows.outputs(output)
            shortcut = sums.dense_value(name, rows)
            if shortcut is not None:
                side.shortcuts[name] = shortcut
            if len(side.rows) == len(names):
                raise PassDone  # the rest of the network holds nothing to record

        return hook

    modules = dict(dense.named_modules())
    hooks = {modules[n]: record(n) for n in names}
    run_with_hooks(dense, x, hooks, pre=False, run=sums.runner(dense=True), start=start)
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


def _refit_layer(name: str, layer: nn.Module, x: torch.Tensor, rows: Rows, y: torch.Tensor) -> LayerFit:
    """Accumulate the normal equations of one reader chunk by chunk, solve, and write the new weights."""
    if isinstance(layer, nn.Conv2d):
        x = F.pad(x, padding(layer, x.shape[2:], rows.out_hw))
    w0 = flat_weight(layer).cpu()
    if y.shape[1] != w0.shape[0]:
        raise RuntimeError(f"{name}: {y.shape[1]} dense outputs kept, but the layer has {w0.shape[0]}")
    fit, held_out = Normal(*w0.shape[::-1]), Normal(*w0.shape[::-1])
    for begin in range(0, len(y), CHUNK_ROWS):
        end = min(begin + CHUNK_ROWS, len(y))
        xs, ys, out = rows.inputs(x, begin, end), y[begin:end], rows.held_out[begin:end]
        fit.add(xs[~out], ys[~out])
        held_out.add(xs[out], ys[out])
    w, before, after = solve(fit, held_out, w0)
    if w is not None:  # never make a layer worse than the surgery left it
        set_flat_weight(layer, w)
    return LayerFit(name, w0.shape[1], len(y), before, after)
