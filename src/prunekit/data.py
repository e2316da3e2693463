"""Datasets as in-memory uint8 tensors: sources, decode-once cache, batched augmentation."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file, save_file

from .console import progress_bar, warn
from .errors import UsageError
from .files import atomic_write, cache_dir

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TEST_SPLIT_NAMES = ("test", "val")
CACHE_VERSION = "1"


@dataclass
class Split:
    """One split of a dataset: ``images`` uint8 [N, 3, H, W], ``labels`` int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class DataBundle:
    """Train and test splits with class names and the per-channel normalization of the train split."""

    train: Split
    test: Split
    classes: list[str]
    source: str
    skipped_files: int = 0
    mean: tuple[float, float, float] = field(default=(0.5, 0.5, 0.5))
    std: tuple[float, float, float] = field(default=(0.25, 0.25, 0.25))

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])

    def loader(
        self,
        split: str,
        batch_size: int,
        train: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = True,
    ) -> BatchLoader:
        """Normalized batches of ``split`` ('train' or 'test'); augmented and shuffled when ``train``."""
        source = self.train if split == "train" else self.test
        return BatchLoader(
            source,
            batch_size,
            self.mean,
            self.std,
            train=train,
            seed=seed,
            rank=rank,
            world_size=world_size,
            channels_last=channels_last,
        )


def load_data(
    spec: str,
    data_dir: str | Path | None = None,
    subset: int | None = None,
    image_size: int | None = None,
    seed: int = 0,
) -> DataBundle:
    """Load ``cifar10``, ``synthetic`` or a path (image folder, .tar.gz/.zip of one, CIFAR-10 python files)."""
    if spec == "synthetic":
        bundle = synthetic_data(seed=seed)
    elif spec == "cifar10":
        bundle = _cached(_cifar10_download(Path(data_dir) if data_dir else cache_dir() / "cifar10"))
    else:
        bundle = _cached(_local_source(Path(spec).expanduser()))
    if subset is not None:
        if subset < 1:
            raise UsageError(f"--subset must be a positive number of images per class, got {subset}")
        bundle.train = _keep_per_class(bundle.train, subset)
    if image_size is not None and image_size != bundle.image_size:
        bundle.train = Split(resize_images(bundle.train.images, image_size), bundle.train.labels)
        bundle.test = Split(resize_images(bundle.test.images, image_size), bundle.test.labels)
    bundle.mean, bundle.std = channel_stats(bundle.train.images)
    return bundle


# ---------------------------------------------------------------- sources


@dataclass
class _Source:
    """A dataset not yet decoded: a content key for the cache and a function that decodes it."""

    key: str
    name: str
    decode: Callable[[], DataBundle]


def _cached(source: _Source) -> DataBundle:
    """Decode once; later runs load the uint8 tensors from the cache keyed by the source's content."""
    path = cache_dir() / "decoded" / f"{source.key}.safetensors"
    if path.exists():
        try:
            tensors = load_file(path)
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                meta = json.loads(f.read(header_len))["__metadata__"]
            return DataBundle(
                train=Split(tensors["train_images"], tensors["train_labels"]),
                test=Split(tensors["test_images"], tensors["test_labels"]),
                classes=json.loads(meta["classes"]),
                source=source.name,
                skipped_files=int(meta["skipped_files"]),
            )
        except Exception as exc:  # a damaged cache is rebuilt, not fatal
            warn(f"ignoring unreadable data cache {path} ({exc}); decoding again")
    bundle = source.decode()
    tensors = {
        "train_images": bundle.train.images.contiguous(),
        "train_labels": bundle.train.labels.contiguous(),
        "test_images": bundle.test.images.contiguous(),
        "test_labels": bundle.test.labels.contiguous(),
    }
    meta = {"classes": json.dumps(bundle.classes), "skipped_files": str(bundle.skipped_files)}
    try:
        atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))
    except OSError as exc:
        warn(f"could not write the data cache {path} ({exc}); the next run decodes again")
    return bundle


def _cifar10_download(root: Path) -> _Source:
    from torchvision.datasets import CIFAR10

    def decode() -> DataBundle:
        try:
            train = CIFAR10(str(root), train=True, download=True)
            test = CIFAR10(str(root), train=False, download=True)
        except Exception as exc:
            raise UsageError(
                f"CIFAR-10 is not in {root} and could not be downloaded ({exc}).\n"
                "Offline? Pass --data PATH to a local copy: an image-folder tree (train/<class>/, test/<class>/),"
                " a .tar.gz or .zip of one, or cifar-10-python.tar.gz; or --data-dir to a folder that has it."
            ) from None
        return DataBundle(
            train=Split(_hwc_to_chw(train.data), torch.tensor(train.targets)),
            test=Split(_hwc_to_chw(test.data), torch.tensor(test.targets)),
            classes=list(train.classes),
            source="cifar10",
        )

    return _Source(
        key=_digest(["cifar10-torchvision", str(root.resolve()), CACHE_VERSION]),
        name="cifar10",
        decode=decode,
    )


