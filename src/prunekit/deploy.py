"""Where a model is deployed: ONNX export, ONNX Runtime sessions, latency and accuracy there, and static
int8 post-training quantization with ONNX Runtime's own tooling (QDQ, per-channel weights)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .errors import UsageError, arg
from .export import INPUT, OPSET, export_onnx
from .files import atomic_write
from .measure import latency_repeats, timing_row
from .options import choices

CALIBRATION_METHODS = choices("calibration_method")


def require_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or a one-line error saying how to install it."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        raise UsageError("ONNX Runtime is not installed: pip install 'prunekit[export]'") from None
    return onnxruntime


def write_onnx(
    model: nn.Module, input_size: int | torch.Tensor, path: str | Path, opset: int = OPSET
) -> Path:
    """Export ``model`` (normalized images [N, 3, H, W] -> logits) to ONNX with a dynamic batch axis; the
    input is a square of side ``input_size`` or shaped like an example tensor."""
    require_onnxruntime()
    model = model.eval()
    shape = (1, 3, input_size, input_size) if isinstance(input_size, int) else (1, *input_size.shape[1:])
    example = torch.randn(shape, device=next(model.parameters()).device)

    try:
        return atomic_write(path, lambda tmp: export_onnx(model, example, tmp, opset))
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(
            f"{type(model).__name__} cannot be exported to ONNX ({type(exc).__name__}: {exc})"
        ) from None


def session(path: str | Path, threads: int) -> Any:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (set explicitly, so timings say how)."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about unused initializers are noise here
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_times(
    paths: Sequence[str | Path],
    x: np.ndarray,
    threads: int,
    repeats: int | None = None,
    warmup: int = 5,
    block: int = 10,
    advance: Callable[[], Any] = lambda: None,
) -> list[list[float]]:
    """Seconds per ``run`` of each ONNX model on ``x``, in alternating blocks of ``block`` runs; each block
    opens a fresh session, warms it up and closes it after, so no other session is alive while one is timed.

    A session's pool threads outlive its runs, and sessions left open slow each other even timed in blocks:
    on two cores a pruned ResNet-18 took 0.21 ms at batch 1 beside the dense one, 0.13 ms alone. Alternating
    the blocks still spreads a change in machine load over every model.
    """
    times: list[list[float]] = [[] for _ in paths]
    for runs in _block_sizes(latency_repeats(repeats), block):
        for path, bucket in zip(paths, times, strict=True):
            sess = session(path, threads)
            for _ in range(warmup):
                sess.run(None, {INPUT: x})
            for _ in range(runs):
                start = time.perf_counter()
                sess.run(None, {INPUT: x})
                bucket.append(time.perf_counter() - start)
            del sess
            advance()
    return times


def _block_sizes(repeats: int, block: int) -> list[int]:
    """Timed runs in each of ``ort_times``' rounds of blocks."""
    return [min(block, repeats - start) for start in range(0, repeats, block)]


def ort_blocks(models: int, repeats: int | None = None, block: int = 10) -> int:
    """How many blocks ``ort_times`` runs (steps of its ``advance``)."""
    return models * len(_block_sizes(latency_repeats(repeats), block))


def ort_latency(
    paths: Sequence[str | Path],
    input_size: int,
    batch_size: int,
    threads: int,
    warmup: int = 5,
    repeats: int | None = None,
    advance: Callable[[], Any] = lambda: None,
) -> list[dict[str, Any]]:
    """Latency records of ONNX models in ONNX Runtime (CPU, ``threads`` intra-op threads), timed as
    ``ort_times`` does, on one random input of ``batch_size`` images."""
    x = np.random.default_rng(0).standard_normal((batch_size, 3, input_size, input_size), dtype=np.float32)
    times = ort_times(paths, x, threads, repeats, warmup, advance=advance)
    return [timing_row(t, batch_size, threads) | {"runtime": "onnxruntime"} for t in times]


def ort_accuracy(
    sess: Any, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], advance: Callable[[], Any] = lambda: None
) -> dict[str, Any]:
    """Top-1 accuracy of an ONNX Runtime session over ``(images, labels)`` batches (``advance`` after each)."""
    correct = seen = 0
    for x, y in batches:
        logits = sess.run(None, {INPUT: x.contiguous().numpy().astype(np.float32)})[0]
        correct += int((torch.from_numpy(logits).argmax(1) == y).sum())
        seen += len(y)
        advance()
    return {"accuracy": correct / max(seen, 1), "images": seen}


class _Calibration:
    """ONNX Runtime's calibration data reader over normalized training batches."""

    def __init__(self, batches: Sequence[torch.Tensor]):
        self.batches = [b.contiguous().numpy().astype(np.float32) for b in batches]
        self.index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.batches):
            return None
        self.index += 1
        return {INPUT: self.batches[self.index - 1]}

    def rewind(self) -> None:
        self.index = 0


def quantize_int8(
    fp32_path: str | Path,
    out: str | Path,
    calibration: Sequence[torch.Tensor],
    method: str = "minmax",
    exclude: Sequence[str] = (),
) -> Path:
    """Static int8 quantization (QDQ, per-channel int8 weights, uint8 activations: the fast x86 pairing),
    calibrated on ``calibration`` batches; ``exclude`` keeps those ONNX nodes in fp32."""
    require_onnxruntime()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise UsageError(
            f"{arg('calibration_method')} must be one of {', '.join(CALIBRATION_METHODS)}, got {method}"
        )
    if not calibration:
        raise UsageError(
            f"{arg('calibration_images')}: no calibration batch; give at least one batch of images"
        )
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }

    def write(tmp: Path) -> None:
        prepared = tmp.with_name(tmp.name + ".pre.onnx")
        try:
            # Shape inference and graph folding first, as ONNX Runtime's quantization guide recommends.
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_static(
                    str(prepared),
                    str(tmp),
                    _Calibration(calibration),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=methods[method],
                    nodes_to_exclude=list(exclude),
                )
        finally:
            prepared.unlink(missing_ok=True)
            for extra in tmp.parent.glob("augmented_model*.onnx"):  # the calibrator's scratch model
                extra.unlink(missing_ok=True)

    return atomic_write(out, write)


def quantize_model(
    model: nn.Module,
    path: str | Path,
    calibration: Any,
    example_inputs: int | torch.Tensor,
    method: str = "minmax",
    keep_fp32: Sequence[str] = (),
) -> Path:
    """Static int8 ONNX of an in-memory ``model`` at ``path``, calibrated on ``calibration`` (input batches,
    labels optional) as ``prunekit quantize`` does; ``keep_fp32`` names ONNX nodes left in fp32."""
    import tempfile

    from .call_inputs import calibration_inputs

    batches = [x.cpu() for x, _ in calibration_inputs(calibration, torch.device("cpu"))]
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = write_onnx(model, example_inputs, Path(tmp) / "fp32.onnx")
        return quantize_int8(fp32, path, batches, method=method, exclude=keep_fp32)


def conv_nodes(path: str | Path) -> list[str]:
    """Names of the Conv and Gemm nodes of an ONNX model, in graph order (candidates to keep in fp32)."""
    import onnx

    graph = onnx.load(str(path)).graph
    return [n.name for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
