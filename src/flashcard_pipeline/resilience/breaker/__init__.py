"""Circuit breaker: stop calling a provider that keeps failing, probe it now and then, resume when it answers."""

from flashcard_pipeline.resilience.breaker.circuit import CircuitBreaker, CircuitCreated
from flashcard_pipeline.resilience.breaker.config import (
    DEFAULT_FAILURE_CATEGORIES,
    MAX_BREAK_SECONDS,
    BreakDurationArguments,
    BreakDurationGenerator,
    CircuitBreakerConfig,
    Classifier,
    default_classifier,
    exponential_break_duration,
)
from flashcard_pipeline.resilience.breaker.control import CircuitBreakerManualControl, CircuitBreakerStateProvider
from flashcard_pipeline.resilience.breaker.events import (
    BreakerPause,
    CallRefused,
    CircuitState,
    CircuitTransition,
    CircuitWaitExceededError,
    HealthInfo,
    Permit,
    ProbeEvent,
)
from flashcard_pipeline.resilience.breaker.wait import BreakerWaitStats, CircuitWaiter

__all__ = [
    "DEFAULT_FAILURE_CATEGORIES",
    "MAX_BREAK_SECONDS",
    "BreakDurationArguments",
    "BreakDurationGenerator",
    "BreakerPause",
    "BreakerWaitStats",
    "CallRefused",
    "CircuitBreaker",
    "CircuitBreakerConfig",
    "CircuitBreakerManualControl",
    "CircuitBreakerStateProvider",
    "CircuitCreated",
    "CircuitState",
    "CircuitTransition",
    "CircuitWaitExceededError",
    "CircuitWaiter",
    "Classifier",
    "HealthInfo",
    "Permit",
    "ProbeEvent",
    "default_classifier",
    "exponential_break_duration",
]
