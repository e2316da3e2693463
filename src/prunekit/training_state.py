"""What the training loop writes and reads back: its resumable state, the final model and metrics, the log."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .checkpoint import Checkpoint, save_checkpoint
from .console import info
from .errors import UsageError, arg
from .files import write_json, write_text

STATE_FILE = "checkpoint.safetensors"  # training state after every epoch (and on interrupt)
MODEL_FILE = "model.safetensors"  # the final weights


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


def fresh_totals() -> dict[str, float]:
    """Running sums of one epoch (kept in the checkpoint so a mid-epoch resume reports the whole epoch)."""
    return {"loss": 0.0, "correct": 0.0, "seen": 0.0, "seconds": 0.0}


def resumed(
    resume: Checkpoint | None, optimizer: torch.optim.Optimizer
) -> tuple[list[dict[str, Any]], int, int, dict[str, float]]:
    """History, epoch, batch and running sums where ``resume`` left off (a fresh start without it); restores
    the optimizer's state and the RNG saved with it."""
    if resume is None:
        return [], 0, 0, fresh_totals()
    state = resume.meta.get("train_state") or {}
    history = list(resume.meta.get("history", []))
    carried = state.get("running", fresh_totals())
    if resume.optimizer_state is not None:
        optimizer.load_state_dict(resume.optimizer_state)
    if "rng" in resume.extra:
        torch.set_rng_state(resume.extra["rng"])
    return history, state.get("epoch", 0), state.get("batch", 0), carried


def save_state(
    out_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    train_state: dict[str, Any],
) -> None:
    """``STATE_FILE``: the model, optimizer and RNG to resume from at ``train_state``'s epoch and batch."""
    epoch, batch = train_state["epoch"], train_state["batch"]
    check_finite(model, f"training diverged by epoch {epoch + 1}, batch {batch}; lower {arg('lr')}")
    save_checkpoint(
        out_dir / STATE_FILE,
        model,
        {**meta, "train_state": train_state},
        optimizer=optimizer,
        extra={"rng": torch.get_rng_state()},
    )


def write_final(
    out_dir: Path, model: nn.Module, meta: dict[str, Any], metrics: dict[str, Any], device: torch.device
) -> None:
    """``MODEL_FILE`` and ``metrics.json`` (``meta`` holds the history); the model ends back on ``device``."""
    check_finite(model, f"the trained model ({out_dir / MODEL_FILE})")
    save_checkpoint(out_dir / MODEL_FILE, model.to("cpu"), {**meta, "metrics": metrics})
    write_json(out_dir / "metrics.json", {"history": meta["history"], **metrics})
    model.to(device)


def log_text(history: list[dict[str, Any]]) -> str:
    """``train_log.txt``: one line per finished epoch."""
    return "".join(
        " ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()) + "\n"
        for record in history
    )


def write_log(path: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite ``train_log.txt`` from the history (no lines repeated after a resume)."""
    write_text(path, log_text(history))


def say_interrupted(out_dir: Path | None, epoch: int, batch: int) -> None:
    """Where the interrupted run's state went and how to continue it (nothing when nothing was written)."""
    if out_dir is not None:
        info(
            f"\ninterrupted: saved {out_dir / STATE_FILE} at epoch {epoch + 1}, batch {batch}; "
            f"continue with {arg('resume')}"
        )
