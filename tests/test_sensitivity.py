"""Sensitivity scan: one row per prunable group, one point per ratio, deterministic, model left alone."""

from __future__ import annotations

import json

import pytest
import torch

import prunekit
from prunekit import api
from prunekit.cli import EXIT_USAGE, main
from prunekit.sensitivity import prunable_roots, scan
from test_core import ResidualNet, X, assert_unchanged, fingerprint, fresh

# The allocation, not the criterion, is what the command-line tests here are about: group-l2 scores instead
# of refit's, which take about 10 s on the `trained` ResNet-18
QUICK_SCORES = ("--importance", "group-l2")


def _batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 3, 16, 16, generator=gen), torch.randint(0, 5, (16,), generator=gen))
        for _ in range(n)
    ]


def test_scan_shape_determinism_and_the_model_untouched():
    model = fresh(ResidualNet)
    before = fingerprint(model)
    held_out, calibration = _batches(2, 0), [x for x, _ in _batches(2, 1)]
    first = scan(model, X, held_out, calibration, ratios=(0.25, 0.5, 0.75))
    second = scan(model, X, held_out, calibration, ratios=(0.25, 0.5, 0.75))
    for timed in ("seconds", "estimated_seconds"):  # how long it took and was expected to, the rest identical
        assert first.pop(timed) > 0 and second.pop(timed) > 0
    assert first == second
    assert set(first["groups"]) == set(prunable_roots(model, X)) == {"conv1", "down"}
    for row in first["groups"].values():
        assert len(row["accuracy"]) == len(row["macs_saved"]) == 3
        assert row["macs_saved"] == sorted(row["macs_saved"]) and row["macs_saved"][0] > 0
    assert first["held_out_images"] == 32 and first["calibration_images"] == 32
    assert_unchanged(model, before)


def test_a_target_that_may_prune_the_input_conv_scans_and_prunes_its_group():
    held_out, calibration = _batches(2, 0), [x for x, _ in _batches(2, 1)]
    assert "conv2" not in scan(fresh(ResidualNet), X, held_out, calibration, ratios=(0.5,))["groups"]
    result = scan(fresh(ResidualNet), X, held_out, calibration, ratios=(0.5,), prune_input_conv=True)
    assert result["groups"]["conv2"]["macs_saved"][0] > 0  # the stream the stem writes (root conv2)
    model = fresh(ResidualNet)
    images = [x for x, _ in _batches(32, 2)]  # 512: enough for the default sensitivity allocation
    prunekit.prune(model, X, target_macs=0.4, calibration=images, prune_input_conv=True)
    assert model.stem.out_channels < 16  # without the group in the scan, its curve was empty: never pruned


def test_recovered_tries_leave_the_pruned_model_closer_to_the_dense_one():
    """With ``recover`` each try's readers are re-fitted before it is scored: its divergence from the dense
    model is lower than BatchNorm recalibration alone leaves, and the model scanned is left alone."""
    model = fresh(ResidualNet)
    before = fingerprint(model)
    held_out, calibration = _batches(2, 0), [x for x, _ in _batches(4, 1)]
    plain = scan(model, X, held_out, calibration, ratios=(0.5, 0.75))
    recovered = scan(model, X, held_out, calibration, ratios=(0.5, 0.75), recover=True)
    assert recovered["recovered"] and not plain["recovered"]
    kl = {name: sum(row["kl"]) for name, row in plain["groups"].items()}
    assert all(sum(row["kl"]) < 0.9 * kl[name] for name, row in recovered["groups"].items()), (
        plain,
        recovered,
    )
    assert_unchanged(model, before)


def test_scan_recovery_reaches_the_scan_from_python_and_the_run_config(monkeypatch):
    import prunekit.sensitivity as sensitivity

    asked, real = [], sensitivity.scan
    monkeypatch.setattr(sensitivity, "scan", lambda *a, **k: asked.append(k["recover"]) or real(*a, **k))
    images = [x for x, _ in _batches(32, 2)]
    for recover in (False, True):
        prunekit.prune(fresh(ResidualNet), X, target_macs=0.6, calibration=images, scan_recovery=recover)
    assert asked == [False, True]
    assert _run_request({"target_macs": 0.5, "scan_recovery": True}).scan_recovery


