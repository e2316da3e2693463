"""The Python API behind the commands: each function does one step end to end on paths and names."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import description, load_checkpoint
from .console import console, info, note, stages
from .data import DataBundle, describe, load_data
from .errors import UsageError, arg
from .files import DirectoryLock, check_outputs, clean_stale_temps, is_main_process
from .measure import REPEATS, count_macs, count_params, evaluate, latency, summary
from .models import build_model, min_input_size
from .resume import refuse_changes
from .train import MODEL_FILE, STATE_FILE, FitResult, TrainConfig, check_finite, fit

RUN_FILES = (STATE_FILE, MODEL_FILE, "metrics.json", "train_log.txt")  # what fit writes in its out_dir

__all__ = ["description"]  # re-exported: derived checkpoints in benchmarks inherit through it


def model_meta(
    model_name: str, data: DataBundle, data_args: dict[str, Any], weights: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What a checkpoint must know about its model and data to be rebuilt and evaluated later."""
    return {
        "model": model_name,
        "num_classes": len(data.classes),
        "classes": data.classes,
        "input_size": data.image_size,
        "mean": list(data.mean),
        "std": list(data.std),
        "preprocess": data.preprocess,
        "split": data.split_info,
        "weights": weights,
        "data": data_args,
        "prunekit_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def run_outputs(out: Path) -> list[Path]:
    return [out / name for name in RUN_FILES]


def claim_run_dir(out: Path, inputs: list[Any], resume: bool, overwrite: bool) -> None:
    """Refuse a run directory that would destroy an input, or that holds a run we neither resume nor replace.

    Under torchrun only rank 0 judges (the others would see rank 0's first files).
    """
    if not is_main_process():
        return
    clean_stale_temps(out)
    check_outputs(inputs, run_outputs(out), overwrite=True)
    held = [p.name for p in run_outputs(out) if p.exists()]
    if held and not (resume or overwrite):
        raise UsageError(
            f"{out} already holds a training run ({', '.join(held)}); continue it with {arg('resume')} "
            f"or replace it with {arg('overwrite')}"
        )


def clear_run_dir(out: Path) -> None:
    """Remove a replaced run's outputs first, so a new run never sits half-done beside the old model."""
    if not is_main_process():
        return
    for p in run_outputs(out):
        p.unlink(missing_ok=True)


def train(
    model: str | None,
    data: str | None,
    out: str | Path,
    config: TrainConfig | None = None,
    data_dir: str | None = None,
    subset: int | None = None,
    image_size: int | None = None,
    resume: bool = False,
    weights: str | None = None,
    val_split: float | None = None,
    overwrite: bool = False,
) -> FitResult:
    """Train ``model`` on ``data`` (from ``weights`` when given: transfer learning); writes checkpoints, log
    and metrics under ``out``, which is locked against other processes meanwhile. A directory holding a run
    is refused unless ``resume`` (continue it) or ``overwrite`` (replace it). A resumed run keeps its recorded
    settings: any argument given (not None) that differs from them is refused."""
    out = Path(out)
    if resume:
        requested = {"model": model, "data": data, "data_dir": data_dir, "subset": subset}
        requested |= {"image_size": image_size, "weights": weights, "val_split": val_split}
        requested |= asdict(config) if config is not None else {}
        return resume_training(out, requested)
    if model is None or data is None:
        raise UsageError("a new training run needs a model and a dataset")
    config = config or TrainConfig()
    config.validate()
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise UsageError(f"{arg('image_size')} must be a positive number of pixels, got {image_size!r}")
    weights_file = Path(weights) if weights and Path(weights).is_file() else None
    with DirectoryLock(out):
        claim_run_dir(out, [weights_file], resume, overwrite)
        return _train_fresh(model, data, out, config, data_dir, subset, image_size, weights, val_split)


def resume_training(out: str | Path, requested: dict[str, Any] | None = None) -> FitResult:
    """Continue the training run in ``out`` with its recorded settings; ``requested`` (settings by option
    name, as ``train`` takes them) that differ from the record are refused, naming each."""
    out = Path(out)
    with DirectoryLock(out):
        if is_main_process():  # under torchrun, rank 0 tidies the directory, as for a new run
            clean_stale_temps(out)
        return _resume_training(out, requested or {})


def _resume_training(out: Path, requested: dict[str, Any]) -> FitResult:
    state = out / STATE_FILE
    if not state.exists():
        raise UsageError(
            f"{arg('resume')}: no interrupted run in {out} (no {STATE_FILE}); start it without {arg('resume')}"
        )
    ckpt = load_checkpoint(state)
    recorded_data = ckpt.meta.get("data") or {}
    recorded = {"model": ckpt.meta["model"], "data": recorded_data.get("spec"), **recorded_data}
    recorded["weights"] = (ckpt.meta.get("weights") or {}).get("requested")
    refuse_changes(out, recorded | ckpt.meta["train"]["config"], requested)
    config = TrainConfig.from_dict(ckpt.meta["train"]["config"])
    if (ckpt.meta.get("train_state") or {}).get("epoch", 0) >= config.epochs:
        info(f"the run in {out} has finished its {config.epochs} epochs: nothing to continue")
    bundle = load_data_for(ckpt.meta)
    return fit(ckpt.model, bundle, config, out, description(ckpt.meta), resume=ckpt)


def _train_fresh(
    model: str,
    data: str,
    out: Path,
    config: TrainConfig,
    data_dir: str | None,
    subset: int | None,
    image_size: int | None,
    weights: str | None,
    val_split: float | None,
) -> FitResult:
    from .weights import build_with_weights

    data_args = {
        "spec": data,
        "data_dir": data_dir,
        "subset": subset,
        "image_size": image_size,
        "val_split": val_split,
    }
    load = dict(
        data_dir=data_dir, subset=subset, image_size=image_size, seed=config.seed, val_split=val_split
    )
    bundle = load_data(data, **load)
    torch.manual_seed(config.seed)
    net, preprocess, record = build_with_weights(model, len(bundle.classes), weights)
    if record is not None:
        record["requested"] = weights  # as written, for a resumed run to compare with
    if preprocess is not None:
        # The weights' own input pipeline from now on; an explicit image size keeps only their statistics.
        wanted = preprocess.to_dict()
        if image_size is not None:
            wanted = {k: wanted[k] for k in ("mean", "std", "interpolation")}
        bundle = load_data(data, **load, preprocess=wanted)
    if bundle.image_size < min_input_size(model):
        raise UsageError(
            f"{model} needs inputs of at least {min_input_size(model)} px, and {data} is read at "
            f"{bundle.image_size} px (the size most of its images have); pass {arg('image_size')} "
            f"{min_input_size(model)} (or more) to resize them"
        )
    if is_main_process():
        info(describe(bundle))
    meta = model_meta(model, bundle, data_args, record)
    clear_run_dir(out)
    return fit(net, bundle, config, out, meta)


def load_data_for(
    meta: dict[str, Any], data: str | None = None, data_dir: str | None = None, subset: int | None = None
) -> DataBundle:
    """The dataset a checkpoint was trained on (or ``data`` instead), with the checkpoint's input pipeline."""
    recorded = meta.get("data") or {}
    spec = data or recorded.get("spec")
    if spec is None:
        raise UsageError(f"this checkpoint does not record its dataset; pass {arg('data')}")
    try:
        bundle = load_data(
            spec,
            data_dir=data_dir or recorded.get("data_dir"),
            subset=subset if subset is not None else recorded.get("subset"),
            image_size=meta["input_size"],
            val_split=recorded.get("val_split"),
            seed=(meta.get("split") or {}).get("seed", 0),
            preprocess=meta.get("preprocess"),
        )
    except UsageError as exc:
        if data:
            raise
        raise UsageError(
            f"the checkpoint's dataset is not available here ({exc}); pass {arg('data')}"
        ) from None
    if len(bundle.classes) != meta["num_classes"]:
        raise UsageError(
            f"{arg('data')} {spec} has {len(bundle.classes)} classes; the checkpoint has {meta['num_classes']}"
        )
    # Normalize with the statistics the model was trained with, not the new data's.
    if meta.get("mean") and meta.get("std"):
        bundle.mean, bundle.std = tuple(meta["mean"]), tuple(meta["std"])
    return bundle


def evaluate_checkpoint(
    path: str | Path,
    data: str | None = None,
    data_dir: str | None = None,
    subset: int | None = None,
    batch_size: int | None = None,
    measure_latency: bool = True,
    out: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Accuracy (overall, per class), the torchinfo summary, MACs and CPU latency of a checkpoint; also
    written to the JSON file ``out`` when given (refused if it exists, unless ``overwrite``)."""
    if out is not None:
        check_outputs([path], [out], overwrite)
    ckpt = load_checkpoint(path)
    meta = ckpt.meta
    bundle = load_data_for(meta, data, data_dir, subset)
    model = ckpt.model
    from .core import evaluate as evaluate_model

    acc = evaluate_model(model, bundle.loader("test", batch_size), num_classes=meta["num_classes"])
    size = meta["input_size"]
    table = summary(model, size)
    results: dict[str, Any] = {
        "checkpoint": str(path),
        "model": meta["model"],
        "accuracy": acc["accuracy"],
        "per_class": dict(zip(meta["classes"], acc["per_class"], strict=True)),
        "test_images": acc["images"],
        "params": count_params(model),
        "macs": count_macs(model, size),
        "file_size_mb": Path(path).stat().st_size / 1e6,
        "summary": {k: v for k, v in table.items() if k != "table"},
        "summary_table": table["table"],
    }
    if measure_latency:
        dense = _dense_parent(meta)
        with stages() as stage:
            # The dense parent's architecture, timed in alternation with the pruned model on the same input.
            models = [model] if dense is None else [model, dense]
            pairs = {
                f"batch{b}": latency(models, size, b, advance=stage(f"PyTorch latency, batch {b}", REPEATS))
                for b in (1, 64)
            }
            results["latency"] = {k: v[0] for k, v in pairs.items()}
            if dense is not None:
                results["parent_latency"] = {k: v[1] for k, v in pairs.items()}
                results["speedup"] = {k: v[1]["median_ms"] / v[0]["median_ms"] for k, v in pairs.items()}
            results.update(onnxruntime_latency(model, meta, dense, stage=stage))
    if out is not None:
        from .files import write_json

        with DirectoryLock(Path(out).parent):
            write_json(out, {k: v for k, v in results.items() if k != "summary_table"})
    return results


def _dense_parent(meta: dict[str, Any]) -> torch.nn.Module | None:
    """The dense parent's architecture (random weights: latency does not depend on them), if pruned."""
    parent = meta.get("parent")
    return build_model(parent["model"], meta["num_classes"]).eval() if parent else None


def onnxruntime_latency(
    model: torch.nn.Module,
    meta: dict[str, Any],
    dense: torch.nn.Module | None = None,
    threads: int | None = None,
    stage: Callable[[str, int], Callable[[], None]] | None = None,
) -> dict[str, Any]:
    """Latency in ONNX Runtime (CPU), at batch 1 and 64, against ``dense`` (the parent's architecture) when
    given; empty when ONNX Runtime is not installed. ``stage`` adds progress lines (``console.stages``)."""
    import contextlib
    import tempfile

    from .deploy import require_onnxruntime, write_onnx

    try:
        require_onnxruntime()
    except UsageError:
        return {}
    threads = threads or torch.get_num_threads()
    size = meta["input_size"]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        stage = stage or stack.enter_context(stages())
        paths = [write_onnx(model, size, Path(tmp) / "model.onnx")]
        if dense is not None:
            paths.append(write_onnx(dense, size, Path(tmp) / "dense.onnx"))
        pairs = _ort_timing(paths, size, threads, stage)
    results: dict[str, Any] = {"ort_latency": {k: v[0] for k, v in pairs.items()}}
    if dense is not None:
        results["ort_parent_latency"] = {k: v[1] for k, v in pairs.items()}
        results["ort_speedup"] = {k: v[1]["median_ms"] / v[0]["median_ms"] for k, v in pairs.items()}
    return results


def _ort_timing(
    paths: list[Path], size: int, threads: int, stage: Callable[[str, int], Callable[[], None]]
) -> dict[str, list[dict[str, Any]]]:
    """ONNX Runtime latency records of ``paths`` at batch 1 and 64, each batch size a progress line."""
    from .deploy import ort_blocks, ort_latency

    blocks = ort_blocks(len(paths))
    return {
        f"batch{b}": ort_latency(
            paths, size, b, threads, advance=stage(f"ONNX Runtime latency, batch {b}", blocks)
        )
        for b in (1, 64)
    }


def quantize_checkpoint(
    path: str | Path,
    out: str | Path | None = None,
    calibration_images: int = 512,
    method: str = "minmax",
    keep_fp32: list[str] | None = None,
    remedies: bool = True,
    data: str | None = None,
    data_dir: str | None = None,
    threads: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Static int8 quantization of a checkpoint in ONNX Runtime, calibrated on training images; measures
    dense fp32 -> model fp32 -> model int8 (accuracy, size on disk, ORT latency at batch 1 and 64).

    When int8 loses more than 1 point, the standard remedies are tried and measured (4x the calibration
    images, the other calibration methods, the first and last layers kept in fp32); the best one is kept.
    """

    from .deploy import (
        CALIBRATION_METHODS,
        require_onnxruntime,
    )

    require_onnxruntime()
    if method not in CALIBRATION_METHODS:
        raise UsageError(
            f"{arg('calibration_method')} must be one of {', '.join(CALIBRATION_METHODS)}, got {method}"
        )
    if (
        isinstance(calibration_images, bool)
        or not isinstance(calibration_images, int)
        or calibration_images < 1
    ):
        raise UsageError(
            f"{arg('calibration_images')} must be a positive whole number, got {calibration_images!r}"
        )
    ckpt = load_checkpoint(path)
    meta, model = ckpt.meta, ckpt.model.eval()
    out = Path(out) if out else Path(path).with_name(Path(path).stem + "-int8.onnx")
    if out.suffix != ".onnx":
        raise UsageError(f"{arg('out')} {out}: an int8 model is written as .onnx")
    check_outputs([path], [out, out.with_suffix(".json")], overwrite)
    with DirectoryLock(out.parent):
        return _quantize(
            path,
            out,
            meta,
            model,
            calibration_images,
            method,
            keep_fp32,
            remedies,
            data,
            data_dir,
            threads,
            seed,
        )


@dataclass
class _Int8Ask:
    """How ``prunekit quantize`` was asked to calibrate, and whether it may try the remedies."""

    calibration_images: int
    method: str
    keep_fp32: list[str]
    remedies: bool


def _quantize(
    path: str | Path,
    out: Path,
    meta: dict[str, Any],
    model: torch.nn.Module,
    calibration_images: int,
    method: str,
    keep_fp32: list[str] | None,
    remedies: bool,
    data: str | None,
    data_dir: str | None,
    threads: int | None,
    seed: int,
) -> dict[str, Any]:
    import shutil
    import tempfile

    from .deploy import ort_accuracy, session, write_onnx
    from .files import atomic_write, write_json

    bundle = load_data_for(meta, data, data_dir)
    batch = 32
    available = min(calibration_images, len(bundle.train))
    if available < batch:
        raise UsageError(
            f"{arg('calibration_images')}: {available} calibration image(s), fewer than one batch of {batch}; "
            "give more (at least 256 is usual)"
        )
    threads = threads or torch.get_num_threads()
    size = meta["input_size"]
    test = list(bundle.loader("test", 256, channels_last=False))

    def calibration(n: int) -> list[torch.Tensor]:
        return [x for x, _ in bundle.sample_batches(min(n, len(bundle.train)), batch, seed)]

    with tempfile.TemporaryDirectory() as tmp, stages() as stage:
        tmp = Path(tmp)
        fp32 = write_onnx(model, size, tmp / "fp32.onnx")
        fp32_acc = ort_accuracy(session(fp32, threads), test, stage("fp32 accuracy", len(test)))["accuracy"]
        asked = _Int8Ask(calibration_images, method, list(keep_fp32 or []), remedies)
        tries = _int8_tries(fp32, fp32_acc, asked, calibration, test, threads, stage)
        best = max(tries, key=lambda t: t["accuracy"])
        shutil.copyfile(best["file"], tmp / "best.onnx")
        paths = [tmp / "best.onnx", fp32]
        dense = _dense_parent(meta)
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
    from .deploy import CALIBRATION_METHODS, conv_nodes, ort_accuracy, quantize_int8, session

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


def calibration_batches(
    meta: dict[str, Any], bundle: DataBundle | None, images: int, batch_size: int = 128, seed: int = 0
) -> list[tuple[Any, Any]]:
    """Labelled, normalized, unaugmented training images for importance scoring; noise when ``bundle`` is None.

    Noise reproduces the blog exactly: one ``torch.randn(128, 3, H, W)`` batch, with random labels.
    """
    size = meta["input_size"]
    if bundle is None:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(128, 3, size, size, generator=gen)
        return [(x, torch.randint(0, meta["num_classes"], (128,), generator=gen))]
    if images < 1:
        raise UsageError(f"{arg('calibration_images')} must be at least 1, got {images}")
    return bundle.sample_batches(images, batch_size, seed)


def prune_checkpoint(
    path: str | Path,
    request: Any,
    importance: str | None = None,
    data: str | None = None,
    data_dir: str | None = None,
    calibration: str = "data",
    calibration_images: int = 256,
    reconstruction_images: int = 512,
    out: str | Path | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Prune a checkpoint as ``request`` (a ``PruneRequest``) says; write the pruned checkpoint and its report
    (``out`` with a ``.json`` suffix). Outputs that exist are refused unless ``overwrite``.
    Recovery (``request.reconstruct``) re-fits on ``reconstruction_images`` training images."""
    from .core import default_importance
    from .options import validate

    request.validate()
    validate({"reconstruction_images": reconstruction_images})
    if request.reconstruct is None:
        from .core import default_reconstruct

        request.reconstruct = default_reconstruct(calibration == "data", request.layers)
    if request.reconstruct and calibration == "random":
        raise UsageError(
            f"{arg('reconstruct')} re-fits layers on training images; drop {arg('calibration')} random "
            f"(or {arg('reconstruct')} off)"
        )
    importance = importance or default_importance(request.layers)
    if calibration not in ("data", "random"):
        raise UsageError(f"{arg('calibration')} must be 'data' or 'random', got {calibration}")
    if importance == "taylor" and calibration == "random":
        raise UsageError(
            f"{arg('importance')} taylor needs labelled images; drop {arg('calibration')} random"
        )
    out = Path(out) if out else Path(path).with_name(Path(path).stem + "-pruned.safetensors")
    report_file = report_path(out)
    check_outputs([path], [out, report_file], overwrite)
    with DirectoryLock(out.parent):
        clean_stale_temps(out.parent)
        return _prune(
            path,
            request,
            importance,
            data,
            data_dir,
            calibration,
            (calibration_images, reconstruction_images),
            out,
            seed,
        )


def report_path(out: Path) -> Path:
    """Where prune's JSON report goes: beside the checkpoint, never onto it (``--out p.json``)."""
    report = out.with_suffix(".json")
    return out.with_name(out.stem + ".report.json") if report == out else report


def _prune(
    path: str | Path,
    request: Any,
    importance: str,
    data: str | None,
    data_dir: str | None,
    calibration: str,
    image_counts: tuple[int, int],
    out: Path,
    seed: int,
) -> dict[str, Any]:
    from .checkpoint import save_checkpoint
    from .files import write_json

    ckpt = load_checkpoint(path)
    meta, model = ckpt.meta, ckpt.model
    batches, refit = _pruning_images(
        meta, model, request, importance, data, data_dir, calibration, image_counts, seed
    )
    size = meta["input_size"]
    before = summary(model, size)
    result = _prune_as_requested(model, size, request, importance, batches, refit, seed)
    after = summary(model, size)
    report = _prune_report(
        path, out, meta, request, result, before, after,
        importance=importance, calibration=calibration, calibration_images=image_counts[0],
    )  # fmt: skip
    new_meta = _pruned_meta(path, meta, report, result)
    check_finite(model, f"the pruned model ({out})")
    save_checkpoint(out, model, new_meta)
    write_json(report_path(out), report)
    report["tables"] = {"before": before["table"], "after": after["table"]}
    return report


def _pruning_images(
    meta: dict[str, Any],
    model: torch.nn.Module,
    request: Any,
    importance: str,
    data: str | None,
    data_dir: str | None,
    calibration: str,
    image_counts: tuple[int, int],
    seed: int,
) -> tuple[list[tuple[Any, Any]] | None, list[Any] | None]:
    """The scoring batches and the re-fit images the request needs (None where it needs none); scans the
    model for a sensitivity allocation into ``request.sensitivity`` first when it has none."""
    from .importance import NEEDS_CALIBRATION

    calibration_images, reconstruction_images = image_counts
    scores_on_data = importance in NEEDS_CALIBRATION and calibration == "data"
    spreads_by_default = request.allocation is None and request.ratio is None  # by the split's size
    scans = request.allocation == "sensitivity" and request.sensitivity is None
    needs_data = scores_on_data or scans or request.reconstruct or spreads_by_default
    bundle = load_data_for(meta, data, data_dir) if needs_data else None  # loaded once for all of them
    _resolve_allocation(request, len(bundle.train) if bundle is not None else 0)
    scans = request.allocation == "sensitivity" and request.sensitivity is None
    batches = refit = None
    if importance in NEEDS_CALIBRATION:
        batches = calibration_batches(meta, bundle if scores_on_data else None, calibration_images, seed=seed)
    if request.reconstruct:
        refit = [x for x, _ in calibration_batches(meta, bundle, reconstruction_images, seed=seed + 1)]
    if scans:
        from .sensitivity import SCAN_CALIBRATION_IMAGES, SCAN_IMAGES, SCAN_SECONDS, scan

        size = meta["input_size"]
        held_out, recal = scan_batches(bundle, SCAN_IMAGES, SCAN_CALIBRATION_IMAGES, seed)
        request.sensitivity = scan(
            model, torch.zeros(1, 3, size, size), held_out, recal, seconds=SCAN_SECONDS
        )
    return batches, refit


def _resolve_allocation(request: Any, training_images: int) -> None:
    """The default allocation, from the training split's size, into ``request``; a line says when it is
    ``global`` for want of images."""
    from .planning import allocation_note, default_allocation

    note(allocation_note(request.allocation, request.ratio, training_images))
    request.allocation = default_allocation(request.allocation, request.ratio, training_images)


def _prune_as_requested(
    model: torch.nn.Module,
    size: int,
    request: Any,
    importance: str,
    batches: list[tuple[Any, Any]] | None,
    refit: list[Any] | None,
    seed: int,
) -> Any:
    """``core.prune`` of ``model`` in place with every setting of ``request``; its ``PruneReport``."""
    from .core import prune

    return prune(
        model,
        torch.zeros(1, 3, size, size),
        allocation=request.allocation,
        sensitivity=request.sensitivity,
        prune_input_conv=request.prune_input_conv,
        layers=request.layers,
        ratio=request.ratio,
        target_macs=request.target_macs,
        target_params=request.target_params,
        target_latency=request.target_latency,
        latency_batch=request.latency_batch,
        latency_runtime=request.latency_runtime,
        ignore=request.ignore,
        round_to=request.round_to,
        importance=importance,
        calibration=batches,
        reconstruct=request.reconstruct,
        reconstruction=refit,
        seed=seed,
    )


def _prune_report(
    path: str | Path,
    out: Path,
    meta: dict[str, Any],
    request: Any,
    result: Any,
    before: dict[str, Any],
    after: dict[str, Any],
    *,
    importance: str,
    calibration: str,
    calibration_images: int,
) -> dict[str, Any]:
    """prune's JSON report: the settings and request, the summaries before and after, the measured cost
    and what changed."""
    from .importance import NEEDS_CALIBRATION

    return {
        "checkpoint": str(path),
        "pruned_checkpoint": str(out),
        "model": meta["model"],
        "importance": importance,
        "calibration": calibration if importance in NEEDS_CALIBRATION else None,
        "calibration_images": calibration_images
        if calibration == "data" and importance in NEEDS_CALIBRATION
        else None,
        "request": {k: v for k, v in vars(request).items() if k != "sensitivity"},
        "before": {k: v for k, v in before.items() if k != "table"},
        "after": {k: v for k, v in after.items() if k != "table"},
        "macs": {
            "before": result.macs_before,
            "after": result.macs_after,
            "ratio": result.macs_after / result.macs_before,
        },
        "params": {
            "before": result.params_before,
            "after": result.params_after,
            "ratio": result.params_after / result.params_before,
        },
        "removed_channels": result.removed,
        "changed_layers": result.changed_layers,
        "latency": result.latency,
        "reconstruction": result.reconstruction,
    }


def _pruned_meta(
    path: str | Path, meta: dict[str, Any], report: dict[str, Any], result: Any
) -> dict[str, Any]:
    """The pruned checkpoint's metadata: its description, its dense parent, and this pruning appended."""
    parent = meta.get("parent") or {
        "checkpoint": str(path),
        "model": meta["model"],
        "params": result.params_before,
        "macs": result.macs_before,
        "metrics": meta.get("metrics", {}),
    }
    new_meta = description(meta)
    new_meta.update(
        parent=parent,
        pruning=[
            *meta.get("pruning", []),
            {
                **{
                    k: report[k]
                    for k in ("importance", "calibration", "request", "macs", "params", "removed_channels")
                },
                "changed_layers": [c["layer"] for c in result.changed_layers],
            },
        ],
    )
    return new_meta


def finetune_checkpoint(
    path: str | Path,
    out: str | Path,
    recipe_name: str | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    optimizer: str | None = None,
    freeze: str | None = None,
    teacher: str | Path | None = None,
    distill: bool | None = None,
    distill_temperature: float | None = None,
    distill_weight: float | None = None,
    recalibrate: bool | None = None,
    recalibration_images: int | None = None,
    data: str | None = None,
    data_dir: str | None = None,
    subset: int | None = None,
    seed: int | None = None,
    device: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Recalibrate BatchNorm (``recalibrate``, default True, on ``recalibration_images``, default 2048), then
    fine-tune a pruned checkpoint (``recipe_name`` default: ``finetuning.default_recipe``); returns accuracy at each
    stage. Resumed (``resume`` and an interrupted run in ``out``), any argument given (not None) that differs
    from the run's record is refused.

    ``distill`` None distils from ``teacher``, or else from the dense parent the checkpoint was pruned from,
    when the training split holds fewer than ``DISTILL_BELOW`` images; False never distils.

    ``out`` (a directory) is locked meanwhile; one holding a run is refused unless ``resume`` or ``overwrite``.
    """
    from .checkpoint import read_meta
    from .finetuning import default_recipe, recipe

    out = Path(out)
    if distill is False and teacher is not None:
        off = "--no-distill" if arg("distill").startswith("--") else "distill=False"
        raise UsageError(f"{arg('teacher')} is for distillation: it cannot go with {off}")
    asked = {"checkpoint": str(path), "recipe": recipe_name, "epochs": epochs, "lr": lr}
    asked |= {"optimizer": optimizer, "freeze": freeze, "teacher": teacher, "distill": distill}
    asked |= {"distill_temperature": distill_temperature, "distill_weight": distill_weight, "seed": seed}
    asked |= {"recalibrate": recalibrate, "recalibration_images": recalibration_images, "device": device}
    asked |= {"data": data, "data_dir": data_dir, "subset": subset}
    recipe_name = recipe_name or default_recipe(read_meta(path).get("pruning"))
    recalibrate = True if recalibrate is None else recalibrate
    recalibration_images = 2048 if recalibration_images is None else recalibration_images
    seed = 0 if seed is None else seed
    planned = None  # (config, freezing policy) of a fresh run; a resumed one reads its own from the state
    if resume and (out / STATE_FILE).exists():
        _refuse_finetune_changes(out, asked)
    else:
        planned = recipe(
            recipe_name,
            epochs=epochs,
            lr=lr,
            optimizer=optimizer,
            freeze=freeze,
            distill_temperature=distill_temperature,
            distill_weight=distill_weight,
            seed=seed,
            device=device,
        )
        planned[0].validate()  # before the BatchNorm recalibration and evaluations
    with DirectoryLock(out):
        claim_run_dir(out, [path, teacher], resume, overwrite)
        if planned is not None:
            clear_run_dir(out)
        return _finetune(
            path,
            out,
            recipe_name,
            planned,
            (teacher, distill),
            recalibrate,
            recalibration_images,
            data,
            data_dir,
            subset,
            seed,
        )


def _finetune(
    path: str | Path,
    out: Path,
    recipe_name: str,
    planned: tuple[TrainConfig, str] | None,
    distillation: tuple[str | Path | None, bool | None],
    recalibrate: bool,
    recalibration_images: int,
    data: str | None,
    data_dir: str | None,
    subset: int | None,
    seed: int,
) -> dict[str, Any]:
    from .finetuning import recalibrate_batchnorm, trainable_filter
    from .groups import output_layer

    if planned is None:
        ckpt = load_checkpoint(out / STATE_FILE)
        cfg = TrainConfig.from_dict(ckpt.meta["train"]["config"])
        stages = dict(ckpt.meta["finetune"]["accuracy"])
        settings = ckpt.meta["finetune"]
    else:
        ckpt = load_checkpoint(path)
        cfg, policy = planned
        stages = {}
        settings = {"recipe": recipe_name, "freeze": policy, "recalibrate": recalibrate, "source": str(path)}
        settings |= {"recalibration_images": recalibration_images, "data": data, "data_dir": data_dir}
        settings |= {"subset": subset}
    meta, model = ckpt.meta, ckpt.model
    bundle = load_data_for(meta, data, data_dir, subset)
    if planned is not None:
        settings["teacher"] = _teacher_for(meta, len(bundle.train), *distillation)
    size = meta["input_size"]
    example = torch.zeros(1, 3, size, size)
    classifier = output_layer(model, example)
    changed = [name for record in meta.get("pruning", []) for name in record.get("changed_layers", [])]
    trainable = trainable_filter(settings["freeze"], changed, classifier)
    teacher_model = load_checkpoint(settings["teacher"]).model if settings["teacher"] else None
    if not stages:
        test = bundle.loader("test")
        stages["pruned"] = evaluate(model, test, num_classes=meta["num_classes"])["accuracy"]
        if recalibrate:
            batches = calibration_batches(meta, bundle, recalibration_images, seed=seed)
            recalibrate_batchnorm(model, [x for x, _ in batches])
            stages["recalibrated"] = evaluate(model, test, num_classes=meta["num_classes"])["accuracy"]
    settings = {**settings, "accuracy": stages}
    base_meta = description(meta)
    base_meta["finetune"] = settings
    result = fit(
        model,
        bundle,
        cfg,
        out,
        base_meta,
        teacher=teacher_model,
        trainable=trainable,
        resume=ckpt if planned is None else None,
    )
    stages["finetuned"] = result.test["accuracy"]
    return {
        "accuracy": stages,
        "history": result.history,
        "checkpoint": str(out / "model.safetensors"),
        "settings": settings,
        "trainable_params": sum(
            p.numel() for n, p in model.named_parameters() if trainable is None or trainable(n)
        ),
    }


def _refuse_finetune_changes(out: Path, asked: dict[str, Any]) -> None:
    """A resumed fine-tuning keeps its recipe, data and source: refuse a request for others."""
    state = load_checkpoint(out / STATE_FILE)
    settings = state.meta["finetune"]
    recorded = {**state.meta["train"]["config"], **settings, "checkpoint": settings["source"]}
    recorded["distill"] = settings.get("teacher") is not None
    for key in ("checkpoint", "teacher"):  # the same file, however it is written
        if asked[key] and recorded.get(key) and Path(asked[key]).resolve() == Path(recorded[key]).resolve():
            asked = {**asked, key: recorded[key]}
    refuse_changes(out, recorded, asked)


def _teacher_for(
    meta: dict[str, Any], train_images: int, teacher: str | Path | None, distill: bool | None
) -> str | None:
    """The checkpoint to distil from: ``teacher`` when given; else, unless ``distill`` is False, the dense
    parent on a small training split (``distills_by_default``), said in one line either way."""
    from .finetuning import DISTILL_BELOW, distills_by_default

    if teacher is not None or distill is False:
        return str(teacher) if teacher else None
    if distill is None and not distills_by_default(train_images):
        return None
    parent = (meta.get("parent") or {}).get("checkpoint")
    if parent and Path(parent).is_file():
        if distill is None:
            off = "--no-distill" if arg("distill").startswith("--") else "distill=False"
            console.print(
                f"note: {train_images} training images (fewer than {DISTILL_BELOW}): distilling from the "
                f"dense parent {parent} ({off} for cross-entropy alone)",
                highlight=False,
            )
        return parent
    if distill:
        raise UsageError(
            f"{arg('distill')} needs the dense parent, and {parent or 'no parent'} is not a file here: "
            f"pass {arg('teacher')}"
        )
    console.print(
        f"note: {train_images} training images: distillation would help, but the dense parent "
        f"({parent or 'not recorded'}) is not at hand; pass {arg('teacher')} to distil",
        highlight=False,
    )
    return None


def scan_batches(
    bundle: DataBundle, images: int, calibration_images: int, seed: int
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
    """One seeded draw of training images (never the test set): the first ``images`` score the scan, the
    next ``calibration_images`` recalibrate BatchNorm. Both shrink to what the training split holds, and
    a line says so."""
    from .sensitivity import scan_counts

    images, calibration_images, shrunk = scan_counts(len(bundle.train), images, calibration_images)
    note(shrunk)
    batches = bundle.sample_batches(images + calibration_images, 250, seed)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    held_out = [(x[i : min(i + 250, images)], y[i : min(i + 250, images)]) for i in range(0, images, 250)]
    calibration = [x[i : i + 256] for i in range(images, images + calibration_images, 256)]
    return held_out, calibration


def sensitivity_checkpoint(
    path: str | Path,
    out: str | Path | None = None,
    ratios: tuple[float, ...] | None = None,
    images: int | None = None,
    calibration_images: int | None = None,
    importance: str = "l2",
    data: str | None = None,
    data_dir: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Sensitivity scan of a checkpoint on held-out training images; writes ``out`` (JSON) and a PNG beside it.
    ``images`` and ``calibration_images`` default to ``SCAN_IMAGES`` and ``SCAN_CALIBRATION_IMAGES``, both
    shrunk to finish in about ``SCAN_SECONDS``; counts given are used as they are."""
    from .files import write_json
    from .sensitivity import RATIOS, SCAN_CALIBRATION_IMAGES, SCAN_IMAGES, SCAN_SECONDS, plot, scan

    seconds = SCAN_SECONDS if images is None and calibration_images is None else None
    ratios = tuple(ratios or RATIOS)
    images = SCAN_IMAGES if images is None else images
    calibration_images = SCAN_CALIBRATION_IMAGES if calibration_images is None else calibration_images
    for name, value in (("images", images), ("calibration_images", calibration_images)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{arg(name)} must be a positive whole number, got {value!r}")
    out = Path(out) if out else Path(path).with_name(Path(path).stem + "-sensitivity.json")
    check_outputs([path], [out, out.with_suffix(".png")], overwrite)
    ckpt = load_checkpoint(path)
    meta = ckpt.meta
    bundle = load_data_for(meta, data, data_dir)
    held_out, calibration = scan_batches(bundle, images, calibration_images, seed)
    size = meta["input_size"]
    with DirectoryLock(out.parent):
        result = scan(
            ckpt.model, torch.zeros(1, 3, size, size), held_out, calibration, ratios, importance, seconds
        )
        result["checkpoint"] = str(path)
        write_json(out, result)
        plot(result, out.with_suffix(".png"))
    return result
