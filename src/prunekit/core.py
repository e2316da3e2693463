"""The in-memory API: prune, recalibrate, fine-tune, save and load a model the caller already holds.

The command line and the path-based functions in ``api.py`` are thin layers over these.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .call_inputs import (
    calibration_inputs,
    example_on_device,
    first_images,
    image_count,
    layer_names,
    model_batches,
)
from .console import note
from .errors import UsageError, arg
from .finetuning import RECALIBRATION_IMAGES
from .groups import validate_names
from .importance import NEEDS_CALIBRATION, ChannelImportance, accumulate_gradients, make_importance
from .options import SEED
from .planning import allocation_note, default_allocation
from .pruning import PruneRequest, prune_model
from .reconstruct import reconstruct as refit_readers
from .schema import KEPT_ATTRIBUTE
from .sensitivity import scan_calibration, scan_options, scan_summary
from .surgery import KeptChannels, restore, snapshot
from .weights import find_classifier


@dataclass
class PruneReport:
    """What a pruning call did: the budget asked for, the measured cost before and after, what changed."""

    importance: str
    request: dict[str, Any]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    removed: dict[str, int]
    changed_layers: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    latency: dict[str, Any] | None = None  # for a latency target: runtime, batch, measured dense and pruned
    reconstruction: dict[str, Any] | None = None  # what recovery without labels re-fitted (reconstruct=True)
    scan: dict[str, Any] | None = None  # the sensitivity scan planned from: images, grid, time (scan_summary)

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "macs_ratio": self.macs_ratio, "params_ratio": self.params_ratio}

    def __str__(self) -> str:
        text = (
            f"pruned {sum(self.removed.values())} channels in {len(self.removed)} groups ({self.importance}): "
            f"MACs {self.macs_before:,} -> {self.macs_after:,} ({1 / self.macs_ratio:.2f}x fewer), "
            f"params {self.params_before:,} -> {self.params_after:,} ({1 / self.params_ratio:.2f}x fewer)"
        )
        if self.latency:
            last = self.latency["attempts"][-1]
            text += (
                f", latency {last['dense_ms']:.2f} -> {last['pruned_ms']:.2f} ms ({1 / last['measured']:.2f}x "
                f"faster, {self.latency['runtime']}, batch {self.latency['batch']}, measured)"
            )
        if self.scan and "seconds" in self.scan:
            s = self.scan
            text += (
                f"; planned from a scan of {s['groups']} groups x {len(s['ratios'])} ratios on "
                f"{s['held_out_images']} + {s['calibration_images']} images ({s['seconds']:.1f} s)"
            )
        if self.reconstruction:
            r = self.reconstruction
            text += f"; {len(r['layers'])} layers re-fitted on {r['images']} images ({r['seconds']:.1f} s)"
            if r.get("batchnorm"):
                text += f", BatchNorm statistics {r['batchnorm']['chosen']}"
        return text


def default_importance(layers: Sequence[str], images_at_hand: bool = False) -> str:
    """The blog's ``activation`` for named layers; for network-wide pruning, where the blog's criterion
    collapses (benchmarks/results/criteria.json), ``refit`` when unlabelled images are at hand to score
    on (``importance.WITH_IMAGES``), else ``group-l2`` (``importance.NETWORK_WIDE``)."""
    from .importance import NETWORK_WIDE, WITH_IMAGES

    if layers:
        return "activation"
    return WITH_IMAGES if images_at_hand else NETWORK_WIDE


def prune(
    model: nn.Module,
    example_inputs: torch.Tensor,
    *,
    target_macs: float | None = None,
    target_params: float | None = None,
    target_latency: float | None = None,
    latency_batch: int = PruneRequest.latency_batch,
    latency_runtime: str = PruneRequest.latency_runtime,
    ratio: float | None = None,
    layers: Sequence[str] | None = None,
    importance: str | ChannelImportance | None = None,
    calibration: Iterable | torch.Tensor | None = None,
    ignore: Sequence[str] | None = None,
    round_to: int = PruneRequest.round_to,
    allocation: str | None = None,
    sensitivity: dict[str, Any] | None = None,
    prune_input_conv: bool = PruneRequest.prune_input_conv,
    reconstruct: bool | None = None,
    reconstruction: Iterable | torch.Tensor | None = None,
    scan_recovery: bool = PruneRequest.scan_recovery,
    seed: int = SEED,
) -> PruneReport:
    """Remove whole channels from ``model`` in place; return what was removed and the measured cost.

    Give one budget: ``target_macs`` or ``target_params`` (fraction of the dense figure to keep, found
    globally), or ``ratio`` (fraction of channels to remove from each of ``layers``, or from every prunable
    layer). ``calibration`` is an iterable of input batches (or ``(inputs, labels)`` pairs) for the
    data-driven criteria (``activation``, ``activation-post``, ``taylor``). The request is validated and
    planned before the model changes; a refused request leaves the model exactly as it was.
    ``allocation`` spreads a target across layers: ``global`` (one importance threshold), ``uniform`` (one
    ratio) or ``sensitivity`` (equal predicted loss, from ``sensitivity``: the result of
    ``prunekit.sensitivity.scan``, or a scan of ``calibration`` run here). The default is the command
    line's: ``sensitivity`` for a target when ``calibration`` holds at least 500 images
    (``planning.SENSITIVITY_FROM``), else ``global`` (and a note says so). The input conv and the output layer are protected unless named;
    ``prune_input_conv`` lets a target or ratio prune the input conv's outputs too. ``target_latency`` keeps that fraction of the dense model's latency,
    measured on this machine at ``latency_batch`` in ``latency_runtime`` (``pytorch`` or ``onnxruntime``):
    planned from per-layer latency tables (cached) and checked by timing the pruned model.
    ``reconstruct`` then re-fits every layer that reads pruned channels to the dense model's outputs on
    unlabelled images (``reconstruction``, or else ``calibration``): recovery without labels
    (``prunekit.reconstruct``; BatchNorm statistics are left as the re-fit matched them).
    ``scan_recovery`` (default) recovers each try of the sensitivity scan run here before scoring it, so the
    plan ranks groups by what survives recovery (False: a faster scan, BatchNorm recalibration only).
    """
    at_hand = image_count(calibration)
    request = PruneRequest(
        layers=layer_names(layers, "layers"),
        ratio=ratio,
        target_macs=target_macs,
        target_params=target_params,
        target_latency=target_latency,
        latency_batch=latency_batch,
        latency_runtime=latency_runtime,
        ignore=layer_names(ignore, "ignore"),
        round_to=round_to,
        allocation=default_allocation(allocation, ratio, at_hand),
        sensitivity=sensitivity,
        prune_input_conv=prune_input_conv,
        reconstruct=reconstruct,
        scan_recovery=scan_recovery,
    )
    request.validate()
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    example = example_on_device(model, example_inputs)
    validate_names(model, request)
    criterion, label = _criterion(importance, request.layers, calibration is not None, seed)
    images = reconstruction if reconstruction is not None else calibration
    _note_defaults(request, allocation, reconstruct, importance, images is not None, at_hand)
    request.reconstruct = _reconstruct(reconstruct, images, request.layers)
    with _callers_gradients(model):
        start = time.perf_counter()
        result, recovery = _prune_on_data(
            model, request, criterion, label, example, calibration, images, seed
        )
        seconds = time.perf_counter() - start
    record_kept_features(model, result.kept)
    return _prune_report(label, request, result, recovery, seconds)


def record_kept_features(model: nn.Module, kept: KeptChannels) -> None:
    """Note on ``model`` which of the dense classifier's inputs its classifier still reads (composed over
    repeated prunings), for distillation's feature term (``losses.FeatureMatch``)."""
    name, _ = find_classifier(model)
    now = kept.inputs.get(name)
    if now is None:
        return
    before = getattr(model, KEPT_ATTRIBUTE, None)
    setattr(model, KEPT_ATTRIBUTE, now if before is None else before[now])