def _local_source(path: Path) -> _Source:
    if not path.exists():
        raise UsageError(
            f"--data {path}: no such file or directory. Expected 'cifar10', 'synthetic', an image-folder tree, "
            "a .tar.gz/.zip of one, or CIFAR-10's cifar-10-python.tar.gz / cifar-10-batches-py."
        )
    if path.is_dir():
        files = {
            p.relative_to(path).as_posix(): p
            for p in sorted(path.rglob("*"))
            if p.is_file() and not _hidden(p.relative_to(path).as_posix())
        }
        dirs = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_dir()}
        stamp = [f"{k}:{v.stat().st_size}:{v.stat().st_mtime_ns}" for k, v in files.items()]
        key = _digest(["dir", str(path.resolve()), *stamp, CACHE_VERSION])
        return _Source(
            key, str(path), lambda: _decode_tree(path, dirs, {k: v.read_bytes for k, v in files.items()})
        )
    key = _digest(["file", _file_sha256(path), CACHE_VERSION])
    try:
        is_tar = tarfile.is_tarfile(path)
    except (EOFError, OSError) as exc:  # a truncated .tar.gz fails inside is_tarfile
        raise UsageError(f"--data {path}: the archive is damaged or truncated ({exc})") from None
    if is_tar:
        return _Source(key, str(path), lambda: _decode_tar(path))
    if zipfile.is_zipfile(path):
        return _Source(key, str(path), lambda: _decode_zip(path))
    raise UsageError(
        f"--data {path}: not a directory, .tar.gz or .zip archive (could not open it as an archive)"
    )


def _decode_tar(path: Path) -> DataBundle:
    try:
        with tarfile.open(path) as tar:
            members = [(m, _member_name(m.name)) for m in tar.getmembers()]
            members = [(m, n) for m, n in members if n and not _hidden(n)]
            dirs = {n for m, n in members if m.isdir()}
            files = {n: _tar_reader(tar, m) for m, n in members if m.isfile()}
            return _decode_tree(path, dirs, files)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UsageError(f"--data {path}: the archive is damaged or truncated ({exc})") from None


def _decode_zip(path: Path) -> DataBundle:
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if not _hidden(n)]
            dirs = {n.strip("/") for n in names if n.endswith("/")}
            files = {n: (lambda n=n: zf.read(n)) for n in names if not n.endswith("/")}
            return _decode_tree(path, dirs, files)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UsageError(f"--data {path}: the archive is damaged or truncated ({exc})") from None


def _member_name(name: str) -> str:
    """An archive member's path without a leading './' (as written by ``tar -czf x.tar.gz -C dir .``)."""
    name = name.strip("/")
    while name == "." or name.startswith("./"):
        name = name[2:].lstrip("/")
    return name


