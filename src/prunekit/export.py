"""Export a checkpoint to a deployable format: ONNX (dynamic batch) or TorchScript."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .errors import UsageError
from .files import DirectoryLock, atomic_write, check_outputs, clean_stale_temps

FORMATS = ("onnx", "torchscript")


def export_checkpoint(
    path: str | Path, fmt: str, out: str | Path | None = None, opset: int = 17, overwrite: bool = False
) -> Path:
    """Write ``path``'s model as ONNX or TorchScript; the input is normalized images [N, 3, H, W].

    Never onto ``path`` itself; an existing ``out`` is refused unless ``overwrite``.
    """
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt}")
    suffix = ".onnx" if fmt == "onnx" else ".pt"
    out = Path(out) if out else Path(path).with_suffix(suffix)
    check_outputs([path], [out], overwrite)
    with DirectoryLock(out.parent):
        clean_stale_temps(out.parent)
        return _export(path, fmt, out, opset)


def _export(path: str | Path, fmt: str, out: Path, opset: int) -> Path:
    from .api import load

    ckpt = load(path)
    model = ckpt.model.eval()
    size = ckpt.meta["input_size"]
    example = torch.randn(1, 3, size, size)
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