@contextlib.contextmanager
def _callers_gradients(model: nn.Module) -> Iterator[None]:
    """Leave every parameter's ``.grad`` as the caller had it: scoring gradients are not the caller's, and
    the parameters surgery creates start with none."""
    grads = {p: p.grad for p in model.parameters()}
    try:
        yield
    finally:
        for p, g in grads.items():
            p.grad = g
    for p in model.parameters():  # after success only: a refused or undone pruning adds no parameters
        if p not in grads:
            p.grad = None


def _prune_report(
    label: str, request: PruneRequest, result: Any, recovery: dict[str, Any] | None, seconds: float
) -> PruneReport:
    """The ``PruneReport`` of a pruning's result, its recovery and its duration."""
    return PruneReport(
        importance=label,
        request={k: v for k, v in vars(request).items() if k != "sensitivity"},
        macs_before=result.macs_before,
        macs_after=result.macs_after,
        params_before=result.params_before,
        params_after=result.params_after,
        removed=result.removed,
        changed_layers=result.changed_layers,
        seconds=seconds,
        latency=result.latency,
        reconstruction=recovery,
        scan=scan_summary(request.sensitivity),
    )


def _criterion(
    importance: str | ChannelImportance | None, layers: Sequence[str], images_at_hand: bool, seed: int
) -> tuple[ChannelImportance, str]:
    """The importance criterion ``prune`` scores with (its default for ``layers`` when None), and its name."""
    name = importance if importance is not None else default_importance(layers, images_at_hand)
    criterion = name if isinstance(name, ChannelImportance) else make_importance(name, seed)
    return criterion, name if isinstance(name, str) else type(name).__name__


