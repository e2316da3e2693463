"""Pruning: the seed's exact figures, every conv nameable, residual groups, global targets, clean errors."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from conftest import PYTHON, run_cli, subprocess_env
from prunekit import api
from prunekit.api import model_meta
from prunekit.checkpoint import load_checkpoint, module_shapes, save_checkpoint
from prunekit.cli import EXIT_USAGE, main
from prunekit.data import synthetic_data
from prunekit.importance import make_importance
from prunekit.measure import count_macs, count_params
from prunekit.models import build_model
from prunekit.pruning import PruneRequest, prune_model

SYNTHETIC_ARGS = {"spec": "synthetic", "data_dir": None, "subset": None, "image_size": None}
RESNET18_CONVS = [
    "conv1",
    *[f"layer{i}.{j}.conv{k}" for i in range(1, 5) for j in range(2) for k in (1, 2)],
    *[f"layer{i}.0.downsample.0" for i in range(2, 5)],
]

# Half the MACs by the global rule: for tests that compare with in-memory pruning or do not test allocation.
GLOBAL_HALF = ["prune", "--target-macs", "0.5", "--importance", "l1", "--allocation", "global"]


def squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def dense_meta(name: str) -> dict:
    """The metadata ``prunekit train`` records, for a model trained on ``--data synthetic``."""
    bundle = synthetic_data(train_per_class=1, test_per_class=1)
    return model_meta(name, bundle, dict(SYNTHETIC_ARGS))


def dense_model(name: str = "resnet18") -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, 10).eval()


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return dense_model("resnet18")


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory, resnet18) -> Path:
    """A dense resnet18(num_classes=10) checkpoint that records --data synthetic."""
    path = tmp_path_factory.mktemp("dense") / "resnet18.safetensors"
    return save_checkpoint(path, resnet18, dense_meta("resnet18"))


def shapes_of(model: nn.Module) -> dict[str, dict]:
    return module_shapes(model)


def kept_filters(original: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """Indices of ``original``'s output filters that survive in ``pruned``, in order, matched by value."""
    kept = []
    for filt in pruned:
        matches = [i for i in range(len(original)) if torch.equal(original[i], filt)]
        assert len(matches) == 1, "a pruned filter must be an unchanged copy of exactly one original filter"
        kept.append(matches[0])
    return kept


# ---------------------------------------------------------------- 1. the seed's figures


