"""The one training loop: baseline training, fine-tuning, distillation, and torch.distributed runs.

The loop's parts live beside it: the recipe in ``train_config``, the losses in ``losses``, the files it
writes and reads back in ``training_state``, the device, torchrun job and signals in ``runtime``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .batchnorm import batchnorms, recalibrate_batchnorm
from .checkpoint import Checkpoint
from .console import info, progress_bar, warn
from .data import DataBundle
from .errors import UsageError, arg
from .files import DirectoryLock, clean_stale_temps, is_main_process
from .loaders import IterableBatches, as_loader, loaders
from .losses import FeatureMatch, distillation_loss, feature_match, mixup, with_distillation
from .measure import autocast, bf16_supported, evaluate
from .runtime import Distributed, StopOnSignal, init_distributed, resolve_device, stop_requested
from .train_config import TrainConfig, learning_rate, make_optimizer
from .training_state import (
    MODEL_FILE,
    STATE_FILE,
    TrainingDiverged,
    check_finite,
    fresh_totals,
    resumed,
    save_state,
    say_interrupted,
    write_final,
    write_log,
)

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

# What callers import from here: the loop, and names whose homes are the modules above.
__all__ = [
    "MODEL_FILE",
    "STATE_FILE",
    "Distributed",
    "FitResult",
    "IterableBatches",
    "StopOnSignal",
    "TrainConfig",
    "TrainingDiverged",
    "as_loader",
    "check_finite",
    "distillation_loss",
    "fit",
    "init_distributed",
    "learning_rate",
    "make_optimizer",
    "resolve_device",
    "train_one_epoch",
]


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, Any]]
    test: dict[str, Any]


def fit(
    model: nn.Module,
    data: DataBundle | Iterable,
    cfg: TrainConfig,
    out_dir: str | Path | None = None,
    meta: dict[str, Any] | None = None,
    teacher: nn.Module | None = None,
    trainable: Callable[[str], bool] | None = None,
    resume: Checkpoint | None = None,
    on_step: Callable[[int], None] | None = None,
    test: Iterable | None = None,
    classes: list[str] | None = None,
) -> FitResult:
    """Train ``model`` on ``data``: a ``DataBundle``, or any iterable of ``(images, labels)`` batches.

    With ``out_dir``, checkpoints after every epoch and on Ctrl-C and writes the final model and metrics;
    without, nothing is written. ``test`` (batches) is evaluated after each epoch when ``data`` is not a
    bundle. ``trainable(name)`` selects the parameters to train (all when None); ``teacher`` adds
    distillation; ``resume`` continues from a saved training state; ``on_step(global_step)`` is a test hook.
    Ctrl-C (SIGINT) or SIGTERM stops at the next step boundary, saves the exact state, then raises
    ``KeyboardInterrupt``; ``resume`` from that state ends bitwise equal to an uninterrupted run.
    """
    cfg.validate()
    main = is_main_process()
    lock = DirectoryLock(out_dir) if out_dir is not None and main else contextlib.nullcontext()
    with lock, StopOnSignal() as stop:
        if out_dir is not None and main:
            clean_stale_temps(out_dir)
        return _fit(model, data, cfg, out_dir, meta, teacher, trainable, resume, on_step, test, classes, stop)


@dataclass
class _Loop:
    """What the loop's parts share: the model, its optimizer and data, where it runs and where it writes."""

    cfg: TrainConfig
    model: nn.Module
    train_model: nn.Module  # ``model``, or its DistributedDataParallel wrapper in a torchrun job
    teacher: nn.Module | None
    optimizer: torch.optim.Optimizer
    loader: Any
    test_loader: Any
    classes: list[str] | None
    device: torch.device
    dist_info: Distributed
    use_bf16: bool
    frozen_modules: list[nn.Module]
    steps_per_epoch: int
    out_dir: Path | None
    meta: dict[str, Any]
    history: list[dict[str, Any]]
    log: Path | None  # train_log.txt, on the main process when writing
    stop: StopOnSignal
    on_step: Callable[[int], None] | None
    features: FeatureMatch | None = None  # the classifier inputs matched while distilling

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch

    @property
    def writes_to(self) -> Path | None:
        """``out_dir`` on the process that writes (the main one), else None."""
        return self.out_dir if self.dist_info.is_main else None

    def file_meta(self) -> dict[str, Any]:
        """The caller's metadata with the recipe and the history so far, as every file the loop writes has it."""
        return {**self.meta, "train": {"config": asdict(self.cfg)}, "history": self.history}


