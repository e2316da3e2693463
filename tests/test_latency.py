"""Latency targets: the per-layer table (measured, cached, round-tripped), fast channel counts, planning to a
measured budget, and the refusal of a budget the model cannot reach."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import prunekit
from prunekit import api, latency_plan, latency_table
from prunekit.cli import EXIT_USAGE, main
from prunekit.latency_table import LatencyTable, LayerTimer, build_table, layer_specs, table_path
from prunekit.pipeline import RunConfig
from test_core import assert_unchanged, fingerprint


class ConvNet(nn.Module):
    """Three 3x3 convs at full resolution and a head: time goes where the channels are."""

    def __init__(self, width: int = 48):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(32)
        self.conv1 = nn.Conv2d(32, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


def convnet(width: int = 48) -> ConvNet:
    torch.manual_seed(0)
    model = ConvNet(width)
    for m in model.modules():  # varied BatchNorm scales, so importance differs between channels
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.2, 2.0)
    return model.eval()


X = torch.randn(1, 3, 16, 16)


def blocky_ms(spec: latency_table.LayerSpec) -> float:
    """A device whose kernels work on blocks of 8 channels: 41-48 channels cost what 48 cost."""
    block = lambda c: math.ceil(c / 8) * 8
    pixels = spec.output_hw[0] * spec.output_hw[1]
    return (
        1e-6 * block(spec.in_channels) * block(spec.out_channels) * spec.kernel[0] * spec.kernel[1] * pixels
    )


@pytest.fixture
def blocky_device(monkeypatch):
    """Layer and whole-model timings of the blocky device: deterministic, so the planning logic is tested
    apart from timing noise. The whole model costs its layers plus a fixed 10 % the layers do not explain."""
    monkeypatch.setattr(LayerTimer, "__call__", lambda self, spec, **kw: blocky_ms(spec))

    def time_models(models, example, batch, runtime, threads, repeats=30):
        return [sum(blocky_ms(s) for s in layer_specs(m, example).values()) * 1.1 for m in models]

    monkeypatch.setattr(latency_plan, "time_models", time_models)


def test_table_round_trip_cache_and_damaged_cache(monkeypatch):
    specs = list(layer_specs(convnet(), X).values())
    needed = [(s, "full", 1) for s in specs] + [(specs[1], "out", 1), (specs[2], "in", 1)]
    table = build_table(needed, "pytorch", 4, 1, progress=False)
    path = table_path(table.device, 4, needed)
    assert path.exists()
    loaded = LatencyTable.load(path)
    assert loaded == table
    assert sorted(table.entries[specs[1].key]["out"]) == list(range(1, 49))  # every count of 48 channels
    assert all(v > 0 for v in table.entries[specs[1].key]["out"].values())

    def no_timing(self, spec, **kw):
        raise AssertionError("a cached table was measured again")

    real_timer = LayerTimer.__call__
    monkeypatch.setattr(LayerTimer, "__call__", no_timing)
    assert build_table(needed, "pytorch", 4, 1, progress=False) == table  # from the cache
    assert table_path(table.device, 8, needed) != path  # another batch size is another table
    monkeypatch.setattr(LayerTimer, "__call__", real_timer)
    path.write_text("{not json")
    again = build_table(needed, "pytorch", 4, 1, progress=False)  # a damaged entry is measured again
    assert again.entries.keys() == table.entries.keys()
    assert LatencyTable.load(path).entries.keys() == table.entries.keys()


def test_onnxruntime_table_times_layers_in_onnxruntime():
    specs = list(layer_specs(convnet(), X).values())
    table = build_table([(specs[1], "out", 8)], "onnxruntime", 2, 1, progress=False)
    assert table.device["runtime"] == "onnxruntime"
    assert sorted(table.entries[specs[1].key]["out"]) == [8, 16, 24, 32, 40, 48]


def test_fast_counts_are_the_measured_fast_ones(blocky_device):
    model = convnet()
    from prunekit.groups import collect_groups
    from prunekit.importance import make_importance
    from prunekit.pruning import PruneRequest

    _, groups = collect_groups(model, X, make_importance("l2", 0), PruneRequest(target_latency=0.5))
    planner = latency_plan.LatencyPlanner(model, X, groups, "pytorch", 4, 1, progress=False)
    # On the blocky device 41..47 channels cost what 48 cost, so only multiples of 8 are fast.
    assert planner.fast["conv1"] == [8, 16, 24, 32, 40, 48]
    assert planner.fast["conv2"] == [8, 16, 24, 32]


def test_latency_target_lands_on_fast_counts_and_within_five_percent(blocky_device):
    model = convnet()
    # l2 scores: on this two-group model, whole-group scores step over every fast plan within 5 %
    report = prunekit.prune(model, X, target_latency=0.5, latency_batch=4, importance="l2")
    assert report.latency["measured"] == pytest.approx(0.5, rel=0.05)
    assert report.latency["runtime"] == "pytorch" and report.latency["batch"] == 4
    assert model.conv1.out_channels % 8 == 0 and model.conv2.out_channels % 8 == 0
    assert model(X).shape == (1, 10)
    assert "latency" in str(report)


def test_latency_target_with_each_allocation(blocky_device):
    for allocation in ("global", "uniform"):
        model = convnet()
        report = prunekit.prune(model, X, target_latency=0.6, latency_batch=4, allocation=allocation)
        assert report.latency["measured"] == pytest.approx(0.6, rel=0.05), allocation
    uniform = convnet()
    prunekit.prune(uniform, X, target_latency=0.6, latency_batch=4, allocation="uniform")
    # one ratio, snapped up to fast counts: both groups keep close to the same fraction
    assert abs(uniform.conv1.out_channels / 48 - uniform.conv2.out_channels / 32) <= 8 / 32


def test_unreachable_latency_target_is_refused_and_the_model_untouched(blocky_device):
    model = convnet()
    before = fingerprint(model)
    with pytest.raises(
        api.UsageError, match=r"^target_latency 0\.05 cannot be reached in pytorch at batch 4"
    ):
        prunekit.prune(model, X, target_latency=0.05, latency_batch=4)
    assert_unchanged(model, before)


def test_a_target_the_measurement_keeps_missing_undoes_everything(monkeypatch, blocky_device):
    """When the timed model never lands within 5 % of the target, the model is restored and the error says so."""
    monkeypatch.setattr(latency_plan, "time_models", lambda models, *a, **kw: [10.0, 9.9])  # never faster
    model = convnet()
    before = fingerprint(model)
    with pytest.raises(api.UsageError, match="the closest measured were 0.990 of the dense latency"):
        prunekit.prune(model, X, target_latency=0.5, latency_batch=4)
    assert_unchanged(model, before)


class VGGish(nn.Module):
    """Five 3x3 conv blocks, two at a lower resolution: enough groups for many distinct latencies."""

    def __init__(self):
        super().__init__()
        widths = [3, 32, 64, 64, 96, 96]
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, 3, stride=2 if i == 3 else 1, padding=1, bias=False)
            for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False))
        )
        self.bns = nn.ModuleList(nn.BatchNorm2d(b) for b in widths[1:])
        self.head = nn.Linear(widths[-1], 10)

    def forward(self, x):
        for conv, bn in zip(self.convs, self.bns, strict=True):
            x = F.relu(bn(conv(x)))
        return self.head(x.mean(dim=(2, 3)))


def vggish() -> VGGish:
    torch.manual_seed(0)
    model = VGGish()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.2, 2.0)
    return model.eval()


@pytest.mark.slow
@pytest.mark.timing
@pytest.mark.parametrize("runtime", ["pytorch", "onnxruntime"])
def test_latency_target_on_real_timings(runtime):
    """Measured for real on this machine: the pruned model is timed again, apart from prunekit's check."""
    model, dense = vggish(), vggish()
    x = torch.randn(1, 3, 32, 32)
    report = prunekit.prune(model, x, target_latency=0.6, latency_batch=16, latency_runtime=runtime)
    assert report.latency["measured"] == pytest.approx(0.6, rel=0.05)
    d, p = latency_plan.time_models([dense, model], x, 16, runtime, 1, repeats=40)
    assert p / d == pytest.approx(0.6, abs=0.15)


