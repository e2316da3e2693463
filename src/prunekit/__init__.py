"""prunekit: structured channel pruning for PyTorch CNNs."""

__version__ = "0.1.0"

from .checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from .core import (  # noqa: E402
    PruneReport,
    evaluate,
    finetune,
    load,
    prune,
    recalibrate_bn,
    save,
    sensitivity_scan,
)
from .deploy import quantize_model  # noqa: E402
from .export import export_model  # noqa: E402
from .train_config import TrainConfig  # noqa: E402

__all__ = [
    "PruneReport",
    "TrainConfig",
    "__version__",
    "evaluate",
    "export_model",
    "finetune",
    "load",
    "load_checkpoint",
    "prune",
    "recalibrate_bn",
    "save",
    "quantize_model",
    "save_checkpoint",
    "sensitivity_scan",
]
