"""prunekit: structured channel pruning for PyTorch CNNs."""

__version__ = "0.1.0"

from .checkpoint import load, load_checkpoint, save_checkpoint  # noqa: E402

__all__ = ["__version__", "load", "load_checkpoint", "save_checkpoint"]
