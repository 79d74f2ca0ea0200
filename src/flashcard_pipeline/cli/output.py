"""Exit codes and the one-line error every command ends with on bad input."""

from __future__ import annotations

from enum import IntEnum
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from flashcard_pipeline.cli.fast_params import PlainFirstGroup
from flashcard_pipeline.errors import ConfigurationError, InputError


class ExitCode(IntEnum):
    OK = 0
    FAILED_ITEMS = 1
    USAGE = 2
    ABORTED = 3
    INTERRUPTED = 130


def command_group(help: str) -> typer.Typer:
    """A group of subcommands whose ``--help`` is plain text (option, value name, what it does), without the
    ``<str>`` and ``<bool>`` type columns of Typer's boxed help."""
    return typer.Typer(help=help, no_args_is_help=True, rich_markup_mode=None, cls=PlainFirstGroup)


def stderr_console() -> Console:
    """Soft wrap keeps a long message on one line, so logs and grep see it whole."""
    return Console(stderr=True, soft_wrap=True)


def money(cost: float, *, simulated: bool, model: str | None = None) -> str:
    """A run's cost as a user must read it: a simulated run spent nothing, its figure is what the named model
    would have cost."""
    if not simulated:
        return f"${cost:.4f}"
    if model is None:
        return f"${cost:.4f} est. (simulated: no money spent)"
    return f"${cost:.4f} est., what {model} would have cost (simulated: no money spent)"


def duration(seconds: float) -> str:
    """42 -> '42 s', 192 -> '3 min 12 s', 7500 -> '2 h 5 min', 200000 -> '2 d 7 h'."""
    seconds = max(0, round(seconds))
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size} {unit}")
            seconds %= size
    return " ".join(parts[:2])


def label_grid(rows: list[tuple[str, str]]) -> Any:
    """Label/value rows whose values wrap at any width under their own column (values are text, not markup)."""
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    for label, value in rows:
        grid.add_row(label, Text(value))
    return grid


def fail(message: str, code: ExitCode = ExitCode.USAGE) -> typer.Exit:
    """Print ``error: message`` on stderr; the caller raises the returned Exit."""
    stderr_console().print(f"[red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(int(code))


def warning(message: str, console: Console | None = None) -> None:
    """``warning: message`` on stderr (the message is text: a ``[section]`` in it is not markup)."""
    (console or stderr_console()).print(f"[yellow]warning:[/] {escape(message)}", highlight=False)


#: Where the root command group keeps the whole command line (``ctx.meta``).
ARGS_KEY = "flashcard_pipeline.args"

#: click's UsageError (a bad option value, an unknown command), which newer typer vendors without a public name.
_USAGE_ERROR: type[Exception] = typer.BadParameter.__bases__[0]


class OneLineErrors(PlainFirstGroup):
    """The root command group: a bad option value, or a bad setting or input found deep inside any command (an
    ``RL_*`` variable read when the limiter starts, say), ends as one ``error:`` line and exit code 2, not a
    traceback or a framed box."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        ctx.meta[ARGS_KEY] = tuple(args)  # the root callback skips logging set-up for `COMMAND --help`
        try:
            return super().parse_args(ctx, args)
        except _USAGE_ERROR as exc:  # an unknown option before the command: `flashcard-pipeline --bogus`
            raise _one_line(exc, ctx) from None

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (ConfigurationError, InputError) as exc:
            raise fail(str(exc)) from None
        except _USAGE_ERROR as exc:
            raise _one_line(exc, ctx) from None


def _one_line(exc: Exception, ctx: Any) -> Exception:
    """``error: <what> (see `<command> --help`)``; a group called without a command shows its help as before."""
    if type(exc).__name__ == "NoArgsIsHelpError":  # a bare group: its help, on stdout like `--help`'s
        typer.echo(exc.format_message())  # type: ignore[attr-defined]
        return typer.Exit(int(ExitCode.USAGE))
    where = getattr(getattr(exc, "ctx", None), "command_path", None) or ctx.command_path
    message = exc.format_message().replace("Value error, ", "")  # type: ignore[attr-defined]
    return fail(f"{message} (see `{where} --help`)")