def _fit(
    model: nn.Module,
    data: DataBundle | Iterable,
    cfg: TrainConfig,
    out_dir: str | Path | None,
    meta: dict[str, Any] | None,
    teacher: nn.Module | None,
    trainable: Callable[[str], bool] | None,
    resume: Checkpoint | None,
    on_step: Callable[[int], None] | None,
    test: Iterable | None,
    classes: list[str] | None,
    stop: StopOnSignal,
) -> FitResult:
    """``fit`` inside its lock and signal guard: set up, then train epoch by epoch and write the results."""
    out_dir = Path(out_dir) if out_dir is not None else None
    device = resolve_device(cfg.device)
    dist_info = init_distributed(device)
    use_bf16 = cfg.bf16 and (device.type == "cuda" or bf16_supported())
    torch.manual_seed(cfg.seed)
    optimizer = _place(model, teacher, trainable, cfg, device)
    loader, test_loader, classes = loaders(data, test, classes, cfg, dist_info)
    steps_per_epoch = len(loader)
    if steps_per_epoch < 1:
        raise UsageError(
            f"no training batches: the training data is empty (or smaller than {arg('batch_size')})"
        )
    history, start_epoch, start_batch, carried = resumed(resume, optimizer)
    train_model: nn.Module = model
    if dist_info.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    run = _Loop(
        cfg=cfg,
        model=model,
        train_model=train_model,
        teacher=teacher,
        optimizer=optimizer,
        loader=loader,
        test_loader=test_loader,
        classes=classes,
        device=device,
        dist_info=dist_info,
        use_bf16=use_bf16,
        frozen_modules=_fully_frozen_norms(model) if trainable is not None else [],
        steps_per_epoch=steps_per_epoch,
        out_dir=out_dir,
        meta=meta or {},
        history=history,
        log=(out_dir / "train_log.txt") if dist_info.is_main and out_dir is not None else None,
        stop=stop,
        on_step=on_step,
    )
    if run.log and out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_log(run.log, history)  # the log is the history: no lines repeated after a resume
    last_test, epoch_ran = _train_epochs(run, start_epoch, start_batch, carried)

    final = (
        last_test if epoch_ran else _evaluate_test(run)
    ) or {}  # the last epoch's test is the final model's
    _write_final(run, final)
    if stop_requested(stop, dist_info, device):
        raise KeyboardInterrupt  # arrived during the final evaluation or save: both are complete
    return FitResult(model, history, final)


def _train_epochs(
    run: _Loop, start_epoch: int, start_batch: int, carried: dict[str, float]
) -> tuple[dict[str, Any] | None, bool]:
    """The epochs left, from ``start_batch`` of ``start_epoch``: (the last epoch's test, whether one ran)."""
    last_test, epoch_ran = None, False
    run.features, why_not = feature_match(run.cfg, run.model, run.teacher)
    if run.dist_info.is_main and run.cfg.distill_features and run.teacher is None:
        warn(f"{arg('distill_features')} is for distillation, and this run does not distil: ignored")
    elif why_not and run.dist_info.is_main:
        warn(f"{arg('distill_features')}: {why_not}; distilling the logits only")
    try:
        with progress_bar(transient=False) as bar:
            for epoch in range(start_epoch, run.cfg.epochs):
                first = start_batch if epoch == start_epoch else 0
                running = dict(carried) if epoch == start_epoch else fresh_totals()
                task = train_one_epoch(run, bar, epoch, first, running)
                last_test, epoch_ran = _end_epoch(run, bar, task, epoch, running), True
    finally:
        if run.features is not None:
            run.features.close()
    return last_test, epoch_ran


def _place(
    model: nn.Module,
    teacher: nn.Module | None,
    trainable: Callable[[str], bool] | None,
    cfg: TrainConfig,
    device: torch.device,
) -> torch.optim.Optimizer:
    """Move ``model`` (and ``teacher``) to ``device``, freeze what ``trainable`` leaves out; the optimizer."""
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    for name, p in model.named_parameters():
        p.requires_grad_(trainable is None or trainable(name))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UsageError("nothing to train: the freezing policy froze every parameter")
    optimizer = make_optimizer(cfg, params)
    if teacher is not None:
        teacher.to(device).eval()
        if cfg.channels_last:
            teacher.to(memory_format=torch.channels_last)
    return optimizer


