"""Fault injection: real signals at random moments, SIGKILL mid-save, a full disk, a read-only folder,
colliding or existing outputs, two processes on one directory, NaN training and corrupt checkpoints."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PYTHON, subprocess_env
from prunekit import api
from prunekit.checkpoint import load_checkpoint, save_checkpoint
from prunekit.cli import EXIT_USAGE, main
from prunekit.data import load_data
from prunekit.errors import UsageError
from prunekit.files import LOCK_FILE, DirectoryLock, check_outputs, clean_stale_temps
from prunekit.models import build_model
from prunekit.train import MODEL_FILE, STATE_FILE, TrainConfig, TrainingDiverged, fit

SUBSET = 8  # synthetic: 80 training images; batch 8 -> 10 steps per epoch
STEPS = 10
TRAIN = ["train", "--data", "synthetic", "--subset", str(SUBSET), "--batch-size", "8", "--optimizer", "adam"]
TRAIN += ["--lr", "0.001", "--no-bf16", "--device", "cpu"]


class Child:
    """``python -m prunekit ARGS`` in the background, its stderr collected line by line."""

    def __init__(self, args: list[str], cwd: Path, **env: str):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "prunekit", *map(str, args)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=subprocess_env(**env),
            cwd=cwd,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 120) -> bool:
        """Whether a stderr line containing ``text`` appeared before the process ended."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return True
            if self.proc.poll() is not None:
                self._reader.join(5)
                return any(text in line for line in self.lines)
            time.sleep(0.005)
        raise AssertionError(f"no '{text}' within {timeout}s:\n" + "".join(self.lines))

    def finish(self, timeout: float = 180) -> tuple[int, str]:
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode, "".join(self.lines)


def run_cli(cwd: Path, *args, **env) -> tuple[int, str]:
    return Child(list(args), cwd, **env).finish()


def assert_one_error_line(err: str) -> str:
    """The one ``error:`` line, besides training's progress lines (``epoch 1/2 step 3/10: ...``)."""
    lines = [
        line
        for line in err.splitlines()
        if line.strip() and not re.match(r"epoch \d+/\d+|data: ", line)  # progress, what train will see
    ]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    return lines[0]


def same_tensors(a: Path, b: Path) -> list[str]:
    """Names of the tensors that differ (in shape, dtype or any bit) between two safetensors files."""
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    return [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]


def log_epochs(out: Path) -> list[str]:
    return [line.split()[0] for line in (out / "train_log.txt").read_text().splitlines()]


