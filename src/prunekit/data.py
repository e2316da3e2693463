"""Datasets: small uniform images as in-memory uint8 tensors, anything larger streamed from disk (stream.py)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file, save_file

from .console import progress_bar, warn
from .errors import UsageError, arg
from .files import atomic_write, cache_dir, write_json
from .stream import ImageFiles, StreamLoader, default_resize, header_size, index_files
from .stream import channel_stats as stream_channel_stats

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TEST_SPLIT_NAMES = ("test", "val")
CACHE_VERSION = "1"
INDEX_VERSION = "1"
SMALL_SIDE = 64  # uniform images up to this side are held in memory at their native size
STREAM_SIZE = 224  # the default input size of streamed (large or mixed-size) images
MEMORY_FRACTION = 0.25  # hold decoded data in memory only up to this share of the available RAM
CHUNK_BYTES = 256 << 20  # float working memory of one chunk when resizing or measuring held images
HEADER_SAMPLE = 32  # image headers read to decide between memory and streaming
PREPROCESS_KEYS = ("crop_size", "resize_size", "mean", "std", "interpolation")


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


def load_data(
    spec: str,
    data_dir: str | Path | None = None,
    subset: int | None = None,
    image_size: int | None = None,
    seed: int = 0,
    val_split: float | None = None,
    preprocess: dict[str, Any] | None = None,
    stream: bool | None = None,
    num_workers: int | None = None,
) -> DataBundle:
    """Load ``cifar10``, ``synthetic`` or a path (image folder, .tar.gz/.zip of one, CIFAR-10 python files).

    Small uniform images are decoded into memory; anything else streams from disk (``stream`` forces it).
    """
    pre = _check_preprocess(preprocess)
    image_size = _check_size(image_size, pre)
    if stream is None and "mode" in pre:  # a checkpoint's pipeline is rebuilt the way it was trained
        stream = pre["mode"] == "stream"
    if val_split is not None and not 0 < val_split < 1:
        raise UsageError(
            f"{arg('val_split')} must be a fraction between 0 and 1 (exclusive), got {val_split}"
        )
    if spec == "synthetic":
        bundle = synthetic_data(seed=seed)
    elif spec == "cifar10":
        bundle = _cached(_cifar10_download(Path(data_dir) if data_dir else cache_dir() / "cifar10"))
    else:
        source = _local_source(Path(spec).expanduser())
        probe = _probe(source)
        if probe["test_name"] is None and val_split is None and not probe["cifar"]:
            raise UsageError(
                f"{arg('data')} {source.name}: found {_join(probe['root'], 'train')}/ but no test/ or val/ split beside "
                f"it; pass {arg('val_split')} 0.1 to hold out 10% of train/ for evaluation, or add "
                "test/<class>/* (or val/<class>/*)"
            )
        if stream is None:
            stream = _should_stream(probe, image_size)
        if stream and not probe["cifar"]:
            bundle = _stream_bundle(source, probe, image_size or STREAM_SIZE, pre)
        else:
            bundle = _cached(source)
    bundle.num_workers = num_workers
    bundle.interpolation = pre.get("interpolation", bundle.interpolation)
    bundle.split_info = _split_validation(bundle, val_split, seed)
    if subset is not None:
        if subset < 1:
            raise UsageError(f"{arg('subset')} must be a positive number of images per class, got {subset}")
        bundle.train = bundle.train.subset(_first_per_class(bundle.train.labels, subset))
    if bundle.mode == "memory":
        _resize_in_memory(bundle, image_size, pre.get("resize_size"))
    if "mean" in pre:
        bundle.mean, bundle.std = pre["mean"], pre["std"]
    elif bundle.mode == "stream":
        bundle.mean, bundle.std = stream_channel_stats(bundle.train, seed=seed)
    else:
        bundle.mean, bundle.std = channel_stats(bundle.train.images)
    return bundle


def _check_preprocess(preprocess: dict[str, Any] | None) -> dict[str, Any]:
    pre = dict(preprocess or {})
    unknown = sorted(set(pre) - set(PREPROCESS_KEYS) - {"mode"})  # bundle.preprocess also records "mode"
    if unknown:
        raise UsageError(f"preprocess: unknown key(s) {unknown}; expected some of {list(PREPROCESS_KEYS)}")
    pre = {k: v for k, v in pre.items() if v is not None}
    if pre.get("mode", "memory") not in ("memory", "stream"):
        raise UsageError(f"preprocess: mode must be 'memory' or 'stream', got {pre['mode']!r}")
    if ("mean" in pre) != ("std" in pre):
        raise UsageError("preprocess: give both mean and std, or neither")
    for key in ("mean", "std"):
        if key in pre:
            values = tuple(float(v) for v in pre[key])
            if len(values) != 3 or (key == "std" and min(values) <= 0):
                raise UsageError(f"preprocess: {key} must be 3 numbers (std > 0), got {pre[key]}")
            pre[key] = values
    if "interpolation" in pre:
        from torchvision.transforms import InterpolationMode

        try:
            pre["interpolation"] = InterpolationMode(str(pre["interpolation"]).lower()).value
        except ValueError:
            raise UsageError(f"preprocess: unknown interpolation {pre['interpolation']!r}") from None
    for key in ("crop_size", "resize_size"):
        if key in pre and (int(pre[key]) != pre[key] or pre[key] < 1):
            raise UsageError(f"preprocess: {key} must be a positive integer, got {pre[key]}")
    return pre


def _check_size(image_size: int | None, pre: dict[str, Any]) -> int | None:
    crop = pre.get("crop_size")
    if image_size is not None and crop is not None and image_size != crop:
        raise UsageError(f"{arg('image_size')} {image_size} differs from the preprocessing crop size {crop}")
    size = image_size if image_size is not None else crop
    if size is not None and size < 1:
        raise UsageError(f"{arg('image_size')} must be a positive number of pixels, got {size}")
    return size


def _should_stream(probe: dict[str, Any], image_size: int | None) -> bool:
    """Memory for small uniform images whose decoded size fits a share of the RAM; streaming otherwise."""
    if probe["cifar"]:
        return False
    sizes = {tuple(s) for s in probe["sizes"]}
    if not sizes:  # no readable image in the sample: let the decoder report the files
        return False
    if len(sizes) > 1 or max(max(s) for s in sizes) > SMALL_SIDE:
        return True
    w, h = sizes.pop()
    pixels = image_size * image_size if image_size else w * h
    return probe["n"] * 3 * pixels > MEMORY_FRACTION * available_memory()


def available_memory() -> int:
    """Bytes of RAM available to new allocations (MemAvailable), or the free pages where that is unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train, val) indices: each class gives round(fraction * n) images, at least 1 (and keeps 1)."""
    gen = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in labels.unique(sorted=True).tolist():
        members = torch.nonzero(labels == c).flatten()
        n = len(members)
        k = min(max(round(fraction * n), 1), n - 1) if n >= 2 else 0
        perm = members[torch.randperm(n, generator=gen)]
        val.append(perm[:k])
        train.append(perm[k:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def _split_validation(bundle: DataBundle, val_split: float | None, seed: int) -> dict[str, Any]:
    """Hold out ``val_split`` of train as the test split when the source has none."""
    if val_split is None:
        return {}
    if len(bundle.test):
        warn(f"{arg('val_split')} is ignored: {bundle.source} has its own test split")
        return {}
    keep, val = stratified_split(bundle.train.labels, val_split, seed)
    bundle.train, bundle.test = bundle.train.subset(keep), bundle.train.subset(val)
    return {"val_split": val_split, "seed": seed, "val_images": len(val)}


def _first_per_class(labels: torch.Tensor, per_class: int) -> torch.Tensor:
    keep = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in labels.unique()])
    return keep.sort().values


def _resize_in_memory(bundle: DataBundle, image_size: int | None, resize_size: int | None) -> None:
    """Resize held images to ``image_size``; with a ``resize_size``, test images get resize + centre crop."""
    size = image_size or bundle.image_size
    held = (len(bundle.train) + len(bundle.test)) * 3 * max(size, resize_size or 0) ** 2
    if size != bundle.image_size and held > MEMORY_FRACTION * available_memory():
        raise UsageError(
            f"{arg('image_size')} {size}: this dataset is held in memory, and {len(bundle.train) + len(bundle.test)} "
            f"images of {size}x{size} would take {held / 1e9:.1f} GB, over a quarter of the free memory; use a "
            "smaller size, or an image folder, which streams from disk"
        )
    if size != bundle.image_size:
        bundle.train = Split(resize_images(bundle.train.images, size), bundle.train.labels)
    if resize_size and resize_size != size:
        test = resize_images(bundle.test.images, resize_size)
        off = (resize_size - size) // 2
        if off >= 0:
            bundle.test = Split(
                test[..., off : off + size, off : off + size].contiguous(), bundle.test.labels
            )
        else:
            bundle.test = Split(resize_images(bundle.test.images, size), bundle.test.labels)
        bundle.resize_size = resize_size
    elif size != bundle.test.images.shape[-1]:
        bundle.test = Split(resize_images(bundle.test.images, size), bundle.test.labels)


# ---------------------------------------------------------------- sources


@dataclass
class _Source:
    """A dataset not yet decoded: a content key for the cache and a function that decodes it."""

    key: str
    name: str
    decode: Callable[[], DataBundle]
    kind: str = ""  # "dir", "tar" or "zip"
    path: Path | None = None
    dirs: set[str] = field(default_factory=set)  # a directory's listing, made for its stamp anyway
    names: list[str] = field(default_factory=list)


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
            f"{arg('data')} {path}: no such file or directory. Expected 'cifar10', 'synthetic', an image-folder tree, "
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
            key,
            str(path),
            lambda: _decode_tree(path, dirs, {k: v.read_bytes for k, v in files.items()}),
            "dir",
            path,
            dirs,
            list(files),
        )
    key = _digest(["file", _file_sha256(path), CACHE_VERSION])
    try:
        is_tar = tarfile.is_tarfile(path)
    except (EOFError, OSError) as exc:  # a truncated .tar.gz fails inside is_tarfile
        raise UsageError(f"{arg('data')} {path}: the archive is damaged or truncated ({exc})") from None
    if is_tar:
        return _Source(key, str(path), lambda: _decode_tar(path), "tar", path)
    if zipfile.is_zipfile(path):
        return _Source(key, str(path), lambda: _decode_zip(path), "zip", path)
    raise UsageError(
        f"{arg('data')} {path}: not a directory, .tar.gz or .zip archive (could not open it as an archive)"
    )


def _probe(source: _Source) -> dict[str, Any]:
    """Layout, image count and a seeded sample of header sizes (no decoding); cached by the source's key."""
    path = cache_dir() / "probe" / f"{source.key}-{INDEX_VERSION}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    dirs, names, sizes = _listing(source)
    if any(n.endswith("data_batch_1") for n in names):
        probe = {"cifar": True, "n": 0, "sizes": [], "test_name": "test_batch", "root": ""}
    else:
        root, test_name, classes = _layout(Path(source.name), dirs, names)
        images = [n for n in names if _split_of(n, root) is not None]
        if sizes is None:  # random access: read the headers of a seeded sample
            rng = np.random.default_rng(0)
            pick = rng.choice(len(images), min(HEADER_SAMPLE, len(images)), replace=False) if images else []
            sizes = [_read_header(source, images[i]) for i in sorted(pick)]
        probe = {
            "cifar": False,
            "n": len(images),
            "sizes": [list(s) for s in sizes if s is not None],
            "test_name": test_name,
            "root": root,
        }
    with contextlib.suppress(OSError):  # an unwritable cache only costs the next run a probe
        write_json(path, probe)
    return probe


