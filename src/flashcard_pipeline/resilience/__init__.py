"""The resilience engine: retry, circuit breaker and rate limiter around each provider call, Polly-style.

Public names (what code outside ``resilience/`` may use; everything else is internal):

* the engine: :class:`Resilience` (builder and registry: one pipeline per provider and model),
  :class:`ModelPipeline`;
* the core: :class:`CallContext`, :class:`CallNotMade`, :class:`ProviderAnswer`, :class:`CallPolicy`,
  :class:`DirectPolicy`, :class:`PolicyPipeline`, :class:`Clock`, :class:`SystemClock`, :class:`EventHub`,
  :class:`ResilienceEvent` (``resilience.testing`` has ``FakeClock`` and ``VirtualClock``);
* the configuration: :class:`RetryConfig`, :class:`CircuitBreakerConfig`, :class:`RateLimitSettings`;
* the events: :class:`RetryEvent`; :class:`CircuitTransition`, :class:`ProbeEvent`, :class:`CallRefused`,
  :class:`BreakerPause`, :class:`CircuitCreated`; :class:`LimitWait`, :class:`LimitPause`, :class:`LimitCut`,
  :class:`LimitRaise`, :class:`LimitStatus`;
* the parts, for whoever composes their own: :class:`RetryPolicy`, :class:`CircuitBreaker` with its
  :class:`CircuitBreakerStateProvider` and :class:`CircuitBreakerManualControl`, :class:`LimitGroup`,
  :class:`RateLimiter`, :class:`ShardedRateLimiter`.
"""

from flashcard_pipeline.resilience.breaker import (
    BreakerPause,
    CallRefused,
    CircuitBreaker,
    CircuitBreakerConfig,
    CircuitBreakerManualControl,
    CircuitBreakerStateProvider,
    CircuitCreated,
    CircuitState,
    CircuitTransition,
    CircuitWaitExceededError,
    ProbeEvent,
)
from flashcard_pipeline.resilience.core.clock import Clock, SystemClock
from flashcard_pipeline.resilience.core.context import CallContext, CallNotMade, ProviderAnswer
from flashcard_pipeline.resilience.core.events import EventHub, ResilienceEvent
from flashcard_pipeline.resilience.core.policy import CallPolicy, DirectPolicy, PolicyPipeline
from flashcard_pipeline.resilience.engine import ModelPipeline, Resilience
from flashcard_pipeline.resilience.ratelimit import (
    LimitCut,
    LimitGroup,
    LimitPause,
    LimitRaise,
    LimitStatus,
    LimitWait,
    RateLimiter,
    RateLimitSettings,
    ShardedRateLimiter,
)
from flashcard_pipeline.resilience.retry import JitterStrategy, RetryConfig, RetryEvent, RetryPolicy

__all__ = [
    "BreakerPause",
    "CallContext",
    "CallNotMade",
    "CallPolicy",
    "CallRefused",
    "CircuitBreaker",
    "CircuitBreakerConfig",
    "CircuitBreakerManualControl",
    "CircuitBreakerStateProvider",
    "CircuitCreated",
    "CircuitState",
    "CircuitTransition",
    "CircuitWaitExceededError",
    "Clock",
    "DirectPolicy",
    "EventHub",
    "JitterStrategy",
    "LimitCut",
    "LimitGroup",
    "LimitPause",
    "LimitRaise",
    "LimitStatus",
    "LimitWait",
    "ModelPipeline",
    "PolicyPipeline",
    "ProbeEvent",
    "ProviderAnswer",
    "RateLimitSettings",
    "RateLimiter",
    "Resilience",
    "ResilienceEvent",
    "RetryConfig",
    "RetryEvent",
    "RetryPolicy",
    "ShardedRateLimiter",
    "SystemClock",
]
