"""Options shared by several commands: ``--db`` and ``--json`` of the read-only commands, and those of commands
that build stage requests (``process``, ``cache warm``), which must address a request the same way, or their
cache keys would differ."""

from __future__ import annotations

from typing import Annotated

import typer

ParamOption = Annotated[list[str] | None, typer.Option(
    "--param", metavar="KEY=VALUE", help="Another request body field the provider takes (repeatable; VALUE is "
    "JSON when it parses, else text): reasoning_effort=low, top_p=0.9, seed=7. Part of the run and cache keys.")]
ModelKindOption = Annotated[str | None, typer.Option(
    "--model-kind", metavar="auto|chat|reasoning", help="How to address the model: reasoning models get "
    "max_completion_tokens and no temperature (default: FLASHCARD_MODEL_KIND, else auto: from its name).")]

DbOption = Annotated[str | None, typer.Option(
    "--db", metavar="URL", help="Database URL or SQLite file (default: FLASHCARD_DATABASE_URL, else the config file, "
    "else ~/.local/share/flashcard-pipeline/flashcards.db).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
