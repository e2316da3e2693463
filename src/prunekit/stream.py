"""Image folders streamed from disk: a compact file index, seeded per-sample transforms, worker decoding."""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import pil_modes_mapping

from .memory import BatchLoader
from .memory import channel_stats as tensor_stats

MAX_PIXELS = 100_000_000  # a larger image is a decompression bomb or not a training photo
MAX_SIDE = 30_000
SCALE = (0.08, 1.0)  # torchvision's reference random-resized-crop
RATIO = (3 / 4, 4 / 3)


def default_resize(crop_size: int) -> int:
    """The evaluation resize for a crop (the 0.875 crop ratio of the ImageNet reference: 256 for 224)."""
    return round(crop_size / 0.875)


def default_num_workers() -> int:
    """Decoding processes: leave one core to training (1 on a 2-core machine), at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores - 1))


def header_size(open_file) -> tuple[int, int] | None:
    """(width, height) from an image's header only, or None when it is unreadable or absurdly large."""
    try:
        with Image.open(open_file) as img:  # lazy: reads the header, decodes nothing
            w, h = img.size
    except Exception:  # Pillow raises many types here, DecompressionBombError included
        return None
    if w < 1 or h < 1 or w * h > MAX_PIXELS or max(w, h) > MAX_SIDE:
        return None
    return w, h


