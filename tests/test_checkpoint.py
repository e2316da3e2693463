"""Checkpoints: exact round trips, pruned shapes rebuilt from metadata, clear errors, and no pickle."""

from __future__ import annotations

import json
import pickle
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import PYTHON, subprocess_env
from prunekit import load
from prunekit.checkpoint import FORMAT_VERSION, load_checkpoint, read_meta, save_checkpoint
from prunekit.errors import UsageError
from prunekit.models import build_model


def _meta(name: str = "resnet18", num_classes: int = 10) -> dict:
    return {"model": name, "num_classes": num_classes, "input_size": 32, "note": "test"}


def _trained_looking(model: nn.Module) -> nn.Module:
    """Non-default BatchNorm statistics and affine parameters, so buffers are part of what must round-trip."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.num_batches_tracked.fill_(7)
    return model.eval()


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return _trained_looking(build_model("resnet18", 10))


@pytest.fixture
def saved(model, tmp_path) -> Path:
    return save_checkpoint(tmp_path / "model.safetensors", model, _meta())


def test_round_trip_is_bitwise_exact(model, saved):
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    ckpt = load_checkpoint(saved)
    assert not ckpt.model.training
    with torch.no_grad():
        got = ckpt.model(x)
    assert torch.equal(got, expected)
    assert ckpt.meta["note"] == "test" and ckpt.meta["model"] == "resnet18"
    assert ckpt.meta["format_version"] == FORMAT_VERSION
    assert int(ckpt.model.bn1.num_batches_tracked) == 7
    assert ckpt.optimizer_state is None and ckpt.extra == {}


def test_load_returns_the_model_with_its_metadata(saved):
    model = load(saved)
    assert isinstance(model, nn.Module)
    assert model.prunekit_meta["num_classes"] == 10
    assert read_meta(saved)["input_size"] == 32


def test_optimizer_state_and_extras_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    rng = torch.get_rng_state()
    path = save_checkpoint(
        tmp_path / "state.safetensors", model, _meta(num_classes=3), optimizer=opt, extra={"rng": rng}
    )
    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt.extra["rng"], rng)
    fresh = torch.optim.Adam(ckpt.model.parameters(), lr=1e-3)
    fresh.load_state_dict(ckpt.optimizer_state)
    original = opt.state_dict()
    restored = fresh.state_dict()
    assert restored["param_groups"][0]["lr"] == original["param_groups"][0]["lr"]
    assert restored["state"].keys() == original["state"].keys()
    for idx, values in original["state"].items():
        for key, value in values.items():
            assert torch.equal(restored["state"][idx][key], value), (idx, key)


def _prune_layer2_block0(model: nn.Module, keep: int = 48) -> None:
    """By hand, what structured pruning does: fewer output channels in conv1, and everything they feed."""
    block = model.layer2[0]
    idx = torch.arange(0, 2 * keep, 2)  # keep every other channel
    old1, oldbn, old2 = block.conv1, block.bn1, block.conv2
    conv1 = nn.Conv2d(old1.in_channels, keep, 3, stride=old1.stride, padding=1, bias=False)
    conv1.weight.data = old1.weight.data[idx].clone()
    bn = nn.BatchNorm2d(keep)
    for name in ("weight", "bias"):
        getattr(bn, name).data = getattr(oldbn, name).data[idx].clone()
    bn.running_mean = oldbn.running_mean[idx].clone()
    bn.running_var = oldbn.running_var[idx].clone()
    conv2 = nn.Conv2d(keep, old2.out_channels, 3, stride=1, padding=1, bias=False)
    conv2.weight.data = old2.weight.data[:, idx].clone()
    block.conv1, block.bn1, block.conv2 = conv1, bn, conv2


def _prune_hidden_linear(model: nn.Module, keep: int = 300) -> None:
    """mobilenet_v3_small's classifier is Linear(576, 1024) -> Linear(1024, classes): drop hidden units."""
    first, last = model.classifier[0], model.classifier[3]
    idx = torch.arange(keep) * 3
    a = nn.Linear(first.in_features, keep)
    a.weight.data, a.bias.data = first.weight.data[idx].clone(), first.bias.data[idx].clone()
    b = nn.Linear(keep, last.out_features)
    b.weight.data, b.bias.data = last.weight.data[:, idx].clone(), last.bias.data.clone()
    model.classifier[0], model.classifier[3] = a, b