def test_scan_refuses_ratios_outside_zero_one():
    with pytest.raises(api.UsageError, match="ratios"):
        scan(fresh(ResidualNet), X, _batches(1, 0), [torch.randn(4, 3, 16, 16)], ratios=(0.5, 1.0))


@pytest.mark.slow
def test_cli_writes_json_and_plot_and_never_reads_the_test_set(trained, tmp_path, capsys, monkeypatch):
    read = []
    real_loader = api.DataBundle.loader

    def spy(self, split, *args, **kwargs):
        read.append(split)
        return real_loader(self, split, *args, **kwargs)

    monkeypatch.setattr(api.DataBundle, "loader", spy)
    out = tmp_path / "s.json"
    argv = ["sensitivity", str(trained), "--out", str(out), "--ratios", "0.3,0.6", "--images", "200"]
    assert main(argv + ["--recalibration-images", "128"]) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["ratios"] == [0.3, 0.6] and result["held_out_images"] == 200
    assert len(result["groups"]) >= 8 and out.with_suffix(".png").stat().st_size > 1000
    assert "test" not in read
    table = [line for line in capsys.readouterr().err.splitlines() if "points lost at 0.3,0.6:" in line]
    assert len(table) == len([g for g in result["groups"].values() if "accuracy" in g])


def test_cli_refusals_are_one_line_and_write_nothing(trained, tmp_path, capsys):
    for ratios in ("0.5,x", "0.5,1.5"):
        code = main(["sensitivity", str(trained), "--out", str(tmp_path / "s.json"), "--ratios", ratios])
        err = capsys.readouterr().err
        assert code == EXIT_USAGE and "--ratios" in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())
    scan_file = tmp_path / "scan.json"
    scan_file.write_text('{"ratios": [0.5]}')
    argv = ["prune", str(trained), "--target-macs", "0.5", "--allocation", "sensitivity", "--sensitivity"]
    code = main([*argv, str(scan_file), "--out", str(tmp_path / "p.safetensors")])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "not a `prunekit sensitivity` result" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.json"]


@pytest.mark.slow
def test_scan_counts_shrink_to_a_small_training_set_and_say_so(trained, tmp_path, capsys):
    """More images than the training split holds (the defaults, 1,000 + 512, on a small set): the scan
    runs on what there is, in the same proportion, and one line says so."""
    from prunekit.api import load_data_for
    from prunekit.checkpoint import read_meta

    available = len(load_data_for(read_meta(trained), None, None).train)
    out = tmp_path / "s.json"
    argv = [
        "sensitivity",
        str(trained),
        "--out",
        str(out),
        "--ratios",
        "0.5",
        "--images",
        str(10 * available),
    ]
    assert main([*argv, "--calibration-images", str(5 * available)]) == 0  # the flag's old name
    err = capsys.readouterr().err
    assert "--calibration-images is deprecated: it is --recalibration-images now" in " ".join(err.split())
    result = json.loads(out.read_text())
    assert result["held_out_images"] + result["calibration_images"] <= available
    assert result["held_out_images"] == int(10 * available * available / (15 * available))
    assert f"the training split holds {available} images" in " ".join(err.split())


def _resnet18():
    from prunekit.models import build_model

    torch.manual_seed(0)
    return build_model("resnet18", 10).eval()


R18_X = torch.zeros(1, 3, 32, 32)


def _fake_scan(model) -> dict:
    """A scan in which layer4 costs nothing and layer2 a lot: what sensitivity allocation must follow."""
    roots = prunable_roots(model, R18_X)
    ratios = [0.1, 0.3, 0.5, 0.7, 0.9]

    def acc(root: str, r: float) -> float:
        cost = 0.0 if root.startswith("layer4") else 30.0 if root.startswith("layer2") else 3.0
        return 0.9 - cost * r / 100

    return {
        "dense_accuracy": 0.9,
        "ratios": ratios,
        "groups": {root: {"accuracy": [acc(root, r) for r in ratios]} for root in roots},
    }


