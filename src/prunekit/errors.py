"""The one exception type for mistakes a user can fix, and how an option is named in its message."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_ARG_STYLE: ContextVar[str] = ContextVar("prunekit_arg_style", default="python")
CLI_FLAGS = {"layers": "--layer", "example_inputs": "--image-size"}  # where the flag is not the option's name


class UsageError(Exception):
    """Bad input from the user (a path, a name, a number); the message says what to do instead."""


def arg(name: str) -> str:
    """Option ``name`` (``target_macs``) as the user wrote it: ``--target-macs`` in the CLI, ``target_macs`` in Python."""
    if _ARG_STYLE.get() != "cli":
        return name
    return CLI_FLAGS.get(name, "--" + name.replace("_", "-"))


def arg_values(name: str, values: list[str]) -> str:
    """A list-valued option as the user would write it: ``--ignore a --ignore b`` or ``ignore=['a', 'b']``."""
    if _ARG_STYLE.get() == "cli":
        return " ".join(f"{arg(name)} {v}" for v in values)
    return f"{name}={list(values)!r}"


@contextmanager
def cli_arg_style() -> Iterator[None]:
    """Within this block, error messages name options as command-line flags."""
    token = _ARG_STYLE.set("cli")
    try:
        yield
    finally:
        _ARG_STYLE.reset(token)
