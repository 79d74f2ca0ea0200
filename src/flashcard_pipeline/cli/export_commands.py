"""``export`` and ``push``: stored results to a file or into a running Anki, without any API call."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from flashcard_pipeline.choices import AudioEngine, ExportFormat, Subdecks
from flashcard_pipeline.cli.app import app
from flashcard_pipeline.cli.options import DbOption
from flashcard_pipeline.cli.output import ExitCode, fail, stderr_console

if TYPE_CHECKING:
    from flashcard_pipeline.storage.ledger import Ledger, RunRecord

#: AnkiConnect's own default address (``flashcard_pipeline.export.ankiconnect.DEFAULT_URL``, which loads httpx).
ANKICONNECT_URL = "http://127.0.0.1:8765"

RunOption = Annotated[int | None, typer.Option("--run", metavar="ID", help="Run id (default: the newest run).",
                                               min=1)]
DeckOption = Annotated[str | None, typer.Option(metavar="NAME", help="Anki deck name (default: '<Language> "
                                                                     "vocabulary').")]
SubdecksOption = Annotated[Subdecks, typer.Option(help="Sub-decks by part of speech or by the input's level "
                                                       "column.")]
AudioOption = Annotated[AudioEngine | None, typer.Option(help="Pronunciation audio per term (needs espeak-ng).")]


def _select_run(ledger: Ledger, run_id: int | None) -> RunRecord:
    """The run to export, or a one-line exit: 2 when there is none, 1 when it has nothing finished."""
    run = ledger.get_run(run_id)
    if run is None:
        if run_id is not None:
            raise fail(f"there is no run {run_id} in the database", ExitCode.USAGE)
        raise fail("the database has no runs yet; run `flashcard-pipeline process` first", ExitCode.USAGE)
    summary = ledger.summary(run.id)
    if summary.done == 0:
        raise fail(f"run {run.id} has no finished items to export ({summary.failed} failed, "
                    f"{summary.pending} pending); run `process` again to finish it", ExitCode.FAILED_ITEMS)
    unfinished = summary.total - summary.done
    if unfinished:
        stderr_console().print(f"[yellow]note:[/] run {run.id} has {unfinished} unfinished items; only the "
                               f"{summary.done} finished ones are exported", highlight=False)
    return run


@app.command("export")
def export_command(
    output: Annotated[Path, typer.Option("--output", "-o", metavar="FILE",
                                         help="Where to write (the extension picks the format).")],
    run_id: RunOption = None,
    format: Annotated[ExportFormat | None, typer.Option(
        "--format", case_sensitive=False, help="Deck format (default: from the -o extension).")] = None,
    deck_name: DeckOption = None,
    subdecks: SubdecksOption = Subdecks.NONE,
    audio: AudioOption = None,
    db: DbOption = None,
) -> None:
    """Write a stored run's cards to .apkg, Anki text (TSV), CSV or JSONL; makes no API call."""
    from rich.console import Console

    from flashcard_pipeline.export import check_writable, resolve_format, write_export
    from flashcard_pipeline.storage.db import open_database
    from flashcard_pipeline.storage.ledger import Ledger

    err = stderr_console()
    chosen = resolve_format(format.value if format else None, output)
    check_writable(output)
    engine = open_database(db, must_exist=True)
    try:
        ledger = Ledger(engine)
        run = _select_run(ledger, run_id)
        report = write_export(chosen, ledger.results(run.id), output, deck_name=deck_name, subdecks=subdecks,
                              language=run.target_language, simulated=run.simulated,
                              audio=audio.value if audio else None)
    except OSError as exc:
        raise fail(f"cannot write {output}: {exc.strerror or exc}", ExitCode.USAGE) from None
    finally:
        engine.dispose()
    for warning in report.warnings:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)
    deck = f" (deck {report.deck!r})" if report.deck else ""
    audio_note = f", {report.audio_files} audio files" if report.audio_files else ""
    Console(soft_wrap=True).print(f"wrote {report.cards} cards for {report.terms} terms from run {run.id} to "
                                  f"{report.path}{deck}{audio_note}", highlight=False, markup=False)


@app.command("push")
def push_command(
    run_id: RunOption = None,
    deck_name: DeckOption = None,
    subdecks: SubdecksOption = Subdecks.NONE,
    audio: AudioOption = None,
    url: Annotated[str, typer.Option(metavar="URL", help="AnkiConnect address.")] = ANKICONNECT_URL,
    key: Annotated[str | None, typer.Option(metavar="KEY", help="AnkiConnect API key, if one is set in its config.",
                                            show_default=False)] = None,
    update: Annotated[bool, typer.Option(
        "--update/--no-update", help="Rewrite notes already in the deck whose content changed (review history "
        "is kept); --no-update only adds.")] = True,
    db: DbOption = None,
) -> None:
    """Send a stored run's cards to a running Anki through AnkiConnect (creates the deck and note type)."""
    from rich.console import Console

    from flashcard_pipeline.export import push_results
    from flashcard_pipeline.export.ankiconnect import AnkiConnect, AnkiConnectError
    from flashcard_pipeline.storage.db import open_database
    from flashcard_pipeline.storage.ledger import Ledger

    err = stderr_console()
    engine = open_database(db, must_exist=True)
    try:
        ledger = Ledger(engine)
        run = _select_run(ledger, run_id)
        with AnkiConnect(url, key=key) as client:
            report, warnings = push_results(ledger.results(run.id), client, language=run.target_language,
                                            deck=deck_name, subdecks=subdecks, simulated=run.simulated,
                                            audio=audio.value if audio else None, update=update)
    except AnkiConnectError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    finally:
        engine.dispose()
    for warning in warnings:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)
    created = "; created the note type" if report.created_note_type else ""
    updated = f"{report.updated} updated, " if update else ""
    Console(soft_wrap=True).print(
        f"pushed run {run.id} to {report.decks[0]!r}: {report.added} notes added, {updated}"
        f"{report.already_present} were already there{created}", highlight=False, markup=False)
    if report.failed:
        raise fail(f"{report.failed} notes could not be added or updated (see Anki for details)",
                   ExitCode.FAILED_ITEMS)