def train_one_epoch(run: _Loop, bar: Progress, epoch: int, first: int, running: dict[str, float]) -> TaskID:
    """Train ``epoch`` from batch ``first`` on, adding to ``running``; returns its progress-bar task.

    On a stop request (or ``KeyboardInterrupt`` from ``on_step``) saves the exact state and re-raises.
    """
    cfg = run.cfg
    run.loader.set_epoch(epoch)
    if first == 0:
        torch.manual_seed(cfg.seed * 1000 + epoch)  # epoch-boundary resume needs no saved RNG
    task = bar.add_task(
        f"epoch {epoch + 1}/{cfg.epochs}", total=run.steps_per_epoch, completed=first, info=""
    )
    run.train_model.train()
    for m in run.frozen_modules:
        m.eval()  # frozen BatchNorms keep their running statistics
    tick = time.perf_counter()
    next_batch = first
    try:
        for batch, (x, y) in enumerate(run.loader.batches(first), start=first):
            lr = _train_step(run, epoch, batch, x, y, running)
            next_batch = batch + 1
            _show_step(run, bar, task, epoch, batch, lr, running, tick)
            if stop_requested(run.stop, run.dist_info, run.device):
                raise KeyboardInterrupt  # at a step boundary: the state below is exact
    except KeyboardInterrupt:
        running["seconds"] += time.perf_counter() - tick
        _save_state(run, epoch, next_batch, running)
        say_interrupted(run.writes_to, epoch, next_batch)
        raise
    running["seconds"] += time.perf_counter() - tick
    return task


def _train_step(
    run: _Loop, epoch: int, batch: int, x: torch.Tensor, y: torch.Tensor, running: dict[str, float]
) -> float:
    """One optimizer step on batch ``batch`` of ``epoch``, its loss and hits added to ``running``; the lr."""
    cfg = run.cfg
    step = epoch * run.steps_per_epoch + batch
    if run.on_step is not None:
        run.on_step(step)
    lr = learning_rate(cfg, step, run.total_steps, run.steps_per_epoch)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
    if cfg.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    mixed = mixup(x, y, cfg, step) if run.teacher is not None and cfg.distill_mixup > 0 else None
    if mixed is not None:
        x, y_other, weight = mixed
    with autocast(run.device, run.use_bf16):
        logits = run.train_model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        if mixed is not None:
            other = F.cross_entropy(logits.float(), y_other, label_smoothing=cfg.label_smoothing)
            loss = weight * loss + (1 - weight) * other
        if run.teacher is not None:
            loss = with_distillation(cfg, run.teacher, x, logits, loss, run.features)
    loss_value = _checked_loss(loss, epoch, batch, run.steps_per_epoch, cfg)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    running["loss"] += loss_value * len(y)
    running["correct"] += float((logits.argmax(1) == y).sum())
    running["seen"] += len(y)
    return lr


