"""Atomic, durable file writes; output-path checks; the per-directory lock; the user cache directory."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .errors import UsageError, arg

LOCK_FILE = ".prunekit.lock"
# atomic_write's temporaries: ".<name>.<8 random chars from mkstemp>.tmp"
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)``, fsync, then rename onto ``path``: readers and crashes never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        _slow_save_for_tests(path)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make outputs private
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        full = _disk_full(exc, path)
        if full is not None:
            raise full from exc
        raise
    _fsync_dir(path.parent)
    return path


def _disk_full(exc: BaseException, path: Path) -> OSError | None:
    """A full disk as ``OSError(ENOSPC)`` naming ``path``; writers such as safetensors wrap it in their own type."""
    codes = (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, OSError) and exc.errno in codes:
        return None if exc.filename else OSError(exc.errno, exc.strerror, str(path))
    text = str(exc)
    if "No space left on device" in text or "os error 28" in text:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return None


def _fsync_file(path: str | Path) -> None:
    """Force the data to disk before the rename, so a power cut leaves the old file or the new, never zeros."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable; not every platform or filesystem can fsync a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _slow_save_for_tests(path: Path) -> None:
    """Test-only hook, not for users: ``PRUNEKIT_TEST_SLOW_SAVE=<file name>:<seconds>`` pauses before the
    rename that would replace an existing file of that name, so a fault-injection test can SIGKILL a save
    half-way (its temporary written, the previous file still in place)."""
    spec = os.environ.get("PRUNEKIT_TEST_SLOW_SAVE")
    if not spec:
        return
    name, _, delay = spec.rpartition(":")
    if name == path.name and path.exists():
        import time

        print(f"PRUNEKIT_TEST_SLOW_SAVE: holding the temporary of {path}", file=sys.stderr, flush=True)
        time.sleep(float(delay))


def clean_stale_temps(directory: str | Path) -> list[Path]:
    """Remove the temporaries a killed ``atomic_write`` left in ``directory`` (call it holding the lock)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if _TEMP_NAME.match(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def _same(a: Path, b: Path) -> bool:
    """Whether two paths name one file: equal once resolved, or the same inode (hard links, bind mounts)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(
    inputs: Iterable[str | Path | None], outputs: Iterable[str | Path], overwrite: bool = False
) -> None:
    """Refuse outputs that are an input, that collide with each other, or that exist (unless ``overwrite``)."""
    ins = [Path(p) for p in inputs if p is not None]
    outs = [Path(p) for p in outputs]
    for out in outs:
        for source in ins:
            if _same(out, source):
                raise UsageError(
                    f"{out} is also an input ({source}); writing it would destroy it: pick another output path"
                )
    for i, out in enumerate(outs):
        for other in outs[i + 1 :]:
            if _same(out, other):
                raise UsageError(f"two outputs would be written to one file, {out}; pick another output path")
    if not overwrite:
        for out in outs:
            if out.exists():
                raise UsageError(f"{out} already exists; pass {arg('overwrite')} to replace it")


class DirectoryLock:
    """An exclusive ``flock`` on ``<directory>/.prunekit.lock`` holding our pid and command.

    The kernel drops the lock when the process dies (even by SIGKILL), so a stale lock file never blocks.
    Re-entrant within a process (the pipeline locks its run directory, then each stage locks it again).
    With ``create``, the directory (and missing parents) are made, and removed again on release if left empty.
    """

    _held: dict[Path, int] = {}  # resolved directory -> nesting depth in this process

    def __init__(self, directory: str | Path, command: str = "", create: bool = True):
        self.directory = Path(directory)
        self.command = command or " ".join(["prunekit", *sys.argv[1:]])
        self.create = create
        self._fd: int | None = None
        self._created: list[Path] = []
        self._key: Path | None = None

    def __enter__(self) -> DirectoryLock:
        self._key = self.directory.resolve()
        if not is_main_process():
            self._key = None  # torchrun: rank 0 holds the lock for the whole job
            return self
        if self._key in self._held:
            self._held[self._key] += 1
            return self
        if self.create:
            self._created = _make_dirs(self.directory)
        try:
            self._fd = _acquire(self.directory / LOCK_FILE, self.command)
        except BaseException:
            _remove_empty(self._created)
            raise
        self._held[self._key] = 1
        return self

    def __exit__(self, *exc: object) -> None:
        if self._key is None:
            return
        self._held[self._key] -= 1
        if self._held[self._key] > 0:
            return
        del self._held[self._key]
        if self._fd is not None:
            # Unlink while still holding the lock; _acquire re-checks the inode, so no one locks a ghost file.
            (self.directory / LOCK_FILE).unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
        _remove_empty(self._created)


def _make_dirs(directory: Path) -> list[Path]:
    """``mkdir -p``; returns the directories it created, deepest first."""
    missing = []
    d = directory
    while not d.exists():
        missing.append(d)
        d = d.parent
    directory.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(created: list[Path]) -> None:
    for d in created:
        try:
            d.rmdir()
        except OSError:
            return  # not empty: the command wrote its outputs there


def _acquire(lock_path: Path, command: str) -> int:
    """Lock ``lock_path`` without waiting; a holder makes this a ``UsageError`` naming its pid."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UsageError(
                f"{lock_path.parent} is in use by another prunekit process ({holder}); "
                "wait for it to finish or choose another output"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder unlinked it between our open and lock: try the new file
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}: {command}\n".encode())
    return fd


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "pid unknown"


def is_main_process() -> bool:
    """False in the non-zero ranks of a torchrun job, which leave writing and locking to rank 0."""
    return int(os.environ.get("RANK", "0")) == 0


def cache_dir() -> Path:
    """``$PRUNEKIT_CACHE``, else ``$XDG_CACHE_HOME/prunekit``, else ``~/.cache/prunekit``."""
    if os.environ.get("PRUNEKIT_CACHE"):
        return Path(os.environ["PRUNEKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "prunekit"
