"""Running from a cached cut: the same output as the whole model, invalid cuts refused, a scan unchanged."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torchvision

from prunekit import scan_budget, sensitivity
from prunekit.finetuning import recalibrate_batchnorm
from prunekit.prefix import candidate_cuts, capture, running_from, trace_calls, verified


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    recalibrate_batchnorm(model, [torch.randn(32, 3, 32, 32)])  # statistics that match the images
    return model.eval()


def test_running_from_a_verified_cut_reproduces_the_model(resnet):
    x = torch.randn(4, 3, 32, 32)
    calls = trace_calls(resnet, x[:1])
    skipped = verified(resnet, calls, "layer2", x)
    assert skipped is not None and {"conv1", "bn1", "relu", "maxpool", "layer1"} <= set(skipped)
    with torch.no_grad():
        want = resnet(x)
        value = capture(resnet, "layer2", x)
        with running_from(resnet, "layer2", skipped) as holder:
            holder.value = value
            got = resnet(torch.zeros_like(x))  # the input no longer matters: the prefix is skipped
        assert torch.allclose(got, want, atol=1e-5)
        assert torch.equal(resnet(x), want)  # the patches are gone afterwards


def test_cuts_inside_a_residual_block_are_refused(resnet):
    x = torch.randn(2, 3, 32, 32)
    calls = trace_calls(resnet, x[:1])
    # inside layer2.0 the skip connection still needs the block's input: not a cut
    assert verified(resnet, calls, "layer2.0.downsample.1", x) is None
    assert verified(resnet, calls, "layer1.0.bn2", x) is None  # so is a layer inside the block
    first = calls["layer2.1.conv1"].start
    assert candidate_cuts(resnet, calls, first)[0] == "layer2.0"


class LoopedBlocks(torch.nn.Module):
    """Blocks in a ModuleList that the forward loops over with an extra argument (as EfficientNet's port
    does), the last one's output read by a head."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = torch.nn.ModuleList(torch.nn.Conv2d(8, 8, 3, padding=1) for _ in range(3))
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(block(x)) * 1.0
        return self.head(x.mean((2, 3)))


def test_blocks_a_forward_loops_over_are_cuts():
    torch.manual_seed(0)
    model, x = LoopedBlocks().eval(), torch.randn(2, 3, 8, 8)
    calls = trace_calls(model, x[:1])
    assert candidate_cuts(model, calls, calls["blocks.2"].start)[:2] == ["blocks.1", "blocks.0"]
    skipped = verified(model, calls, "blocks.1", x)
    assert skipped == ["stem", "blocks.0"]
    with torch.no_grad():
        want, value = model(x), capture(model, "blocks.1", x)
        with running_from(model, "blocks.1", skipped) as holder:
            holder.value = value
            torch.testing.assert_close(model(torch.zeros_like(x)), want)


@pytest.mark.slow
def test_a_scan_from_cached_cuts_matches_one_that_runs_the_whole_model(resnet, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    held_out = [(torch.randn(40, 3, 32, 32, generator=gen), torch.randint(0, 10, (40,), generator=gen))]
    calibration = [torch.randn(32, 3, 32, 32, generator=gen)]
    resnet = copy.deepcopy(resnet)
    recalibrate_batchnorm(resnet, calibration)  # so re-estimating the layers before a cut changes nothing
    resnet.eval()
    example = torch.zeros(1, 3, 32, 32)
    real, cuts = sensitivity.cut_for, []
    monkeypatch.setattr(sensitivity, "cut_for", lambda *a: cuts.append(real(*a)) or cuts[-1])
    cached = sensitivity.scan(resnet, example, held_out, calibration, ratios=(0.3, 0.7))
    assert sum(c is not None for c in cuts) == len(cuts) == 11  # every group's tries ran from a cut
    monkeypatch.setattr(sensitivity, "cut_for", lambda *a, **k: None)
    whole = sensitivity.scan(resnet, example, held_out, calibration, ratios=(0.3, 0.7))
    assert cached["groups"].keys() == whole["groups"].keys()
    for root, row in cached["groups"].items():
        other = whole["groups"][root]
        assert row["macs_saved"] == other["macs_saved"]
        # the same tries, up to rounding (bf16 where the CPU has it)
        assert row["kl"] == pytest.approx(other["kl"], abs=0.01)


@pytest.mark.slow
def test_a_time_budget_shrinks_the_images_but_not_below_the_floor(resnet):
    gen = torch.Generator().manual_seed(2)
    held_out = [(torch.randn(100, 3, 32, 32, generator=gen), torch.randint(0, 10, (100,), generator=gen))] * 3
    calibration = [torch.randn(100, 3, 32, 32, generator=gen)] * 2
    result = sensitivity.scan(resnet, torch.zeros(1, 3, 32, 32), held_out, calibration, (0.5,), seconds=0.01)
    assert result["held_out_images"] == result["calibration_images"] == scan_budget.MIN_SCAN_IMAGES == 32
    full = sensitivity.scan(resnet, torch.zeros(1, 3, 32, 32), held_out, calibration, (0.5,))
    assert (full["held_out_images"], full["calibration_images"]) == (300, 200)


@pytest.mark.slow
def test_over_budget_the_default_grid_coarsens_first(resnet):
    held_out = [(torch.randn(40, 3, 32, 32), torch.randint(0, 10, (40,)))]
    calibration = [torch.randn(40, 3, 32, 32)]
    result = sensitivity.scan(resnet, torch.zeros(1, 3, 32, 32), held_out, calibration, seconds=0.01)
    assert result["ratios"] == list(sensitivity.RATIOS[::2]) == [0.1, 0.5, 0.9]
    assert all(len(row["kl"]) == 3 for row in result["groups"].values())


class _SlowStem(torch.nn.Module):
    """A layer without MACs that takes most of a pass's time (as a 224-px network's memory-bound stem)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.05)
        return x


def test_a_groups_suffix_is_its_share_of_the_measured_time_not_of_the_macs():
    """The scan's estimate counts a try's pass from its cut by the time the layers after the cut take: here
    nearly all MACs come after the slow stem, nearly no time."""
    nn = torch.nn
    model = nn.Sequential(
        _SlowStem(), nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()  # fmt: skip
    example = torch.zeros(1, 3, 16, 16)
    groups = sensitivity.prunable_groups(model, example, prune_input_conv=True)
    assert len(groups) == 2
    cost = scan_budget.timed_pass(model, [(torch.randn(32, 3, 16, 16), torch.zeros(32))], groups)
    assert all(0 <= s < 0.2 for s in cost.suffix), cost.suffix
    assert cost.prefixes > 1.6  # two distinct cuts, each after the stem


@pytest.mark.timing
def test_a_scans_estimate_is_close_to_the_time_it_takes(resnet):
    """What the scan prints before it starts (``estimated_seconds``, the timing included) is within a third
    of the time it takes, tries recovered as by default (a quiet machine: CI runs timing tests alone)."""
    gen = torch.Generator().manual_seed(3)
    held_out = [(torch.randn(100, 3, 32, 32, generator=gen), torch.randint(0, 10, (100,), generator=gen))] * 2
    calibration = [torch.randn(100, 3, 32, 32, generator=gen)] * 2
    result = sensitivity.scan(resnet, torch.zeros(1, 3, 32, 32), held_out, calibration, recover=True)
    assert 0.67 < result["estimated_seconds"] / result["seconds"] < 1.5, result["seconds"]
