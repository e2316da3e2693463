"""The benchmarks' switches of prunekit's module settings hold only inside their block, an error included;
every benchmark script compiles."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from common import min_keep, residual_sums, scan_budget  # noqa: E402
from prunekit import planning, reconstruct, sensitivity  # noqa: E402


def test_scan_budget_is_set_inside_and_restored_after_an_error():
    before = sensitivity.SCAN_SECONDS
    with pytest.raises(RuntimeError), scan_budget(before * 2):
        assert before * 2 == sensitivity.SCAN_SECONDS
        raise RuntimeError("a row failed")
    assert before == sensitivity.SCAN_SECONDS


def test_residual_sums_restore_the_setting_they_found():
    before = reconstruct.SHORTCUTS
    try:
        reconstruct.SHORTCUTS = False  # not the default: a switch that forced it back on would show
        with residual_sums(True):
            assert reconstruct.SHORTCUTS is True
        assert reconstruct.SHORTCUTS is False
    finally:
        reconstruct.SHORTCUTS = before


def test_min_keep_holds_inside_only_and_none_leaves_the_default():
    before = planning.MIN_KEEP_FRACTION
    with min_keep(0.25):
        assert planning.MIN_KEEP_FRACTION == 0.25
    with min_keep(None):
        assert before == planning.MIN_KEEP_FRACTION
    assert before == planning.MIN_KEEP_FRACTION


@pytest.mark.parametrize("script", sorted((REPO_ROOT / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_every_benchmark_script_compiles(script, tmp_path):
    """Benchmarks run for hours and no test runs them: at least each one compiles (a misplaced ``global``
    in fewshot.py once broke it with a SyntaxError that nothing else caught)."""
    import py_compile

    py_compile.compile(str(script), cfile=str(tmp_path / "script.pyc"), doraise=True)


def test_dead_taps_are_trimmed_exactly_and_only_where_they_read_padding_alone():
    """depth.py's ``dead-taps``: at 32 px the ResNet-18's layer4 convs lose the taps that read only zero
    padding, its outputs stay the same and its MACs fall by 19 %; at 224 px no tap is dead."""
    import copy

    import torch
    import torchvision

    from depth import live_taps, trim_dead_taps
    from prunekit.measure import count_macs

    assert live_taps(1, 3, 1, 1, 1) == range(1, 2) and live_taps(2, 3, 2, 1, 1) == range(1, 3)
    assert live_taps(2, 3, 1, 1, 1) == range(0, 3)  # layer3's 2x2 maps: every tap reads an image position
    model = torchvision.models.resnet18(num_classes=10).eval()
    dense = copy.deepcopy(model)
    kernels = trim_dead_taps(model, 32)
    assert kernels == {
        "layer4.0.conv1": [2, 2],
        "layer4.0.conv2": [1, 1],
        "layer4.1.conv1": [1, 1],
        "layer4.1.conv2": [1, 1],
    }
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), dense(x), atol=1e-5)
    assert count_macs(model, 32) / count_macs(dense, 32) == pytest.approx(0.812, abs=0.001)
    assert trim_dead_taps(torchvision.models.resnet18(num_classes=10).eval(), 224) == {}