def _note_defaults(
    request: PruneRequest,
    allocation: str | None,
    reconstruct: bool | None,
    importance: str | ChannelImportance | None,
    images_given: bool,
    at_hand: int | None,
) -> None:
    """The one-line notes on what the caller left to the defaults and what they did with it."""
    if not images_given and not request.layers:
        _note_without_images(allocation, request.ratio, reconstruct, importance)
    note(allocation_note(allocation, request.ratio, at_hand))
    if request.scan_recovery and request.sensitivity is not None and not request.sensitivity.get("recovered"):
        note(
            f"{arg('scan_recovery')}: the scan given was scored without recovery and is used as it is "
            f"(a recovered one: prunekit sensitivity --scan-recovery)"
        )


def _note_without_images(
    allocation: str | None,
    ratio: float | None,
    reconstruct: bool | None,
    importance: str | ChannelImportance | None,
) -> None:
    """One line naming the defaults that need images and were not given them (no ``calibration=``)."""
    from .importance import NETWORK_WIDE, WITH_IMAGES

    missing = []
    if importance is None:
        missing.append(
            f"importance '{NETWORK_WIDE}' instead of '{WITH_IMAGES}' (scores on calibration images)"
        )
    if allocation is None and ratio is None:
        missing.append("allocation 'global' instead of 'sensitivity' (a scan of calibration images)")
    if reconstruct is None:
        missing.append("no recovery (reconstruct re-fits on calibration images)")
    if missing:
        note(
            f"without calibration= images: {' and '.join(missing)}; pass calibration= for the "
            f"defaults (or name allocation= and reconstruct=)"
        )


def _reconstruct(reconstruct: bool | None, images: Any, layers: Sequence[str]) -> bool:
    if reconstruct is None:
        return default_reconstruct(images is not None, layers)
    if reconstruct and images is None:
        raise UsageError(
            f"{arg('reconstruct')} re-fits layers on unlabelled images: give {arg('calibration')} "
            f"(input batches)"
        )
    return reconstruct


def _prune_on_data(
    model: nn.Module,
    request: PruneRequest,
    criterion: ChannelImportance,
    label: str,
    example: torch.Tensor,
    calibration: Any,
    images: Any,
    seed: int,
) -> tuple[Any, dict[str, Any] | None]:
    """Score on ``calibration``, scan it for a sensitivity allocation, prune, and recover on ``images``:
    every batch is checked to run through the model before anything changes. Each of them is read once (a
    generator can only be), converted once and used wherever it is needed."""
    device = example.device
    scanning = request.allocation == "sensitivity" and request.sensitivity is None
    if scanning and calibration is None:
        raise UsageError(
            f"{arg('allocation')} sensitivity needs {arg('sensitivity')} (a scan) or "
            f"{arg('calibration')} images to scan"
        )
    batches = None
    if label in NEEDS_CALIBRATION or scanning or (request.reconstruct and images is calibration):
        batches = model_batches(model, calibration, device, labels=label == "taylor")
    if label == "taylor":
        accumulate_gradients(model, batches)
    elif label in NEEDS_CALIBRATION:
        criterion.calibrate(model, [x for x, _ in batches])
    refit = []
    if request.reconstruct:
        refit = [x for x, _ in (batches if images is calibration else model_batches(model, images, device))]
    if scanning:
        request.sensitivity = scan_calibration(model, example, batches, **scan_options(request))
    if not request.reconstruct:
        return prune_model(model, request, criterion, example), None  # traces autograd: no no_grad
    dense, before = copy.deepcopy(model), snapshot(model)
    result = prune_model(model, request, criterion, example)
    try:
        return result, refit_readers(dense, model, result.kept, refit, seed=seed).to_dict()
    except BaseException:  # the surgery too is undone: the model is left as the caller gave it
        restore(before)
        raise


def default_reconstruct(images_at_hand: bool, layers: Sequence[str] | None = None) -> bool:
    """Recovery without labels runs by default for network-wide pruning whenever unlabelled images are at
    hand (it kept the most accuracy in benchmarks/results/recovery.json); pruning named layers, the blog's
    experiment, stays exactly the blog's unless asked."""
    return images_at_hand and not layers


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, num_classes: int | None = None) -> dict[str, Any]:
    """Top-1 accuracy (overall and per class) and mean loss of ``model`` on ``(images, labels)`` batches, in
    fp32 and eval mode: the figure every command reports. The model's mode is left as it was."""
    from .measure import evaluate as measured

    return measured(model, batches, bf16=False, num_classes=num_classes)


