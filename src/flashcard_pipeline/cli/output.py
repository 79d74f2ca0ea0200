"""Exit codes and the one-line error every command ends with on bad input."""

from __future__ import annotations

from enum import IntEnum
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from flashcard_pipeline.errors import ConfigurationError, InputError


class ExitCode(IntEnum):
    OK = 0
    FAILED_ITEMS = 1
    USAGE = 2
    ABORTED = 3
    INTERRUPTED = 130


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


def fail(message: str, code: ExitCode = ExitCode.USAGE) -> typer.Exit:
    """Print ``error: message`` on stderr; the caller raises the returned Exit."""
    stderr_console().print(f"[red]error:[/] {escape(message)}", highlight=False)  # "[telemetry]" is no style
    return typer.Exit(int(code))


#: click's UsageError (a bad option value, an unknown command), which newer typer vendors without a public name.
_USAGE_ERROR: type[Exception] = typer.BadParameter.__bases__[0]


class OneLineErrors(TyperGroup):
    """The root command group: a bad option value, or a bad setting or input found deep inside any command (an
    ``RL_*`` variable read when the limiter starts, say), ends as one ``error:`` line and exit code 2, not a
    traceback or a framed box."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
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
    if type(exc).__name__ == "NoArgsIsHelpError":  # the help is already printed; nothing went wrong
        return exc
    where = getattr(getattr(exc, "ctx", None), "command_path", None) or ctx.command_path
    message = exc.format_message().replace("Value error, ", "")  # type: ignore[attr-defined]
    return fail(f"{message} (see `{where} --help`)")
