"""Pretrained weights: torchvision weight names, timm pretrained tags, or a local state-dict file.

``build_with_weights`` returns the model, the input pipeline the weights expect and a JSON-able record
for checkpoint metadata. Downloads go to the libraries' own caches (torch hub for torchvision, the
Hugging Face hub for timm), so weights fetched once are found again offline.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torchvision

from .errors import UsageError, arg
from .models import TIMM_PREFIX, available_models, build_model, import_timm, timm_architecture

FILE_SUFFIXES = (".safetensors", ".pth", ".pt")
DEFAULT_NAMES = ("DEFAULT", "pretrained")
TIMM_DEFAULT_FILE = "model.safetensors"  # what timm asks the Hugging Face hub for first
_SHOWN = 3  # names shown per kind of mismatch; the count says how many more


@dataclass
class Preprocess:
    """The input pipeline a set of weights expects."""

    crop_size: int  # the model's input resolution
    resize_size: int  # eval: resize shorter side to this, then centre-crop crop_size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bilinear" | "bicubic" | "nearest"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (tuples become lists)."""
        d = asdict(self)
        return {**d, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        """Inverse of ``to_dict``."""
        return cls(
            crop_size=int(d["crop_size"]),
            resize_size=int(d["resize_size"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
            interpolation=str(d["interpolation"]),
        )


def build_with_weights(
    name: str, num_classes: int, weights: str | None
) -> tuple[nn.Module, Preprocess | None, dict[str, Any] | None]:
    """Model ``name`` with ``weights`` loaded and a ``num_classes`` classifier; plus its preprocessing and record."""
    if weights is None:
        return build_model(name, num_classes), None, None
    weights = str(weights)
    if _looks_like_file(weights):
        return _from_file(name, num_classes, weights)
    if name.startswith(TIMM_PREFIX):
        return _from_timm(name, num_classes, weights)
    enum = _torchvision_weights_enum(name)
    if enum is not None:
        return _from_torchvision(name, num_classes, weights, enum)
    if name not in available_models():
        build_model(name, num_classes)  # raises the unknown-model error, with close names
    raise UsageError(
        f"{arg('weights')} {weights}: no such file, and {name} has no named pretrained weights; "
        f"give a state-dict file ({', '.join(FILE_SUFFIXES)})"
    )


# --- torchvision --------------------------------------------------------------------------------


def _torchvision_weights_enum(name: str):
    """The weights enum of torchvision model ``name``, or None when it has none (custom or unknown names)."""
    try:
        return torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        return None


def _resolve_torchvision_weights(name: str, value: str, enum):
    """``DEFAULT``, ``IMAGENET1K_V1`` or ``ResNet18_Weights.IMAGENET1K_V1`` as a member of ``enum``."""
    try:
        return enum.verify("DEFAULT" if value == "pretrained" else value)
    except (KeyError, ValueError, TypeError):
        valid = ", ".join(enum.__members__)
        raise UsageError(
            f"{arg('weights')} {value}: not a weights name for {name}; valid: {valid} "
            f"(or {enum.__name__}.<name>), or a state-dict file ({', '.join(FILE_SUFFIXES)})"
        ) from None


def _from_torchvision(name: str, num_classes: int, value: str, enum):
    w = _resolve_torchvision_weights(name, value, enum)
    model = _download_torchvision(name, w)
    classes = len(w.meta["categories"])
    replaced = replace_classifier(model, num_classes, old_classes=classes) if num_classes != classes else None
    preprocess = _torchvision_preprocess(w)
    if getattr(model, "transform_input", False):
        # googlenet/inception weights expect (x - 0.5) / 0.5 and re-normalise ImageNet-normalised input
        # inside forward. A checkpoint rebuilds them with transform_input=False, so normalise to 0.5/0.5
        # in preprocessing instead: the same numbers reach the first conv, and reloading stays exact.
        model.transform_input = False
        preprocess.mean, preprocess.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    record = {
        "source": "torchvision",
        "name": str(w),
        "url": w.url,
        "file": str(_hub_target(w.url)),
        "classifier_replaced": replaced is not None,
    }
    if replaced is not None:
        record["classifier"] = replaced
    return model, preprocess, record


def _hub_target(url: str) -> Path:
    """Where torch hub keeps (and first looks for) the file behind ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _download_torchvision(name: str, w) -> nn.Module:
    """The torchvision builder with weights ``w``; download failures become a UsageError naming the cache path."""
    target = _hub_target(w.url)
    cached = target.is_file()
    # The builder loads through w.get_state_dict(progress=..., check_hash=True), torchvision's own loader
    # (torch hub cache first). Calling it rather than loading the state dict ourselves keeps the
    # per-model quirks: densenet's old key names, googlenet/inception aux heads, vit/maxvit input size.
    try:
        model = torchvision.models.get_model(name, weights=w, progress=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        reason = _first_line(exc)
        if cached:
            raise UsageError(
                f"{arg('weights')} {w}: could not load the cached file {target} ({reason}); "
                "delete it to download it again"
            ) from None
        raise UsageError(
            f"could not download {w.url} ({reason}); offline, place that file at {target}"
        ) from None
    if getattr(model, "AuxLogits", None) is not None:
        # inception_v3 keeps its aux head when loading weights; build_model (and so checkpoint reload)
        # has none, and an aux Linear would also pass for the classifier.
        model.aux_logits, model.AuxLogits = False, None
    return model


def _torchvision_preprocess(w) -> Preprocess:
    t = w.transforms()
    crop, resize = t.crop_size, t.resize_size
    return Preprocess(
        crop_size=int(crop[0] if isinstance(crop, (list, tuple)) else crop),
        resize_size=int(resize[0] if isinstance(resize, (list, tuple)) else resize),
        mean=tuple(float(x) for x in t.mean),
        std=tuple(float(x) for x in t.std),
        interpolation=str(t.interpolation.value),
    )


# --- classifier ---------------------------------------------------------------------------------


def find_classifier(model: nn.Module) -> tuple[str, nn.Module]:
    """The output layer: the last ``nn.Linear`` or ``nn.Conv2d`` (squeezenet's 1x1 conv) of ``model``."""
    # torchvision and timm define the head last in __init__ (googlenet/inception aux heads come before
    # the main fc), so registration order is forward order for the output layer; tracing a real forward
    # pass instead would need an input size valid for every model (vit needs exactly 224).
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        raise UsageError(f"{type(model).__name__} has no Linear or Conv2d layer to use as its classifier")
    return layers[-1]


def _out_size(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def replace_classifier(model: nn.Module, num_classes: int, old_classes: int | None = None) -> str:
    """Swap the output layer for a fresh one of the same kind with ``num_classes`` outputs; returns its name."""
    name, old = find_classifier(model)
    if old_classes is not None and _out_size(old) != old_classes:
        # The last layer does not produce the class scores (an unusual head): refuse rather than guess.
        raise UsageError(
            f"cannot find the classifier of {type(model).__name__}: its last layer {name} has "
            f"{_out_size(old)} outputs, not {old_classes} classes"
        )
    new = _fresh_like(old, num_classes)
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)
    if isinstance(getattr(model, "num_classes", None), int):
        model.num_classes = num_classes  # timm and some torchvision models keep it for reset/heads
    return name


def _fresh_like(layer: nn.Module, num_classes: int) -> nn.Module:
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        new: nn.Module = nn.Linear(layer.in_features, num_classes, bias=bias)
    else:
        new = nn.Conv2d(
            layer.in_channels,
            num_classes,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            bias=bias,
        )
    return new.to(device=layer.weight.device, dtype=layer.weight.dtype)


# --- timm -------------------------------------------------------------------------------------------


def _timm_full_name(timm, arch: str, value: str) -> str:
    """``arch.tag`` for ``pretrained``/``DEFAULT`` (timm's default tag) or an explicit tag."""
    tags = timm.list_pretrained(f"{arch}.*")
    if not tags:
        raise UsageError(f"{TIMM_PREFIX}{arch} has no pretrained weights in timm; drop {arg('weights')}")
    if value in DEFAULT_NAMES:
        cfg = timm.models.get_pretrained_cfg(arch)
        return f"{arch}.{cfg.tag}" if cfg is not None and cfg.tag else tags[0]
    full = value if value.startswith(f"{arch}.") else f"{arch}.{value}"
    if full not in tags:
        valid = ", ".join(t.split(".", 1)[1] for t in tags)
        raise UsageError(
            f"{arg('weights')} {value}: not a pretrained tag of {TIMM_PREFIX}{arch}; "
            f"valid: pretrained, {valid}, or a state-dict file ({', '.join(FILE_SUFFIXES)})"
        )
    return full


def _from_timm(name: str, num_classes: int, value: str):
    timm = import_timm()
    arch = timm_architecture(name[len(TIMM_PREFIX) :])
    full = _timm_full_name(timm, arch, value)
    cfg = timm.models.get_pretrained_cfg(full)
    try:
        model = timm.create_model(full, pretrained=True, num_classes=num_classes)
    except _timm_download_errors() as exc:
        raise UsageError(_timm_offline_message(cfg, exc)) from None
    pcfg = model.pretrained_cfg
    record = {
        "source": "timm",
        "name": full,
        "classifier_replaced": int(pcfg.get("num_classes") or num_classes) != num_classes,
    }
    file = _timm_cached_file(cfg)
    if cfg.hf_hub_id:
        record["hf_hub_id"] = cfg.hf_hub_id
    if file:
        record["file"] = file
    return model, _timm_preprocess(pcfg), record


def _timm_download_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, RuntimeError]  # RuntimeError: torch hub hash checks
    try:
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

        errors += [EntryNotFoundError, HfHubHTTPError]
    except ImportError:
        pass
    return tuple(errors)


def _timm_offline_message(cfg, exc: BaseException) -> str:
    reason = _first_line(exc)
    if cfg.hf_hub_id:
        from huggingface_hub import constants

        repo = cfg.hf_hub_id.split("@", 1)[0]
        filename = cfg.hf_hub_filename or TIMM_DEFAULT_FILE
        folder = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
        return (
            f"could not download {filename} from the Hugging Face repo {repo} ({reason}); offline, place it "
            f"in the Hugging Face cache {constants.HF_HUB_CACHE}: {folder}/snapshots/<commit>/{filename} "
            f"with {folder}/refs/main holding <commit> (copy that folder from a machine that has it)"
        )
    return f"could not download {cfg.url} ({reason}); offline, place that file at {_hub_target(cfg.url)}"


def _timm_cached_file(cfg) -> str | None:
    """The local file the weights were read from, where that can be told without network access."""
    if not cfg.hf_hub_id:
        return str(_hub_target(cfg.url)) if cfg.url else None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo = cfg.hf_hub_id.split("@", 1)[0]
    for filename in (cfg.hf_hub_filename or TIMM_DEFAULT_FILE, "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return found
    return None


def _timm_preprocess(pcfg: dict[str, Any]) -> Preprocess:
    crop = int(pcfg["input_size"][-1])
    crop_pct = float(pcfg.get("crop_pct") or 1.0)
    return Preprocess(
        crop_size=crop,
        resize_size=math.floor(crop / crop_pct),  # timm's eval transform: scale_size = floor(img / crop_pct)
        mean=tuple(float(x) for x in pcfg["mean"]),
        std=tuple(float(x) for x in pcfg["std"]),
        interpolation=str(pcfg.get("interpolation") or "bilinear"),
    )


# --- local files --------------------------------------------------------------------------------


def _looks_like_file(value: str) -> bool:
    return (
        Path(value).suffix.lower() in FILE_SUFFIXES
        or "/" in value
        or os.sep in value
        or Path(value).is_file()
    )


def _from_file(name: str, num_classes: int, path: str):
    state = load_state_file(path)
    model = build_model(name, num_classes)
    transferred = load_fitting(model, state, f"{arg('weights')} {path}", name)
    record = {"source": "file", "file": str(Path(path).resolve()), "classifier_replaced": transferred}
    if transferred:
        record["classifier"] = find_classifier(model)[0]
    return model, None, record


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors``, ``.pth`` or ``.pt``; never unpickles arbitrary objects."""
    label = f"{arg('weights')} {path}"
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{label}: no such file")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        obj = _read_safetensors(p, label)
    elif suffix in (".pth", ".pt"):
        obj = _read_torch(p, label)
    else:
        raise UsageError(f"{label}: unknown weights file type '{suffix}'; use {', '.join(FILE_SUFFIXES)}")
    return _unwrap_state_dict(obj, label)


def _read_safetensors(path: Path, label: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys, meta = list(f.keys()), f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in keys}
    except Exception as exc:  # safetensors raises its own error types for every kind of corruption
        raise UsageError(f"{label}: unreadable as safetensors ({_first_line(exc)})") from None
    if "prunekit" in meta:
        # A prunekit checkpoint: its weights live under "model." next to optimizer state.
        tensors = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    return tensors


def _read_torch(path: Path, label: str) -> Any:
    try:
        # weights_only: tensors and plain containers only; a pickle that would build other objects
        # (and so could run code) is refused before anything in it executes.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UsageError(
            f"{label}: refused by safe (weights-only) loading: {_unpickle_detail(exc)}; only plain state "
            "dicts of tensors load, since unpickling other objects can run code: save model.state_dict(), "
            "or convert the file to .safetensors"
        ) from None
    except Exception as exc:
        raise UsageError(f"{label}: unreadable as a PyTorch file ({_first_line(exc)})") from None


def _unpickle_detail(exc: BaseException) -> str:
    """The useful part of torch's long weights-only error: the refused global, or the unpickler's complaint."""
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"the file pickles {found.group(1)}, not just tensors"
    found = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
    return found.group(1).strip() if found else _first_line(exc)


def _unwrap_state_dict(obj: Any, label: str) -> dict[str, torch.Tensor]:
    """A bare state dict, or one nested under "state_dict"/"model"; DDP's "module." prefix removed."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(
            f"{label}: not a state dict (a mapping of parameter names to tensors, "
            'bare or under "state_dict" or "model")'
        )
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def load_fitting(model: nn.Module, state: dict[str, torch.Tensor], label: str, name: str) -> bool:
    """Load ``state`` into ``model``; True when only the classifier differed and the fresh one was kept."""
    own = model.state_dict()
    # Files from older PyTorch lack BatchNorm's step counter; it does not affect outputs.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    head = find_classifier(model)[0] + "."
    transfer = (
        bool(missing or mismatched)
        and not unexpected
        and all(k.startswith(head) for k in [*missing, *mismatched])
    )
    if (missing or unexpected or mismatched) and not transfer:
        raise UsageError(
            f"{label} does not fit {name}: {_mismatch_summary(missing, unexpected, mismatched, state, own)}"
        )
    keep = {k: v for k, v in state.items() if not (transfer and k.startswith(head))}
    model.load_state_dict(keep, strict=False)
    return transfer


def _mismatch_summary(missing, unexpected, mismatched, state, own) -> str:
    parts = []
    if missing:
        parts.append(f"{_count(len(missing), 'missing key')} ({_names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_names(unexpected)})")
    if mismatched:
        shown = [f"{k}: file {list(state[k].shape)}, model {list(own[k].shape)}" for k in mismatched[:_SHOWN]]
        more = ", ..." if len(mismatched) > _SHOWN else ""
        label = "shape mismatch" if len(mismatched) == 1 else "shape mismatches"
        parts.append(f"{len(mismatched)} {label} ({', '.join(shown)}{more})")
    return ", ".join(parts)


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:_SHOWN]) + (", ..." if len(keys) > _SHOWN else "")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."
