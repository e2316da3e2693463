"""Importance criteria: each removes the channels it should (planted zeros), seeds matter, all criteria run."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

from prunekit.api import calibration_batches, model_meta
from prunekit.checkpoint import load_checkpoint, save_checkpoint
from prunekit.cli import main
from prunekit.data import synthetic_data
from prunekit.errors import UsageError
from prunekit.importance import CRITERIA, make_importance
from prunekit.models import build_model
from prunekit.pruning import PruneRequest, prune_model

LAYER = "layer2.0.conv1"
CHANNELS = 128
PLANTED = [3, 17, 40, 41, 77, 100, 126, 127]  # 8 of 128: ratio 1/16 removes exactly 8
RATIO = len(PLANTED) / CHANNELS


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", 10).eval()


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory, resnet18):
    bundle = synthetic_data(train_per_class=1, test_per_class=1)
    meta = model_meta(
        "resnet18", bundle, {"spec": "synthetic", "data_dir": None, "subset": None, "image_size": None}
    )
    return save_checkpoint(tmp_path_factory.mktemp("dense") / "resnet18.safetensors", resnet18, meta)


def prune_layer(model: nn.Module, criterion: str, ratio: float = RATIO, seed: int = 0) -> dict[str, int]:
    return prune_model(
        model,
        PruneRequest(layers=[LAYER], ratio=ratio),
        make_importance(criterion, seed),
        torch.zeros(1, 3, 32, 32),
    ).removed


def kept_channels(original: nn.Module, pruned: nn.Module) -> list[int]:
    """Which of the layer's original filters survive, matched by value."""
    before = original.layer2[0].conv1.weight.detach()
    kept = []
    for filt in pruned.layer2[0].conv1.weight.detach():
        matches = [i for i in range(len(before)) if torch.equal(before[i], filt)]
        assert len(matches) == 1
        kept.append(matches[0])
    return kept


def expected_kept(removed: list[int]) -> list[int]:
    return [i for i in range(CHANNELS) if i not in removed]


def test_planted_filters_are_nonzero_elsewhere(resnet18):
    """The planted channels are the only zero filters, so the checks below are meaningful."""
    norms = resnet18.layer2[0].conv1.weight.detach().abs().flatten(1).sum(1)
    assert (norms > 0).all()


@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_norm_removes_zeroed_filters(resnet18, criterion):
    model = copy.deepcopy(resnet18)
    with torch.no_grad():
        model.layer2[0].conv1.weight[PLANTED] = 0
    reference = copy.deepcopy(model)
    assert prune_layer(model, criterion) == {LAYER: len(PLANTED)}
    assert kept_channels(reference, model) == expected_kept(PLANTED)
    assert not (model.layer2[0].conv1.weight.flatten(1).abs().sum(1) == 0).any()
    # the coupled BatchNorm and the next conv's inputs lose the same channels
    keep = torch.tensor(expected_kept(PLANTED))
    assert torch.equal(model.layer2[0].bn1.running_mean, reference.layer2[0].bn1.running_mean[keep])
    assert torch.equal(model.layer2[0].conv2.weight, reference.layer2[0].conv2.weight[:, keep])


def test_l1_removes_smallest_filters_not_first(resnet18):
    """Without planted zeros, l1 removes exactly the filters with the smallest L1 norms."""
    model = copy.deepcopy(resnet18)
    norms = resnet18.layer2[0].conv1.weight.detach().double().abs().flatten(1).sum(1)
    prune_layer(model, "l1", ratio=0.25)
    smallest = torch.argsort(norms)[:32].tolist()
    assert smallest != list(range(32))
    assert kept_channels(resnet18, model) == expected_kept(smallest)


