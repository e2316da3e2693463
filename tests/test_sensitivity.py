"""Sensitivity scan: one row per prunable group, one point per ratio, deterministic, model left alone."""

from __future__ import annotations

import json

import pytest
import torch

from prunekit import api
from prunekit.cli import EXIT_USAGE, main
from prunekit.sensitivity import prunable_roots, scan
from prunekit.train import TrainConfig
from test_core import ResidualNet, X, assert_unchanged, fingerprint, fresh


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
    assert first == second
    assert set(first["groups"]) == set(prunable_roots(model, X)) == {"conv1", "down"}
    for row in first["groups"].values():
        assert len(row["accuracy"]) == len(row["macs_saved"]) == 3
        assert row["macs_saved"] == sorted(row["macs_saved"]) and row["macs_saved"][0] > 0
    assert first["held_out_images"] == 32 and first["calibration_images"] == 32
    assert_unchanged(model, before)


def test_scan_refuses_ratios_outside_zero_one():
    with pytest.raises(api.UsageError, match="ratios"):
        scan(fresh(ResidualNet), X, _batches(1, 0), [torch.randn(4, 3, 16, 16)], ratios=(0.5, 1.0))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("sens") / "dense"
    api.train("resnet18", "synthetic", out, TrainConfig(epochs=1, batch_size=32))
    return out / "model.safetensors"


def test_cli_writes_json_and_plot_and_never_reads_the_test_set(trained, tmp_path, capsys, monkeypatch):
    read = []
    real_loader = api.DataBundle.loader

    def spy(self, split, *args, **kwargs):
        read.append(split)
        return real_loader(self, split, *args, **kwargs)

    monkeypatch.setattr(api.DataBundle, "loader", spy)
    out = tmp_path / "s.json"
    argv = ["sensitivity", str(trained), "--out", str(out), "--ratios", "0.3,0.6", "--images", "200"]
    assert main(argv + ["--calibration-images", "128"]) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["ratios"] == [0.3, 0.6] and result["held_out_images"] == 200
    assert len(result["groups"]) >= 8 and out.with_suffix(".png").stat().st_size > 1000
    assert "test" not in read


def test_cli_refusals_are_one_line_and_write_nothing(trained, tmp_path, capsys):
    for extra, message in ((["--ratios", "0.5,x"], "--ratios"), (["--images", "100000"], "training images")):
        code = main(["sensitivity", str(trained), "--out", str(tmp_path / "s.json"), *extra])
        err = capsys.readouterr().err
        assert code == EXIT_USAGE and message in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())
