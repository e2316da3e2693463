"""Grouped convolutions (ResNeXt, RegNet) are pruned group-consistently, priced exactly, and reload."""

from __future__ import annotations

import subprocess

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

import prunekit
from conftest import PYTHON, subprocess_env
from prunekit.checkpoint import save_checkpoint
from prunekit.errors import UsageError
from prunekit.groups import collect_groups
from prunekit.importance import make_importance
from prunekit.measure import count_macs, count_params
from prunekit.models import build_model
from prunekit.planning import LayerCosts, plan_target
from prunekit.pruning import PruneRequest


class GroupedNet(nn.Module):
    """A ResNeXt-like block: 1x1 conv, a 3x3 conv with 4 groups, a 1x1 conv, then a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Sequential(nn.Conv2d(16, 96, 1), nn.BatchNorm2d(96), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(96, 128, 3, padding=1, groups=4), nn.BatchNorm2d(128), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(128, 64, 1), nn.BatchNorm2d(64), nn.ReLU())
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.c(self.b(self.a(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def grouped_convs(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    return {
        n: (m.in_channels, m.out_channels, m.groups)
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels
    }


def test_custom_grouped_conv_loses_whole_units_and_the_price_is_exact():
    torch.manual_seed(0)
    model, example = GroupedNet().eval(), torch.randn(1, 3, 16, 16)
    macs, params = count_macs(model, example), count_params(model)
    costs = LayerCosts(model, example)
    _, groups = collect_groups(model, example, make_importance("l2", 0), PruneRequest(target_macs=0.5))
    grouped = [g for g in groups if g.units is not None]
    assert {g.root for g in grouped} == {"a.0", "b.0"}  # both sides of the grouped conv are prunable
    plan = plan_target(groups, costs, 0.5, "macs", 1)
    predicted = costs.priced(groups, plan)
    report = prunekit.prune(model, example, target_macs=0.5, importance="l2")  # the scores priced above
    in_ch, out_ch, g = grouped_convs(model)["b.0"]
    assert g == 4 and in_ch < 96 and out_ch < 128 and in_ch % 4 == 0 and out_ch % 4 == 0
    assert model.b[0].weight.shape == (out_ch, in_ch // 4, 3, 3)
    assert abs(report.macs_ratio - 0.5) <= 0.02 * 0.5
    assert predicted == (pytest.approx(count_macs(model, example)), pytest.approx(count_params(model)))
    assert report.macs_before == macs and report.params_before == params


@pytest.mark.slow
@pytest.mark.parametrize("name", ["regnet_x_400mf", "regnet_y_400mf"])
def test_regnet_grouped_layers_pruned_and_reload_in_a_fresh_process(tmp_path, name):
    torch.manual_seed(0)
    model = build_model(name, 10).eval()
    before = grouped_convs(model)
    report = prunekit.prune(model, torch.randn(1, 3, 32, 32), target_macs=0.5)
    after = grouped_convs(model)
    assert abs(report.macs_ratio - 0.5) <= 0.02 * 0.5
    shrunk = [n for n in before if after[n][:2] != before[n][:2]]
    assert len(shrunk) >= len(before) // 2, shrunk  # the grouped layers are really pruned
    for n, (in_ch, out_ch, groups) in after.items():
        assert groups == before[n][2] and in_ch % groups == 0 and out_ch % groups == 0
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    path = save_checkpoint(
        tmp_path / "m.safetensors", model, {"model": name, "num_classes": 10, "input_size": 32}
    )
    torch.save({"x": x, "y": expected}, tmp_path / "io.pt")
    code = (
        "import sys, torch; from prunekit.checkpoint import load_checkpoint;"
        f"io = torch.load({str(tmp_path / 'io.pt')!r});"
        f"m = load_checkpoint({str(path)!r}).model;"
        "sys.exit(0 if torch.equal(m(io['x']), io['y']) else 3)"
    )
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_torch_pruning_failure_is_one_line_naming_model_and_layer(monkeypatch):
    torch.manual_seed(0)
    model = build_model("resnet18", 10).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def broken(self, *args, **kwargs):
        raise ZeroDivisionError("integer division or modulo by zero")

    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", broken)
    with pytest.raises(UsageError) as err:
        prunekit.prune(model, torch.randn(1, 3, 32, 32), target_macs=0.5)
    message = str(err.value)
    assert "ResNet" in message and "at layer layer" in message and "ZeroDivisionError" in message
    assert "\n" not in message
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