def test_bn_removes_zero_gamma_channels(resnet18):
    model = copy.deepcopy(resnet18)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        model.layer2[0].bn1.weight.copy_(torch.rand(CHANNELS, generator=gen) + 0.5)
        model.layer2[0].bn1.weight[PLANTED] = 0
    reference = copy.deepcopy(model)
    # l1 on the same model would pick other channels: the filters themselves are untouched
    l1_model = copy.deepcopy(model)
    prune_layer(l1_model, "l1")
    assert kept_channels(reference, l1_model) != expected_kept(PLANTED)

    assert prune_layer(model, "bn") == {LAYER: len(PLANTED)}
    assert kept_channels(reference, model) == expected_kept(PLANTED)
    assert (model.layer2[0].bn1.weight != 0).all()


def test_random_is_seeded(resnet18):
    def selection(seed: int) -> list[int]:
        model = copy.deepcopy(resnet18)
        prune_layer(model, "random", ratio=0.5, seed=seed)
        return kept_channels(resnet18, model)

    first, again, other = selection(1), selection(1), selection(2)
    assert len(first) == 64
    assert first == again
    assert first != other


def test_activation_post_scores_relu_of_batchnorm(tmp_path, dense_ckpt, resnet18):
    """activation-post ranks channels by mean ReLU(BN(conv)) on the calibration batch, not the raw output."""
    # make the BatchNorm matter: shift and scale so ReLU(BN(x)) ranks channels differently from x
    model = copy.deepcopy(resnet18)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        bn = model.layer2[0].bn1
        bn.weight.copy_(torch.rand(CHANNELS, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(CHANNELS, generator=gen) * 0.3)
    meta = load_checkpoint(dense_ckpt).meta
    ckpt = save_checkpoint(tmp_path / "shifted.safetensors", model, meta)
    out = tmp_path / "post.safetensors"
    argv = [str(ckpt), "--layer", LAYER, "--ratio", "0.25", "--calibration", "random", "--out", str(out)]
    assert main(["prune", *argv, "--importance", "activation-post"]) == 0

    x = calibration_batches(meta, None, 0)[0][0]
    captured = {}

    def hook(_module, _inputs, output):
        captured["post"] = torch.relu(output.detach()).double().mean(dim=(0, 2, 3))

    handle = model.layer2[0].bn1.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    order = torch.argsort(captured["post"])
    assert captured["post"][order[31]] < captured["post"][order[32]]  # a well-defined lowest 32
    pruned = load_checkpoint(out).model
    assert pruned.layer2[0].conv1.out_channels == 96
    assert kept_channels(model, pruned) == expected_kept(order[:32].tolist())

    raw = tmp_path / "raw.safetensors"
    assert main(["prune", *argv[:-1], str(raw), "--importance", "activation"]) == 0
    assert kept_channels(model, load_checkpoint(raw).model) != kept_channels(model, pruned)


@pytest.mark.slow
def test_taylor_on_data_gives_a_valid_model(tmp_path, dense_ckpt):
    out = tmp_path / "taylor.safetensors"
    code = main(
        [
            "prune",
            str(dense_ckpt),
            "--ratio",
            "0.3",
            "--importance",
            "taylor",
            "--calibration-images",
            "32",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["importance"] == "taylor" and report["calibration"] == "data"
    assert report["calibration_images"] == 32
    assert report["params"]["after"] < report["params"]["before"]
    model = load_checkpoint(out).model
    assert model.layer2[0].conv1.out_channels == 128 - int(128 * 0.3)
    assert not any(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        y = model(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10) and torch.isfinite(y).all()


def test_taylor_selection_differs_from_l1(tmp_path, dense_ckpt, resnet18):
    """Taylor scores come from gradients, not weights: on the same layer it keeps a different set than l1."""
    kept = {}
    for criterion in ("taylor", "l1"):
        out = tmp_path / f"{criterion}.safetensors"
        argv = ["prune", str(dense_ckpt), "--layer", LAYER, "--ratio", "0.25", "--importance", criterion]
        assert main([*argv, "--calibration-images", "32", "--out", str(out)]) == 0
        kept[criterion] = kept_channels(resnet18, load_checkpoint(out).model)
    assert len(kept["taylor"]) == 96
    assert kept["taylor"] != kept["l1"]


def test_taylor_rejects_random_calibration(capsys, tmp_path, dense_ckpt):
    out = tmp_path / "t.safetensors"
    code = main(
        [
            "prune",
            str(dense_ckpt),
            "--ratio",
            "0.2",
            "--importance",
            "taylor",
            "--calibration",
            "random",
            "--out",
            str(out),
        ]
    )
    assert code == 2
    assert capsys.readouterr().err.startswith("error:")
    assert not out.exists()


def test_unknown_criterion():
    with pytest.raises(UsageError, match="unknown importance criterion"):
        make_importance("magnitude")
    assert {
        "activation",
        "activation-post",
        "l1",
        "l2",
        "group-l2",
        "refit",
        "bn",
        "taylor",
        "random",
    } == set(CRITERIA)


def test_refit_scores_are_the_error_a_least_squares_refit_leaves():
    """Each input channel's score equals the output error of re-fitting the layer without it (ridge least
    squares towards its weights, solved directly), on the images the scores were computed from."""
    from prunekit.removal import removal_errors

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding=1, bias=False)
    base = torch.randn(16, 4, 8, 8)
    x = torch.cat([base, base[:, :2] + 0.1 * torch.randn(16, 2, 8, 8)], 1)  # channels 4, 5 near 0, 1
    scores = removal_errors(nn.Sequential(conv), x)[conv].double()
    cols = nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 54).double()  # rows x (c, tap)
    w = conv.weight.detach().reshape(5, 54).double()
    y, gram = cols @ w.T, cols.T @ cols
    lam = 0.01 * float(torch.diagonal(gram).mean())
    for c in range(6):
        keep = torch.tensor([i // 9 != c for i in range(54)])
        g = gram[keep][:, keep] + lam * torch.eye(int(keep.sum()), dtype=torch.float64)
        refit = torch.linalg.solve(g, cols[:, keep].T @ y + lam * w[:, keep].T).T
        error = ((y - cols[:, keep] @ refit.T) ** 2).sum() + lam * ((refit - w[:, keep]) ** 2).sum()
        assert float(scores[c]) == pytest.approx(float(error), rel=1e-4)
    assert max(scores[4], scores[5]) < min(scores[2], scores[3])  # a near-copy costs little to remove


def test_refit_removes_a_duplicated_channel_that_l2_keeps():
    """Two identical filters of large norm: l2 keeps both, refit removes one (the reader re-fits it away)."""
    import prunekit

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.b(self.a(x).relu()).relu().mean((2, 3)))

    torch.manual_seed(0)
    base = Net()
    nets = {name: copy.deepcopy(base) for name in ("l2", "refit")}
    for net in nets.values():
        with torch.no_grad():
            net.a.weight[7] = net.a.weight[0] = net.a.weight[0] * 5
            net.a.bias.fill_(1.0)  # no channel is dead after the ReLU: each one carries information
    images = [torch.randn(32, 3, 12, 12)]
    duplicate = nets["l2"].a.weight[0].detach().clone()
    copies = {}
    for name, net in nets.items():
        prunekit.prune(net, images[0][:1], layers=["a"], ratio=0.125, importance=name, calibration=images)
        assert net.a.out_channels == 7
        copies[name] = sum(torch.equal(f, duplicate) for f in net.a.weight.detach())
    assert copies == {"l2": 2, "refit": 1}


def test_command_line_default_is_refit_on_training_images_and_group_l2_on_noise(tmp_path, dense_ckpt):
    argv = ["prune", str(dense_ckpt), "--ratio", "0.25", "--no-reconstruct", "--calibration-images", "16"]
    for calibration, expected in (("data", "refit"), ("random", "group-l2")):
        out = tmp_path / f"{calibration}.safetensors"
        assert main([*argv, "--calibration", calibration, "--out", str(out)]) == 0
        assert json.loads(out.with_suffix(".json").read_text())["importance"] == expected
