"""Korean morphology with kiwipiepy: which word of a sentence is the term, and which part of speech a term is.

The analyser loads its model once per process (about two seconds), on first use, so importing this module
costs nothing and runs in other languages never load it.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flashcard_pipeline.models import PartOfSpeech

KOREAN_NAMES = frozenset({"korean", "ko", "kor", "한국어"})
_HANGUL = re.compile(r"[\uac00-\ud7a3]")
_TOP_N = 6

#: Kiwi (Sejong) tags -> the classes a learner's list may call them.
_CLASSES: dict[str, frozenset[PartOfSpeech]] = {
    "NNG": frozenset({PartOfSpeech.NOUN}), "NNP": frozenset({PartOfSpeech.NOUN}),
    "NNB": frozenset({PartOfSpeech.NOUN}), "NR": frozenset({PartOfSpeech.NUMERAL, PartOfSpeech.NOUN}),
    "NP": frozenset({PartOfSpeech.PRONOUN}), "XR": frozenset({PartOfSpeech.NOUN, PartOfSpeech.ADJECTIVE}),
    "VV": frozenset({PartOfSpeech.VERB}), "VX": frozenset({PartOfSpeech.VERB, PartOfSpeech.ADJECTIVE}),
    "VA": frozenset({PartOfSpeech.ADJECTIVE}), "VCP": frozenset({PartOfSpeech.VERB, PartOfSpeech.PARTICLE}),
    "VCN": frozenset({PartOfSpeech.ADJECTIVE, PartOfSpeech.VERB}),
    "MAG": frozenset({PartOfSpeech.ADVERB}), "MAJ": frozenset({PartOfSpeech.ADVERB}),
    "MM": frozenset({PartOfSpeech.DETERMINER, PartOfSpeech.PRONOUN, PartOfSpeech.NUMERAL}),
    "IC": frozenset({PartOfSpeech.INTERJECTION}), "SN": frozenset({PartOfSpeech.NUMERAL}),
}
#: 있다, 없다 and 계시다 are verbs in some dictionaries and adjectives in others.
_EITHER_VERB_OR_ADJECTIVE = frozenset({"있다", "없다", "계시다"})
_DERIVING_SUFFIX = {"XSV": PartOfSpeech.VERB, "XSA": PartOfSpeech.ADJECTIVE}


def is_hangul(char: str) -> bool:
    return bool(_HANGUL.fullmatch(char))


def has_hangul(text: str) -> bool:
    return bool(_HANGUL.search(text))


def is_korean(language: str) -> bool:
    return language.strip().lower() in KOREAN_NAMES


@dataclass(frozen=True)
class Morpheme:
    form: str
    tag: str
    start: int
    end: int
    lemma: str


@dataclass(frozen=True)
class Span:
    """Character offsets of the term's word in a sentence: ``sentence[start:end]``."""

    start: int
    end: int


@dataclass(frozen=True)
class Head:
    """The content word of a term (나 in 내가, 먹다 in 먹다, 공부 in 공부하다) and the classes it can be."""

    lemma: str
    tag: str
    classes: frozenset[PartOfSpeech]


#: One load per process, even when a run warms the model in a thread while its event loop checks an answer.
_LOADING = threading.Lock()


@functools.cache
def _load_kiwi() -> Any:
    from kiwipiepy import Kiwi

    # The typo and multi-word dictionaries slow loading and change nothing for dictionary forms.
    return Kiwi(num_workers=1, model_type="cong", load_typo_dict=False, load_multi_dict=False)


def _kiwi() -> Any:
    with _LOADING:
        return _load_kiwi()


def _morphemes(tokens: Any) -> tuple[Morpheme, ...]:
    # Irregular stems carry a suffix (VV-R, VA-I): the class is what matters here.
    return tuple(Morpheme(t.form, t.tag.split("-")[0], t.start, t.start + t.len, t.lemma or t.form) for t in tokens)


@functools.lru_cache(maxsize=256)
def _analysed(text: str) -> tuple[Morpheme, ...]:
    """Remembered for a while: the checks look for the term in an example sentence twice (is it there, what
    class is it), and tokenising it is most of what they cost."""
    return _morphemes(_kiwi().tokenize(text))


def morphemes(text: str) -> list[Morpheme]:
    """The best analysis of ``text``, with character offsets into it."""
    return list(_analysed(text))


def _group(tag: str) -> str:
    if tag.startswith(("NN", "NP", "NR", "XR")):
        return "N"
    if tag.startswith(("VV", "VA", "VX", "VC")):
        return "V"
    return tag[:2] if tag.startswith(("M", "J", "E", "I", "S")) else tag


