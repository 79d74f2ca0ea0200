"""Value types exchanged with the LLM client: what we send and what a successful call returns.

They are plain frozen dataclasses so the stages, the ledger and the resilience engine can pass
them around without depending on httpx or on any provider's wire format.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from flashcard_pipeline.errors import ConfigurationError
from flashcard_pipeline.llm.capabilities import TokenParameter

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


#: Body fields a ``--param`` may not set: the pipeline owns them (the budget feeds token estimates and limits).
RESERVED_PARAMS = frozenset({"model", "messages", "response_format", "stream", "n",
                             "max_tokens", "max_completion_tokens"})


def check_params(params: Mapping[str, Any]) -> None:
    """Refuse ``--param`` values that would replace what the pipeline itself sends."""
    reserved = sorted(RESERVED_PARAMS.intersection(params))
    if reserved:
        raise ConfigurationError(
            f"--param cannot set {', '.join(reserved)}: the pipeline sets it"
            + (" (the budget is the prompt template's max_tokens)" if {"max_tokens", "max_completion_tokens"}
               .intersection(reserved) else ""),
            code="reserved_param", details={"params": reserved})
    if "provider" in params and not isinstance(params["provider"], Mapping):
        raise ConfigurationError('--param provider must be a JSON object, e.g. provider=\'{"sort":"price"}\'',
                                 code="invalid_param", details={"params": ["provider"]})


@dataclass(frozen=True)
class ChatRequest:
    """One chat-completions call, independent of the provider it goes to.

    Body precedence, lowest first: ``extra_body``, ``temperature``, ``params``, then the core fields.
    """

    model: str
    messages: tuple[ChatMessage, ...]
    response_format: dict[str, Any] | None = None
    #: ``None`` leaves it out: reasoning models reject anything but their default.
    temperature: float | None = 0.4
    #: The completion budget; ``token_parameter`` only chooses the name it is sent under.
    max_tokens: int = 1500
    token_parameter: TokenParameter = "max_tokens"
    #: The user's ``--param`` values (top_p, seed, reasoning_effort, ...).
    params: Mapping[str, Any] = field(default_factory=dict)
    #: OpenRouter: route only to upstreams that honour every parameter sent, the response schema above all.
    require_parameters: bool = False
    #: Provider-specific body fields (e.g. OpenRouter routing preferences); core fields win on clashes.
    extra_body: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.messages, tuple):
            # Callers naturally build lists; a tuple keeps the frozen request really immutable.
            object.__setattr__(self, "messages", tuple(self.messages))
        check_params(self.params)

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {k: v for k, v in self.extra_body.items()
                                if k not in ("temperature", "max_tokens", "max_completion_tokens")}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        body.update(self.params)
        body.update(model=self.model, messages=[message.to_dict() for message in self.messages])
        body[self.token_parameter] = self.max_tokens
        if self.response_format is not None:
            body["response_format"] = self.response_format
        if self.require_parameters:
            preferences = body.get("provider")
            # The user's own require_parameters (even false) wins over the default.
            body["provider"] = {"require_parameters": True,
                                **(preferences if isinstance(preferences, Mapping) else {})}
        return body


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    #: Only providers that report a price fill this in (OpenRouter: ``usage.cost``, always present).
    cost_usd: float | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class ChatResponse:
    """A usable answer: non-empty content that was not cut off. Content is still unparsed text."""

    content: str
    finish_reason: str | None
    usage: Usage
    model: str
    response_id: str | None
    latency_s: float
    status_code: int
    #: Case-insensitive response headers, kept so rate-limit code can read ``x-ratelimit-*``.
    headers: Mapping[str, str] = field(default_factory=dict)
