"""``prunekit run``: the whole pipeline end to end, its report, configs, resuming, multi-round pruning."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

import prunekit.api
import prunekit.finetuning
from conftest import PYTHON, run_cli, subprocess_env
from prunekit.checkpoint import load_checkpoint
from prunekit.cli import EXIT_INTERRUPTED, EXIT_USAGE
from prunekit.train import MODEL_FILE, STATE_FILE, fit

SYNTHETIC = ["--data", "synthetic", "--subset", "8", "--epochs", "1"]
ALL_STAGES = ["baseline", "prune-1", "finetune-1", "evaluate"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_state(run_dir: Path) -> dict:
    return json.loads((run_dir / "state.json").read_text())


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"weights differ in {different[:5]}"


# ---------------------------------------------------------------- end to end on real images


@pytest.mark.slow
def test_pipeline_end_to_end_on_the_mini_archive(mini_archive, tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    # A stage slower than dense (which runtimes it is in, report.slower_stages's own test) is named in
    # the report and in the command's output: here one is made up, whatever the timings say.
    slower = "final is slower than dense in ONNX Runtime at batch 1 (made up by the test)"
    monkeypatch.setattr("prunekit.report.slower_stages", lambda stages: [slower])
    code, _, err = run_cli(
        capsys,
        "run",
        "--data",
        mini_archive,
        "--subset",
        "10",
        "--epochs",
        "1",
        "--finetune-epochs",
        "1",
        "--name",
        "e2e",
        "--runs-dir",
        runs,
    )
    assert code == 0, err
    run_dir = runs / "e2e"
    for name in ("config.yaml", "state.json", "metrics.json", "report.md", "run.log"):
        assert (run_dir / name).is_file(), name
    for name in ("channels.png", "curves.png"):
        assert (run_dir / name).read_bytes()[:8] == PNG_MAGIC, name
    state = read_state(run_dir)
    assert state["completed"] == ALL_STAGES

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["dense"]["params"] == 11_181_642
    assert metrics["final"]["params"] == 11_138_392
    assert set(metrics["accuracy"]) == {"dense", "pruned", "recalibrated", "finetuned", "final"}
    assert metrics["accuracy"]["final"] == metrics["accuracy"]["finetuned"]
    assert metrics["macs_reduction"] > 1
    assert set(metrics["final"]["speedup"]) == {"batch1", "batch64"}

    report = (run_dir / "report.md").read_text()
    assert "| Total params | 11,181,642 | 11,138,392 |" in report
    for row in ("Total mult-adds", "Params size", "Estimated total size", "CPU latency, batch 1"):
        assert f"| {row} |" in report, row
    assert "| CPU latency, batch 64 |" in report
    assert "## Accuracy at each stage" in report
    for stage in ("dense", "pruned", "recalibrated", "finetuned", "final"):
        assert re.search(rf"^\| {stage} \| \d+\.\d\d% \|$", report, re.M), stage
    assert "![channels](channels.png)" in report and "![curves](curves.png)" in report
    assert "dense" in err and "final" in err
    assert f"**Slower than dense:** {slower}." in report and slower in err

    # The recorded config reproduces the run: the same resolved settings under a new name.
    # (Stop it before training: only the config it resolves matters here.)
    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("prunekit.commands.train.train", stop)
    code, _, err = run_cli(capsys, "run", "--config", run_dir / "config.yaml", "--name", "e2e2")
    assert code == EXIT_INTERRUPTED, err
    first = yaml.safe_load((run_dir / "config.yaml").read_text())
    second = yaml.safe_load((runs / "e2e2" / "config.yaml").read_text())
    assert first.pop("name") == "e2e" and second.pop("name") == "e2e2"
    assert first == second
    assert (
        first["data"] == str(mini_archive) and first["subset"] == 10 and first["layers"] == ["layer2.0.conv1"]
    )

    # Flags given beside --config win over the file.
    code, _, _ = run_cli(
        capsys, "run", "--config", run_dir / "config.yaml", "--name", "e2e3", "--finetune-epochs", "3"
    )
    assert code == EXIT_INTERRUPTED
    third = yaml.safe_load((runs / "e2e3" / "config.yaml").read_text())
    assert third["finetune_epochs"] == 3 and third["subset"] == 10


def test_config_with_an_unknown_key_is_a_usage_error(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"data": "synthetic", "epochs": 1, "finetune_epoch": 2}))
    code, _, err = run_cli(capsys, "run", "--config", config, "--runs-dir", tmp_path / "runs")
    assert code == EXIT_USAGE
    assert "error:" in err and "finetune_epoch" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("key", "value"),
    [("freeze", "bogus"), ("recipe", "bogus"), ("importance", "bogus"), ("calibration", "bogus")],
)
def test_config_with_a_bad_value_fails_before_any_training(key, value, tmp_path, capsys, monkeypatch):
    trained = []
    monkeypatch.setattr("prunekit.commands.train.train", lambda *a, **k: trained.append(a))
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"data": "synthetic", "subset": 8, "epochs": 1, key: value}))
    code, _, err = run_cli(
        capsys, "run", "--config", config, "--runs-dir", tmp_path / "runs", "--name", "bad"
    )
    assert code == EXIT_USAGE
    assert "error:" in err and "bogus" in err
    assert not trained


# ---------------------------------------------------------------- resuming


@pytest.mark.slow
def test_resume_after_the_process_is_killed(tmp_path, capsys):
    runs = tmp_path / "runs"
    run_dir = runs / "killed"
    ft_state = run_dir / "finetune-1" / STATE_FILE
    cmd = [PYTHON, "-m", "prunekit", "run", "--data", "synthetic", "--subset", "8", "--epochs", "2"]
    cmd += ["--finetune-epochs", "2", "--name", "killed", "--runs-dir", str(runs)]
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=subprocess_env(), cwd=tmp_path)
        try:
            # Kill it part-way through fine-tuning: after its first epoch's checkpoint, before the stage ends.
            deadline = time.monotonic() + 240
            completed: list[str] = []
            while proc.poll() is None and time.monotonic() < deadline:
                if (run_dir / "state.json").exists():
                    completed = read_state(run_dir)["completed"]
                if "finetune-1" in completed or ("prune-1" in completed and ft_state.exists()):
                    break
                time.sleep(0.02)
            assert proc.poll() is None, "the run ended before it could be killed:\n" + log.read_text()
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    at_kill = read_state(run_dir)["completed"]
    assert at_kill[:2] == ["baseline", "prune-1"] and "evaluate" not in at_kill
    mtimes = {
        p: p.stat().st_mtime_ns for p in (run_dir / "baseline" / MODEL_FILE, run_dir / "pruned-1.safetensors")
    }

    # Starting it again under the same name, without --resume, refuses and leaves the run alone.
    code, _, err = run_cli(capsys, "run", "--data", "synthetic", "--name", "killed", "--runs-dir", runs)
    assert code == EXIT_USAGE
    assert "error:" in err and "--resume" in err
    assert read_state(run_dir)["completed"] == at_kill

    code, _, err = run_cli(capsys, "run", "--resume", run_dir)
    assert code == 0, err
    state = read_state(run_dir)
    assert state["completed"] == ALL_STAGES
    for path, mtime in mtimes.items():
        assert path.stat().st_mtime_ns == mtime, f"{path.name} was rewritten"
    log_text = (run_dir / "run.log").read_text()
    assert log_text.count("training the baseline") == 1
    assert log_text.count("pruning (round 1/1)") == 1
    assert [h["epoch"] for h in state["results"]["finetune-1"]["history"]] == [1, 2]
    if "finetune-1" not in at_kill:
        # Fine-tuning continued from its epoch-1 checkpoint: one log line from each process, none repeated.
        lines = (run_dir / "finetune-1" / "train_log.txt").read_text().splitlines()
        assert [line.split()[0] for line in lines] == ["epoch=1", "epoch=2"]
    assert (run_dir / "report.md").is_file()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["epochs"] == 2


@pytest.mark.slow
def test_an_interrupted_finetune_resumes_to_the_same_weights(tmp_path, capsys, monkeypatch):
    # Fine-tune in batches of 16: 80 images -> 5 steps per epoch, so the interrupt lands mid-epoch.
    cfg, policy = prunekit.finetuning.RECIPES["blog"]
    monkeypatch.setitem(prunekit.finetuning.RECIPES, "blog", (replace(cfg, batch_size=16), policy))
    runs = tmp_path / "runs"
    args = [*SYNTHETIC, "--finetune-epochs", "2", "--runs-dir", runs]
    code, _, err = run_cli(capsys, "run", *args, "--name", "whole")
    assert code == 0, err
    baseline = runs / "whole" / "baseline" / MODEL_FILE

    signal_at = 5 + 2  # epoch 2, batch 2: a real SIGINT; that step completes, then fit saves and stops

    def interrupt(step: int) -> None:
        if step == signal_at:
            os.kill(os.getpid(), signal.SIGINT)

    def with_hook(hook):
        def fit_with_hook(model, data, cfg, out_dir, *args, **kwargs):
            if Path(out_dir).name == "finetune-1":
                kwargs["on_step"] = hook
            return fit(model, data, cfg, out_dir, *args, **kwargs)

        return fit_with_hook

    with monkeypatch.context() as m:
        m.setattr("prunekit.commands.finetune.fit", with_hook(interrupt))
        code, _, _ = run_cli(capsys, "run", *args, "--name", "cut", "--baseline", baseline)
    assert code == EXIT_INTERRUPTED
    cut = runs / "cut"
    assert read_state(cut)["completed"] == ["prune-1"]
    saved = load_checkpoint(cut / "finetune-1" / STATE_FILE).meta["train_state"]
    assert (saved["epoch"], saved["batch"]) == (1, 3)

    steps: list[int] = []
    with monkeypatch.context() as m:
        m.setattr("prunekit.commands.finetune.fit", with_hook(steps.append))
        code, _, err = run_cli(capsys, "run", "--resume", cut)
    assert code == 0, err
    assert steps == [8, 9]  # it continued after the signalled step, not from the start
    assert read_state(cut)["completed"] == ["prune-1", "finetune-1", "evaluate"]
    whole = load_checkpoint(runs / "whole" / "finetune-1" / MODEL_FILE)
    resumed = load_checkpoint(cut / "finetune-1" / MODEL_FILE)
    assert_same_weights(resumed.model, whole.model)
    losses = [h["train_loss"] for h in resumed.meta["history"]]
    assert losses == pytest.approx([h["train_loss"] for h in whole.meta["history"]], rel=1e-9)


# ---------------------------------------------------------------- several rounds


@pytest.mark.slow
def test_two_rounds_reach_the_macs_target(tmp_path, capsys):
    runs = tmp_path / "runs"
    argv = [
        *SYNTHETIC,
        "--finetune-epochs",
        "2",
        "--steps",
        "2",
        "--target-macs",
        "0.7",
        "--allocation",
        "global",
        "--importance",
        "group-l2",  # refit's scores would take about 10 s a round; the rounds are what is tested here
    ]
    code, _, err = run_cli(capsys, "run", *argv, "--name", "steps", "--runs-dir", runs)
    assert code == 0, err
    run_dir = runs / "steps"
    state = read_state(run_dir)
    assert state["completed"] == ["baseline", "prune-1", "finetune-1", "prune-2", "finetune-2", "evaluate"]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["layers"] == [] and config["ratio"] is None  # a target is global
    results = state["results"]
    first, second = results["prune-1"]["macs"], results["prune-2"]["macs"]
    # Round 2 prunes round 1's fine-tuned model, each round taking its share of the target.
    assert second["before"] == first["after"]
    assert first["ratio"] == pytest.approx(0.7**0.5, abs=0.03)
    assert second["ratio"] == pytest.approx(0.7**0.5, abs=0.03)
    assert len(results["finetune-1"]["history"]) == len(results["finetune-2"]["history"]) == 1
    dense, final = results["evaluate"]["dense"]["macs"], results["evaluate"]["final"]["macs"]
    assert final / dense == pytest.approx(0.7, rel=0.03)
    assert final == second["after"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["macs_reduction"] == pytest.approx(dense / final)
    assert {"pruned (round 1)", "finetuned (round 1)", "pruned (round 2)", "finetuned (round 2)"} <= set(
        metrics["accuracy"]
    )
    assert "target MACs 0.7" in (run_dir / "report.md").read_text()
    assert load_checkpoint(run_dir / "finetune-2" / MODEL_FILE).meta["parent"]["macs"] == dense


def test_run_ratio_without_layer_means_what_prune_means():
    """`prunekit run --ratio R` prunes every layer, as `prunekit prune --ratio R` does; the seed's layer and
    ratio stay the defaults when neither is given."""
    from prunekit.pipeline import RunConfig

    assert RunConfig.from_dict({}).prune_request(1).layers == ["layer2.0.conv1"]
    network_wide = RunConfig.from_dict({"ratio": 0.3}).prune_request(1)
    assert network_wide.layers == [] and network_wide.ratio == pytest.approx(0.3)
    named = RunConfig.from_dict({"ratio": 0.3, "layers": ["layer3.0.conv1"]}).prune_request(1)
    assert named.layers == ["layer3.0.conv1"]


def test_run_hands_its_distillation_settings_to_the_fine_tuning(tmp_path, monkeypatch):
    """``run --distill-features W`` (and the other distillation flags) reach ``finetune_checkpoint``."""
    from prunekit import pipeline

    asked = {}

    def finetune_checkpoint(pruned, out, **kwargs):
        asked.update(kwargs)
        return {"accuracy": {}}

    monkeypatch.setattr(pipeline.finetune_command, "finetune_checkpoint", finetune_checkpoint)
    distillation = {
        "distill": True,
        "distill_features": 0.5,
        "distill_weight": 0.7,
        "distill_temperature": 2.0,
    }
    run = pipeline.Run(pipeline.RunConfig(name="r", runs_dir=str(tmp_path), **distillation))
    run.dir.mkdir(parents=True)
    pipeline._finetune_stage(run, 1, tmp_path / "pruned.safetensors", tmp_path / "dense.safetensors")
    assert asked["distill_features"] == 0.5 and asked["distill_weight"] == 0.7
    assert asked["distill_temperature"] == 2.0 and asked["teacher"] == tmp_path / "dense.safetensors"
