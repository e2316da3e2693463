"""Checkpoints as one safetensors file: weights, optional training state, JSON metadata. Never unpickles.

The metadata records every module's shape attributes (channels, features, groups), so a pruned model is
rebuilt from its torchvision name plus those shapes, and its weights then load with ``strict=True``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import UsageError
from .files import atomic_write
from .models import build_model
from .schema import CUSTOM_PREFIX, KEPT_ATTRIBUTE, SHAPE_ATTRS, validate

FORMAT = "prunekit-checkpoint"
FORMAT_VERSION = 1
MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim."


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model, its metadata and any training state saved with it."""

    model: nn.Module
    meta: dict[str, Any]
    optimizer_state: dict[str, Any] | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def module_shapes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per-module shape attributes; what pruning changes and what a rebuild must restore."""
    shapes = {}
    for name, module in model.named_modules():
        attrs = {a: _jsonable(getattr(module, a)) for a in SHAPE_ATTRS if hasattr(module, a)}
        if attrs:
            shapes[name] = attrs
    return shapes


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` (and optionally optimizer state and extra tensors) atomically to ``path``."""
    model = _unwrap(model)
    state = model.state_dict()
    tensors = {MODEL_PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()}
    meta = {
        **meta,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "shapes": module_shapes(model),
        "state_versions": state_versions(state),
    }
    kept = getattr(model, KEPT_ATTRIBUTE, None)
    if kept is not None:  # which dense classifier inputs a pruned model reads: distillation matches them
        meta[KEPT_ATTRIBUTE] = [int(i) for i in kept]
    if optimizer is not None:
        optim_tensors, optim_meta = _flatten_optimizer(optimizer.state_dict())
        tensors.update(optim_tensors)
        meta["optimizer"] = optim_meta
    for k, v in (extra or {}).items():
        tensors["extra." + k] = v.detach().cpu().contiguous()
    header = {"prunekit": json.dumps(meta, default=_jsonable)}
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=header))


def read_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint's metadata alone (validated against the tensors' shapes), without loading weights."""
    with _open(path) as f:
        return _meta_of(f, path)


def description(meta: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's metadata without its training state and results: what a derived checkpoint inherits."""
    dropped = (
        "train",
        "history",
        "train_state",
        "optimizer",
        "metrics",
        "shapes",
        "state_versions",
        "format",
        "format_version",
    )
    return {k: v for k, v in meta.items() if k not in dropped}


def load_checkpoint(path: str | Path, model: nn.Module | None = None) -> Checkpoint:
    """Rebuild the model with the recorded shapes and load its weights strictly.

    ``model``, when given, is a fresh instance to load into (a user's own class); else it is built by name.
    """
    with _open(path) as f:
        meta = _meta_of(f, path)
        keys = list(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    name = meta["model"]
    if model is None:
        if str(name).startswith(CUSTOM_PREFIX):
            cls = str(name)[len(CUSTOM_PREFIX) :].rpartition(".")[2]
            raise UsageError(
                f"{path} holds a {name[len(CUSTOM_PREFIX) :]}, which prunekit cannot build by name; "
                f"load it with prunekit.load(path, model={cls}(...)), a fresh instance of that class"
            )
        if "num_classes" not in meta:
            raise UsageError(f"{path}: not a prunekit checkpoint (metadata lacks num_classes)")
        model = build_model(name, meta["num_classes"])
    state = {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    apply_shapes(model, meta.get("shapes") or {}, state)
    state = with_versions(state, meta.get("state_versions"), model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise UsageError(f"{path}: the weights do not fit a {name} model ({detail})") from None
    model.eval()
    if isinstance(meta.get(KEPT_ATTRIBUTE), list):
        setattr(model, KEPT_ATTRIBUTE, torch.tensor(meta[KEPT_ATTRIBUTE], dtype=torch.long))
    optim = None
    if "optimizer" in meta:
        optim = _unflatten_optimizer(
            {k[len(OPTIM_PREFIX) :]: v for k, v in tensors.items() if k.startswith(OPTIM_PREFIX)},
            meta["optimizer"],
        )
    extra = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
    return Checkpoint(model, meta, optim, extra)


def state_versions(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Each module's state-dict version (``state_dict()._metadata``), which some layers check on load."""
    recorded = getattr(state, "_metadata", None) or {}
    return {name: m["version"] for name, m in recorded.items() if isinstance(m.get("version"), int)}


def with_versions(
    state: dict[str, torch.Tensor], versions: dict[str, int] | None, model: nn.Module
) -> OrderedDict[str, torch.Tensor]:
    """``state`` carrying per-module versions: the recorded ones, else those of the freshly built model.

    ``load_state_dict`` hands each module its version; without it, layers such as MNASNet's refuse to load.
    """
    state = OrderedDict(state)
    if versions is None:  # a checkpoint written before versions were recorded: the current layout's
        state._metadata = getattr(model.state_dict(), "_metadata", OrderedDict())  # type: ignore[attr-defined]
    else:
        state._metadata = OrderedDict((k, {"version": v}) for k, v in versions.items())  # type: ignore[attr-defined]
    return state


def apply_shapes(model: nn.Module, shapes: dict[str, dict[str, Any]], state: dict[str, torch.Tensor]) -> None:
    """Set recorded shape attributes and resize parameters/buffers to the saved tensors' shapes."""
    modules = dict(model.named_modules())
    for name, attrs in shapes.items():
        module = modules.get(name)
        if module is None:
            continue
        for attr, value in attrs.items():
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
    for key, tensor in state.items():
        owner_name, _, leaf = key.rpartition(".")
        owner = modules.get(owner_name)
        if owner is None:
            continue
        if leaf in owner._parameters and owner._parameters[leaf] is not None:
            old = owner._parameters[leaf]
            if old.shape != tensor.shape:
                owner._parameters[leaf] = nn.Parameter(
                    torch.empty_like(tensor), requires_grad=old.requires_grad
                )
        elif (
            leaf in owner._buffers
            and owner._buffers[leaf] is not None
            and owner._buffers[leaf].shape != tensor.shape
        ):
            owner._buffers[leaf] = torch.empty_like(tensor)


def _open(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such checkpoint file")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError, Exception) as exc:
        raise UsageError(f"{path}: not a prunekit checkpoint (unreadable as safetensors: {exc})") from None


def _meta_of(f, path: str | Path) -> dict[str, Any]:
    raw = (f.metadata() or {}).get("prunekit")
    if raw is None:
        raise UsageError(f"{path}: a safetensors file, but not a prunekit checkpoint (no prunekit metadata)")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise UsageError(f"{path}: corrupt prunekit metadata ({exc})") from None
    if not isinstance(meta, dict):
        raise UsageError(f"{path}: corrupt prunekit metadata (a JSON {type(meta).__name__}, not an object)")
    if meta.get("format") != FORMAT or not isinstance(meta.get("model"), str):
        raise UsageError(f"{path}: not a prunekit checkpoint (metadata lacks the model description)")
    version = meta.get("format_version", 0)
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise UsageError(f"{path}: written by a newer prunekit (format {version}); upgrade prunekit")
    names = list(f.keys())  # a safe_open handle is not iterable
    shapes = {
        k[len(MODEL_PREFIX) :]: tuple(f.get_slice(k).get_shape()) for k in names if k.startswith(MODEL_PREFIX)
    }
    validate(meta, path, shapes)
    return meta


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return value


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, per_param in state_dict["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIM_PREFIX}{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta.get("scalars", {}).items()]:
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}