def temporaries(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained resnet18 checkpoint on synthetic data (nothing here needs a trained one)."""
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    bundle = load_data("synthetic", subset=SUBSET)
    meta = api.model_meta("resnet18", bundle, {"spec": "synthetic", "subset": SUBSET})
    torch.manual_seed(0)
    save_checkpoint(path, build_model("resnet18", 10), meta)
    return path


# ---------------------------------------------------------------- signals


@pytest.mark.slow
def test_sigint_at_random_moments_then_resume_is_bitwise_exact(tmp_path):
    """Three real SIGINTs at seeded random moments, --resume after each: the same bits as one whole run."""
    reference = tmp_path / "reference"
    code, err = run_cli(tmp_path, *TRAIN, "--epochs", "3", "--out", reference)
    assert code == 0, err

    out = tmp_path / "interrupted"
    rng = random.Random(20240607)
    stops: list[tuple[int, int]] = []
    args = [*TRAIN, "--epochs", "3", "--out", out]
    for attempt in range(3):
        child = Child(args + (["--resume"] if attempt else []), tmp_path)
        assert child.wait_for(" step "), "".join(child.lines)  # training has begun
        time.sleep(rng.uniform(0.0, 0.6))  # anywhere: data, forward, backward, optimizer step, eval
        child.proc.send_signal(signal.SIGINT)
        code, err = child.finish()
        assert code == 130, err
        assert "interrupted" in err and "Traceback" not in err
        state = load_checkpoint(out / STATE_FILE).meta["train_state"]
        stops.append((state["epoch"], state["batch"]))
    assert len(set(stops)) == 3, stops  # three different moments
    assert any(0 < batch < STEPS for _, batch in stops), stops  # at least one mid-epoch
    code, err = run_cli(tmp_path, *args, "--resume")
    assert code == 0, err

    assert not same_tensors(out / MODEL_FILE, reference / MODEL_FILE), stops
    assert log_epochs(out) == ["epoch=1", "epoch=2", "epoch=3"]  # no epoch logged twice
    losses = [line.split()[1] for line in (out / "train_log.txt").read_text().splitlines()]
    assert losses == [line.split()[1] for line in (reference / "train_log.txt").read_text().splitlines()]


def tiny_fit(out: Path | None, **kwargs):
    cfg = TrainConfig(epochs=2, batch_size=8, optimizer="adam", lr=1e-3, bf16=False, device="cpu")
    bundle = load_data("synthetic", subset=SUBSET, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    meta = api.model_meta("resnet18", bundle, {"spec": "synthetic", "subset": SUBSET})
    return fit(build_model("resnet18", 10), bundle, cfg, out, meta, **kwargs)


def test_a_signal_mid_step_stops_after_that_step_not_inside_it(tmp_path):
    """SIGINT delivered at the start of step 3: step 3 still runs whole, the state saved is 'after step 3'."""
    before = signal.getsignal(signal.SIGINT)

    def hook(step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        tiny_fit(tmp_path / "out", on_step=hook)
    state = load_checkpoint(tmp_path / "out" / STATE_FILE).meta["train_state"]
    assert (state["epoch"], state["batch"]) == (0, 4)  # the old code raised inside step 3: batch 3
    assert signal.getsignal(signal.SIGINT) is before  # fit restored the handler it replaced


class SignalDuringEvaluation:
    """Test batches whose iteration sends SIGINT to this process after the first batch of the first pass."""

    def __init__(self, batches: list):
        self.batches, self.sent = batches, False

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i == 1 and not self.sent:
                self.sent = True
                os.kill(os.getpid(), signal.SIGINT)
            yield batch


def test_a_signal_during_evaluation_finishes_the_epoch_record_then_stops(tmp_path):
    bundle = load_data("synthetic", subset=SUBSET)
    train = bundle.sample_batches(40, 8, 0)
    test = SignalDuringEvaluation(bundle.sample_batches(24, 8, 1))
    cfg = TrainConfig(epochs=2, batch_size=8, optimizer="adam", lr=1e-3, bf16=False, device="cpu")
    torch.manual_seed(0)
    meta = api.model_meta("resnet18", bundle, {"spec": "synthetic"})
    with pytest.raises(KeyboardInterrupt):
        fit(build_model("resnet18", 10), train, cfg, tmp_path, meta, test=test, classes=bundle.classes)
    saved = load_checkpoint(tmp_path / STATE_FILE).meta
    assert (saved["train_state"]["epoch"], saved["train_state"]["batch"]) == (1, 0)
    assert len(saved["history"]) == 1 and saved["history"][0]["test_accuracy"] is not None
    assert not (tmp_path / MODEL_FILE).exists()


@pytest.mark.slow
def test_sigkill_during_a_save_keeps_the_previous_checkpoint_and_the_next_run_cleans_up(tmp_path):
    out = tmp_path / "run"
    args = [*TRAIN, "--epochs", "2", "--out", out]
    # The epoch-2 checkpoint replaces the epoch-1 one; the hook holds that save with its temporary written.
    child = Child(args, tmp_path, PRUNEKIT_TEST_SLOW_SAVE=f"{STATE_FILE}:60")
    assert child.wait_for("PRUNEKIT_TEST_SLOW_SAVE"), "".join(child.lines)
    child.proc.send_signal(signal.SIGKILL)
    code, _ = child.finish()
    assert code == -signal.SIGKILL
    stale = temporaries(out)
    assert [p.name.startswith(f".{STATE_FILE}.") for p in stale] == [True]
    assert stale[0].stat().st_size > 0  # a real half-done save, not an empty file
    previous = load_checkpoint(out / STATE_FILE).meta
    assert (previous["train_state"]["epoch"], previous["train_state"]["batch"]) == (1, 0)
    assert not (out / MODEL_FILE).exists()

    code, err = run_cli(tmp_path, *args, "--resume")
    assert code == 0, err
    assert temporaries(out) == []
    assert log_epochs(out) == ["epoch=1", "epoch=2"]  # epoch 2 was logged before the kill and redone
    assert [h["epoch"] for h in load_checkpoint(out / MODEL_FILE).meta["history"]] == [1, 2]


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    stale = tmp_path / ".model.safetensors.ab_c12z9.tmp"
    keep = [tmp_path / "notes.tmp", tmp_path / ".cache.tmp", tmp_path / "model.safetensors"]
    for p in [stale, *keep]:
        p.write_text("x")
    assert clean_stale_temps(tmp_path) == [stale]
    assert all(p.exists() for p in keep) and not stale.exists()


# ---------------------------------------------------------------- full disk, read-only folder


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (root only); unmounted after the test."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_training_onto_a_full_disk_fails_in_one_line_and_leaves_no_partial_file(small_tmpfs, tmp_path):
    out = small_tmpfs / "run"
    code, err = run_cli(tmp_path, *TRAIN, "--epochs", "1", "--out", out)
    assert code == EXIT_USAGE
    line = assert_one_error_line(err)
    assert "No space left on device" in line and str(out / STATE_FILE) in line
    assert temporaries(out) == [] and not (out / STATE_FILE).exists() and not (out / MODEL_FILE).exists()
    assert not (out / LOCK_FILE).exists()


@pytest.mark.slow
def test_pruning_onto_a_full_disk_keeps_the_previous_output(small_tmpfs, checkpoint, tmp_path):
    target = small_tmpfs / "pruned.safetensors"
    target.write_bytes(b"the previous output")
    args = ["prune", checkpoint, "--layer", "layer2.0.conv1", "--ratio", "0.2", "--calibration", "random"]
    code, err = run_cli(tmp_path, *args, "--out", target, "--overwrite")
    assert code == EXIT_USAGE
    line = assert_one_error_line(err)
    assert "No space left on device" in line and str(target) in line
    assert target.read_bytes() == b"the previous output"
    assert temporaries(small_tmpfs) == []


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder this process cannot write: chmod 0o555, or as root (which chmod does not stop) a read-only
    tmpfs."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"root, and cannot mount a read-only tmpfs: {proc.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "prune", "export"])
def test_a_read_only_output_folder_is_one_error_line(command, read_only_dir, checkpoint, tmp_path):
    argv = {
        "train": [*TRAIN, "--epochs", "1", "--out", read_only_dir / "run"],
        "prune": [
            "prune",
            checkpoint,
            "--ratio",
            "0.2",
            "--calibration",
            "random",
            "--out",
            read_only_dir / "p.safetensors",
        ],
        "export": ["export", checkpoint, "--format", "torchscript", "--out", read_only_dir / "m.pt"],
    }[command]
    code, err = run_cli(tmp_path, *argv)
    assert code == EXIT_USAGE
    line = assert_one_error_line(err)
    assert str(read_only_dir) in line
    assert list(read_only_dir.iterdir()) == []


# ---------------------------------------------------------------- outputs never destroy inputs or each other


def run_main(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_prune_out_ending_in_json_keeps_checkpoint_and_report_apart(checkpoint, tmp_path, capsys):
    out = tmp_path / "x.json"
    code, err = run_main(
        capsys, "prune", checkpoint, "--ratio", "0.2", "--calibration", "random", "--out", out
    )
    assert code == 0, err
    assert load_checkpoint(out).meta["pruning"]  # still the checkpoint, not the report
    assert '"pruned_checkpoint"' in (tmp_path / "x.report.json").read_text()


def test_export_onto_its_own_input_is_refused(checkpoint, tmp_path, capsys):
    source = tmp_path / "ckpt.pt"
    source.write_bytes(checkpoint.read_bytes())
    before = source.read_bytes()
    code, err = run_main(capsys, "export", source, "--format", "torchscript")  # default out: ckpt.pt
    assert code == EXIT_USAGE
    assert "also an input" in assert_one_error_line(err)
    link = tmp_path / "link.pt"
    link.symlink_to(source)
    code, err = run_main(capsys, "export", source, "--format", "torchscript", "--out", link, "--overwrite")
    assert code == EXIT_USAGE and "also an input" in err
    assert source.read_bytes() == before


def test_prune_onto_its_input_is_refused_even_with_overwrite(checkpoint, tmp_path, capsys):
    before = checkpoint.read_bytes()
    spelled = checkpoint.parent / ".." / checkpoint.parent.name / checkpoint.name
    code, err = run_main(capsys, "prune", checkpoint, "--ratio", "0.2", "--out", spelled, "--overwrite")
    assert code == EXIT_USAGE and "also an input" in assert_one_error_line(err)
    assert checkpoint.read_bytes() == before


def test_two_outputs_onto_one_file_are_refused(tmp_path):
    a = tmp_path / "a.json"
    with pytest.raises(UsageError, match="two outputs"):
        check_outputs([], [a, tmp_path / "." / "a.json"], overwrite=True)
    a.write_text("{}")
    (tmp_path / "b.json").symlink_to(a)
    with pytest.raises(UsageError, match="two outputs"):
        check_outputs([], [a, tmp_path / "b.json"], overwrite=True)


def test_an_existing_output_is_refused_without_overwrite(checkpoint, tmp_path, capsys):
    prune_args = ["prune", checkpoint, "--ratio", "0.2", "--calibration", "random"]
    target = tmp_path / "p.safetensors"
    target.write_text("mine")
    code, err = run_main(capsys, *prune_args, "--out", target)
    assert code == EXIT_USAGE and "--overwrite" in assert_one_error_line(err)
    assert target.read_text() == "mine" and not (tmp_path / "p.json").exists()
    code, err = run_main(capsys, *prune_args, "--out", target, "--overwrite")
    assert code == 0, err
    assert load_checkpoint(target).meta["pruning"]

    exported = tmp_path / "m.onnx"
    exported.write_text("mine")
    code, err = run_main(capsys, "export", checkpoint, "--out", exported)
    assert code == EXIT_USAGE and "--overwrite" in err and exported.read_text() == "mine"

    results = tmp_path / "eval.json"
    results.write_text("mine")
    code, err = run_main(capsys, "eval", checkpoint, "--no-latency", "--json", results)
    assert code == EXIT_USAGE and "--overwrite" in assert_one_error_line(err)
    assert results.read_text() == "mine"


def test_training_into_a_finished_run_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "done"
    out.mkdir()
    (out / MODEL_FILE).write_text("the first run's model")
    code, err = run_main(capsys, *TRAIN, "--epochs", "1", "--out", out)
    assert code == EXIT_USAGE
    line = assert_one_error_line(err)
    assert "--resume" in line and "--overwrite" in line
    assert (out / MODEL_FILE).read_text() == "the first run's model"
    assert sorted(p.name for p in out.iterdir()) == [MODEL_FILE]  # no lock file, no log left behind
    api.claim_run_dir(out, [], resume=False, overwrite=True)  # the flags that let it through
    api.claim_run_dir(out, [], resume=True, overwrite=False)


def test_a_refused_command_creates_no_directory(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    code, err = run_main(capsys, *TRAIN, "--epochs", "1", "--out", out, "--lr", "inf")
    assert code == EXIT_USAGE and "--lr" in assert_one_error_line(err)
    code, _ = run_main(capsys, *TRAIN, "--epochs", "1", "--out", out, "--data", "no/such/folder")
    assert code == EXIT_USAGE
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- concurrency


@pytest.mark.slow
def test_a_second_process_on_the_same_out_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "shared"
    # The first holds its epoch-2 save for 15 s, so it is surely still running while the second starts.
    first = Child(
        [*TRAIN, "--epochs", "2", "--out", out], tmp_path, PRUNEKIT_TEST_SLOW_SAVE=f"{STATE_FILE}:15"
    )
    assert first.wait_for("PRUNEKIT_TEST_SLOW_SAVE"), "".join(first.lines)
    code, err = run_cli(tmp_path, *TRAIN, "--epochs", "1", "--out", out)
    assert code == EXIT_USAGE
    line = assert_one_error_line(err)
    assert f"pid {first.proc.pid}" in line and "in use" in line
    code, err = first.finish()
    assert code == 0, err
    saved = load_checkpoint(out / MODEL_FILE).meta
    assert saved["train"]["config"]["epochs"] == 2 and [h["epoch"] for h in saved["history"]] == [1, 2]
    assert not (out / LOCK_FILE).exists()


@pytest.mark.slow
def test_the_lock_is_reentrant_in_a_process_and_released_by_a_crash(tmp_path):
    with DirectoryLock(tmp_path, "outer"), DirectoryLock(tmp_path, "inner"):
        assert "outer" in (tmp_path / LOCK_FILE).read_text()
    # A holder killed outright: flock dies with it, so the next process gets the lock.
    code = "import os, sys; from prunekit.files import DirectoryLock; DirectoryLock(sys.argv[1]).__enter__(); os._exit(9)"
    subprocess.run([PYTHON, "-c", code, str(tmp_path)], env=subprocess_env(), check=False)
    assert (tmp_path / LOCK_FILE).exists()  # stale file left behind...
    with DirectoryLock(tmp_path):  # ...but not a stale lock
        pass


# ---------------------------------------------------------------- numerics


@pytest.mark.slow
def test_a_diverging_run_exits_2_and_writes_no_model(tmp_path):
    out = tmp_path / "nan"
    code, err = run_cli(tmp_path, *TRAIN, "--epochs", "1", "--lr", "1e30", "--optimizer", "sgd", "--out", out)
    assert code == EXIT_USAGE
    line = assert_one_error_line(err)
    assert "diverged" in line and "--lr" in line
    assert not (out / MODEL_FILE).exists() and not (out / STATE_FILE).exists()


def test_a_nan_mid_training_keeps_the_last_good_checkpoint(tmp_path):
    def poison(step: int) -> None:
        if step == STEPS + 3:  # epoch 2: the epoch-1 checkpoint is on disk
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))

    cfg = TrainConfig(epochs=2, batch_size=8, optimizer="adam", lr=1e-3, bf16=False, device="cpu")
    bundle = load_data("synthetic", subset=SUBSET)
    torch.manual_seed(0)
    model = build_model("resnet18", 10)
    meta = api.model_meta("resnet18", bundle, {"spec": "synthetic", "subset": SUBSET})
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 4/10: the loss is nan; lower lr"):
        fit(model, bundle, cfg, tmp_path, meta, on_step=poison)
    kept = load_checkpoint(tmp_path / STATE_FILE)
    assert (kept.meta["train_state"]["epoch"], kept.meta["train_state"]["batch"]) == (1, 0)
    assert all(
        bool(torch.isfinite(t).all()) for t in kept.model.state_dict().values() if t.is_floating_point()
    )
    assert not (tmp_path / MODEL_FILE).exists()


def test_a_nan_model_is_never_saved_as_a_pruned_result(checkpoint, tmp_path):
    from prunekit.pruning import PruneRequest

    broken = tmp_path / "broken.safetensors"
    ckpt = load_checkpoint(checkpoint)
    with torch.no_grad():
        ckpt.model.fc.bias[0] = float("inf")
    save_checkpoint(broken, ckpt.model, ckpt.meta)
    request = PruneRequest(layers=["layer2.0.conv1"], ratio=0.2)
    with pytest.raises(UsageError, match="NaN/inf"):
        api.prune_checkpoint(broken, request, calibration="random", out=tmp_path / "p.safetensors")
    assert not (tmp_path / "p.safetensors").exists()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lr", float("inf")),
        ("lr", float("nan")),
        ("momentum", 1.0),
        ("momentum", -0.1),
        ("weight_decay", -1e-4),
        ("weight_decay", float("inf")),
        ("label_smoothing", 1.0),
        ("warmup_epochs", -1.0),
        ("warmup_epochs", float("nan")),
        ("distill_temperature", 0.0),
        ("distill_temperature", float("inf")),
        ("distill_weight", 1.5),
        ("distill_weight", -0.5),
    ],
)
def test_config_refuses_out_of_range_and_non_finite_numbers(field, value):
    with pytest.raises(UsageError, match=f"^{field} must be"):
        TrainConfig(**{field: value}).validate()


def test_distill_temperature_zero_is_refused_before_any_work(checkpoint, tmp_path, capsys):
    out = tmp_path / "ft"
    code, err = run_main(capsys, "finetune", checkpoint, "--distill-temperature", "0", "--out", out)
    assert code == EXIT_USAGE
    assert "--distill-temperature must be positive, got 0.0" in assert_one_error_line(err)
    assert not out.exists()


@pytest.mark.parametrize(
    ("key", "values"),
    [("std", [0.2, 0.0, 0.2]), ("std", [0.2, float("inf"), 0.2]), ("mean", [0.5, float("nan"), 0.5])],
)
def test_a_checkpoint_with_a_broken_normalization_is_refused_on_load(
    key, values, checkpoint, tmp_path, capsys
):
    ckpt = load_checkpoint(checkpoint)
    broken = tmp_path / "broken.safetensors"
    save_checkpoint(broken, ckpt.model, {**ckpt.meta, key: values})
    code, err = run_main(capsys, "eval", broken, "--no-latency")
    assert code == EXIT_USAGE
    line = assert_one_error_line(err)
    assert "invalid checkpoint metadata" in line and f"'{key}'" in line