@pytest.mark.parametrize("allocation", ["global", "uniform", "sensitivity"])
@pytest.mark.parametrize("target", [0.5, 0.33])
def test_each_allocation_meets_its_budget(allocation, target):
    from prunekit import prune
    from prunekit.measure import count_macs

    model = _resnet18()
    dense = count_macs(model, R18_X)
    scan_result = _fake_scan(model) if allocation == "sensitivity" else None
    report = prune(model, R18_X, target_macs=target, allocation=allocation, sensitivity=scan_result)
    assert count_macs(model, R18_X) / dense == pytest.approx(target, rel=0.02)
    assert report.request["allocation"] == allocation and "sensitivity" not in report.request


def test_sensitivity_allocation_follows_the_curves_and_uniform_is_one_ratio():
    from prunekit import prune

    model = _resnet18()
    prune(model, R18_X, target_macs=0.5, allocation="sensitivity", sensitivity=_fake_scan(model))
    kept = {
        n: m.out_channels for n, m in model.named_modules() if n.endswith("conv1") and n.startswith("layer")
    }
    assert kept["layer2.0.conv1"] / 128 > kept["layer4.0.conv1"] / 512  # the costly group keeps more
    uniform = _resnet18()
    prune(uniform, R18_X, target_macs=0.5, allocation="uniform")
    fractions = {
        round(m.out_channels / c, 1)
        for n, m, c in (
            (n, m, {"layer2": 128, "layer3": 256, "layer4": 512}[n[:6]])
            for n, m in uniform.named_modules()
            if n[:6] in ("layer2", "layer3", "layer4") and n.endswith("conv1")
        )
    }
    assert len(fractions) == 1  # one ratio everywhere


def test_allocation_refusals():
    from prunekit import prune

    with pytest.raises(api.UsageError, match="^allocation must be one of"):
        prune(_resnet18(), R18_X, target_macs=0.5, allocation="greedy")
    with pytest.raises(api.UsageError, match=r"needs sensitivity \(a scan\) or calibration images"):
        prune(_resnet18(), R18_X, target_macs=0.5, allocation="sensitivity")
    with pytest.raises(api.UsageError, match="spreads a target"):
        prune(
            _resnet18(), R18_X, ratio=0.3, allocation="sensitivity", sensitivity={"groups": {}, "ratios": []}
        )


@pytest.mark.slow
def test_prune_and_run_take_the_same_allocation_flag(trained, tmp_path, capsys):
    scan_file = tmp_path / "scan.json"
    assert (
        main(
            [
                "sensitivity",
                str(trained),
                "--out",
                str(scan_file),
                "--ratios",
                "0.3,0.7",
                "--images",
                "200",
                "--recalibration-images",
                "128",
            ]
        )
        == 0
    )
    out = tmp_path / "p.safetensors"
    argv = [
        "prune",
        str(trained),
        "--target-macs",
        "0.5",
        "--allocation",
        "sensitivity",
        "--sensitivity",
        str(scan_file),
        *QUICK_SCORES,
    ]
    assert main([*argv, "--out", str(out)]) == 0, capsys.readouterr().err
    record = api.load_checkpoint(out).meta["pruning"][-1]
    assert record["request"]["allocation"] == "sensitivity" and record["macs"]["ratio"] == pytest.approx(
        0.5, rel=0.02
    )
    from prunekit.pipeline import RunConfig

    assert (
        RunConfig.from_dict({"target_macs": 0.5, "allocation": "uniform"}).prune_request(1).allocation
        == "uniform"
    )


