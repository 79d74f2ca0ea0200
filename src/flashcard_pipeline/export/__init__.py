"""Exports: stored results to .apkg, Anki text (TSV), spreadsheet CSV or JSONL, or straight into Anki.

:func:`write_export` is the one entry point for files (``process`` and ``export`` both use it);
:func:`push_results` sends the same notes through AnkiConnect.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from flashcard_pipeline.choices import ExportFormat
from flashcard_pipeline.errors import ConfigurationError
from flashcard_pipeline.export.anki_model import NoteType, note_type
from flashcard_pipeline.export.anki_tsv import write_anki_tsv
from flashcard_pipeline.export.ankiconnect import AnkiConnect, PushReport, push_notes
from flashcard_pipeline.export.apkg import write_apkg
from flashcard_pipeline.export.audio import (
    DEFAULT_SPEECH_MODEL,
    DEFAULT_VOICE,
    AudioEngine,
    AudioReport,
    AudioStore,
    EspeakSpeech,
    OpenAISpeech,
    SpeechError,
    SpeechProvider,
    synthesize,
)
from flashcard_pipeline.export.common import check_writable
from flashcard_pipeline.export.csv_export import write_csv
from flashcard_pipeline.export.jsonl import write_jsonl
from flashcard_pipeline.export.notes import AnkiNote, Subdecks, build_notes, resolve_deck_name
from flashcard_pipeline.models import TermResult

FORMATS = tuple(f.value for f in ExportFormat)
_BY_EXTENSION = {"apkg": "apkg", "tsv": "tsv", "txt": "tsv", "csv": "csv", "jsonl": "jsonl"}
_WITH_AUDIO = ("apkg",)

__all__ = ["FORMATS", "AudioEngine", "AudioStore", "ExportReport", "PreparedDeck", "SpeechSettings", "Subdecks",
           "check_options", "check_writable", "prepare_deck",
           "push_results", "resolve_format", "write_export"]


def resolve_format(explicit: str | None, output: Path | None) -> str:
    """``--format`` if given, else from the output's extension (``.txt`` is Anki's text format), else jsonl."""
    if explicit:
        chosen = explicit.strip().lower().lstrip(".")
        if chosen not in FORMATS:
            raise ConfigurationError(f"unknown export format {chosen!r}; choose one of: {', '.join(FORMATS)}")
        return chosen
    suffix = output.suffix.lower().lstrip(".") if output is not None else ""
    if not suffix:
        return "jsonl"
    if suffix not in _BY_EXTENSION:
        raise ConfigurationError(f"unknown export format {suffix!r} (from {output}); use --format with one of: "
                                 f"{', '.join(FORMATS)}")
    return _BY_EXTENSION[suffix]


def check_options(subdecks: str, audio: str | None) -> tuple[Subdecks, AudioEngine | None]:
    try:
        mode = Subdecks(subdecks)
    except ValueError:
        raise ConfigurationError(f"unknown --subdecks {subdecks!r}; choose one of: "
                                 f"{', '.join(m.value for m in Subdecks)}") from None
    try:
        engine = AudioEngine(audio) if audio else None
    except ValueError:
        raise ConfigurationError(f"unknown --audio {audio!r}; choose: "
                                 f"{', '.join(e.value for e in AudioEngine)}") from None
    return mode, engine


#: Anki's text import matches the note type by name and cannot create it: without it, the rows land in "Basic".
TSV_NEEDS_NOTE_TYPE = ("Anki needs the note type {name!r} before this text file: import an .apkg made by "
                       "flashcard-pipeline once (or run `flashcard-pipeline push`), then import the file")


@dataclass(frozen=True)
class SpeechSettings:
    """Where ``--audio openai`` sends its text (an OpenAI-compatible base URL and its key), and where clips are
    cached and their cost recorded (``store``: the run's ledger)."""

    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    provider: str = "openai"
    model: str = DEFAULT_SPEECH_MODEL
    voice: str = DEFAULT_VOICE
    store: AudioStore | None = None


def speech_provider(engine: AudioEngine, language: str, settings: SpeechSettings | None) -> SpeechProvider:
    """The text-to-speech provider for ``engine``; :class:`SpeechError` (one line) when it cannot work here."""
    if engine is AudioEngine.ESPEAK:
        return EspeakSpeech(language)
    if settings is None or not settings.base_url:
        raise SpeechError("--audio openai needs an OpenAI-compatible speech endpoint (a base URL)")
    return OpenAISpeech(settings.base_url, settings.api_key, model=settings.model, voice=settings.voice,
                        provider=settings.provider)


def _speak(results: list[TermResult], language: str, engine: AudioEngine, settings: SpeechSettings | None,
           directory: Path) -> AudioReport:
    """The word and its example sentence, spoken."""
    try:
        provider = speech_provider(engine, language, settings)
    except SpeechError as exc:
        return AudioReport(warning=str(exc))
    texts = [text for r in results for text in (r.item.term, r.analysis.example.sentence if r.analysis.example
                                                else "")]
    try:
        return synthesize(texts, provider=provider, directory=directory,
                          store=settings.store if settings is not None else None)
    finally:
        if isinstance(provider, OpenAISpeech):
            provider.close()


@dataclass(frozen=True)
class ExportReport:
    format: str
    path: Path
    cards: int
    terms: int
    deck: str | None
    decks: tuple[str, ...] = ()
    audio_files: int = 0
    warnings: tuple[str, ...] = ()


class _Counted:
    """Counts the terms of a streamed export as the writer consumes them."""

    def __init__(self, results: Iterable[TermResult]) -> None:
        self._results = results
        self.count = 0

    def __iter__(self) -> Iterator[TermResult]:
        for result in self._results:
            self.count += 1
            yield result


class _Notes:
    """A deck's notes, built only as a writer takes them (once), so an export never holds the whole list; counts
    the terms, cards and decks that went by."""

    def __init__(self, results: Iterable[TermResult], root_deck: str,
                 build: Callable[[Iterable[TermResult]], Iterator[AnkiNote]]) -> None:
        self._results = _Counted(results)
        self._build = build
        self.cards = 0
        self.decks: dict[str, None] = {root_deck: None}

    @property
    def terms(self) -> int:
        return self._results.count

    def __iter__(self) -> Iterator[AnkiNote]:
        for note in self._build(self._results):
            self.cards += len(note.cards)
            self.decks.setdefault(note.deck)
            yield note


@dataclass(frozen=True)
class _StreamedDeck:
    """A deck for one writer: the files route it straight through; push needs the notes twice (a list)."""

    notes: _Notes
    note_type: NoteType
    root_deck: str
    media: dict[str, Path]
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class PreparedDeck:
    """Everything an Anki route needs: the notes, their note type and decks, and the audio files."""

    notes: list[AnkiNote]
    note_type: NoteType
    root_deck: str
    terms: int
    media: dict[str, Path] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    @property
    def decks(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([self.root_deck, *(n.deck for n in self.notes)]))


def _stream_deck(results: Iterable[TermResult], *, language: str, deck: str | None, subdecks: Subdecks | str,
                 simulated: bool, audio: AudioEngine | str | None, media_dir: Path | None, source: str | None,
                 speech: SpeechSettings | None) -> _StreamedDeck:
    """The deck with its notes still to build; with ``audio``, the clips are spoken first (they need every
    word, so the results are read into a list only then)."""
    mode, engine = check_options(str(subdecks), str(audio) if audio else None)
    kind = note_type(language)
    root = resolve_deck_name(deck, language=language, simulated=simulated)
    report = AudioReport()
    if engine is not None:
        if media_dir is None:
            raise ValueError("audio needs a media_dir")
        results = list(results)
        report = _speak(results, language, engine, speech, media_dir)
    sounds = report.media_names()

    def build(terms: Iterable[TermResult]) -> Iterator[AnkiNote]:
        return build_notes(terms, language=language, root_deck=root, subdecks=mode, simulated=simulated,
                           lang=kind.lang, sounds=sounds, source=source)

    return _StreamedDeck(notes=_Notes(results, root, build), note_type=kind, root_deck=root,
                         media={path.name: path for path in report.files.values()},
                         warnings=(report.warning,) if report.warning else ())


def prepare_deck(results: Iterable[TermResult], *, language: str, deck: str | None = None,
                 subdecks: Subdecks | str = Subdecks.NONE, simulated: bool = False,
                 audio: AudioEngine | str | None = None, media_dir: Path | None = None,
                 source: str | None = None, speech: SpeechSettings | None = None) -> PreparedDeck:
    """Build the notes; with ``audio``, speak each word and example sentence into ``media_dir`` (which must
    outlive the deck)."""
    streamed = _stream_deck(results, language=language, deck=deck, subdecks=subdecks, simulated=simulated,
                            audio=audio, media_dir=media_dir, source=source, speech=speech)
    notes = list(streamed.notes)
    return PreparedDeck(notes=notes, note_type=streamed.note_type, root_deck=streamed.root_deck,
                        terms=streamed.notes.terms, media=streamed.media, warnings=streamed.warnings)


def write_export(format: str, results: Iterable[TermResult], path: Path, *, deck_name: str | None = None,
                 subdecks: Subdecks | str = Subdecks.NONE, language: str = "Korean", simulated: bool = False,
                 audio: AudioEngine | str | None = None, timestamp: float | None = None,
                 source: str | None = None, speech: SpeechSettings | None = None) -> ExportReport:
    """Write ``results`` to ``path`` in ``format`` (atomically) and say what was written (for Anki formats,
    ``cards`` counts the cards the notes make)."""
    chosen = resolve_format(format, None)
    mode, engine = check_options(str(subdecks), str(audio) if audio else None)
    warnings: list[str] = []
    if engine is not None and chosen not in _WITH_AUDIO:
        warnings.append(f"--audio is only attached to .apkg decks and to push; the {chosen} export has no audio")
        engine = None

    if chosen == "jsonl":
        counted = _Counted(results)
        cards = write_jsonl(counted, path, simulated=simulated)
        return ExportReport(format=chosen, path=path, cards=cards, terms=counted.count, deck=None,
                            warnings=tuple(warnings))
    if chosen == "csv":
        counted = _Counted(results)
        root = resolve_deck_name(deck_name, language=language, simulated=simulated)
        cards = write_csv(counted, path, root_deck=root, subdecks=mode, simulated=simulated)
        return ExportReport(format=chosen, path=path, cards=cards, terms=counted.count, deck=root,
                            warnings=tuple(warnings))

    with tempfile.TemporaryDirectory(prefix="flashcard-audio-") as media_dir:
        streamed = _stream_deck(results, language=language, deck=deck_name, subdecks=mode, simulated=simulated,
                                audio=engine, media_dir=Path(media_dir), source=source, speech=speech)
        warnings.extend(streamed.warnings)
        if chosen == "apkg":
            write_apkg(streamed.notes, path, note_type=streamed.note_type, root_deck=streamed.root_deck,
                       media=sorted(streamed.media.values()), timestamp=timestamp)
        else:
            write_anki_tsv(streamed.notes, path, note_type=streamed.note_type,
                           root_deck=streamed.root_deck, with_deck_column=mode is not Subdecks.NONE)
            warnings.append(TSV_NEEDS_NOTE_TYPE.format(name=streamed.note_type.name))
    notes = streamed.notes
    return ExportReport(format=chosen, path=path, cards=notes.cards, terms=notes.terms, deck=streamed.root_deck,
                        decks=tuple(notes.decks), audio_files=len(streamed.media), warnings=tuple(warnings))


def push_results(results: Iterable[TermResult], client: AnkiConnect, *, language: str, deck: str | None = None,
                 subdecks: Subdecks | str = Subdecks.NONE, simulated: bool = False,
                 audio: AudioEngine | str | None = None, update: bool = True,
                 source: str | None = None, speech: SpeechSettings | None = None) -> tuple[PushReport, tuple[str, ...]]:
    """Send the notes to Anki (updating changed ones unless ``update`` is off); returns AnkiConnect's report
    and any warnings (e.g. no audio)."""
    with tempfile.TemporaryDirectory(prefix="flashcard-audio-") as media_dir:
        prepared = prepare_deck(results, language=language, deck=deck, subdecks=subdecks, simulated=simulated,
                                audio=audio, media_dir=Path(media_dir), source=source, speech=speech)
        report = push_notes(client, prepared.notes, note_type=prepared.note_type, root_deck=prepared.root_deck,
                            media=prepared.media, update=update)
    return report, prepared.warnings
