"""The one training loop: baseline training, fine-tuning, distillation, and torch.distributed runs."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .batchnorm import batchnorms, recalibrate_batchnorm
from .checkpoint import Checkpoint, save_checkpoint
from .console import info, progress_bar
from .data import DataBundle
from .errors import UsageError, arg
from .files import DirectoryLock, clean_stale_temps, is_main_process, write_json, write_text
from .measure import autocast, bf16_supported, evaluate

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

STATE_FILE = "checkpoint.safetensors"  # training state after every epoch (and on interrupt)
MODEL_FILE = "model.safetensors"  # the final weights


@dataclass
class TrainConfig:
    """Every knob of the loop; saved in each checkpoint so ``--resume`` continues with the same recipe."""

    epochs: int = 20
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # cosine | onecycle | constant
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    bf16: bool = True
    channels_last: bool = True
    seed: int = 0
    device: str = "auto"
    distill_temperature: float = 4.0
    distill_weight: float = 0.5
    # Mixup of the inputs while distilling (Beta(a, a) weights; 0: off): the teacher labels any image, so
    # mixed ones widen what a few hundred training images show the student ("function matching").
    distill_mixup: float = 0.0
    # After the last epoch, BatchNorm statistics re-estimated on this many training images with the final
    # weights ("precise BN"; 0: off). A small BatchNorm momentum (0.01 in TF-ported models) leaves them
    # far behind a short fine-tuning: 37.2 % -> 68.5 % on the few-shot EfficientNet-Lite1.
    precise_bn_images: int = 0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def validate(self) -> None:
        """Every field checked through the one options table (type, range, finite)."""
        from .options import validate

        for key, value in validate(asdict(self)).items():
            setattr(self, key, value)


class TrainingDiverged(UsageError):
    """The loss or the weights became NaN/inf; nothing of the broken state was saved."""


def non_finite_tensor(model: nn.Module) -> str | None:
    """The name of the first parameter or buffer holding NaN or inf, else None."""
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def check_finite(model: nn.Module, what: str) -> None:
    """Refuse to go on (and to write ``what``) when the model holds NaN or inf."""
    bad = non_finite_tensor(model)
    if bad is not None:
        raise TrainingDiverged(
            f"{what}: the model holds NaN/inf values (first in {bad}); nothing was written"
        )


class StopOnSignal:
    """While active, SIGINT and SIGTERM only set ``requested``; the loop stops at its next step boundary.

    Only the main thread can install handlers; elsewhere this is inert (signals keep their handlers).
    Further signals while stopping are ignored, so a second Ctrl-C cannot cut the final save in half.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is None:
            self.requested = signum

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Distributed:
    """Join the torchrun job described by the environment, if any (gloo on CPU, nccl on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size())


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


def learning_rate(cfg: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """The schedule as a pure function of the global step, so resuming needs no scheduler state."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch) if cfg.schedule == "cosine" else 0
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "onecycle":
        peak = max(1, int(0.25 * total_steps))
        if step < peak:
            return cfg.lr * (0.04 + 0.96 * step / peak)
        progress = (step - peak) / max(1, total_steps - peak)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


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


