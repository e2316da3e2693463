"""Small and odd datasets, as a new user brings them: the size a folder is read at, resumed runs that are
asked for other settings, MACs targets read by other counters, slower stages named, one accuracy per model."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import run_cli, write_image
from prunekit import api
from prunekit.cli import EXIT_USAGE
from prunekit.data import load_data

TRAIN = ["--no-bf16", "--device", "cpu", "--batch-size", "8", "--optimizer", "adam", "--lr", "0.001"]


def said(capsys, *argv) -> tuple[int, str]:
    """(exit code, what the user saw: stdout and stderr in one text)."""
    code, out, err = run_cli(capsys, *argv)
    return code, out + err


def squash(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def error_line(text: str) -> str:
    lines = [line for line in squash(text.replace("\n", "\x00")).split("\x00") if line.startswith("error:")]
    assert len(lines) == 1, text
    return lines[0]


def write_sized(path: Path, width: int, height: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def folder(root: Path, per_class: dict[str, int], test_per_class: int | None = 2, size=32) -> Path:
    """train/<class>/ with ``per_class[class]`` images (and test/ unless None); ``size`` is a side or a
    function of the image's index giving (width, height)."""
    seed = 0
    splits = [("train", per_class)]
    if test_per_class is not None:
        splits.append(("test", dict.fromkeys(per_class, test_per_class)))
    for split, counts in splits:
        for cls, n in counts.items():
            for i in range(n):
                seed += 1
                w, h = size(seed) if callable(size) else (size, size)
                write_sized(root / split / cls / f"{i:04d}.png", w, h, seed)
    return root


# ---------------------------------------------------------------- the size a folder is read at


def test_one_odd_image_does_not_decide_the_size_of_the_folder(tmp_path, capsys):
    """32-px images with one 8x8 thumbnail sorted first: held at 32 px, the thumbnail resized and named."""
    root = folder(tmp_path / "odd", {"cat": 12, "dog": 12, "frog": 12})
    odd = root / "train" / "cat" / "0000.png"
    write_image(odd, size=8, seed=7)
    bundle = load_data(str(root))
    assert bundle.image_size == 32 and bundle.mode == "memory"
    assert tuple(bundle.train.images.shape[1:]) == (3, 32, 32) and len(bundle.train) == 36
    warning = squash(capsys.readouterr().err)
    assert "41 of 42 images are 32x32" in warning and "0000.png" in warning

    code, out = said(capsys, "train", "--data", root, "--epochs", "1", *TRAIN, "--out", tmp_path / "run")
    assert code == 0, out
    assert "trained at 32 px" in squash(out)


def test_a_folder_too_small_for_the_model_says_what_it_holds(tmp_path, capsys):
    root = folder(tmp_path / "tiny", {"cat": 3, "dog": 3}, size=8)
    code, out = said(capsys, "train", "--data", root, "--epochs", "1", *TRAIN, "--out", tmp_path / "r")
    assert code == EXIT_USAGE
    line = error_line(out)
    assert "read at 8 px" in line and "--image-size 32" in line


# ---------------------------------------------------------------- folder shapes, trained end to end


def _aspect(seed: int) -> tuple[int, int]:
    rng = np.random.default_rng(seed)
    return int(rng.integers(32, 64)), int(rng.integers(32, 64))


