"""Decoding a dataset into uint8 tensors: the images of an image-folder tree (from a folder, a .tar.gz or
a .zip), held at their most common size, or CIFAR-10's python batches."""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .console import progress_bar, warn
from .datatypes import DataBundle, Split
from .errors import UsageError, arg
from .layout import find_layout, hidden, join_path, member_name, split_of

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def decode_tar(path: Path) -> DataBundle:
    """The image-folder tree (or CIFAR-10 batches) in the .tar.gz at ``path``, decoded."""
    try:
        with tarfile.open(path) as tar:
            members = [(m, member_name(m.name)) for m in tar.getmembers()]
            members = [(m, n) for m, n in members if n and not hidden(n)]
            dirs = {n for m, n in members if m.isdir()}
            files = {n: _tar_reader(tar, m) for m, n in members if m.isfile()}
            return decode_tree(path, dirs, files)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UsageError(f"{arg('data')} {path}: the archive is damaged or truncated ({exc})") from None


def decode_zip(path: Path) -> DataBundle:
    """The image-folder tree (or CIFAR-10 batches) in the .zip at ``path``, decoded."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if not hidden(n)]
            dirs = {n.strip("/") for n in names if n.endswith("/")}
            files = {n: (lambda n=n: zf.read(n)) for n in names if not n.endswith("/")}
            return decode_tree(path, dirs, files)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UsageError(f"{arg('data')} {path}: the archive is damaged or truncated ({exc})") from None


def _tar_reader(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Callable[[], bytes]:
    """A function reading ``member``'s bytes from ``tar`` when called."""

    def read() -> bytes:
        f = tar.extractfile(member)
        return f.read() if f else b""

    return read


def decode_tree(origin: Path, dirs: set[str], files: dict[str, Callable[[], bytes]]) -> DataBundle:
    """Decode a file tree (from a folder or an archive) holding image folders or CIFAR-10 python batches."""
    for name in files:
        if name.endswith("data_batch_1"):
            return _decode_cifar_batches(origin, name.rsplit("data_batch_1", 1)[0], files)
    root, test_name, train_classes = find_layout(origin, dirs, list(files))
    skipped: list[str] = []
    decoded: dict[str, list[tuple[np.ndarray, int, str]]] = {}
    total = sum(1 for n in files if split_of(n, root) is not None)
    with progress_bar() as bar:
        task = bar.add_task(f"decoding {origin.name}", total=total, info="")
        for split_name in ("train", test_name):
            if split_name is None:  # a train-only tree: val_split holds out part of train later
                continue
            held = decoded.setdefault(split_name, [])
            for label, cls in enumerate(train_classes):
                prefix = join_path(root, split_name, cls) + "/"
                names = sorted(n for n in files if n.startswith(prefix) and "/" not in n[len(prefix) :])
                before = len(held)
                for n in names:
                    bar.advance(task)
                    shown = f"{origin}/{n}" if origin.is_dir() else f"{origin}:{n}"
                    img = _decode_image(files[n]())
                    if img is None:
                        skipped.append(shown)
                    else:
                        held.append((img, label, shown))
                if len(held) == before:
                    raise UsageError(f"{arg('data')} {origin}: class folder {prefix} has no readable images")
    if skipped:
        warn(f"skipped {len(skipped)} file(s) that are not readable images, e.g. {skipped[0]}")
    size = _held_size(origin, [item for items in decoded.values() for item in items])
    train = _stack(decoded["train"], size)
    test = (
        _stack(decoded[test_name], size) if test_name else Split(train.images[:0].clone(), train.labels[:0])
    )
    return DataBundle(train, test, list(train_classes), str(origin), skipped_files=len(skipped))


def _held_size(origin: Path, items: list[tuple[np.ndarray, int, str]]) -> tuple[int, int]:
    """The (width, height) most of the images have: the size the dataset is held at. The others are
    resized to it, and counted in one warning that names one of them."""
    size, count, distinct = most_common_size([(img.shape[1], img.shape[0]) for img, _, _ in items])
    if count < len(items):
        odd = next(name for img, _, name in items if (img.shape[1], img.shape[0]) != size)
        warn(
            f"{origin}: {count} of {len(items)} images are {size[0]}x{size[1]}, the size this dataset is held "
            f"at; the other {len(items) - count} (of {distinct - 1} other size(s), e.g. {odd}) are resized to it"
        )
    return size


def most_common_size(sizes: list) -> tuple[tuple[int, int], int, int]:
    """The most common (width, height) of a non-empty ``sizes``, how many have it, and how many sizes
    there are: what a folder is held at (decoding) and whether it counts as uniform (the probe)."""
    counts = Counter(tuple(s) for s in sizes)
    size, count = counts.most_common(1)[0]
    return size, count, len(counts)


def _stack(items: list[tuple[np.ndarray, int, str]], size: tuple[int, int]) -> Split:
    """The images resized to ``size`` where they differ, stacked with their labels."""
    images = [img if (img.shape[1], img.shape[0]) == size else _resized(img, size) for img, _, _ in items]
    return Split(
        torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
        torch.tensor([label for _, label, _ in items], dtype=torch.int64),
    )


def _resized(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR), dtype=np.uint8)


def _decode_image(data: bytes) -> np.ndarray | None:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def _decode_cifar_batches(origin: Path, prefix: str, files: dict[str, Callable[[], bytes]]) -> DataBundle:
    """CIFAR-10's own python format (the dataset is distributed as pickled numpy batches)."""

    def read(name: str) -> dict:
        key = prefix + name
        if key not in files:
            raise UsageError(f"{arg('data')} {origin}: CIFAR-10 batch {key} is missing")
        try:
            return pickle.loads(files[key](), encoding="latin1")
        except Exception as exc:
            raise UsageError(f"{arg('data')} {origin}: CIFAR-10 batch {key} is unreadable ({exc})") from None

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


def hwc_to_chw(array: np.ndarray) -> torch.Tensor:
    """``[N, H, W, C]`` uint8 images as a contiguous ``[N, C, H, W]`` tensor."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()
