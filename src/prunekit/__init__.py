"""prunekit: structured channel pruning for PyTorch CNNs."""

__version__ = "0.1.0"
