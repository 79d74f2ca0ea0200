"""The resilience engine: policies that wrap each provider call (retry now; breaker and limiter next).

Every policy takes its time from an injectable :class:`Clock`; tests use
:class:`~flashcard_pipeline.resilience.testing.FakeClock`.
"""

from flashcard_pipeline.resilience.clock import Clock, SystemClock
from flashcard_pipeline.resilience.retry import (
    DEFAULT_RETRY_CATEGORIES,
    JitterStrategy,
    RandomSource,
    RetryConfig,
    RetryEvent,
    RetryPolicy,
    RetryStats,
    exponential_delay,
    jittered_delay,
)

__all__ = [
    "DEFAULT_RETRY_CATEGORIES",
    "Clock",
    "JitterStrategy",
    "RandomSource",
    "RetryConfig",
    "RetryEvent",
    "RetryPolicy",
    "RetryStats",
    "SystemClock",
    "exponential_delay",
    "jittered_delay",
]
