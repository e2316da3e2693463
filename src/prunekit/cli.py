"""Command line: argument parsing, exit codes and human messages; the work happens in the other modules."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from rich.markup import escape

from .console import console
from .errors import UsageError, cli_arg_style
from .options import add_flags

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 1


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one ``error:`` line (flag, problem, where to look) instead of a usage dump;
    and no abbreviated flags, so the flags a user wrote can be told from the defaults (``given_options``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        match = re.match(r"argument ([^:]+): (.*)", message)
        if match:  # "argument --epochs: must be ..." -> "--epochs must be ..."
            flag = match.group(1).split("/")[0]
            message = f"{flag} {match.group(2)}"
        console.print(
            f"[bold red]error:[/] {message} (see {self.prog} --help)", highlight=False, soft_wrap=True
        )
        raise SystemExit(EXIT_USAGE)


# The commands, in the order --help lists them: each module of prunekit.commands declares its COMMAND.
COMMANDS = ("train", "evaluate", "prune", "export", "sensitivity", "quantize", "finetune", "run", "models")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command, generated from each one's declared flags (``options.add_flags``)."""
    parser = Parser(prog="prunekit", description=__doc__)
    parser.add_argument("--version", action="version", version=f"prunekit {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        command = importlib.import_module(f"{__package__}.commands.{module}").COMMAND
        suppress = {"argument_default": argparse.SUPPRESS} if command.suppress_defaults else {}
        p = sub.add_parser(command.name, help=command.help, **suppress)
        add_flags(p, command)
        p.set_defaults(func=command.main)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage and its one error line (or --help)
        return int(exc.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    args.given, args.defaulted = given_options(
        parser, args.command, list(sys.argv[1:] if argv is None else argv)
    )
    try:
        with cli_arg_style():
            from .measure import latency_repeats

            latency_repeats()  # a bad $PRUNEKIT_LATENCY_REPEATS is refused before any work, not after it
            return int(args.func(args) or 0)
    except UsageError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return EXIT_INTERRUPTED
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRORS:
            # A full disk or a read-only folder is the user's to fix: one line naming the path, no traceback.
            where = f"{exc.filename}: " if exc.filename else ""
            console.print(
                f"[bold red]error:[/] cannot write {escape(where)}{exc.strerror}",
                highlight=False,
                soft_wrap=True,
            )
            return EXIT_USAGE
        # A bug of ours, not the user's: one line here, the traceback in a log.
        log = _write_crash_log(argv)
        console.print(
            f"[bold red]error:[/] internal error, please report it: {type(exc).__name__}: "
            f"{escape(' '.join(str(exc).split())[:300])} (traceback in {log})",
            highlight=False,
            soft_wrap=True,
        )
        return EXIT_INTERNAL


def given_options(
    parser: argparse.ArgumentParser, command: str, argv: list[str]
) -> tuple[set[str], set[str]]:
    """The options (destinations) written on the command line, and those left at their defaults: what a
    resumed run compares with its record."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    given, options = set(), set()
    for action in sub._actions:
        for flag in action.option_strings:
            options.add(action.dest)
            if any(token == flag or token.startswith(flag + "=") for token in argv):
                given.add(action.dest)
    return given, options - given


def _write_crash_log(argv: Sequence[str] | None) -> Path:
    """Save the current exception's traceback with the command line; returns the log's path."""
    import datetime as dt
    import traceback

    from .files import cache_dir

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = cache_dir() / "logs" / f"crash-{stamp}-{os.getpid()}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            f"prunekit {' '.join(map(str, argv if argv is not None else sys.argv[1:]))}\n\n{traceback.format_exc()}"
        )
    except OSError:
        path = Path("(could not write a log)")
    return path


WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


if __name__ == "__main__":
    sys.exit(main())
