"""``prunekit quantize``: static int8 in ONNX Runtime, calibrated on training images, measured."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_checkpoint
from ..console import renamed_keyword, stages
from ..errors import UsageError, arg
from ..files import DirectoryLock, check_outputs
from ..options import SEED, Command, flag, validate_given
from .evaluate import _ort_timing, dense_parent_architecture
from .rundir import CHECKPOINT, DATA_FLAGS, default_output, load_data_for, run_printed

# The defaults of quantize_checkpoint, its flags and prunekit run's config, stated once.
CALIBRATION_IMAGES = 512  # training images int8 is calibrated on
CALIBRATION_METHOD = "minmax"


def quantize_checkpoint(
    path: str | Path,
    out: str | Path | None = None,
    calibration_images: int = CALIBRATION_IMAGES,
    calibration_method: str = CALIBRATION_METHOD,
    keep_fp32: list[str] | None = None,
    remedies: bool = True,
    data: str | None = None,
    data_dir: str | None = None,
    subset: int | None = None,
    threads: int | None = None,
    seed: int = SEED,
    overwrite: bool = False,
    method: str | None = None,
) -> dict[str, Any]:
    """Static int8 quantization of a checkpoint in ONNX Runtime, calibrated on training images; measures
    dense fp32 -> model fp32 -> model int8 (accuracy, size on disk, ORT latency at batch 1 and 64).

    When int8 loses more than 1 point, the standard remedies are tried and measured (4x the calibration
    images, the other calibration methods, the first and last layers kept in fp32); the best one is kept.
    """

    from ..deploy import require_onnxruntime

    require_onnxruntime()
    calibration_method = renamed_keyword(
        "quantize_checkpoint", "method", "calibration_method", method, calibration_method
    )
    validate_given({"calibration_method": calibration_method, "calibration_images": calibration_images})
    ckpt = load_checkpoint(path)
    meta, model = ckpt.meta, ckpt.model.eval()
    out = default_output(path, out, "-int8.onnx")
    if out.suffix != ".onnx":
        raise UsageError(f"{arg('out')} {out}: an int8 model is written as .onnx")
    check_outputs([path], [out, out.with_suffix(".json")], overwrite)
    asked = _Int8Ask(
        calibration_images=calibration_images,
        method=calibration_method,
        keep_fp32=list(keep_fp32 or []),
        remedies=remedies,
        data=data,
        data_dir=data_dir,
        subset=subset,
        threads=threads,
        seed=seed,
    )
    with DirectoryLock(out.parent):
        return _quantize(path, out, meta, model, asked)


@dataclass
class _Int8Ask:
    """How ``prunekit quantize`` was asked to calibrate (on which data, with which seed), whether it may try
    the remedies, and the ONNX Runtime threads it measures with (None: torch's)."""

    calibration_images: int
    method: str
    keep_fp32: list[str]
    remedies: bool
    data: str | None = None
    data_dir: str | None = None
    subset: int | None = None
    threads: int | None = None
    seed: int = SEED


def _quantize(
    path: str | Path, out: Path, meta: dict[str, Any], model: torch.nn.Module, asked: _Int8Ask
) -> dict[str, Any]:
    """The int8 model of ``model`` written to ``out`` as ``asked``, measured against fp32; the report."""
    import shutil
    import tempfile

    from ..deploy import ort_accuracy, session, write_onnx
    from ..files import atomic_write, write_json

    bundle = load_data_for(meta, asked.data, asked.data_dir, asked.subset)
    batch = 32
    available = min(asked.calibration_images, len(bundle.train))
    if available < batch:
        raise UsageError(
            f"{arg('calibration_images')}: {available} calibration image(s), fewer than one batch of {batch}; "
            "give more (at least 256 is usual)"
        )
    threads = asked.threads or torch.get_num_threads()
    size = meta["input_size"]
    test = list(bundle.loader("test", 256, channels_last=False))

    def calibration(n: int) -> list[torch.Tensor]:
        return [x for x, _ in bundle.sample_batches(min(n, len(bundle.train)), batch, asked.seed)]

    with tempfile.TemporaryDirectory() as tmp, stages() as stage:
        tmp = Path(tmp)
        fp32 = write_onnx(model, size, tmp / "fp32.onnx")
        fp32_acc = ort_accuracy(session(fp32, threads), test, stage("fp32 accuracy", len(test)))["accuracy"]
        tries = _int8_tries(fp32, fp32_acc, asked, calibration, test, threads, stage)
        best = max(tries, key=lambda t: t["accuracy"])
        shutil.copyfile(best["file"], tmp / "best.onnx")
        paths = [tmp / "best.onnx", fp32]
        dense = dense_parent_architecture(meta)
        if dense is not None:
            paths.append(write_onnx(dense, size, tmp / "dense.onnx"))
        timing = _ort_timing(paths, size, threads, stage)
        sizes = {"int8": (tmp / "best.onnx").stat().st_size, "fp32": fp32.stat().st_size}
        if dense is not None:
            sizes["dense_fp32"] = (tmp / "dense.onnx").stat().st_size
        atomic_write(out, lambda p: shutil.copyfile(tmp / "best.onnx", p))
    rows = _quantize_rows(meta, fp32_acc, best, sizes, timing)
    report = {
        "checkpoint": str(path),
        "int8_model": str(out),
        "runtime": {"name": "onnxruntime", "provider": "CPUExecutionProvider", "threads": threads},
        "calibration": {"images": best["calibration_images"], "method": best["method"], "keep_fp32": best["keep_fp32"]},
        "rows": rows,
        "tries": [{k: v for k, v in t.items() if k != "file"} for t in tries],
        "int8_drop_points": best["drop_points"],
    }  # fmt: skip
    base = rows.get("dense_fp32", rows["fp32"])["latency"]
    report["speedup_vs_dense_fp32"] = {
        k: base[k]["median_ms"] / rows["int8"]["latency"][k]["median_ms"] for k in base
    }
    write_json(out.with_suffix(".json"), report)
    return report


def _int8_tries(
    fp32: Path,
    fp32_acc: float,
    asked: _Int8Ask,
    calibration: Callable[[int], list[torch.Tensor]],
    test: list[Any],
    threads: int,
    stage: Callable[[str, int], Callable[[], None]],
) -> list[dict[str, Any]]:
    """int8 models of ``fp32`` (beside it) as asked and, when that loses more than 1 point, by each remedy:
    4x the calibration images, each other calibration method, the first and last layers kept in fp32."""
    from ..deploy import CALIBRATION_METHODS, conv_nodes, ort_accuracy, quantize_int8, session

    tries: list[dict[str, Any]] = []
    images, method = asked.calibration_images, asked.method

    def attempt(name: str, n: int, how: str, exclude: list[str]) -> None:
        target = fp32.parent / f"int8-{len(tries)}.onnx"
        calibrated = stage(f"int8 calibration, {name}", 1)  # ONNX Runtime's calibrator reports no steps
        quantize_int8(fp32, target, calibration(n), method=how, exclude=exclude)
        calibrated()
        progress = stage(f"int8 accuracy, {name}", len(test))
        acc = ort_accuracy(session(target, threads), test, progress)["accuracy"]
        tries.append({"name": name, "calibration_images": n, "method": how, "keep_fp32": exclude,
                      "accuracy": acc, "drop_points": (fp32_acc - acc) * 100, "file": target})  # fmt: skip

    attempt("as asked", images, method, list(asked.keep_fp32))
    if asked.remedies and tries[0]["drop_points"] > 1.0:
        attempt("4x calibration images", images * 4, method, list(asked.keep_fp32))
        for other in CALIBRATION_METHODS:
            if other != method:
                attempt(f"{other} calibration", images, other, list(asked.keep_fp32))
        nodes = conv_nodes(fp32)
        attempt("first and last layers in fp32", images, method, [nodes[0], nodes[-1]])
    return tries


def _quantize_rows(
    meta: dict[str, Any],
    fp32_acc: float,
    best: dict[str, Any],
    sizes: dict[str, int],
    timing: dict[str, list[dict[str, Any]]],
) -> dict[str, dict[str, Any]]:
    """The deployment table's rows: the dense parent's (when pruned), this model's fp32 and its best int8.

    ``timing`` holds, per batch size, the latency of int8, fp32 and dense, in that order.
    """
    rows = {
        "fp32": {"accuracy": fp32_acc, "size_mb": sizes["fp32"] / 1e6, "latency": {k: v[1] for k, v in timing.items()}},
        "int8": {"accuracy": best["accuracy"], "size_mb": sizes["int8"] / 1e6, "latency": {k: v[0] for k, v in timing.items()}},
    }  # fmt: skip
    if "dense_fp32" not in sizes:
        return rows
    return {
        "dense_fp32": {
            "accuracy": (meta["parent"].get("metrics") or {}).get("test_accuracy"),
            "size_mb": sizes["dense_fp32"] / 1e6,
            "latency": {k: v[2] for k, v in timing.items()},
        },
        **rows,
    }


FLAGS = [
    CHECKPOINT,
    flag("out", type=Path, default=None, help="int8 .onnx (default: <checkpoint>-int8.onnx)"),
    flag("calibration_images", default=CALIBRATION_IMAGES, help="training images"),
    flag("calibration_method", default=CALIBRATION_METHOD),
    flag(
        "keep_fp32", action="append", default=[], metavar="NODE", help="ONNX node kept in fp32 (repeatable)"
    ),
    flag(
        "remedies",
        "--no-remedies",
        action="store_false",
        help="do not try remedies when int8 loses > 1 point",
    ),
    flag("threads", default=None, help="ONNX Runtime threads (default: torch's)"),
    flag("overwrite", action="store_true", help="replace an existing output"),
    *DATA_FLAGS,
]


def main(args: argparse.Namespace) -> int:
    """``prunekit quantize``: the int8 model written, its table printed."""
    from ..printing import print_quantize

    return run_printed(quantize_checkpoint, print_quantize, args, args.checkpoint)


COMMAND = Command("quantize", "int8 post-training quantization in ONNX Runtime, measured", FLAGS, main)
