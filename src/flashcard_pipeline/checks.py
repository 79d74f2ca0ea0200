"""Content checks on stage answers, before they are accepted: what a schema cannot see.

Korean answers are checked against the text itself, offline: the example sentence contains the term (by lemma,
kiwipiepy), the part of speech is one the analyser allows, and every Hanja spelling reads as the word (the
``hanja`` dictionary). The pipeline re-asks once with the problems; an answer that still fails is kept and the
item flagged for review. Other languages have no analyser here and are not checked.
"""

from __future__ import annotations

from flashcard_pipeline.korean.analyzer import (
    best_head,
    has_hangul,
    head_candidates,
    is_korean,
    locate,
    pos_classes,
)
from flashcard_pipeline.korean.hanja_readings import check_hanja, readings
from flashcard_pipeline.models import CardType, FlashcardSet, PartOfSpeech, TermAnalysis

__all__ = ["applies", "check_analysis", "check_cards", "warm"]


def applies(term: str, language: str) -> bool:
    return is_korean(language) and has_hangul(term)


def warm(language: str) -> None:
    """Load what the checks load on first use (the analyser's model and its first analysis and tokenising, the
    Hanja table: about three seconds of CPU), so that a worker pays it before it holds leases (a blocked event loop
    cannot renew them) and a run while its first calls are out."""
    if is_korean(language):
        head_candidates("학교")  # its first analysis and its first tokenising each take a second more
        locate("학교", "학교에 갔어요.")
        readings("學")


def _hanja_targets(term: str) -> list[str]:
    """What a Hanja spelling may spell: the term, or its content word (학교 of 학교에, 공부 of 공부하다)."""
    targets = [term]
    for head in head_candidates(term):
        if head.lemma not in targets and all(has_hangul(c) for c in head.lemma):
            targets.append(head.lemma)
    return targets


def _hanja_problem(hanja: str, term: str) -> str | None:
    """The spelling's problem with the term, unless it spells one of the term's content words instead (looked for
    only when it does not spell the term: the analyser's six readings cost more than the check)."""
    problem = check_hanja(hanja, term)
    if problem is None or any(check_hanja(hanja, target) is None for target in _hanja_targets(term)[1:]):
        return None
    return problem


def check_analysis(analysis: TermAnalysis, *, term: str, language: str) -> list[str]:
    """The problems of a stage 1 answer, one line each; empty when it passes (or the language is not checked)."""
    if not applies(term, language):
        return []
    problems: list[str] = []
    sentence = analysis.example.sentence if analysis.example else None
    if sentence is None:
        problems.append("there is no example sentence")
    elif locate(term, sentence) is None:
        problems.append(f"the example sentence {sentence!r} does not contain {term} (checked by lemma)")
    if analysis.pos is not PartOfSpeech.PHRASE and " " not in term.strip():
        # Cheapest first, each a subset of the next: the best reading, the six best, then the sentence (tokenising
        # it is most of what a check costs, skipped where locating did not need it). A class any of them allows
        # the whole allows.
        best = best_head(term)
        allowed = best.classes if best is not None else frozenset()
        if analysis.pos not in allowed:
            allowed = pos_classes(term)
            if analysis.pos not in allowed:
                allowed = pos_classes(term, sentence)
        if allowed and analysis.pos not in allowed:
            names = ", ".join(sorted(p.value for p in allowed))
            problems.append(f"the part of speech {analysis.pos.value!r} disagrees with the morphological analyser "
                            f"({names})")
    if analysis.hanja is not None:
        spelled = "".join(c.character for c in analysis.hanja.characters)
        if spelled != analysis.hanja.hanja.replace(" ", ""):
            problems.append(f"the Hanja breakdown {spelled} does not spell {analysis.hanja.hanja}")
        if (problem := _hanja_problem(analysis.hanja.hanja, term)) is not None:
            problems.append(problem)
        for char in analysis.hanja.characters:
            if (options := readings(char.character)) and char.reading not in options:
                problems.append(f"{char.character} is read {'/'.join(sorted(options))}, not {char.reading}")
    for homonym in analysis.homonyms:
        if homonym.hanja and (problem := check_hanja(homonym.hanja, homonym.reading)) is not None:
            problems.append(f"homonym {homonym.reading}: {problem}")
    return problems


def check_cards(cards: FlashcardSet, analysis: TermAnalysis, *, term: str, language: str) -> list[str]:
    """The problems of a stage 2 answer: a Scene front that shows the term gives its own answer away."""
    if not applies(term, language):
        return []
    return [f"the {card.card_type.value} card's front shows the answer {term}"
            for card in cards.cards
            if card.card_type is CardType.SCENE and term in card.front]
