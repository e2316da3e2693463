"""The Python API behind the commands, on paths and names: a compatibility module.

Each command lives in its own module of ``prunekit.commands`` (``train``, ``evaluate``, ``prune``,
``finetune``, ``quantize``, ``sensitivity``, ``export``), the helpers they share in
``prunekit.commands.rundir``; this module re-exports their public names, as ``prunekit.api`` always had them.
"""

from __future__ import annotations

from .checkpoint import description, load_checkpoint
from .commands.evaluate import evaluate_checkpoint, onnxruntime_latency
from .commands.export import export_checkpoint
from .commands.finetune import finetune_checkpoint
from .commands.prune import prune_checkpoint, report_path
from .commands.quantize import quantize_checkpoint
from .commands.rundir import (
    RUN_FILES,
    calibration_batches,
    claim_run_dir,
    clear_run_dir,
    load_data_for,
    model_meta,
    run_outputs,
    scan_batches,
)
from .commands.sensitivity import sensitivity_checkpoint
from .commands.train import resume_training, train
from .data import DataBundle, describe, load_data
from .errors import UsageError, arg
from .measure import REPEATS, count_macs, count_params, evaluate, latency, summary
from .train import FitResult, fit
from .train_config import TrainConfig
from .training_state import MODEL_FILE, STATE_FILE, check_finite

__all__ = [
    "MODEL_FILE",
    "REPEATS",
    "RUN_FILES",
    "STATE_FILE",
    "DataBundle",
    "FitResult",
    "TrainConfig",
    "UsageError",
    "arg",
    "calibration_batches",
    "check_finite",
    "claim_run_dir",
    "clear_run_dir",
    "count_macs",
    "count_params",
    "describe",
    "description",  # derived checkpoints in benchmarks inherit through it
    "evaluate",
    "evaluate_checkpoint",
    "export_checkpoint",
    "finetune_checkpoint",
    "fit",
    "latency",
    "load_checkpoint",
    "load_data",
    "load_data_for",
    "model_meta",
    "onnxruntime_latency",
    "prune_checkpoint",
    "quantize_checkpoint",
    "report_path",
    "resume_training",
    "run_outputs",
    "scan_batches",
    "sensitivity_checkpoint",
    "summary",
    "train",
]
