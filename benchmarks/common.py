"""Shared by the benchmark scripts: where the shared data lies, machine description, result files."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
FULL_ARCHIVE = SHARED_DATA / "cifar10-jpeg.tar.gz"
MINI_ARCHIVE = SHARED_DATA / "cifar10-jpeg-mini.tar.gz"
RESULTS = ROOT / "benchmarks" / "results"


TARGETS = {"2x": 0.5, "3x": 1 / 3}  # the full-data benchmarks' MACs budgets (allocation, finetune_lr)


def machine() -> dict:
    """What the numbers were measured on."""
    from prunekit.measure import cpu_name

    cpu = cpu_name()
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


def checkpoint_digest(path: Path) -> str:
    """What tells one trained checkpoint from another under the same path: its bytes' SHA-256 (16 digits)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def for_baseline(results: dict, baseline: Path, kept: tuple[str, ...]) -> dict:
    """``results`` for the checkpoint at ``baseline``: the ``kept`` entries of rows measured on another
    checkpoint (a baseline trained again, on another machine, under the same path) are moved under
    ``earlier_baselines``, so rows are only ever compared on one parent."""
    digest = checkpoint_digest(baseline)
    if results.get("rows") and results.get("baseline_sha256") != digest:
        earlier = {k: results.pop(k) for k in ("baseline_sha256", *kept) if k in results}
        results.setdefault("earlier_baselines", []).append(earlier)
        results["rows"] = {}
    results.setdefault("rows", {})
    results.update(baseline_sha256=digest)
    return results


def residual_sums(fit: bool) -> AbstractContextManager:
    """Recovery inside the block fits residual sums to the dense sum (``fit``) or every layer to its own
    output, as before 2026-12-06 (the ``plainsums`` rows); the setting before is restored after."""
    from prunekit import reconstruct

    return mock.patch.object(reconstruct, "SHORTCUTS", fit)


def scan_budget(seconds: float) -> AbstractContextManager:
    """The sensitivity scan shrinks its image counts to finish in about ``seconds`` instead of its default
    (for the block; restored after)."""
    from prunekit import sensitivity

    return mock.patch.object(sensitivity, "SCAN_SECONDS", seconds)


def min_keep(fraction: float | None) -> AbstractContextManager:
    """A target's plan keeps at least ``fraction`` of every group's channels (for the block; restored after;
    None: the default)."""
    from prunekit import planning

    if fraction is None:
        return contextlib.nullcontext()
    return mock.patch.object(planning, "MIN_KEEP_FRACTION", fraction)


def scan_grid(ratios: tuple[float, ...] | None) -> AbstractContextManager:
    """The sensitivity scans a pruning runs try ``ratios`` of every group instead of the default grid
    (for the block; None: the default)."""
    import functools

    from prunekit import sensitivity

    if ratios is None:
        return contextlib.nullcontext()
    return mock.patch.object(sensitivity, "scan", functools.partial(sensitivity.scan, ratios=ratios))


def rounding(modifiers: list[str]) -> int:
    """The ``round_to`` a row's ``roundN`` modifier names (1, unrounded, when none does)."""
    return next((int(m[5:]) for m in modifiers if m.startswith("round")), 1)


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=2) + "\n")
    print(f"wrote {path}")
    return path


@contextlib.contextmanager
def results_locked(path: Path) -> Iterator[None]:
    """The results file ``path`` to this process alone while inside: two runs side by side (one a core) each
    read it, add their row and write it (and commit) in turn, neither losing the other's row."""
    with path.with_suffix(".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read_results(path: Path, *sections: str) -> dict:
    """A resumable benchmark's results file, or a fresh one with each of ``sections`` empty."""
    return json.loads(path.read_text()) if path.exists() else {section: {} for section in sections}


def record_parent(results: dict, path: Path, digest: str) -> None:
    """Record that rows prefixed with ``path``'s run directory were run on the checkpoint of ``digest``;
    refused when that directory is recorded with another checkpoint (a parent trained again into it)."""
    parents = results.setdefault("parents", {})
    name = path.parent.name
    recorded = parents.get(name, {}).get("sha256")
    if recorded not in (None, digest):
        raise SystemExit(
            f"{path}: rows named {name}-... were run on another checkpoint (sha256 {recorded}; this one "
            f"{digest}); train it into a run directory of another name"
        )
    parents[name] = {"checkpoint": str(path), "sha256": digest}


def save_row(
    path: Path, key: str, row: dict, commit: str | None, parent: tuple[Path, str] | None = None
) -> None:
    """``row`` added under ``key`` to the results file ``path`` (locked meanwhile), with the ``parent``
    (checkpoint, digest) its key's prefix names recorded; ``commit``: as ``save_results``. The row keeps the
    CPU it ran on: the file's ``machine`` is its last writer's, and rows of one file span machines."""
    with results_locked(path):
        results = read_results(path, "rows")
        results["rows"][key] = {**row, "machine": row.get("machine") or row_machine()}
        if parent is not None:
            record_parent(results, *parent)
        save_results(path, results, commit)


def row_machine() -> dict:
    """What tells one row's machine from another's: the CPU, its flags and the cores."""
    here = machine()
    return {key: here[key] for key in ("cpu", "cpu_flags", "cores")}


def save_results(path: Path, results: dict, commit: str | None) -> None:
    """Write a resumable benchmark's results (with this machine); ``commit``: git-commit that file alone."""
    results["machine"] = machine()
    path.write_text(json.dumps(results, indent=2) + "\n")
    if commit:  # only this file: whatever else is staged stays out of the commit
        subprocess.run(["git", "add", "--", str(path)], cwd=ROOT, check=False)
        subprocess.run(["git", "commit", "-q", "-m", commit, "--", str(path)], cwd=ROOT, check=False)


def torch_pruning_uniform(baseline: Path, target: float, out: Path) -> dict:
    """Torch-Pruning's README recipe: local L2 group magnitude, one ratio for all layers (bisected until the MACs
    meet ``target``), the classifier ignored; the pruned checkpoint is written to ``out``."""
    import copy

    import torch_pruning as tp

    from prunekit.checkpoint import load_checkpoint, save_checkpoint
    from prunekit.measure import count_macs

    ckpt = load_checkpoint(baseline)
    size = ckpt.meta["input_size"]
    example = torch.randn(1, 3, size, size)
    dense_macs = count_macs(ckpt.model, size)

    def pruned(ratio: float) -> torch.nn.Module:
        model = copy.deepcopy(ckpt.model)
        pruner = tp.pruner.BasePruner(
            model,
            example,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=[model.fc],
        )
        pruner.step()
        return model

    lo, hi = 0.0, 0.95
    for _ in range(12):  # bisection on the uniform ratio until the MACs meet the target
        mid = (lo + hi) / 2
        if count_macs(pruned(mid), size) > target * dense_macs:
            lo = mid
        else:
            hi = mid
    model = pruned(hi)
    meta = {k: v for k, v in ckpt.meta.items() if k not in ("train", "history", "metrics")}
    meta["parent"] = {"checkpoint": str(baseline), "model": ckpt.meta["model"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, model, meta)
    return {"ratio": hi, "macs_ratio": count_macs(model, size) / dense_macs}
