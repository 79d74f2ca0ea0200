"""CSV for spreadsheets: plain text (not HTML), UTF-8 with a BOM so Excel reads Hangul, and every cell that
a spreadsheet would run as a formula neutralised."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

from flashcard_pipeline.export.common import anki_tags, atomic_output, card_tags, clean_text
from flashcard_pipeline.export.notes import Subdecks, deck_for
from flashcard_pipeline.models import TermResult

COLUMNS = ("position", "term", "ipa", "part_of_speech", "meaning", "card_type", "front", "back",
           "honorific_level", "explanation", "tags", "deck")
# OWASP's list for CSV injection: a leading =, +, -, @, tab or carriage return starts a formula or DDE call.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutralise(cell: str) -> str:
    """Prefix a single quote to a cell that a spreadsheet would evaluate, so it shows as text."""
    if cell.startswith(_FORMULA_START) or cell.lstrip(" ").startswith(_FORMULA_START[:4]):
        return "'" + cell
    return cell


def write_csv(results: Iterable[TermResult], path: Path, *, root_deck: str, subdecks: Subdecks,
              simulated: bool) -> int:
    """Write the file atomically; returns the card count."""
    count = 0
    with atomic_output(path) as tmp, tmp.open("w", encoding="utf-8-sig", newline="") as handle:
        writer = csv.writer(handle, quoting=csv.QUOTE_MINIMAL)
        writer.writerow(COLUMNS)
        for result in results:
            analysis = result.analysis
            deck = deck_for(result, root_deck, subdecks)
            for card in result.cards:
                row = (str(result.item.position), result.item.term, analysis.ipa, analysis.pos.value,
                       analysis.primary_meaning, card.card_type.value, card.front, card.back,
                       card.honorific_level.value, analysis.explanation,
                       " ".join(anki_tags(card_tags(card, simulated=simulated))), deck)
                writer.writerow([neutralise(clean_text(cell)) for cell in row])
                count += 1
    return count
