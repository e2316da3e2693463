"""Untrusted checkpoints: every corrupted metadata field is one clean error naming the file and the field."""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from conftest import PYTHON, subprocess_env
from prunekit.checkpoint import load_checkpoint, read_meta, save_checkpoint
from prunekit.cli import EXIT_USAGE, main
from prunekit.errors import UsageError
from prunekit.models import build_model

HUGE = 10**9


def _set(key: str, value) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        meta[key] = value

    return edit


def _drop(key: str) -> Callable[[dict], None]:
    return lambda meta: meta.pop(key)


def _shape(module: str, attr: str, value) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        meta["shapes"][module][attr] = value

    return edit


# case -> (edit of the metadata, text the error must name: the field)
CORRUPTIONS: dict[str, tuple[Callable[[dict], None], str]] = {
    "model-int": (_set("model", 3), "model description"),
    "model-empty": (_set("model", ""), "'model'"),
    "num_classes-str": (_set("num_classes", "10"), "'num_classes'"),
    "num_classes-negative": (_set("num_classes", -1), "'num_classes'"),
    "num_classes-bool": (_set("num_classes", True), "'num_classes'"),
    "num_classes-float": (_set("num_classes", 2.5), "'num_classes'"),
    "num_classes-huge": (lambda m: m.update(num_classes=HUGE, classes=None), "'num_classes'"),
    "num_classes-huge-vs-classes": (_set("num_classes", HUGE), "'classes'"),
    "num_classes-missing": (_drop("num_classes"), "'num_classes'"),
    "classes-str": (_set("classes", "abc"), "'classes'"),
    "classes-ints": (_set("classes", list(range(10))), "'classes'"),
    "classes-wrong-length": (_set("classes", ["a", "b"]), "'classes'"),
    "input_size-str": (_set("input_size", "32"), "'input_size'"),
    "input_size-zero": (_set("input_size", 0), "'input_size'"),
    "input_size-huge": (_set("input_size", HUGE), "'input_size'"),
    "input_size-missing": (_drop("input_size"), "'input_size'"),
    "mean-two": (_set("mean", [0.5, 0.5]), "'mean'"),
    "mean-nan": (_set("mean", [math.nan, 0.5, 0.5]), "'mean'"),
    "mean-str": (_set("mean", "imagenet"), "'mean'"),
    "std-zero": (_set("std", [0.0, 0.2, 0.2]), "'std'"),
    "std-text": (_set("std", [0.2, 0.2, "x"]), "'std'"),
    "shapes-str": (_set("shapes", "conv1"), "'shapes'"),
    "shapes-entry-int": (_set("shapes", {"conv1": 5}), "'shapes.conv1'"),
    "shapes-value-str": (_shape("conv1", "out_channels", "64"), "'shapes.conv1.out_channels'"),
    "shapes-value-list-of-str": (_shape("bn1", "num_features", ["64"]), "'shapes.bn1.num_features[0]'"),
    "shapes-unknown-attr": (_shape("conv1", "forward", 1), "'shapes.conv1.forward'"),
    "shapes-out-channels-huge": (_shape("layer1.0.conv1", "out_channels", HUGE), "'shapes.layer1.0.conv1'"),
    "shapes-out-channels-mismatch": (_shape("conv1", "out_channels", 32), "'shapes.conv1'"),
    "shapes-in-features-mismatch": (_shape("fc", "in_features", 256), "'shapes.fc'"),
    "shapes-bn-mismatch": (_shape("bn1", "num_features", 63), "'shapes.bn1'"),
    "shapes-groups-not-dividing": (_shape("layer1.0.conv1", "groups", 3), "'shapes.layer1.0.conv1.groups'"),
    "pruning-str": (_set("pruning", "all"), "'pruning'"),
    "pruning-layer-int": (_set("pruning", [{"changed_layers": [1]}]), "'pruning[0].changed_layers[0]'"),
    "parent-str": (_set("parent", "resnet18"), "'parent'"),
    "parent-model-int": (_set("parent", {"model": 5}), "'parent.model'"),
    "optimizer-groups-str": (_set("optimizer", {"param_groups": "x"}), "'optimizer.param_groups'"),
    "optimizer-scalar-key": (
        _set("optimizer", {"param_groups": [], "scalars": {"x": 1}}),
        "'optimizer.scalars'",
    ),
    "state_versions-str": (_set("state_versions", {"bn1": "2"}), "'state_versions.bn1'"),
    "format_version-str": (_set("format_version", "1"), "'format_version'"),
    "data-subset-negative": (_set("data", {"spec": "cifar10", "subset": -5}), "'data.subset'"),
    "split-seed-str": (_set("split", {"seed": "0"}), "'split.seed'"),
    "train-config-list": (_set("train", {"config": [1]}), "'train.config'"),
}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A complete, valid dense ResNet-18 checkpoint carrying every optional field prunekit reads."""
    torch.manual_seed(0)
    meta = {
        "model": "resnet18",
        "num_classes": 10,
        "classes": [f"c{i}" for i in range(10)],
        "input_size": 32,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "pruning": [{"changed_layers": ["layer1.0.conv1"]}],
        "parent": {"model": "resnet18"},
        "data": {"spec": "synthetic", "subset": 8},
        "split": {"seed": 0},
    }
    return save_checkpoint(
        tmp_path_factory.mktemp("good") / "good.safetensors", build_model("resnet18", 10), meta
    )


def corrupted(good: Path, tmp_path: Path, edit: Callable[[dict], None]) -> Path:
    """A real safetensors file with ``good``'s tensors and edited metadata."""
    meta = read_meta(good)
    edit(meta)
    path = tmp_path / "bad.safetensors"
    save_file(load_file(str(good)), str(path), metadata={"prunekit": json.dumps(meta)})
    return path


def test_the_valid_checkpoint_loads(good):
    assert load_checkpoint(good).meta["classes"][0] == "c0"


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_field_is_one_clean_error(good, tmp_path, capsys, case):
    edit, field = CORRUPTIONS[case]
    path = corrupted(good, tmp_path, edit)
    with pytest.raises(UsageError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert str(path) in message and field in message and "\n" not in message, message
    code = main(["eval", str(path)])
    captured = capsys.readouterr()
    assert code == EXIT_USAGE, captured.err
    assert "Traceback" not in captured.out + captured.err
    assert captured.err.startswith("error:") and len(captured.err.strip().splitlines()) == 1, captured.err
    assert field in captured.err


def test_huge_recorded_channels_never_allocate(good, tmp_path, monkeypatch):
    """The shape check runs before the model is built: nothing is constructed from the absurd figure."""
    path = corrupted(good, tmp_path, _shape("layer1.0.conv1", "out_channels", HUGE))
    built = []
    monkeypatch.setattr("prunekit.checkpoint.build_model", lambda *a: built.append(a) or nn.Identity())
    with pytest.raises(UsageError, match="out_channels"):
        load_checkpoint(path)
    assert built == []


@pytest.mark.slow
def test_cli_eval_of_a_corrupted_file_in_a_fresh_process(good, tmp_path):
    path = corrupted(good, tmp_path, _set("num_classes", "ten"))
    proc = subprocess.run(
        [PYTHON, "-m", "prunekit", "eval", str(path)], capture_output=True, text=True, env=subprocess_env()
    )
    assert proc.returncode == EXIT_USAGE
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "'num_classes'" in lines[0], proc.stderr


@pytest.mark.parametrize("field", ["classes", "mean", "std", "pruning", "parent", "data", "shapes"])
def test_optional_fields_may_be_null(good, tmp_path, field):
    load_checkpoint(corrupted(good, tmp_path, _set(field, None)))
