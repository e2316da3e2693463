"""Options declared once: the table's checks, and a property-based test of the command line (random flag
values give success, or exit 2 with one `error:` line; never a traceback)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunekit.cli import EXIT_USAGE, main
from prunekit.errors import UsageError, cli_arg_style
from prunekit.options import validate
from prunekit.train import FitResult, TrainConfig, learning_rate, make_optimizer, resolve_device


@pytest.mark.parametrize(
    "name, bad",
    [
        ("lr", 0.0),
        ("lr", math.inf),
        ("lr", math.nan),
        ("lr", -1.0),
        ("epochs", 0),
        ("epochs", 2.5),
        ("epochs", True),
        ("batch_size", "64"),
        ("momentum", -1.0),
        ("momentum", 1.0),
        ("label_smoothing", 2.0),
        ("distill_temperature", 0.0),
        ("distill_weight", 1.5),
        ("device", "bogus"),
        ("val_split", 1.0),
        ("image_size", 0),
        ("optimizer", "rmsprop"),
        ("layers", ["conv1", 3]),
    ],
)
def test_each_bad_value_is_refused_by_name(name, bad):
    with pytest.raises(UsageError, match=f"^{name} "):
        validate({name: bad})
    with cli_arg_style(), pytest.raises(UsageError, match="^--"):
        validate({name: bad})


def test_valid_values_pass_and_ints_become_floats():
    out = validate({"lr": 1, "epochs": 3, "device": "cpu", "layers": ["a"], "unknown": object()})
    assert out["lr"] == 1.0 and isinstance(out["lr"], float)
    assert out["epochs"] == 3


def test_train_config_validates_through_the_table():
    with pytest.raises(UsageError, match="^momentum must be at least 0 and below 1"):
        TrainConfig(momentum=-1).validate()
    with pytest.raises(UsageError, match="^lr must be a finite number"):
        TrainConfig(lr=math.inf).validate()


# ---------------------------------------------------------------- the command line, fuzzed

NUMBERS = st.one_of(
    st.sampled_from(["1", "2", "0.5", "0.1", "0", "-1", "-0.5", "0.99", "32"]),  # near the edges of validity
    st.integers(-3, 300).map(str),
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(repr),
    st.sampled_from(["", "abc", "1e400", "-0", "nan", "inf", "0x10", "1_000", " 3"]),
)
# Image sizes near the bound (at least 8); large valid sizes only make the synthetic images slow to build.
IMAGE_SIZES = st.one_of(
    st.sampled_from(["0", "7", "8", "9", "-1", "32", "8.5", "", "abc", "nan", "1e400"]),
    st.integers(-3, 64).map(str),
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(repr),
)
TRAIN_FLAGS = {
    "--epochs": NUMBERS,
    "--batch-size": NUMBERS,
    "--lr": NUMBERS,
    "--momentum": NUMBERS,
    "--weight-decay": NUMBERS,
    "--warmup-epochs": NUMBERS,
    "--label-smoothing": NUMBERS,
    "--seed": NUMBERS,
    "--image-size": IMAGE_SIZES,
    "--val-split": NUMBERS,
    "--subset": NUMBERS,
    "--device": st.sampled_from(["auto", "cpu", "bogus", "cuda:x", ""]),
    "--optimizer": st.sampled_from(["sgd", "adam", "rmsprop", ""]),
    "--schedule": st.sampled_from(["cosine", "onecycle", "nope"]),
}


@pytest.mark.parametrize("flag", sorted(TRAIN_FLAGS))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    others=st.dictionaries(st.sampled_from(sorted(TRAIN_FLAGS)), st.just(None), max_size=1), data=st.data()
)
def test_train_flags_succeed_or_fail_with_one_error_line(flag, others, data, tmp_path, capsys, monkeypatch):
    """Each flag fuzzed (with up to one other), up to the training loop itself, which is replaced by its set-up
    (where torch would reject bad settings): the claim is about validation before any work."""
    reached = []

    def fit_setup_only(model, data, cfg, *args, **kwargs):
        """What fit does before its first step (where torch itself rejects bad settings), no epochs."""
        cfg.validate()
        resolve_device(cfg.device)
        make_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))])
        [learning_rate(cfg, step, 100, 10) for step in range(100)]
        reached.append(cfg)
        return FitResult(model, [], {"accuracy": 0.5})

    monkeypatch.setattr("prunekit.commands.train.fit", fit_setup_only)
    argv = ["train", "--data", "synthetic", "--out", str(tmp_path / "out")]
    for name in {flag: None, **others}:
        argv += [name, data.draw(TRAIN_FLAGS[name], label=name)]
    code = run_main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert code in (0, EXIT_USAGE), (argv, err)
    if code == EXIT_USAGE:
        assert len([line for line in err.splitlines() if "error:" in line]) == 1, (argv, err)
        assert not reached  # refused before any training
    else:
        assert reached


def run_main(argv: list[str]) -> int:
    """``main``'s exit code, also when argparse exits on its own (bad flag syntax or type)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def test_run_refuses_a_bad_layer_or_missing_data_before_any_work(tmp_path, capsys, monkeypatch):
    """Checked before the baseline trains and before the run directory is written."""
    trained = []
    monkeypatch.setattr("prunekit.commands.train.train", lambda *a, **k: trained.append(a))
    runs = tmp_path / "runs"
    for argv, message in (
        (["--data", "synthetic", "--layer", "layer9.conv1"], "--layer layer9.conv1: no such layer"),
        (["--data", "synthetic", "--finetune-lr", "-1"], "--finetune-lr must be positive"),
        (["--data", str(tmp_path / "missing")], "no such file or directory"),
    ):
        code = run_main(["run", *argv, "--runs-dir", str(runs)])
        err = capsys.readouterr().err
        assert code == EXIT_USAGE and message in err, err
        assert len([line for line in err.splitlines() if "error:" in line]) == 1
    assert not trained
    assert not runs.exists()  # no config.yaml, no run.log


