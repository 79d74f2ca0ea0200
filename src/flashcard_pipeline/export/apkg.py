"""The .apkg export: a genanki package with the project's note type, one note per word, no scheduling.

The notes stream into the package's SQLite file one at a time (genanki's ``Note.write_to_db``), so the export holds
one note, not the deck: ``genanki.Package.write_to_file`` would need every note in memory first. The file is the one
genanki writes from the same notes: its schema and collection row, each deck's JSON and the note type, the note
and card ids from one counter starting at the timestamp in milliseconds, deck after deck, and the zip around it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path

import genanki

from flashcard_pipeline.export.anki_model import NoteType, deck_id
from flashcard_pipeline.export.common import atomic_output
from flashcard_pipeline.export.notes import AnkiNote

#: Room for one deck's note and card ids while the decks' notes arrive interleaved.
_ID_SPAN = 1 << 40


class _Ids:
    """A deck's id counter (genanki calls ``next`` on it) that knows how many ids it gave."""

    def __init__(self, start: int) -> None:
        self.start = self.next = start

    def __iter__(self) -> _Ids:
        return self

    def __next__(self) -> int:
        value = self.next
        self.next += 1
        return value

    @property
    def used(self) -> int:
        return self.next - self.start


def _renumber(cursor: sqlite3.Cursor, decks: Iterable[_Ids], first: int) -> None:
    """Give each deck's notes and cards the ids genanki's single counter gives them: deck after deck, in order."""
    target = first
    for ids in decks:
        delta = target - ids.start
        if delta:
            cursor.execute("UPDATE notes SET id = id + ? WHERE id >= ? AND id < ?", (delta, ids.start, ids.next))
            cursor.execute("UPDATE cards SET id = id + ?, nid = nid + ? WHERE id >= ? AND id < ?",
                           (delta, delta, ids.start, ids.next))
        target += ids.used


def _write_collection(notes: Iterable[AnkiNote], database: Path, *, model: genanki.Model, root_deck: str,
                      timestamp: float) -> int:
    connection = sqlite3.connect(database)
    try:
        cursor = connection.cursor()
        genanki.Package([]).write_to_db(cursor, timestamp, iter(()))
        first = int(timestamp * 1000)
        # The root deck's ids are final at once; a sub-deck's get a range of their own below them, and move up
        # behind the decks before it when the stream is done.
        decks: dict[str, _Ids] = {root_deck: _Ids(first)}
        count = 0
        for note in notes:
            ids = decks.get(note.deck)
            if ids is None:
                ids = decks[note.deck] = _Ids(first - len(decks) * _ID_SPAN)
            genanki.Note(model=model, fields=list(note.fields), tags=list(note.tags), guid=note.guid).write_to_db(
                cursor, timestamp, deck_id(note.deck), ids)
            count += 1
        _renumber(cursor, decks.values(), first)
        for name in decks:  # as the package writes decks: each deck's JSON, then the note type naming it
            deck = genanki.Deck(deck_id(name), name)
            deck.add_model(model)
            deck.write_to_db(cursor, timestamp, iter(()))
        connection.commit()
    finally:
        connection.close()
    return count


def write_apkg(notes: Iterable[AnkiNote], path: Path, *, note_type: NoteType, root_deck: str,
               media: Iterable[Path] = (), timestamp: float | None = None) -> int:
    """Write the package atomically; returns the note count.

    ``media`` is read once every note is written, so its files may be made while the notes stream (their audio).
    ``timestamp`` becomes every note's modification time. Anki's default import only updates a
    note from a package whose copy is newer, so it defaults to now.
    """
    if timestamp is None:
        timestamp = time.time()
    with tempfile.TemporaryDirectory(prefix="flashcard-apkg-") as scratch:
        database = Path(scratch) / "collection.anki2"
        count = _write_collection(notes, database, model=note_type.genanki_model(), root_deck=root_deck,
                                  timestamp=timestamp)
        media = list(media)
        with atomic_output(path) as tmp, zipfile.ZipFile(tmp, "w") as archive:
            archive.write(database, "collection.anki2")
            archive.writestr("media", json.dumps({index: os.path.basename(p) for index, p in enumerate(media)}))
            for index, file in enumerate(media):
                archive.write(file, str(index))
    return count
