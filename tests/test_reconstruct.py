"""Recovery without labels: re-fitted readers of pruned channels stay closer to the dense model on images they
never saw, in residual and depthwise models; a refused or interrupted recovery leaves the model as it was."""

from __future__ import annotations

import copy
import math
import os
import signal

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import prunekit
from prunekit.errors import UsageError
from prunekit.finetuning import recalibrate_batchnorm
from prunekit.reconstruct import readers
from test_core import ResidualNet, assert_unchanged, fingerprint


class DepthwiseNet(nn.Module):
    """An inverted-residual CNN: pointwise expansion, depthwise 3x3, pointwise projection, a residual sum."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.expand = nn.Conv2d(16, 48, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(48)
        self.depthwise = nn.Conv2d(48, 48, 3, padding=1, groups=48, bias=False)
        self.bn2 = nn.BatchNorm2d(48)
        self.project = nn.Conv2d(48, 16, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn2(self.depthwise(F.relu(self.bn1(self.expand(x))))))
        x = x + self.bn3(self.project(y))
        return self.head(x.mean(dim=(2, 3)))


def smooth_images(n: int, seed: int, size: int = 16) -> torch.Tensor:
    """Images with spatially correlated pixels (upsampled noise), so channels carry overlapping information
    as they do on real photos."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, size // 4, size // 4, generator=gen)
    return F.interpolate(coarse, size=size, mode="bilinear", align_corners=False) + 0.1 * torch.randn(
        n, 3, size, size, generator=gen
    )


def model_of(cls) -> nn.Module:
    """A model with distinct BatchNorm scales (so kept channels can be told apart) and statistics."""
    torch.manual_seed(0)
    model = cls()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0, 0.1)
    recalibrate_batchnorm(model, [smooth_images(256, seed=99)])
    return model.eval()


CALIBRATION = [smooth_images(128, seed=1), smooth_images(128, seed=2)]
HELD_OUT = smooth_images(256, seed=3)
X = torch.zeros(1, 3, 16, 16)


def prune_global(model: nn.Module, target: float, reconstruct: bool) -> prunekit.PruneReport:
    """One threshold network-wide, the input conv included (so residual streams are pruned too)."""
    return prunekit.prune(
        model,
        X,
        target_macs=target,
        allocation="global",
        prune_input_conv=True,
        calibration=CALIBRATION,
        reconstruct=reconstruct,
    )


def kept_channels(dense_bn: nn.BatchNorm2d, pruned_bn: nn.BatchNorm2d) -> list[int]:
    """The dense channels a pruned BatchNorm kept, found by their (distinct, untouched) scales."""
    return [i for i, g in enumerate(dense_bn.weight) if bool((pruned_bn.weight == g).any())]


def outputs(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The output of ``layer`` on ``x``."""
    seen = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: seen.update(out=o))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen["out"]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got - want) ** 2).sum() / (want**2).sum())


@pytest.mark.parametrize(
    "cls, layer, norm",
    [(ResidualNet, "head", None), (ResidualNet, "down", "bn3"), (DepthwiseNet, "project", "bn3")],
)
def test_refitting_lowers_output_error_on_held_out_images(cls, layer, norm):
    """Against the same pruning with BatchNorm recalibration only, a re-fitted reader's output (and the
    logits) is closer to the dense model's on images neither saw."""
    dense = model_of(cls)
    plain, refit = copy.deepcopy(dense), copy.deepcopy(dense)
    prune_global(plain, 0.5, reconstruct=False)
    prunekit.recalibrate_bn(plain, CALIBRATION)
    report = prune_global(refit, 0.5, reconstruct=True)
    assert layer in {f["layer"] for f in report.reconstruction["layers"]}
    assert [p.shape for p in plain.parameters()] == [p.shape for p in refit.parameters()]  # same channels
    for name in (layer, "head"):
        want = outputs(dense, name, HELD_OUT)
        if name != "head" and norm:  # the reader's own outputs were pruned too: compare the kept ones
            want = want[:, kept_channels(getattr(dense, norm), getattr(refit, norm))]
        without, with_refit = outputs(plain, name, HELD_OUT), outputs(refit, name, HELD_OUT)
        assert relative_error(with_refit, want) < 0.9 * relative_error(without, want), name


