"""Fine-tuning: freezing policies freeze what they say, distillation, BatchNorm recalibration, the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import prunekit.losses
from prunekit import api
from prunekit.checkpoint import load_checkpoint, save_checkpoint
from prunekit.cli import EXIT_USAGE, main
from prunekit.data import load_data
from prunekit.errors import UsageError
from prunekit.finetuning import pruned_blocks, recalibrate_batchnorm, recipe, trainable_filter
from prunekit.models import build_model
from prunekit.pruning import PruneRequest
from prunekit.train import MODEL_FILE, TrainConfig, distillation_loss, fit

SUBSET = 8
PRUNED_LAYERS = {"layer2.0.conv1", "layer2.0.bn1", "layer2.0.conv2"}
TRAINABLE_PREFIXES = ("layer2.0.", "fc.")


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory) -> Path:
    """An untrained resnet18 checkpoint that records ``--data synthetic --subset 8``."""
    bundle = load_data("synthetic", subset=SUBSET)
    torch.manual_seed(0)
    model = build_model("resnet18", len(bundle.classes))
    meta = api.model_meta(
        "resnet18", bundle, {"spec": "synthetic", "data_dir": None, "subset": SUBSET, "image_size": None}
    )
    return save_checkpoint(tmp_path_factory.mktemp("dense") / "dense.safetensors", model, meta)


@pytest.fixture(scope="module")
def pruned_ckpt(dense_ckpt, tmp_path_factory) -> Path:
    """The seed's pruning: 20 % of layer2.0.conv1 (l1 norm, so no calibration pass)."""
    out = tmp_path_factory.mktemp("pruned") / "pruned.safetensors"
    api.prune_checkpoint(
        dense_ckpt, PruneRequest(layers=["layer2.0.conv1"], ratio=0.2), importance="l1", out=out
    )
    return out


@pytest.fixture
def count_distillation(monkeypatch) -> list[tuple]:
    """Replace ``prunekit.losses.distillation_loss`` (the one the loop calls) with a wrapper recording
    (student, teacher, T) per call."""
    calls: list[tuple] = []
    real = prunekit.losses.distillation_loss

    def counting(student, teacher, temperature):
        calls.append((student.shape, teacher.shape, temperature))
        return real(student, teacher, temperature)

    monkeypatch.setattr(prunekit.losses, "distillation_loss", counting)
    return calls


def tiny_fit_config(**overrides) -> TrainConfig:
    values = dict(epochs=1, batch_size=10, optimizer="adam", lr=1e-3, bf16=False, device="cpu", seed=0)
    values.update(overrides)
    return TrainConfig(**values)


# ---------------------------------------------------------------- freezing policies


def test_pruning_records_the_changed_layers(pruned_ckpt):
    meta = load_checkpoint(pruned_ckpt).meta
    assert set(meta["pruning"][0]["changed_layers"]) == PRUNED_LAYERS
    assert pruned_blocks(PRUNED_LAYERS) == ["layer2.0"]


def test_seed_policy_selects_exactly_the_pruned_block_and_the_classifier(pruned_ckpt):
    model = load_checkpoint(pruned_ckpt).model
    names = [n for n, _ in model.named_parameters()]
    trainable = trainable_filter("blog", sorted(PRUNED_LAYERS), "fc")
    assert trainable is not None
    selected = {n for n in names if trainable(n)}
    expected = {n for n in names if n.startswith(TRAINABLE_PREFIXES)}
    assert selected == expected
    assert {
        "layer2.0.conv1.weight",
        "layer2.0.bn1.weight",
        "layer2.0.downsample.1.bias",
        "fc.weight",
    } <= selected
    # The seed's rule (`'bn' in name`) would also unfreeze every other BatchNorm; prunekit must not.
    for frozen in (
        "bn1.weight",
        "bn1.bias",
        "layer1.0.bn1.weight",
        "layer2.1.bn1.weight",
        "layer4.1.bn2.bias",
    ):
        assert frozen in names and frozen not in selected
    seed_rule = {n for n in names if n.startswith(TRAINABLE_PREFIXES) or "bn" in n}
    assert seed_rule - selected  # the difference the docstring promises is real


