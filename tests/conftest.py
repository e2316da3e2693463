"""Shared fixtures: an isolated decode cache, tiny generated image folders, the shared CIFAR-10 archive."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MINI_ARCHIVE = SHARED_DATA / "cifar10-jpeg-mini.tar.gz"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets its own PRUNEKIT_CACHE, so the user's ~/.cache is never read or written."""
    cache = tmp_path_factory.mktemp("prunekit-cache")
    monkeypatch.setenv("PRUNEKIT_CACHE", str(cache))
    return cache


@pytest.fixture(autouse=True)
def _quick_latency(request, monkeypatch) -> None:
    """Latency medians over 5 timed runs instead of 30, outside the `timing` tests that assert on them: what
    the other tests check of a latency is its shape, and timing took about 60 of the suite's 440 s."""
    if request.node.get_closest_marker("timing") is None:
        monkeypatch.setenv("PRUNEKIT_LATENCY_REPEATS", "5")


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """One intra-op thread: small models train faster that way, and the suite shares the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_torch_state():
    """Training sets the global seed and thread count; keep tests independent of each other's order."""
    threads = torch.get_num_threads()
    rng = torch.get_rng_state()
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)


@pytest.fixture
def mini_archive() -> Path:
    if not MINI_ARCHIVE.is_file():
        pytest.skip(f"shared data not available: {MINI_ARCHIVE} is absent (see ../shared/data/README.md)")
    return MINI_ARCHIVE


def write_image(path: Path, size: int = 8, seed: int = 0, fmt: str | None = None) -> np.ndarray:
    """Write a random RGB image (PNG by default, JPEG for .jpg) and return its pixels as HxWx3 uint8."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return pixels


def make_image_tree(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog", "frog"),
    train_per_class: int = 3,
    test_per_class: int = 2,
    test_name: str = "test",
    size: int = 8,
) -> Path:
    """train/<class>/*.png and <test_name>/<class>/*.png with distinct random pixels; returns ``root``."""
    seed = 0
    for split, count in (("train", train_per_class), (test_name, test_per_class)):
        for cls in classes:
            for i in range(count):
                seed += 1
                write_image(root / split / cls / f"{i:04d}.png", size=size, seed=seed)
    return root


@pytest.fixture
def image_tree(tmp_path) -> Path:
    return make_image_tree(tmp_path / "images")


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a child Python: this checkout's src first on the path, one thread, no colour."""
    env = dict(os.environ)
    src = str(REPO_ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["NO_COLOR"] = "1"
    env.update(extra)
    return env


PYTHON = sys.executable


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """The command line, in this process: (exit code, stdout, stderr)."""
    from prunekit.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="session")
def _trained_once(tmp_path_factory) -> Path:
    from prunekit import api
    from prunekit.train import TrainConfig

    out = tmp_path_factory.mktemp("trained") / "dense"
    api.train("resnet18", "synthetic", out, TrainConfig(epochs=1, batch_size=32))
    return out / "model.safetensors"


@pytest.fixture(scope="module")
def trained(_trained_once, tmp_path_factory) -> Path:
    """A resnet18 trained one epoch on synthetic data, trained once per session; each test module gets
    its own copy, so outputs written beside it never meet another module's."""
    import shutil

    return Path(shutil.copy(_trained_once, tmp_path_factory.mktemp("trained-copy") / "model.safetensors"))
