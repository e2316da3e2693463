"""The in-memory API on a user's own nn.Module: prune, refuse without a trace, save/load, recalibrate, fine-tune."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import prunekit
from conftest import PYTHON, REPO_ROOT, subprocess_env
from prunekit.checkpoint import module_shapes
from prunekit.cli import EXIT_USAGE, main
from prunekit.errors import UsageError
from prunekit.measure import count_macs


class ResidualNet(nn.Module):
    """A user's CNN: a stem, one residual block with an identity shortcut, a strided conv and a head."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.bn3 = nn.BatchNorm2d(32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        x = F.relu(self.bn3(self.down(x)))
        return self.head(x.mean(dim=(2, 3)))


class PadShortcutNet(nn.Module):
    """A CIFAR 'option A' shortcut: channels padded with zeros in forward, invisible to the dependency graph."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(16)
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.conv0(x)))
        x = F.relu(self.bn1(self.conv1(x)))
        short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
        x = F.relu(self.bn2(self.conv2(x)) + short)
        return self.fc(F.relu(self.conv3(x)).mean((2, 3)))


class ChannelFoldNet(nn.Module):
    """Channels reshaped in forward: pruning conv1 makes the view impossible."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.conv1(F.relu(self.conv0(x)))
        b, _, h, w = x.shape
        return self.fc(self.conv2(x.view(b, 2, 16, h, w).sum(1)).mean((2, 3)))


def trained_stats(model: nn.Module) -> nn.Module:
    """Give BatchNorms non-trivial statistics and affine parameters, as a trained model has."""
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


def fresh(cls=ResidualNet) -> nn.Module:
    torch.manual_seed(0)
    return trained_stats(cls())