def test_seed_policy_for_a_pruned_top_level_layer():
    model = build_model("resnet18", 10)
    names = [n for n, _ in model.named_parameters()]
    trainable = trainable_filter("blog", ["conv1", "bn1"], "fc")
    assert {n for n in names if trainable(n)} == {
        "conv1.weight",
        "bn1.weight",
        "bn1.bias",
        "fc.weight",
        "fc.bias",
    }


def test_none_policy_trains_everything_and_unknown_policies_are_usage_errors():
    assert trainable_filter("none", sorted(PRUNED_LAYERS), "fc") is None
    with pytest.raises(UsageError, match="^freeze must be one of"):
        trainable_filter("bogus", sorted(PRUNED_LAYERS), "fc")


def test_recipes():
    cfg, freeze = recipe("blog")
    assert (cfg.optimizer, cfg.lr, cfg.epochs, freeze) == ("adam", 1e-4, 10, "blog")
    cfg, freeze = recipe("blog", epochs=3, lr=None, freeze="none")
    assert (cfg.epochs, cfg.lr, freeze) == (3, 1e-4, "none")
    assert recipe("full")[1] == "none"
    # the full recipe's peak lr: 0.025, 0.01 when distilling on a small split; an explicit one wins either way
    assert (recipe("full")[0].lr, recipe("full", distilling_few=True)[0].lr) == (0.025, 0.01)
    assert recipe("full", distilling_few=True, lr=0.05)[0].lr == recipe("full", lr=0.05)[0].lr == 0.05
    assert recipe("blog", distilling_few=True) == recipe("blog")
    with pytest.raises(UsageError, match="recipe"):
        recipe("bogus")


def test_frozen_weights_and_statistics_stay_bitwise_unchanged(pruned_ckpt, tmp_path, count_distillation):
    ckpt = load_checkpoint(pruned_ckpt)
    model = ckpt.model
    bundle = load_data("synthetic", subset=2)  # 20 images, 2 steps of 10
    before = snapshot(model)
    trainable = trainable_filter("blog", sorted(PRUNED_LAYERS), "fc")
    result = fit(model, bundle, tiny_fit_config(), tmp_path / "ft", ckpt.meta, trainable=trainable)
    after = snapshot(result.model.cpu())
    assert before.keys() == after.keys()

    frozen = [k for k in before if not k.startswith(TRAINABLE_PREFIXES)]
    changed = [k for k in frozen if not torch.equal(before[k], after[k])]
    assert not changed, f"frozen tensors changed: {changed[:5]}"
    # Frozen BatchNorms keep their running statistics too (they stay in eval mode while the rest trains).
    for key in ("layer1.0.bn1.running_mean", "bn1.running_var", "layer3.1.bn2.running_mean"):
        assert key in frozen and torch.equal(before[key], after[key])

    params = [n for n, _ in model.named_parameters() if n.startswith(TRAINABLE_PREFIXES)]
    unchanged = [n for n in params if torch.equal(before[n], after[n])]
    assert params and not unchanged, f"trainable parameters did not train: {unchanged}"
    # The pruned block's own BatchNorms train, so their statistics follow the data.
    assert not torch.equal(before["layer2.0.bn1.running_mean"], after["layer2.0.bn1.running_mean"])
    assert count_distillation == []  # no teacher, no distillation


# ---------------------------------------------------------------- distillation


def test_fit_distils_from_a_teacher(pruned_ckpt, dense_ckpt, tmp_path, count_distillation):
    ckpt = load_checkpoint(pruned_ckpt)
    teacher = load_checkpoint(dense_ckpt).model
    teacher.train()  # fit must put it in eval mode, or its BatchNorm statistics would drift
    teacher_before = snapshot(teacher)
    bundle = load_data("synthetic", subset=2)
    fit(
        ckpt.model,
        bundle,
        tiny_fit_config(distill_temperature=3.0),
        tmp_path / "kd",
        ckpt.meta,
        teacher=teacher,
        trainable=None,
    )
    assert len(count_distillation) == 2  # one call per optimizer step
    for student_shape, teacher_shape, temperature in count_distillation:
        assert student_shape == teacher_shape == (10, 10)
        assert temperature == 3.0
    teacher_after = snapshot(teacher.cpu())
    assert all(torch.equal(teacher_before[k], teacher_after[k]) for k in teacher_before)


