"""Which request parameters a model accepts, so every provider gets a body it does not reject.

OpenAI's reasoning models (o-series, gpt-5 family) answer HTTP 400 to ``max_tokens`` and to any
``temperature`` other than the default. A table of model-name rules decides the kind of a model;
``--model-kind`` overrides it for names the table cannot know (fine-tunes, Azure deployments).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from flashcard_pipeline.errors import ConfigurationError

TokenParameter = Literal["max_tokens", "max_completion_tokens"]


class ModelKind(StrEnum):
    AUTO = "auto"
    CHAT = "chat"
    REASONING = "reasoning"


@dataclass(frozen=True)
class ModelCapabilities:
    """The wire name of the completion budget and whether a non-default temperature is accepted."""

    token_parameter: TokenParameter = "max_tokens"
    supports_temperature: bool = True


#: First full match wins; a name matching none is a chat model. An ``openai/`` prefix (OpenRouter) is ignored.
#: Every gpt-5 name counts, ``gpt-5-chat-latest`` too: omitting temperature and sending
#: ``max_completion_tokens`` is accepted by every OpenAI model, the reverse is a 400.
MODEL_RULES: tuple[tuple[re.Pattern[str], ModelKind], ...] = (
    (re.compile(r"o[1-9](-.*)?"), ModelKind.REASONING),
    (re.compile(r"gpt-5([.-].*)?"), ModelKind.REASONING),
)

CHAT = ModelCapabilities()
#: OpenRouter documents ``max_tokens`` and translates it for each upstream; temperature still has to go,
#: because with ``require_parameters`` an unsupported parameter leaves no provider to route to.
OPENROUTER_REASONING = ModelCapabilities(token_parameter="max_tokens", supports_temperature=False)
OPENAI_REASONING = ModelCapabilities(token_parameter="max_completion_tokens", supports_temperature=False)


def parse_model_kind(value: ModelKind | str) -> ModelKind:
    """``--model-kind`` / ``FLASHCARD_MODEL_KIND`` as a :class:`ModelKind`, or a one-line configuration error."""
    try:
        return ModelKind(str(value).strip().lower())
    except ValueError:
        choices = "|".join(kind.value for kind in ModelKind)
        raise ConfigurationError(f"--model-kind must be one of {choices}, got {value!r}",
                                 code="invalid_model_kind") from None


def model_kind_of(model: str, kind: ModelKind | str = ModelKind.AUTO) -> ModelKind:
    """The explicit kind, or for ``auto`` the kind the first matching rule gives the model's name."""
    kind = parse_model_kind(kind)
    if kind is not ModelKind.AUTO:
        return kind
    name = model.strip().lower().removeprefix("openai/")
    return next((rule_kind for pattern, rule_kind in MODEL_RULES if pattern.fullmatch(name)), ModelKind.CHAT)


@functools.cache
def capabilities_for(provider: str, model: str, kind: ModelKind | str = ModelKind.AUTO) -> ModelCapabilities:
    """What ``model`` accepts when sent through ``provider`` (a :class:`ProviderName` value)."""
    if model_kind_of(model, kind) is ModelKind.CHAT:
        return CHAT
    return OPENROUTER_REASONING if str(provider) == "openrouter" else OPENAI_REASONING
