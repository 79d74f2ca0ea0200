"""LLM access: provider resolution, the async chat-completions client and the policy seam."""

from flashcard_pipeline.llm.client import (
    LLMClient,
    estimate_request_tokens,
    estimate_tokens,
    parse_retry_after,
    redact,
)
from flashcard_pipeline.llm.policy import CallContext, CallPolicy, DirectPolicy, PolicyPipeline
from flashcard_pipeline.llm.providers import ProviderConfig, ProviderName, resolve_provider
from flashcard_pipeline.llm.types import ChatMessage, ChatRequest, ChatResponse, Usage

__all__ = [
    "CallContext",
    "CallPolicy",
    "ChatMessage",
    "ChatRequest",
    "ChatResponse",
    "DirectPolicy",
    "LLMClient",
    "PolicyPipeline",
    "ProviderConfig",
    "ProviderName",
    "Usage",
    "estimate_request_tokens",
    "estimate_tokens",
    "parse_retry_after",
    "redact",
    "resolve_provider",
]