def test_distillation_loss():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(6, 10, generator=gen)
    teacher = torch.randn(6, 10, generator=gen)
    assert distillation_loss(student, student.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    # Shifting logits by a constant changes no probability.
    assert distillation_loss(student, student + 3.0, 4.0).item() == pytest.approx(0.0, abs=1e-5)
    loss = distillation_loss(student, teacher, 2.0)
    assert loss.item() > 0
    p_t = F.softmax(teacher / 2.0, 1)
    manual = (p_t * (p_t.log() - F.log_softmax(student / 2.0, 1))).sum(1).mean() * 4.0
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)


# ---------------------------------------------------------------- BatchNorm recalibration


def test_recalibration_sets_the_statistics_of_the_data():
    torch.manual_seed(0)
    model = build_model("resnet18", 10).eval()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.running_mean.fill_(5.0)
        m.running_var.fill_(100.0)
    model.bn1.momentum = 0.3
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 3, 32, 32, generator=gen) for _ in range(3)]

    assert recalibrate_batchnorm(model, batches) == 24

    with torch.no_grad():
        outs = [model.conv1(x) for x in batches]
    # momentum None: a cumulative average of the per-batch statistics (equal batch sizes here).
    expected_mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    expected_var = torch.stack([o.var((0, 2, 3), unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(model.bn1.running_mean, expected_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.bn1.running_var, expected_var, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.bn1.running_mean, torch.cat(outs).mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert int(model.bn1.num_batches_tracked) == 3
    for m in norms:  # every BatchNorm, deep ones included, was re-estimated
        assert not torch.any(m.running_mean == 5.0) and not torch.any(m.running_var == 100.0)
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert model.bn1.momentum == 0.3
    assert all(m.momentum == 0.1 for m in norms if m is not model.bn1)
    assert not model.training


def test_recalibration_restores_momentum_and_mode_on_error():
    model = build_model("resnet18", 10).eval()

    def failing():
        yield torch.randn(2, 3, 32, 32)
        raise RuntimeError("data went away")

    with pytest.raises(RuntimeError, match="went away"):
        recalibrate_batchnorm(model, failing())
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not model.training


class _DropThenNorm(torch.nn.Module):
    """Dropout feeding a BatchNorm, BatchNorm momentum 0.01 (as in TF-ported models), then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.drop = torch.nn.Dropout(0.5)
        self.bn = torch.nn.BatchNorm2d(8, momentum=0.01)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.drop(self.conv(x))).relu().mean((2, 3)))


def test_recalibration_keeps_dropout_off():
    """Statistics are those of the inputs at inference: with dropout on, the variance would be inflated."""
    torch.manual_seed(0)
    model, x = _DropThenNorm(), torch.randn(64, 3, 8, 8)
    recalibrate_batchnorm(model, [x])
    with torch.no_grad():
        features = model.conv(x)
    torch.testing.assert_close(model.bn.running_var, features.var((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert model.training and model.drop.training  # every module's mode as it was


def _finetuned(precise_bn_images: int, trainable=None) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = _DropThenNorm()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 8, 8, generator=gen) * 3 + 2, torch.randint(0, 4, (16,), generator=gen))]
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, schedule="constant", bf16=False, device="cpu")
    cfg.precise_bn_images = precise_bn_images
    fit(model, batches * 4, cfg, trainable=trainable)
    return model.eval(), batches[0][0]


def test_precise_bn_matches_the_final_weights_and_spares_frozen_norms():
    """After the last epoch the running statistics are re-estimated with the final weights; without it,
    momentum 0.01 leaves them far behind. A BatchNorm the freezing policy keeps is not touched."""
    lagging, x = _finetuned(0)
    precise, _ = _finetuned(16)
    with torch.no_grad():
        target = precise.conv(x).mean((0, 2, 3))
        lag_target = lagging.conv(x).mean((0, 2, 3))
    torch.testing.assert_close(precise.bn.running_mean, target, rtol=1e-4, atol=1e-5)
    assert (lagging.bn.running_mean - lag_target).abs().max() > 0.1
    torch.manual_seed(0)
    before = _DropThenNorm().bn.running_var.clone()
    frozen, _ = _finetuned(16, trainable=lambda name: name.startswith("fc."))
    assert torch.equal(frozen.bn.running_var, before)
    assert recipe("full")[0].precise_bn_images == 512 and recipe("blog")[0].precise_bn_images == 0


def test_the_default_recipe_follows_what_was_pruned(dense_ckpt, tmp_path):
    """blog for a model pruned only at named layers (the blog's experiment), full for a target, a ratio
    over the network or no record; the command and Python read the same rule."""
    from prunekit.finetuning import default_recipe

    assert default_recipe([{"request": {"layers": ["layer2.0.conv1"], "ratio": 0.2}}]) == "blog"
    assert default_recipe([{"request": {"layers": [], "target_macs": 0.5}}]) == "full"
    assert default_recipe([{"request": {"layers": ["a"]}}, {"request": {"layers": []}}]) == "full"
    assert default_recipe(None) == default_recipe([]) == "full"
    target = tmp_path / "target.safetensors"
    api.prune_checkpoint(dense_ckpt, PruneRequest(target_macs=0.6), importance="l1", out=target)
    tuned = api.finetune_checkpoint(
        target,
        tmp_path / "ft",
        epochs=1,
        recalibration_images=32,
        device="cpu",
        data="synthetic",
        subset=SUBSET,
    )
    settings = load_checkpoint(tmp_path / "ft" / MODEL_FILE).meta["finetune"]
    assert settings["recipe"] == "full" and settings["freeze"] == "none" and tuned


# ---------------------------------------------------------------- the command


def test_finetune_command(pruned_ckpt, tmp_path, capsys):
    out = tmp_path / "ft"
    argv = ["finetune", pruned_ckpt, "--data", "synthetic", "--subset", SUBSET, "--epochs", "1"]
    argv += ["--recalibration-images", "64", "--device", "cpu", "--out", out]
    assert main([str(a) for a in argv]) == 0
    err = capsys.readouterr().err
    accuracies = dict(re.findall(r"^\s*(pruned|recalibrated|finetuned): (\d+\.\d\d)%$", err, re.M))
    assert set(accuracies) == {"pruned", "recalibrated", "finetuned"}, err
    assert (out / MODEL_FILE).is_file()

    pruned = load_checkpoint(pruned_ckpt)
    tuned = load_checkpoint(out / MODEL_FILE)
    settings = tuned.meta["finetune"]
    assert settings["freeze"] == "blog" and settings["recipe"] == "blog" and settings["recalibrate"]
    assert settings["accuracy"]["pruned"] == pytest.approx(float(accuracies["pruned"]) / 100, abs=5e-5)
    assert len(tuned.meta["history"]) == 1
    assert tuned.meta["shapes"]["layer2.0.conv1"] == pruned.meta["shapes"]["layer2.0.conv1"]
    p, t = pruned.model.state_dict(), tuned.model.state_dict()
    assert torch.equal(p["layer1.0.conv1.weight"], t["layer1.0.conv1.weight"])  # frozen
    assert not torch.equal(p["layer2.0.conv1.weight"], t["layer2.0.conv1.weight"])  # trained
    assert not torch.equal(p["layer1.0.bn1.running_mean"], t["layer1.0.bn1.running_mean"])  # recalibrated


def test_finetune_command_rejects_an_unknown_freeze_policy(pruned_ckpt, tmp_path, capsys):
    code = main(["finetune", str(pruned_ckpt), "--freeze", "bogus", "--out", str(tmp_path / "ft")])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "error:" in err and "--freeze" in err
    assert not (tmp_path / "ft").exists()


def test_finetune_api_rejects_an_unknown_freeze_policy(pruned_ckpt, tmp_path):
    with pytest.raises(UsageError, match="^freeze must be one of"):
        api.finetune_checkpoint(pruned_ckpt, tmp_path / "ft", freeze="bogus")


def test_finetune_command_with_a_missing_checkpoint(tmp_path, capsys):
    code = main(["finetune", str(tmp_path / "nope.safetensors"), "--data", "synthetic"])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert re.search(r"^error: .*nope\.safetensors", err, re.M), err
    assert "Traceback" not in err


# ---------------------------------------------------------------- distillation by default on small sets


def _finetune_settings(ckpt: Path, out: Path, **kwargs) -> dict:
    result = api.finetune_checkpoint(
        ckpt, out, epochs=1, recalibrate=False, data="synthetic", subset=2, device="cpu", **kwargs
    )
    return result["settings"]


def _peak_lr(out: Path) -> float:
    """The learning rate the fine-tuning in ``out`` ran with, as its checkpoint records it."""
    return load_checkpoint(out / "model.safetensors").meta["train"]["config"]["lr"]


def test_a_small_training_split_distils_from_the_dense_parent(
    pruned_ckpt, dense_ckpt, tmp_path, count_distillation
):
    settings = _finetune_settings(pruned_ckpt, tmp_path / "auto", recipe="full")
    assert settings["teacher"] == str(dense_ckpt)  # the parent the pruned checkpoint records
    assert len(count_distillation) == 1  # 20 images, one step of the recipe's batch: distilled
    assert _peak_lr(tmp_path / "auto") == 0.01  # the full recipe's rate when it distils
    count_distillation.clear()
    assert _finetune_settings(pruned_ckpt, tmp_path / "off", recipe="full", distill=False)["teacher"] is None
    assert count_distillation == []
    assert _peak_lr(tmp_path / "off") == 0.025
    with pytest.raises(UsageError, match="distillation"):
        _finetune_settings(pruned_ckpt, tmp_path / "both", distill=False, teacher=dense_ckpt)


def test_distilling_on_a_large_split_keeps_the_full_recipes_plain_rate(
    pruned_ckpt, dense_ckpt, tmp_path, monkeypatch, count_distillation
):
    """Asked to distil on a split of at least ``DISTILL_BELOW`` images, the ``full`` recipe keeps lr 0.025:
    0.01 is the rate of distillation on small splits only."""
    import prunekit.finetuning

    monkeypatch.setattr(prunekit.finetuning, "DISTILL_BELOW", 20)  # 20 images is now "large"
    settings = _finetune_settings(pruned_ckpt, tmp_path / "large", recipe="full", distill=True)
    assert settings["teacher"] == str(dense_ckpt) and len(count_distillation) == 1
    assert _peak_lr(tmp_path / "large") == 0.025


def test_distill_features_reaches_the_loop_from_the_command_line(
    pruned_ckpt, dense_ckpt, tmp_path, monkeypatch
):
    """``--distill-features W`` is the recorded config's weight and the loop matches features with it."""
    import prunekit.train

    real, matched = prunekit.train.feature_match, []

    def recording(cfg, student, teacher):
        match, why_not = real(cfg, student, teacher)
        matched.append((cfg.distill_features, match is not None))
        return match, why_not

    monkeypatch.setattr(prunekit.train, "feature_match", recording)
    out = tmp_path / "ft"
    argv = ["finetune", pruned_ckpt, "--out", out, "--teacher", dense_ckpt, "--distill-features", "0.5"]
    argv += ["--epochs", "1", "--no-recalibrate", "--data", "synthetic", "--subset", "2", "--device", "cpu"]
    assert main([str(a) for a in argv]) == 0
    assert matched == [(0.5, True)]
    assert load_checkpoint(out / "model.safetensors").meta["train"]["config"]["distill_features"] == 0.5


def test_distill_features_without_distillation_is_refused_or_said(pruned_ckpt, tmp_path, monkeypatch, capsys):
    code = main(
        [
            "finetune",
            str(pruned_ckpt),
            "--no-distill",
            "--distill-features",
            "1",
            "--out",
            str(tmp_path / "a"),
        ]
    )
    assert code == EXIT_USAGE and "--distill-features is for distillation" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    import prunekit.finetuning

    monkeypatch.setattr(prunekit.finetuning, "DISTILL_BELOW", 20)  # 20 images: no distillation by default
    assert _finetune_settings(pruned_ckpt, tmp_path / "b", distill_features=1.0)["teacher"] is None
    assert "distill_features is for distillation" in " ".join(capsys.readouterr().err.split())


@pytest.mark.slow
def test_a_large_split_or_a_missing_parent_does_not_distil(pruned_ckpt, tmp_path, monkeypatch, capsys):
    import prunekit.finetuning

    monkeypatch.setattr(prunekit.finetuning, "DISTILL_BELOW", 20)  # 20 images is now "large"
    assert _finetune_settings(pruned_ckpt, tmp_path / "large")["teacher"] is None
    monkeypatch.undo()
    moved = tmp_path / "elsewhere.safetensors"  # a copy whose recorded parent is not on disk
    ckpt = load_checkpoint(pruned_ckpt)
    ckpt.meta["parent"]["checkpoint"] = str(tmp_path / "gone.safetensors")
    save_checkpoint(moved, ckpt.model, ckpt.meta)
    assert _finetune_settings(moved, tmp_path / "missing")["teacher"] is None
    assert "pass teacher to distil" in " ".join(capsys.readouterr().err.split())  # rich wraps lines
    with pytest.raises(UsageError, match="not a file here"):
        _finetune_settings(moved, tmp_path / "asked", distill=True)


def test_the_old_name_seed_still_works_with_a_warning(capsys):
    """``--recipe seed`` and ``--freeze seed`` (before 0.2) are the blog's recipe and policy, said once each."""
    assert recipe("seed", freeze="seed") == recipe("blog")
    err = " ".join(capsys.readouterr().err.split())
    assert "recipe seed is deprecated: it is called blog now" in err
    assert "freeze seed is deprecated: it is called blog now" in err
    assert trainable_filter("seed", ["layer1.0.conv1"], "fc")("fc.weight")  # an old checkpoint's record


def test_a_fine_tuning_under_old_names_is_warned_about_once_each(pruned_ckpt, tmp_path, capsys):
    """finetune_checkpoint plans its recipe with and without distillation; the warnings still come once."""
    settings = _finetune_settings(pruned_ckpt, tmp_path / "old", recipe="seed", freeze="seed", distill=False)
    assert settings["freeze"] == "blog"
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("recipe seed is deprecated") == err.count("freeze seed is deprecated") == 1, err


def test_distill_mixup_feeds_teacher_and_student_the_same_mixed_images():
    """With ``distill_mixup`` the teacher sees mixed images, not the batch, the same ones on every run (a
    resume redraws them from the step); without a teacher the batch is left alone."""
    from torch import nn

    torch.manual_seed(0)
    batch = [(torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))) for _ in range(2)]

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
            self.seen = []

        def forward(self, x):
            self.seen.append(x.detach().clone())
            return self.net(x)

    def teacher_inputs(config: TrainConfig) -> list[torch.Tensor]:
        teacher = Recorder()
        fit(Recorder(), batch, config, teacher=teacher)
        return teacher.seen

    mixed = teacher_inputs(tiny_fit_config(distill_mixup=1.0, channels_last=False))
    plain = teacher_inputs(tiny_fit_config(channels_last=False))
    assert len(mixed) == len(plain) == 2
    assert all(torch.equal(p, x) for p, (x, _) in zip(plain, batch, strict=True))
    assert not any(torch.allclose(m, x) for m, (x, _) in zip(mixed, batch, strict=True))
    again = teacher_inputs(tiny_fit_config(distill_mixup=1.0, channels_last=False))
    assert all(torch.equal(a, m) for a, m in zip(again, mixed, strict=True))


# ---------------------------------------------------------------- feature distillation


def _small_cnn(seed: int) -> torch.nn.Module:
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 4),
    ).eval()


def test_pruning_records_which_classifier_inputs_it_kept_over_two_prunings(tmp_path):
    """The record names the dense classifier's columns the pruned classifier holds (compared on the weights
    themselves: the surgery copies them), composed over a second pruning, and a checkpoint keeps it."""
    import copy

    import prunekit
    from prunekit.schema import KEPT_ATTRIBUTE

    dense = _small_cnn(0)
    model = copy.deepcopy(dense)
    example = torch.randn(1, 3, 8, 8)
    prunekit.prune(model, example, ratio=0.25, allocation="uniform", reconstruct=False)
    prunekit.prune(model, example, ratio=0.25, allocation="uniform", reconstruct=False)
    kept = getattr(model, KEPT_ATTRIBUTE)
    assert model[8].in_features == len(kept) < 32
    assert torch.equal(model[8].weight, dense[8].weight[:, kept])
    prunekit.save(model, tmp_path / "pruned.safetensors")
    again = prunekit.load(tmp_path / "pruned.safetensors", model=_small_cnn(3))
    assert torch.equal(getattr(again, KEPT_ATTRIBUTE), kept)


def test_feature_distillation_pulls_the_pruned_features_towards_the_teachers():
    """Fine-tuned with the feature term, a pruned model's classifier inputs end nearer the teacher's (at the
    kept features, on held-out images) than fine-tuned on logits alone, from the same start."""
    import copy

    import prunekit
    from prunekit.schema import KEPT_ATTRIBUTE

    gen = torch.Generator().manual_seed(1)
    teacher = _small_cnn(0)
    prunekit.recalibrate_bn(teacher, [torch.randn(64, 3, 8, 8, generator=gen) for _ in range(4)])
    start = copy.deepcopy(teacher)
    prunekit.prune(
        start,
        torch.randn(1, 3, 8, 8),
        ratio=0.5,
        allocation="uniform",
        reconstruct=False,
        prune_input_conv=True,
    )
    batches = [
        (torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen)) for _ in range(8)
    ]
    held_out = torch.randn(64, 3, 8, 8, generator=gen)

    def feature_error(model: torch.nn.Module) -> float:
        kept = getattr(model, KEPT_ATTRIBUTE)
        with torch.no_grad():
            s, t = model.eval()[:8](held_out), teacher[:8](held_out)[:, kept]
        return float(((s - t) ** 2).mean() / (t**2).mean())

    def tuned(weight: float) -> torch.nn.Module:
        model = copy.deepcopy(start)
        fit(
            model,
            batches,
            tiny_fit_config(epochs=4, distill_features=weight, channels_last=False),
            teacher=teacher,
        )
        return model

    assert feature_error(start) > 0.3  # the pruning moved them
    assert feature_error(tuned(5.0)) < 0.75 * feature_error(tuned(0.0))


def test_feature_distillation_without_a_record_warns_and_distils_the_logits(capsys):
    """A student whose classifier reads fewer features than the teacher's, with no record of which, is
    told so in one line and trains on the logits alone."""
    from torch import nn

    from prunekit.losses import feature_match

    teacher = _small_cnn(0)
    student = _small_cnn(1)
    student[3], student[4], student[8] = nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.Linear(24, 4)
    match, why = feature_match(tiny_fit_config(distill_features=1.0), student, teacher)
    assert match is None and "reads 24 features, the teacher's 32" in why
    batches = [(torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,)))]
    fit(student, batches, tiny_fit_config(distill_features=1.0, channels_last=False), teacher=teacher)
    assert "distilling the logits only" in capsys.readouterr().err
    same, why = feature_match(tiny_fit_config(distill_features=1.0), _small_cnn(2), teacher)
    assert same is not None and same.kept is None and why is None
    same.close()