SHAPES = {
    "one split, --val-split": (
        dict(per_class={"a": 6, "b": 6, "c": 6}, test_per_class=None),
        ["--val-split", "0.2"],
    ),
    "five images a class": (dict(per_class={"a": 5, "b": 5, "c": 5}), []),
    "one class much larger": (dict(per_class={"big": 40, "b": 4, "c": 4}), []),
    "many sizes and aspect ratios": (dict(per_class={"a": 6, "b": 6}, size=_aspect), []),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_folder_shapes_train_end_to_end_and_say_what_was_chosen(shape, tmp_path, capsys):
    layout, flags = SHAPES[shape]
    root = folder(tmp_path / "data", **layout)
    argv = ["train", "--data", root, "--epochs", "1", *TRAIN, *flags, "--out", tmp_path / "run"]
    code, out = said(capsys, *argv)
    assert code == 0, out
    text = squash(out)
    match = re.search(
        r"data: (\d+) training images in (\d+) classes .*?(\d+) test images .*?trained at (\d+) px", text
    )
    assert match, text
    assert text.index("data:") < text.index("epoch 1")  # said before training starts
    train_n, classes, test_n, size = map(int, match.groups())
    assert train_n + test_n == sum(layout["per_class"].values()) + (
        0 if layout.get("test_per_class", 2) is None else 2 * len(layout["per_class"])
    )
    assert classes == len(layout["per_class"])
    if "--val-split" in flags:
        assert "held out from train by --val-split 0.2" in text and test_n == 3
    if shape == "many sizes and aspect ratios":
        assert 32 <= size < 64 and "streamed from disk" in text  # the images' own scale, not 224
    else:
        assert size == 32


# ---------------------------------------------------------------- resumed runs asked for other settings


@pytest.fixture
def finished_run(tmp_path, capsys) -> Path:
    out = tmp_path / "run"
    code, text = said(
        capsys, "train", "--data", "synthetic", "--subset", "4", "--epochs", "1", *TRAIN, "--out", out
    )
    assert code == 0, text
    return out


def test_resume_with_other_epochs_is_refused_naming_the_flag(finished_run, capsys):
    before = (finished_run / "model.safetensors").read_bytes()
    code, out = said(capsys, "train", "--resume", "--epochs", "4", "--lr", "0.001", "--out", finished_run)
    assert code == EXIT_USAGE
    line = error_line(out)
    assert "--epochs 4 (recorded: 1)" in line and "--overwrite" in line
    assert "--lr" not in line  # asked for what the run recorded: not a change
    assert (finished_run / "model.safetensors").read_bytes() == before


def test_resume_as_recorded_says_the_run_is_finished(finished_run, capsys):
    code, out = said(capsys, "train", "--resume", "--epochs", "1", "--out", finished_run)
    assert code == 0, out
    assert "has finished its 1 epochs" in squash(out)


def test_finetune_resume_with_other_settings_is_refused(finished_run, tmp_path, capsys):
    ckpt = finished_run / "model.safetensors"
    ft = tmp_path / "ft"
    args = ["finetune", ckpt, "--epochs", "1", "--recipe", "full", "--device", "cpu", "--out", ft]
    code, out = said(capsys, *args)
    assert code == 0, out
    code, out = said(capsys, "finetune", ckpt, "--resume", "--epochs", "3", "--freeze", "blog", "--out", ft)
    assert code == EXIT_USAGE
    line = error_line(out)
    assert "--epochs 3 (recorded: 1)" in line and "--freeze blog (recorded: none)" in line
    code, out = said(capsys, "finetune", ckpt, "--resume", "--recipe", "full", "--out", ft)
    assert code == 0, out  # the recorded settings, asked again, continue


def test_run_resume_with_other_settings_is_refused(tmp_path, capsys):
    from dataclasses import asdict

    from prunekit.pipeline import CONFIG_FILE, RunConfig

    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(asdict(RunConfig(epochs=2, data="synthetic"))))
    code, out = said(capsys, "run", "--resume", run_dir, "--epochs", "5")
    assert code == EXIT_USAGE
    line = error_line(out)
    assert "--epochs 5 (recorded: 2)" in line and "--name" in line
    assert sorted(p.name for p in run_dir.iterdir()) == [CONFIG_FILE]  # nothing ran


def test_python_resume_with_another_config_is_refused(finished_run):
    from prunekit.errors import UsageError
    from prunekit.train import TrainConfig

    with pytest.raises(UsageError, match=r"epochs 3 \(recorded: 1\)"):
        api.train(
            None, None, finished_run, TrainConfig(epochs=3, batch_size=8, optimizer="adam"), resume=True
        )


# ---------------------------------------------------------------- MACs by the counters users check with


@pytest.mark.parametrize(
    "name, target, seed, allocation",
    [("resnet18", 0.5, 0, "global"), ("resnet18", 0.3, 1, "global"), ("mobilenet_v2", 0.5, 1, "global"),
     # depthwise nets pruned hard: Torch-Pruning's counter (BatchNorm, activations over every element) read
     # 1.052-1.056x the target before plans were tilted towards the channels that carry that work
     ("mobilenet_v2", 0.3, 0, "global"), ("mobilenet_v2", 0.3, 1, "global"), ("mobilenet_v2", 0.3, 2, "global"),
     ("mobilenet_v2", 0.3, 0, "uniform")],
)  # fmt: skip
def test_a_macs_target_holds_by_torchinfo_and_torch_pruning(name, target, seed, allocation):
    tp = pytest.importorskip("torch_pruning")
    from torchinfo import summary

    from prunekit.importance import make_importance
    from prunekit.models import build_model
    from prunekit.pruning import PruneRequest, prune_model

    torch.manual_seed(seed)
    dense = build_model(name, 10).eval()
    example = torch.zeros(1, 3, 32, 32)
    pruned = build_model(name, 10).eval()
    pruned.load_state_dict(dense.state_dict())
    request = PruneRequest(target_macs=target, allocation=allocation)
    prune_model(pruned, request, make_importance("l1"), example)

    def mult_adds(m):
        return summary(m, input_data=example, verbose=0).total_mult_adds

    by_torchinfo = mult_adds(pruned) / mult_adds(dense)
    assert abs(by_torchinfo - target) <= 0.02 * target, by_torchinfo
    ops = tp.utils.count_ops_and_params(pruned, example)[0] / tp.utils.count_ops_and_params(dense, example)[0]
    assert abs(ops - target) <= 0.03 * target, ops


