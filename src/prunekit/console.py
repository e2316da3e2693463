"""Shared rich console and progress bars (on stderr, so stdout stays parseable)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# Logs and pipes get a wide fixed width so the torchinfo and report tables do not wrap.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


def progress_bar(transient: bool = True, quiet: bool = False) -> Progress:
    """A progress bar with a free-text field for live metrics (loss, accuracy, images/s); ``quiet``: none
    shown (work inside another bar's step: rich before 14 refuses two live displays at once)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=transient,
        disable=quiet or not console.is_terminal,
    )


@contextlib.contextmanager
def stages() -> Iterator[Callable[[str, int], Callable[[], None]]]:
    """One progress display for a command's stages: ``stage(description, total)`` adds a line and returns
    the function that advances it by one step."""
    with progress_bar() as bar:

        def stage(description: str, total: int) -> Callable[[], None]:
            task = bar.add_task(description, total=total, info="")
            return lambda: bar.advance(task)

        yield stage


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/] {message}", highlight=False)


def renamed_keyword(function: str, old: str, new: str, old_value, new_value):
    """The value of keyword ``new``, or of its deprecated name ``old`` where that was given (with a
    warning): a keyword renamed keeps its old name for one release."""
    if old_value is None:
        return new_value
    warn(f"{function}({old}=) is deprecated: it is {new}= now")
    return old_value


def info(message: str) -> None:
    console.print(message, highlight=False)


def note(message: str | None) -> None:
    """``message`` as one ``note:`` line, however wide the terminal; nothing for None or empty."""
    if message:
        console.print(f"note: {message}", highlight=False, soft_wrap=True)
