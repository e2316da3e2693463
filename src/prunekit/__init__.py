"""prunekit: structured channel pruning for PyTorch CNNs."""

__version__ = "0.1.0"

from .checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from .core import PruneReport, finetune, load, prune, recalibrate_bn, save  # noqa: E402
from .train import TrainConfig  # noqa: E402

__all__ = [
    "PruneReport",
    "TrainConfig",
    "__version__",
    "finetune",
    "load",
    "load_checkpoint",
    "prune",
    "recalibrate_bn",
    "save",
    "save_checkpoint",
]
