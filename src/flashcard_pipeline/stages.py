"""The two stages as pure functions: build the request (and its cache key), parse the answer.

Nothing here does I/O, so the same code serves the pipeline, ``--dry-run`` estimates and tests.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from flashcard_pipeline import jsontext
from flashcard_pipeline.errors import ConfigurationError, MalformedJSONError, SchemaViolationError
from flashcard_pipeline.llm.capabilities import CHAT, ModelCapabilities, ModelKind, capabilities_for, parse_model_kind
from flashcard_pipeline.llm.client import estimate_request_tokens, estimate_tokens
from flashcard_pipeline.llm.providers import ProviderName
from flashcard_pipeline.llm.types import ChatMessage, ChatRequest, check_params
from flashcard_pipeline.models import (
    FlashcardSet,
    TermAnalysis,
    VocabularyItem,
    strict_json_schema,
    validate_cards_against_analysis,
)
from flashcard_pipeline.prompts import DEFAULT_PROMPTS, PromptTemplate, load_prompt

NUANCE = "nuance"
CARDS = "cards"
SCHEMA_NAMES = {NUANCE: "term_analysis", CARDS: "flashcard_set"}

LANGUAGE_NAMES = {
    "ko": "Korean", "en": "English", "ja": "Japanese", "zh": "Chinese", "es": "Spanish", "fr": "French",
    "de": "German", "it": "Italian", "pt": "Portuguese", "ru": "Russian", "vi": "Vietnamese", "th": "Thai",
    "ar": "Arabic", "hi": "Hindi", "id": "Indonesian", "tr": "Turkish", "nl": "Dutch", "pl": "Polish",
}


def language_name(value: str) -> str:
    """'ko' -> 'Korean'; a full name passes through (title-cased), so any language works."""
    value = value.strip()
    if not value:
        raise ConfigurationError("a language must not be empty")
    return LANGUAGE_NAMES.get(value.lower(), value[:1].upper() + value[1:])


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON a provider accepts")


def _param_value(raw: str) -> Any:
    """JSON when it parses (``7``, ``0.9``, ``true``, ``{"effort": "high"}``), else the text itself (``high``)."""
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except ValueError:
        return raw.strip()


def parse_params(pairs: Iterable[str]) -> dict[str, Any]:
    """``--param KEY=VALUE`` options as body fields; a repeated key keeps its last value.

    Raises :class:`ConfigurationError` for a pair without ``=`` or a key, and for keys the pipeline
    sends itself (see :data:`~flashcard_pipeline.llm.types.RESERVED_PARAMS`).
    """
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigurationError(f"--param expects KEY=VALUE (VALUE may be JSON), got {pair!r}",
                                     code="invalid_param", details={"param": pair})
        params[key] = _param_value(raw)
    check_params(params)
    return params


@dataclass(frozen=True)
class StageSettings:
    """Everything that shapes a stage request apart from the item itself."""

    provider: str
    model: str
    language: str = "Korean"
    learner_language: str = "English"
    nuance_prompt: PromptTemplate = field(default_factory=lambda: load_prompt(DEFAULT_PROMPTS[NUANCE]))
    cards_prompt: PromptTemplate = field(default_factory=lambda: load_prompt(DEFAULT_PROMPTS[CARDS]))
    extra_body: dict[str, Any] = field(default_factory=dict)
    #: ``--param`` values, from :func:`parse_params`.
    params: dict[str, Any] = field(default_factory=dict)
    model_kind: ModelKind = ModelKind.AUTO

    def __post_init__(self) -> None:
        check_params(self.params)
        object.__setattr__(self, "model_kind", parse_model_kind(self.model_kind))

    @property
    def prompt_versions(self) -> dict[str, str]:
        return {NUANCE: self.nuance_prompt.version, CARDS: self.cards_prompt.version}

    @property
    def capabilities(self) -> ModelCapabilities:
        return capabilities_for(self.provider, self.model, self.model_kind)

    @property
    def run_key_material(self) -> dict[str, Any]:
        """What ``--param`` and the model's kind add to a run's identity; empty for a chat model without
        ``--param``, so run keys from before these options existed stay valid."""
        material: dict[str, Any] = {}
        if self.params:
            material["params"] = self.params
        if self.capabilities != CHAT:
            material["capabilities"] = {"token_parameter": self.capabilities.token_parameter,
                                        "temperature": self.capabilities.supports_temperature}
        return material


@dataclass(frozen=True)
class StageRequest:
    stage: str
    request: ChatRequest
    cache_key: str
    prompt_version: str
    #: Prompt estimate plus ``max_tokens``: what a token budget must hold for this call (computed once).
    estimated_tokens: int = 0


#: Cache keys' JSON for values that may hold floats (generation parameters); :func:`jsontext.canonical` writes the
#: same text, faster, for those without.
_canonical = jsontext.standard_canonical


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class _Format:
    """A stage's ``response_format`` with what every request would otherwise recompute from it: pydantic's schema
    generation, its canonical JSON (for cache keys) and its token estimate cost about a millisecond a request."""

    value: dict[str, Any]
    canonical: str
    tokens: int


@functools.cache
def _stage_format(stage: str, model: type[BaseModel]) -> _Format:
    value = {"type": "json_schema",
             "json_schema": {"name": SCHEMA_NAMES[stage], "strict": True, "schema": strict_json_schema(model)}}
    return _Format(value=value, canonical=_canonical(value),
                   tokens=estimate_tokens(json.dumps(value, ensure_ascii=False)))


def _response_format(stage: str, model: type[BaseModel]) -> dict[str, Any]:
    """Shared by every request of the stage: nothing may change it."""
    return _stage_format(stage, model).value


def _canonical_with(data: dict[str, Any], known: dict[str, str]) -> str:
    """``_canonical(data)`` for a dict, with the canonical JSON of some values given: the same text, since a sorted
    compact dump is each key's dump followed by its value's, in key order."""
    return "{" + ",".join(f"{_canonical(key)}:{known[key] if key in known else _canonical(data[key])}"
                          for key in sorted(data)) + "}"


def cache_key_for(provider: str, request: ChatRequest, prompt_version: str, upstream: str | None = None,
                  *, format_json: str | None = None) -> str:
    """Hash of provider, model, every generation parameter, prompt version, messages and schema.

    The item's position is deliberately absent: the same term at another place in another list
    is the same question and gets the same (already paid) answer. So is OpenRouter's default
    ``require_parameters``: it picks who answers, not what is asked, and leaving it out keeps the keys
    of answers cached before it was sent. A ``--param provider=...`` is the user's choice and counts.
    """
    body = replace(request, require_parameters=False).to_body()
    body = {k: v for k, v in body.items() if k not in ("usage", "stream")}
    # The messages (most of the text) are strings only.
    known = {"messages": jsontext.canonical(body["messages"])}
    if format_json is not None and "response_format" in body:
        known["response_format"] = format_json
    material = {"provider": provider, "prompt_version": prompt_version, "upstream": upstream}
    return sha256_text(_canonical_with({**material, "body": body}, {"body": _canonical_with(body, known)}))


def _build(stage: str, template: PromptTemplate, settings: StageSettings, payload: dict[str, Any],
           output: type[BaseModel], upstream: str | None = None) -> StageRequest:
    system, user = template.render(language=settings.language, learner_language=settings.learner_language,
                                   input_json=jsontext.indented(payload))
    capabilities = settings.capabilities
    response_format = _stage_format(stage, output)
    request = ChatRequest(
        model=settings.model,
        messages=(ChatMessage("system", system), ChatMessage("user", user)),
        response_format=response_format.value,
        temperature=template.temperature if capabilities.supports_temperature else None,
        max_tokens=template.max_tokens,
        token_parameter=capabilities.token_parameter,
        params=settings.params,
        # Without it OpenRouter may route to an upstream that ignores the schema.
        require_parameters=settings.provider == ProviderName.OPENROUTER,
        extra_body=settings.extra_body,
    )
    return StageRequest(stage=stage, request=request, prompt_version=template.version,
                        cache_key=cache_key_for(settings.provider, request, template.version, upstream,
                                                format_json=response_format.canonical),
                        estimated_tokens=estimate_request_tokens(request, format_tokens=response_format.tokens))


def build_nuance_request(item: VocabularyItem, settings: StageSettings) -> StageRequest:
    payload = {"term": item.term, "type": item.type, "language": settings.language,
               "learner_language": settings.learner_language, "hints": item.hints}
    return _build(NUANCE, settings.nuance_prompt, settings, payload, TermAnalysis)


def build_cards_request(item: VocabularyItem, analysis: TermAnalysis, settings: StageSettings) -> StageRequest:
    analysis_json = analysis.model_dump(mode="json")
    payload = {"term": item.term, "language": settings.language, "learner_language": settings.learner_language,
               "analysis": analysis_json, "hints": item.hints}
    return _build(CARDS, settings.cards_prompt, settings, payload, FlashcardSet,
                  upstream=sha256_text(jsontext.canonical(analysis_json)))


_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


def _load_json(content: str, stage: str) -> Any:
    fenced = _FENCE.match(content)
    text = fenced.group(1) if fenced else content
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedJSONError(f"{stage}: the answer is not valid JSON ({exc.msg} at char {exc.pos})",
                                 details={"stage": stage, "length": len(content)}) from exc


#: Validation errors kept with a schema violation (all of them go back to the model on a re-ask, up to this many).
MAX_SCHEMA_ERRORS = 20


def _schema_error(stage: str, exc: PydanticValidationError) -> SchemaViolationError:
    problems = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
                for e in exc.errors(include_url=False)[:MAX_SCHEMA_ERRORS]]
    more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
    return SchemaViolationError(f"{stage}: the answer does not match the schema: {'; '.join(problems[:3])}{more}",
                                details={"stage": stage, "errors": problems})


M = TypeVar("M", bound=BaseModel)


def _validated(model: type[M], content: str, stage: str) -> M:
    """``content`` as ``model``. Most answers are plain JSON that fits, which pydantic reads in one pass; the rest
    (a fenced answer, bad JSON, a schema violation) go the long way, for the errors a re-ask quotes."""
    try:
        return model.model_validate_json(content)
    except PydanticValidationError:
        pass
    data = _load_json(content, stage)
    try:
        return model.model_validate(data)
    except PydanticValidationError as exc:
        raise _schema_error(stage, exc) from exc


def parse_nuance(content: str, item: VocabularyItem) -> TermAnalysis:
    analysis = _validated(TermAnalysis, content, NUANCE)
    if analysis.term != item.term:
        analysis = analysis.model_copy(update={"term": item.term})
    return analysis


def parse_cards(content: str, analysis: TermAnalysis) -> FlashcardSet:
    cards = _validated(FlashcardSet, content, CARDS)
    try:
        return validate_cards_against_analysis(cards, analysis)
    except PydanticValidationError as exc:
        raise _schema_error(CARDS, exc) from exc
    except ValueError as exc:
        raise SchemaViolationError(f"{CARDS}: {exc}", details={"stage": CARDS}) from exc
