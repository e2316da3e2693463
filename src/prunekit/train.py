"""The one training loop: baseline training, fine-tuning, distillation, and torch.distributed runs."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import Checkpoint, save_checkpoint
from .console import info, progress_bar
from .data import DataBundle
from .errors import UsageError, arg
from .files import DirectoryLock, clean_stale_temps, is_main_process, write_json, write_text
from .measure import autocast, bf16_supported, evaluate

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
    out_dir = Path(out_dir) if out_dir is not None else None
    meta = meta or {}
    device = resolve_device(cfg.device)
    dist_info = init_distributed(device)
    use_bf16 = cfg.bf16 and (device.type == "cuda" or bf16_supported())
    torch.manual_seed(cfg.seed)

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

    if isinstance(data, DataBundle):
        place = {"rank": dist_info.rank, "world_size": dist_info.world_size}
        loader = data.loader(
            "train", cfg.batch_size, train=True, seed=cfg.seed, channels_last=cfg.channels_last, **place
        )
        test_loader = data.loader("test", channels_last=cfg.channels_last, **place)
        classes = data.classes
    else:
        loader = as_loader(data)
        test_loader = as_loader(test) if test is not None else None
    steps_per_epoch = len(loader)
    if steps_per_epoch < 1:
        raise UsageError(
            f"no training batches: the training data is empty (or smaller than {arg('batch_size')})"
        )
    total_steps = cfg.epochs * steps_per_epoch
    history: list[dict[str, Any]] = []
    start_epoch, start_batch, carried = 0, 0, _fresh_totals()
    if resume is not None:
        state = resume.meta.get("train_state") or {}
        history = list(resume.meta.get("history", []))
        start_epoch, start_batch = state.get("epoch", 0), state.get("batch", 0)
        carried = state.get("running", carried)
        if resume.optimizer_state is not None:
            optimizer.load_state_dict(resume.optimizer_state)
        if "rng" in resume.extra:
            torch.set_rng_state(resume.extra["rng"])

    train_model: nn.Module = model
    if dist_info.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    frozen_modules = _fully_frozen_norms(model) if trainable is not None else []

    def save(epoch: int, batch: int, running: dict[str, float]) -> None:
        if not dist_info.is_main or out_dir is None:
            return
        check_finite(model, f"training diverged by epoch {epoch + 1}, batch {batch}; lower {arg('lr')}")
        train_meta = {
            **meta,
            "train": {"config": asdict(cfg)},
            "history": history,
            "train_state": {"epoch": epoch, "batch": batch, "running": running},
        }
        save_checkpoint(
            out_dir / STATE_FILE, model, train_meta, optimizer=optimizer, extra={"rng": torch.get_rng_state()}
        )

    def evaluate_test() -> dict[str, Any] | None:
        # fp32 always, as every later command evaluates: one model, one accuracy, in the log and the report
        if test_loader is None:
            return None
        return evaluate(
            model,
            test_loader,
            device=device,
            bf16=False,
            num_classes=len(classes) if classes else None,
            world_size=dist_info.world_size,
        )

    log = (out_dir / "train_log.txt") if dist_info.is_main and out_dir is not None else None
    if log:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(log, _log_text(history))  # the log is the history: no lines repeated after a resume
    epoch, test, epoch_ran = start_epoch, None, False
    with progress_bar(transient=False) as bar:
        for epoch in range(start_epoch, cfg.epochs):
            loader.set_epoch(epoch)
            first = start_batch if epoch == start_epoch else 0
            running = dict(carried) if epoch == start_epoch else _fresh_totals()
            if first == 0:
                torch.manual_seed(cfg.seed * 1000 + epoch)  # epoch-boundary resume needs no saved RNG
            task = bar.add_task(
                f"epoch {epoch + 1}/{cfg.epochs}", total=steps_per_epoch, completed=first, info=""
            )
            train_model.train()
            for m in frozen_modules:
                m.eval()  # frozen BatchNorms keep their running statistics
            tick = time.perf_counter()
            next_batch = first
            try:
                for batch, (x, y) in enumerate(loader.batches(first), start=first):
                    step = epoch * steps_per_epoch + batch
                    if on_step is not None:
                        on_step(step)
                    lr = learning_rate(cfg, step, total_steps, steps_per_epoch)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    if cfg.channels_last and x.dim() == 4:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with autocast(device, use_bf16):
                        logits = train_model(x)
                        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                        if teacher is not None:
                            with torch.no_grad():
                                soft = teacher(x).float()
                            kd = distillation_loss(logits.float(), soft, cfg.distill_temperature)
                            loss = (1 - cfg.distill_weight) * loss + cfg.distill_weight * kd
                    loss_value = _checked_loss(loss, epoch, batch, steps_per_epoch, cfg)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    running["loss"] += loss_value * len(y)
                    running["correct"] += float((logits.argmax(1) == y).sum())
                    running["seen"] += len(y)
                    next_batch = batch + 1
                    elapsed = running["seconds"] + time.perf_counter() - tick
                    status = (
                        f"loss {running['loss'] / running['seen']:.3f}  acc {running['correct'] / running['seen']:.1%}"
                        f"  {running['seen'] * dist_info.world_size / max(elapsed, 1e-9):.0f} img/s  lr {lr:.2g}"
                    )
                    bar.update(task, advance=1, info=status)
                    if (
                        log
                        and not bar.console.is_terminal
                        and (batch + 1) % max(1, steps_per_epoch // 10) == 0
                    ):
                        info(f"epoch {epoch + 1}/{cfg.epochs} step {batch + 1}/{steps_per_epoch}: {status}")
                    if _stop_requested(stop, dist_info, device):
                        raise KeyboardInterrupt  # at a step boundary: the state below is exact
            except KeyboardInterrupt:
                running["seconds"] += time.perf_counter() - tick
                save(epoch, next_batch, running)
                _say_interrupted(dist_info, out_dir, epoch, next_batch)
                raise
            running["seconds"] += time.perf_counter() - tick
            # A signal during evaluation only sets the flag: the epoch's record is whole before anything is saved.
            test, epoch_ran = evaluate_test(), True
            seen = running["seen"] * dist_info.world_size
            record = {
                "epoch": epoch + 1,
                "train_loss": running["loss"] / max(running["seen"], 1),
                "train_accuracy": running["correct"] / max(running["seen"], 1),
                "test_loss": test["loss"] if test else None,
                "test_accuracy": test["accuracy"] if test else None,
                "lr": optimizer.param_groups[0]["lr"],
                "images_per_s": seen / max(running["seconds"], 1e-9),
                "seconds": running["seconds"],
            }
            history.append(record)
            tested = f"test {test['accuracy']:.2%}  " if test else ""
            bar.update(
                task,
                info=f"loss {record['train_loss']:.3f}  train {record['train_accuracy']:.1%}  "
                f"{tested}{record['images_per_s']:.0f} img/s",
            )
            if log:
                write_text(log, _log_text(history))
                if not bar.console.is_terminal:
                    info(
                        f"epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.4f} "
                        f"{tested}({record['images_per_s']:.0f} img/s)"
                    )
            save(epoch + 1, 0, _fresh_totals())
            if _stop_requested(stop, dist_info, device):
                _say_interrupted(dist_info, out_dir, epoch + 1, 0)
                raise KeyboardInterrupt

    final = (test if epoch_ran else evaluate_test()) or {}  # the last epoch's test is the final model's
    if dist_info.is_main and out_dir is not None:
        check_finite(model, f"the trained model ({out_dir / MODEL_FILE})")
        names = classes or [str(i) for i in range(len(final.get("per_class", [])))]
        metrics = {
            "test_accuracy": final.get("accuracy"),
            "test_loss": final.get("loss"),
            "per_class_accuracy": dict(zip(names, final.get("per_class", []), strict=True)),
            "train_seconds": sum(h["seconds"] for h in history),
            "bf16_active": use_bf16,  # the flag asks; this says whether the hardware allowed it
        }
        final_meta = {**meta, "train": {"config": asdict(cfg)}, "history": history, "metrics": metrics}
        save_checkpoint(out_dir / MODEL_FILE, model.to("cpu"), final_meta)
        write_json(out_dir / "metrics.json", {"history": history, **metrics})
        model.to(device)
    if _stop_requested(stop, dist_info, device):
        raise KeyboardInterrupt  # arrived during the final evaluation or save: both are complete
    return FitResult(model, history, final)


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
