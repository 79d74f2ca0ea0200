"""Anki's own text format: tab-separated, with the header lines that tell Anki's importer the note type,
deck, columns, GUID column and tags column, so "Import File" needs no manual mapping."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

from flashcard_pipeline.export.anki_model import NoteType
from flashcard_pipeline.export.common import atomic_output
from flashcard_pipeline.export.notes import AnkiNote


def write_anki_tsv(notes: Iterable[AnkiNote], path: Path, *, note_type: NoteType, root_deck: str,
                   with_deck_column: bool = False) -> int:
    """Write the file atomically; returns the note count.

    The note type must exist in the collection (import any .apkg of this project once, or ``push``):
    Anki's text import matches it by name and cannot create it, and without it puts the rows into "Basic". A
    comment line after the header says so to whoever opens the file.
    """
    columns = [*note_type.fields, "GUID", "Tags", *(["Deck"] if with_deck_column else [])]
    header = [
        "#separator:tab",
        "#html:true",
        f"#notetype:{note_type.name}",
        f"#deck:{root_deck}",
        "#columns:" + "\t".join(columns),
        f"#guid column:{columns.index('GUID') + 1}",
        f"#tags column:{columns.index('Tags') + 1}",
    ]
    if with_deck_column:
        header.append(f"#deck column:{columns.index('Deck') + 1}")
        # Anki's text import loses track of a parent deck it created implicitly for a sub-deck, and creates
        # "Deck+", "Deck++"... for the parent's own rows that follow. Parents first avoids it (stable sort).
        notes = sorted(notes, key=lambda note: note.deck.count("::"))
    # Anki skips lines that start with '#' as comments; a colon would make this one a header line.
    note = (f"# Import an .apkg made by flashcard-pipeline first (or run flashcard-pipeline push) so that Anki has "
            f"the note type {note_type.name.replace(':', ' ')}; without it the rows land in Basic")
    count = 0
    with atomic_output(path) as tmp, tmp.open("w", encoding="utf-8", newline="") as handle:
        handle.write("\n".join([*header, note]) + "\n")
        writer = csv.writer(handle, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        for note in notes:
            row = [*note.fields, note.guid, " ".join(note.tags)]
            if with_deck_column:
                row.append(note.deck)
            writer.writerow(row)
            count += 1
    return count
