"""Value types exchanged with the LLM client: what we send and what a successful call returns.

They are plain frozen dataclasses so the stages, the ledger and the resilience engine can pass
them around without depending on httpx or on any provider's wire format.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class ChatRequest:
    """One chat-completions call, independent of the provider it goes to."""

    model: str
    messages: tuple[ChatMessage, ...]
    response_format: dict[str, Any] | None = None
    temperature: float = 0.4
    max_tokens: int = 1500
    #: Provider-specific body fields (e.g. OpenRouter routing preferences); core fields win on clashes.
    extra_body: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.messages, tuple):
            # Callers naturally build lists; a tuple keeps the frozen request really immutable.
            object.__setattr__(self, "messages", tuple(self.messages))

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = dict(self.extra_body)
        body.update(
            model=self.model,
            messages=[message.to_dict() for message in self.messages],
            temperature=self.temperature,
            max_tokens=self.max_tokens,
        )
        if self.response_format is not None:
            body["response_format"] = self.response_format
        return body


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    #: Only providers that report a price (OpenRouter with ``usage.include``) fill this in.
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