@dataclass(eq=False)
class ImageFiles(Dataset):
    """Labelled image files under a folder or in a .zip, decoded and transformed one at a time.

    The paths are one numpy bytes array and the labels one int64 array, so the object is a few buffers
    however many files it lists: workers receive it cheaply and reading it never copies pages.
    """

    root: str
    kind: str  # "dir" or "zip"
    paths: np.ndarray  # dtype S<n>: paths relative to root (or zip member names), UTF-8
    label_array: np.ndarray  # int64
    image_size: int
    resize_size: int
    interpolation: str = "bilinear"
    train: bool = False

    def __post_init__(self) -> None:
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid = -1

    def __len__(self) -> int:
        return len(self.label_array)

    @property
    def labels(self) -> torch.Tensor:
        return torch.from_numpy(self.label_array)

    def subset(self, indices: np.ndarray | torch.Tensor) -> ImageFiles:
        """The files at ``indices``, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        return replace(self, paths=self.paths[idx], label_array=self.label_array[idx])

    def as_train(self, train: bool) -> ImageFiles:
        return replace(self, train=train)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_zip"], state["_zip_pid"] = None, -1  # an open ZipFile must not cross processes
        return state

    def __getitem__(self, item: int | tuple[int, int | None]) -> tuple[torch.Tensor, int]:
        """``item`` is an index, or (index, augmentation seed) as the loader passes it; uint8 [3, S, S].

        A file whose header was fine at indexing but whose body does not decode (a truncated JPEG) is
        replaced by the next readable one, with a warning, instead of ending a long run mid-epoch.
        """
        index, aug_seed = item if isinstance(item, tuple) else (item, None)
        for step in range(len(self)):
            i = (index + step) % len(self)
            try:
                return self._decode(i, aug_seed), int(self.label_array[i])
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                name = self.paths[i].decode()
                print(
                    f"warning: skipped unreadable image {name} ({exc}); using the next one", file=sys.stderr
                )
        raise RuntimeError(f"no image in {self.root} could be decoded")

    def _decode(self, index: int, aug_seed: int | None) -> torch.Tensor:
        with self._open(index) as f, Image.open(f) as img:
            if self.train:
                gen = torch.Generator().manual_seed(aug_seed if aug_seed is not None else index)
                x = self._train_transform(img, gen)
            else:
                x = self._eval_transform(img)
        return TF.pil_to_tensor(x)

    def _open(self, index: int):
        name = self.paths[index].decode()
        if self.kind == "dir":
            return open(os.path.join(self.root, name), "rb")
        if self._zip is None or self._zip_pid != os.getpid():  # one ZipFile per worker process
            self._zip, self._zip_pid = zipfile.ZipFile(self.root), os.getpid()
        return io.BytesIO(self._zip.read(name))  # Pillow seeks; seeking a compressed member re-inflates it

    @property
    def _interp(self) -> InterpolationMode:
        return InterpolationMode(self.interpolation)

    def _eval_transform(self, img: Image.Image) -> Image.Image:
        """Shorter side to ``resize_size``, then the centre ``image_size`` square: the aspect is kept."""
        w, h = img.size
        r = self.resize_size / min(w, h)
        # A JPEG decoded at 1/2, 1/4 or 1/8 scale is several times faster; draft never goes below the
        # requested size, and the request keeps the shorter side >= resize_size, so nothing is lost.
        _draft(img, math.ceil(w * r), math.ceil(h * r))
        img = _rgb(img)
        img = TF.resize(img, [self.resize_size], interpolation=self._interp, antialias=True)
        return TF.center_crop(img, [self.image_size, self.image_size])

    def _train_transform(self, img: Image.Image, gen: torch.Generator) -> Image.Image:
        """Random-resized-crop to ``image_size`` (scale 0.08-1, ratio 3/4-4/3) and a random horizontal flip."""
        w0, h0 = img.size
        top, left, ch, cw = crop_params(w0, h0, gen)
        flip = bool(torch.rand(1, generator=gen) < 0.5)
        # The crop is chosen from the header size first, so the draft can be as coarse as keeps the crop
        # at >= image_size pixels on both sides: the output is as sharp as from a full decode.
        r = min(1.0, max(self.image_size / cw, self.image_size / ch))
        _draft(img, math.ceil(w0 * r), math.ceil(h0 * r))
        img = _rgb(img)
        sx, sy = img.size[0] / w0, img.size[1] / h0
        # Pillow's resize takes a float box: the crop maps exactly onto the drafted pixels, where an
        # integer crop (TF.resized_crop) would shift it by up to half a drafted pixel (4 full-size ones).
        box = (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
        img = img.resize((self.image_size, self.image_size), pil_modes_mapping[self._interp], box=box)
        return TF.horizontal_flip(img) if flip else img

    @staticmethod
    def worker_state() -> dict:
        """What a decoding process runs with (for tests and debugging): threads and niceness."""
        return {"threads": torch.get_num_threads(), "nice": os.nice(0), "pid": os.getpid()}


def crop_params(width: int, height: int, gen: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` (top, left, h, w), drawn from ``gen``."""
    area = width * height
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(SCALE[0], SCALE[1], generator=gen).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=gen).item())
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return top, left, h, w
    # fallback to a central crop, as torchvision does
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif in_ratio > RATIO[1]:
        h, w = height, round(height * RATIO[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _draft(img: Image.Image, width: int, height: int) -> None:
    if img.format == "JPEG":
        img.draft("RGB", (width, height))


def _rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of file ``index`` in ``epoch``: independent of batch, rank and worker."""
    return hash((seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF  # int tuples hash the same in every process


def _init_worker(_worker_id: int) -> None:
    """Decoders yield to training: one intra-op thread each, and a lower scheduling priority."""
    torch.set_num_threads(1)
    with contextlib.suppress(OSError):  # not permitted here; decoding still works
        os.nice(10)


class _Plan:
    """The batch sampler: yields the (index, seed) list of each batch to load, made on the fly from one int64
    array of the pass's order, so the plan of an ImageNet epoch holds no per-image Python objects."""

    def __init__(self) -> None:
        self.order = np.empty(0, dtype=np.int64)
        self.batch_size, self.start, self.count = 1, 0, 0
        self.seed, self.epoch, self.train = 0, 0, False

    def __iter__(self):
        bs = self.batch_size
        for b in range(self.start, self.count):
            yield [
                (i, sample_seed(self.seed, self.epoch, i) if self.train else None)
                for i in self.order[b * bs : (b + 1) * bs].tolist()
            ]

    def __len__(self) -> int:
        return max(0, self.count - self.start)


def make_dataloader(dataset: Dataset, plan: _Plan, num_workers: int) -> DataLoader:
    """A DataLoader that decodes ``plan``'s batches in ``num_workers`` low-priority one-thread processes."""
    return DataLoader(
        dataset,
        batch_sampler=plan,
        num_workers=num_workers,
        worker_init_fn=_init_worker if num_workers else None,
        pin_memory=torch.cuda.is_available(),  # page-locked copies only pay off for a GPU
        persistent_workers=num_workers > 0,  # the next epoch reuses the processes instead of forking anew
        prefetch_factor=2 if num_workers else None,
    )


class StreamLoader:
    """Batches of normalized images decoded from files; the interface and index order of ``BatchLoader``.

    Epoch ``e`` visits a permutation seeded by (seed, e); file ``i`` is augmented with a generator seeded
    by (seed, e, i), so ``batches(start)`` resumes exactly, whichever worker decodes which file.
    """

    def __init__(
        self,
        files: ImageFiles,
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        train: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = True,
        num_workers: int | None = None,
    ):
        # The order (seeded permutation, rank slices, dropped tail) and normalization are BatchLoader's.
        self._order = BatchLoader(files, batch_size, mean, std, train, seed, rank, world_size, channels_last)
        self.files = files.as_train(train)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self._plan = _Plan()
        self._loader: DataLoader | None = None

    @property
    def epoch(self) -> int:
        return self._order.epoch

    def set_epoch(self, epoch: int) -> None:
        self._order.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches()

    def batches(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield batches from batch index ``start`` on; training drops the last partial batch."""
        plan = self._plan
        plan.order = self._order._indices().numpy()
        plan.batch_size, plan.start, plan.count = self.batch_size, start, len(self)
        plan.seed, plan.epoch, plan.train = self.seed, self.epoch, self.train
        if self._loader is None:
            self._loader = make_dataloader(self.files, self._plan, self.num_workers)
        for images, labels in self._loader:
            yield self._order.normalize(images), labels


def channel_stats(
    files: ImageFiles, n: int = 256, seed: int = 0
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std estimated from ``n`` seeded, evaluation-transformed images (not all of them)."""
    pick = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:n]
    images = torch.stack([files.as_train(False)[int(i)][0] for i in pick])
    return tensor_stats(images)


def index_files(
    root: str | Path, kind: str, names: list[str], labels: list[int], progress=None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Check each file's header; returns (paths, labels) of the readable ones and the skipped names."""
    keep, kept_labels, skipped = [], [], []
    with contextlib.ExitStack() as stack:
        zf = stack.enter_context(zipfile.ZipFile(root)) if kind == "zip" else None
        for name, label in zip(names, labels, strict=True):
            if progress is not None:
                progress()
            if _readable(root, zf, name):
                keep.append(name.encode())
                kept_labels.append(label)
            else:
                skipped.append(name)
    paths = np.array(keep, dtype=bytes) if keep else np.array([], dtype="S1")
    return paths, np.array(kept_labels, dtype=np.int64), skipped


def _readable(root: str | Path, zf: zipfile.ZipFile | None, name: str) -> bool:
    try:
        with zf.open(name) if zf else open(os.path.join(root, name), "rb") as f:
            return header_size(f) is not None
    except (OSError, KeyError):
        return False
