"""Pipeline results as Anki notes, one per word: stable GUIDs, escaped fields, our tags and the deck it goes to.

Every Anki route (.apkg, text file, AnkiConnect) is built from these notes, so a word has the same GUID, fields
and tags whichever way it reaches Anki. A word's cards are siblings of one note, so Anki's bury-siblings keeps
them apart in a session.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import genanki

from flashcard_pipeline.choices import Subdecks
from flashcard_pipeline.export.anki_model import FIELDS
from flashcard_pipeline.export.common import SIMULATED_TAG, anki_tags, html_text, one_line
from flashcard_pipeline.export.sentences import mark
from flashcard_pipeline.korean.analyzer import has_hangul, is_korean
from flashcard_pipeline.korean.pronunciation import pronounce
from flashcard_pipeline.models import CardType, Form, TermAnalysis, TermResult

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
    cards: tuple[str, ...] = ()
    """the templates that make a card of this note (recognition, production and the optional types filled)"""
    example_sound: str | None = None
    """media file name of the example sentence's audio, if any"""

    @property
    def media(self) -> tuple[str, ...]:
        return tuple(name for name in (self.sound, self.example_sound) if name)

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


REVIEW_TAG = "needs-review"
#: Tag keys we set ourselves; the model's tags with these keys are dropped rather than contradict ours.
_OUR_TAG_KEYS = ("pos", "level", "source", "lang", "card")
_SLUG = re.compile(r"[^\w.+-]+")


def note_guid(language: str, term: str, *, simulated: bool = False) -> str:
    """Stable across runs and exports: (language, term), so re-importing an updated deck updates the word's note
    (and keeps its review history) instead of adding a new one.

    Simulated notes live in a GUID space of their own: a real deck imported after a simulated one must add
    real notes, not update the simulated ones in place (they would stay in the "(simulated)" deck, which a
    user deletes, taking the real cards with it)."""
    if simulated:
        return genanki.guid_for("simulated", language, term)
    return genanki.guid_for(language, term)


def _slug(value: str) -> str:
    return _SLUG.sub("-", one_line(value).lower()).strip("-")[:40]


def topik_level(result: TermResult) -> str:
    """The input's TOPIK_Level column as a bare number ("1"), or "" when the list has none."""
    for key, value in result.item.hints.items():
        if key.lower().replace(" ", "_") in ("topik_level", "topik") and (digits := re.sub(r"\D", "", value)):
            return digits
    return ""


def note_tags(result: TermResult, *, simulated: bool, source: str | None) -> tuple[str, ...]:
    """Ours (part of speech, level, source, needs-review) first, then the model's own (theme:family, ...)."""
    ours = [f"pos:{result.analysis.pos.value}"]
    if level := topik_level(result):
        ours.append(f"level:topik{level}")
    elif (other := level_of(result)) is not None:
        ours.append(f"level:{_slug(other)}")
    if source and (slug := _slug(source)):
        ours.append(f"source:{slug}")
    if simulated:
        ours.append(SIMULATED_TAG)
    if result.flags:
        ours.append(REVIEW_TAG)
    model = [tag for card in result.cards for tag in card.tags if tag.split(":", 1)[0] not in _OUR_TAG_KEYS]
    return anki_tags([*ours, *model])


_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")


def text_html(text: str, lang: str | None) -> str:
    """Model text as escaped HTML in which every run of Hanja carries the target language's tag, so the glyphs
    take that language's forms (Korean, not Japanese) wherever the model quoted them."""
    escaped = html_text(text)
    return _HAN.sub(lambda m: f'<span lang="{lang}">{m.group(0)}</span>', escaped) if lang else escaped


def _target(text: str, lang: str | None, tag: str = "span", cls: str = "") -> str:
    attrs = (f' class="{cls}"' if cls else "") + (f' lang="{lang}"' if lang else "")
    return f"<{tag}{attrs}>{html_text(text)}</{tag}>"


def _forms(forms: list[Form], lang: str | None) -> str:
    if not forms:
        return ""
    items = "".join(f'<li><span class="fp-label">{text_html(f.label, lang)}</span> {_target(f.form, lang)}</li>'
                    for f in forms)
    return f"<ul>{items}</ul>"


def _words(words: list[str], lang: str | None) -> str:
    return " · ".join(_target(w, lang) for w in words)


def _hanja_breakdown(analysis: TermAnalysis, lang: str | None) -> str:
    if analysis.hanja is None:
        return ""
    chars = "".join(
        f'<li>{_target(c.character, lang, cls="fp-char")} {_target(f"{c.meaning} {c.reading}", lang)} '
        f'<span class="fp-label">{text_html(c.gloss, lang)}</span></li>'
        for c in analysis.hanja.characters)
    return f'{_target(analysis.hanja.hanja, lang, "div", "fp-hanja")}<ul class="fp-breakdown">{chars}</ul>'


def _homonyms(analysis: TermAnalysis, lang: str | None) -> str:
    if not analysis.homonyms:
        return ""
    items = "".join(
        f"<li>{_target(h.reading, lang)}{' ' + _target(h.hanja, lang) if h.hanja else ''}: "
        f"{text_html(h.meaning, lang)}. {text_html(h.differentiator, lang)}</li>"
        for h in analysis.homonyms)
    return f"<ul>{items}</ul>"


def _comparison(analysis: TermAnalysis, lang: str | None) -> str:
    if analysis.comparison is None:
        return ""
    return f"{_target(analysis.comparison.vs, lang)}: {text_html(analysis.comparison.nuance, lang)}"