def test_run_config_values_of_the_wrong_type_are_one_line_errors(tmp_path, capsys):
    for text, message in (
        ("epochs: ten\n", "--epochs must be a whole number"),
        ("ratio: [1]\n", "--ratio must be a number"),
    ):
        config = tmp_path / "c.yaml"
        config.write_text(text)
        code = run_main(["run", "--config", str(config), "--runs-dir", str(tmp_path / "runs")])
        err = capsys.readouterr().err
        assert code == EXIT_USAGE and message in err and "Traceback" not in err, err


# Each command's flags and the Python function behind it: a flag's dest is a keyword of that function (or a
# field of the request it takes), so a flag can never be parsed and then dropped on its way to the core.
def _command_functions():
    from prunekit.commands import evaluate, export, finetune, prune, quantize, run, sensitivity, train
    from prunekit.pipeline import RunConfig
    from prunekit.requests import PruneRequest

    return {
        "train": (train.COMMAND, train.train, TrainConfig),
        "evaluate": (evaluate.COMMAND, evaluate.evaluate_checkpoint, None),
        "prune": (prune.COMMAND, prune.prune_checkpoint, PruneRequest),
        "finetune": (finetune.COMMAND, finetune.finetune_checkpoint, None),
        "quantize": (quantize.COMMAND, quantize.quantize_checkpoint, None),
        "sensitivity": (sensitivity.COMMAND, sensitivity.sensitivity_checkpoint, None),
        "export": (export.COMMAND, export.export_checkpoint, None),
        "run": (run.COMMAND, None, RunConfig),
    }


# The flags that are the command line's own: the checkpoint (the functions' first argument, ``path``), the
# run config file, and deprecated spellings kept for one release (mapped by the command's ``main``).
CLI_ONLY = {"checkpoint", "config", "old_recalibration_images"}


@pytest.mark.parametrize(
    "name", ["train", "evaluate", "prune", "finetune", "quantize", "sensitivity", "export", "run"]
)
def test_every_flag_reaches_the_python_function_under_its_own_name(name):
    import dataclasses
    import inspect

    command, function, request = _command_functions()[name]
    names = set(inspect.signature(function).parameters) if function else set()
    if request is not None:
        names |= {f.name for f in dataclasses.fields(request)}
    if command.name == "run":
        names.add("resume")  # run(cfg, resume=...)
    dropped = [f.dest for f in command.flags if f.dest not in names | CLI_ONLY]
    assert not dropped, f"prunekit {command.name}: flags no Python keyword takes: {dropped}"


def test_a_renamed_python_keyword_still_works_with_a_warning(tmp_path, capsys):
    from prunekit.console import renamed_keyword

    assert renamed_keyword("f", "old", "new", None, 3) == 3
    assert capsys.readouterr().err == ""
    assert renamed_keyword("f", "old", "new", 5, None) == 5
    assert "f(old=) is deprecated: it is new= now" in capsys.readouterr().err
    assert renamed_keyword("f", "old", "new", "entropy", "minmax") == "entropy"  # the new one's default
