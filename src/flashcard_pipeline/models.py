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


class Comparison(_Strict):
    vs: ShortText = Field(description="the word most often confused with the term")
    nuance: MediumText = Field(description="how the two differ in meaning or use")


class Homonym(_Strict):
    hanja: ShortText = Field(description="the Chinese characters")
    reading: ShortText = Field(description="their reading in the target language")
    meaning: ShortText
    differentiator: MediumText = Field(description="how to tell this homonym apart")


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

    @property
    def has_hanja(self) -> bool:
        return bool(self.homonyms)


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

    @model_validator(mode="after")
    def _has_cards(self) -> TermResult:
        if not self.cards:
            raise ValueError("a result needs at least one card")
        return self


_LIMIT_WORDS = {
    "minItems": "at least {} items",
    "maxItems": "at most {} items",
    "maxLength": "at most {} characters",
}
_UNSUPPORTED_IN_STRICT = ("maxLength", "minLength", "maxItems", "minItems", "pattern", "default", "format")


def strict_json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema in the subset that OpenAI-style ``strict`` structured output accepts.

    Strict mode wants every property required and ``additionalProperties: false``; optional
    fields stay nullable. Length limits it cannot express move into the description, and our own
    validation enforces them on the answer.
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
