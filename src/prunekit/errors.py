"""The one exception type for mistakes a user can fix, and how an option is named in its message."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_ARG_STYLE: ContextVar[str] = ContextVar("prunekit_arg_style", default="python")


class UsageError(Exception):
    """Bad input from the user (a path, a name, a number); the message says what to do instead."""


def arg(name: str) -> str:
    """Option ``name`` (``target_macs``) as the user wrote it: ``--target-macs`` in the CLI, ``target_macs`` in Python."""
    return "--" + name.replace("_", "-") if _ARG_STYLE.get() == "cli" else name


@contextmanager
def cli_arg_style() -> Iterator[None]:
    """Within this block, error messages name options as command-line flags."""
    token = _ARG_STYLE.set("cli")
    try:
        yield
    finally:
        _ARG_STYLE.reset(token)
