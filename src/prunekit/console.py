"""Shared rich console and progress bars (on stderr, so stdout stays parseable)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def progress_bar(transient: bool = True) -> Progress:
    """A progress bar with a free-text field for live metrics (loss, accuracy, images/s)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=transient,
        disable=not console.is_terminal,
    )


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/] {message}", highlight=False)


def info(message: str) -> None:
    console.print(message, highlight=False)