def test_seed_counts_layer2_0_conv1(capsys, tmp_path, dense_ckpt):
    out = tmp_path / "pruned.safetensors"
    code, _, err = run_cli(
        capsys,
        *[
            "prune",
            dense_ckpt,
            "--layer",
            "layer2.0.conv1",
            "--ratio",
            "0.2",
            "--importance",
            "activation",
            "--out",
            out,
        ],
    )
    assert code == 0, err
    # the printed table carries the seed's torchinfo figures
    for text in (
        "11,181,642",
        "11,138,392",
        "37.03 M",
        "36.33 M",
        "44.73 MB",
        "44.55 MB",
        "45.55 MB",
        "45.37 MB",
    ):
        assert squash(text) in squash(err), text
    assert "128 -> 103" in err

    report = json.loads(out.with_suffix(".json").read_text())
    assert report["params"]["before"] == 11_181_642
    assert report["params"]["after"] == 11_138_392
    assert report["before"]["total_params"] == 11_181_642
    assert report["after"]["total_params"] == 11_138_392
    assert f"{report['before']['mult_adds'] / 1e6:.2f}" == "37.03"
    assert f"{report['after']['mult_adds'] / 1e6:.2f}" == "36.33"
    assert f"{report['before']['params_size_mb']:.2f}" == "44.73"
    assert f"{report['after']['params_size_mb']:.2f}" == "44.55"
    assert f"{report['before']['estimated_total_size_mb']:.2f}" == "45.55"
    assert f"{report['after']['estimated_total_size_mb']:.2f}" == "45.37"
    assert report["removed_channels"] == {"layer2.0.conv1": 25}
    assert report["importance"] == "activation"
    assert report["calibration"] == "data"
    assert report["pruned_checkpoint"] == str(out)
    changed = {c["layer"]: {k: v for k, v in c.items() if k != "layer"} for c in report["changed_layers"]}
    assert changed == {
        "layer2.0.conv1": {"out_channels": [128, 103]},
        "layer2.0.bn1": {"num_features": [128, 103]},
        "layer2.0.conv2": {"in_channels": [128, 103]},
    }

    ckpt = load_checkpoint(out)
    model = ckpt.model
    assert model.layer2[0].conv1.out_channels == 103
    assert model.layer2[0].conv1.weight.shape == (103, 64, 3, 3)
    assert model.layer2[0].bn1.num_features == 103
    assert model.layer2[0].bn1.running_mean.shape == (103,)
    assert model.layer2[0].conv2.in_channels == 103
    assert model.layer2[0].conv2.weight.shape == (128, 103, 3, 3)
    assert count_params(model) == 11_138_392
    assert ckpt.meta["parent"]["params"] == 11_181_642
    assert ckpt.meta["pruning"][-1]["removed_channels"] == {"layer2.0.conv1": 25}
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("seed", [0, 3])
def test_random_calibration_reproduces_the_seed_selection(tmp_path, dense_ckpt, resnet18, seed):
    """The removed channels are the 25 with the lowest mean raw output on the seed's noise batch."""
    out = tmp_path / "pruned.safetensors"
    code = main(
        [
            "prune",
            str(dense_ckpt),
            "--layer",
            "layer2.0.conv1",
            "--ratio",
            "0.2",
            "--importance",
            "activation",
            "--calibration",
            "random",
            "--seed",
            str(seed),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert json.loads(out.with_suffix(".json").read_text())["calibration"] == "random"

    # independently: the layer's raw output on torch.randn(128, 3, 32, 32) from a seeded generator
    x = torch.randn(128, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    captured = {}

    def hook(_module, _inputs, output):
        captured["out"] = output.detach().double()  # returns None: the forward pass is not altered

    layer = resnet18.layer2[0].conv1
    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            resnet18(x)
    finally:
        handle.remove()
    means = captured["out"].mean(dim=(0, 2, 3))
    order = torch.argsort(means)
    assert means[order[24]] < means[order[25]]  # no tie at the boundary: the expected set is well defined
    expected_removed = set(order[:25].tolist())

    pruned = load_checkpoint(out).model.layer2[0].conv1.weight
    kept = kept_filters(layer.weight.detach(), pruned)
    assert kept == sorted(kept)  # surviving filters keep their order
    assert set(range(128)) - set(kept) == expected_removed


# ---------------------------------------------------------------- 2. every conv, residual groups


@pytest.mark.parametrize("layer", RESNET18_CONVS)
def test_every_conv_can_be_named(resnet18, layer):
    model = copy.deepcopy(resnet18)
    channels = dict(model.named_modules())[layer].out_channels
    before = shapes_of(model)
    result = prune_model(
        model, PruneRequest(layers=[layer], ratio=0.3), make_importance("l1"), torch.zeros(1, 3, 32, 32)
    )
    assert result.removed == {layer: int(channels * 0.3)}
    assert dict(model.named_modules())[layer].out_channels == channels - int(channels * 0.3)
    assert shapes_of(model) != before
    assert result.params_after < result.params_before
    assert result.macs_after < result.macs_before
    assert result.macs_after == count_macs(model, 32)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def _shape_table(model: nn.Module) -> dict[str, int]:
    """out_channels / num_features / in_channels of every layer, keyed 'name.out' and 'name.in'."""
    table = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            table[f"{name}.out"], table[f"{name}.in"] = m.out_channels, m.in_channels
        elif isinstance(m, nn.BatchNorm2d):
            table[f"{name}.out"] = m.num_features
        elif isinstance(m, nn.Linear):
            table[f"{name}.out"], table[f"{name}.in"] = m.out_features, m.in_features
    return table


LAYER2_RESIDUAL = [
    "layer2.0.conv2.out",
    "layer2.0.bn2.out",
    "layer2.0.downsample.0.out",
    "layer2.0.downsample.1.out",
    "layer2.1.conv1.in",
    "layer2.1.conv2.out",
    "layer2.1.bn2.out",
    "layer3.0.conv1.in",
    "layer3.0.downsample.0.in",
]
LAYER1_RESIDUAL = [
    "conv1.out",
    "bn1.out",
    "layer1.0.conv1.in",
    "layer1.0.conv2.out",
    "layer1.0.bn2.out",
    "layer1.1.conv1.in",
    "layer1.1.conv2.out",
    "layer1.1.bn2.out",
    "layer2.0.conv1.in",
    "layer2.0.downsample.0.in",
]


@pytest.mark.parametrize(
    "layer, coupled, channels",
    [
        ("layer2.0.downsample.0", LAYER2_RESIDUAL, 128),
        ("layer2.1.conv2", LAYER2_RESIDUAL, 128),
        ("layer1.0.conv2", LAYER1_RESIDUAL, 64),
        ("conv1", LAYER1_RESIDUAL, 64),
    ],
)
def test_residual_coupled_group_shrinks_together(resnet18, layer, coupled, channels):
    model = copy.deepcopy(resnet18)
    before = _shape_table(model)
    prune_model(
        model, PruneRequest(layers=[layer], ratio=0.3), make_importance("l1"), torch.zeros(1, 3, 32, 32)
    )
    after = _shape_table(model)
    kept = channels - int(channels * 0.3)
    assert {k: after[k] for k in coupled} == dict.fromkeys(coupled, kept)
    # nothing outside the coupled group changed
    assert {k: v for k, v in after.items() if k not in coupled} == {
        k: v for k, v in before.items() if k not in coupled
    }
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_several_layers_at_once(capsys, tmp_path, dense_ckpt):
    out = tmp_path / "multi.safetensors"
    code, _, err = run_cli(
        capsys,
        *[
            "prune",
            dense_ckpt,
            "--layer",
            "layer1.0.conv1",
            "--layer",
            "layer2.0.downsample.0",
            "--layer",
            "layer4.1.conv1",
            "--ratio",
            "0.5",
            "--importance",
            "l1",
            "--out",
            out,
        ],
    )
    assert code == 0, err
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["removed_channels"] == {
        "layer1.0.conv1": 32,
        "layer2.0.downsample.0": 64,
        "layer4.1.conv1": 256,
    }
    model = load_checkpoint(out).model
    assert model.layer1[0].conv1.out_channels == 32 and model.layer1[0].conv2.in_channels == 32
    assert model.layer2[0].conv2.out_channels == 64 and model.layer3[0].conv1.in_channels == 64
    assert model.layer4[1].conv1.out_channels == 256 and model.layer4[1].conv2.in_channels == 256
    assert model.layer3[0].conv1.out_channels == 256  # not named: untouched
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# ---------------------------------------------------------------- 3. global targets, round trips


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["resnet18", "resnet50", "mobilenet_v2", "vgg11_bn", "densenet121", "efficientnet_b0"]
)
def test_target_macs_half_and_exact_round_trip(tmp_path, name):
    model = dense_model(name)
    dense_macs = count_macs(model, 32)
    result = prune_model(
        model, PruneRequest(target_macs=0.5), make_importance("l1"), torch.zeros(1, 3, 32, 32)
    )
    measured = count_macs(model, 32)
    assert result.macs_before == dense_macs
    assert result.macs_after == measured
    assert abs(measured - dense_macs / 2) <= 0.02 * dense_macs / 2, measured / dense_macs
    assert result.removed  # some channels went
    assert count_params(model) == result.params_after < result.params_before

    path = save_checkpoint(tmp_path / f"{name}.safetensors", model, dense_meta(name))
    reloaded = load_checkpoint(path).model
    assert shapes_of(reloaded) == shapes_of(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = model(x), reloaded(x)
    assert expected.shape == (2, 10)
    assert torch.equal(got, expected)


@pytest.mark.slow
def test_prune_cli_then_reload_in_fresh_process(tmp_path, dense_ckpt):
    """The CLI's pruned checkpoint equals the in-memory pruned model, bit for bit, in another process."""
    out = tmp_path / "half.safetensors"
    assert main([*GLOBAL_HALF, str(dense_ckpt), "--no-reconstruct", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["macs"]["ratio"] == pytest.approx(0.5, rel=0.02)

    model = load_checkpoint(dense_ckpt).model
    prune_model(model, PruneRequest(target_macs=0.5), make_importance("l1"), torch.zeros(1, 3, 32, 32))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))

    script = (
        "import sys, torch\n"
        "from safetensors.torch import load_file, save_file\n"
        "from prunekit import load\n"
        "torch.set_num_threads(1)\n"
        "model = load(sys.argv[1])\n"
        "assert not model.training and model.prunekit_meta['pruning']\n"
        "with torch.no_grad():\n"
        "    y = model(load_file(sys.argv[2])['x'])\n"
        "save_file({'y': y}, sys.argv[3])\n"
    )
    proc = subprocess.run(
        [PYTHON, "-c", script, str(out), str(tmp_path / "x.safetensors"), str(tmp_path / "y.safetensors")],
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr
    got = load_file(str(tmp_path / "y.safetensors"))["y"]
    assert got.shape == (3, 10)
    assert torch.equal(got, expected)


def test_target_params_half(resnet18):
    model = copy.deepcopy(resnet18)
    dense = count_params(model)
    result = prune_model(
        model, PruneRequest(target_params=0.5), make_importance("l1"), torch.zeros(1, 3, 32, 32)
    )
    assert abs(count_params(model) - dense / 2) <= 0.02 * dense / 2, count_params(model) / dense
    assert result.params_after == count_params(model)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_uniform_ratio_protects_stem_and_classifier(resnet18):
    model = copy.deepcopy(resnet18)
    result = prune_model(model, PruneRequest(ratio=0.25), make_importance("l1"), torch.zeros(1, 3, 32, 32))
    # the stem conv and the classifier are never roots; the stem's output (layer1's residual stream) stays
    assert "conv1" not in result.removed and "fc" not in result.removed
    assert model.conv1.weight.shape == resnet18.conv1.weight.shape
    assert torch.equal(model.conv1.weight, resnet18.conv1.weight)
    assert torch.equal(model.bn1.weight, resnet18.bn1.weight)
    assert model.layer1[0].conv2.out_channels == 64
    # the classifier keeps its 10 outputs; its inputs follow layer4's residual stream, rows intact
    assert model.fc.out_features == 10 and model.fc.weight.shape[0] == 10
    assert model.fc.in_features == model.layer4[1].conv2.out_channels == 384
    assert kept_filters(resnet18.fc.weight.detach().t(), model.fc.weight.detach().t())
    assert torch.equal(model.fc.bias, resnet18.fc.bias)
    # every other conv lost a quarter of its outputs (residual streams through their group)
    for name in ("layer1.0.conv1", "layer2.0.conv1", "layer3.1.conv1", "layer4.0.downsample.0"):
        m = dict(model.named_modules())[name]
        assert m.out_channels == dict(resnet18.named_modules())[name].out_channels * 3 // 4, name


def test_ignore_keeps_a_layer(resnet18):
    model = copy.deepcopy(resnet18)
    result = prune_model(
        model,
        PruneRequest(ratio=0.25, ignore=["layer3.0.conv1"]),
        make_importance("l1"),
        torch.zeros(1, 3, 32, 32),
    )
    assert "layer3.0.conv1" not in result.removed
    assert model.layer3[0].conv1.out_channels == 256
    assert model.layer3[0].bn1.num_features == 256
    assert model.layer3[0].conv2.in_channels == 256
    assert model.layer3[1].conv1.out_channels == 192  # its neighbour is pruned as usual


def test_round_to_keeps_multiples(resnet18):
    def not_multiples(model):
        fixed = ("conv1.in", "fc.out")  # 3 image channels and 10 classes are not channel counts to round
        return {k: v for k, v in _shape_table(model).items() if k not in fixed and v % 8}

    plain = copy.deepcopy(resnet18)
    prune_model(plain, PruneRequest(ratio=0.3), make_importance("l1"), torch.zeros(1, 3, 32, 32))
    assert not_multiples(plain)  # without --round-to, 0.3 leaves counts like 45 and 359

    model = copy.deepcopy(resnet18)
    result = prune_model(
        model, PruneRequest(ratio=0.3, round_to=8), make_importance("l1"), torch.zeros(1, 3, 32, 32)
    )
    assert result.removed
    assert not not_multiples(model)
    assert model.layer1[0].conv1.out_channels == 48  # 64 - int(19.2) = 45, rounded to 48
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# ---------------------------------------------------------------- 5. errors


@pytest.fixture(scope="module")
def not_prunekit(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    return path


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory, dense_ckpt) -> Path:
    path = tmp_path_factory.mktemp("bad") / "corrupt.safetensors"
    path.write_bytes(dense_ckpt.read_bytes()[:200_000])  # truncated in the middle of the weights
    return path


@pytest.fixture(scope="module")
def garbage(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "garbage.safetensors"
    path.write_bytes(b"\x00\x01 not a checkpoint at all" * 50)
    return path


ERROR_CASES = {
    "unknown-layer": (
        ["--layer", "layer2.0.conv", "--ratio", "0.2"],
        ["layer2.0.conv", "no such layer", "layer2.0.conv1"],
    ),
    "bn-layer": (
        ["--layer", "layer2.0.bn1", "--ratio", "0.2"],
        ["layer2.0.bn1", "BatchNorm2d", "not a prunable conv"],
    ),
    "fc-layer": (["--layer", "fc", "--ratio", "0.2"], ["--layer fc", "Linear"]),
    "ratio-0": (["--ratio", "0"], ["--ratio", "between 0 and 1"]),
    "ratio-1.5": (["--ratio", "1.5"], ["--ratio", "1.5"]),
    "ratio-negative": (["--ratio", "-0.1"], ["--ratio", "-0.1"]),
    "layer-ratio-1.5": (["--layer", "layer2.0.conv1", "--ratio", "1.5"], ["--ratio", "1.5"]),
    "round-to-everything": (["--ratio", "0.5", "--round-to", "512"], ["--round-to 512", "every"]),
    "round-to-zero": (["--ratio", "0.5", "--round-to", "0"], ["--round-to"]),
    "unreachable-target": (
        ["--target-macs", "0.001", "--allocation", "global"],
        ["--target-macs 0.001", "cannot be reached"],
    ),
    "target-1": (["--target-params", "1"], ["--target-params"]),
    "ignore-unknown": (
        ["--ratio", "0.2", "--ignore", "layer9.conv1"],
        ["--ignore layer9.conv1", "no such layer"],
    ),
    "coupled-layers": (
        ["--layer", "layer2.0.conv2", "--layer", "layer2.0.downsample.0", "--ratio", "0.2"],
        ["coupled"],
    ),
}


def assert_clean_failure(code: int, out: str, err: str, target: Path, needles: list[str]) -> None:
    assert code == EXIT_USAGE, err
    assert "Traceback" not in out + err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error:"), err
    for needle in needles:
        assert squash(needle) in squash(err), f"{needle!r} not in {err!r}"
    assert not target.exists() and not target.with_suffix(".json").exists()
    assert not list(target.parent.iterdir())  # not even a temporary file left behind


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_prune_usage_errors(capsys, tmp_path, dense_ckpt, case):
    args, needles = ERROR_CASES[case]
    target = tmp_path / "out" / "pruned.safetensors"
    target.parent.mkdir()
    code, out, err = run_cli(capsys, *["prune", dense_ckpt, "--importance", "l1", *args, "--out", target])
    assert_clean_failure(code, out, err, target, needles)


@pytest.mark.parametrize("which", ["corrupt", "garbage", "not_prunekit", "missing"])
def test_prune_bad_checkpoint(capsys, tmp_path, request, which):
    path = tmp_path / "missing.safetensors" if which == "missing" else request.getfixturevalue(which)
    target = tmp_path / "out" / "pruned.safetensors"
    target.parent.mkdir()
    code, out, err = run_cli(
        capsys, *["prune", path, "--ratio", "0.2", "--importance", "l1", "--out", target]
    )
    assert_clean_failure(code, out, err, target, [str(path)])
    if which == "not_prunekit":
        assert "not a prunekit checkpoint" in err


@pytest.mark.parametrize(
    "args",
    [[], ["--ratio", "0.2", "--target-macs", "0.5"], ["--target-macs", "0.5", "--target-params", "0.5"]],
)
def test_prune_needs_exactly_one_amount(capsys, tmp_path, dense_ckpt, args):
    target = tmp_path / "out" / "pruned.safetensors"
    target.parent.mkdir()
    code = main(["prune", str(dense_ckpt), "--importance", "l1", *args, "--out", str(target)])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1, err
    assert "--target-macs" in err or "--ratio" in err
    assert not list(target.parent.iterdir())


def test_request_validate_through_api(dense_ckpt, tmp_path):
    """The Python API validates too: no output for a request the CLI would reject."""
    from prunekit.errors import UsageError

    target = tmp_path / "api.safetensors"
    with pytest.raises(UsageError, match="exactly one"):
        api.prune_checkpoint(dense_ckpt, PruneRequest(), importance="l1", out=target)
    with pytest.raises(UsageError, match="^layers takes a ratio"):
        api.prune_checkpoint(
            dense_ckpt, PruneRequest(layers=["layer2.0.conv1"], target_macs=0.5), importance="l1", out=target
        )
    assert not target.exists()


# ---------------------------------------------------------------- 7. eval of a pruned checkpoint


@pytest.mark.slow
def test_eval_pruned_checkpoint_latency_and_speedup(capsys, tmp_path, dense_ckpt):
    pruned = tmp_path / "pruned.safetensors"
    assert main([*GLOBAL_HALF, str(dense_ckpt), "--out", str(pruned)]) == 0
    capsys.readouterr()

    results = api.evaluate_checkpoint(pruned, data="synthetic")
    assert set(results["latency"]) == {"batch1", "batch64"}
    for key, batch in (("batch1", 1), ("batch64", 64)):
        lat = results["latency"][key]
        assert lat["batch_size"] == batch
        assert lat["median_ms"] > 0 and lat["images_per_s"] > 0
        assert results["parent_latency"][key]["median_ms"] > 0
        assert results["speedup"][key] > 0
        assert results["speedup"][key] == pytest.approx(
            results["parent_latency"][key]["median_ms"] / lat["median_ms"]
        )
    assert results["test_images"] == 160
    pruned_model = load_checkpoint(pruned).model
    assert results["params"] == count_params(pruned_model) < 11_181_642
    # the dense ResNet-18's widths are all multiples of 16: every count off them is a pruned one
    widths = {m.out_channels for m in pruned_model.modules() if isinstance(m, nn.Conv2d)}
    assert results["off_block_counts"] == sorted(c for c in widths if c % 16) != []

    json_path = tmp_path / "eval.json"
    code, _, err = run_cli(capsys, *["eval", pruned, "--data", "synthetic", "--json", json_path])
    assert code == 0, err
    for runtime in ("PyTorch eager", "ONNX Runtime"):
        for key in ("batch1", "batch64"):
            pattern = rf"latency {key} \({runtime}\): [\d.]+ ms median .*speed-up [\d.]+x vs dense parent"
            assert re.search(pattern, err), err
    saved = json.loads(json_path.read_text())
    assert set(saved["speedup"]) == {"batch1", "batch64"}


def test_eval_dense_checkpoint_has_no_speedup(dense_ckpt):
    results = api.evaluate_checkpoint(dense_ckpt, data="synthetic")
    assert set(results["latency"]) == {"batch1", "batch64"}
    assert "speedup" not in results


def test_output_layer_is_found_by_identity_not_by_a_reused_id():
    """SqueezeNet returns a flattened tensor, no layer's own output. Found by ``id``, that tensor often took the
    id of a freed earlier output (features.10.expand3x3 in 83 passes of 200), which left the classifier
    unprotected and let pruning shrink the class count. The allocator is stirred between passes here."""
    import torchvision

    from prunekit.groups import output_layer

    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_0(num_classes=10).eval()
    found, junk = set(), []
    for i in range(60):
        junk.append([torch.empty(0) for _ in range(i % 7)])
        if i % 3 == 0:
            junk.pop(0)
        found.add(output_layer(model, torch.randn(1, 3, 32, 32)))
    assert found == {"classifier.1"}


def test_a_surgery_no_single_layer_breaks_is_refused_without_naming_one(monkeypatch):
    """When the whole plan breaks the model but every group passes alone, the error names no layer to
    ignore (it used to suggest ignore=['the pruned model'])."""
    import prunekit
    from prunekit import pruning
    from prunekit.surgery import SurgeryError

    def broken(*args, **kwargs):
        raise SurgeryError("the pruned model", "the output shape changed from (1, 10) to (1, 7)")

    monkeypatch.setattr(pruning, "apply_checked", broken)
    monkeypatch.setattr(pruning, "_culprits", lambda *args: [])
    model = build_model("resnet18", 10).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(pruning.UsageError, match="no pruned layer breaks it alone") as info:
        prunekit.prune(model, torch.randn(1, 3, 32, 32), target_macs=0.5)
    assert "ignore" not in str(info.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
