"""Domain models at the pipeline's boundaries: vocabulary items in, analyses and cards out.

The stage models double as the contract with the LLM: their JSON schema (made strict by
:func:`strict_json_schema`) is sent as ``response_format``, and every answer is validated
against them before it is stored.
"""

from __future__ import annotations

import copy
import re
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

ShortText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=120)]
MediumText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=400)]
LongText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1200)]

_TAG = re.compile(r"^[^\s:]+:[^\s]+$")


class PartOfSpeech(StrEnum):
    NOUN = "noun"
    VERB = "verb"
    ADJECTIVE = "adjective"
    ADVERB = "adverb"
    PARTICLE = "particle"
    DETERMINER = "determiner"
    NUMERAL = "numeral"
    PRONOUN = "pronoun"
    INTERJECTION = "interjection"
    PHRASE = "phrase"


class CardType(StrEnum):
    SCENE = "Scene"
    USAGE_COMPARISON = "Usage-Comparison"
    HANJA = "Hanja"
    GRAMMAR = "Grammar"
    FORMAL_CASUAL = "Formal-Casual"
    EXAMPLE = "Example"
    CULTURAL = "Cultural"


class HonorificLevel(StrEnum):
    FORMAL = "formal"
    CASUAL = "casual"
    NEUTRAL = "neutral"
    NONE = "none"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VocabularyItem(_Strict):
    """One row of the learner's list, as read from the input file."""

    position: int = Field(ge=1, description="1-based position in the input; never part of a cache key")
    term: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
    type: str | None = Field(default=None, max_length=40, description="part of speech as given in the input")
    hints: dict[str, str] = Field(default_factory=dict, description="extra columns given to the model as hints")
    source_row: int | None = Field(default=None, description="line/record number in the input file")
    frequency_rank: int | None = Field(default=None, ge=1, description="the list's frequency rank column; like "
                                                                          "the position, never part of a cache key")


class Comparison(_Strict):
    vs: ShortText = Field(description="the word most often confused with the term")
    nuance: MediumText = Field(description="how the two differ in meaning or use")


class Homonym(_Strict):
    """Another word that sounds the same as the term (눈 'eye' and 눈 'snow'), native or Sino-Korean."""

    hanja: ShortText | None = Field(default=None, description="its Chinese characters, or null for a native word")
    reading: ShortText = Field(description="how it is read (the same sound as the term)")
    meaning: ShortText
    differentiator: MediumText = Field(description="how to tell this homonym apart")


class ExampleSentence(_Strict):
    sentence: MediumText = Field(description="a natural sentence in the target language that uses the term")
    translation: MediumText = Field(description="its translation into the learner's language")


class Form(_Strict):
    """A conjugated or honorific form of a verb or adjective."""

    label: ShortText = Field(description="which form, e.g. 'present polite (-아요/어요)'")
    form: ShortText = Field(description="the form, in the target language's script")


class HanjaCharacter(_Strict):
    character: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2)]
    meaning: ShortText = Field(description="its native gloss (훈) in the target language, e.g. 배울 for 學")
    reading: ShortText = Field(description="its reading (음), e.g. 학 for 學")
    gloss: ShortText = Field(description="its meaning in the learner's language, e.g. 'learn'")


class HanjaSpelling(_Strict):
    """The term's own Hanja, character by character (學 배울 학 + 校 학교 교)."""

    hanja: ShortText = Field(description="the term's Chinese characters, e.g. 學校 for 학교")
    characters: list[HanjaCharacter] = Field(min_length=1, max_length=8)


