"""``prunekit export``: a checkpoint's model written as ONNX or TorchScript."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..checkpoint import load_checkpoint
from ..console import console, renamed_keyword
from ..export import FORMAT, OPSET, _check_format, export_model
from ..files import DirectoryLock, check_outputs, clean_stale_temps
from ..options import Command, flag
from .rundir import CHECKPOINT, default_output, overwrite_flag, run_printed


def export_checkpoint(
    path: str | Path,
    format: str = FORMAT,
    out: str | Path | None = None,
    opset: int = OPSET,
    overwrite: bool = False,
    fmt: str | None = None,
) -> Path:
    """Write ``path``'s model as ONNX or TorchScript; the input is normalized images [N, 3, H, W].

    Never onto ``path`` itself; an existing ``out`` is refused unless ``overwrite``. ``fmt`` is ``format``'s
    name until 0.2.
    """
    fmt = renamed_keyword("export_checkpoint", "fmt", "format", fmt, format)
    _check_format(fmt)
    suffix = ".onnx" if fmt == "onnx" else ".pt"
    out = default_output(path, out, suffix)
    check_outputs([path], [out], overwrite)
    with DirectoryLock(out.parent):
        clean_stale_temps(out.parent)
        return _export(path, fmt, out, opset)


def _export(path: str | Path, fmt: str, out: Path, opset: int) -> Path:
    ckpt = load_checkpoint(path)
    return export_model(ckpt.model, out, ckpt.meta["input_size"], fmt, opset)


FLAGS = [
    CHECKPOINT,
    flag("format", default=FORMAT),
    flag("out", type=Path, default=None),
    overwrite_flag("--out"),
]


def main(args: argparse.Namespace) -> int:
    """``prunekit export``: the file written, named."""
    return run_printed(export_checkpoint, _print_written, args, args.checkpoint)


def _print_written(out: Path) -> None:
    console.print(f"wrote {out}", highlight=False)


COMMAND = Command("export", "export a checkpoint to ONNX or TorchScript", FLAGS, main)