_LOAD_SCRIPT = """
import json, sys
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from prunekit import load
torch.set_num_threads(1)
for ckpt, inp, out in json.loads(sys.argv[1]):
    model = load(ckpt)
    with torch.no_grad():
        y = model(load_file(inp)["x"])
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    attrs = {name: {a: getattr(m, a) for a in ("in_channels", "out_channels", "num_features", "in_features",
                                                "out_features") if hasattr(m, a)}
             for name, m in model.named_modules()}
    save_file({"y": y}, out, metadata={"shapes": json.dumps(shapes), "attrs": json.dumps(attrs)})
"""


@pytest.mark.slow
def test_pruned_shapes_reload_in_a_fresh_process(model, tmp_path):
    _prune_layer2_block0(model)
    torch.manual_seed(1)
    mobile = _trained_looking(build_model("mobilenet_v3_small", 10))
    _prune_hidden_linear(mobile)
    x = torch.randn(3, 3, 32, 32)
    jobs, expected = [], {}
    for name, net in (("resnet18", model), ("mobilenet_v3_small", mobile)):
        net.eval()
        with torch.no_grad():
            expected[name] = (net(x), {k: list(v.shape) for k, v in net.state_dict().items()})
        ckpt = save_checkpoint(tmp_path / f"{name}.safetensors", net, _meta(name))
        save_file({"x": x}, str(tmp_path / "input.safetensors"))
        jobs.append(
            [str(ckpt), str(tmp_path / "input.safetensors"), str(tmp_path / f"{name}.out.safetensors")]
        )
    # the pruned shapes really differ from a fresh build's
    assert expected["resnet18"][1]["layer2.0.conv1.weight"] == [48, 64, 3, 3]
    assert expected["mobilenet_v3_small"][1]["classifier.3.weight"] == [10, 300]

    proc = subprocess.run(
        [PYTHON, "-c", _LOAD_SCRIPT, json.dumps(jobs)],
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    attrs = {}
    for name, (_, _, out) in zip(expected, jobs, strict=True):
        with safe_open(out, framework="pt") as f:
            y, meta = f.get_tensor("y"), f.metadata()
        assert json.loads(meta["shapes"]) == expected[name][1]
        assert torch.equal(y, expected[name][0]), name
        attrs[name] = json.loads(meta["attrs"])
    resnet_attrs, mobile_attrs = attrs["resnet18"], attrs["mobilenet_v3_small"]
    assert resnet_attrs["layer2.0.conv1"]["out_channels"] == 48
    assert resnet_attrs["layer2.0.bn1"]["num_features"] == 48
    assert resnet_attrs["layer2.0.conv2"]["in_channels"] == 48
    assert mobile_attrs["classifier.0"]["out_features"] == 300
    assert mobile_attrs["classifier.3"]["in_features"] == 300


def test_pruned_weights_do_not_fit_another_model(model, tmp_path):
    _prune_layer2_block0(model)
    path = save_checkpoint(tmp_path / "p.safetensors", model, _meta())
    # Rewrite the metadata to claim a different architecture: loading must fail cleanly.
    tensors = load_file(str(path))
    meta = read_meta(path)
    meta["model"] = "mobilenet_v2"
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"prunekit": json.dumps(meta)})
    with pytest.raises(UsageError, match="do not fit a mobilenet_v2"):
        load_checkpoint(bad)


