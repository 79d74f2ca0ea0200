"""The builder and registry of an engine: one pipeline per provider and model, one clock, one event hub.

``Resilience(retry=..., breaker=..., ratelimit=...)`` takes plain configuration (``None`` leaves a layer out)
and is itself a :class:`~flashcard_pipeline.resilience.core.policy.CallPolicy`: each call goes to the pipeline of
its context's provider and model, made on first use as ``[retry, breaker, limit group]``, outermost first. The
retry policy is shared (its counters are the run's); each pair gets its own circuit and its own limits. Every
layer reports to :attr:`Resilience.events`, where the progress display, the run's metrics and the breakers'
database sync subscribe (and telemetry next).
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from flashcard_pipeline.resilience.breaker import (
    BreakDurationGenerator,
    CircuitBreaker,
    CircuitBreakerConfig,
    CircuitBreakerManualControl,
    CircuitCreated,
    CircuitWaiter,
    Classifier,
)
from flashcard_pipeline.resilience.core.clock import Clock, SystemClock
from flashcard_pipeline.resilience.core.context import CallContext
from flashcard_pipeline.resilience.core.events import EventHub
from flashcard_pipeline.resilience.core.policy import CallPolicy, PolicyPipeline
from flashcard_pipeline.resilience.ratelimit import LimitBackend, LimitGroup, RateLimits, RateLimitSettings
from flashcard_pipeline.resilience.retry import RandomSource, RetryConfig, RetryPolicy

log = logging.getLogger("flashcard_pipeline.resilience")
T = TypeVar("T")


@dataclass(frozen=True)
class ModelPipeline:
    """The layers one provider and model's calls pass through."""

    provider: str
    model: str
    breaker: CircuitBreaker | None
    limits: LimitGroup | None
    policy: CallPolicy


class Resilience:
    """Makes and keeps the pipeline of each (provider, model); see the module docstring."""

    def __init__(self, *, retry: RetryConfig | None = None, breaker: CircuitBreakerConfig | None = None,
                 ratelimit: RateLimitSettings | None = None, clock: Clock | None = None,
                 rng: RandomSource | None = None, events: EventHub | None = None,
                 limits: LimitBackend[Any] | None = None,
                 break_duration_generator: BreakDurationGenerator | None = None,
                 classify: Classifier | None = None) -> None:
        self.clock: Clock = clock or SystemClock()
        self.events = events if events is not None else EventHub()
        self.retry = None if retry is None else RetryPolicy(retry, clock=self.clock, rng=rng or random.Random(),
                                                           events=self.events)
        self.breaker_config = breaker
        self.waiter = None if breaker is None else CircuitWaiter(breaker.max_wait, clock=self.clock,
                                                                 events=self.events)
        #: Isolates, closes or resets every circuit made so far (and those made later).
        self.manual_control = CircuitBreakerManualControl()
        self._generator = break_duration_generator
        self._classify = classify
        self.ratelimit = None if ratelimit is None else RateLimits(ratelimit, clock=self.clock, events=self.events,
                                                                   limits=limits)
        self._pipelines: dict[tuple[str, str], ModelPipeline] = {}
        self._execute: dict[tuple[str, str], Callable[[Callable[[], Awaitable[Any]], CallContext],
                                                      Awaitable[Any]]] = {}

    def __repr__(self) -> str:
        layers = [name for name, on in (("retry", self.retry), ("breaker", self.breaker_config),
                                        ("ratelimit", self.ratelimit)) if on is not None]
        return f"Resilience({'+'.join(layers) or 'direct'}, {len(self._pipelines)} pipelines)"

    # -- the registry ----------------------------------------------------------------------------------

    def pipeline(self, provider: str, model: str) -> ModelPipeline:
        """The pipeline of ``provider`` and ``model``, made on first use."""
        found = self._pipelines.get((provider, model))
        if found is not None:
            return found
        breaker = None if self.breaker_config is None else CircuitBreaker(
            self.breaker_config, name=f"{provider}/{model}", clock=self.clock,
            break_duration_generator=self._generator, classify=self._classify, events=self.events,
            waiter=self.waiter)
        limits = None if self.ratelimit is None else self.ratelimit.group(provider, model)
        layers = [layer for layer in (self.retry, breaker, limits) if layer is not None]
        policy: CallPolicy = layers[0] if len(layers) == 1 else PolicyPipeline(layers)
        made = self._pipelines[provider, model] = ModelPipeline(provider, model, breaker, limits, policy)
        self._execute[provider, model] = policy.execute
        if breaker is not None:
            self.manual_control.attach(breaker)
            self.events.emit(CircuitCreated(breaker))
        return made

    def execute(self, call: Callable[[], Awaitable[T]], context: CallContext) -> Awaitable[T]:
        """The pipeline's own coroutine (every layer is an ``async def``), so the lookup adds no frame."""
        execute = self._execute.get(context.key)
        if execute is None:
            self.pipeline(context.provider, context.model)
            execute = self._execute[context.key]
        return execute(call, context)

    @staticmethod
    def find(policy: CallPolicy | None) -> Resilience | None:
        """The engine ``policy`` is, or the first one inside it (nested in pipelines): what a run attaches its
        display, metrics and breaker commands to."""
        if isinstance(policy, Resilience):
            return policy
        if isinstance(policy, PolicyPipeline):
            return next((found for inner in policy.policies if (found := Resilience.find(inner)) is not None), None)
        return None

    # -- breakers ---------------------------------------------------------------------------------------

    @property
    def breakers(self) -> dict[str, CircuitBreaker]:
        """Every circuit made so far, by name (``provider/model``)."""
        return {p.breaker.name: p.breaker for p in self._pipelines.values() if p.breaker is not None}

    def breaker(self, provider: str, model: str) -> CircuitBreaker:
        """The breaker of ``provider`` and ``model`` (made with its pipeline if needed)."""
        breaker = self.pipeline(provider, model).breaker
        if breaker is None:
            raise LookupError("this engine has no circuit breaker")
        return breaker

    def breaker_named(self, name: str) -> CircuitBreaker:
        """The breaker called ``provider/model`` (made if needed, so a circuit can be isolated before use)."""
        provider, _, model = name.partition("/")
        if not provider or not model:
            raise ValueError(f"a circuit is named provider/model, got {name!r}")
        return self.breaker(provider, model)

    def breaker_snapshot(self) -> dict[str, dict[str, Any]]:
        return {name: breaker.state_provider.stats() for name, breaker in self.breakers.items()}

    # -- rate limits ------------------------------------------------------------------------------------

    @property
    def limit_groups(self) -> list[LimitGroup]:
        return [p.limits for p in self._pipelines.values() if p.limits is not None]

    def limit_group(self, provider: str, model: str) -> LimitGroup:
        """The limits of ``provider`` and ``model`` (made with its pipeline if needed)."""
        group = self.pipeline(provider, model).limits
        if group is None:
            raise LookupError("this engine has no rate limiter")
        return group

    @asynccontextmanager
    async def publishing(self, publish: Callable[[dict[str, Any]], Awaitable[None]],
                         interval: float | None = None) -> AsyncIterator[None]:
        """Publish the rate limits' snapshot every ``interval`` s (``RL_PUBLISH_INTERVAL``) while the block runs
        and once at its end; nothing without a rate limiter."""
        if self.ratelimit is None:
            yield
            return
        async with self.ratelimit.publishing(publish, lambda: self.limit_groups, interval):
            yield

    async def aclose(self) -> None:
        """Release the rate limiter's backend (a Redis connection)."""
        if self.ratelimit is not None:
            await self.ratelimit.aclose()
