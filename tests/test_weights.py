"""Pretrained weights, all offline: torchvision names read from a local torch hub cache, timm tags read from
a local Hugging Face cache, and state-dict files; every file is made here from a seeded model."""

from __future__ import annotations

import json
import os
import pickle
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision
from safetensors.torch import save_file

from prunekit.checkpoint import load_checkpoint, save_checkpoint
from prunekit.errors import UsageError, cli_arg_style
from prunekit.models import build_model
from prunekit.weights import Preprocess, build_with_weights, find_classifier, replace_classifier

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _seeded_state(name: str, num_classes: int = 1000, seed: int = 1234) -> dict[str, torch.Tensor]:
    """A state dict no fresh build reproduces by chance: seeded init plus non-default BN statistics."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes)
    for key, tensor in model.state_dict().items():
        if tensor.is_floating_point() and key.endswith(("running_mean", "running_var")):
            tensor.uniform_(0.5, 1.5)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_loaded(model: nn.Module, state: dict[str, torch.Tensor], skip: str | None = None) -> None:
    own = model.state_dict()
    checked = 0
    for key, tensor in state.items():
        if skip and key.startswith(skip + "."):
            continue
        assert torch.equal(own[key], tensor), key
        checked += 1
    assert checked > 10


# --- torchvision ---------------------------------------------------------------------------------


def _hub_file(torch_home: Path, weights) -> Path:
    return torch_home / "hub" / "checkpoints" / os.path.basename(weights.url)


@pytest.fixture(scope="module")
def tv_cache(tmp_path_factory) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
    """A TORCH_HOME whose hub cache holds seeded resnet18, squeezenet1_1 and googlenet ImageNet weights."""
    home = tmp_path_factory.mktemp("torch-home")
    states = {}
    for name, w in (
        ("resnet18", torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
        ("squeezenet1_1", torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1),
    ):
        states[name] = _seeded_state(name)
        _hub_file(home, w).parent.mkdir(parents=True, exist_ok=True)
        torch.save(states[name], _hub_file(home, w))
    # googlenet's file holds the aux heads too, as torchvision's does.
    torch.manual_seed(7)
    g = torchvision.models.googlenet(num_classes=1000, aux_logits=True, init_weights=True)
    states["googlenet"] = g.state_dict()
    torch.save(states["googlenet"], _hub_file(home, torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1))
    return home, states


@pytest.fixture
def torch_home(tv_cache, monkeypatch):
    home, states = tv_cache
    monkeypatch.setenv("TORCH_HOME", str(home))

    def no_download(url, *args, **kwargs):
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return home, states


def test_torchvision_weights_load_the_cached_file_and_replace_fc(torch_home):
    home, states = torch_home
    model, pre, record = build_with_weights("resnet18", 10, "IMAGENET1K_V1")
    _assert_loaded(model, states["resnet18"], skip="fc")
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 10 and model.fc.in_features == 512
    assert pre == Preprocess(224, 256, IMAGENET_MEAN, IMAGENET_STD, "bilinear")
    w = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    assert record == {
        "source": "torchvision",
        "name": "ResNet18_Weights.IMAGENET1K_V1",
        "url": w.url,
        "file": str(_hub_file(home, w)),
        "classifier_replaced": True,
        "classifier": "fc",
    }
    json.dumps(record)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ["ResNet18_Weights.IMAGENET1K_V1", "DEFAULT"])
def test_torchvision_weights_with_their_own_class_count_keep_the_classifier(torch_home, name):
    _, states = torch_home
    model, _, record = build_with_weights("resnet18", 1000, name)
    _assert_loaded(model, states["resnet18"])  # fc included
    assert record["classifier_replaced"] is False and record["name"] == "ResNet18_Weights.IMAGENET1K_V1"


def test_torchvision_conv_classifier_is_replaced(torch_home):
    """squeezenet classifies with a 1x1 conv: it becomes a fresh 1x1 conv with the new class count."""
    _, states = torch_home
    model, _, record = build_with_weights("squeezenet1_1", 5, "DEFAULT")
    _assert_loaded(model, states["squeezenet1_1"], skip="classifier.1")
    head = model.classifier[1]
    assert isinstance(head, nn.Conv2d) and head.out_channels == 5 and head.kernel_size == (1, 1)
    assert record["classifier"] == "classifier.1"
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_googlenet_input_transform_moves_into_preprocessing_and_survives_a_checkpoint(torch_home, tmp_path):
    """Pretrained googlenet re-normalises its input inside forward; ours gets 0.5/0.5 normalisation instead,
    so it computes the same as torchvision's and a checkpoint (rebuilt without that transform) reloads exactly."""
    _, states = torch_home
    model, pre, _ = build_with_weights("googlenet", 1000, "IMAGENET1K_V1")
    assert model.transform_input is False and model.aux1 is None
    assert pre.mean == pre.std == (0.5, 0.5, 0.5)
    reference = torchvision.models.googlenet(weights="IMAGENET1K_V1").eval()
    assert reference.transform_input is True
    raw = torch.rand(2, 3, 64, 64)

    def norm(mean, std):
        return (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)

    with torch.no_grad():
        ours = model.eval()(norm(pre.mean, pre.std))
        theirs = reference(norm(IMAGENET_MEAN, IMAGENET_STD))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    save_checkpoint(
        tmp_path / "g.safetensors", model, {"model": "googlenet", "num_classes": 1000, "input_size": 224}
    )
    with torch.no_grad():
        reloaded = load_checkpoint(tmp_path / "g.safetensors").model(norm(pre.mean, pre.std))
    assert torch.equal(reloaded, ours)


