"""Exit codes and the one-line error every command ends with on bad input."""

from __future__ import annotations

from enum import IntEnum

import typer
from rich.console import Console


class ExitCode(IntEnum):
    OK = 0
    FAILED_ITEMS = 1
    USAGE = 2
    ABORTED = 3
    INTERRUPTED = 130


def stderr_console() -> Console:
    """Soft wrap keeps a long message on one line, so logs and grep see it whole."""
    return Console(stderr=True, soft_wrap=True)


def fail(message: str, code: ExitCode = ExitCode.USAGE) -> typer.Exit:
    """Print ``error: message`` on stderr; the caller raises the returned Exit."""
    stderr_console().print(f"[red]error:[/] {message}", highlight=False)
    return typer.Exit(int(code))
