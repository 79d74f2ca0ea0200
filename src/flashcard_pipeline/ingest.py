"""Reading the learner's vocabulary list: CSV, TSV or plain text, streamed record by record.

A bad row is reported as a :class:`RowProblem` and skipped, so one typo never costs a whole run;
only a file that cannot be read at all raises :class:`InputError`, before any item is yielded
whenever the problem is visible up front.
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import re
import unicodedata
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

from flashcard_pipeline.errors import ConfigurationError, InputError
from flashcard_pipeline.models import VocabularyItem

MAX_TERM_CHARS = 200
MAX_TYPE_CHARS = 40

TERM_ALIASES = ("term", "hangul", "word", "vocab", "vocabulary", "expression", "korean", "headword", "lemma")
POSITION_ALIASES = ("position", "pos_no", "no", "number", "rank", "index", "#", "id")
TYPE_ALIASES = ("type", "word_type", "pos", "part_of_speech", "wordclass")
#: Columns left by earlier tools that tell a model nothing about the word.
BOOKKEEPING_COLUMNS = (
    "processed",
    "reasoning_tokens",
    "total_tokens",
    "o4_error",
    "verified",
    "quality_score",
    "hsk_compliance",
    "frequency_number",
    # A frequency rank is the row's position in frequency-ordered lists (all of korean_10k.csv): in a prompt it
    # tells the model nothing, and in the cache key it would tie an answer to the word's place in one file.
    "frequency",
    "rank",
)

_HEAD_BYTES = 8192
_SAMPLE_CHARS = 8192
_SAMPLE_LINES = 200
_DELIMITERS = ",\t;|"
_TEXT_SUFFIXES = frozenset({".txt", ".text"})
_CONTROL_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
_NAME_NOISE = re.compile(r"[\s_.\-]+")
_POSITION = re.compile(r"\+?([0-9]+)(?:\.0*)?")
_MAX_POSITION = 2**63 - 1
_SCAN_BYTES = 1 << 16


def _normalize_name(name: str) -> str:
    return _NAME_NOISE.sub("", unicodedata.normalize("NFKC", name)).casefold()


_TERM_KEYS = frozenset(map(_normalize_name, TERM_ALIASES))
_POSITION_KEYS = frozenset(map(_normalize_name, POSITION_ALIASES))
_TYPE_KEYS = frozenset(map(_normalize_name, TYPE_ALIASES))
#: A frequency rank column is no hint (see BOOKKEEPING_COLUMNS), but the learner can sort cards by it.
_FREQUENCY_KEYS = frozenset(map(_normalize_name, ("frequency", "frequency_rank", "freq_rank")))
_BOOKKEEPING_KEYS = frozenset(map(_normalize_name, BOOKKEEPING_COLUMNS))


@dataclass(frozen=True)
class RowProblem:
    """A row that was skipped, with why; the run goes on without it."""

    row: int
    reason: str
    term: str | None = None

    def __str__(self) -> str:
        return f"row {self.row}: {self.reason}"


@dataclass(frozen=True)
class VocabularyLayout:
    """How a file will be read, so a caller can tell the user before a long run starts."""

    format: str
    delimiter: str | None
    columns: tuple[str, ...] = ()
    term_column: str | None = None
    position_column: str | None = None
    type_column: str | None = None
    hint_columns: tuple[str, ...] = ()
    dropped_columns: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Columns:
    names: tuple[str, ...]
    term: int
    position: int | None = None
    type: int | None = None
    hints: tuple[tuple[int, str], ...] = ()
    dropped: tuple[str, ...] = ()
    frequency: int | None = None


_TEXT_COLUMNS = _Columns(names=(), term=0)


class _Record(NamedTuple):
    start: int
    end: int
    fields: list[str]
    problem: str | None = None


class _Feed:
    """Lines for the csv module, remembering whether it asked for more after the last one."""

    def __init__(self, lines: Iterator[str]) -> None:
        self._lines = lines
        self.exhausted = False

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> str:
        try:
            return next(self._lines)
        except StopIteration:
            self.exhausted = True
            raise


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _one_line(text: str, limit: int) -> str:
    return _clip(" ".join(text.split()), limit)


def _display_names(cells: list[str]) -> tuple[str, ...]:
    """Header names as written, made unique and non-empty because they become hint keys."""
    names: list[str] = []
    for index, cell in enumerate(cells, 1):
        name = _one_line(cell, 80) or f"column {index}"
        names.append(f"{name} (column {index})" if name in names else name)
    return tuple(names)


def _map_columns(cells: list[str]) -> _Columns | None:
    """Assign each header cell a role; None when no column can hold the term."""
    names = _display_names(cells)
    roles: dict[str, int] = {}
    hints: list[tuple[int, str]] = []
    dropped: list[str] = []
    for index, (cell, name) in enumerate(zip(cells, names, strict=True)):
        key = _normalize_name(cell)
        for role, keys in (("term", _TERM_KEYS), ("position", _POSITION_KEYS), ("type", _TYPE_KEYS)):
            if key in keys and role not in roles:
                roles[role] = index
                break
        else:
            if key in _FREQUENCY_KEYS and "frequency" not in roles:
                roles["frequency"] = index
            if key in _BOOKKEEPING_KEYS:
                dropped.append(name)
            else:
                hints.append((index, name))
    if "term" not in roles:
        return None
    return _Columns(
        names=names,
        term=roles["term"],
        position=roles.get("position"),
        type=roles.get("type"),
        hints=tuple(hints),
        dropped=tuple(dropped),
        frequency=roles.get("frequency"),
    )


def _parse_position(cell: str) -> int | None:
    match = _POSITION.fullmatch(unicodedata.normalize("NFKC", cell))
    if match is None:
        return None
    value = int(match.group(1))
    return value if 0 < value <= _MAX_POSITION else None


def _first_record(lines: list[str], delimiter: str) -> list[str] | None:
    reader = csv.reader(lines, delimiter=delimiter, quotechar='"', skipinitialspace=True)
    try:
        return next((row for row in reader if any(cell.strip() for cell in row)), None)
    except csv.Error:
        return None


class VocabularyReader:
    """Streams :class:`VocabularyItem` objects from a CSV, TSV or plain-text vocabulary file.

    Each iteration re-opens the file and refills :attr:`problems`; memory grows only with the
    terms and positions already seen (needed to report duplicates), never with the file.
    ``bytes_read`` tracks how far the current iteration has got, for progress bars.
    """

    def __init__(self, path: Path, *, encoding: str = "utf-8", max_hint_chars: int = 500) -> None:
        if max_hint_chars < 1:
            raise ValueError("max_hint_chars must be at least 1")
        try:
            codec = codecs.lookup(encoding).name
        except LookupError:
            raise ConfigurationError(f"unknown text encoding {encoding!r}", code="bad_encoding") from None
        # Lines are split on the raw b"\n" so errors carry exact line numbers; that needs an
        # encoding in which ASCII punctuation is a single byte (UTF-8, CP949, Latin-1, ...).
        if '\n,;|\t"#'.encode(codec, errors="replace") != b'\n,;|\t"#':
            raise ConfigurationError(
                f"text encoding {encoding!r} is not supported; use an ASCII-compatible one such as utf-8",
                code="bad_encoding",
            )
        self.path = Path(path)
        self.problems: list[RowProblem] = []
        self.bytes_read = 0
        self._name = str(path)
        self._is_utf8 = codec in ("utf-8", "utf-8-sig")
        self._codec = "utf-8" if self._is_utf8 else codec
        self._label = "UTF-8" if self._is_utf8 else codec
        self._max_hint_chars = max_hint_chars
        self._layout: VocabularyLayout | None = None

    @property
    def format(self) -> str:
        """``"csv"``, ``"tsv"`` or ``"text"``; inspects the file on first use."""
        return (self._layout or self.detect()).format

    def detect(self) -> VocabularyLayout:
        """Inspect the start of the file and fail now, rather than mid-run, if it cannot be read."""
        with self._open() as raw:
            head = raw.read(_HEAD_BYTES)
            self._check_head(head, at_eof=not raw.read(1))
        with closing(self._lines()) as lines:
            blank = 0
            for line in lines:
                if line.strip():
                    break
                blank += 1
            else:
                raise self._error("no vocabulary rows", "no_rows")
            sample = [line]
            size = len(line)
            while size < _SAMPLE_CHARS and len(sample) < _SAMPLE_LINES and (line := next(lines, "")):
                sample.append(line)
                size += len(line)
            delimiter = self._choose_delimiter(sample)
            # Replay what the sample consumed so line numbers stay those of the file.
            records = self._records(itertools.chain(itertools.repeat("\n", blank), sample, lines), delimiter)
            columns = _TEXT_COLUMNS if delimiter is None else self._header(records)
            if next(records, None) is None:
                raise self._error("no vocabulary rows", "no_rows")
        self._layout = VocabularyLayout(
            format="text" if delimiter is None else "tsv" if delimiter == "\t" else "csv",
            delimiter=delimiter,
            columns=columns.names,
            term_column=columns.names[columns.term] if columns.names else None,
            position_column=None if columns.position is None else columns.names[columns.position],
            type_column=None if columns.type is None else columns.names[columns.type],
            hint_columns=tuple(name for _, name in columns.hints),
            dropped_columns=columns.dropped,
        )
        return self._layout

    def __iter__(self) -> Iterator[VocabularyItem]:
        problems: list[RowProblem] = []
        self.problems = problems
        self.bytes_read = 0
        layout = self.detect()
        return self._items(layout.delimiter, problems)

    # -- reading --------------------------------------------------------------------------------

    def _error(self, message: str, code: str) -> InputError:
        return InputError(f"{self._name}: {message}", code=code, details={"path": self._name})

    def _open(self) -> BinaryIO:
        try:
            if not self.path.exists():
                raise self._error("file not found", "file_not_found")
            if not self.path.is_file():
                kind = "is a directory" if self.path.is_dir() else "is not a regular file"
                raise self._error(kind, "not_a_file")
            return self.path.open("rb")
        except OSError as exc:
            raise self._error(f"cannot be read ({exc.strerror or exc})", "unreadable") from exc

    def _check_head(self, head: bytes, *, at_eof: bool) -> None:
        if not head:
            raise self._error("file is empty", "empty_file")
        if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            raise self._error("not a text file in UTF-8 (it looks like UTF-16; save it as UTF-8)", "not_text")
        nul = head.find(b"\x00")
        if nul >= 0:
            raise self._error(f"not a text file (NUL byte at byte {nul + 1})", "not_text")
        skip = 3 if self._is_utf8 and head.startswith(codecs.BOM_UTF8) else 0
        try:
            codecs.getincrementaldecoder(self._codec)().decode(head[skip:], final=at_eof)
        except UnicodeDecodeError as exc:
            offset = skip + exc.start
            line = head.count(b"\n", 0, offset) + 1
            hint = "; if it is text in another encoding, pass --encoding (e.g. cp949, latin-1)" if self._is_utf8 else ""
            raise self._error(
                f"not a text file (invalid {self._label} at byte {offset + 1}, line {line}){hint}", "not_text"
            ) from exc

    def _lines(self, *, track: bool = False) -> Iterator[str]:
        """Decoded lines with their endings (the csv module wants them), read lazily."""
        codec = "utf-8-sig" if self._is_utf8 else self._codec
        with self._open() as raw, io.TextIOWrapper(raw, encoding=codec, newline="") as text:
            try:
                for line in text:
                    if track:
                        self.bytes_read = raw.tell()
                    yield line
            except UnicodeDecodeError as exc:
                byte, line_no = self._locate_bad_bytes()
                raise self._error(f"invalid {self._label} on line {line_no} (byte {byte})", "bad_encoding") from exc
            if track:
                self.bytes_read = raw.tell()

    def _locate_bad_bytes(self) -> tuple[int, int]:
        """1-based byte offset and line of the first undecodable byte; a rescan, run only to explain an error."""
        decoder = codecs.getincrementaldecoder(self._codec)()
        offset = breaks = 0
        after_cr = False
        with self._open() as raw:
            while chunk := raw.read(_SCAN_BYTES):
                pending = len(decoder.getstate()[0])
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    bad = max(offset, offset - pending + exc.start)
                    chunk = chunk[: bad - offset]
                    offset = bad
                else:
                    offset += len(chunk)
                    bad = -1
                breaks += chunk.count(b"\n") + chunk.count(b"\r") - chunk.count(b"\r\n")
                if after_cr and chunk.startswith(b"\n"):
                    breaks -= 1  # a CRLF split across two reads
                after_cr = chunk.endswith(b"\r")
                if bad >= 0:
                    return bad + 1, breaks + 1
        return offset, breaks + 1

    def _choose_delimiter(self, sample: list[str]) -> str | None:
        """The CSV delimiter, or None for a plain list of terms."""
        try:
            sniffed: str | None = csv.Sniffer().sniff("".join(sample), delimiters=_DELIMITERS).delimiter
        except csv.Error:
            sniffed = None
        header_line = sample[0]
        if sniffed is None:
            sniffed = "\t" if "\t" in header_line else next((d for d in ",;|" if d in header_line), ",")
        # The sniffer can be fooled by punctuation inside values; a header naming a term column
        # under one of the delimiters is stronger evidence.
        text_suffix = self.path.suffix.lower() in _TEXT_SUFFIXES
        first_cells: list[str] | None = None
        for delimiter in (sniffed, *(d for d in _DELIMITERS if d != sniffed)):
            cells = _first_record(sample, delimiter)
            if cells is None:
                continue
            first_cells = first_cells or cells
            if _map_columns(cells) is not None and (len(cells) > 1 or not text_suffix):
                return delimiter
        data_lines = [line for line in sample[:20] if not line.lstrip().startswith("#")]
        if text_suffix or not any(d in line for line in data_lines for d in _DELIMITERS):
            return None
        raise self._no_term_column(first_cells or [])

    def _no_term_column(self, cells: list[str]) -> InputError:
        shown = [_one_line(cell, 40) or "(blank)" for cell in cells[:12]]
        if len(cells) > 12:
            shown.append(f"… (+{len(cells) - 12} more)")
        return self._error(
            f"no term column (found columns: {', '.join(shown)}; expected one of: {', '.join(TERM_ALIASES)})",
            "no_term_column",
        )

    def _records(self, lines: Iterator[str], delimiter: str | None) -> Iterator[_Record]:
        """Non-blank records; one the csv module could not make sense of carries a problem instead."""
        if delimiter is None:
            first = True
            for number, line in enumerate(lines, 1):
                term = line.strip()
                if not term or term.startswith("#"):
                    continue
                if first and term.lstrip("\ufeff").lower() in TERM_ALIASES:
                    first = False  # a one-column list with a header line ("term", "Hangul"): not a word to learn
                    continue
                first = False
                yield _Record(number, number, [term])
            return
        feed = _Feed(lines)
        reader = csv.reader(feed, delimiter=delimiter, quotechar='"', skipinitialspace=True)
        while True:
            start = reader.line_num + 1
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                # The reader starts afresh on the next line, so the rest of the file is still usable.
                yield _Record(start, reader.line_num, [], f"cannot parse CSV ({exc})")
                continue
            if feed.exhausted:
                # The csv module only reads past the last line to finish an open quoted field.
                reason = f"unterminated quote (record runs from line {start} to the end of the file)"
                yield _Record(start, reader.line_num, fields, reason)
            elif any(field.strip() for field in fields):
                yield _Record(start, reader.line_num, fields)

    def _header(self, records: Iterator[_Record]) -> _Columns:
        header = next(records, None)
        if header is None:
            raise self._error("no vocabulary rows", "no_rows")
        columns = _map_columns(header.fields)
        if columns is None:
            raise self._no_term_column(header.fields)
        return columns

    def _items(self, delimiter: str | None, problems: list[RowProblem]) -> Iterator[VocabularyItem]:
        seen_terms: dict[str, int] = {}
        seen_positions: dict[int, int] = {}
        count = 0
        with closing(self._lines(track=True)) as lines:
            records = self._records(lines, delimiter)
            columns = _TEXT_COLUMNS if delimiter is None else self._header(records)
            for record in records:
                count += 1
                outcome = (
                    RowProblem(record.start, record.problem)
                    if record.problem is not None
                    else self._item(record, columns, count, seen_terms, seen_positions)
                )
                if isinstance(outcome, RowProblem):
                    problems.append(outcome)
                else:
                    yield outcome
        if count == 0:
            raise self._error("no vocabulary rows", "no_rows")

    def _item(
        self,
        record: _Record,
        columns: _Columns,
        record_no: int,
        seen_terms: dict[str, int],
        seen_positions: dict[int, int],
    ) -> VocabularyItem | RowProblem:
        start, end, fields = record.start, record.end, record.fields
        width = len(columns.names)
        if width and len(fields) > width and any(field.strip() for field in fields[width:]):
            span = f" (record spans lines {start}-{end}: unbalanced quote?)" if end > start else ""
            return RowProblem(start, f"row has {len(fields)} fields, header has {width}{span}")

        def cell(index: int | None) -> str:
            return fields[index].strip() if index is not None and index < len(fields) else ""

        term = unicodedata.normalize("NFC", cell(columns.term)).strip()
        if not term:
            return RowProblem(start, "empty term")
        if len(term) > MAX_TERM_CHARS:
            reason = f"term is longer than {MAX_TERM_CHARS} characters ({len(term)})"
            return RowProblem(start, reason, _clip(term, MAX_TERM_CHARS))
        control = next((c for c in term if unicodedata.category(c) in _CONTROL_CATEGORIES), None)
        if control is not None:
            return RowProblem(start, f"term contains a control character (U+{ord(control):04X})", term)

        position = record_no
        if raw_position := cell(columns.position):
            parsed = _parse_position(raw_position)
            if parsed is None:
                return RowProblem(start, f"position {_clip(raw_position, 40)!r} is not a positive integer", term)
            position = parsed

        term_key = unicodedata.normalize("NFC", term.casefold())
        if (first := seen_terms.get(term_key)) is not None:
            return RowProblem(start, f"duplicate of row {first} ({term})", term)
        if (first := seen_positions.get(position)) is not None:
            return RowProblem(start, f"duplicate position {position} (first used on row {first})", term)
        seen_terms[term_key] = start
        seen_positions[position] = start

        hints = {name: _clip(value, self._max_hint_chars) for index, name in columns.hints if (value := cell(index))}
        word_type = cell(columns.type) or None
        if word_type is not None and len(word_type) > MAX_TYPE_CHARS and columns.type is not None:
            # Too long to be a part of speech, but still worth showing the model.
            hints[columns.names[columns.type]] = _clip(word_type, self._max_hint_chars)
            word_type = None
        frequency_rank = _parse_position(cell(columns.frequency)) if cell(columns.frequency) else None
        return VocabularyItem(position=position, term=term, type=word_type, hints=hints, source_row=start,
                              frequency_rank=frequency_rank or None)


def read_vocabulary(
    path: Path, *, encoding: str = "utf-8", max_hint_chars: int = 500
) -> tuple[list[VocabularyItem], list[RowProblem]]:
    """Read a whole (small) file at once: the items and the rows that were skipped."""
    reader = VocabularyReader(path, encoding=encoding, max_hint_chars=max_hint_chars)
    items = list(reader)
    return items, reader.problems