def fingerprint(model: nn.Module) -> dict:
    """Everything a refused request must leave alone: tensors by identity and value, shapes, mode, grads."""
    return {
        "objects": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "values": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "shapes": module_shapes(model),
        "training": [m.training for m in model.modules()],
        "grads": {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = fingerprint(model)
    assert after["objects"] == before["objects"]
    assert after["shapes"] == before["shapes"]
    assert after["training"] == before["training"]
    for k, v in before["values"].items():
        assert torch.equal(after["values"][k], v), k
    for k, g in before["grads"].items():
        assert (g is None) == (after["grads"][k] is None) and (g is None or torch.equal(g, after["grads"][k]))


X = torch.randn(1, 3, 16, 16)


def test_prune_own_model_2x_keeps_outputs_shape_and_measures_macs():
    model = fresh()
    dense_macs = count_macs(model, X)
    report = prunekit.prune(model, X, target_macs=0.5)
    assert report.macs_before == dense_macs
    assert report.macs_after == count_macs(model, X)
    assert report.macs_ratio == pytest.approx(0.5, rel=0.02)
    assert report.params_after < report.params_before
    # the input conv is protected, and with it the residual stream it feeds; the rest shrinks
    assert model.stem.out_channels == model.conv2.out_channels == 16
    assert model.conv1.out_channels < 16 and model.down.out_channels < 32
    assert model.head.out_features == 5  # the output layer, found by tracing, keeps its classes
    with torch.no_grad():
        assert model(torch.randn(4, 3, 16, 16)).shape == (4, 5)
    assert "2.0" in str(report) or "1.9" in str(report)


def test_pruned_model_equals_dense_model_with_channels_zeroed():
    """What surgery must compute: zeroing exactly the removed channels in the dense model gives the same logits."""
    dense = fresh()
    model = copy.deepcopy(dense)
    prunekit.prune(model, X, layers=["conv1"], ratio=0.5, importance="l1")
    kept = [i for i in range(16) if any(torch.equal(dense.conv1.weight[i], w) for w in model.conv1.weight)]
    gone = sorted(set(range(16)) - set(kept))
    assert len(gone) == 8
    with torch.no_grad():
        dense.bn1.weight[gone] = 0
        dense.bn1.bias[gone] = 0
        x = torch.randn(3, 3, 16, 16)
        assert torch.allclose(model(x), dense(x), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_macs": 0.001}, "target_macs 0.001 cannot be reached"),
        ({"target_macs": 1.5}, "target_macs must be between 0 and 1"),
        ({"ratio": 0.3, "target_macs": 0.5}, "exactly one of ratio, target_macs, target_params"),
        ({"layers": ["conv9"], "ratio": 0.3}, r"layers conv9: no such layer. Did you mean conv"),
        ({"layers": ["bn1"], "ratio": 0.3}, "layers bn1 is a BatchNorm2d, not a prunable conv"),
        ({"ratio": 0.3, "ignore": ["nope"]}, "ignore nope: no such layer"),
        ({"layers": ["conv1"], "ratio": 0.3}, "needs calibration"),  # activation, the default for layers
        ({"ratio": 0.3, "importance": "taylor", "calibration": [torch.randn(2, 3, 16, 16)]}, "labelled"),
        ({"ratio": 0.3, "importance": "nope"}, "unknown importance criterion"),
        ({"ratio": 0.3, "round_to": 0}, "round_to must be at least 1"),
    ],
)
def test_refused_request_leaves_model_exactly_as_it_was(kwargs, message):
    model = fresh()
    model.train()  # the caller's mode is part of the state too
    model(torch.randn(2, 3, 16, 16)).sum().backward()  # and so are its gradients
    before = fingerprint(model)
    with pytest.raises(UsageError, match=message) as info:
        prunekit.prune(model, X, **kwargs)
    assert "--" not in str(info.value)  # Python names arguments, not flags
    assert_unchanged(model, before)


def test_target_missed_after_surgery_is_undone(monkeypatch):
    """A plan whose measured result misses the target is rolled back, not handed back half pruned."""
    import prunekit.pruning as prune_module

    model = fresh()
    before = fingerprint(model)
    _inflate_after_dense(monkeypatch, prune_module, "prunekit")  # a 'measured' miss
    with pytest.raises(UsageError, match="closest prunekit got"):
        prunekit.prune(model, X, target_macs=0.5)
    assert_unchanged(model, before)


def _inflate_after_dense(monkeypatch, prune_module, counter: str) -> list[int]:
    """Make ``counter`` read 1.5x on every pruned model (the dense count is the first call); returns the
    list the calls are counted in."""
    real, calls = prune_module.macs_by_counters, []

    def counting(m, x):
        counts = real(m, x)
        calls.append(1)
        return {**counts, counter: int(counts[counter] * 1.5)} if len(calls) > 1 else counts

    monkeypatch.setattr(prune_module, "macs_by_counters", counting)
    return calls


def test_target_missed_by_another_counter_is_replanned_then_undone(monkeypatch):
    """A MACs target is also measured by Torch-Pruning's counter: a miss there alone is planned again
    (three tries in all), then refused with the counter named, and the model is left as it was."""
    import prunekit.pruning as prune_module

    model = fresh()
    before = fingerprint(model)
    calls = _inflate_after_dense(monkeypatch, prune_module, "torch_pruning")
    with pytest.raises(UsageError, match="torch_pruning's reads"):
        prunekit.prune(model, X, target_macs=0.5)
    assert len(calls) == 1 + 3
    assert_unchanged(model, before)


@pytest.mark.parametrize("cls", [PadShortcutNet, ChannelFoldNet])
@pytest.mark.parametrize("kwargs", [{"target_macs": 0.6}, {"ratio": 0.3}])
def test_functional_channel_ops_are_refused_naming_the_layer(cls, kwargs):
    model = fresh(cls)
    before = fingerprint(model)
    with pytest.raises(UsageError, match=r"pruning conv1 breaks the model.*ignore=\['conv1'\]") as info:
        prunekit.prune(model, X, **kwargs)
    assert "unchanged" in str(info.value)
    assert_unchanged(model, before)
    with torch.no_grad():
        model(X)  # still runs


def test_following_the_refusals_advice_prunes_correctly():
    """With the named layer left out, the rest is pruned and still equals the zeroed dense model."""
    model = fresh(PadShortcutNet)
    report = prunekit.prune(model, X, ratio=0.3, ignore=["conv1"])
    assert "conv1" not in report.removed and report.removed == {"conv3": 9}
    with torch.no_grad():
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_cli_names_flags_python_names_arguments(tmp_path, capsys):
    with pytest.raises(UsageError, match=r"^ratio must be"):
        prunekit.prune(fresh(), X, ratio=2.0)
    code = main(["prune", str(tmp_path / "missing.safetensors"), "--ratio", "2"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "--ratio must be" in err


def test_activation_and_taylor_with_calibration_batches():
    batches = [(torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))) for _ in range(2)]
    for importance in ("activation", "activation-post", "taylor"):
        model = fresh()
        report = prunekit.prune(model, X, ratio=0.25, importance=importance, calibration=batches)
        assert report.importance == importance and report.removed
        assert all(p.grad is None for p in model.parameters())  # scoring gradients are not left behind


def test_network_wide_default_scores_as_refit_with_images_and_as_group_l2_without():
    """Not only the label: with images the default prunes to exactly the weights naming ``refit`` gives
    (which differ from group-l2's); without, to group-l2's."""
    batches = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    pruned = {}
    for name, kwargs in {
        "default": {"calibration": batches},
        "refit": {"calibration": batches, "importance": "refit"},
        "group-l2": {"importance": "group-l2"},
        "no images": {},
    }.items():
        model = fresh()
        report = prunekit.prune(model, X, ratio=0.25, reconstruct=False, **kwargs)
        pruned[name] = (report.importance, [t.clone() for t in model.state_dict().values()])
    assert pruned["default"][0] == "refit" and pruned["no images"][0] == "group-l2"

    def same(a: str, b: str) -> bool:  # torch.equal is False for tensors of different shapes
        return all(torch.equal(x, y) for x, y in zip(pruned[a][1], pruned[b][1], strict=True))

    assert same("default", "refit") and not same("default", "group-l2")
    assert same("no images", "group-l2")


@pytest.mark.slow
def test_save_and_load_own_class_in_fresh_process(tmp_path):
    model = fresh()
    prunekit.prune(model, X, target_macs=0.5)
    path = prunekit.save(model, tmp_path / "net.safetensors", meta={"note": "mine"})
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    torch.save({"x": x, "y": expected}, tmp_path / "io.pt")
    script = (
        "import sys, torch, prunekit\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_core import ResidualNet\n"
        f"m = prunekit.load({str(path)!r}, model=ResidualNet())\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)\n"
        "assert m.prunekit_meta['note'] == 'mine'\n"
        "with torch.no_grad():\n"
        "    assert torch.equal(m(io['x']), io['y'])\n"
        "print('same')\n"
    )
    run = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, env=subprocess_env())
    assert run.returncode == 0, run.stderr
    assert "same" in run.stdout