def test_a_conv_other_counters_cannot_see_does_not_block_a_target():
    """A Conv2d subclass with its own forward (EfficientNet-Lite's static 'same' padding): torchinfo and
    Torch-Pruning count none of its MACs, so their ratios say nothing and must not refuse the plan."""
    import torch.nn.functional as F
    from torch import nn

    from prunekit.importance import make_importance
    from prunekit.measure import count_macs, macs_by_counters
    from prunekit.pruning import PruneRequest, prune_model

    class PaddedConv(nn.Conv2d):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.static_padding = nn.ZeroPad2d(1)

        def forward(self, x):
            x = self.static_padding(x)
            return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    torch.manual_seed(0)
    layers = [PaddedConv(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), PaddedConv(32, 64, 3), nn.BatchNorm2d(64)]
    model = nn.Sequential(*layers, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
    example = torch.zeros(1, 3, 32, 32)
    dense = macs_by_counters(model, example)
    assert all(dense[n] < dense["prunekit"] / 10 for n in dense if n != "prunekit"), dense  # blind to them
    prune_model(model, PruneRequest(target_macs=0.5), make_importance("l1"), example)
    assert abs(count_macs(model, example) / dense["prunekit"] - 0.5) <= 0.02 * 0.5


def test_the_elementwise_price_is_what_torch_pruning_counts():
    """The planner's estimate of Torch-Pruning's count, on a dense and a pruned MobileNetV2, within 0.5 %."""
    tp = pytest.importorskip("torch_pruning")
    from prunekit.groups import collect_groups
    from prunekit.importance import make_importance
    from prunekit.models import build_model
    from prunekit.planning import LayerCosts, plan_target
    from prunekit.pruning import PruneRequest
    from prunekit.surgery import apply_checked, output_shapes

    torch.manual_seed(0)
    model, example = build_model("mobilenet_v2", 10).eval(), torch.zeros(1, 3, 32, 32)
    costs = LayerCosts(model, example)
    request = PruneRequest(target_macs=0.3)
    DG, groups = collect_groups(model, example, make_importance("l1"), request)
    plan = plan_target(groups, costs, 0.3, "macs", 1)
    dense_price, pruned_price = (costs.priced_with_elementwise(groups, p) for p in ({}, plan))
    dense_ops = tp.utils.count_ops_and_params(model, example)[0]
    with torch.no_grad():
        expected = output_shapes(model(example))
    apply_checked(model, DG, groups, plan, example, expected, torch.randn(example.shape), "pruned")
    pruned_ops = tp.utils.count_ops_and_params(model, example)[0]
    assert dense_price == pytest.approx(dense_ops, rel=0.005)
    assert pruned_price == pytest.approx(pruned_ops, rel=0.005)


# ---------------------------------------------------------------- a slower stage is named


def _stage(name: str, ort1: float, ort64: float, torch1: float) -> dict:
    ms = lambda v: {"median_ms": v}
    return {
        "stage": name,
        "accuracy": 0.8,
        "latency": {"ort": {"batch1": ms(ort1), "batch64": ms(ort64)}, "torch": {"batch1": ms(torch1)}},
    }


def test_a_stage_slower_than_dense_is_named_once_with_the_remedy():
    from prunekit.report import slower_stages

    dense = _stage("dense fp32", 0.65, 19.8, 5.0)
    pruned = _stage("pruned fp32 (before fine-tuning)", 0.71, 22.4, 3.0)
    tuned = {**pruned, "stage": "pruned + fine-tuned fp32"}  # the same network, timed once
    lines = slower_stages([dense, pruned, tuned])
    assert len(lines) == 2, lines
    assert all(
        line.startswith("pruned + fine-tuned fp32 is slower than dense fp32 in ONNX Runtime")
        for line in lines
    )
    assert "batch 1 (0.71 against 0.65 ms)" in lines[0] and "batch 64 (22.40 against 19.80 ms)" in lines[1]
    assert all("--round-to" in line and "--target-latency" in line for line in lines)
    assert slower_stages([dense, _stage("pruned", 0.5, 10.0, 4.0)]) == []


# ---------------------------------------------------------------- one model, one accuracy


def test_the_training_log_and_every_later_command_read_the_same_accuracy(tmp_path, monkeypatch):
    """bf16 training (forced on here): every test figure is still evaluated in fp32, as later commands do."""
    import prunekit.train as train_mod
    from prunekit.train import TrainConfig

    monkeypatch.setattr(train_mod, "bf16_supported", lambda: True)
    seen = []
    real = train_mod.evaluate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("bf16", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "evaluate", spy)
    out = tmp_path / "run"
    cfg = TrainConfig(epochs=1, batch_size=8, optimizer="adam", lr=0.001, bf16=True, device="cpu")
    result = api.train("resnet18", "synthetic", out, cfg, subset=4)
    assert seen and not any(seen), seen
    logged = result.history[-1]["test_accuracy"]
    assert logged == result.test["accuracy"]
    assert api.evaluate_checkpoint(out / "model.safetensors", measure_latency=False)["accuracy"] == logged