def _listing(source: _Source) -> tuple[set[str], list[str], list | None]:
    """(dirs, file names, header sizes or None); a tar is read once, sampling headers on the way."""
    if source.kind == "dir":
        return source.dirs, source.names, None
    if source.kind == "zip":
        with zipfile.ZipFile(source.path) as zf:
            names = [n for n in zf.namelist() if not _hidden(n)]
        return (
            {n.strip("/") for n in names if n.endswith("/")},
            [n for n in names if not n.endswith("/")],
            None,
        )
    dirs, names, sample = set(), [], []
    rng = np.random.default_rng(0)
    seen = 0
    try:
        with tarfile.open(source.path) as tar:
            for m in tar:
                name = _member_name(m.name)
                if not name or _hidden(name):
                    continue
                if m.isdir():
                    dirs.add(name)
                elif m.isfile():
                    names.append(name)
                    if name.count("/") < 2:
                        continue
                    # reservoir sampling: a uniform seeded sample of headers in one sequential pass
                    seen += 1
                    slot = seen - 1 if seen <= HEADER_SAMPLE else int(rng.integers(0, seen))
                    if slot < HEADER_SAMPLE:
                        size = header_size(tar.extractfile(m))
                        if slot == len(sample):
                            sample.append(size)
                        else:
                            sample[slot] = size
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UsageError(
            f"{arg('data')} {source.path}: the archive is damaged or truncated ({exc})"
        ) from None
    return dirs, names, sample


