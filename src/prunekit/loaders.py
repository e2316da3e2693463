"""The loop's loaders: a data bundle's, or any re-iterable of batches behind the loop's loader protocol."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

from .data import DataBundle
from .errors import UsageError
from .runtime import Distributed
from .train_config import TrainConfig


class IterableBatches:
    """Any re-iterable of ``(images, labels)`` with a length (a DataLoader, a list) as the loop's loader.

    Resuming mid-epoch replays the iterable and skips the batches already done, which is exact when the
    iterable yields the same batches each time for the same epoch (a seeded sampler, a list).
    """

    def __init__(self, batches: Iterable):
        try:
            len(batches)  # type: ignore[arg-type]
        except TypeError:
            raise UsageError(
                "training batches need a length (a DataLoader, a list of (images, labels)); "
                f"got a {type(batches).__name__}"
            ) from None
        self.source = batches

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator:
        return iter(self.source)

    def set_epoch(self, epoch: int) -> None:
        sampler = getattr(self.source, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler reshuffles per epoch
            sampler.set_epoch(epoch)

    def batches(self, start: int = 0) -> Iterator:
        return itertools.islice(iter(self.source), start, None)


def as_loader(batches: Any) -> Any:
    """The loop's loader protocol (``__len__``, ``set_epoch``, ``batches(start)``) over ``batches``."""
    if all(hasattr(batches, a) for a in ("__len__", "set_epoch", "batches")):
        return batches
    return IterableBatches(batches)


def loaders(
    data: DataBundle | Iterable,
    test: Iterable | None,
    classes: list[str] | None,
    cfg: TrainConfig,
    dist_info: Distributed,
) -> tuple[Any, Any, list[str] | None]:
    """The training loader, the test loader (or None) and the class names, from a bundle or from batches."""
    if isinstance(data, DataBundle):
        place = {"rank": dist_info.rank, "world_size": dist_info.world_size}
        loader = data.loader(
            "train", cfg.batch_size, train=True, seed=cfg.seed, channels_last=cfg.channels_last, **place
        )
        return loader, data.loader("test", channels_last=cfg.channels_last, **place), data.classes
    return as_loader(data), as_loader(test) if test is not None else None, classes
