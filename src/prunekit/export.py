"""Export a checkpoint to a deployable format: ONNX (dynamic batch) or TorchScript."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .errors import UsageError
from .files import atomic_write

FORMATS = ("onnx", "torchscript")


def export_checkpoint(path: str | Path, fmt: str, out: str | Path | None = None, opset: int = 17) -> Path:
    """Write ``path``'s model as ONNX or TorchScript; the input is normalized images [N, 3, H, W]."""
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt}")
    ckpt = load_checkpoint(path)
    model = ckpt.model.eval()
    size = ckpt.meta["input_size"]
    example = torch.randn(1, 3, size, size)
    suffix = ".onnx" if fmt == "onnx" else ".pt"
    out = Path(out) if out else Path(path).with_suffix(suffix)
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise UsageError("ONNX export needs the onnx package: pip install 'prunekit[export]'") from None

        def write(tmp: Path) -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model,
                    (example,),
                    str(tmp),
                    input_names=["images"],
                    output_names=["logits"],
                    dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                    opset_version=opset,
                    dynamo=False,
                )
    else:

        def write(tmp: Path) -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.jit.save(torch.jit.trace(model, example), str(tmp))

    return atomic_write(out, write)
