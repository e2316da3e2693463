"""The model factory: torchvision names, timm names, the CIFAR ResNet-18, and helpful errors for unknown names."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn as nn

from prunekit.errors import UsageError
from prunekit.models import available_models, build_model, min_input_size


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet18_has_the_seeds_parameter_count():
    model = build_model("resnet18", 10)
    assert _params(model) == 11_181_642
    assert model.fc.out_features == 10


def test_resnet18_cifar_keeps_32px_resolution():
    model = build_model("resnet18-cifar", 10).eval()
    assert model.conv1.stride == (1, 1) and model.conv1.kernel_size == (3, 3)
    assert isinstance(model.maxpool, nn.Identity)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
        stem = model.conv1(torch.randn(1, 3, 32, 32))
    assert tuple(out.shape) == (2, 10)
    assert tuple(stem.shape[-2:]) == (32, 32)


def test_resnet18_forward_at_32px():
    with torch.no_grad():
        out = build_model("resnet18", 7).eval()(torch.randn(3, 3, 32, 32))
    assert tuple(out.shape) == (3, 7)


def test_torchvision_model_by_name():
    model = build_model("mobilenet_v2", 5).eval()
    assert type(model).__name__ == "MobileNetV2"
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert tuple(out.shape) == (2, 5)


def test_fresh_models_are_not_pretrained():
    """weights=None: two builds under different seeds differ (no downloaded weights)."""
    torch.manual_seed(0)
    a = build_model("resnet18", 10)
    torch.manual_seed(1)
    b = build_model("resnet18", 10)
    assert not torch.equal(a.conv1.weight, b.conv1.weight)


@pytest.mark.parametrize(("name", "suggestion"), [("resnet19", "resnet18"), ("mobilenetv2", "mobilenet_v2")])
def test_unknown_model_suggests_a_close_name(name, suggestion):
    with pytest.raises(UsageError) as err:
        build_model(name, 10)
    message = str(err.value)
    assert f"'{name}'" in message
    assert "Did you mean" in message and suggestion in message


def test_unknown_model_without_close_names_points_to_the_list():
    with pytest.raises(UsageError, match="prunekit models"):
        build_model("zzzzqqqq", 10)


def test_available_models():
    names = available_models()
    assert "resnet18" in names and "resnet18-cifar" in names and "mobilenet_v2" in names
    assert names == sorted(names)
    assert min_input_size("inception_v3") > min_input_size("resnet18") == 32


def test_timm_model_by_name():
    pytest.importorskip("timm")
    model = build_model("timm:resnet18", 6).eval()
    assert type(model).__module__.startswith("timm.")
    assert model.pretrained_cfg["num_classes"] == 1000 and model.num_classes == 6  # no weights were loaded
    with torch.no_grad():
        assert tuple(model(torch.randn(2, 3, 32, 32)).shape) == (2, 6)


def test_unknown_timm_model_suggests_close_names():
    pytest.importorskip("timm")
    with pytest.raises(UsageError, match="unknown timm model 'resnet19'.*Did you mean timm:resnet18"):
        build_model("timm:resnet19", 10)


def test_timm_name_with_a_pretrained_tag_points_to_weights():
    pytest.importorskip("timm")
    with pytest.raises(UsageError, match="'timm:resnet18' and the pretrained tag with weights a1_in1k"):
        build_model("timm:resnet18.a1_in1k", 10)


def test_timm_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    with pytest.raises(UsageError, match=r"pip install 'prunekit\[timm\]'"):
        build_model("timm:resnet18", 10)
