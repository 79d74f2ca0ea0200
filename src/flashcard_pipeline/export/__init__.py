"""Exports: stored results to .apkg, Anki text (TSV), spreadsheet CSV or JSONL, or straight into Anki.

:func:`write_export` is the one entry point for files (``process`` and ``export`` both use it);
:func:`push_results` sends the same notes through AnkiConnect.
"""

from __future__ import annotations

import contextlib
import itertools
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
    AudioStore,
    EspeakSpeech,
    OpenAISpeech,
    Speaker,
    SpeechError,
    SpeechProvider,
)
from flashcard_pipeline.export.common import check_writable
from flashcard_pipeline.export.csv_export import write_csv
from flashcard_pipeline.export.jsonl import write_jsonl
from flashcard_pipeline.export.notes import AnkiNote, Subdecks, build_notes, resolve_deck_name
from flashcard_pipeline.models import TermResult

FORMATS = tuple(f.value for f in ExportFormat)
_BY_EXTENSION = {"apkg": "apkg", "tsv": "tsv", "txt": "tsv", "csv": "csv", "jsonl": "jsonl"}
_WITH_AUDIO = ("apkg",)
#: Terms whose audio is made before their notes are built: a chunk's results and clips (two per term) are what
#: an export with audio holds, whatever the list's length.
AUDIO_CHUNK_TERMS = 250

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


def _close(provider: SpeechProvider) -> None:
    if isinstance(provider, OpenAISpeech):
        provider.close()


def _texts(result: TermResult) -> tuple[str, str]:
    """What is spoken for a word: the word and its example sentence."""
    return result.item.term, result.analysis.example.sentence if result.analysis.example else ""


def _spoken(results: Iterable[TermResult], speaker: Speaker) -> Iterator[TermResult]:
    """The results again, each chunk of :data:`AUDIO_CHUNK_TERMS` only once its clips are made."""
    iterator = iter(results)
    while chunk := list(itertools.islice(iterator, AUDIO_CHUNK_TERMS)):
        speaker.add(text for result in chunk for text in _texts(result))
        yield from chunk
        chunk.clear()  # the next chunk is read before the name is rebound


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


class _StreamedDeck:
    """A deck for one writer, its notes built (and, with audio, spoken chunk by chunk) as the writer takes them.
    Its media and warnings are complete once the notes are consumed; :meth:`close` ends the speech provider."""

    def __init__(self, notes: _Notes, note_type: NoteType, root_deck: str, speaker: Speaker | None = None,
                 warning: str | None = None) -> None:
        self.notes = notes
        self.note_type = note_type
        self.root_deck = root_deck
        self._speaker = speaker
        self._warning = warning

    @property
    def media(self) -> dict[str, Path]:
        """Media file name -> file, of the notes built so far (the same dict, growing with them)."""
        return self._speaker.media if self._speaker is not None else {}

    def media_files(self) -> Iterator[Path]:
        """Every media file, sorted: read only when asked for, so after the notes that make them."""
        yield from sorted(self.media.values())

    @property
    def warnings(self) -> tuple[str, ...]:
        warning = self._speaker.warning if self._speaker is not None else self._warning
        return (warning,) if warning else ()

    def close(self) -> None:
        if self._speaker is not None:
            _close(self._speaker.provider)


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
    """The deck with its notes still to build; with ``audio``, each chunk of words is spoken just before its
    notes are built, so the export holds one chunk of results and clips, not the list."""
    mode, engine = check_options(str(subdecks), str(audio) if audio else None)
    kind = note_type(language)
    root = resolve_deck_name(deck, language=language, simulated=simulated)
    speaker: Speaker | None = None
    warning: str | None = None
    if engine is not None:
        if media_dir is None:
            raise ValueError("audio needs a media_dir")
        try:
            provider = speech_provider(engine, language, speech)
        except SpeechError as exc:
            warning = str(exc)
        else:
            speaker = Speaker(provider, media_dir, speech.store if speech is not None else None)

    def build(terms: Iterable[TermResult]) -> Iterator[AnkiNote]:
        if speaker is not None:
            terms = _spoken(terms, speaker)
        return build_notes(terms, language=language, root_deck=root, subdecks=mode, simulated=simulated,
                           lang=kind.lang, sounds=speaker.names if speaker is not None else None, source=source)

    return _StreamedDeck(_Notes(results, root, build), kind, root, speaker, warning)


def prepare_deck(results: Iterable[TermResult], *, language: str, deck: str | None = None,
                 subdecks: Subdecks | str = Subdecks.NONE, simulated: bool = False,
                 audio: AudioEngine | str | None = None, media_dir: Path | None = None,
                 source: str | None = None, speech: SpeechSettings | None = None) -> PreparedDeck:
    """Build every note in a list (for a look at the whole deck; the exports and push stream instead); with
    ``audio``, speak each word and example sentence into ``media_dir`` (which must outlive the deck)."""
    streamed = _stream_deck(results, language=language, deck=deck, subdecks=subdecks, simulated=simulated,
                            audio=audio, media_dir=media_dir, source=source, speech=speech)
    with contextlib.closing(streamed):
        notes = list(streamed.notes)
    return PreparedDeck(notes=notes, note_type=streamed.note_type, root_deck=streamed.root_deck,
                        terms=streamed.notes.terms, media=dict(streamed.media), warnings=streamed.warnings)


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
        with contextlib.closing(streamed):
            if chosen == "apkg":
                write_apkg(streamed.notes, path, note_type=streamed.note_type, root_deck=streamed.root_deck,
                           media=streamed.media_files(), timestamp=timestamp)
            else:
                write_anki_tsv(streamed.notes, path, note_type=streamed.note_type,
                               root_deck=streamed.root_deck, with_deck_column=mode is not Subdecks.NONE)
        warnings.extend(streamed.warnings)
        if chosen == "tsv":
            warnings.append(TSV_NEEDS_NOTE_TYPE.format(name=streamed.note_type.name))
    notes = streamed.notes
    return ExportReport(format=chosen, path=path, cards=notes.cards, terms=notes.terms, deck=streamed.root_deck,
                        decks=tuple(notes.decks), audio_files=len(streamed.media), warnings=tuple(warnings))


def push_results(results: Iterable[TermResult], client: AnkiConnect, *, language: str, deck: str | None = None,
                 subdecks: Subdecks | str = Subdecks.NONE, simulated: bool = False,
                 audio: AudioEngine | str | None = None, update: bool = True,
                 source: str | None = None, speech: SpeechSettings | None = None) -> tuple[PushReport, tuple[str, ...]]:
    """Send the notes to Anki as they are built, a batch at a time (updating changed ones unless ``update`` is
    off); returns AnkiConnect's report and any warnings (e.g. no audio)."""
    with tempfile.TemporaryDirectory(prefix="flashcard-audio-") as media_dir:
        streamed = _stream_deck(results, language=language, deck=deck, subdecks=subdecks, simulated=simulated,
                                audio=audio, media_dir=Path(media_dir), source=source, speech=speech)
        with contextlib.closing(streamed):
            report = push_notes(client, streamed.notes, note_type=streamed.note_type, root_deck=streamed.root_deck,
                                media=streamed.media, update=update)
    return report, streamed.warnings
