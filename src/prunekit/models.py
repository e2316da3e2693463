"""Building a classifier by name with the right class count (torchvision, ``timm:NAME``, a CIFAR ResNet-18)."""

from __future__ import annotations

import difflib

import torch.nn as nn
import torchvision

from .errors import UsageError, arg

CUSTOM_MODELS = ("resnet18-cifar",)
TIMM_PREFIX = "timm:"


def available_models() -> list[str]:
    """Every name ``build_model`` accepts."""
    return sorted([*torchvision.models.list_models(module=torchvision.models), *CUSTOM_MODELS])


def build_model(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised classifier; ``resnet18`` is the blog's model (ImageNet stem at any input size)."""
    if name == "resnet18-cifar":
        model = torchvision.models.resnet18(num_classes=num_classes)
        # CIFAR variant: 3x3 stride-1 stem and no max-pool, so 32x32 inputs keep their resolution.
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model
    if name.startswith(TIMM_PREFIX):
        return build_timm_model(name[len(TIMM_PREFIX) :], num_classes)
    if name not in torchvision.models.list_models(module=torchvision.models):
        close = difflib.get_close_matches(name, available_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else " See `prunekit models` for the list."
        raise UsageError(f"unknown model '{name}'.{hint}")
    kwargs: dict = {"num_classes": num_classes, "weights": None}
    if name.startswith(("googlenet", "inception")):
        kwargs.update(aux_logits=False, init_weights=True)
    return torchvision.models.get_model(name, **kwargs)


def import_timm():
    """The ``timm`` module, or a UsageError saying how to install it (it is an optional dependency)."""
    try:
        import timm
    except ImportError:
        raise UsageError(
            "timm models need the timm package: pip install 'prunekit[timm]' (or pip install timm)"
        ) from None
    return timm


def timm_architecture(arch: str) -> str:
    """``arch`` checked against timm's registry; a UsageError with close names otherwise."""
    timm = import_timm()
    if "." in arch and timm.is_model(arch.split(".", 1)[0]):
        # A pretrained tag selects weights, not an architecture; keep checkpoint names tag-free.
        base, tag = arch.split(".", 1)
        raise UsageError(
            f"'{TIMM_PREFIX}{arch}': name the architecture as '{TIMM_PREFIX}{base}' "
            f"and the pretrained tag with {arg('weights')} {tag}"
        )
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
        raise UsageError(f"unknown timm model '{arch}'.{hint} See timm.list_models() for the list.")
    return arch


def build_timm_model(arch: str, num_classes: int) -> nn.Module:
    """A freshly initialised timm classifier (never downloads)."""
    timm = import_timm()
    return timm.create_model(timm_architecture(arch), pretrained=False, num_classes=num_classes)


def min_input_size(name: str) -> int:
    """The smallest input a model's stem accepts (most torchvision CNNs run at 32x32).

    Vision transformers with a fixed position embedding (ViT) or a fixed window grid (MaxViT) take only
    the 224 px they were defined for; Inception's stem needs 75 px.
    """
    if name.startswith(("vit_", "maxvit")):
        return 224
    return 75 if name.startswith("inception") else 32
