"""The model sweep's fast subset: six diverse torchvision models through every step at 32 px."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO_ROOT, subprocess_env

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from model_sweep import STEPS, markdown, run_steps  # noqa: E402

# plain residual, depthwise + SE + hardswish, grouped convs, channel shuffle, fire modules, MBConv + SiLU
MODELS = [
    "resnet18",
    "mobilenet_v3_small",
    "regnet_x_400mf",
    "shufflenet_v2_x0_5",
    "squeezenet1_0",
    "efficientnet_b0",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_model_trains_prunes_reloads_and_exports(name):
    row: dict = {"model": name}
    run_steps(name, row, lambda: None, timeout=120, env=subprocess_env())
    assert {s: row.get(s) for s in STEPS} == dict.fromkeys(STEPS, "ok"), row
    assert row["input_size"] == 32
    assert abs(row["macs_ratio"] - 0.5) <= 0.02 * 0.5
    assert row["onnx_rel_diff"] < 1e-3
    if name == "regnet_x_400mf":
        assert row["grouped_pruned"] == "22/22"  # every grouped conv lost channels


def test_markdown_table_reports_reasons():
    rows = {
        "a": {"model": "a", "input_size": 32, **dict.fromkeys(STEPS, "ok"), "macs_ratio": 0.5, "seconds": 1},
        "b": {"model": "b", "input_size": 224, "build": "ok", "train": "ok", "prune": "UsageError: x | y"},
    }
    table = markdown({"rows": rows})
    assert "| a | 32 | ok | ok (0.500) |  | ok | ok |  | 1 |" in table
    assert "prune: UsageError: x \\| y" in table and "prune 1/2" in table
