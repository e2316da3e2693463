"""A resumed run keeps the settings it was started with: a request that asks for others is refused in
one line that names each of them, never ignored."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import UsageError, arg


def _same(recorded: Any, requested: Any) -> bool:
    if isinstance(recorded, bool) or isinstance(requested, bool):
        return recorded is requested or recorded == requested
    if isinstance(recorded, (int, float)) and isinstance(requested, (int, float)):
        return float(recorded) == float(requested)
    if isinstance(recorded, (list, tuple)) and isinstance(requested, (list, tuple)):
        return len(recorded) == len(requested) and all(map(_same, recorded, requested))
    return str(recorded) == str(requested)


def _shown(value: Any) -> str:
    return "none" if value is None else str(value)


def refuse_changes(
    out: Path, recorded: Mapping[str, Any], requested: Mapping[str, Any], new_run: str | None = None
) -> None:
    """Raise when ``requested`` (the settings the caller asked for; None: not asked) differs from what the
    run in ``out`` recorded; a setting the run does not record cannot be changed either. ``new_run`` says
    how to start a new run instead (default: ``--overwrite`` or another ``--out``)."""
    changed = [
        (key, recorded.get(key), value)
        for key, value in requested.items()
        if value is not None and (key not in recorded or not _same(recorded[key], value))
    ]
    if not changed:
        return
    asked = ", ".join(f"{arg(k)} {_shown(new)} (recorded: {_shown(old)})" for k, old, new in changed)
    new_run = new_run or f"{arg('overwrite')} or another {arg('out')}"
    raise UsageError(
        f"{arg('resume')}: the run in {out} continues with the settings it started with, but this asks for "
        f"{asked}; drop {'that flag' if len(changed) == 1 else 'those flags'} to continue it, or start a new "
        f"run with {new_run}"
    )
