"""The .apkg export: a genanki package with the project's note type, one note per word, no scheduling."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import genanki

from flashcard_pipeline.export.anki_model import NoteType, deck_id
from flashcard_pipeline.export.common import atomic_output
from flashcard_pipeline.export.notes import AnkiNote


def write_apkg(notes: Iterable[AnkiNote], path: Path, *, note_type: NoteType, root_deck: str,
               media: Sequence[Path] = (), timestamp: float | None = None) -> int:
    """Write the package atomically; returns the note count.

    ``timestamp`` becomes every note's modification time. Anki's default import only updates a
    note from a package whose copy is newer, so it defaults to now.
    """
    model = note_type.genanki_model()
    decks: dict[str, genanki.Deck] = {root_deck: genanki.Deck(deck_id(root_deck), root_deck)}
    count = 0
    for note in notes:
        deck = decks.get(note.deck)
        if deck is None:
            deck = decks[note.deck] = genanki.Deck(deck_id(note.deck), note.deck)
        deck.add_note(genanki.Note(model=model, fields=list(note.fields), tags=list(note.tags), guid=note.guid))
        count += 1
    decks[root_deck].add_model(model)
    package = genanki.Package(list(decks.values()), media_files=[str(p) for p in media])
    with atomic_output(path) as tmp:
        package.write_to_file(str(tmp), timestamp=timestamp)
    return count
