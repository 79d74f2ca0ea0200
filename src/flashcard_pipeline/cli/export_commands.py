"""``export`` and ``push``: stored results to a file or into a running Anki, without any API call."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from flashcard_pipeline.choices import AudioEngine, ExportFormat, Subdecks
from flashcard_pipeline.cli.options import DbOption
from flashcard_pipeline.cli.output import ExitCode, fail, stderr_console, warning
from flashcard_pipeline.cli.root import app

if TYPE_CHECKING:
    from flashcard_pipeline.export import SpeechSettings
    from flashcard_pipeline.storage.ledger import Ledger, RunRecord

#: AnkiConnect's own default address (``flashcard_pipeline.export.ankiconnect.DEFAULT_URL``, which loads httpx).
ANKICONNECT_URL = "http://127.0.0.1:8765"

RunOption = Annotated[int | None, typer.Option("--run", metavar="ID", help="Run id (default: the newest run).",
                                               min=1)]
DeckOption = Annotated[str | None, typer.Option(metavar="NAME", help="Anki deck name (default: '<Language> "
                                                                     "vocabulary').")]
SubdecksOption = Annotated[Subdecks, typer.Option(help="Sub-decks by part of speech or by the input's level "
                                                       "column.")]
AudioOption = Annotated[AudioEngine | None, typer.Option(
    help="Pronunciation audio (MP3) of each word and example sentence: espeak (offline, needs espeak-ng) or openai "
         "(an OpenAI-compatible /audio/speech endpoint: --tts-url, key from OPENAI_API_KEY; a simulated run's "
         "simulator answers it).")]
TtsUrlOption = Annotated[str | None, typer.Option(
    "--tts-url", metavar="URL", help="Base URL of the speech endpoint for --audio openai (default: "
                                     "OPENAI_BASE_URL, else https://api.openai.com/v1).")]
OPENAI_URL = "https://api.openai.com/v1"
T = TypeVar("T")


def _with_speech(run: RunRecord, ledger: Ledger, audio: AudioEngine | None, tts_url: str | None,
                 work: Callable[[SpeechSettings], T]) -> T:
    """Run ``work`` with the speech settings of ``--audio``: clips cached and billed in the run's ledger; for
    ``openai`` the endpoint of ``--tts-url``, or for a simulated run a simulator serving the export."""
    from flashcard_pipeline.export import AudioStore, SpeechSettings

    store = AudioStore(ledger, run.id)
    if audio is not AudioEngine.OPENAI:
        return work(SpeechSettings(store=store))
    if run.simulated:
        import asyncio

        from flashcard_pipeline.simulator import run_simulator

        async def simulated() -> T:
            async with run_simulator() as simulator:
                return await asyncio.to_thread(work, SpeechSettings(base_url=simulator.base_url,
                                                                    provider="simulated", store=store))
        return asyncio.run(simulated())
    url = tts_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_URL
    return work(SpeechSettings(base_url=url, api_key=os.environ.get("OPENAI_API_KEY"), store=store))


@contextlib.contextmanager
def _ledger(db: str | None) -> Iterator[Ledger]:
    from flashcard_pipeline.storage.db import open_database
    from flashcard_pipeline.storage.ledger import Ledger

    engine = open_database(db, must_exist=True)
    try:
        yield Ledger(engine)
    finally:
        engine.dispose()


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
    tts_url: TtsUrlOption = None,
    flagged: Annotated[bool, typer.Option("--flagged", help="Only the items kept for review (their answers failed "
                                                            "content checks after a re-ask).")] = False,
    db: DbOption = None,
) -> None:
    """Write a stored run's cards to .apkg, Anki text (TSV), CSV or JSONL; makes no API call."""
    from rich.console import Console

    from flashcard_pipeline.export import check_writable, resolve_format, write_export

    err = stderr_console()
    chosen = resolve_format(format.value if format else None, output)
    check_writable(output)
    try:
        with _ledger(db) as ledger:
            run = _select_run(ledger, run_id)
            results = ledger.results(run.id)
            if flagged:
                if not ledger.flagged(run.id):
                    Console(soft_wrap=True).print(f"run {run.id} has no items flagged for review; nothing written",
                                                  highlight=False, markup=False)
                    return
                results = (result for result in results if result.flags)
            report = _with_speech(run, ledger, audio, tts_url, lambda speech: write_export(
                chosen, results, output, deck_name=deck_name, subdecks=subdecks, language=run.target_language,
                simulated=run.simulated, audio=audio.value if audio else None,
                source=Path(run.input_path).stem or None, speech=speech))
    except OSError as exc:
        raise fail(f"cannot write {output}: {exc.strerror or exc}", ExitCode.USAGE) from None
    for text in report.warnings:
        warning(text, err)
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
    tts_url: TtsUrlOption = None,
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

    err = stderr_console()
    try:
        with _ledger(db) as ledger, AnkiConnect(url, key=key) as client:
            run = _select_run(ledger, run_id)
            report, warnings = _with_speech(run, ledger, audio, tts_url, lambda speech: push_results(
                ledger.results(run.id), client, language=run.target_language, deck=deck_name, subdecks=subdecks,
                simulated=run.simulated, audio=audio.value if audio else None, update=update,
                source=Path(run.input_path).stem or None, speech=speech))
    except AnkiConnectError as exc:
        raise fail(str(exc), ExitCode.USAGE) from None
    for text in warnings:
        warning(text, err)
    created = "; created the note type" if report.created_note_type else ""
    updated = f"{report.updated} updated, " if update else ""
    Console(soft_wrap=True).print(
        f"pushed run {run.id} to {report.decks[0]!r}: {report.added} notes added, {updated}"
        f"{report.already_present} were already there{created}", highlight=False, markup=False)
    if report.failed:
        raise fail(f"{report.failed} notes could not be added or updated (see Anki for details)",
                   ExitCode.FAILED_ITEMS)
