"""The data types: ``DataBundle`` (train and test splits, held in memory or streamed), the ``Batches``
protocol of loaders, and ``Split``; a leaf below ``sources.py`` and ``data.py``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .memory import BatchLoader, Split
from .stream import ImageFiles, StreamLoader


class Batches(Protocol):
    """Re-iterable ``(images, labels)`` batches with a length: a ``BatchLoader``, a ``StreamLoader``, a list."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...


def eval_batch_size(image_size: int) -> int:
    """Evaluation batch size for an input size: a pixel budget of 64 images at 224 px, at most 500."""
    return max(1, min(500, (64 * 224 * 224) // (image_size * image_size)))


@dataclass
class DataBundle:
    """Train and test splits with class names and the per-channel normalization of the train split.

    ``mode`` is "memory" (``Split``: uint8 tensors) or "stream" (``ImageFiles``: decoded per batch).
    """

    train: Split | ImageFiles
    test: Split | ImageFiles
    classes: list[str]
    source: str
    skipped_files: int = 0
    mean: tuple[float, float, float] = field(default=(0.5, 0.5, 0.5))
    std: tuple[float, float, float] = field(default=(0.25, 0.25, 0.25))
    mode: str = "memory"
    resize_size: int | None = None  # evaluation resize before the centre crop; None: no resize
    interpolation: str = "bilinear"
    split_info: dict[str, Any] = field(default_factory=dict)
    num_workers: int | None = None  # decoding processes of streamed loaders; None: from the CPU count

    @property
    def image_size(self) -> int:
        return self.train.image_size

    @property
    def preprocess(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild this input pipeline (pass it back as ``preprocess``)."""
        return {
            "crop_size": self.image_size,
            "resize_size": self.resize_size or self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "mode": self.mode,
        }

    def loader(
        self,
        split: str,
        batch_size: int | None = None,
        train: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = True,
    ) -> BatchLoader | StreamLoader:
        """Normalized batches of ``split`` ('train' or 'test'); augmented and shuffled when ``train``.

        ``batch_size`` None: :func:`eval_batch_size` of the input size.
        """
        source = self.train if split == "train" else self.test
        batch_size = batch_size or eval_batch_size(self.image_size)
        args = (batch_size, self.mean, self.std, train, seed, rank, world_size, channels_last)
        if isinstance(source, ImageFiles):
            return StreamLoader(source, *args, num_workers=self.num_workers)
        return BatchLoader(source, *args)

    def sample_batches(
        self, n_images: int, batch_size: int, seed: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``n_images`` seeded training images, unaugmented and normalized, as (x, y) batches (NCHW)."""
        pick = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed))[:n_images]
        args = (batch_size, self.mean, self.std, False, 0, 0, 1, False)
        if isinstance(self.train, ImageFiles):
            return list(StreamLoader(self.train.subset(pick), *args, num_workers=self.num_workers))
        return list(BatchLoader(self.train.subset(pick), *args))