class IterableBatches:
    """Any re-iterable of ``(images, labels)`` with a length (a DataLoader, a list) as the loop's loader.

    Resuming mid-epoch replays the iterable and skips the batches already done, which is exact when the
    iterable yields the same batches each time for the same epoch (a seeded sampler, a list).
    """

    def __init__(self, batches: Iterable):
        try:
            len(batches)  # type: ignore[arg-type]
        except TypeError:
            raise UsageError(
                "training batches need a length (a DataLoader, a list of (images, labels)); "
                f"got a {type(batches).__name__}"
            ) from None
        self.source = batches

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator:
        return iter(self.source)

    def set_epoch(self, epoch: int) -> None:
        sampler = getattr(self.source, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler reshuffles per epoch
            sampler.set_epoch(epoch)

    def batches(self, start: int = 0) -> Iterator:
        return itertools.islice(iter(self.source), start, None)


def as_loader(batches: Any) -> Any:
    """The loop's loader protocol (``__len__``, ``set_epoch``, ``batches(start)``) over ``batches``."""
    if all(hasattr(batches, a) for a in ("__len__", "set_epoch", "batches")):
        return batches
    return IterableBatches(batches)


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

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch


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
    loader, test_loader, classes = _loaders(data, test, classes, cfg, dist_info)
    steps_per_epoch = len(loader)
    if steps_per_epoch < 1:
        raise UsageError(
            f"no training batches: the training data is empty (or smaller than {arg('batch_size')})"
        )
    history, start_epoch, start_batch, carried = _resumed(resume, optimizer)
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
        write_text(run.log, _log_text(history))  # the log is the history: no lines repeated after a resume
    last_test, epoch_ran = None, False
    with progress_bar(transient=False) as bar:
        for epoch in range(start_epoch, cfg.epochs):
            first = start_batch if epoch == start_epoch else 0
            running = dict(carried) if epoch == start_epoch else _fresh_totals()
            task = train_one_epoch(run, bar, epoch, first, running)
            last_test, epoch_ran = _end_epoch(run, bar, task, epoch, running), True

    final = (
        last_test if epoch_ran else _evaluate_test(run)
    ) or {}  # the last epoch's test is the final model's
    _write_final(run, final)
    if _stop_requested(stop, dist_info, device):
        raise KeyboardInterrupt  # arrived during the final evaluation or save: both are complete
    return FitResult(model, history, final)


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


def _loaders(
    data: DataBundle | Iterable,
    test: Iterable | None,
    classes: list[str] | None,
    cfg: TrainConfig,
    dist_info: Distributed,
) -> tuple[Any, Any, list[str] | None]:
    """The training loader, the test loader (or None) and the class names, from a bundle or from batches."""
    if isinstance(data, DataBundle):
        place = {"rank": dist_info.rank, "world_size": dist_info.world_size}
        loader = data.loader(
            "train", cfg.batch_size, train=True, seed=cfg.seed, channels_last=cfg.channels_last, **place
        )
        return loader, data.loader("test", channels_last=cfg.channels_last, **place), data.classes
    return as_loader(data), as_loader(test) if test is not None else None, classes


def _resumed(
    resume: Checkpoint | None, optimizer: torch.optim.Optimizer
) -> tuple[list[dict[str, Any]], int, int, dict[str, float]]:
    """History, epoch, batch and running sums where ``resume`` left off (a fresh start without it); restores
    the optimizer's state and the RNG saved with it."""
    if resume is None:
        return [], 0, 0, _fresh_totals()
    state = resume.meta.get("train_state") or {}
    history = list(resume.meta.get("history", []))
    carried = state.get("running", _fresh_totals())
    if resume.optimizer_state is not None:
        optimizer.load_state_dict(resume.optimizer_state)
    if "rng" in resume.extra:
        torch.set_rng_state(resume.extra["rng"])
    return history, state.get("epoch", 0), state.get("batch", 0), carried


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
            if _stop_requested(run.stop, run.dist_info, run.device):
                raise KeyboardInterrupt  # at a step boundary: the state below is exact
    except KeyboardInterrupt:
        running["seconds"] += time.perf_counter() - tick
        _save_state(run, epoch, next_batch, running)
        _say_interrupted(run.dist_info, run.out_dir, epoch, next_batch)
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
    mixed = _mixup(x, y, cfg, step) if run.teacher is not None and cfg.distill_mixup > 0 else None
    if mixed is not None:
        x, y_other, weight = mixed
    with autocast(run.device, run.use_bf16):
        logits = run.train_model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        if mixed is not None:
            other = F.cross_entropy(logits.float(), y_other, label_smoothing=cfg.label_smoothing)
            loss = weight * loss + (1 - weight) * other
        if run.teacher is not None:
            loss = _with_distillation(cfg, run.teacher, x, logits, loss)
    loss_value = _checked_loss(loss, epoch, batch, run.steps_per_epoch, cfg)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    running["loss"] += loss_value * len(y)
    running["correct"] += float((logits.argmax(1) == y).sum())
    running["seen"] += len(y)
    return lr


def _mixup(
    x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, step: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``x`` mixed with a shuffled copy of itself by a Beta(a, a) weight drawn for ``step`` (the same on
    resume), the shuffled labels, and the weight."""
    seed = cfg.seed * 1_000_003 + step  # drawn from the step, not the global RNG: the same on resume
    weight = random.Random(seed).betavariate(cfg.distill_mixup, cfg.distill_mixup)
    weight = max(weight, 1 - weight)  # the first image dominates: its label is the running accuracy's
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(x.device)
    return weight * x + (1 - weight) * x[order], y[order], weight


def _with_distillation(
    cfg: TrainConfig, teacher: nn.Module, x: torch.Tensor, logits: torch.Tensor, loss: torch.Tensor
) -> torch.Tensor:
    """``loss`` blended with the soft-target loss against ``teacher`` on ``x`` (called under the step's autocast)."""
    with torch.no_grad():
        soft = teacher(x).float()
    kd = distillation_loss(logits.float(), soft, cfg.distill_temperature)
    return (1 - cfg.distill_weight) * loss + cfg.distill_weight * kd


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
    _save_state(run, epoch + 1, 0, _fresh_totals())
    if _stop_requested(run.stop, run.dist_info, run.device):
        _say_interrupted(run.dist_info, run.out_dir, epoch + 1, 0)
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
        write_text(run.log, _log_text(run.history))
        if not bar.console.is_terminal:
            info(
                f"epoch {epoch + 1}/{run.cfg.epochs}: loss {record['train_loss']:.4f} "
                f"{tested}({record['images_per_s']:.0f} img/s)"
            )


def _save_state(run: _Loop, epoch: int, batch: int, running: dict[str, float]) -> None:
    """The training state to resume from at (``epoch``, ``batch``), RNG included; main process, out_dir only."""
    if not run.dist_info.is_main or run.out_dir is None:
        return
    check_finite(run.model, f"training diverged by epoch {epoch + 1}, batch {batch}; lower {arg('lr')}")
    train_meta = {
        **run.meta,
        "train": {"config": asdict(run.cfg)},
        "history": run.history,
        "train_state": {"epoch": epoch, "batch": batch, "running": running},
    }
    save_checkpoint(
        run.out_dir / STATE_FILE,
        run.model,
        train_meta,
        optimizer=run.optimizer,
        extra={"rng": torch.get_rng_state()},
    )


def _write_final(run: _Loop, final: dict[str, Any]) -> None:
    """The final weights and metrics.json (main process, with an out_dir); the model stays on its device."""
    if not run.dist_info.is_main or run.out_dir is None:
        return
    out_dir, history = run.out_dir, run.history
    check_finite(run.model, f"the trained model ({out_dir / MODEL_FILE})")
    names = run.classes or [str(i) for i in range(len(final.get("per_class", [])))]
    metrics = {
        "test_accuracy": final.get("accuracy"),
        "test_loss": final.get("loss"),
        "per_class_accuracy": dict(zip(names, final.get("per_class", []), strict=True)),
        "train_seconds": sum(h["seconds"] for h in history),
        "bf16_active": run.use_bf16,  # the flag asks; this says whether the hardware allowed it
    }
    final_meta = {**run.meta, "train": {"config": asdict(run.cfg)}, "history": history, "metrics": metrics}
    save_checkpoint(out_dir / MODEL_FILE, run.model.to("cpu"), final_meta)
    write_json(out_dir / "metrics.json", {"history": history, **metrics})
    run.model.to(run.device)


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


def _stop_requested(stop: StopOnSignal, dist_info: Distributed, device: torch.device) -> bool:
    """Whether a signal asked to stop; in a torchrun job, whether any rank was asked, so all stop together."""
    wanted = stop.requested is not None
    if dist_info.world_size > 1:
        import torch.distributed as dist

        flag = torch.tensor([1.0 if wanted else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        wanted = bool(flag.item())
    return wanted


def _say_interrupted(dist_info: Distributed, out_dir: Path | None, epoch: int, batch: int) -> None:
    if dist_info.is_main and out_dir is not None:
        info(
            f"\ninterrupted: saved {out_dir / STATE_FILE} at epoch {epoch + 1}, batch {batch}; "
            f"continue with {arg('resume')}"
        )


def _log_text(history: list[dict[str, Any]]) -> str:
    """``train_log.txt``: one line per finished epoch."""
    return "".join(
        " ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()) + "\n"
        for record in history
    )


def _fresh_totals() -> dict[str, float]:
    """Running sums of one epoch (kept in the checkpoint so a mid-epoch resume reports the whole epoch)."""
    return {"loss": 0.0, "correct": 0.0, "seen": 0.0, "seconds": 0.0}


def _fully_frozen_norms(model: nn.Module) -> list[nn.Module]:
    """Norm layers none of whose parameters train; kept in eval mode so their statistics stay put."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters())
    ]