def test_wrong_torchvision_weights_name_lists_the_valid_ones(torch_home):
    with pytest.raises(UsageError) as err:
        build_with_weights("resnet18", 10, "IMAGENET1K_V9")
    assert "IMAGENET1K_V1" in str(err.value) and "DEFAULT" in str(err.value)
    with cli_arg_style(), pytest.raises(UsageError, match="--weights IMAGENET1K_V9"):
        build_with_weights("resnet18", 10, "IMAGENET1K_V9")


def test_offline_torchvision_download_names_the_cache_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-home"))
    calls = []

    def offline(url, dst, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    w = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    with pytest.raises(UsageError) as err:
        build_with_weights("resnet18", 10, "IMAGENET1K_V1")
    message = str(err.value)
    assert calls == [w.url]
    assert f"could not download {w.url}" in message and "name resolution" in message
    assert f"place that file at {_hub_file(tmp_path / 'empty-home', w)}" in message


@pytest.mark.parametrize(
    ("name", "layer", "kind"),
    [
        ("resnet18", "fc", nn.Linear),
        ("alexnet", "classifier.6", nn.Linear),
        ("vgg11_bn", "classifier.6", nn.Linear),
        ("mobilenet_v3_small", "classifier.3", nn.Linear),
        ("efficientnet_b0", "classifier.1", nn.Linear),
        ("convnext_tiny", "classifier.2", nn.Linear),
        ("densenet121", "classifier", nn.Linear),
        ("squeezenet1_0", "classifier.1", nn.Conv2d),
        ("regnet_x_400mf", "fc", nn.Linear),
        ("shufflenet_v2_x0_5", "fc", nn.Linear),
        ("googlenet", "fc", nn.Linear),
    ],
)
def test_replace_classifier_per_family(name, layer, kind):
    model = build_model(name, 1000)
    old = model.get_submodule(layer)
    assert replace_classifier(model, 7, old_classes=1000) == layer
    new = model.get_submodule(layer)
    assert new is not old and isinstance(new, kind) and find_classifier(model)[0] == layer
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_replace_classifier_refuses_a_last_layer_that_is_not_the_head():
    model = nn.Sequential(nn.Linear(4, 1000), nn.ReLU(), nn.Linear(1000, 3))
    with pytest.raises(UsageError, match="not 1000 classes"):
        replace_classifier(model, 7, old_classes=1000)


def test_preprocess_round_trips_through_json():
    pre = Preprocess(224, 235, IMAGENET_MEAN, IMAGENET_STD, "bicubic")
    assert Preprocess.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre


def test_no_weights_builds_a_fresh_model():
    model, pre, record = build_with_weights("resnet18-cifar", 10, None)
    assert pre is None and record is None and model.fc.out_features == 10


def test_a_value_that_is_neither_a_file_nor_a_name_says_what_is_accepted():
    with pytest.raises(UsageError) as err:
        build_with_weights("resnet18-cifar", 10, "IMAGENET1K_V1")
    assert "no such file" in str(err.value) and ".safetensors" in str(err.value)


# --- timm ---------------------------------------------------------------------------------------


@pytest.fixture
def timm():
    return pytest.importorskip("timm")


@pytest.fixture
def hf_cache(timm, tmp_path, monkeypatch) -> Path:
    """An empty, offline Hugging Face hub cache; huggingface_hub reads these constants at import time."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _put_in_hf_cache(cache: Path, repo: str, state: dict[str, torch.Tensor]) -> Path:
    """The layout hf_hub_download resolves offline: refs/main names a snapshot that holds the file."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    return snapshot / "model.safetensors"


def test_timm_pretrained_loads_from_the_hugging_face_cache(timm, hf_cache):
    cfg = timm.models.get_pretrained_cfg("resnet18.a1_in1k")
    state = _seeded_state("timm:resnet18")
    path = _put_in_hf_cache(hf_cache, cfg.hf_hub_id, state)
    model, pre, record = build_with_weights("timm:resnet18", 10, "pretrained")
    _assert_loaded(model, state, skip="fc")
    assert model.fc.out_features == 10
    assert pre == Preprocess(224, 235, IMAGENET_MEAN, IMAGENET_STD, "bicubic")  # crop_pct 0.95
    assert record["source"] == "timm" and record["name"] == "resnet18.a1_in1k"
    assert record["classifier_replaced"] is True and Path(record["file"]) == path


def test_timm_tag_with_its_own_class_count_keeps_the_classifier(timm, hf_cache):
    state = _seeded_state("timm:resnet18", seed=99)
    _put_in_hf_cache(hf_cache, timm.models.get_pretrained_cfg("resnet18.a1_in1k").hf_hub_id, state)
    model, _, record = build_with_weights("timm:resnet18", 1000, "a1_in1k")
    _assert_loaded(model, state)
    assert record["classifier_replaced"] is False


def test_timm_offline_with_an_empty_cache_names_repo_file_and_cache(timm, hf_cache):
    with pytest.raises(UsageError) as err:
        build_with_weights("timm:resnet18", 10, "DEFAULT")
    message = str(err.value)
    assert "timm/resnet18.a1_in1k" in message and "model.safetensors" in message
    assert str(hf_cache / "models--timm--resnet18.a1_in1k") in message


def test_timm_unknown_tag_lists_the_valid_ones(timm):
    with pytest.raises(UsageError) as err:
        build_with_weights("timm:resnet18", 10, "b7_in1k")
    assert "a1_in1k" in str(err.value) and "pretrained" in str(err.value)


def test_timm_checkpoint_round_trip(timm, tmp_path):
    torch.manual_seed(0)
    model = build_model("timm:resnet18", 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    save_checkpoint(
        tmp_path / "t.safetensors", model, {"model": "timm:resnet18", "num_classes": 10, "input_size": 32}
    )
    with torch.no_grad():
        assert torch.equal(load_checkpoint(tmp_path / "t.safetensors").model(x), expected)


# --- local files ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def squeeze_state() -> dict[str, torch.Tensor]:
    return _seeded_state("squeezenet1_1", num_classes=10)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".pt"])