def _tar_reader(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Callable[[], bytes]:
    def read() -> bytes:
        f = tar.extractfile(member)
        return f.read() if f else b""

    return read


def _decode_tree(origin: Path, dirs: set[str], files: dict[str, Callable[[], bytes]]) -> DataBundle:
    """Decode a file tree (from a folder or an archive) holding image folders or CIFAR-10 python batches."""
    for name in files:
        if name.endswith("data_batch_1"):
            return _decode_cifar_batches(origin, name.rsplit("data_batch_1", 1)[0], files)
    all_dirs = set(dirs) | {p for name in files for p in _parents(name)}
    root = _find_root(origin, all_dirs)
    test_name = next((s for s in TEST_SPLIT_NAMES if _join(root, s) in all_dirs), None)
    if test_name is None:
        raise UsageError(
            f"--data {origin}: found {_join(root, 'train')}/ but no test/ or val/ split beside it; "
            "expected train/<class>/* and test/<class>/* (or val/<class>/*)"
        )
    train_classes = _class_dirs(all_dirs, _join(root, "train"))
    test_classes = _class_dirs(all_dirs, _join(root, test_name))
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise UsageError(
            f"--data {origin}: the classes of train/ and {test_name}/ differ "
            f"(only in train: {only_train or 'none'}; only in {test_name}: {only_test or 'none'})"
        )
    if not train_classes:
        raise UsageError(f"--data {origin}: {_join(root, 'train')}/ has no class folders")
    skipped: list[str] = []
    size: list[int] = []  # the first decoded image's size becomes the dataset's size
    total = sum(1 for n in files if _split_of(n, root) is not None)
    with progress_bar() as bar:
        task = bar.add_task(f"decoding {origin.name}", total=total, info="")
        splits = []
        for split_name in ("train", test_name):
            images, labels = [], []
            for label, cls in enumerate(train_classes):
                prefix = _join(root, split_name, cls) + "/"
                names = sorted(n for n in files if n.startswith(prefix) and "/" not in n[len(prefix) :])
                decoded = 0
                for n in names:
                    bar.advance(task)
                    img = _decode_image(files[n](), size)
                    if img is None:
                        skipped.append(f"{origin}/{n}" if origin.is_dir() else f"{origin}:{n}")
                        continue
                    images.append(img)
                    labels.append(label)
                    decoded += 1
                if decoded == 0:
                    raise UsageError(f"--data {origin}: class folder {prefix} has no readable images")
            splits.append(
                Split(
                    torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
                    torch.tensor(labels, dtype=torch.int64),
                )
            )
    if skipped:
        warn(f"skipped {len(skipped)} file(s) that are not readable images, e.g. {skipped[0]}")
    return DataBundle(splits[0], splits[1], list(train_classes), str(origin), skipped_files=len(skipped))


def _decode_image(data: bytes, size: list[int]) -> np.ndarray | None:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
            if not size:
                size.extend(img.size)
            elif list(img.size) != size:
                img = img.resize(tuple(size), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def _decode_cifar_batches(origin: Path, prefix: str, files: dict[str, Callable[[], bytes]]) -> DataBundle:
    """CIFAR-10's own python format (the dataset is distributed as pickled numpy batches)."""

    def read(name: str) -> dict:
        key = prefix + name
        if key not in files:
            raise UsageError(f"--data {origin}: CIFAR-10 batch {key} is missing")
        try:
            return pickle.loads(files[key](), encoding="latin1")
        except Exception as exc:
            raise UsageError(f"--data {origin}: CIFAR-10 batch {key} is unreadable ({exc})") from None

    train = [read(f"data_batch_{i}") for i in range(1, 6)]
    test = read("test_batch")
    classes = CIFAR10_CLASSES
    if prefix + "batches.meta" in files:
        classes = list(read("batches.meta")["label_names"])

    def split(batches: list[dict]) -> Split:
        data = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([np.asarray(b["labels"]) for b in batches])
        return Split(torch.from_numpy(data).contiguous(), torch.from_numpy(labels).long())

    return DataBundle(split(train), split([test]), classes, str(origin))


def _find_root(origin: Path, dirs: set[str]) -> str:
    """The folder holding train/: the top of the tree, or one level down (archives often add one)."""
    candidates = sorted(
        d[: -len("train")].rstrip("/")
        for d in dirs
        if d == "train" or (d.endswith("/train") and d.count("/") == 1)
    )
    if not candidates:
        raise UsageError(
            f"--data {origin}: no train/ folder found; expected train/<class>/* and test/<class>/* "
            "(or val/<class>/*)"
        )
    return candidates[0]


def _class_dirs(dirs: set[str], split_dir: str) -> list[str]:
    prefix = split_dir + "/"
    return sorted(d[len(prefix) :] for d in dirs if d.startswith(prefix) and "/" not in d[len(prefix) :])


def _split_of(name: str, root: str) -> str | None:
    rel = name[len(root) + 1 :] if root else name
    parts = rel.split("/")
    return parts[0] if len(parts) == 3 and parts[0] in ("train", *TEST_SPLIT_NAMES) else None


def _parents(name: str) -> list[str]:
    parts = name.strip("/").split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def _hidden(name: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in name.strip("/").split("/"))


def _digest(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _hwc_to_chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------- synthetic data and transforms


def synthetic_data(
    num_classes: int = 10, train_per_class: int = 64, test_per_class: int = 16, size: int = 32, seed: int = 0
) -> DataBundle:
    """Small learnable data: each class is a fixed smooth colour pattern plus per-image noise."""
    gen = torch.Generator().manual_seed(seed)
    patterns = F.interpolate(torch.rand(num_classes, 3, 4, 4, generator=gen), size=size, mode="bilinear")

    def make(per_class: int) -> Split:
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        noise = torch.randn(len(labels), 3, size, size, generator=gen) * 0.15
        images = ((patterns[labels] + noise).clamp(0, 1) * 255).round().to(torch.uint8)
        return Split(images, labels)

    return DataBundle(
        make(train_per_class), make(test_per_class), [f"class{i}" for i in range(num_classes)], "synthetic"
    )


def _keep_per_class(split: Split, per_class: int) -> Split:
    keep = torch.cat([torch.nonzero(split.labels == c).flatten()[:per_class] for c in split.labels.unique()])
    keep = keep.sort().values
    return Split(split.images[keep], split.labels[keep])


def resize_images(images: torch.Tensor, size: int, chunk: int = 2048) -> torch.Tensor:
    """Resize uint8 images to ``size`` x ``size`` (antialiased bilinear), in chunks to bound memory."""
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


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, scaled to [0, 1]."""
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