def test_truncated_file(saved, tmp_path):
    blob = saved.read_bytes()
    for name, data in (("half", blob[: len(blob) // 2]), ("header", blob[:64]), ("empty", b"")):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(UsageError) as err:
            load_checkpoint(path)
        assert str(path) in str(err.value)


def test_corrupt_header(saved, tmp_path):
    blob = bytearray(saved.read_bytes())
    blob[8:12] = b"@@@@"  # the JSON header starts at byte 8
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(bytes(blob))
    with pytest.raises(UsageError, match="not a prunekit checkpoint"):
        load_checkpoint(path)


def test_random_bytes(tmp_path):
    path = tmp_path / "random.safetensors"
    path.write_bytes(
        torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
        .numpy()
        .tobytes()
    )
    with pytest.raises(UsageError, match="not a prunekit checkpoint"):
        load_checkpoint(path)


def test_safetensors_without_prunekit_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(build_model("resnet18", 10).state_dict(), str(path))
    with pytest.raises(UsageError, match="no prunekit metadata"):
        load_checkpoint(path)
    other = tmp_path / "other-meta.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"prunekit": json.dumps({"hello": 1})})
    with pytest.raises(UsageError, match="lacks the model description"):
        load_checkpoint(other)


def test_newer_format_version_is_refused(saved, tmp_path):
    meta = read_meta(saved)
    meta["format_version"] = FORMAT_VERSION + 1
    path = tmp_path / "future.safetensors"
    save_file(load_file(str(saved)), str(path), metadata={"prunekit": json.dumps(meta)})
    with pytest.raises(UsageError, match="newer prunekit"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(UsageError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent.safetensors")
    with pytest.raises(UsageError, match="no such checkpoint"):
        load_checkpoint(tmp_path)  # a directory is not a checkpoint file


def test_loading_never_unpickles(saved, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("checkpoint loading used pickle")

    class ForbiddenUnpickler:
        def __init__(self, *args, **kwargs):
            forbidden()

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", ForbiddenUnpickler)
    monkeypatch.setattr(torch, "load", forbidden)
    # the patches are live: unpickling now fails
    with pytest.raises(AssertionError):
        pickle.loads(b"\x80\x04K\x01.")
    ckpt = load_checkpoint(saved)
    assert ckpt.meta["model"] == "resnet18"
    assert load(saved).fc.out_features == 10


def test_save_is_atomic_and_leaves_no_temporary_files(model, tmp_path):
    save_checkpoint(tmp_path / "a.safetensors", model, _meta())
    save_checkpoint(tmp_path / "a.safetensors", model, _meta())  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_top_level_load_is_the_safe_loader(tmp_path):
    """`prunekit.load` is the documented entry point and gives the saved model with its metadata."""
    import torch

    import prunekit
    from prunekit.checkpoint import save_checkpoint
    from prunekit.models import build_model

    model = build_model("resnet18", 10).eval()
    save_checkpoint(
        tmp_path / "m.safetensors", model, {"model": "resnet18", "num_classes": 10, "input_size": 32}
    )
    loaded = prunekit.load(tmp_path / "m.safetensors")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))
    assert loaded.prunekit_meta["model"] == "resnet18"


def test_mnasnet_reloads_with_its_state_dict_versions(tmp_path):
    """MNASNet's layers refuse a state dict without per-module versions ("version should be set to 1 or 2
    instead of None"); they are recorded on save and handed back on load."""
    torch.manual_seed(0)
    model = _trained_looking(build_model("mnasnet0_5", 10))
    path = save_checkpoint(tmp_path / "mnasnet.safetensors", model, _meta("mnasnet0_5"))
    assert read_meta(path)["state_versions"][""] == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_checkpoint(path).model(x), model(x))
    legacy = read_meta(path)  # written before versions were recorded: the built model's versions apply
    del legacy["state_versions"]
    old = tmp_path / "legacy.safetensors"
    save_file(load_file(str(path)), str(old), metadata={"prunekit": json.dumps(legacy)})
    with torch.no_grad():
        assert torch.equal(load_checkpoint(old).model(x), model(x))
