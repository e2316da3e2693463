"""Where int8 gains in ONNX Runtime: the deploy benchmark's dense model and its global-allocation pruned model
(`deploy.py --allocation global`), quantized in QDQ
(prunekit's format) and QOperator form and with signed activations, all timed in alternating blocks.

    python benchmarks/int8_formats.py      # after benchmarks/deploy.py --allocation global (reads runs/deploy/)

Calibration uses random images: this measures speed only, not accuracy.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from common import ROOT, require, save
from prunekit.checkpoint import load_checkpoint
from prunekit.deploy import _Calibration, ort_latency, write_onnx

RUN = ROOT / "runs" / "deploy"


def main() -> None:
    dense = load_checkpoint(require(RUN / "baseline" / "model.safetensors")).model.eval()
    pruned = load_checkpoint(require(RUN / "finetune-round16" / "model.safetensors")).model.eval()
    torch.manual_seed(0)
    calibration = [torch.randn(64, 3, 32, 32) for _ in range(4)]
    tmp = Path(tempfile.mkdtemp())
    models = {"dense fp32": tmp / "d.onnx", "pruned fp32": tmp / "p.onnx"}
    write_onnx(dense, 32, models["dense fp32"])
    write_onnx(pruned, 32, models["pruned fp32"])
    variants = [
        ("dense int8 QDQ u8s8", "dense fp32", QuantFormat.QDQ, QuantType.QUInt8),
        ("pruned int8 QDQ u8s8 (prunekit)", "pruned fp32", QuantFormat.QDQ, QuantType.QUInt8),
        ("pruned int8 QOperator u8s8", "pruned fp32", QuantFormat.QOperator, QuantType.QUInt8),
        ("pruned int8 QDQ s8s8", "pruned fp32", QuantFormat.QDQ, QuantType.QInt8),
    ]
    for name, source, fmt, activations in variants:
        prepared = tmp / f"{len(models)}.pre.onnx"
        quant_pre_process(str(models[source]), str(prepared), skip_symbolic_shape=True)
        models[name] = tmp / f"{len(models)}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(
                str(prepared),
                str(models[name]),
                _Calibration(calibration),
                quant_format=fmt,
                per_channel=True,
                activation_type=activations,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
    threads = torch.get_num_threads()
    results = {}
    for batch in (1, 64):
        for name, timing in zip(models, ort_latency(list(models.values()), 32, batch, threads), strict=True):
            results.setdefault(name, {})[f"batch{batch}"] = timing
    for name, row in results.items():
        print(f"{name:34s} {row['batch1']['median_ms']:7.3f} ms  {row['batch64']['median_ms']:7.2f} ms")
    save(
        "int8_formats",
        {"command": "python benchmarks/int8_formats.py", "threads": threads, "models": results},
    )


if __name__ == "__main__":
    main()
