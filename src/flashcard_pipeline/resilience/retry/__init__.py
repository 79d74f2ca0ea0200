"""Retry: the one loop that makes a failed call again (exponential back-off, jitter, re-asks, deadline)."""

from flashcard_pipeline.resilience.retry.config import (
    DEFAULT_RETRY_CATEGORIES,
    JitterStrategy,
    RandomSource,
    RetryConfig,
    jittered_delay,
)
from flashcard_pipeline.resilience.retry.policy import RetryEvent, RetryPolicy, RetryStats

__all__ = [
    "DEFAULT_RETRY_CATEGORIES",
    "JitterStrategy",
    "RandomSource",
    "RetryConfig",
    "RetryEvent",
    "RetryPolicy",
    "RetryStats",
    "jittered_delay",
]