def test_local_file_round_trip(squeeze_state, tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(squeeze_state, str(path))
    else:
        torch.save(squeeze_state, path)
    model, pre, record = build_with_weights("squeezenet1_1", 10, str(path))
    _assert_loaded(model, squeeze_state)
    assert pre is None
    assert record == {"source": "file", "file": str(path.resolve()), "classifier_replaced": False}


@pytest.mark.parametrize("nest", ["state_dict", "model"])
def test_local_file_nested_with_ddp_prefix(squeeze_state, tmp_path, nest):
    path = tmp_path / "ddp.pth"
    torch.save({nest: {"module." + k: v for k, v in squeeze_state.items()}, "epoch": 3}, path)
    model, _, _ = build_with_weights("squeezenet1_1", 10, str(path))
    _assert_loaded(model, squeeze_state)


def test_local_file_with_another_class_count_transfers(tmp_path):
    state = _seeded_state("resnet18", num_classes=1000)
    save_file(state, str(tmp_path / "in1k.safetensors"))
    model, _, record = build_with_weights("resnet18", 10, str(tmp_path / "in1k.safetensors"))
    _assert_loaded(model, state, skip="fc")
    assert model.fc.out_features == 10
    assert record["classifier_replaced"] is True and record["classifier"] == "fc"


def test_local_file_that_does_not_fit_names_every_problem_in_one_line(tmp_path):
    state = _seeded_state("resnet18-cifar", num_classes=10)  # 3x3 stem: conv1 differs from resnet18's
    del state["layer4.1.bn2.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "my.pth")
    with cli_arg_style(), pytest.raises(UsageError) as err:
        build_with_weights("resnet18", 10, str(tmp_path / "my.pth"))
    message = str(err.value)
    assert "\n" not in message
    assert message == (
        f"--weights {tmp_path / 'my.pth'} does not fit resnet18: 1 missing key (layer4.1.bn2.weight), "
        "1 unexpected (extra.weight), 1 shape mismatch (conv1.weight: file [64, 3, 3, 3], model [64, 3, 7, 7])"
    )


class _Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickle_that_would_run_code_is_refused_unrun(squeeze_state, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({**squeeze_state, "trap": _Payload(marker)}, path)
    with pytest.raises(UsageError, match="refused by safe .* pickles exec, not just tensors"):
        build_with_weights("squeezenet1_1", 10, str(path))
    assert not marker.exists()
    plain = tmp_path / "evil-plain.pt"  # a plain pickle, not torch's zip format
    plain.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UsageError, match="refused"):
        build_with_weights("squeezenet1_1", 10, str(plain))
    assert not marker.exists()
    torch.load(path, weights_only=False)  # control: the payload is live when unpickled unsafely
    assert marker.read_text() == "ran"


@pytest.mark.parametrize(
    ("filename", "content", "match"),
    [
        ("absent.pth", None, "no such file"),
        ("w.bin", b"x", "unknown weights file type '.bin'"),
        ("junk.pth", b"not a zip or pickle", "refused by safe"),
        ("empty.pt", b"", "unreadable as a PyTorch file"),
        ("junk.safetensors", b"\x00" * 16, "unreadable as safetensors"),
    ],
)
def test_bad_local_files(tmp_path, filename, content, match):
    path = tmp_path / filename
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UsageError, match=match):
        build_with_weights("squeezenet1_1", 10, str(path))


def test_a_file_without_a_state_dict_is_refused(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(UsageError, match="not a state dict"):
        build_with_weights("squeezenet1_1", 10, str(tmp_path / "list.pt"))
