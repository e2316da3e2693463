"""Streaming image folders: aspect, shapes, determinism, resume, ranks, sources, skipped files, val split."""

from __future__ import annotations

import gc
import os
import pickle
import shutil
import struct
import tarfile
import zipfile
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import prunekit.data as data_mod
import prunekit.sources as sources_mod
import prunekit.stream as stream_mod
from conftest import make_image_tree
from prunekit.data import BatchLoader, eval_batch_size, load_data
from prunekit.errors import UsageError
from prunekit.stream import ImageFiles, StreamLoader, _Plan, make_dataloader

CLASSES = ["cat", "dog", "frog"]
S = 32  # a small input size keeps the tests fast; the transforms do not depend on it


def _photo(path: Path, rng: np.random.Generator) -> None:
    w, h = (int(v) for v in rng.integers(60, 401, 2))
    pixels = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)  # blocky: compresses small
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).resize((w, h), Image.NEAREST).save(path, quality=80)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """16 train + 4 test JPEGs per class, of random sizes between 60 and 400 px."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("test", 4)):
        for cls in CLASSES:
            for i in range(n):
                _photo(root / split / cls / f"{i:03d}.jpg", rng)
    return root


@pytest.fixture
def tree(photos, tmp_path) -> Path:
    """A private copy of ``photos`` that a test may change."""
    return Path(shutil.copytree(photos, tmp_path / "photos"))


def _batches(loader, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader.batches(start))


def _assert_same(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# ---------------------------------------------------------------- mode, shapes, preprocessing


def test_mixed_sizes_stream_at_the_requested_size(photos):
    bundle = load_data(str(photos), image_size=S)
    assert bundle.mode == "stream" and bundle.image_size == S
    assert bundle.classes == CLASSES and len(bundle.train) == 48 and len(bundle.test) == 12
    assert bundle.preprocess == {
        "crop_size": S,
        "resize_size": round(S / 0.875),
        "mean": list(bundle.mean),
        "std": list(bundle.std),
        "interpolation": "bilinear",
        "mode": "stream",
    }
    assert bundle.mean != (0.5, 0.5, 0.5) and all(0 < s < 0.5 for s in bundle.std)
    x, y = next(iter(bundle.loader("test", 5)))
    assert x.shape == (5, 3, S, S) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    x, y = next(iter(bundle.loader("train", 8, train=True)))
    assert x.shape == (8, 3, S, S) and len(bundle.loader("train", 8, train=True)) == 6
    assert len(bundle.loader("test")) == 1  # eval_batch_size(32) = 500 covers the 12 test images


def test_default_size_is_224_for_photos(photos):
    bundle = load_data(str(photos), num_workers=0)
    assert bundle.image_size == 224 and bundle.preprocess["resize_size"] == 256
    x, _ = bundle.sample_batches(3, 2, seed=0)[0]
    assert x.shape == (2, 3, 224, 224)


def test_eval_batch_size_follows_resolution():
    assert eval_batch_size(32) == 500
    assert eval_batch_size(224) == 64
    assert eval_batch_size(448) == 16


def test_small_uniform_images_over_the_memory_budget_stream(tmp_path, monkeypatch):
    root = make_image_tree(tmp_path / "small")
    assert load_data(str(root)).mode == "memory"
    # a checkpoint's preprocess (or stream=True) rebuilds its pipeline in its mode
    assert load_data(str(root), preprocess={"mode": "stream"}).mode == "stream"
    assert load_data(str(root), stream=True).preprocess["crop_size"] == 8  # streamed at what the images are
    monkeypatch.setattr(data_mod, "available_memory", lambda: 1000)  # 15 images of 8x8x3 > 25% of 1000 bytes
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache2"))
    assert load_data(str(root)).mode == "stream"


def test_preprocess_override(photos):
    pre = {"crop_size": 40, "resize_size": 48, "mean": (0.4, 0.4, 0.4), "std": (0.2, 0.2, 0.2)}
    bundle = load_data(str(photos), preprocess={**pre, "interpolation": "bicubic"})
    assert bundle.preprocess == {
        "crop_size": 40,
        "resize_size": 48,
        "mean": [0.4, 0.4, 0.4],
        "std": [0.2, 0.2, 0.2],
        "interpolation": "bicubic",
        "mode": "stream",
    }
    assert bundle.train.resize_size == 48 and bundle.train.interpolation == "bicubic"
    # bundle.preprocess round-trips: a checkpoint can rebuild the same pipeline
    again = load_data(str(photos), preprocess=bundle.preprocess)
    assert again.preprocess == bundle.preprocess
    with pytest.raises(UsageError, match="unknown key"):
        load_data(str(photos), preprocess={"size": 3})
    with pytest.raises(UsageError, match="differs"):
        load_data(str(photos), image_size=32, preprocess={"crop_size": 40})


# ---------------------------------------------------------------- transforms


def _stripes(path: Path, width: int, height: int) -> None:
    """Red, green and blue vertical thirds."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    for c in range(3):
        pixels[:, c * width // 3 : (c + 1) * width // 3, c] = 255
    Image.fromarray(pixels).save(path, quality=95)


@pytest.mark.parametrize("name", ["wide.png", "wide.jpg"])
def test_eval_transform_keeps_the_aspect(tmp_path, name):
    # 3:1 image: shorter side to 73 gives 219 x 73; the centre 64 columns lie inside the green third.
    # A squashing resize would show all three stripes.
    _stripes(tmp_path / name, 1200, 400)
    files = ImageFiles(str(tmp_path), "dir", np.array([name.encode()]), np.array([0]), 64, 73)
    x, label = files[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.uint8 and label == 0
    assert x[1].float().mean() > 240 and x[0].float().mean() < 15 and x[2].float().mean() < 15


def test_jpeg_draft_matches_a_full_decode(tmp_path):
    rng = np.random.default_rng(1)
    pixels = np.repeat(np.repeat(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), 40, 0), 40, 1)
    Image.fromarray(pixels).save(tmp_path / "big.jpg", quality=95)  # 1600 x 1200: drafted at 1/4
    Image.fromarray(pixels).save(tmp_path / "big.png")
    paths = np.array([b"big.jpg", b"big.png"])
    files = ImageFiles(str(tmp_path), "dir", paths, np.array([0, 0]), 224, 256)
    with Image.open(tmp_path / "big.jpg") as img:
        img.draft("RGB", (342, 256))
        assert img.size == (400, 300)  # the draft really reduces the decode
    jpg, png = files[0][0].float(), files[1][0].float()
    assert (jpg - png).abs().mean() < 4
    train = files.as_train(True)
    jpg, png = train[(0, 7)][0].float(), train[(1, 7)][0].float()  # same seed: same crop of the same pixels
    assert (jpg - png).abs().mean() < 6


def test_train_transform_is_seeded_per_sample(photos):
    files = load_data(str(photos), image_size=S).train.as_train(True)
    assert torch.equal(files[(0, 5)][0], files[(0, 5)][0])
    assert not torch.equal(files[(0, 5)][0], files[(0, 6)][0])


# ---------------------------------------------------------------- order, resume, workers, ranks


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_are_deterministic_and_resume_exactly(photos, workers):
    bundle = load_data(str(photos), image_size=S, num_workers=0)
    reference = bundle.loader("train", 8, train=True, seed=1)
    reference.set_epoch(2)
    full = _batches(reference)
    bundle.num_workers = workers
    loader = bundle.loader("train", 8, train=True, seed=1)
    loader.set_epoch(2)
    _assert_same(_batches(loader), full)  # the same tensors whichever process decoded them
    tail = _batches(loader, start=3)  # persistent workers: a second pass over the same loader
    assert len(tail) == 3
    _assert_same(tail, full[3:])
    loader.set_epoch(3)
    assert not torch.equal(torch.cat([y for _, y in loader]), torch.cat([y for _, y in full]))


@pytest.mark.parametrize("train", [True, False])
def test_ranks_take_disjoint_slices(photos, train):
    files = load_data(str(photos), image_size=S).train
    files = replace(files, label_array=np.arange(len(files)))  # labels are ids: batches show which files
    seen = []
    for rank in range(2):
        loader = StreamLoader(files, 5, (0.5,) * 3, (0.25,) * 3, train, 3, rank, 2, num_workers=0)
        ids = torch.cat([y for _, y in loader]).tolist()
        assert len(ids) == len(set(ids))
        seen.append(set(ids))
    assert not seen[0] & seen[1]
    if train:
        assert len(seen[0]) == len(seen[1]) == (48 // 2) // 5 * 5
    else:
        assert seen[0] | seen[1] == set(range(48))


class _Probe(ImageFiles):
    """Reports the decoding process's threads, niceness and pid instead of an image."""

    def __getitem__(self, item):
        state = self.worker_state()
        return torch.tensor([state["threads"], state["nice"], state["pid"]]), 0


def test_workers_use_one_thread_and_a_lower_priority(photos):
    files = load_data(str(photos), image_size=S).train
    probe = _Probe(**{k: getattr(files, k) for k in files.__dataclass_fields__})
    plan = _Plan()
    plan.order, plan.batch_size, plan.count = np.arange(4), 1, 4
    torch.set_num_threads(2)
    states = torch.cat([x for x, _ in make_dataloader(probe, plan, 2)])
    assert (states[:, 0] == 1).all()
    assert (states[:, 1] > os.nice(0)).all()
    assert os.getpid() not in states[:, 2].tolist()
    assert torch.get_num_threads() == 2  # the training process keeps its threads


@pytest.mark.slow
def test_dataset_size_does_not_grow_in_python_objects():
    def files(n: int) -> ImageFiles:
        paths = np.array([f"train/class{i % 7}/{i:08d}.jpg".encode() for i in range(n)])
        return ImageFiles("/data", "dir", paths, np.arange(n) % 7, 224, 256)

    def objects(obj) -> int:
        seen, todo = set(), [obj]
        while todo:
            o = todo.pop()
            if id(o) not in seen:
                seen.add(id(o))
                todo += gc.get_referents(o)
        return len(seen)

    small, large = files(1000), files(10000)
    assert objects(large) == objects(small)  # a fixed set of buffers, however many files
    per_file = len(pickle.dumps(large)) / 10000  # what each worker receives
    assert per_file < len(b"train/class0/00000000.jpg") + 8 + 4


# ---------------------------------------------------------------- sources and skipped files


def test_zip_and_tar_gz_stream_like_the_directory(photos, tmp_path, isolated_cache):
    direct = load_data(str(photos), image_size=S)
    zpath = tmp_path / "photos.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(photos.rglob("*.jpg")):
            zf.write(p, p.relative_to(photos).as_posix())
    tpath = tmp_path / "photos.tar.gz"
    with tarfile.open(tpath, "w:gz") as tar:
        tar.add(photos, arcname="photos")  # one top folder, as archives often have
    expected = _batches(direct.loader("test", 5))
    for path, workers in ((zpath, 2), (tpath, 0)):
        bundle = load_data(str(path), image_size=S, num_workers=workers)
        assert bundle.mode == "stream" and bundle.classes == CLASSES
        assert len(bundle.train) == 48 and len(bundle.test) == 12
        _assert_same(_batches(bundle.loader("test", 5)), expected)
    assert direct.train.kind == "dir" and bundle.train.kind == "dir"
    (extracted,) = (isolated_cache / "extracted").iterdir()  # extracted once, then streamed from there
    assert bundle.train.root == str(extracted)
    assert load_data(str(zpath), image_size=S).train.kind == "zip"


def _bomb_png(path: Path, side: int = 40_000) -> None:
    """A tiny valid PNG whose header claims ``side`` x ``side`` pixels."""
    Image.new("RGB", (4, 4)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", side, side)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    path.write_bytes(bytes(data))


def test_unreadable_and_absurd_files_are_skipped_and_counted(tree, monkeypatch):
    (tree / "train" / "cat" / "notes.txt").write_text("not an image")
    (tree / "test" / "dog" / "empty.jpg").write_bytes(b"")
    _bomb_png(tree / "train" / "frog" / "bomb.png")
    with pytest.raises(Image.DecompressionBombError):  # the header is real enough for Pillow to refuse it
        Image.open(tree / "train" / "frog" / "bomb.png")
    bundle = load_data(str(tree), image_size=S)
    assert bundle.skipped_files == 3
    assert len(bundle.train) == 48 and len(bundle.test) == 12
    assert b"train/frog/bomb.png" not in bundle.train.paths.tolist()

    def no_indexing(*args, **kwargs):
        raise AssertionError("indexed again instead of reading the cached index")

    monkeypatch.setattr(sources_mod, "index_files", no_indexing)
    again = load_data(str(tree), image_size=S)
    assert again.skipped_files == 3 and np.array_equal(again.train.paths, bundle.train.paths)


def test_bomb_header_is_rejected_without_decoding(tmp_path):
    _bomb_png(tmp_path / "bomb.png")
    with open(tmp_path / "bomb.png", "rb") as f:
        assert stream_mod.header_size(f) is None
    _bomb_png(tmp_path / "wide.png", side=8000)  # 64 Mpx: large but allowed
    with open(tmp_path / "wide.png", "rb") as f:
        assert stream_mod.header_size(f) == (8000, 8000)


# ---------------------------------------------------------------- validation split


def test_train_only_folder_needs_val_split(tree):
    shutil.rmtree(tree / "test")
    with pytest.raises(UsageError, match="val_split 0.1"):
        load_data(str(tree))
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(UsageError, match="val_split"):
            load_data(str(tree), val_split=bad)


@pytest.mark.parametrize("memory", [False, True])
def test_val_split_is_stratified_seeded_and_disjoint(tree, tmp_path, memory):
    if memory:  # the same rule on small uniform images held in memory
        tree = make_image_tree(tmp_path / "small", train_per_class=16, test_per_class=0)
    shutil.rmtree(tree / "test", ignore_errors=True)
    kw = {"image_size": S} if not memory else {}

    def split(seed):
        bundle = load_data(str(tree), val_split=0.25, seed=seed, **kw)
        assert bundle.mode == ("memory" if memory else "stream")
        ids = bundle.train.images if memory else bundle.train.paths
        val = bundle.test.images if memory else bundle.test.paths
        return bundle, ids, val

    bundle, train_ids, val_ids = split(0)
    assert bundle.split_info == {"val_split": 0.25, "seed": 0, "val_images": 12}
    assert bundle.test.labels.bincount().tolist() == [4, 4, 4]  # round(0.25 * 16) per class
    assert bundle.train.labels.bincount().tolist() == [12, 12, 12]
    if memory:
        assert not any(torch.equal(v, t) for v in val_ids for t in train_ids)
    else:
        assert not set(val_ids.tolist()) & set(train_ids.tolist())
    _, _, same = split(0)
    _, _, other = split(1)
    if memory:
        assert torch.equal(same, val_ids) and not torch.equal(other, val_ids)
    else:
        assert np.array_equal(same, val_ids) and not np.array_equal(other, val_ids)


def test_small_classes_give_at_least_one_validation_image():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    train, val = data_mod.stratified_split(labels, 0.1, seed=0)
    assert labels[val].tolist() == [0, 1]  # one each from the classes of 2 and 3; none from a class of 1
    assert sorted(train.tolist() + val.tolist()) == list(range(6))


# ---------------------------------------------------------------- calibration samples, CIFAR unchanged


def test_sample_batches_in_both_modes(photos, image_tree):
    memory = load_data(str(image_tree))
    pick = torch.randperm(len(memory.train), generator=torch.Generator().manual_seed(4))[:5]
    expected = list(BatchLoader(memory.train.subset(pick), 2, memory.mean, memory.std, channels_last=False))
    _assert_same(memory.sample_batches(5, 2, seed=4), expected)
    streamed = load_data(str(photos), image_size=S, num_workers=0)
    got = streamed.sample_batches(5, 2, seed=4)
    assert [len(y) for _, y in got] == [2, 2, 1] and got[0][0].shape == (2, 3, S, S)
    pick = torch.randperm(48, generator=torch.Generator().manual_seed(4))[:5]
    assert torch.cat([y for _, y in got]).tolist() == streamed.train.labels[pick].tolist()
    _assert_same(got, streamed.sample_batches(5, 2, seed=4))


def test_cifar_mini_archive_stays_in_memory_and_unchanged(mini_archive, tmp_path):
    bundle = load_data(str(mini_archive))
    assert bundle.mode == "memory" and bundle.image_size == 32
    assert bundle.preprocess["resize_size"] == 32 and bundle.preprocess["mode"] == "memory"
    with tarfile.open(mini_archive) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("train/airplane/0000.jpg"))
        first = np.array(Image.open(tar.extractfile(member)).convert("RGB"))
    assert torch.equal(bundle.train.images[0], torch.from_numpy(first).permute(2, 0, 1))
    loader = bundle.loader("train", 64, train=True, seed=0)
    assert isinstance(loader, BatchLoader)
    reference = BatchLoader(bundle.train, 64, bundle.mean, bundle.std, train=True, seed=0)
    _assert_same(list(loader.batches())[:3], list(reference.batches())[:3])


def test_a_truncated_jpeg_is_replaced_with_a_warning_not_a_crash(tree, capfd):
    """The header indexes fine, the body does not decode: the epoch still completes, and says so."""
    victim = sorted((tree / "train").rglob("*.jpg"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])  # a valid header, a cut-off body
    bundle = load_data(str(tree), image_size=S)
    loader = bundle.loader("train", 8, train=True, channels_last=False)
    loader.num_workers = 0  # the warning is printed by the decoding process: keep it in this one
    seen = sum(len(y) for _, y in loader)
    assert seen == len(loader) * 8
    assert f"skipped unreadable image {victim.relative_to(tree).as_posix()}" in capfd.readouterr().err