def test_depthwise_conv_is_not_refitted_but_the_pointwise_after_it_is():
    """Pruning a depthwise conv's channel removes its filter: nothing to re-fit there; the conv reading it is."""
    dense = model_of(DepthwiseNet)
    model = copy.deepcopy(dense)
    report = prune_global(model, 0.6, reconstruct=True)
    assert model.depthwise.in_channels < 48
    fitted = {f["layer"] for f in report.reconstruction["layers"]}
    assert "project" in fitted and "depthwise" not in fitted
    assert set(readers(dense, model)) == fitted
    assert torch.equal(  # the depthwise filters kept are the dense ones, untouched
        model.depthwise.weight,
        dense.depthwise.weight[
            [
                i
                for i, w in enumerate(dense.depthwise.weight)
                if any(torch.equal(w, v) for v in model.depthwise.weight)
            ]
        ],
    )


def test_residual_stream_refits_every_reader_of_the_shared_channels():
    """A residual group's channels are read by several layers (the block's first conv, the strided conv):
    each of them is re-fitted, and the error each reports on held-out rows went down."""
    model = model_of(ResidualNet)
    report = prune_global(model, 0.5, reconstruct=True)
    fits = {f["layer"]: f for f in report.reconstruction["layers"]}
    assert {"conv1", "down", "head"} <= set(fits)
    assert all(f["error_after"] <= f["error_before"] for f in fits.values())
    assert any(f["error_after"] < 0.9 * f["error_before"] for f in fits.values())


def test_recovery_passes_stop_after_the_last_layer_they_re_fit():
    """Pruning the block's inner channels leaves conv2 the only reader: neither pass runs the layers after it
    (with 4 images no BatchNorm choice runs either)."""
    from prunekit.importance import make_importance
    from prunekit.pruning import PruneRequest, prune_model
    from prunekit.reconstruct import reconstruct

    dense = model_of(ResidualNet)
    model = copy.deepcopy(dense)
    result = prune_model(model, PruneRequest(layers=["conv1"], ratio=0.5), make_importance("l2"), X)
    calls = []
    for m in (dense, model):
        m.down.register_forward_hook(lambda *_: calls.append(1))
    report = reconstruct(dense, model, result.kept, torch.randn(4, 3, 16, 16), shortcuts=False)
    assert [f.layer for f in report.layers] == ["conv2"]
    assert len(calls) == 1  # only the one-image pass that sizes the batch (images_per_pass) ran it


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"reconstruct": True}, "reconstruct re-fits layers on unlabelled images: give calibration"),
        ({"reconstruct": "yes", "calibration": CALIBRATION}, "reconstruct must be true or false"),
        ({"reconstruct": True, "calibration": [torch.randn(4, 3, 16)]}, "do not run through the model"),
    ],
)
def test_refused_recovery_leaves_model_exactly_as_it_was(kwargs, message):
    model = model_of(ResidualNet)
    before = fingerprint(model)
    with pytest.raises(UsageError, match=message):
        prunekit.prune(model, X, target_macs=0.5, **kwargs)
    assert_unchanged(model, before)


