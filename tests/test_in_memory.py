"""What the commands do, on a model held in memory: evaluate, sensitivity scan, export, int8."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import prunekit
from prunekit.errors import UsageError
from test_core import ResidualNet, assert_unchanged, fingerprint, fresh
from test_sensitivity import R18_X, _resnet18

IMAGES = torch.randn(96, 3, 16, 16, generator=torch.Generator().manual_seed(4))


def test_evaluate_counts_what_the_model_predicts_and_leaves_its_mode():
    model = fresh()
    with torch.no_grad():
        predicted = model.eval()(IMAGES).argmax(1)
    labels = predicted.clone()
    labels[:24] = (predicted[:24] + 1) % 5  # a quarter wrong, by construction
    model.train()
    result = prunekit.evaluate(model, [(IMAGES[:50], labels[:50]), (IMAGES[50:], labels[50:])], num_classes=5)
    assert result["accuracy"] == pytest.approx(72 / 96) and result["images"] == 96
    assert model.training


def test_sensitivity_scan_in_memory_feeds_prune_and_changes_nothing():
    model = _resnet18()
    images = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    before = fingerprint(model)
    result = prunekit.sensitivity_scan(model, R18_X, [images[:32], images[32:]], ratios=[0.25, 0.75])
    assert_unchanged(model, before)
    assert result["ratios"] == [0.25, 0.75] and len(result["groups"]) >= 8
    assert all(len(g["accuracy"]) == 2 for g in result["groups"].values() if "accuracy" in g)
    report = prunekit.prune(
        model, R18_X, target_macs=0.5, allocation="sensitivity", sensitivity=result, reconstruct=False
    )
    assert report.request["allocation"] == "sensitivity" and report.macs_ratio == pytest.approx(0.5, rel=0.02)


# torch's own deprecation of TorchScript, filtered as in test_export
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_and_quantize_in_memory_compute_what_the_model_does(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = fresh().eval()
    prunekit.prune(model, IMAGES[:1], target_macs=0.5, reconstruct=False)
    with torch.no_grad():
        expected = model(IMAGES).numpy()
    onnx = prunekit.export_model(model, tmp_path / "m.onnx", IMAGES[:1])
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: IMAGES.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)  # a dynamic batch of 96
    script = torch.jit.load(str(prunekit.export_model(model, tmp_path / "m.pt", 16, format="torchscript")))
    np.testing.assert_allclose(script(IMAGES).detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    int8 = prunekit.quantize_model(model, tmp_path / "m-int8.onnx", [IMAGES[:64]], IMAGES[:1])
    session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    quantized = session.run(None, {session.get_inputs()[0].name: IMAGES.numpy()})[0]
    assert {n.op_type for n in __import__("onnx").load(str(int8)).graph.node} >= {"QuantizeLinear"}
    assert (quantized.argmax(1) == expected.argmax(1)).mean() > 0.8
    with pytest.raises(UsageError, match="^format must be one of"):
        prunekit.export_model(ResidualNet(), tmp_path / "x", 16, format="tflite")
    assert not (tmp_path / "x").exists()


def test_prune_reads_a_generator_of_calibration_batches_once_for_every_use():
    """A generator can be read once: scoring, the sensitivity scan and recovery all use that one reading
    (each read it anew before, and the second found it empty); the result is the list's."""
    batches = [IMAGES[:48], IMAGES[48:]]
    kwargs = dict(target_macs=0.7, allocation="sensitivity", importance="activation", scan_recovery=False)
    from_list, from_generator = fresh(), fresh()
    expected = prunekit.prune(from_list, IMAGES[:1], calibration=list(batches), **kwargs)
    got = prunekit.prune(from_generator, IMAGES[:1], calibration=(b for b in batches), **kwargs)
    assert got.reconstruction is not None and got.removed == expected.removed
    for name, value in from_list.state_dict().items():
        torch.testing.assert_close(from_generator.state_dict()[name], value)
