"""JSONL export: one object per card, carrying its term's item and analysis, so it loads back
into the models without the database."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from flashcard_pipeline import jsontext
from flashcard_pipeline.export.common import SIMULATED_TAG, atomic_output, card_tags
from flashcard_pipeline.models import Flashcard, TermAnalysis, TermResult, VocabularyItem

__all__ = ["SIMULATED_TAG", "CardRecord", "card_records", "read_jsonl", "write_jsonl"]


class CardRecord(BaseModel):
    """One line of the JSONL file."""

    model_config = ConfigDict(extra="forbid")

    position: int
    term: str
    card_index: int
    card: Flashcard
    analysis: TermAnalysis
    item: VocabularyItem
    simulated: bool = False


def _exported(card: Flashcard, *, simulated: bool) -> Flashcard:
    return card.model_copy(update={"tags": card_tags(card, simulated=True)}) if simulated else card


def card_records(results: Iterable[TermResult], *, simulated: bool = False) -> Iterator[CardRecord]:
    for result in results:
        for index, card in enumerate(result.cards, start=1):
            card = _exported(card, simulated=simulated)
            yield CardRecord(position=result.item.position, term=result.item.term, card_index=index, card=card,
                             analysis=result.analysis, item=result.item, simulated=simulated)


def _lines(result: TermResult, *, simulated: bool) -> Iterator[str]:
    """Each card's :class:`CardRecord` as ``model_dump_json`` writes it, the term's analysis and item serialised
    once for all its cards, not once per card."""
    shared = (f',"analysis":{result.analysis.model_dump_json()},"item":{result.item.model_dump_json()},'
              f'"simulated":{"true" if simulated else "false"}}}\n')
    head = f'{{"position":{result.item.position},"term":{jsontext.compact(result.item.term)},"card_index":'
    for index, card in enumerate(result.cards, start=1):
        yield f'{head}{index},"card":{_exported(card, simulated=simulated).model_dump_json()}{shared}'


def write_jsonl(results: Iterable[TermResult], path: Path, *, simulated: bool = False) -> int:
    """Write the cards atomically (a temporary file renamed into place); returns the card count."""
    count = 0
    with atomic_output(path) as tmp, tmp.open("w", encoding="utf-8", newline="\n") as handle:
        for result in results:
            for line in _lines(result, simulated=simulated):
                handle.write(line)
                count += 1
    return count


def read_jsonl(path: Path) -> Iterator[CardRecord]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield CardRecord.model_validate_json(line)
