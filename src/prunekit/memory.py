"""Images held in memory: a ``Split`` of uint8 tensors, its seeded resumable ``BatchLoader`` and augmentation,
resizing and channel statistics. A leaf: ``stream.py``'s loader reuses the order and normalization here."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CHUNK_BYTES = 256 << 20  # float working memory of one chunk when resizing or measuring held images


@dataclass
class Split:
    """One split of a dataset: ``images`` uint8 [N, 3, H, W], ``labels`` int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, indices: torch.Tensor) -> Split:
        return Split(self.images[indices], self.labels[indices])


def _chunk_rows(images: torch.Tensor, pixels: int, value_bytes: int, most: int) -> int:
    """Images per chunk so one chunk's float copy stays within ``CHUNK_BYTES`` (and at most ``most``)."""
    return max(1, min(most, CHUNK_BYTES // (images.shape[1] * pixels * value_bytes)))


def resize_images(images: torch.Tensor, size: int, chunk: int | None = None) -> torch.Tensor:
    """Resize uint8 images to ``size`` x ``size`` (antialiased bilinear), in chunks to bound memory."""
    pixels = max(images.shape[-1] * images.shape[-2], size * size)
    chunk = chunk or _chunk_rows(images, pixels, 4, most=2048)
    out = [
        F.interpolate(
            images[i : i + chunk].float(),
            size=(size, size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        .round()
        .clamp(0, 255)
        .to(torch.uint8)
        for i in range(0, len(images), chunk)
    ]
    return torch.cat(out)


def channel_stats(
    images: torch.Tensor, chunk: int | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, scaled to [0, 1]."""
    chunk = chunk or _chunk_rows(images, images.shape[-1] * images.shape[-2], 8, most=4096)
    total = torch.zeros(3, dtype=torch.float64)
    sq = torch.zeros(3, dtype=torch.float64)
    for i in range(0, len(images), chunk):
        x = images[i : i + chunk].to(torch.float64) / 255
        total += x.sum(dim=(0, 2, 3))
        sq += (x * x).sum(dim=(0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / n
    std = (sq / n - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())


def random_crop_flip(images: torch.Tensor, gen: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Per-image random crop after zero padding, and random horizontal flip, on a uint8 batch."""
    b, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    rows = oy[:, None] + torch.arange(h)
    cols = ox[:, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    return padded[
        torch.arange(b)[:, None, None, None],
        torch.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


class BatchLoader:
    """Batches of normalized float images from a :class:`Split`, shuffled and augmented when training.

    The order and augmentation of batch ``i`` of epoch ``e`` depend only on (seed, e, i, rank), so an
    interrupted epoch resumes exactly by skipping the batches already done.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        train: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = True,
    ):
        self.split, self.batch_size, self.train, self.seed = split, batch_size, train, seed
        self.rank, self.world_size, self.channels_last = rank, world_size, channels_last
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = len(self.split)
        if self.train:
            order = torch.randperm(
                n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            )
        else:
            order = torch.arange(n)
        per_rank = n // self.world_size if self.train else -(-n // self.world_size)
        return order[self.rank :: self.world_size][:per_rank]

    def __len__(self) -> int:
        n = len(self._indices())
        return max(1, n // self.batch_size) if self.train else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches()

    def batches(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield batches from batch index ``start`` on; training drops the last partial batch."""
        idx = self._indices()
        for i in range(start, len(self)):
            sel = idx[i * self.batch_size : (i + 1) * self.batch_size]
            images = self.split.images[sel]
            if self.train:
                gen = torch.Generator().manual_seed(hash((self.seed, self.epoch, i, self.rank)) & 0x7FFFFFFF)
                images = random_crop_flip(images, gen)
            yield self.normalize(images), self.split.labels[sel]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float().div_(255) - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
