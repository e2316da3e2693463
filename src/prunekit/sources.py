"""Where images come from: an image-folder tree, a .tar.gz/.zip of one, CIFAR-10's python batches or its
torchvision download; read, probed and decoded into uint8 tensors once (cached by content), or indexed for
streaming (large or mixed-size images)."""

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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file, save_file

from .console import progress_bar, warn
from .datatypes import DataBundle, Split
from .errors import UsageError, arg
from .files import atomic_write, cache_dir, write_json
from .stream import ImageFiles, default_resize, header_size, index_files

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TEST_SPLIT_NAMES = ("test", "val")
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

    return Source(
        key=_digest(["cifar10-torchvision", str(root.resolve()), CACHE_VERSION]),
        name="cifar10",
        decode=decode,
    )


def local_source(path: Path) -> Source:
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
        return Source(
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
        return Source(key, str(path), lambda: _decode_tar(path), "tar", path)
    if zipfile.is_zipfile(path):
        return Source(key, str(path), lambda: _decode_zip(path), "zip", path)
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


def _listing(source: Source) -> tuple[set[str], list[str], list | None]:
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


def _read_header(source: Source, name: str) -> tuple[int, int] | None:
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


def _stream_index(source: Source, root: Path, kind: str, dirs: set[str], names: list[str]) -> dict[str, Any]:
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
    decoded: dict[str, list[tuple[np.ndarray, int, str]]] = {}
    total = sum(1 for n in files if _split_of(n, root) is not None)
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


def _layout(origin: Path, dirs: set[str], names: list[str]) -> tuple[str, str | None, list[str]]:
    """The tree's root folder (holding train/), its test split's name (None when absent) and classes."""
    all_dirs = set(dirs) | {p for name in names for p in _parents(name)}
    root = _find_root(origin, all_dirs)
    test_name = next((s for s in TEST_SPLIT_NAMES if join_path(root, s) in all_dirs), None)
    train_classes = _class_dirs(all_dirs, join_path(root, "train"))
    if test_name is not None:
        test_classes = _class_dirs(all_dirs, join_path(root, test_name))
        if train_classes != test_classes:
            only_train = sorted(set(train_classes) - set(test_classes))
            only_test = sorted(set(test_classes) - set(train_classes))
            raise UsageError(
                f"{arg('data')} {origin}: the classes of train/ and {test_name}/ differ "
                f"(only in train: {only_train or 'none'}; only in {test_name}: {only_test or 'none'})"
            )
    if not train_classes:
        raise UsageError(f"{arg('data')} {origin}: {join_path(root, 'train')}/ has no class folders")
    return root, test_name, train_classes


def _class_files(names: list[str], root: str, split: str, classes: list[str]) -> list[tuple[str, int]]:
    """(name, label) of the files directly in each class folder of ``split``, classes and names sorted."""
    out = []
    for label, cls in enumerate(classes):
        prefix = join_path(root, split, cls) + "/"
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


def join_path(*parts: str) -> str:
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
