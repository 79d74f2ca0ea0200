"""The project's Anki note type: one note per word, its fields, card templates and CSS, with ids derived from names.

Ids must not be random: Anki recognises "the same note type" and "the same deck" on a later import by id, so a
re-exported deck lands on the notes it created the first time. One note type per target language, so templates
mark the language's text with its ``lang`` (keep-all line breaking, Korean glyph forms for Hanja).

Recognition and production cards exist for every word; each optional card type exists only when its fields are
filled (Anki makes no card whose front renders empty). Every back shows what answers its own card; the rest of the
analysis folds away under details/summary. The note type is versioned: a change of its fields or templates must
bump :data:`VERSION`, which changes its name and id (tests/test_cards.py pins the fingerprint).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import Any

import genanki

from flashcard_pipeline.export.common import one_line
from flashcard_pipeline.stages import LANGUAGE_NAMES

VERSION = 2
FIELDS = (
    "Term", "Meaning", "PartOfSpeech", "Pronunciation", "Romanization", "IPA", "Audio",
    "Example", "ExampleTranslation", "ExampleAudio", "ExampleCloze",
    "OtherMeanings", "Conjugations", "Honorifics", "Synonyms", "Antonyms", "Collocations",
    "Hanja", "HanjaBreakdown", "Homonyms", "Usage", "Comparison", "MemoryImage", "Explanation",
    "FrequencyRank", "TopikLevel", "ListPosition",
    "SceneFront", "SceneBack", "ComparisonFront", "ComparisonBack", "HanjaFront", "GrammarFront", "GrammarBack",
    "FormalCasualFront", "FormalCasualBack", "CulturalFront", "CulturalBack",
)
SORT_FIELD = "Term"

# genanki's documented range for model and deck ids; far from Anki's own small ids (the Default deck is 1).
_ID_BASE = 1 << 30


def stable_id(kind: str, name: str) -> int:
    """A deck or note type id that depends only on ``name``."""
    digest = hashlib.sha256(f"flashcard-pipeline:{kind}:{name}".encode()).hexdigest()
    return _ID_BASE + int(digest[:8], 16) % _ID_BASE


def deck_id(name: str) -> int:
    return stable_id("deck", name)


def language_code(language: str) -> str | None:
    """'Korean' -> 'ko' for the ``lang`` attribute; None for a language the project has no code for."""
    wanted = language.strip().lower()
    if wanted in LANGUAGE_NAMES:
        return wanted
    return next((code for code, name in LANGUAGE_NAMES.items() if name.lower() == wanted), None)


def _css() -> str:
    return resources.files(__package__).joinpath("cards.css").read_text(encoding="utf-8")


#: Sections of the folded analysis, in order: (field, heading, whether the field holds target-language text).
_DETAILS: tuple[tuple[str, str, bool], ...] = (
    ("Example", "Example", True), ("OtherMeanings", "Other meanings", False),
    ("Conjugations", "Conjugation", False), ("Honorifics", "Speech levels", False),
    ("Synonyms", "Synonyms", True), ("Antonyms", "Antonyms", True), ("Collocations", "Collocations", True),
    ("HanjaBreakdown", "Hanja", False), ("Homonyms", "Sounds the same", False), ("Usage", "Usage", False),
    ("Comparison", "Compared with", False), ("MemoryImage", "Memory image", False),
    ("Explanation", "Notes", False),
)


class _Parts:
    """Template snippets for one language."""

    def __init__(self, lang: str | None) -> None:
        self.lang = f' lang="{lang}"' if lang else ""

    def term(self) -> str:
        return f'<div class="fp-term"{self.lang}>{{{{Term}}}}</div>'

    def pronunciation(self, audio: bool = True) -> str:
        sound = " {{Audio}}" if audio else ""
        return ('<div class="fp-pron">'
                f'{{{{#Pronunciation}}}}<span{self.lang}>[{{{{Pronunciation}}}}]</span> {{{{/Pronunciation}}}}'
                '{{#Romanization}}<span class="fp-rom">{{Romanization}}</span> {{/Romanization}}'
                '{{#IPA}}<span class="fp-ipa">/{{IPA}}/</span>{{/IPA}}'
                f'{sound}</div>')

    @staticmethod
    def meaning() -> str:
        return ('<div class="fp-meaning">{{Meaning}}</div>'
                '<div class="fp-pos">{{PartOfSpeech}}{{#TopikLevel}} · TOPIK {{TopikLevel}}{{/TopikLevel}}</div>')

    def example(self) -> str:
        return (f'<div class="fp-sentence"{self.lang}>{{{{Example}}}} {{{{ExampleAudio}}}}</div>'
                '<div class="fp-translation">{{ExampleTranslation}}</div>')

    def details(self, *leave_out: str) -> str:
        sections = []
        for name, heading, target in _DETAILS:
            if name in leave_out:
                continue
            body = self.example() if name == "Example" else (
                f"<p{self.lang}>{{{{{name}}}}}</p>" if target else f"<div>{{{{{name}}}}}</div>")
            sections.append(f"{{{{#{name}}}}}<h4>{heading}</h4>{body}{{{{/{name}}}}}")
        return ('<details class="fp-details"><summary>More about this word</summary>'
                + "".join(sections)
                + '<div class="fp-meta">{{#FrequencyRank}}frequency #{{FrequencyRank}} · {{/FrequencyRank}}'
                  "list #{{ListPosition}}</div></details>")

    @staticmethod
    def label(name: str) -> str:
        return f'<div class="fp-type">{name}</div>'


def _wrap(body: str) -> str:
    return f'<div class="fp">{body}</div>'


def _back(*parts: str) -> str:
    return '{{FrontSide}}\n<hr id="answer">\n' + _wrap("".join(parts))


def _optional(name: str, field: str, prompt: str) -> str:
    """A front that renders empty (so Anki makes no card) unless ``field`` is filled."""
    return f"{{{{#{field}}}}}" + _wrap(_Parts.label(name) + prompt) + f"{{{{/{field}}}}}"


def _templates(lang: str | None, language: str) -> list[dict[str, str]]:
    p = _Parts(lang)
    identity = p.term() + p.pronunciation() + p.meaning()
    prompt = '<div class="fp-prompt">{{{{{}}}}}</div>'.format
    answer = '<div class="fp-answer">{{{{{}}}}}</div>'.format
    return [
        {"name": "Recognition",
         "qfmt": _wrap(p.label("Meaning?") + p.term() + "{{Audio}}"),
         "afmt": _back(p.pronunciation(audio=False), p.meaning(), p.details())},
        {"name": "Production",
         "qfmt": _wrap(p.label(f"Say it in {language}") + p.meaning()
                       + '{{#ExampleTranslation}}<div class="fp-translation">“{{ExampleTranslation}}”</div>'
                         "{{/ExampleTranslation}}"),
         "afmt": _back(p.term(), p.pronunciation(), p.details())},
        {"name": "Scene", "qfmt": _optional("Scene", "SceneFront", prompt("SceneFront")),
         "afmt": _back(identity, answer("SceneBack"), p.details())},
        {"name": "Usage-Comparison", "qfmt": _optional("Usage", "ComparisonFront", prompt("ComparisonFront")),
         "afmt": _back(answer("ComparisonBack"), identity, p.details("Comparison"))},
        {"name": "Hanja",
         "qfmt": _optional("Hanja", "HanjaFront", p.term() + prompt("HanjaFront")),
         "afmt": _back('<div class="fp-answer">{{HanjaBreakdown}}</div>', p.pronunciation(), p.meaning(),
                       p.details("HanjaBreakdown"))},
        {"name": "Grammar", "qfmt": _optional("Grammar", "GrammarFront", prompt("GrammarFront")),
         "afmt": _back(answer("GrammarBack"), '{{#Conjugations}}<div class="fp-answer">{{Conjugations}}</div>'
                       "{{/Conjugations}}", identity, p.details("Conjugations"))},
        {"name": "Formal-Casual", "qfmt": _optional("Speech level", "FormalCasualFront", prompt("FormalCasualFront")),
         "afmt": _back(answer("FormalCasualBack"), '{{#Honorifics}}<div class="fp-answer">{{Honorifics}}</div>'
                       "{{/Honorifics}}", identity, p.details("Honorifics"))},
        {"name": "Example",
         "qfmt": _optional("Fill the gap", "ExampleCloze",
                           f'<div class="fp-sentence"{p.lang}>{{{{ExampleCloze}}}}</div>'
                           '<div class="fp-translation">{{ExampleTranslation}}</div>'),
         "afmt": "{{FrontSide}}\n<hr id=\"answer\">\n" + _wrap(
             f'<div class="fp-sentence"{p.lang}>{{{{Example}}}} {{{{ExampleAudio}}}}</div>' + identity
             + p.details("Example"))},
        {"name": "Cultural", "qfmt": _optional("Culture", "CulturalFront", prompt("CulturalFront")),
         "afmt": _back(answer("CulturalBack"), identity, p.details())},
    ]


@dataclass(frozen=True)
class NoteType:
    """The note type for one target language, in a form both genanki and AnkiConnect can use."""

    name: str
    id: int
    lang: str | None
    fields: tuple[str, ...]
    templates: tuple[dict[str, str], ...]
    css: str

    def genanki_model(self) -> genanki.Model:
        return genanki.Model(
            model_id=self.id, name=self.name, fields=[{"name": name} for name in self.fields],
            templates=[dict(t) for t in self.templates], css=self.css,
            sort_field_index=self.fields.index(SORT_FIELD))

    def ankiconnect_params(self) -> dict[str, Any]:
        """Parameters of AnkiConnect's ``createModel``."""
        return {"modelName": self.name, "inOrderFields": list(self.fields), "css": self.css, "isCloze": False,
                "cardTemplates": [{"Name": t["name"], "Front": t["qfmt"], "Back": t["afmt"]}
                                  for t in self.templates]}

    @property
    def template_names(self) -> tuple[str, ...]:
        return tuple(t["name"] for t in self.templates)


def note_type(language: str) -> NoteType:
    """``Flashcard Pipeline v2 (Korean)`` and its stable id (a new version is a new note type)."""
    name = f"Flashcard Pipeline v{VERSION} ({one_line(language)})"
    lang = language_code(language)
    return NoteType(name=name, id=stable_id("notetype", name), lang=lang, fields=FIELDS,
                    templates=tuple(_templates(lang, one_line(language))), css=_css())
