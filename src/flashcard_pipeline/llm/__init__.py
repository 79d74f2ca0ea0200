"""LLM access: provider resolution and the async chat-completions client."""

from flashcard_pipeline.llm.capabilities import (
    ModelCapabilities,
    ModelKind,
    capabilities_for,
    model_kind_of,
    parse_model_kind,
)
from flashcard_pipeline.llm.client import (
    LLMClient,
    estimate_request_tokens,
    estimate_tokens,
    parse_retry_after,
    redact,
)
from flashcard_pipeline.llm.providers import ProviderConfig, ProviderName, resolve_provider
from flashcard_pipeline.llm.types import RESERVED_PARAMS, ChatMessage, ChatRequest, ChatResponse, Usage, check_params

__all__ = [
    "RESERVED_PARAMS",
    "ChatMessage",
    "ChatRequest",
    "ChatResponse",
    "LLMClient",
    "ModelCapabilities",
    "ModelKind",
    "ProviderConfig",
    "ProviderName",
    "Usage",
    "capabilities_for",
    "check_params",
    "estimate_request_tokens",
    "estimate_tokens",
    "model_kind_of",
    "parse_model_kind",
    "parse_retry_after",
    "redact",
    "resolve_provider",
]
