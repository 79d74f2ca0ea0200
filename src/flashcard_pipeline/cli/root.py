"""The root command group: the Typer app every command module registers on, ``--version``.

It imports no command module, so command modules can import it without a cycle; ``cli/app.py`` imports them all.
"""

from __future__ import annotations

import sys
from enum import StrEnum
from typing import Annotated

import typer

from flashcard_pipeline import __version__
from flashcard_pipeline.cli.output import ARGS_KEY, OneLineErrors

# Commands import what they use when they run: `--help`, `--version` and the status commands start without
# loading httpx, aiohttp, genanki or Alembic (benchmarks/bench_startup.py).
app = typer.Typer(
    name="flashcard-pipeline",
    help="Turn vocabulary lists into rich, AI-generated flashcards.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    cls=OneLineErrors,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"flashcard-pipeline {__version__} (Python {sys.version.split()[0]})")
        raise typer.Exit()


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


@app.callback()
def root(ctx: typer.Context,
         version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                               help="Print the version and exit.")] = False,
         verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, show_default=False,
                                              help="More log lines on stderr: -v INFO (retries, recoveries), -vv "
                                                   "DEBUG (every call).")] = 0,
         quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr's log.")] = False,
         log_level: Annotated[str | None, typer.Option("--log-level", metavar="LEVEL",
                                                       help="Log level on stderr: DEBUG, INFO, WARNING, ERROR "
                                                            "(default: LOG_LEVEL, else WARNING).")] = None,
         log_format: Annotated[LogFormat | None, typer.Option("--log-format", case_sensitive=False,
                                                              help="Log lines on stderr as text or as one JSON "
                                                                   "object each (default: LOG_FORMAT, else "
                                                                   "text).")] = None,
         ) -> None:
    """Turn vocabulary lists into rich, AI-generated flashcards."""
    if "--help" in ctx.meta.get(ARGS_KEY, ()):
        return  # help only: no settings read, nothing heavy imported
    from flashcard_pipeline import quick_settings
    from flashcard_pipeline.errors import ConfigurationError
    from flashcard_pipeline.logging_config import LogOptions, logging_configured

    verbosity = -1 if quiet and not verbose else min(verbose, 2)
    chosen_format = log_format.value if log_format else None
    try:
        if (quick := quick_settings.read()) is not None:  # the status commands start without pydantic-settings
            options = quick_settings.log_options(quick, level=log_level, format=chosen_format, verbosity=verbosity)
        else:
            from flashcard_pipeline.config import log_options

            options = log_options(level=log_level, format=chosen_format, verbosity=verbosity)
    except ConfigurationError:
        if ctx.invoked_subcommand != "config" or log_level is not None:
            raise
        options = LogOptions()  # `config validate` and `config show` report the bad LOG_* setting themselves
    ctx.with_resource(logging_configured(options))
