"""The training loop: learning, determinism, exact resume after Ctrl-C, and a 2-process torchrun job."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import PYTHON, subprocess_env
from prunekit import api
from prunekit.checkpoint import load_checkpoint
from prunekit.data import load_data
from prunekit.errors import UsageError
from prunekit.train import MODEL_FILE, STATE_FILE, TrainConfig, fit, learning_rate

SUBSET = 8  # synthetic data: 8 train images per class -> 80 images, 5 steps of 16 per epoch
STEPS_PER_EPOCH = 5


def small_config(**overrides) -> TrainConfig:
    values = dict(epochs=2, batch_size=16, optimizer="adam", lr=1e-3, bf16=False, device="cpu", seed=0)
    values.update(overrides)
    return TrainConfig(**values)


def run_train(out: Path, **overrides):
    return api.train("resnet18", "synthetic", out, config=small_config(**overrides), subset=SUBSET)


def interrupt_at(step: int):
    """A step hook raising KeyboardInterrupt before ``step`` does any work (as user code might)."""

    def hook(global_step: int) -> None:
        if global_step == step:
            raise KeyboardInterrupt

    return hook


def sigint_at(step: int):
    """A step hook sending this process a real SIGINT as ``step`` starts; fit stops after that step."""

    def hook(global_step: int) -> None:
        if global_step == step:
            os.kill(os.getpid(), signal.SIGINT)

    return hook


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"weights differ in {different[:5]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 2-epoch run that the other tests compare against."""
    out = tmp_path_factory.mktemp("reference")
    return out, run_train(out)


def test_training_lowers_the_loss(reference):
    out, result = reference
    history = result.history
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    assert result.test["accuracy"] > 0.2  # 10 classes: chance is 0.1
    assert result.test["images"] == 160


def test_training_writes_its_outputs(reference):
    out, result = reference
    for name in (MODEL_FILE, STATE_FILE, "metrics.json", "train_log.txt"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 2
    assert metrics["test_accuracy"] == pytest.approx(result.test["accuracy"])
    assert len((out / "train_log.txt").read_text().splitlines()) == 2
    saved = load_checkpoint(out / MODEL_FILE)
    assert saved.meta["model"] == "resnet18" and saved.meta["num_classes"] == 10
    assert saved.meta["data"]["spec"] == "synthetic" and saved.meta["data"]["subset"] == SUBSET
    assert saved.optimizer_state is None
    assert_same_weights(saved.model, result.model.cpu())
    state = load_checkpoint(out / STATE_FILE)
    assert state.meta["train_state"]["epoch"] == 2 and state.meta["train_state"]["batch"] == 0
    assert state.optimizer_state is not None


def test_same_seed_gives_identical_weights(reference, tmp_path):
    _, first = reference
    second = run_train(tmp_path / "again")
    assert_same_weights(first.model, second.model)
    assert [h["train_loss"] for h in second.history] == [h["train_loss"] for h in first.history]


@pytest.mark.slow
def test_resume_after_a_mid_epoch_sigint_matches_an_uninterrupted_run(reference, tmp_path, monkeypatch):
    # (tests/test_faults.py sends SIGINT at random moments to a `prunekit train` process.)
    _, uninterrupted = reference
    out = tmp_path / "interrupted"
    signalled = STEPS_PER_EPOCH + 2  # epoch 2, batch 2: that step still completes
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr("prunekit.commands.train.fit", functools.partial(fit, on_step=sigint_at(signalled)))
        run_train(out)
    assert not (out / MODEL_FILE).exists()
    state = load_checkpoint(out / STATE_FILE)
    assert state.meta["train_state"]["epoch"] == 1
    assert state.meta["train_state"]["batch"] == 3
    assert len(state.meta["history"]) == 1

    resumed = api.train("resnet18", "synthetic", out, resume=True)
    assert_same_weights(resumed.model, uninterrupted.model)
    assert [h["train_loss"] for h in resumed.history] == pytest.approx(
        [h["train_loss"] for h in uninterrupted.history], rel=1e-9
    )
    assert (out / MODEL_FILE).is_file()


def test_resume_through_fit_after_a_step_hook_raises_keyboard_interrupt(reference, tmp_path):
    _, uninterrupted = reference
    out = tmp_path / "boundary"
    cfg = small_config()
    bundle = load_data("synthetic", subset=SUBSET, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    from prunekit.models import build_model

    model = build_model("resnet18", 10)
    meta = api.model_meta("resnet18", bundle, {"spec": "synthetic", "subset": SUBSET})
    with pytest.raises(KeyboardInterrupt):
        fit(model, bundle, cfg, out, meta, on_step=interrupt_at(STEPS_PER_EPOCH))
    ckpt = load_checkpoint(out / STATE_FILE)
    assert ckpt.meta["train_state"]["epoch"] == 1 and ckpt.meta["train_state"]["batch"] == 0

    resumed = fit(
        ckpt.model, bundle, TrainConfig.from_dict(ckpt.meta["train"]["config"]), out, meta, resume=ckpt
    )
    assert_same_weights(resumed.model, uninterrupted.model)
    assert len(resumed.history) == 2


def test_resume_without_a_checkpoint_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="^resume: no interrupted run"):
        api.train("resnet18", "synthetic", tmp_path / "empty", resume=True)


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [
        ("epochs", 0, "--epochs"),
        ("batch_size", 0, "--batch-size"),
        ("lr", -1.0, "--lr"),
        ("optimizer", "rmsprop", "--optimizer"),
        ("schedule", "step", "--schedule"),
    ],
)
def test_config_validation(field, value, flag):
    """Python names the field; the command line names the flag."""
    from prunekit.errors import cli_arg_style

    with pytest.raises(UsageError, match=f"^{field} "):
        small_config(**{field: value}).validate()
    with cli_arg_style(), pytest.raises(UsageError, match=f"^{flag} "):
        small_config(**{field: value}).validate()


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_learning_rate_schedules(schedule):
    cfg = small_config(schedule=schedule, lr=0.1, warmup_epochs=1)
    lrs = [learning_rate(cfg, s, 100, 10) for s in range(100)]
    assert max(lrs) == pytest.approx(0.1, rel=0.05)
    assert all(0 <= lr <= 0.1 + 1e-12 for lr in lrs)
    if schedule == "constant":
        assert set(lrs) == {0.1}
    else:
        assert lrs[0] < 0.05 and lrs[-1] < 0.01


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        PYTHON,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "prunekit",
        "train",
        "--data",
        "synthetic",
        "--subset",
        str(SUBSET),
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--optimizer",
        "adam",
        "--lr",
        "0.001",
        "--model",
        "resnet18",
        "--out",
        str(out),
        "--no-bf16",
        "--device",
        "cpu",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / MODEL_FILE).is_file()
    model = load_checkpoint(out / MODEL_FILE)
    assert model.meta["history"][0]["epoch"] == 1
    # Each rank trained on its half of the 80 images: 40 // 16 = 2 optimizer steps, not 80 // 16 = 5.
    state = load_checkpoint(out / STATE_FILE)
    assert float(state.optimizer_state["state"][0]["step"]) == 2.0
