"""Shared by the benchmark scripts: where the shared data lies, machine description, result files."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
FULL_ARCHIVE = SHARED_DATA / "cifar10-jpeg.tar.gz"
MINI_ARCHIVE = SHARED_DATA / "cifar10-jpeg-mini.tar.gz"
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        words = set()
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_flags": sorted(words & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def require(path: Path) -> Path:
    if not path.exists():
        sys.exit(f"{path} is missing: these benchmarks read CIFAR-10 from ../shared/data/")
    return path


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=2) + "\n")
    print(f"wrote {path}")
    return path