def sensitivity_scan(
    model: nn.Module,
    example_inputs: Any,
    calibration: Iterable | torch.Tensor,
    ratios: Sequence[float] | None = None,
    scan_recovery: bool = PruneRequest.scan_recovery,
    prune_input_conv: bool = PruneRequest.prune_input_conv,
) -> dict[str, Any]:
    """Each prunable group pruned alone at ``ratios`` (default 0.1, 0.3, ..., 0.9) on ``calibration`` (input
    batches, labels optional), as ``prunekit sensitivity`` does: the result ``prune(sensitivity=)`` takes;
    ``scan_recovery``: each try recovered before it is scored; ``prune_input_conv``: the input conv's group
    scanned too. ``model`` is not changed."""
    example = example_on_device(model, example_inputs)
    batches = model_batches(model, calibration, example.device)
    request = PruneRequest(scan_recovery=scan_recovery, prune_input_conv=prune_input_conv)
    return scan_calibration(model, example, batches, ratios, **scan_options(request))


def recalibrate_bn(model: nn.Module, batches: Iterable) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (inputs or (inputs, labels)); returns
    the number of images seen. Pruning changes what flows into later BatchNorms, so do this after it."""
    from .finetuning import recalibrate_batchnorm

    device = next(model.parameters()).device
    inputs = (x for x, _ in calibration_inputs(batches, device))
    return recalibrate_batchnorm(model, inputs)


def save(model: nn.Module, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Save ``model`` (pruned or not) as a prunekit checkpoint: safetensors weights, shapes, JSON ``meta``.

    A model prunekit did not build by name is recorded by its class; reload it with
    ``load(path, model=MyNet())``. Nothing is pickled.
    """
    from .checkpoint import description, save_checkpoint

    inherited = description(getattr(model, "prunekit_meta", None) or {})
    cls = type(model)
    inherited.setdefault("model", f"custom:{cls.__module__}.{cls.__qualname__}")
    return save_checkpoint(path, model, {**inherited, **(meta or {})})


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Load a prunekit checkpoint in eval mode; metadata is ``model.prunekit_meta``.

    ``model``: a fresh instance of the saved model's class (needed for your own ``nn.Module``); the pruned
    shapes are re-applied to it before the weights load strictly.
    """
    from .checkpoint import load_checkpoint

    ckpt = load_checkpoint(path, model=model)
    ckpt.model.prunekit_meta = ckpt.meta
    return ckpt.model


def finetune(
    model: nn.Module,
    train: Iterable,
    *,
    val: Iterable | None = None,
    recipe: str | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    optimizer: str | None = None,
    config: Any = None,
    teacher: nn.Module | None = None,
    trainable: Any = None,
    recalibrate: bool = True,
    recalibration_images: int = RECALIBRATION_IMAGES,
    out: str | Path | None = None,
    device: str | None = None,
    seed: int = SEED,
) -> Any:
    """Fine-tune ``model`` on ``train`` (a DataLoader or list of ``(images, labels)``) with prunekit's loop.

    BatchNorm statistics are first re-estimated on up to ``recalibration_images`` training images. The
    recipe (``full``: SGD, cosine from lr 0.025, 0.01 with a ``teacher`` on fewer than 10,000 images,
    everything trains, BatchNorm re-estimated at the end; ``blog``: Adam 1e-4; by default as the command line,
    ``finetuning.default_recipe``) or a ``TrainConfig`` sets the schedule; ``teacher`` adds distillation;
    ``out`` keeps checkpoints and metrics. Returns a ``FitResult``.
    """
    from .finetuning import default_recipe, distils_few
    from .finetuning import recipe as make_recipe
    from .train import fit
    from .train_config import TrainConfig

    recipe = recipe or default_recipe((getattr(model, "prunekit_meta", None) or {}).get("pruning"))
    if config is None:
        few = distils_few(teacher is not None, image_count(train))
        config, _ = make_recipe(
            recipe, few, epochs=epochs, lr=lr, optimizer=optimizer, seed=seed, device=device
        )
    elif not isinstance(config, TrainConfig):
        raise UsageError(f"config must be a prunekit.TrainConfig, got {type(config).__name__}")
    config.validate()
    if recalibrate:
        recalibrate_bn(model, first_images(train, recalibration_images))
    return fit(model, train, config, out_dir=out, test=val, teacher=teacher, trainable=trainable)