def _pronunciation(term: str, analysis: TermAnalysis, language: str) -> tuple[str, str, str]:
    """(sound-changed Hangul, romanization, IPA) computed from the spelling; the model's IPA only where no
    library reads the language."""
    if is_korean(language) or has_hangul(term):
        spoken = pronounce(term)
        if spoken is not None:
            return spoken.hangul, spoken.romanization, spoken.ipa
    return "", "", analysis.ipa


_OPTIONAL = {
    CardType.SCENE: ("SceneFront", "SceneBack"),
    CardType.USAGE_COMPARISON: ("ComparisonFront", "ComparisonBack"),
    CardType.GRAMMAR: ("GrammarFront", "GrammarBack"),
    CardType.FORMAL_CASUAL: ("FormalCasualFront", "FormalCasualBack"),
    CardType.CULTURAL: ("CulturalFront", "CulturalBack"),
}
#: The template each filled front field makes a card of.
_CARD_OF_FIELD = {"SceneFront": "Scene", "ComparisonFront": "Usage-Comparison", "HanjaFront": "Hanja",
                  "GrammarFront": "Grammar", "FormalCasualFront": "Formal-Casual", "ExampleCloze": "Example",
                  "CulturalFront": "Cultural"}


def _first_field(term: str) -> str:
    escaped = html_text(term)
    # Anki's text importer skips a line that starts with '#' as a comment; an entity shows the same character.
    return "&#35;" + escaped[1:] if escaped.startswith("#") else escaped


def note_fields(result: TermResult, *, language: str, lang: str | None, sound: str | None = None,
                example_sound: str | None = None) -> dict[str, str]:
    """Every field of the word's note, as HTML: model text escaped, our own markup around it."""
    analysis = result.analysis
    term = result.item.term
    hangul, romanization, ipa = _pronunciation(term, analysis, language)
    values = dict.fromkeys(FIELDS, "")
    values.update({
        "Term": _first_field(term), "Meaning": text_html(analysis.primary_meaning, lang),
        "PartOfSpeech": text_html(analysis.pos.value, lang), "Pronunciation": text_html(hangul, lang),
        "Romanization": text_html(romanization, lang), "IPA": text_html(ipa, lang),
        "Audio": f"[sound:{sound}]" if sound else "",
        "ExampleAudio": f"[sound:{example_sound}]" if example_sound else "",
        "OtherMeanings": text_html(analysis.other_meanings, lang),
        "Conjugations": _forms(analysis.conjugations, lang), "Honorifics": _forms(analysis.honorifics, lang),
        "Synonyms": _words(analysis.synonyms, lang), "Antonyms": _words(analysis.antonyms, lang),
        "Collocations": _words(analysis.collocations, lang),
        "Hanja": _target(analysis.hanja.hanja, lang) if analysis.hanja else "",
        "HanjaBreakdown": _hanja_breakdown(analysis, lang), "Homonyms": _homonyms(analysis, lang),
        "Usage": text_html(analysis.usage_context or "", lang), "Comparison": _comparison(analysis, lang),
        "MemoryImage": text_html(f"{analysis.metaphor} {analysis.anchor_sensory}", lang),
        "Explanation": text_html(analysis.explanation, lang),
        "TopikLevel": topik_level(result), "ListPosition": str(result.item.position),
        "FrequencyRank": str(result.item.frequency_rank or ""),
    })
    marked = mark(term, analysis.example.sentence, language) if analysis.example else None
    if analysis.example is not None and marked is not None:
        values["Example"] = marked.highlighted
        values["ExampleTranslation"] = text_html(analysis.example.translation, lang)
    chosen = {card.card_type for card in result.cards}
    for card in reversed(result.cards):  # the first card of a type wins
        if (names := _OPTIONAL.get(card.card_type)) is not None:
            values[names[0]], values[names[1]] = text_html(card.front, lang), text_html(card.back, lang)
    if CardType.HANJA in chosen and analysis.hanja is not None:
        values["HanjaFront"] = "Which Hanja write this word, character by character?"
    if CardType.EXAMPLE in chosen and marked is not None and marked.cloze is not None:
        values["ExampleCloze"] = marked.cloze
    return values


def build_notes(results: Iterable[TermResult], *, language: str, root_deck: str, subdecks: Subdecks,
                simulated: bool, lang: str | None = None, sounds: Mapping[str, str] | None = None,
                source: str | None = None) -> Iterator[AnkiNote]:
    """One note per word (a term listed twice keeps its first position). ``sounds`` maps a term, or a sentence,
    to its media file name; it is read as each note is built, so it may fill while ``results`` is consumed."""
    sounds = {} if sounds is None else sounds
    seen: set[str] = set()
    for result in results:
        term = result.item.term
        if term in seen:
            continue
        seen.add(term)
        sound = sounds.get(term)
        example = result.analysis.example
        example_sound = sounds.get(example.sentence.strip()) if example else None
        values = note_fields(result, language=language, lang=lang, sound=sound, example_sound=example_sound)
        cards = ("Recognition", "Production",
                 *(card for name, card in _CARD_OF_FIELD.items() if values[name]))
        yield AnkiNote(guid=note_guid(language, term, simulated=simulated),
                       deck=deck_for(result, root_deck, subdecks),
                       fields=tuple(values[name] for name in FIELDS),
                       tags=note_tags(result, simulated=simulated, source=source), term=term,
                       position=result.item.position, sound=sound, cards=cards, example_sound=example_sound)