class TermAnalysis(_Strict):
    """Stage 1 ("nuance"): a structured analysis of one term."""

    term: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
    ipa: ShortText
    pos: PartOfSpeech
    primary_meaning: ShortText
    other_meanings: Annotated[str, StringConstraints(strip_whitespace=True, max_length=400)] = ""
    metaphor: MediumText
    metaphor_noun: ShortText
    metaphor_action: ShortText
    suggested_location: ShortText
    anchor_object: ShortText
    anchor_sensory: MediumText
    explanation: LongText
    usage_context: MediumText | None = None
    comparison: Comparison | None = None
    homonyms: list[Homonym] = Field(default_factory=list, max_length=5)
    keywords: list[ShortText] = Field(default_factory=list, max_length=10)
    # Version 2 (prompt nuance.v2). The defaults let answers stored by version 1 still load.
    example: ExampleSentence | None = None
    conjugations: list[Form] = Field(default_factory=list, max_length=8)
    honorifics: list[Form] = Field(default_factory=list, max_length=4)
    synonyms: list[ShortText] = Field(default_factory=list, max_length=5)
    antonyms: list[ShortText] = Field(default_factory=list, max_length=5)
    collocations: list[ShortText] = Field(default_factory=list, max_length=6)
    hanja: HanjaSpelling | None = None

    @property
    def has_hanja(self) -> bool:
        """The term is written with Hanja (version 1 answers listed the term's own Hanja as homonyms)."""
        return self.hanja is not None or any(h.hanja for h in self.homonyms)


class Flashcard(_Strict):
    card_type: CardType
    front: LongText
    back: LongText
    tags: list[str] = Field(default_factory=list, max_length=12)
    honorific_level: HonorificLevel = HonorificLevel.NONE

    @field_validator("tags")
    @classmethod
    def _tags_are_key_value(cls, tags: list[str]) -> list[str]:
        for tag in tags:
            if len(tag) > 60 or not _TAG.match(tag):
                raise ValueError(f"tag {tag!r} must look like key:value with no spaces")
        return tags


class FlashcardSet(_Strict):
    """Stage 2: the cards made from one term and its analysis."""

    cards: list[Flashcard] = Field(min_length=2, max_length=4)


def validate_cards_against_analysis(cards: FlashcardSet, analysis: TermAnalysis) -> FlashcardSet:
    """Reject a Hanja card for a term whose analysis has no Hanja (the model invented it)."""
    if not analysis.has_hanja and any(c.card_type is CardType.HANJA for c in cards.cards):
        raise ValueError("a Hanja card was produced for a term without Hanja homonyms")
    return cards


class TermResult(_Strict):
    """Everything the pipeline produced for one vocabulary item; what exporters consume."""

    item: VocabularyItem
    analysis: TermAnalysis
    cards: list[Flashcard]
    #: Content checks the answers still failed after one re-ask ("nuance: ..."); the item needs review.
    flags: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _has_cards(self) -> TermResult:
        if not self.cards:
            raise ValueError("a result needs at least one card")
        return self


#: Strict structured outputs accept ``minItems`` and ``maxItems`` on arrays, so those stay in the schema; string
#: lengths, which it rejects, move into the description.
_LIMIT_WORDS = {"maxLength": "at most {} characters"}
_UNSUPPORTED_IN_STRICT = ("maxLength", "minLength", "pattern", "default", "format")


def strict_json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema in the subset that OpenAI-style ``strict`` structured output accepts.

    Strict mode wants every property required and ``additionalProperties: false``; optional
    fields stay nullable. Array bounds (``minItems``/``maxItems``) stay; string length limits, which it cannot
    express, move into the description, and our own validation enforces them on the answer.
    """
    schema = copy.deepcopy(model.model_json_schema())

    def visit(node: Any) -> None:
        if isinstance(node, list):
            for value in node:
                visit(value)
            return
        if not isinstance(node, dict):
            return
        limits = [text.format(node[k]) for k, text in _LIMIT_WORDS.items() if k in node]
        for key in (*_UNSUPPORTED_IN_STRICT, "title"):
            node.pop(key, None)
        if limits:
            node["description"] = (node.get("description", "") + f" ({'; '.join(limits)})").strip()
        properties = node.get("properties")
        if isinstance(properties, dict):
            node["additionalProperties"] = False
            node["required"] = list(properties)
            for value in properties.values():
                visit(value)
        for key, value in node.items():
            if key == "$defs":
                for definition in value.values():
                    visit(definition)
            elif key not in ("properties", "required", "enum"):
                visit(value)

    visit(schema)
    return schema
