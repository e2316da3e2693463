"""Datasets: small uniform images held in memory (memory.py), anything larger streamed from disk (stream.py);
``load_data``'s decisions, splits, sizes and statistics. Types: ``datatypes.py``; reading: ``sources.py``,
``decoding.py`` and ``layout.py``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .console import warn
from .datatypes import Batches as Batches
from .datatypes import DataBundle, Split
from .datatypes import eval_batch_size as eval_batch_size
from .decoding import CIFAR10_CLASSES as CIFAR10_CLASSES
from .decoding import most_common_size
from .errors import UsageError, arg
from .files import cache_dir
from .layout import join_path
from .memory import CHUNK_BYTES as CHUNK_BYTES
from .memory import BatchLoader as BatchLoader
from .memory import channel_stats, resize_images
from .memory import random_crop_flip as random_crop_flip
from .sources import cached, cifar10_download, local_source, probe_source, stream_bundle
from .stream import ImageFiles as ImageFiles
from .stream import StreamLoader as StreamLoader
from .stream import channel_stats as stream_channel_stats

SMALL_SIDE = 64  # uniform images up to this side are held in memory at their native size
MOST = 0.9  # images of one size count as uniform when this share of a sample has it
STREAM_SIZE = 224  # the default input size of streamed (large or mixed-size) images
MEMORY_FRACTION = 0.25  # hold decoded data in memory only up to this share of the available RAM
PREPROCESS_KEYS = ("crop_size", "resize_size", "mean", "std", "interpolation")


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
        bundle = cached(cifar10_download(Path(data_dir) if data_dir else cache_dir() / "cifar10"))
    else:
        source = local_source(Path(spec).expanduser())
        probe = probe_source(source)
        if probe["test_name"] is None and val_split is None and not probe["cifar"]:
            raise UsageError(
                f"{arg('data')} {source.name}: found {join_path(probe['root'], 'train')}/ but no test/ or val/ split beside "
                f"it; pass {arg('val_split')} 0.1 to hold out 10% of train/ for evaluation, or add "
                "test/<class>/* (or val/<class>/*)"
            )
        if stream is None:
            stream = _should_stream(probe, image_size)
        if stream and not probe["cifar"]:
            bundle = stream_bundle(source, probe, image_size or stream_size(probe), pre)
        else:
            bundle = cached(source)
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


def describe(bundle: DataBundle) -> str:
    """One line on what training will see: images per split and class, where the test split comes from,
    the input size and whether images are held in memory or streamed."""
    counts = torch.as_tensor(bundle.train.labels).bincount(minlength=len(bundle.classes)).tolist()
    per_class = f"{counts[0]} each" if min(counts) == max(counts) else f"{min(counts)}-{max(counts)} a class"
    held = bundle.split_info.get("val_split")
    test = f"held out from train by {arg('val_split')} {held}" if held else "its own test split"
    how = "held in memory" if bundle.mode == "memory" else "streamed from disk"
    return (
        f"data: {len(bundle.train)} training images in {len(bundle.classes)} classes ({per_class}), "
        f"{len(bundle.test)} test images ({test}); trained at {bundle.image_size} px, {how}"
    )


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
    if not probe["sizes"]:  # no readable image in the sample: let the decoder report the files
        return False
    (w, h), count, _ = most_common_size(probe["sizes"])
    # a few odd images (a stray thumbnail) do not decide: they are resized to what most images are
    if count < MOST * len(probe["sizes"]) or max(w, h) > SMALL_SIDE:
        return True
    pixels = image_size * image_size if image_size else w * h
    return probe["n"] * 3 * pixels > MEMORY_FRACTION * available_memory()


def stream_size(probe: dict[str, Any]) -> int:
    """The default size of streamed images: 224 px for photos; small images of mixed sizes keep the short
    side most of them have, the sample's median, rather than being blown up to 224."""
    sides = sorted(min(s) for s in probe["sizes"])
    if not sides or max(max(s) for s in probe["sizes"]) > SMALL_SIDE:
        return STREAM_SIZE
    return sides[len(sides) // 2]


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


# ---------------------------------------------------------------- synthetic data


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