def test_the_input_conv_is_protected_unless_asked():
    from prunekit import prune

    protected, free = _resnet18(), _resnet18()
    prune(protected, R18_X, target_macs=0.5)
    report = prune(free, R18_X, target_macs=0.5, prune_input_conv=True)
    assert protected.conv1.out_channels == 64 and protected.layer1[0].conv2.out_channels == 64
    assert free.conv1.out_channels < 64  # ... and the residual stream of layer1 it feeds shrinks with it
    assert free.layer1[0].conv2.out_channels == free.layer1[1].conv2.out_channels == free.conv1.out_channels
    assert report.macs_ratio == pytest.approx(0.5, rel=0.02) and free(R18_X).shape == (1, 10)
    assert _run_request({"target_macs": 0.5, "prune_input_conv": True}).prune_input_conv


def _run_request(values: dict):
    from prunekit.pipeline import RunConfig

    return RunConfig.from_dict(values).prune_request(1)


def test_the_default_allocation_follows_the_images_at_hand(trained, tmp_path, capsys, monkeypatch):
    """A target is spread by a sensitivity scan from SENSITIVITY_FROM training images on, by the global rule
    below that (one note says so) and for a ratio; the run YAML leaves it to the data as prune does."""
    from prunekit.planning import SENSITIVITY_FROM, default_allocation

    assert default_allocation(None, None, SENSITIVITY_FROM) == "sensitivity"
    assert default_allocation(None, None, SENSITIVITY_FROM - 1) == "global"
    assert default_allocation(None, 0.3, 50_000) == default_allocation(None, None, 0) == "global"
    assert default_allocation("uniform", None, 5) == "uniform"
    argv = ["prune", str(trained), "--target-macs", "0.5", "--reconstruction-images", "64", *QUICK_SCORES]
    monkeypatch.setattr("prunekit.planning.SENSITIVITY_FROM", 2_000)  # more than the mini archive holds
    assert main([*argv, "--out", str(tmp_path / "small.safetensors")]) == 0  # the mini archive: ~1,000
    err = capsys.readouterr().err
    assert json.loads((tmp_path / "small.json").read_text())["request"]["allocation"] == "global"
    notes = [line for line in err.splitlines() if line.startswith("note: allocation global")]
    assert len(notes) == 1 and "below 2,000 images" in notes[0] and "--allocation sensitivity" in notes[0]
    monkeypatch.setattr("prunekit.planning.SENSITIVITY_FROM", 100)  # the same split, now enough to scan
    monkeypatch.setattr("prunekit.sensitivity.scan", lambda model, *a, **k: _fake_scan(model))
    assert main([*argv, "--out", str(tmp_path / "large.safetensors")]) == 0
    assert "note: allocation global" not in capsys.readouterr().err
    assert json.loads((tmp_path / "large.json").read_text())["request"]["allocation"] == "sensitivity"
    ratio = main([*argv[:2], "--ratio", "0.3", "--out", str(tmp_path / "ratio.safetensors")])
    assert (
        ratio == 0 and json.loads((tmp_path / "ratio.json").read_text())["request"]["allocation"] == "global"
    )
    assert _run_request({"target_macs": 0.5}).allocation is None  # resolved where the data is loaded
    assert _run_request({"target_macs": 0.5, "allocation": "uniform"}).allocation == "uniform"


def test_prune_command_scans_as_its_flags_say(trained, tmp_path, monkeypatch):
    """``prunekit prune`` runs its own scan: --[no-]scan-recovery and --prune-input-conv reach it (the scan
    ignored both until 2026-12-07, so the input conv's group was never scanned, never pruned); its tries
    are recovered by default."""
    asked = []

    def spy(model, *args, **kwargs):
        asked.append((kwargs["recover"], kwargs["prune_input_conv"]))
        return _fake_scan(model)

    monkeypatch.setattr("prunekit.sensitivity.scan", spy)
    argv = ["prune", str(trained), "--target-macs", "0.5", "--allocation", "sensitivity", *QUICK_SCORES]
    assert main([*argv, "--reconstruction-images", "64", "--out", str(tmp_path / "a.safetensors")]) == 0
    flags = ["--no-scan-recovery", "--prune-input-conv", "--no-reconstruct"]
    assert main([*argv, *flags, "--out", str(tmp_path / "b.safetensors")]) == 0
    assert asked == [(True, False), (False, True)]