@pytest.mark.slow
def test_cli_refuses_an_unreachable_target_with_exit_2_and_writes_nothing(trained, tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    argv = [
        "prune",
        str(trained),
        "--target-latency",
        "0.01",
        "--latency-batch",
        "1",
        "--allocation",
        "global",
    ]
    code = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert err.startswith("error: --target-latency 0.01 cannot be reached") and err.count("\n") == 1
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_latency_target_writes_what_it_measured(trained, tmp_path, capsys, blocky_device):
    out = tmp_path / "p.safetensors"
    argv = [
        "prune",
        str(trained),
        "--target-latency",
        "0.5",
        "--latency-batch",
        "8",
        "--allocation",
        "global",
    ]
    argv += ["--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["latency"]["measured"] == pytest.approx(0.5, rel=0.05)
    assert report["request"]["target_latency"] == 0.5 and report["request"]["latency_batch"] == 8
    assert "of dense, target 0.5" in capsys.readouterr().err


def test_run_and_prune_mean_the_same_by_the_latency_flags():
    request = RunConfig.from_dict(
        {"target_latency": 0.5, "latency_batch": 8, "latency_runtime": "onnxruntime"}
    ).prune_request(1)
    assert (request.target_latency, request.latency_batch, request.latency_runtime) == (0.5, 8, "onnxruntime")
    assert request.layers == [] and request.ratio is None
    with pytest.raises(api.UsageError, match="latency_runtime"):
        RunConfig.from_dict({"target_latency": 0.5, "latency_runtime": "tensorrt"})


def test_slow_layers_get_fewer_candidates_so_tables_stay_affordable(monkeypatch):
    """A layer taking 300 ms (a large image at a large batch) is timed at 8 counts per side, not 64."""
    monkeypatch.setattr(
        LayerTimer, "__call__", lambda self, spec, **kw: 300.0 if spec.out_channels > 40 else 0.5
    )
    specs = list(layer_specs(convnet(), X).values())
    table = build_table([(specs[1], "out", 1), (specs[2], "out", 1)], "pytorch", 4, 1, progress=False)
    assert len(table.entries[specs[1].key]["out"]) == 8  # conv1: 48 outputs, slow
    assert len(table.entries[specs[2].key]["out"]) == 32  # conv2: 32 outputs, fast: every count
