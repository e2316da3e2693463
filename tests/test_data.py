"""Data sources, the decode cache, error messages, augmentation and the batch loader."""

from __future__ import annotations

import pickle
import shutil
import tarfile
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import prunekit.decoding as decoding_mod
from conftest import make_image_tree, write_image
from prunekit.data import (
    CIFAR10_CLASSES,
    BatchLoader,
    Split,
    channel_stats,
    load_data,
    random_crop_flip,
    resize_images,
    synthetic_data,
)
from prunekit.errors import UsageError

CLASSES = ["cat", "dog", "frog"]


def _tar(src: Path, dest: Path, arcname: str | None = None) -> Path:
    """A .tar.gz of ``src``'s contents, members named relative to ``arcname`` (default: no top folder)."""
    with tarfile.open(dest, "w:gz") as tar:
        if arcname is None:
            for child in sorted(src.iterdir()):
                tar.add(child, arcname=child.name)
        else:
            tar.add(src, arcname=arcname)
    return dest


def _names(archive: Path) -> list[str]:
    with tarfile.open(archive) as tar:
        return tar.getnames()


def _zip(src: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(src.rglob("*")):
            zf.write(p, p.relative_to(src).as_posix())
    return dest


def _assert_tree_bundle(bundle, train=9, test=6, size=8):
    assert bundle.classes == CLASSES
    assert len(bundle.train) == train and len(bundle.test) == test
    assert bundle.train.images.dtype == torch.uint8
    assert tuple(bundle.train.images.shape) == (train, 3, size, size)
    assert tuple(bundle.test.images.shape) == (test, 3, size, size)
    assert bundle.train.labels.tolist() == sorted(bundle.train.labels.tolist())
    assert bundle.train.labels.bincount().tolist() == [train // 3] * 3
    assert bundle.skipped_files == 0


# ---------------------------------------------------------------- sources


def test_image_folder_directory(image_tree):
    bundle = load_data(str(image_tree))
    _assert_tree_bundle(bundle)
    # The pixels are the PNG's pixels, in CHW order: train/cat/0000.png was written with seed 1.
    expected = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert torch.equal(bundle.train.images[0], torch.from_numpy(expected).permute(2, 0, 1))
    # mean/std are computed from the train split
    assert bundle.mean != (0.5, 0.5, 0.5)
    assert all(0 < s < 0.5 for s in bundle.std)


def test_tar_gz_and_zip_match_the_directory(image_tree, tmp_path):
    direct = load_data(str(image_tree))
    for archive in (_tar(image_tree, tmp_path / "d.tar.gz"), _zip(image_tree, tmp_path / "d.zip")):
        bundle = load_data(str(archive))
        _assert_tree_bundle(bundle)
        assert torch.equal(bundle.train.images, direct.train.images)
        assert torch.equal(bundle.test.images, direct.test.images)
        assert torch.equal(bundle.train.labels, direct.train.labels)


def test_archive_with_a_top_level_folder(image_tree, tmp_path):
    archive = _tar(image_tree, tmp_path / "top.tar.gz", arcname="mydata")
    assert _names(archive)[0] == "mydata"
    _assert_tree_bundle(load_data(str(archive)))


def test_tar_made_with_dot_prefix(image_tree, tmp_path):
    """``tar -czf x.tar.gz -C dir .`` names every member ./train/...; that is the same tree."""
    archive = _tar(image_tree, tmp_path / "dot.tar.gz", arcname=".")
    assert any(n.startswith("./train/") for n in _names(archive))
    _assert_tree_bundle(load_data(str(archive)))


def test_val_instead_of_test(tmp_path):
    root = make_image_tree(tmp_path / "v", test_name="val")
    _assert_tree_bundle(load_data(str(root)))


def test_hidden_files_are_ignored(image_tree, tmp_path):
    (image_tree / "train" / "cat" / ".DS_Store").write_bytes(b"junk")
    (image_tree / ".hidden").mkdir()
    write_image(image_tree / ".hidden" / "x.png")
    bundle = load_data(str(image_tree))
    _assert_tree_bundle(bundle)


def test_an_odd_size_among_uniform_images_is_resized_to_what_most_are(image_tree, capsys):
    """One 12-px image among 8-px ones: held in memory at 8 px (not streamed at 224), the odd one resized
    and named in one warning."""
    write_image(image_tree / "train" / "dog" / "9999.png", size=12, seed=99)
    bundle = load_data(str(image_tree))
    assert bundle.mode == "memory" and bundle.image_size == 8
    assert tuple(bundle.train.images.shape) == (10, 3, 8, 8)
    assert bundle.train.labels.bincount().tolist() == [3, 4, 3]
    warning = " ".join(capsys.readouterr().err.split())
    assert "15 of 16 images are 8x8" in warning and "9999.png" in warning
    # streamed instead (forced), every image is read at the size asked
    streamed = load_data(str(image_tree), stream=True, image_size=16)
    assert streamed.mode == "stream" and streamed.image_size == 16


def _cifar_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "batch_label": f"batch {seed}",
        "labels": [int(v) for v in rng.integers(0, 10, n)],
        "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        "filenames": [f"img{i}.png" for i in range(n)],
    }


def _make_cifar_dir(root: Path, per_batch: int = 4) -> tuple[list[dict], dict]:
    """CIFAR-10's python format: pickled dicts with a uint8 [N, 3072] 'data' (R, G, B planes) and 'labels'."""
    root.mkdir(parents=True)
    batches = [_cifar_batch(per_batch, seed=i) for i in range(1, 6)]
    test = _cifar_batch(per_batch, seed=6)
    for i, b in enumerate(batches, start=1):
        (root / f"data_batch_{i}").write_bytes(pickle.dumps(b, protocol=2))
    (root / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    meta = {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    (root / "readme.html").write_text("<html></html>")
    return batches, test


def _check_cifar(bundle, batches, test):
    assert bundle.classes == CIFAR10_CLASSES
    assert len(bundle.train) == 20 and len(bundle.test) == 4
    assert tuple(bundle.train.images.shape) == (20, 3, 32, 32)
    assert bundle.train.labels.tolist() == [v for b in batches for v in b["labels"]]
    assert bundle.test.labels.tolist() == test["labels"]
    # the first 1024 bytes of a row are the red plane, row-major
    row = batches[0]["data"][0]
    assert torch.equal(bundle.train.images[0, 0], torch.from_numpy(row[:1024].reshape(32, 32)))
    assert torch.equal(bundle.train.images[0, 2], torch.from_numpy(row[2048:].reshape(32, 32)))
    assert torch.equal(bundle.test.images[3].flatten(), torch.from_numpy(test["data"][3]))


def test_cifar10_python_batches_directory(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    batches, test = _make_cifar_dir(root)
    _check_cifar(load_data(str(root)), batches, test)


def test_cifar10_python_tar_gz(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    batches, test = _make_cifar_dir(root)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="cifar-10-batches-py")
    shutil.rmtree(root)
    _check_cifar(load_data(str(archive)), batches, test)


def test_cifar10_missing_batch_names_it(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    _make_cifar_dir(root)
    (root / "data_batch_4").unlink()
    with pytest.raises(UsageError, match="data_batch_4 is missing"):
        load_data(str(root))


def test_subset_keeps_n_train_images_per_class(image_tree):
    bundle = load_data(str(image_tree), subset=2)
    assert bundle.train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert len(bundle.test) == 6  # the test split is never subset
    full = load_data(str(image_tree))
    assert torch.equal(bundle.train.images[:2], full.train.images[:2])


@pytest.mark.parametrize("bad", [0, -3])
def test_subset_must_be_positive(bad):
    with pytest.raises(UsageError, match="^subset must be a positive number"):
        load_data("synthetic", subset=bad)


def test_image_size_resizes_both_splits(image_tree):
    bundle = load_data(str(image_tree), image_size=16)
    assert tuple(bundle.train.images.shape) == (9, 3, 16, 16)
    assert tuple(bundle.test.images.shape) == (6, 3, 16, 16)
    assert bundle.image_size == 16
    assert bundle.train.images.dtype == torch.uint8


def test_synthetic_is_deterministic_per_seed():
    a, b, c = load_data("synthetic", seed=1), load_data("synthetic", seed=1), load_data("synthetic", seed=2)
    assert torch.equal(a.train.images, b.train.images)
    assert not torch.equal(a.train.images, c.train.images)
    assert len(a.train) == 640 and len(a.test) == 160 and len(a.classes) == 10


def test_mini_archive_loads(mini_archive):
    bundle = load_data(str(mini_archive))
    assert len(bundle.train) == 1000
    assert len(bundle.test) == 500
    assert bundle.classes == CIFAR10_CLASSES
    assert tuple(bundle.train.images.shape[1:]) == (3, 32, 32)
    assert bundle.train.labels.bincount().tolist() == [100] * 10
    assert bundle.skipped_files == 0


# ---------------------------------------------------------------- the decode cache


def test_second_load_is_served_from_the_cache(image_tree, isolated_cache, monkeypatch):
    first = load_data(str(image_tree))
    cached = list((isolated_cache / "decoded").glob("*.safetensors"))
    assert len(cached) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(decoding_mod, "_decode_image", no_decoding)
    second = load_data(str(image_tree))
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.test.labels, second.test.labels)
    assert second.classes == first.classes
    assert second.mean == first.mean


def test_cache_is_invalidated_when_the_folder_changes(image_tree, isolated_cache):
    load_data(str(image_tree))
    write_image(image_tree / "train" / "cat" / "0100.png", seed=123)
    bundle = load_data(str(image_tree))
    assert len(bundle.train) == 10
    assert len(list((isolated_cache / "decoded").glob("*.safetensors"))) == 2


def test_damaged_cache_is_rebuilt(image_tree, isolated_cache):
    first = load_data(str(image_tree))
    (cache_file,) = (isolated_cache / "decoded").glob("*.safetensors")
    cache_file.write_bytes(b"garbage")
    second = load_data(str(image_tree))
    assert torch.equal(first.train.images, second.train.images)
    assert cache_file.stat().st_size > 100


# ---------------------------------------------------------------- unreadable files


def test_corrupt_and_non_image_files_are_skipped_and_counted(image_tree, tmp_path, isolated_cache):
    (image_tree / "train" / "cat" / "notes.txt").write_text("not an image")
    good = (image_tree / "train" / "dog" / "0000.png").read_bytes()
    (image_tree / "train" / "dog" / "broken.png").write_bytes(good[: len(good) // 3])
    (image_tree / "test" / "frog" / "zero.jpg").write_bytes(b"")
    bundle = load_data(str(image_tree))
    assert bundle.skipped_files == 3
    assert len(bundle.train) == 9 and len(bundle.test) == 6
    # the count survives the cache
    assert load_data(str(image_tree)).skipped_files == 3
    # and archives count the same way
    assert load_data(str(_tar(image_tree, tmp_path / "x.tar.gz"))).skipped_files == 3


# ---------------------------------------------------------------- errors name the path


def test_empty_class_folder(image_tree):
    for p in (image_tree / "train" / "dog").iterdir():
        p.unlink()
    with pytest.raises(UsageError) as err:
        load_data(str(image_tree))
    assert str(image_tree) in str(err.value)
    assert "train/dog/" in str(err.value)


def test_class_folder_with_only_unreadable_files(image_tree):
    for p in (image_tree / "test" / "frog").iterdir():
        p.write_text("text")
    with pytest.raises(UsageError, match="test/frog/ has no readable images"):
        load_data(str(image_tree))


def test_missing_test_split(image_tree):
    shutil.rmtree(image_tree / "test")
    with pytest.raises(UsageError) as err:
        load_data(str(image_tree))
    assert str(image_tree) in str(err.value)
    assert "no test/ or val/" in str(err.value)


def test_missing_train_split(image_tree):
    shutil.rmtree(image_tree / "train")
    with pytest.raises(UsageError, match="no train/ folder"):
        load_data(str(image_tree))


def test_classes_differ_between_train_and_test(image_tree):
    (image_tree / "test" / "frog").rename(image_tree / "test" / "toad")
    with pytest.raises(UsageError) as err:
        load_data(str(image_tree))
    message = str(err.value)
    assert str(image_tree) in message
    assert "['frog']" in message and "['toad']" in message


def test_file_that_is_not_an_archive(tmp_path):
    bogus = tmp_path / "data.tar.gz"
    bogus.write_text("this is plain text, not a tar or zip archive\n" * 20)
    with pytest.raises(UsageError) as err:
        load_data(str(bogus))
    assert str(bogus) in str(err.value)
    assert "archive" in str(err.value)


def test_truncated_archive(image_tree, tmp_path):
    archive = _tar(image_tree, tmp_path / "full.tar.gz")
    blob = archive.read_bytes()
    for cut in (40, len(blob) // 2):
        truncated = tmp_path / f"cut{cut}.tar.gz"
        truncated.write_bytes(blob[:cut])
        with pytest.raises(UsageError) as err:
            load_data(str(truncated))
        assert str(truncated) in str(err.value)


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "nowhere" / "data.tar.gz"
    with pytest.raises(UsageError) as err:
        load_data(str(missing))
    assert str(missing) in str(err.value)
    assert "no such file or directory" in str(err.value)


def test_cifar10_offline_asks_for_data(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    def offline(root, train=True, download=False, **kwargs):
        calls.append((root, train, download))
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError) as err:
        load_data("cifar10", data_dir=str(empty))
    assert calls and calls[0][0] == str(empty)
    assert "--data" in str(err.value)
    assert str(empty) in str(err.value)


# ---------------------------------------------------------------- augmentation and batching


def test_random_crop_flip_shape_dtype_and_determinism():
    images = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8)
    a = random_crop_flip(images, torch.Generator().manual_seed(7))
    b = random_crop_flip(images, torch.Generator().manual_seed(7))
    c = random_crop_flip(images, torch.Generator().manual_seed(8))
    assert a.shape == images.shape and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, images)


def test_random_crop_flip_without_padding_only_flips():
    images = torch.randint(0, 256, (32, 3, 6, 6), dtype=torch.uint8)
    out = random_crop_flip(images, torch.Generator().manual_seed(0), padding=0)
    flipped = images.flip(-1)
    same = [torch.equal(o, i) for o, i in zip(out, images, strict=True)]
    mirrored = [torch.equal(o, f) for o, f in zip(out, flipped, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))
    assert any(same) and any(mirrored)


def _id_split(n: int) -> Split:
    """Labels are the image indices, so batches reveal which images they hold."""
    return Split(torch.zeros(n, 3, 4, 4, dtype=torch.uint8), torch.arange(n))


@pytest.mark.parametrize("train", [True, False])
def test_batch_loader_shards_ranks_without_overlap(train):
    n, world = 101, 2
    seen = []
    for rank in range(world):
        loader = BatchLoader(
            _id_split(n), 8, (0.5,) * 3, (0.25,) * 3, train=train, seed=3, rank=rank, world_size=world
        )
        ids = torch.cat([y for _, y in loader]).tolist()
        assert len(ids) == len(set(ids))
        seen.append(set(ids))
    assert not seen[0] & seen[1]
    if train:  # each rank takes n // world images and drops its last partial batch
        assert len(seen[0]) == len(seen[1]) == (n // world) // 8 * 8
    else:  # evaluation covers every image exactly once
        assert seen[0] | seen[1] == set(range(n))


def test_batch_loader_resumes_mid_epoch_with_identical_batches():
    split = Split(torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8), torch.arange(40))
    loader = BatchLoader(split, 8, (0.5,) * 3, (0.25,) * 3, train=True, seed=1)
    loader.set_epoch(2)
    full = list(loader.batches())
    tail = list(loader.batches(start=3))
    assert len(full) == 5 and len(tail) == 2
    for (xa, ya), (xb, yb) in zip(full[3:], tail, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    loader.set_epoch(3)
    assert not torch.equal(torch.cat([y for _, y in loader]), torch.cat([y for _, y in full]))


def test_batch_loader_normalizes():
    split = Split(torch.full((4, 3, 2, 2), 255, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64))
    x, _ = next(iter(BatchLoader(split, 4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))))
    assert x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, 2.0))


def test_synthetic_data_shapes():
    bundle = synthetic_data(num_classes=3, train_per_class=5, test_per_class=2, size=16)
    assert tuple(bundle.train.images.shape) == (15, 3, 16, 16)
    assert bundle.test.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_an_in_memory_resize_that_would_not_fit_is_refused_before_allocating():
    """Found by the command-line fuzz test: --image-size 1_000 on in-memory data once took 24 GB and was
    killed. Chunks are now bounded in bytes, and a size whose held images would not fit is refused."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(UsageError, match=r"^image_size 20000: this dataset is held in memory"):
        load_data("synthetic", image_size=20000)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB: nothing was allocated


def test_resize_and_statistics_chunks_do_not_change_the_result():
    images = synthetic_data(train_per_class=8).train.images
    assert torch.equal(resize_images(images, 48, chunk=3), resize_images(images, 48))
    assert channel_stats(images, chunk=5) == channel_stats(images)
