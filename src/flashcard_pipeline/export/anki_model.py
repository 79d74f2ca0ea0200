"""The project's Anki note type: fields, card template and CSS, with ids derived from names.

Ids must not be random: Anki recognises "the same note type" and "the same deck" on a later
import by id, so a re-exported deck lands on the notes it created the first time. One note type
per target language, so the template can mark the term with its ``lang`` (which picks the right
CJK glyphs for Hanja and the right line breaking).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import genanki

from flashcard_pipeline.export.common import one_line
from flashcard_pipeline.stages import LANGUAGE_NAMES

FIELDS = ("Key", "Term", "IPA", "Meaning", "CardType", "Front", "Back", "Analysis", "Audio")
SORT_FIELD = "Term"
TEMPLATE_NAME = "Card"

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


CSS = """\
.card {
  --fp-bg: #fbfbf8;
  --fp-fg: #1f2023;
  --fp-muted: #62646b;
  --fp-accent: #2456c6;
  --fp-panel: #f0f1f4;
  --fp-rule: #d9dbe1;
  font-family: system-ui, -apple-system, "Segoe UI", "Apple SD Gothic Neo", "Noto Sans KR", "Noto Sans CJK KR",
    "Malgun Gothic", "Nanum Gothic", "Noto Sans", sans-serif;
  font-size: 20px;
  line-height: 1.6;
  text-align: center;
  color: var(--fp-fg);
  background-color: var(--fp-bg);
  margin: 0;
  padding: 1.2em 1em;
}
.card.nightMode, .nightMode .card, .night_mode .card {
  --fp-bg: #1d1e21;
  --fp-fg: #e6e6e9;
  --fp-muted: #a2a4ab;
  --fp-accent: #8fb0ff;
  --fp-panel: #2a2c31;
  --fp-rule: #3c3f46;
}
.fp { max-width: 38em; margin: 0 auto; }
.fp-front, .fp-back, .fp-analysis, .fp-term, .fp-meaning { unicode-bidi: isolate; overflow-wrap: anywhere; }
/* Korean breaks lines between words, not inside them. */
:lang(ko) { word-break: keep-all; }
.fp-type {
  display: inline-block; font-size: 0.65em; letter-spacing: 0.06em; text-transform: uppercase;
  color: var(--fp-muted); border: 1px solid var(--fp-rule); border-radius: 1em; padding: 0 0.8em;
  margin-bottom: 0.8em;
}
.fp-front { font-size: 1.1em; }
.fp-back { font-size: 1.05em; margin-bottom: 0.8em; }
hr#answer { border: none; border-top: 1px solid var(--fp-rule); margin: 1em 0; }
.fp-head { margin: 0.4em 0; }
.fp-term { font-size: 2.2em; font-weight: 600; line-height: 1.3; color: var(--fp-accent); }
.fp-ipa { display: block; font-family: "Charis SIL", "Doulos SIL", "Noto Serif", "Gentium Plus", serif;
  color: var(--fp-muted); }
.fp-meaning { font-size: 1.1em; margin: 0.2em 0 0.8em; }
.fp-analysis {
  text-align: left; font-size: 0.8em; line-height: 1.55; background: var(--fp-panel);
  border-radius: 0.6em; padding: 0.6em 1em;
}
.fp-analysis h4 { margin: 0.6em 0 0.1em; font-size: 0.8em; text-transform: uppercase; letter-spacing: 0.05em;
  color: var(--fp-muted); }
.fp-analysis p { margin: 0 0 0.3em; }
.fp-analysis ul { margin: 0.2em 0; padding-left: 1.2em; }
.fp-hanja { font-size: 1.2em; }
.fp-pos { font-style: italic; color: var(--fp-muted); }
"""


def _templates(lang: str | None) -> list[dict[str, str]]:
    lang_attr = f' lang="{lang}"' if lang else ""
    front = ('<div class="fp">\n'
             '<div class="fp-type">{{CardType}}</div>\n'
             '<div class="fp-front">{{Front}}</div>\n'
             '</div>')
    back = ('{{FrontSide}}\n'
            '<hr id="answer">\n'
            '<div class="fp">\n'
            '<div class="fp-back">{{Back}}</div>\n'
            '<div class="fp-head">'
            f'<span class="fp-term"{lang_attr}>{{{{Term}}}}</span>'
            '{{#IPA}}<span class="fp-ipa">{{IPA}}</span>{{/IPA}}'
            ' {{Audio}}</div>\n'
            '{{#Meaning}}<div class="fp-meaning">{{Meaning}}</div>{{/Meaning}}\n'
            '{{#Analysis}}<div class="fp-analysis">{{Analysis}}</div>{{/Analysis}}\n'
            '</div>')
    return [{"name": TEMPLATE_NAME, "qfmt": front, "afmt": back}]


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


def note_type(language: str) -> NoteType:
    """``Flashcard Pipeline (Korean)`` and its stable id."""
    name = f"Flashcard Pipeline ({one_line(language)})"
    lang = language_code(language)
    return NoteType(name=name, id=stable_id("notetype", name), lang=lang, fields=FIELDS,
                    templates=tuple(_templates(lang)), css=CSS)
