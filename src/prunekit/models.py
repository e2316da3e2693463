"""Building a classifier by name with the right class count (torchvision models, plus a CIFAR ResNet-18)."""

from __future__ import annotations

import difflib

import torch.nn as nn
import torchvision

from .errors import UsageError

CUSTOM_MODELS = ("resnet18-cifar",)


def available_models() -> list[str]:
    """Every name ``build_model`` accepts."""
    return sorted([*torchvision.models.list_models(module=torchvision.models), *CUSTOM_MODELS])


def build_model(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised classifier; ``resnet18`` is the seed's model (ImageNet stem at any input size)."""
    if name == "resnet18-cifar":
        model = torchvision.models.resnet18(num_classes=num_classes)
        # CIFAR variant: 3x3 stride-1 stem and no max-pool, so 32x32 inputs keep their resolution.
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model
    if name not in torchvision.models.list_models(module=torchvision.models):
        close = difflib.get_close_matches(name, available_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else " See `prunekit models` for the list."
        raise UsageError(f"unknown model '{name}'.{hint}")
    kwargs: dict = {"num_classes": num_classes, "weights": None}
    if name.startswith(("googlenet", "inception")):
        kwargs.update(aux_logits=False, init_weights=True)
    return torchvision.models.get_model(name, **kwargs)


def min_input_size(name: str) -> int:
    """The smallest input a model's stem accepts (most torchvision CNNs run at 32x32)."""
    return 75 if name.startswith("inception") else 32