def test_the_report_and_the_checkpoint_record_the_images_the_scan_used(trained, tmp_path, monkeypatch):
    """A scan shrunk to its time budget scores on fewer images than offered; the pruning report (Python and
    command line) and the pruned checkpoint say how many, where before only the console line did."""
    from prunekit.checkpoint import read_meta

    monkeypatch.setattr("prunekit.sensitivity.SCAN_SECONDS", 1e-3)  # shrinks both counts to the floor
    images = [x for x, _ in _batches(32, 2)]  # 512: the default allocation scans
    report = prunekit.prune(fresh(ResidualNet), X, target_macs=0.6, calibration=images)
    assert report.request["allocation"] == "sensitivity"
    assert (report.scan["held_out_images"], report.scan["calibration_images"]) == (32, 32)
    assert report.scan["groups"] == 2 and report.scan["seconds"] > 0 and "on 32 + 32 images" in str(report)
    assert prunekit.prune(fresh(ResidualNet), X, target_macs=0.6, allocation="global").scan is None
    out = tmp_path / "p.safetensors"
    argv = ["prune", str(trained), "--target-macs", "0.5", "--allocation", "sensitivity", "--out", str(out)]
    assert main([*argv, "--reconstruction-images", "64", *QUICK_SCORES]) == 0
    recorded = read_meta(out)["pruning"][-1]["scan"]
    assert (recorded["held_out_images"], recorded["calibration_images"]) == (32, 32) and recorded["recovered"]
    assert json.loads(out.with_suffix(".json").read_text())["scan"] == recorded


def test_a_recovered_scan_by_default_from_the_command_line_and_a_plain_one_given_to_prune(
    trained, tmp_path, capsys
):
    out = tmp_path / "s.json"
    argv = ["sensitivity", str(trained), "--out", str(out), "--ratios", "0.5", "--images", "32"]
    assert main([*argv, "--recalibration-images", "32"]) == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["recovered"] is True
    assert main([*argv, "--recalibration-images", "32", "--no-scan-recovery", "--overwrite"]) == 0
    assert json.loads(out.read_text())["recovered"] is False
    plain = _fake_scan(fresh(ResidualNet))
    images = [x for x, _ in _batches(2, 2)]
    capsys.readouterr()
    prunekit.prune(
        fresh(ResidualNet), X, target_macs=0.6, calibration=images, sensitivity=plain, scan_recovery=False
    )
    assert "scan_recovery" not in capsys.readouterr().err
    prunekit.prune(fresh(ResidualNet), X, target_macs=0.6, calibration=images, sensitivity=plain)
    assert "scan given was scored without recovery" in capsys.readouterr().err


def test_a_time_capped_scan_picks_the_same_images_on_a_busier_machine():
    from prunekit.scan_budget import ScanCost

    suffix, prefixes = [1.0, 0.8, 0.5], 0.7  # what each try runs of the model, what its cut runs
    counts = {
        ScanCost(per_image, suffix, prefixes, per_try=0.5, per_group=1.0, passes=2).fitted_counts(
            (1000, 512), ratios=3, seconds=240.0
        )
        for per_image in (0.050, 0.055, 0.060)  # one machine's timings, up to 20 % apart under load
    }
    assert len(counts) == 1, counts
    (held_out, calibration), *_ = counts
    assert held_out < 1000 and calibration < 512  # the cap applied
    assert held_out & (held_out - 1) == 0 and calibration & (calibration - 1) == 0  # powers of two


def test_the_sensitivity_command_scans_the_input_conv_group_when_asked(trained, tmp_path, capsys):
    argv = ["sensitivity", str(trained), "--ratios", "0.5", "--images", "32", "--recalibration-images", "32"]
    groups = {}
    for extra in ([], ["--prune-input-conv"]):
        out = tmp_path / f"s{len(extra)}.json"
        assert main([*argv, "--no-scan-recovery", *extra, "--out", str(out)]) == 0, capsys.readouterr().err
        groups[bool(extra)] = set(json.loads(out.read_text())["groups"])
    assert groups[False] < groups[True] and len(groups[True] - groups[False]) == 1