def test_interrupted_recovery_undoes_the_surgery_too(monkeypatch):
    """A real SIGINT in the middle of the re-fit (after the first layers got new weights): the model is
    handed back unpruned, every tensor and statistic as it was."""
    import prunekit.reconstruct as reconstruct

    model = model_of(ResidualNet)
    before = fingerprint(model)
    real, fitted = reconstruct._refit_layer, []

    def refit_then_interrupt(*args):
        fitted.append(real(*args))
        if len(fitted) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return fitted[-1]

    monkeypatch.setattr(reconstruct, "_refit_layer", refit_then_interrupt)
    # Python's own SIGINT handler, whatever an earlier test in this worker left installed
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            prune_global(model, 0.5, reconstruct=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(fitted) == 2  # interrupted inside the re-fit, not before or after it
    assert_unchanged(model, before)


@pytest.mark.slow
def test_cli_recovers_by_default_for_a_target_and_not_when_told(trained, tmp_path, capsys):
    import json

    from prunekit.cli import main

    base = ["prune", str(trained), "--target-macs", "0.5", "--allocation", "global"]
    base += ["--importance", "group-l2"]  # refit's scores take about 10 s here; recovery is what is tested
    assert main([*base, "--reconstruction-images", "64", "--out", str(tmp_path / "a.safetensors")]) == 0
    err = capsys.readouterr().err
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["request"]["reconstruct"] is True and report["reconstruction"]["images"] == 64
    assert len(report["reconstruction"]["layers"]) >= 10 and "recovery without labels" in err
    assert main([*base, "--no-reconstruct", "--out", str(tmp_path / "b.safetensors")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["reconstruction"] is None


def test_cli_reconstruct_without_images_is_one_error_line_and_writes_nothing(trained, tmp_path, capsys):
    from prunekit.cli import EXIT_USAGE, main

    argv = ["prune", str(trained), "--target-macs", "0.5", "--reconstruct", "--calibration", "random"]
    code = main([*argv, "--out", str(tmp_path / "p.safetensors")])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error:") and "--reconstruct" in err and "--calibration random" in err
    assert not list(tmp_path.iterdir())


def test_python_defaults_follow_the_command_line_and_say_when_images_are_missing(capsys, monkeypatch):
    """With calibration=, a target is recovered and spread as on the command line (a scan from
    SENSITIVITY_FROM images, global below, with a note); without it, one line names the defaults that fell
    back. A DataLoader is counted by its dataset, not by iterating it."""
    few = prunekit.prune(model_of(ResidualNet), X, target_macs=0.3, calibration=CALIBRATION)
    assert (
        few.request["allocation"] == "global" and few.request["reconstruct"] and few.reconstruction["layers"]
    )
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "256 at hand" in notes[0] and "allocation sensitivity" in notes[0]
    monkeypatch.setattr("prunekit.planning.SENSITIVITY_FROM", 256)
    loader = torch.utils.data.DataLoader(torch.cat(CALIBRATION), batch_size=128)
    enough = prunekit.prune(model_of(ResidualNet), X, target_macs=0.5, calibration=loader)
    assert enough.request["allocation"] == "sensitivity" and enough.reconstruction["layers"]
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    without = prunekit.prune(model_of(ResidualNet), X, target_macs=0.35)
    assert without.request["allocation"] == "global" and without.request["reconstruct"] is False
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "'global' instead of 'sensitivity'" in notes[0] and "no recovery" in notes[0]
    assert without.importance == "group-l2" and "'group-l2' instead of 'refit'" in notes[0]


class StaticSamePaddingConv(nn.Conv2d):
    """A conv that pads in its own forward and keeps ``padding=0``, as TensorFlow ports do (EfficientNet)."""

    def forward(self, x):
        pads = []
        sides = zip(reversed(x.shape[2:]), reversed(self.kernel_size), reversed(self.stride), strict=True)
        for size, k, s in sides:
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


@pytest.mark.parametrize(
    "conv, size",
    [
        (StaticSamePaddingConv(6, 5, 3, stride=2), 15),
        (StaticSamePaddingConv(6, 5, 3, stride=2), 16),
        (StaticSamePaddingConv(6, 5, 5, stride=1), 9),
        (nn.Conv2d(6, 5, 3, stride=2, padding=1), 16),
        (nn.Conv2d(6, 5, 3, padding="same", dilation=2), 11),
    ],
)
def test_regression_rows_read_the_inputs_the_conv_saw(conv, size):
    """The rows a re-fit regresses on reproduce the conv's own output with its own weights, whether the
    conv pads by its ``padding`` or in its forward: a wrong padding shifts every patch."""
    from prunekit.regression import Rows, flat_weight, padding

    x = smooth_images(4, seed=5, size=size)[:, :1].repeat(1, 6, 1, 1) + torch.randn(4, 6, size, size)
    with torch.no_grad():
        y = conv(x)
        rows = Rows(conv, y, torch.Generator().manual_seed(0))
        padded = F.pad(x, padding(conv, x.shape[2:], y.shape[2:]))
        got = rows.inputs(padded, 0, len(rows.index)) @ flat_weight(conv).T
    torch.testing.assert_close(got, rows.outputs(y), rtol=1e-4, atol=1e-4)


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "tracked" in k}


def test_batchnorm_statistics_are_re_estimated_when_that_brings_the_model_closer_to_the_dense_one():
    """Statistics that no longer fit what flows into a BatchNorm (here made wrong on purpose) are replaced,
    and the pruned model's predictions move closer to the dense model's on the comparison images."""
    from prunekit.reconstruct import settle_batchnorm

    dense = model_of(DepthwiseNet)
    stale = copy.deepcopy(dense)
    stale.bn2.running_var *= 25
    stale.bn3.running_mean += 3
    choice = settle_batchnorm(dense, stale, torch.cat(CALIBRATION), HELD_OUT[:64], batch=128)
    assert choice["chosen"] == "re-estimated" and choice["kl_re_estimated"] < choice["kl_kept"]
    assert not torch.equal(stale.bn2.running_var, dense.bn2.running_var * 25)
    assert choice["images"] == 64


def test_batchnorm_statistics_the_re_fit_matched_are_kept_exactly_when_re_estimating_is_worse():
    """Where re-estimation would move the model away from the dense one (statistics estimated on images
    unlike the ones it will see), every BatchNorm buffer is put back bit for bit."""
    from prunekit.reconstruct import settle_batchnorm

    dense = model_of(ResidualNet)
    pruned = copy.deepcopy(dense)
    before = _buffers(pruned)
    unlike = torch.cat(CALIBRATION) * 4 + 2
    choice = settle_batchnorm(dense, pruned, unlike, HELD_OUT[:64], batch=128)
    assert choice["chosen"] == "kept" and choice["kl_kept"] < choice["kl_re_estimated"]
    after = _buffers(pruned)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_recovery_reports_its_batchnorm_choice_on_images_no_regression_fitted():
    """A pruning with recovery says which statistics it kept, compared on the held-out fifth of the
    calibration images when they all fit in the re-fit's pass."""
    report = prune_global(model_of(DepthwiseNet), 0.5, reconstruct=True)
    choice = report.reconstruction["batchnorm"]
    assert choice["chosen"] in ("kept", "re-estimated")
    assert choice["images"] == sum(len(b) for b in CALIBRATION) // 5


class TwoBlockNet(nn.Module):
    """Two inverted-residual blocks on one residual stream; the second block's projection is a conv that
    pads in its own forward (as EfficientNet's TensorFlow port does)."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.expand1, self.bn1 = nn.Conv2d(16, 64, 1, bias=False), nn.BatchNorm2d(64)
        self.project1, self.bn2 = nn.Conv2d(64, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.expand2, self.bn3 = nn.Conv2d(16, 64, 1, bias=False), nn.BatchNorm2d(64)
        self.project2, self.bn4 = StaticSamePaddingConv(64, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = x + self.bn2(self.project1(F.relu(self.bn1(self.expand1(x)))))
        x = x + self.bn4(self.project2(F.relu(self.bn3(self.expand2(x)))))
        return self.head(x.mean(dim=(2, 3)))


def test_the_layers_writing_into_residual_sums_are_found_with_their_shortcuts():
    """torchvision's ResNet adds its downsample shortcut after the main branch, so there the downsample
    conv is the one fitted to the sum; a conv subclass that pads in its forward is still one layer."""
    import torchvision

    from prunekit.shortcuts import shortcut_sums

    _, sums = shortcut_sums(torchvision.models.resnet18())
    assert sums["layer1.0.conv2"].norm == "layer1.0.bn2"
    assert sums["layer2.0.downsample.0"].norm == "layer2.0.downsample.1"
    assert "layer2.0.conv2" not in sums and "layer1.0.conv1" not in sums
    _, sums = shortcut_sums(torchvision.models.mobilenet_v2())
    assert "features.3.conv.2" in sums and "features.2.conv.2" not in sums  # features.2 has no shortcut
    traced, sums = shortcut_sums(model_of(TwoBlockNet))
    assert set(sums) == {"project1", "project2"} and sums["project2"].norm == "bn4"
    x = smooth_images(4, seed=7)
    torch.testing.assert_close(traced(x), model_of(TwoBlockNet)(x))


def residual_stream(model: TwoBlockNet, x: torch.Tensor) -> torch.Tensor:
    """The residual stream after block 2 (what the head pools)."""
    stream = F.relu(outputs(model, "bn0", x))
    return stream + outputs(model, "bn2", x) + outputs(model, "bn4", x)


def test_fitting_to_the_dense_sum_corrects_the_error_the_shortcut_brings(monkeypatch):
    """With the residual stream pruned, the stream's error after block 1 reaches block 2 through its
    shortcut: fitted to the dense sum, block 2's projection makes up part of it, on images it never saw."""
    import prunekit.core as core
    from prunekit.reconstruct import reconstruct

    dense, captured = model_of(TwoBlockNet), {}
    real = core.refit_readers

    def capture(d, pruned, kept, images, seed=0):
        captured.update(pruned=copy.deepcopy(pruned), kept=kept, images=images)
        return real(d, pruned, kept, images, seed=seed)

    monkeypatch.setattr(core, "refit_readers", capture)
    prune_global(copy.deepcopy(dense), 0.5, reconstruct=True)
    kept = captured["kept"]["project2"]
    assert len(kept) < 16  # the stream was pruned
    want = residual_stream(dense, HELD_OUT)[:, kept]  # block 2's sum, on the channels kept
    errors = {}
    for shortcuts in (False, True):
        model = copy.deepcopy(captured["pruned"])
        reconstruct(dense, model, captured["kept"], captured["images"], shortcuts=shortcuts)
        errors[shortcuts] = relative_error(residual_stream(model, HELD_OUT), want)
    assert errors[True] < errors[False], errors


def test_recovery_started_at_a_cut_refits_as_recovery_from_the_input():
    """A scan's try runs recovery from its cut (the dense prefix's cached output): the same weights as
    from the input, residual-sum targets included; and the cached value is what the passes read."""
    from prunekit.importance import make_importance
    from prunekit.prefix import Start, capture, stubbed, trace_calls
    from prunekit.pruning import PruneRequest, prune_model
    from prunekit.reconstruct import reconstruct

    dense, x = model_of(TwoBlockNet), smooth_images(40, seed=3)
    surgery = copy.deepcopy(dense)
    result = prune_model(surgery, PruneRequest(layers=["expand2"], ratio=0.5), make_importance("l2"), x[:1])
    skipped = stubbed(trace_calls(dense, x[:1]), "bn0")
    assert skipped == ["stem"]

    def refit(start: Start | None) -> nn.Module:
        model = copy.deepcopy(surgery)
        reconstruct(dense, model, result.kept, x, settle=False, start=start)
        return model

    plain = refit(None)
    cut = refit(Start("bn0", skipped, capture(dense, "bn0", x)))
    assert not torch.equal(plain.project2.weight, surgery.project2.weight)  # the reader was re-fitted
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(cut.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    wrong = refit(Start("bn0", skipped, capture(dense, "bn0", smooth_images(40, seed=4))))
    assert not torch.allclose(wrong.project2.weight, plain.project2.weight, atol=1e-4)


def test_a_dense_side_shared_by_two_prunings_of_one_group_is_computed_once_and_refits_alike():
    """A scan recovers several ratios of one group: the dense pass runs for the first only, and each
    pruning gets the weights a recovery of its own would give (residual-sum targets included)."""
    from prunekit.importance import make_importance
    from prunekit.pruning import PruneRequest, prune_model
    from prunekit.reconstruct import reconstruct

    dense, x = model_of(TwoBlockNet), smooth_images(40, seed=3)
    dense_calls = []
    dense.expand2.register_forward_hook(lambda *_: dense_calls.append(1))
    cache: dict = {}
    for ratio in (0.25, 0.5):
        surgery = copy.deepcopy(dense)
        request = PruneRequest(layers=["expand2"], ratio=ratio)
        result = prune_model(surgery, request, make_importance("l2"), x[:1])
        own, shared = copy.deepcopy(surgery), copy.deepcopy(surgery)
        before = len(dense_calls)
        reconstruct(dense, own, result.kept, x, settle=False)
        calls_own, before = len(dense_calls) - before, len(dense_calls)
        reconstruct(dense, shared, result.kept, x, settle=False, dense_cache=cache)
        assert len(dense_calls) - before == calls_own - (0 if ratio == 0.25 else 1)  # no dense pass
        assert not torch.equal(own.project2.weight, surgery.project2.weight)
        for name, value in own.state_dict().items():
            torch.testing.assert_close(shared.state_dict()[name], value, rtol=0, atol=0)


def test_fewer_rows_than_inputs_solve_in_the_dual_form_to_the_same_weights():
    """Below as many rows as inputs, ``solve`` keeps the rows and solves the dual form: the same weights, the
    same held-out errors, and an input zero on every row keeps its weight, as the primal form gives."""
    from prunekit.regression import Normal, solve

    torch.manual_seed(0)
    inputs, outputs = 300, 20
    truth = torch.randn(outputs, inputs) * 0.1
    w0 = truth + 0.05 * torch.randn(outputs, inputs)
    x, held_x = torch.randn(160, inputs), torch.randn(40, inputs)
    x[:, 7] = held_x[:, 7] = 0  # an inactive input
    y, held_y = x @ truth.T + 0.1 * torch.randn(160, outputs), held_x @ truth.T

    fit, held_out = Normal(inputs, outputs), Normal(inputs, outputs)
    for i in range(0, 160, 64):
        fit.add(x[i : i + 64], y[i : i + 64])
    held_out.add(held_x, held_y)
    dual = solve(fit, held_out, w0)
    assert fit.gram is None and held_out.gram is None  # solved on the rows, never forming G
    primal = solve(fit.to_gram(), held_out.to_gram(), w0)
    assert dual[0] is not None and primal[0] is not None
    torch.testing.assert_close(dual[0], primal[0], rtol=1e-3, atol=1e-4)
    assert dual[1] == pytest.approx(primal[1], rel=1e-5) and dual[2] == pytest.approx(primal[2], rel=1e-4)
    assert dual[2] < dual[1]
    torch.testing.assert_close(dual[0][:, 7], w0[:, 7])
