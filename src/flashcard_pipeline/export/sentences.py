"""The term inside its example sentence: highlighted on the back, blanked for the cloze card.

Model text is escaped before it reaches a card, so the highlight is ours: the term's word is located in the
sentence (for Korean by the morphological analyser, so 먹었어 is found for 먹다) and only that span is marked.
"""

from __future__ import annotations

from dataclasses import dataclass

from flashcard_pipeline.export.common import html_text
from flashcard_pipeline.korean.analyzer import Span, has_hangul, is_korean, locate

GAP = '<span class="fp-gap">&nbsp;</span>'


@dataclass(frozen=True)
class MarkedSentence:
    #: The sentence as HTML with the term's word in ``<mark class="fp-hl">``.
    highlighted: str
    #: The sentence as HTML with the term's word blanked, or None when the term was not found in it.
    cloze: str | None


def find_term(term: str, sentence: str, language: str) -> Span | None:
    if is_korean(language) or has_hangul(term):
        return locate(term, sentence)
    index = sentence.casefold().find(term.strip().casefold())
    return Span(index, index + len(term.strip())) if index >= 0 and term.strip() else None


def mark(term: str, sentence: str, language: str) -> MarkedSentence:
    span = find_term(term, sentence, language)
    if span is None:
        return MarkedSentence(highlighted=html_text(sentence), cloze=None)
    before, word, after = sentence[:span.start], sentence[span.start:span.end], sentence[span.end:]
    return MarkedSentence(
        highlighted=f'{html_text(before)}<mark class="fp-hl">{html_text(word)}</mark>{html_text(after)}',
        cloze=f"{html_text(before)}{GAP}{html_text(after)}")