def test_load_own_class_without_model_says_how(tmp_path):
    path = prunekit.save(fresh(), tmp_path / "net.safetensors")
    with pytest.raises(UsageError, match=r"model=ResidualNet\(\.\.\.\)"):
        prunekit.load(path)
    with pytest.raises(UsageError, match="do not fit"):
        prunekit.load(path, model=PadShortcutNet())


@pytest.mark.slow
def test_readme_example_runs_and_reloads_in_a_fresh_process(tmp_path):
    run = subprocess.run(
        [PYTHON, str(REPO_ROOT / "examples" / "own_model.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "outputs identical = True" in run.stdout
    assert "2.0" in run.stdout or "1.9" in run.stdout


def test_recalibrate_bn_matches_the_batch_statistics():
    model = fresh()
    x = torch.randn(32, 3, 16, 16)
    seen = prunekit.recalibrate_bn(model, [(x[:16], None), (x[16:], None)])
    assert seen == 32
    with torch.no_grad():
        stem = model.stem(x)
    assert torch.allclose(model.bn0.running_mean, stem.mean((0, 2, 3)), atol=1e-5)
    assert not model.training  # the caller's mode is restored


def _loader(n: int, seed: int) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 5
    images = torch.randn(n, 3, 16, 16, generator=gen) * 0.3
    images[torch.arange(n), labels % 3, :, :] += 1.0 + labels[:, None, None] * 0.3  # learnable
    return DataLoader(TensorDataset(images, labels), batch_size=16, shuffle=False)


def test_finetune_from_own_dataloader_learns_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = fresh()
    prunekit.prune(model, X, target_macs=0.5)
    train, val = _loader(160, 0), _loader(80, 1)
    before = prunekit.finetune(model, train, val=val, epochs=1, lr=1e-9, recalibrate=False).test["accuracy"]
    result = prunekit.finetune(model, train, val=val, epochs=4, lr=0.05)
    assert result.test["accuracy"] > max(before, 0.5)
    assert len(result.history) == 4
    assert not list(tmp_path.iterdir())  # no out: nothing written


def test_finetune_takes_the_full_recipes_distilling_rate_with_a_teacher_on_a_small_split(monkeypatch):
    """``prunekit.finetune`` with a teacher on a small split fine-tunes at the ``full`` recipe's distilling
    rate (0.01), without one or on a large split (a DataLoader's or a list's) at its plain rate (0.025), as
    the command line does."""
    import prunekit.finetuning
    import prunekit.train

    seen = []
    monkeypatch.setattr(prunekit.train, "fit", lambda model, train, config, **_: seen.append(config.lr))
    for teacher in (None, fresh()):
        prunekit.finetune(fresh(), _loader(16, 0), recipe="full", teacher=teacher, recalibrate=False)
    assert seen == [0.025, 0.01]
    monkeypatch.setattr(prunekit.finetuning, "DISTILL_BELOW", 16)  # 16 images is now "large"
    for train in (_loader(16, 0), list(_loader(16, 0)), _loader(8, 0)):
        prunekit.finetune(fresh(), train, recipe="full", teacher=fresh(), recalibrate=False)
    assert seen[2:] == [0.025, 0.025, 0.01]


def test_finetune_with_out_keeps_checkpoint_and_refuses_bad_input(tmp_path):
    model = fresh()
    prunekit.finetune(model, _loader(64, 0), epochs=1, lr=0.01, out=tmp_path / "ft")
    assert (tmp_path / "ft" / "model.safetensors").exists()
    with pytest.raises(UsageError, match="need a length"):
        prunekit.finetune(model, (b for b in _loader(64, 0)), epochs=1, recalibrate=False)
    with pytest.raises(UsageError, match="epochs must be at least 1"):
        prunekit.finetune(model, _loader(64, 0), epochs=0)
