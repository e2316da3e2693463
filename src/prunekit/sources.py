"""Where images come from: an image-folder tree, a .tar.gz/.zip of one, CIFAR-10's python batches or its
torchvision download; found, probed, and decoded once (cached by content; decoding is ``decoding.py``'s),
or indexed for streaming (large or mixed-size images)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .console import progress_bar, warn
from .datatypes import DataBundle, Split
from .decoding import decode_tar, decode_tree, decode_zip, hwc_to_chw
from .errors import UsageError, arg
from .files import atomic_write, cache_dir, write_json
from .layout import class_files, find_layout, hidden, join_path, member_name, split_of
from .stream import ImageFiles, default_resize, header_size, index_files

CACHE_VERSION = "2"  # 2: held at the most common size, not the first image's
INDEX_VERSION = "1"
HEADER_SAMPLE = 32  # image headers read to decide between memory and streaming


@dataclass
class Source:
    """A dataset not yet decoded: a content key for the cache and a function that decodes it."""

    key: str
    name: str
    decode: Callable[[], DataBundle]
    kind: str = ""  # "dir", "tar" or "zip"
    path: Path | None = None
    dirs: set[str] = field(default_factory=set)  # a directory's listing, made for its stamp anyway
    names: list[str] = field(default_factory=list)


def cached(source: Source) -> DataBundle:
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


def cifar10_download(root: Path) -> Source:
    """CIFAR-10 through torchvision, downloaded into ``root`` when missing."""
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
            train=Split(hwc_to_chw(train.data), torch.tensor(train.targets)),
            test=Split(hwc_to_chw(test.data), torch.tensor(test.targets)),
            classes=list(train.classes),
            source="cifar10",
        )

    return Source(
        key=_digest(["cifar10-torchvision", str(root.resolve()), CACHE_VERSION]),
        name="cifar10",
        decode=decode,
    )


def local_source(path: Path) -> Source:
    """The dataset at ``path``: an image-folder tree, a .tar.gz or .zip of one, or CIFAR-10's batches."""
    if not path.exists():
        raise UsageError(
            f"{arg('data')} {path}: no such file or directory. Expected 'cifar10', 'synthetic', an image-folder tree, "
            "a .tar.gz/.zip of one, or CIFAR-10's cifar-10-python.tar.gz / cifar-10-batches-py."
        )
    if path.is_dir():
        files = {
            p.relative_to(path).as_posix(): p
            for p in sorted(path.rglob("*"))
            if p.is_file() and not hidden(p.relative_to(path).as_posix())
        }
        dirs = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_dir()}
        stamp = [f"{k}:{v.stat().st_size}:{v.stat().st_mtime_ns}" for k, v in files.items()]
        key = _digest(["dir", str(path.resolve()), *stamp, CACHE_VERSION])
        return Source(
            key,
            str(path),
            lambda: decode_tree(path, dirs, {k: v.read_bytes for k, v in files.items()}),
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
        return Source(key, str(path), lambda: decode_tar(path), "tar", path)
    if zipfile.is_zipfile(path):
        return Source(key, str(path), lambda: decode_zip(path), "zip", path)
    raise UsageError(
        f"{arg('data')} {path}: not a directory, .tar.gz or .zip archive (could not open it as an archive)"
    )


def probe_source(source: Source) -> dict[str, Any]:
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
        root, test_name, classes = find_layout(Path(source.name), dirs, names)
        images = [n for n in names if split_of(n, root) is not None]
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


def _listing(source: Source) -> tuple[set[str], list[str], list | None]:
    """(dirs, file names, header sizes or None); a tar is read once, sampling headers on the way."""
    if source.kind == "dir":
        return source.dirs, source.names, None
    if source.kind == "zip":
        with zipfile.ZipFile(source.path) as zf:
            names = [n for n in zf.namelist() if not hidden(n)]
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
                name = member_name(m.name)
                if not name or hidden(name):
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


def _read_header(source: Source, name: str) -> tuple[int, int] | None:
    """The (width, height) in the header of ``name``, or None when unreadable."""
    if source.kind == "zip":
        with zipfile.ZipFile(source.path) as zf, zf.open(name) as f:
            return header_size(f)
    try:
        with open(source.path / name, "rb") as f:
            return header_size(f)
    except OSError:
        return None


def stream_bundle(source: Source, probe: dict[str, Any], image_size: int, pre: dict[str, Any]) -> DataBundle:
    """Index the files (headers checked, cached) and wrap each split as :class:`ImageFiles`."""
    if source.kind == "tar":
        root, kind = _extract(source), "dir"
        dirs = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir()}
        names = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file()]
        names = [n for n in names if not hidden(n)]
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


def _stream_index(source: Source, root: Path, kind: str, dirs: set[str], names: list[str]) -> dict[str, Any]:
    """Readable files with labels and split (0 train, 1 test), classes and the skipped count; cached."""
    path = cache_dir() / "index" / f"{source.key}-{INDEX_VERSION}.npz"
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError):
        pass
    origin = Path(source.name)
    tree_root, test_name, classes = find_layout(origin, dirs, names)
    items = [(n, lab, 0) for n, lab in class_files(names, tree_root, "train", classes)]
    if test_name is not None:
        items += [(n, lab, 1) for n, lab in class_files(names, tree_root, test_name, classes)]
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
                prefix = join_path(tree_root, name, cls) + "/"
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


def _extract(source: Source) -> Path:
    """A .tar.gz of large images, extracted once into the cache (atomically: a temp dir renamed)."""
    final = cache_dir() / "extracted" / source.key
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{source.key}.", dir=final.parent))
    try:
        with tarfile.open(source.path) as tar:
            members = [m for m in tar.getmembers() if member_name(m.name) and not hidden(member_name(m.name))]
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


def _digest(parts: list[str]) -> str:
    """A 32-hex-digit cache key of ``parts``."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _file_sha256(path: Path) -> str:
    """The SHA-256 of the file at ``path``, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