def _show_step(
    run: _Loop,
    bar: Progress,
    task: TaskID,
    epoch: int,
    batch: int,
    lr: float,
    running: dict[str, float],
    tick: float,
) -> None:
    """The running loss, accuracy and speed on the bar; ten lines an epoch in the log when not on a terminal."""
    cfg = run.cfg
    elapsed = running["seconds"] + time.perf_counter() - tick
    status = (
        f"loss {running['loss'] / running['seen']:.3f}  acc {running['correct'] / running['seen']:.1%}"
        f"  {running['seen'] * run.dist_info.world_size / max(elapsed, 1e-9):.0f} img/s  lr {lr:.2g}"
    )
    bar.update(task, advance=1, info=status)
    if run.log and not bar.console.is_terminal and (batch + 1) % max(1, run.steps_per_epoch // 10) == 0:
        info(f"epoch {epoch + 1}/{cfg.epochs} step {batch + 1}/{run.steps_per_epoch}: {status}")


def _end_epoch(
    run: _Loop, bar: Progress, task: TaskID, epoch: int, running: dict[str, float]
) -> dict[str, Any] | None:
    """Test, record and log the finished ``epoch``, then save the state at its end; the test result."""
    # A signal during evaluation only sets the flag: the epoch's record is whole before anything is saved.
    if epoch + 1 == run.cfg.epochs and run.cfg.precise_bn_images:
        _precise_bn(run)
    test = _evaluate_test(run)
    record = _epoch_record(run, epoch, running, test)
    run.history.append(record)
    _log_epoch(run, bar, task, epoch, record, test)
    _save_state(run, epoch + 1, 0, fresh_totals())
    if stop_requested(run.stop, run.dist_info, run.device):
        say_interrupted(run.writes_to, epoch + 1, 0)
        raise KeyboardInterrupt
    return test


def _precise_bn(run: _Loop) -> None:
    """Re-estimate the statistics of every BatchNorm that trains on the first ``precise_bn_images`` training
    images, with the final weights; every process ends with rank 0's. The RNG is left as it was."""
    norms = [m for m in batchnorms(run.model) if m not in run.frozen_modules]
    with torch.random.fork_rng(devices=[]):

        def images() -> Iterator[torch.Tensor]:
            seen = 0
            for x, _ in run.loader.batches(0):
                if seen >= run.cfg.precise_bn_images:
                    return
                x = x[: run.cfg.precise_bn_images - seen].to(run.device, non_blocking=True)
                seen += len(x)
                last = run.cfg.channels_last and x.dim() == 4
                yield x.contiguous(memory_format=torch.channels_last) if last else x

        recalibrate_batchnorm(run.model, images(), norms)
    if run.dist_info.world_size > 1:
        for buffer in run.model.buffers():
            torch.distributed.broadcast(buffer, 0)


def _evaluate_test(run: _Loop) -> dict[str, Any] | None:
    """The model on the test batches, or None without them."""
    # fp32 always, as every later command evaluates: one model, one accuracy, in the log and the report
    if run.test_loader is None:
        return None
    return evaluate(
        run.model,
        run.test_loader,
        device=run.device,
        bf16=False,
        num_classes=len(run.classes) if run.classes else None,
        world_size=run.dist_info.world_size,
    )


def _epoch_record(
    run: _Loop, epoch: int, running: dict[str, float], test: dict[str, Any] | None
) -> dict[str, Any]:
    """The history entry of a finished ``epoch`` (a line of train_log.txt)."""
    seen = running["seen"] * run.dist_info.world_size
    return {
        "epoch": epoch + 1,
        "train_loss": running["loss"] / max(running["seen"], 1),
        "train_accuracy": running["correct"] / max(running["seen"], 1),
        "test_loss": test["loss"] if test else None,
        "test_accuracy": test["accuracy"] if test else None,
        "lr": run.optimizer.param_groups[0]["lr"],
        "images_per_s": seen / max(running["seconds"], 1e-9),
        "seconds": running["seconds"],
    }


def _log_epoch(
    run: _Loop, bar: Progress, task: TaskID, epoch: int, record: dict[str, Any], test: dict[str, Any] | None
) -> None:
    """The epoch's figures on the bar, rewritten into train_log.txt, and as a line when not on a terminal."""
    tested = f"test {test['accuracy']:.2%}  " if test else ""
    bar.update(
        task,
        info=f"loss {record['train_loss']:.3f}  train {record['train_accuracy']:.1%}  "
        f"{tested}{record['images_per_s']:.0f} img/s",
    )
    if run.log:
        write_log(run.log, run.history)
        if not bar.console.is_terminal:
            info(
                f"epoch {epoch + 1}/{run.cfg.epochs}: loss {record['train_loss']:.4f} "
                f"{tested}({record['images_per_s']:.0f} img/s)"
            )


def _checked_loss(
    loss: torch.Tensor, epoch: int, batch: int, steps_per_epoch: int, cfg: TrainConfig
) -> float:
    """The loss as a number (read once per step: on a GPU each read waits for the device); stops before a
    NaN/inf loss reaches the weights, so the last checkpoint on disk stays the good one."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise TrainingDiverged(
            f"training diverged at epoch {epoch + 1}, step {batch + 1}/{steps_per_epoch}: the loss is {value}; "
            f"lower {arg('lr')} (it is {cfg.lr:g}); nothing of the diverged state was saved"
        )
    return value


def _fully_frozen_norms(model: nn.Module) -> list[nn.Module]:
    """Norm layers none of whose parameters train; kept in eval mode so their statistics stay put."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters())
    ]


def _save_state(run: _Loop, epoch: int, batch: int, running: dict[str, float]) -> None:
    """The training state to resume from at (``epoch``, ``batch``), RNG included; main process, out_dir only."""
    if run.writes_to is None:
        return
    state = {"epoch": epoch, "batch": batch, "running": running}
    save_state(run.writes_to, run.model, run.optimizer, run.file_meta(), state)


def _write_final(run: _Loop, final: dict[str, Any]) -> None:
    """The final weights and metrics.json (main process, with an out_dir); the model stays on its device."""
    if run.writes_to is None:
        return
    names = run.classes or [str(i) for i in range(len(final.get("per_class", [])))]
    metrics = {
        "test_accuracy": final.get("accuracy"),
        "test_loss": final.get("loss"),
        "per_class_accuracy": dict(zip(names, final.get("per_class", []), strict=True)),
        "train_seconds": sum(h["seconds"] for h in run.history),
        "bf16_active": run.use_bf16,  # the flag asks; this says whether the hardware allowed it
    }
    write_final(run.writes_to, run.model, run.file_meta(), metrics, run.device)
