"""The command line: exit code 2 and an `error:` line, not a traceback, for bad input; train then eval."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.error
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import PYTHON, run_cli, subprocess_env
from prunekit.cli import EXIT_USAGE

TRAIN = [
    "--no-bf16",
    "--device",
    "cpu",
    "--epochs",
    "1",
    "--batch-size",
    "20",
    "--optimizer",
    "adam",
    "--lr",
    "0.001",
]


def squash(text: str) -> str:
    """Text without whitespace: rich wraps long messages at the console width, at spaces or inside words."""
    return re.sub(r"\s+", "", text)


def assert_usage_error(code: int, err: str, *needles: str) -> None:
    assert code == EXIT_USAGE, err
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, err
    for needle in needles:
        assert squash(needle) in squash(err), f"{needle!r} not in {err!r}"


def test_nonexistent_data_path(capsys, tmp_path):
    missing = tmp_path / "no" / "such" / "data.tar.gz"
    code, _, err = run_cli(capsys, *["train", "--data", missing, "--out", tmp_path / "out", *TRAIN])
    assert_usage_error(code, err, str(missing), "no such file or directory")
    assert not (tmp_path / "out").exists()


def test_unknown_model(capsys, tmp_path):
    code, _, err = run_cli(
        capsys,
        *[
            "train",
            "--model",
            "resnet19",
            "--data",
            "synthetic",
            "--subset",
            "2",
            "--out",
            tmp_path / "out",
            *TRAIN,
        ],
    )
    assert_usage_error(code, err, "unknown model 'resnet19'", "resnet18")


def test_zero_epochs(capsys, tmp_path):
    argv = ["train", "--data", "synthetic", "--out", tmp_path / "out", *TRAIN]
    argv[argv.index("--epochs") + 1] = "0"
    code, _, err = run_cli(capsys, *argv)
    assert_usage_error(code, err, "--epochs must be at least 1, got 0")


def test_zero_subset(capsys, tmp_path):
    code, _, err = run_cli(
        capsys, *["train", "--data", "synthetic", "--subset", "0", "--out", tmp_path / "o", *TRAIN]
    )
    assert_usage_error(code, err, "--subset")


def test_eval_missing_checkpoint(capsys, tmp_path):
    missing = tmp_path / "absent.safetensors"
    code, _, err = run_cli(capsys, *["eval", missing, "--no-latency"])
    assert_usage_error(code, err, str(missing), "no such checkpoint")


def test_eval_non_prunekit_files(capsys, tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(plain))
    code, _, err = run_cli(capsys, *["eval", plain, "--no-latency"])
    assert_usage_error(code, err, str(plain), "not a prunekit checkpoint")

    text = tmp_path / "notes.safetensors"
    text.write_text("hello, I am not a checkpoint\n")
    code, _, err = run_cli(capsys, *["eval", text, "--no-latency"])
    assert_usage_error(code, err, str(text), "not a prunekit checkpoint")


def test_resume_with_nothing_to_resume(capsys, tmp_path):
    out = tmp_path / "fresh"
    code, _, err = run_cli(capsys, *["train", "--data", "synthetic", "--out", out, "--resume", *TRAIN])
    assert_usage_error(code, err, "--resume", str(out))


def test_cifar10_offline(capsys, tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(
        capsys, *["train", "--data", "cifar10", "--data-dir", empty, "--out", tmp_path / "o", *TRAIN]
    )
    assert code == EXIT_USAGE
    assert "Traceback" not in err
    assert err.startswith("error:")
    assert squash("--data PATH") in squash(err)


def test_no_command_prints_help(capsys):
    code, out, err = run_cli(capsys, *[])
    assert code == EXIT_USAGE
    assert "usage: prunekit" in out + err


def test_models_lists_names(capsys):
    code, out, _ = run_cli(capsys, *["models"])
    assert code == 0
    names = out.split()
    assert "resnet18" in names and "resnet18-cifar" in names and "mobilenet_v2" in names


def test_argparse_rejects_a_bad_choice_in_one_line(capsys):
    code, _, err = run_cli(capsys, *["train", "--data", "synthetic", "--optimizer", "rmsprop"])
    assert code == EXIT_USAGE
    assert err.strip().splitlines() == [
        "error: --optimizer invalid choice: 'rmsprop' (choose from 'sgd', 'adam', 'adamw') "
        "(see prunekit train --help)"
    ]


def test_error_message_is_one_line_even_when_long(capsys, tmp_path):
    missing = tmp_path / ("long-folder-name-" * 4) / "data.tar.gz"
    code, _, err = run_cli(capsys, *["train", "--data", missing, "--out", tmp_path / "out", *TRAIN])
    assert code == EXIT_USAGE
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_subprocess_error_exit_code_and_no_traceback(tmp_path):
    missing = tmp_path / "missing.zip"
    proc = subprocess.run(
        [PYTHON, "-m", "prunekit", "train", "--data", str(missing), "--out", str(tmp_path / "o"), *TRAIN],
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error:")
    assert "Traceback" not in proc.stderr + proc.stdout
    assert squash(str(missing)) in squash(proc.stderr)


def test_train_then_eval(capsys, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli(
        capsys,
        *["train", "--data", "synthetic", "--subset", "4", "--model", "resnet18", "--out", out, *TRAIN],
    )
    assert code == 0, err
    assert "test accuracy" in err
    checkpoint = out / "model.safetensors"
    assert checkpoint.is_file()
    metrics = json.loads((out / "metrics.json").read_text())

    report = tmp_path / "eval.json"
    code, out_text, err = run_cli(capsys, *["eval", checkpoint, "--no-latency", "--json", report])
    assert code == 0, err
    printed = out_text + err
    assert "Total params" in printed
    assert "11,181,642" in printed
    assert "accuracy" in printed and "overall" in printed
    results = json.loads(report.read_text())
    assert results["test_images"] == 160
    assert results["params"] == 11_181_642
    # eval reproduces the accuracy measured at the end of training (same data, same normalization)
    assert results["accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert f"{results['accuracy']:.2%}" in printed
    assert "latency" not in results


def test_an_internal_error_is_one_line_with_the_traceback_in_a_log(capsys, monkeypatch, isolated_cache):
    """A bug (not a user mistake) still prints one line, exit 1, and the traceback lands in a log file."""

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero deep inside")

    monkeypatch.setattr("prunekit.commands.evaluate.evaluate_checkpoint", broken)
    code, _, err = run_cli(capsys, *["eval", "whatever.safetensors"])
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "internal error" in lines[0] and "ZeroDivisionError" in lines[0], err
    log = Path(lines[0].rsplit("traceback in ", 1)[1].rstrip(")"))
    assert log.is_file() and log.is_relative_to(isolated_cache)
    text = log.read_text()
    assert "Traceback" in text and "division by zero deep inside" in text and "eval whatever" in text
