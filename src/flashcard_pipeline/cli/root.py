"""The root command group: the Typer app every command module registers on, ``--version``.

It imports no command module, so command modules can import it without a cycle; ``cli/app.py`` imports them all.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from flashcard_pipeline import __version__
from flashcard_pipeline.cli.output import OneLineErrors

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


@app.callback()
def root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                               help="Print the version and exit.")] = False) -> None:
    """Turn vocabulary lists into rich, AI-generated flashcards."""
