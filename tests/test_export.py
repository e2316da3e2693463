"""Export of a pruned checkpoint: ONNX (dynamic batch) and TorchScript match PyTorch's outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prunekit.api import model_meta
from prunekit.checkpoint import load_checkpoint, save_checkpoint
from prunekit.cli import EXIT_USAGE, main
from prunekit.data import synthetic_data
from prunekit.importance import make_importance
from prunekit.models import build_model
from prunekit.pruning import PruneRequest, prune_model


@pytest.fixture(scope="module")
def pruned_ckpt(tmp_path_factory) -> Path:
    """A resnet18 pruned to half its MACs, with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    model = build_model("resnet18", 10).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    prune_model(model, PruneRequest(target_macs=0.5), make_importance("l1"), torch.zeros(1, 3, 32, 32))
    bundle = synthetic_data(train_per_class=1, test_per_class=1)
    meta = model_meta(
        "resnet18", bundle, {"spec": "synthetic", "data_dir": None, "subset": None, "image_size": None}
    )
    return save_checkpoint(tmp_path_factory.mktemp("pruned") / "resnet18-pruned.safetensors", model, meta)


def reference(ckpt: Path, x: torch.Tensor) -> torch.Tensor:
    model = load_checkpoint(ckpt).model
    assert model.layer4[1].conv1.out_channels < 512  # really a pruned model
    with torch.no_grad():
        return model(x)


def test_onnx_matches_pytorch_with_dynamic_batch(capsys, tmp_path, pruned_ckpt):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    assert main(["export", str(pruned_ckpt), "--format", "onnx", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().err.replace("\n", "")
    assert out.is_file()

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "images"
    assert inp.shape[1:] == [3, 32, 32] and not isinstance(inp.shape[0], int)  # symbolic batch

    gen = torch.Generator().manual_seed(3)
    for batch in (3, 1):  # exported at batch 1; batch 3 exercises the dynamic axis
        x = torch.randn(batch, 3, 32, 32, generator=gen)
        (got,) = session.run(["logits"], {"images": x.numpy()})
        expected = reference(pruned_ckpt, x)
        assert got.shape == (batch, 10)
        assert (torch.from_numpy(got) - expected).abs().max().item() < 1e-4


def test_onnx_default_output_path(tmp_path, pruned_ckpt):
    pytest.importorskip("onnx")
    ckpt = tmp_path / "copy.safetensors"
    ckpt.write_bytes(pruned_ckpt.read_bytes())
    assert main(["export", str(ckpt)]) == 0
    assert (tmp_path / "copy.onnx").is_file()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_matches_pytorch(capsys, tmp_path, pruned_ckpt):
    out = tmp_path / "model.pt"
    assert main(["export", str(pruned_ckpt), "--format", "torchscript", "--out", str(out)]) == 0
    scripted = torch.jit.load(str(out))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = scripted(x)
    expected = reference(pruned_ckpt, x)
    assert got.shape == (3, 10)
    assert (got - expected).abs().max().item() < 1e-5


def test_export_of_a_missing_checkpoint_fails_cleanly(capsys, tmp_path):
    missing = tmp_path / "absent.safetensors"
    out = tmp_path / "absent.onnx"
    assert main(["export", str(missing), "--out", str(out)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_export_rejects_unknown_format(capsys, pruned_ckpt):
    assert main(["export", str(pruned_ckpt), "--format", "tflite"]) == EXIT_USAGE
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.slow
def test_onnx_falls_back_to_the_dynamo_exporter(tmp_path):
    """AlexNet at 64 px pools a 1x1 map to 6x6, which the TorchScript exporter refuses; the result still
    runs in ONNX Runtime with the same outputs at another batch size."""
    import onnxruntime as ort

    from prunekit.export import export_checkpoint

    torch.manual_seed(0)
    model = build_model("alexnet", 10).eval()
    path = save_checkpoint(
        tmp_path / "alexnet.safetensors", model, {"model": "alexnet", "num_classes": 10, "input_size": 64}
    )
    out = export_checkpoint(path, "onnx")
    x = torch.randn(3, 3, 64, 64)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[
        0
    ]
    with torch.no_grad():
        expected = model(x)
    assert got.shape == (3, 10)
    assert float((torch.from_numpy(got) - expected).abs().max()) <= 1e-4 * float(expected.abs().max()) + 1e-6