def _head(tokens: Sequence[Morpheme]) -> Head | None:
    content = [i for i, t in enumerate(tokens) if not t.tag.startswith(("S", "J", "E", "X"))]
    if not content:
        particles = [t for t in tokens if t.tag.startswith(("J", "E"))]
        if not particles:
            return None
        first = particles[0]
        return Head(first.lemma, first.tag, frozenset({PartOfSpeech.PARTICLE}))
    index = content[0]
    token = tokens[index]
    classes = set(_CLASSES.get(token.tag, frozenset()))
    after = tokens[index + 1] if index + 1 < len(tokens) else None
    if after is not None and after.tag in _DERIVING_SUFFIX:
        classes = {_DERIVING_SUFFIX[after.tag]}
    if token.lemma in _EITHER_VERB_OR_ADJECTIVE:
        classes |= {PartOfSpeech.VERB, PartOfSpeech.ADJECTIVE}
    return Head(token.lemma, token.tag, frozenset(classes))


@functools.lru_cache(maxsize=4096)
def best_head(term: str) -> Head | None:
    """The term's content word in the analyser's best reading alone: half the cost of six readings, and enough
    for most checks (:func:`head_candidates` always includes it)."""
    for tokens, _score in _kiwi().analyze(term, top_n=1):
        return _head(_morphemes(tokens))
    return None  # pragma: no cover - the analyser always gives a reading


@functools.lru_cache(maxsize=4096)
def head_candidates(term: str) -> tuple[Head, ...]:
    """The term's content word in each of the analyser's six best readings, best first, without repeats (six,
    not one: a list may fairly call 그럼 an adverb, the fifth reading). The best reading alone, analysed on its
    own, is one of them on every term of a 10,000-word list; it is added should it ever not be, so that what
    :func:`best_head` allows these allow too."""
    heads: list[Head] = []
    for tokens, _score in _kiwi().analyze(term, top_n=_TOP_N):
        head = _head(_morphemes(tokens))
        if head is not None and head not in heads:
            heads.append(head)
    best = best_head(term)
    if best is not None and best not in heads:  # pragma: no cover - never seen
        heads.append(best)
    return tuple(heads)


def pos_classes(term: str, context: str | None = None) -> frozenset[PartOfSpeech]:
    """Every class the analyser can give ``term``: alone (six best readings) and, with ``context``, where it
    stands in that sentence. Empty when the term has nothing the analyser classifies (foreign letters)."""
    classes: set[PartOfSpeech] = set()
    for head in head_candidates(term):
        classes |= head.classes
    if context and (found := _find(term, context)) is not None:
        tokens, index = found
        if (head := _head(tokens[index:])) is not None:
            classes |= head.classes
    return frozenset(classes)


def _word_start(text: str, index: int) -> bool:
    return index == 0 or not (text[index - 1].isalnum() or is_hangul(text[index - 1]))


def _find(term: str, sentence: str) -> tuple[tuple[Morpheme, ...], int] | None:
    """The sentence's morphemes and the index of the first one that is the term's content word."""
    heads = head_candidates(term)
    if not heads:
        return None
    tokens = _analysed(sentence)
    for index, token in enumerate(tokens):
        for head in heads:
            if token.lemma == head.lemma and _group(token.tag) == _group(head.tag):
                return tokens, index
    return None


_ATTACHED = ("E", "XS", "VCP")


def locate(term: str, sentence: str) -> Span | None:
    """Where ``term`` stands in ``sentence``: its exact surface form when the sentence uses it as a word
    (내가 in 내가 밥을 먹었어), else the inflected word of the same lemma (먹었어 for 먹다, 공부하고 for
    공부하다, 학교 in 학교에).
    None when the sentence does not contain the term's word at all."""
    term = term.strip()
    if not term or not sentence:
        return None
    tokens: tuple[Morpheme, ...] | None = None
    # str.find, not re.finditer: every term is a new pattern, and compiling it cost more than the search.
    start = sentence.find(term)
    while start >= 0:
        end = start + len(term)
        if _word_start(sentence, start):
            if end == len(sentence) or not is_hangul(sentence[end]):
                return Span(start, end)
            # 나 at the start of 나무 is no hit; 나 in 나는 is (its morpheme is the term's word).
            tokens = tokens if tokens is not None else _analysed(sentence)
            at_start = {t.lemma for t in tokens if t.start == start}
            best = best_head(term)  # most often enough; the six readings only when it is not
            if (best is not None and best.lemma in at_start) or any(h.lemma in at_start
                                                                    for h in head_candidates(term)):
                return Span(start, end)
        start = sentence.find(term, end)
    found = _find(term, sentence)
    if found is None:
        return None
    tokens, index = found
    head = tokens[index]
    start, end = head.start, head.end
    for token in tokens[index + 1:]:
        if token.start > end or " " in sentence[end:token.start] or not token.tag.startswith(_ATTACHED):
            break
        end = max(end, token.end)
    return Span(start, end)


def join(morphs: list[tuple[str, str]]) -> str:
    """Morphemes joined into a word as Korean spells it, irregular stems and contractions included
    (먹 + 었 + 어요 -> 먹었어요, 듣 + 어요 -> 들어요)."""
    return str(_kiwi().join(morphs))
