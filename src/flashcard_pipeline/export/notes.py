"""Pipeline results as Anki notes: stable GUIDs, escaped fields, clean tags and the deck each note goes to.

Every Anki route (.apkg, text file, AnkiConnect) is built from these notes, so a card has the
same GUID, fields and tags whichever way it reaches Anki.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import genanki

from flashcard_pipeline.choices import Subdecks
from flashcard_pipeline.export.anki_model import FIELDS
from flashcard_pipeline.export.common import anki_tags, card_tags, html_text, one_line
from flashcard_pipeline.models import TermAnalysis, TermResult

SIMULATED_SUFFIX = " (simulated)"


@dataclass(frozen=True)
class AnkiNote:
    guid: str
    deck: str
    fields: tuple[str, ...]
    tags: tuple[str, ...]
    term: str
    position: int
    sound: str | None = None
    """media file name of the term's pronunciation, if any"""

    def field(self, name: str) -> str:
        return self.fields[FIELDS.index(name)]

    def field_map(self) -> dict[str, str]:
        return dict(zip(FIELDS, self.fields, strict=True))


def deck_path(name: str) -> str:
    """A deck name as Anki stores it: each ``::`` level trimmed, empty levels dropped (``" A :: B ::"`` is
    ``"A::B"``), so a text import or an AnkiConnect search finds the deck instead of making a twin."""
    return "::".join(part for part in (one_line(p) for p in one_line(name).split("::")) if part)


def resolve_deck_name(requested: str | None, *, language: str, simulated: bool) -> str:
    """The requested name, else "<Language> vocabulary"; a simulated run's deck says so in its name."""
    name = deck_path(requested or "") or f"{one_line(language) or 'Flashcard'} vocabulary"
    if simulated and not name.endswith(SIMULATED_SUFFIX):
        name += SIMULATED_SUFFIX
    return name


def _subdeck_part(text: str) -> str:
    # "::" would open another level of the hierarchy.
    return one_line(text).replace("::", ":")


def level_of(result: TermResult) -> str | None:
    """The input's level column (e.g. TOPIK_Level), which reaches us as a hint."""
    for key, value in result.item.hints.items():
        if "level" in key.lower() and (level := _subdeck_part(value)):
            return level
    return None


def deck_for(result: TermResult, root: str, subdecks: Subdecks) -> str:
    if subdecks is Subdecks.POS:
        return f"{root}::{result.analysis.pos.value}"
    if subdecks is Subdecks.LEVEL and (level := level_of(result)) is not None:
        return f"{root}::{level if level.lower().startswith('level') else f'Level {level}'}"
    return root


def note_guid(language: str, term: str, card_type: str, ordinal: int, *, simulated: bool = False) -> str:
    """Stable across runs and exports: (language, term, card type) and the card's ordinal among that term's
    cards of the same type, so re-importing an updated deck updates notes instead of adding new ones.

    Simulated notes live in a GUID space of their own: a real deck imported after a simulated one must add
    real notes, not update the simulated ones in place (they would stay in the "(simulated)" deck, which a
    user deletes, taking the real cards with it)."""
    if simulated:
        return genanki.guid_for("simulated", language, term, card_type, ordinal)
    return genanki.guid_for(language, term, card_type, ordinal)


def _section(title: str, body: str) -> str:
    return f"<h4>{html_text(title)}</h4><p>{body}</p>"


def analysis_html(analysis: TermAnalysis, lang: str | None) -> str:
    """The parts of the analysis worth seeing after answering, as escaped HTML."""
    lang_attr = f' lang="{lang}"' if lang else ""
    parts = [f'<div class="fp-pos">{html_text(analysis.pos.value)}</div>']
    if analysis.other_meanings:
        parts.append(_section("Other meanings", html_text(analysis.other_meanings)))
    parts.append(_section("Memory image", f"{html_text(analysis.metaphor)} {html_text(analysis.anchor_sensory)}"))
    parts.append(_section("Explanation", html_text(analysis.explanation)))
    if analysis.usage_context:
        parts.append(_section("Usage", html_text(analysis.usage_context)))
    if analysis.comparison is not None:
        parts.append(f"<h4>Compared with <span{lang_attr}>{html_text(analysis.comparison.vs)}</span></h4>"
                     f"<p>{html_text(analysis.comparison.nuance)}</p>")
    if analysis.homonyms:
        items = "".join(
            f'<li><span class="fp-hanja"{lang_attr}>{html_text(h.hanja)}</span> '
            f"<span{lang_attr}>{html_text(h.reading)}</span>: {html_text(h.meaning)}. "
            f"{html_text(h.differentiator)}</li>"
            for h in analysis.homonyms)
        parts.append(f"<h4>Hanja</h4><ul>{items}</ul>")
    return "".join(parts)


def _key(term: str, card_type: str, ordinal: int) -> str:
    key = html_text(f"{term} · {card_type}" + (f" {ordinal}" if ordinal > 1 else ""))
    # Anki's text importer skips a line that starts with '#' as a comment; an entity shows the same character.
    return "&#35;" + key[1:] if key.startswith("#") else key


def build_notes(results: Iterable[TermResult], *, language: str, root_deck: str, subdecks: Subdecks,
                simulated: bool, lang: str | None = None,
                sounds: Mapping[str, str] | None = None) -> Iterator[AnkiNote]:
    """One note per card. ``sounds`` maps a term to its media file name (for the Audio field)."""
    for result in results:
        term = result.item.term
        deck = deck_for(result, root_deck, subdecks)
        analysis = analysis_html(result.analysis, lang)
        sound = (sounds or {}).get(term)
        seen: Counter[str] = Counter()
        for card in result.cards:
            card_type = card.card_type.value
            seen[card_type] += 1
            ordinal = seen[card_type]
            values = {
                "Key": _key(term, card_type, ordinal),
                "Term": html_text(term),
                "IPA": html_text(result.analysis.ipa),
                "Meaning": html_text(result.analysis.primary_meaning),
                "CardType": html_text(card_type),
                "Front": html_text(card.front),
                "Back": html_text(card.back),
                "Analysis": analysis,
                "Audio": f"[sound:{sound}]" if sound else "",
            }
            yield AnkiNote(guid=note_guid(language, term, card_type, ordinal, simulated=simulated), deck=deck,
                           fields=tuple(values[name] for name in FIELDS),
                           tags=anki_tags(card_tags(card, simulated=simulated)), term=term,
                           position=result.item.position, sound=sound)
