"""Export a checkpoint to a deployable format: ONNX (dynamic batch) or TorchScript."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch

from .errors import UsageError
from .files import atomic_write

INPUT, OUTPUT = "images", "logits"  # the exported graph's tensor names
FORMATS = ("onnx", "torchscript")
FORMAT = "onnx"  # the default of export_checkpoint and --format
OPSET = 17  # the ONNX opset exports are written at


def export_model(
    model: torch.nn.Module,
    path: str | Path,
    example_inputs: int | torch.Tensor,
    format: str = "onnx",
    opset: int = OPSET,
) -> Path:
    """Write an in-memory ``model`` to ``path`` (atomically) as ONNX with a dynamic batch, or TorchScript;
    ``example_inputs`` is an input tensor or the side of a square image."""
    _check_format(format)
    model = model.eval()
    if isinstance(example_inputs, torch.Tensor):
        example = torch.randn(1, *example_inputs.shape[1:])
    else:
        example = torch.randn(1, 3, example_inputs, example_inputs)
    example = example.to(next(model.parameters()).device)
    if format == "onnx":
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise UsageError("ONNX export needs the onnx package: pip install 'prunekit[export]'") from None

        def write(tmp: Path) -> None:
            export_onnx(model, example, tmp, opset)
    else:

        def write(tmp: Path) -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.jit.save(torch.jit.trace(model, example), str(tmp))

    return atomic_write(Path(path), write)


def _check_format(fmt: str) -> None:
    from .options import validate_given

    validate_given({"format": fmt})


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    """ONNX with a dynamic batch: TorchScript-based export, else the dynamo exporter.

    The TorchScript exporter lacks some operations at small input sizes (adaptive pooling to a size that
    does not divide the input, as in AlexNet below 224 px); the dynamo exporter has them.
    """
    names = {"input_names": [INPUT], "output_names": [OUTPUT]}
    axes = {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model, (example,), str(path), dynamic_axes=axes, opset_version=opset, dynamo=False, **names
            )
            return
        except Exception as exc:
            first = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the dynamo exporter reports progress on stdout
                torch.onnx.export(
                    model,
                    (example,),
                    str(path),
                    dynamic_axes=axes,
                    opset_version=max(opset, 18),
                    dynamo=True,
                    **names,
                )
        except Exception:
            raise UsageError(f"{type(model).__name__} cannot be exported to ONNX ({first})") from None


def __getattr__(name: str):
    """``export_checkpoint``, the command on paths, lives in ``prunekit.commands.export`` now."""
    if name == "export_checkpoint":
        from .commands.export import export_checkpoint

        return export_checkpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
