"""What callers of the in-memory API hand in, checked and put in one form: calibration batches, example
inputs, layer names. A user's mistake here is one clear error, never a traceback from deep inside a scan."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn

from .errors import UsageError, arg


def model_batches(
    model: nn.Module, batches: Iterable | torch.Tensor | None, device: torch.device, labels: bool = False
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """``calibration_inputs`` that are known to run through ``model`` (two of their images tried)."""
    return _runnable(model, calibration_inputs(batches, device, labels=labels))


def image_count(batches: Any) -> int | None:
    """How many images ``batches`` hold without iterating a loader (its dataset's length); None when
    that cannot be told (an iterator)."""
    if batches is None:
        return 0
    if isinstance(batches, torch.Tensor):
        return len(batches)
    dataset = getattr(batches, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    if isinstance(batches, (list, tuple)):
        return sum(len(b[0] if isinstance(b, (list, tuple)) else b) for b in batches)
    return None


def calibration_inputs(
    calibration: Iterable | torch.Tensor | None, device: torch.device, labels: bool = False
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Calibration batches as ``(inputs, labels or None)`` on ``device``; a clear error when unusable."""
    if calibration is None:
        what = "(inputs, labels) batches" if labels else "input batches"
        raise UsageError(f"this importance criterion needs {arg('calibration')}: an iterable of {what}")
    items = [calibration] if isinstance(calibration, torch.Tensor) else list(calibration)
    batches = []
    for item in items:
        x, y = (item[0], item[1]) if isinstance(item, (tuple, list)) and len(item) >= 2 else (item, None)
        if not isinstance(x, torch.Tensor):
            raise UsageError(f"{arg('calibration')} must hold tensors, got a {type(x).__name__}")
        if labels and not isinstance(y, torch.Tensor):
            raise UsageError(
                f"importance 'taylor' needs labelled {arg('calibration')}: (inputs, labels) pairs"
            )
        batches.append((x.to(device), y.to(device) if isinstance(y, torch.Tensor) else None))
    if not batches:
        raise UsageError(f"{arg('calibration')} is empty; give at least one batch")
    return batches


@torch.no_grad()
def _runnable(model: nn.Module, batches: list[tuple[torch.Tensor, Any]]) -> list[tuple[torch.Tensor, Any]]:
    """``batches``, once two of their images have run through ``model``: a clear error instead of a
    traceback from deep inside a scan or a re-fit."""
    was_training = model.training
    model.eval()
    try:
        model(batches[0][0][:2])
    except Exception as exc:
        shapes = ", ".join(sorted({str(tuple(x.shape)) for x, _ in batches})[:3])
        raise UsageError(
            f"the {arg('calibration')} images (batches of shape {shapes}) do not run through the model: "
            f"{' '.join(str(exc).split())[:200]}"
        ) from None
    finally:
        model.train(was_training)
    return batches


def example_on_device(model: nn.Module, example_inputs: Any) -> torch.Tensor:
    if not isinstance(example_inputs, torch.Tensor):
        raise UsageError(
            f"example_inputs must be a tensor batch such as torch.randn(1, 3, 224, 224), "
            f"got {type(example_inputs).__name__}"
        )
    param = next(model.parameters(), None)
    return example_inputs.to(param.device) if param is not None else example_inputs


def layer_names(values: Sequence[str] | str | None, option: str) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        return [values]
    values = list(values)
    for v in values:
        if not isinstance(v, str):
            raise UsageError(f"{arg(option)} must be layer names (strings), got {v!r}")
    return values


def first_images(batches: Iterable, images: int) -> list:
    """The first batches of ``batches`` holding at least ``images`` images."""
    taken, seen = [], 0
    for item in batches:
        taken.append(item)
        x = item[0] if isinstance(item, (tuple, list)) else item
        seen += len(x)
        if seen >= images:
            break
    return taken
