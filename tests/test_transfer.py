"""Transfer learning end to end: `prunekit train --weights` on a folder of photos, the weights' preprocessing
recorded and reused, a train/-only folder split by --val-split, then prune and eval from the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import prunekit
from prunekit.cli import EXIT_USAGE, main
from prunekit.weights import build_with_weights


def photos(root: Path, per_class: int = 8, with_val: bool = False) -> Path:
    """Two classes of JPEGs of various sizes and aspect ratios, one dominant colour per class."""
    rng = np.random.default_rng(0)
    splits = {"train": per_class, **({"val": 3} if with_val else {})}
    for split, count in splits.items():
        for c, cls in enumerate(("cats", "dogs")):
            for i in range(count):
                w, h = int(rng.integers(90, 240)), int(rng.integers(70, 200))
                pixels = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
                pixels[..., c] += 150
                (root / split / cls).mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.jpg", quality=90)
    return root


@pytest.fixture
def weights_file(tmp_path) -> tuple[Path, dict]:
    torch.manual_seed(7)
    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    path = tmp_path / "imagenet.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.slow
def test_train_from_a_weights_file_on_a_train_only_photo_folder(tmp_path, weights_file, capsys):
    path, state = weights_file
    data = photos(tmp_path / "photos")
    out = tmp_path / "run"
    argv = ["train", "--model", "resnet18", "--data", data, "--weights", path, "--val-split", "0.25"]
    argv += ["--image-size", "64", "--epochs", "1", "--batch-size", "4", "--lr", "1e-12", "--out", out]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    model = prunekit.load(out / "model.safetensors")
    meta = model.prunekit_meta
    assert meta["weights"]["source"] == "file" and meta["weights"]["classifier_replaced"] is True
    assert meta["num_classes"] == 2 and model.fc.out_features == 2
    assert meta["split"]["val_split"] == 0.25 and meta["split"]["val_images"] == 4
    assert meta["preprocess"]["crop_size"] == 64 and meta["preprocess"]["mode"] == "stream"
    # Training started from the file's tensors: at lr 1e-12 the convolutions are still the file's.
    assert torch.allclose(model.conv1.weight, state["conv1.weight"], atol=1e-6)
    assert torch.allclose(model.layer4[1].conv2.weight, state["layer4.1.conv2.weight"], atol=1e-6)

    # Later commands rebuild the same input pipeline from the checkpoint alone.
    pruned = tmp_path / "pruned.safetensors"
    argv = ["prune", str(out / "model.safetensors"), "--target-macs", "0.5", "--allocation", "global"]
    assert main([*argv, "--out", str(pruned)]) == 0
    assert main(["eval", str(pruned), "--no-latency", "--json", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["test_images"] == 4  # the recorded held-out split, not the whole folder


@pytest.mark.slow
def test_torchvision_weight_name_brings_its_preprocessing(tmp_path, monkeypatch, capsys):
    """A weight name found in the torch hub cache: 224-px crops, ImageNet statistics, classifier replaced."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.get_model_weights("resnet18").IMAGENET1K_V1
    target = tmp_path / "torch" / "hub" / "checkpoints" / Path(weights.url).name
    target.parent.mkdir(parents=True)
    torch.manual_seed(3)
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), target)
    data = photos(tmp_path / "photos", per_class=4, with_val=True)
    out = tmp_path / "run"
    argv = ["train", "--model", "resnet18", "--data", data, "--weights", "IMAGENET1K_V1"]
    argv += ["--epochs", "1", "--batch-size", "8", "--out", out]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    meta = prunekit.load(out / "model.safetensors").prunekit_meta
    assert meta["input_size"] == 224
    assert meta["preprocess"]["resize_size"] == 256
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert meta["weights"]["name"] == "ResNet18_Weights.IMAGENET1K_V1"


def test_weights_errors_are_one_line(tmp_path, capsys):
    data = photos(tmp_path / "photos", per_class=2, with_val=True)
    bad = tmp_path / "bad.pth"
    torch.save(
        torchvision.models.resnet18(num_classes=10).state_dict() | {"extra.weight": torch.zeros(1)}, bad
    )
    for weights, message in (
        (str(bad), "unexpected"),
        ("IMAGENET1K_V9", "IMAGENET1K_V1"),
        (str(tmp_path / "missing.pth"), "missing.pth"),
    ):
        out = tmp_path / f"run-{len(message)}"
        code = main(["train", "--data", str(data), "--weights", weights, "--epochs", "1", "--out", str(out)])
        err = capsys.readouterr().err
        assert code == EXIT_USAGE and "Traceback" not in err and message in err, err
        assert len([line for line in err.splitlines() if "error:" in line]) == 1
        assert not out.exists()


def test_python_weights_argument_names_the_argument():
    with pytest.raises(prunekit.errors.UsageError, match=r"^weights|weights "):
        build_with_weights("resnet18", 10, "NOT_A_WEIGHT")


@pytest.mark.slow
def test_run_pipeline_from_weights_on_photos(tmp_path, weights_file, capsys):
    """`prunekit run` takes the same --weights / --val-split / --image-size as train, end to end."""
    path, _ = weights_file
    data = photos(tmp_path / "photos")
    argv = ["run", "--data", data, "--weights", path, "--val-split", "0.25", "--image-size", "64"]
    argv += ["--epochs", "1", "--target-macs", "0.5", "--recipe", "full", "--finetune-epochs", "1"]
    argv += ["--allocation", "global", "--importance", "group-l2"]  # refit's scores: 10 s more, untested here
    argv += ["--runs-dir", tmp_path / "runs", "--name", "photos"]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    run_dir = tmp_path / "runs" / "photos"
    meta = prunekit.load(run_dir / "finetune-1" / "model.safetensors").prunekit_meta
    assert meta["weights"]["source"] == "file" and meta["preprocess"]["crop_size"] == 64
    assert (run_dir / "report.md").is_file()