def _read_header(source: _Source, name: str) -> tuple[int, int] | None:
    if source.kind == "zip":
        with zipfile.ZipFile(source.path) as zf, zf.open(name) as f:
            return header_size(f)
    try:
        with open(source.path / name, "rb") as f:
            return header_size(f)
    except OSError:
        return None


def _stream_bundle(
    source: _Source, probe: dict[str, Any], image_size: int, pre: dict[str, Any]
) -> DataBundle:
    """Index the files (headers checked, cached) and wrap each split as :class:`ImageFiles`."""
    if source.kind == "tar":
        root, kind = _extract(source), "dir"
        dirs = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir()}
        names = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file()]
        names = [n for n in names if not _hidden(n)]
    else:
        root, kind = source.path, source.kind
        dirs, names, _ = _listing(source)
    index = _stream_index(source, root, kind, dirs, names)
    classes = [str(c) for c in index["classes"]]
    skipped = int(index["skipped"])
    if skipped:
        warn(
            f"skipped {skipped} file(s) that are not readable images or are too large, e.g. {index['example']}"
        )
    resize = pre.get("resize_size") or default_resize(image_size)
    interp = pre.get("interpolation", "bilinear")

    def files(split: int) -> ImageFiles:
        sel = index["split"] == split
        paths, labels = index["paths"][sel], index["labels"][sel]
        return ImageFiles(str(root), kind, paths, labels, image_size, resize, interp)

    return DataBundle(
        files(0),
        files(1),
        classes,
        source.name,
        skipped,
        mode="stream",
        resize_size=resize,
        interpolation=interp,
    )


def _stream_index(source: _Source, root: Path, kind: str, dirs: set[str], names: list[str]) -> dict[str, Any]:
    """Readable files with labels and split (0 train, 1 test), classes and the skipped count; cached."""
    path = cache_dir() / "index" / f"{source.key}-{INDEX_VERSION}.npz"
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError):
        pass
    origin = Path(source.name)
    tree_root, test_name, classes = _layout(origin, dirs, names)
    items = [(n, lab, 0) for n, lab in _class_files(names, tree_root, "train", classes)]
    if test_name is not None:
        items += [(n, lab, 1) for n, lab in _class_files(names, tree_root, test_name, classes)]
    with progress_bar() as bar:
        task = bar.add_task(f"indexing {origin.name}", total=len(items), info="")
        paths, labels, skipped = index_files(
            str(root), kind, [n for n, _, _ in items], [lab for _, lab, _ in items], lambda: bar.advance(task)
        )
    kept = {p.decode() for p in paths.tolist()}
    split = np.array([sp for n, _, sp in items if n in kept], dtype=np.uint8)
    for sp, name in ((0, "train"), (1, test_name)):
        if name is None:
            continue
        for label, cls in enumerate(classes):
            if not np.any((split == sp) & (labels == label)):
                prefix = _join(tree_root, name, cls) + "/"
                raise UsageError(f"{arg('data')} {origin}: class folder {prefix} has no readable images")
    index = {
        "paths": paths,
        "labels": labels,
        "split": split,
        "classes": np.array(classes, dtype=str),
        "skipped": np.array(len(skipped)),
        "example": np.array(f"{origin}/{skipped[0]}" if skipped else ""),
    }

    def save(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez(f, **index)

    try:
        atomic_write(path, save)
    except OSError as exc:
        warn(f"could not write the file index {path} ({exc}); the next run indexes again")
    return index


def _extract(source: _Source) -> Path:
    """A .tar.gz of large images, extracted once into the cache (atomically: a temp dir renamed)."""
    final = cache_dir() / "extracted" / source.key
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{source.key}.", dir=final.parent))
    try:
        with tarfile.open(source.path) as tar:
            members = [
                m for m in tar.getmembers() if _member_name(m.name) and not _hidden(_member_name(m.name))
            ]
            tar.extractall(
                tmp, members=members, filter="data"
            )  # "data": no absolute paths, links out, devices
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if final.is_dir():  # another process finished first
            return final
        raise
    except (tarfile.TarError, EOFError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(
            f"{arg('data')} {source.path}: the archive is damaged or truncated ({exc})"
        ) from None
    return final


def _decode_tar(path: Path) -> DataBundle:
    try:
        with tarfile.open(path) as tar:
            members = [(m, _member_name(m.name)) for m in tar.getmembers()]
            members = [(m, n) for m, n in members if n and not _hidden(n)]
            dirs = {n for m, n in members if m.isdir()}
            files = {n: _tar_reader(tar, m) for m, n in members if m.isfile()}
            return _decode_tree(path, dirs, files)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UsageError(f"{arg('data')} {path}: the archive is damaged or truncated ({exc})") from None


def _decode_zip(path: Path) -> DataBundle:
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if not _hidden(n)]
            dirs = {n.strip("/") for n in names if n.endswith("/")}
            files = {n: (lambda n=n: zf.read(n)) for n in names if not n.endswith("/")}
            return _decode_tree(path, dirs, files)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UsageError(f"{arg('data')} {path}: the archive is damaged or truncated ({exc})") from None


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
    root, test_name, train_classes = _layout(origin, dirs, list(files))
    skipped: list[str] = []
    size: list[int] = []  # the first decoded image's size becomes the dataset's size
    total = sum(1 for n in files if _split_of(n, root) is not None)
    with progress_bar() as bar:
        task = bar.add_task(f"decoding {origin.name}", total=total, info="")
        splits = []
        for split_name in ("train", test_name):
            if split_name is None:  # a train-only tree: val_split holds out part of train later
                splits.append(Split(splits[0].images[:0].clone(), torch.zeros(0, dtype=torch.int64)))
                continue
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
                    raise UsageError(f"{arg('data')} {origin}: class folder {prefix} has no readable images")
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


def _layout(origin: Path, dirs: set[str], names: list[str]) -> tuple[str, str | None, list[str]]:
    """The tree's root folder (holding train/), its test split's name (None when absent) and classes."""
    all_dirs = set(dirs) | {p for name in names for p in _parents(name)}
    root = _find_root(origin, all_dirs)
    test_name = next((s for s in TEST_SPLIT_NAMES if _join(root, s) in all_dirs), None)
    train_classes = _class_dirs(all_dirs, _join(root, "train"))
    if test_name is not None:
        test_classes = _class_dirs(all_dirs, _join(root, test_name))
        if train_classes != test_classes:
            only_train = sorted(set(train_classes) - set(test_classes))
            only_test = sorted(set(test_classes) - set(train_classes))
            raise UsageError(
                f"{arg('data')} {origin}: the classes of train/ and {test_name}/ differ "
                f"(only in train: {only_train or 'none'}; only in {test_name}: {only_test or 'none'})"
            )
    if not train_classes:
        raise UsageError(f"{arg('data')} {origin}: {_join(root, 'train')}/ has no class folders")
    return root, test_name, train_classes


def _class_files(names: list[str], root: str, split: str, classes: list[str]) -> list[tuple[str, int]]:
    """(name, label) of the files directly in each class folder of ``split``, classes and names sorted."""
    out = []
    for label, cls in enumerate(classes):
        prefix = _join(root, split, cls) + "/"
        out += [
            (n, label)
            for n in sorted(n for n in names if n.startswith(prefix) and "/" not in n[len(prefix) :])
        ]
    return out


def _find_root(origin: Path, dirs: set[str]) -> str:
    """The folder holding train/: the top of the tree, or one level down (archives often add one)."""
    candidates = sorted(
        d[: -len("train")].rstrip("/")
        for d in dirs
        if d == "train" or (d.endswith("/train") and d.count("/") == 1)
    )
    if not candidates:
        raise UsageError(
            f"{arg('data')} {origin}: no train/ folder found; expected train/<class>/* and test/<class>/* "
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
