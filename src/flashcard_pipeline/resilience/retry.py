"""Retry with exponential back-off and jitter: the one retry loop around each provider call.

Rules it keeps, and why:

* Only errors that say so are retried (``retryable``, a category in ``retry_categories``, never
  ``aborts_run``): a 400, 401, 402 or 403 costs the same every time it is repeated.
* The next call never starts before the server's ``Retry-After``; when that wait is longer than
  ``max_retry_after`` or than what is left of ``max_elapsed``, it gives up at once instead of
  sleeping in vain.
* Invalid JSON and schema violations are re-asked from their own small budget (``max_reasks``),
  immediately and without feeding the error back, so a model that keeps answering badly costs at
  most ``max_attempts + max_reasks`` calls per request, never a product of the two.
* One loop per call: a ``RetryPolicy`` running inside another one's call does not retry again.
* ``asyncio.CancelledError`` (and any non-structured exception, which is a bug) propagates at once.

Time and randomness are injected (:class:`~flashcard_pipeline.resilience.clock.Clock`,
:class:`RandomSource`) so tests never sleep and jitter is reproducible.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, Protocol, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flashcard_pipeline.errors import (
    ErrorCategory,
    MalformedJSONError,
    SchemaViolationError,
    StructuredError,
)
from flashcard_pipeline.llm.policy import RETRY_SCOPE, CallContext
from flashcard_pipeline.resilience.clock import Clock, SystemClock

__all__ = [
    "DEFAULT_RETRY_CATEGORIES",
    "JitterStrategy",
    "RandomSource",
    "RetryConfig",
    "RetryEvent",
    "RetryPolicy",
    "RetryStats",
    "exponential_delay",
    "jittered_delay",
]

log = logging.getLogger("flashcard_pipeline.resilience.retry")
T = TypeVar("T")

DEFAULT_RETRY_CATEGORIES: frozenset[ErrorCategory] = frozenset({
    ErrorCategory.RATE_LIMIT,
    ErrorCategory.EXTERNAL_SERVICE,
    ErrorCategory.NETWORK,
    ErrorCategory.TIMEOUT,
    ErrorCategory.INVALID_RESPONSE,
    ErrorCategory.CIRCUIT_OPEN,
})

#: Bad output from the model: re-asked from the separate ``max_reasks`` budget.
REASK_ERRORS: tuple[type[StructuredError], ...] = (MalformedJSONError, SchemaViolationError)



class JitterStrategy(StrEnum):
    """How the exponential delay is randomised so that clients failing together do not retry together."""

    NONE = "none"
    #: The plan's ``delay * (0.5 + random() * 0.5)``: between half and all of the delay.
    PLAN = "plan"
    #: AWS "full jitter": ``uniform(0, delay)``.
    FULL = "full"
    #: AWS "decorrelated jitter": ``min(max_delay, uniform(initial_delay, previous * 3))``.
    DECORRELATED = "decorrelated"


class RandomSource(Protocol):
    def random(self) -> float:
        """A float in [0, 1)."""
        ...


def exponential_delay(attempt: int, *, initial: float, base: float, cap: float) -> float:
    """``min(cap, initial * base ** (attempt - 1))`` without overflow for any ``attempt >= 1``."""
    if initial <= 0 or cap <= 0:
        return 0.0
    if attempt <= 1 or base <= 1 or cap <= initial:
        return min(initial, cap)
    exponent = attempt - 1
    # Compare logarithms instead of computing base ** exponent (or cap / initial, infinite for a subnormal
    # initial), either of which overflows.
    if exponent >= (math.log(cap) - math.log(initial)) / math.log(base):
        return cap
    try:
        return min(cap, float(initial) * float(base) ** exponent)
    except OverflowError:  # only reachable with an infinite cap
        return cap


def jittered_delay(
    strategy: JitterStrategy,
    delay: float,
    rng: RandomSource,
    *,
    initial: float = 0.0,
    previous: float = 0.0,
    cap: float = math.inf,
) -> float:
    """Apply ``strategy`` to an exponential ``delay``; ``previous``/``initial`` matter only to DECORRELATED."""
    if strategy is JitterStrategy.PLAN:
        return delay * (0.5 + rng.random() * 0.5)
    if strategy is JitterStrategy.FULL:
        return delay * rng.random()
    if strategy is JitterStrategy.DECORRELATED:
        low, high = initial, max(initial, previous * 3)
        return min(cap, low + (high - low) * rng.random())
    return delay


class RetryConfig(BaseModel):
    """How many times, how long between, and until when a failed call is made again.

    ``max_attempts`` counts calls that end in a transient error (the first call included);
    ``max_reasks`` counts extra calls after invalid JSON or schema violations; ``max_elapsed`` is the
    deadline in seconds from the first call; ``max_retry_after`` is the longest ``Retry-After`` worth
    waiting for. ``None`` switches the last two off.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_attempts: int = Field(default=3, ge=1)
    initial_delay: float = Field(default=1.0, ge=0.0)
    max_delay: float = Field(default=60.0, ge=0.0)
    exponential_base: float = Field(default=2.0, ge=1.0)
    jitter_enabled: bool = True
    jitter_strategy: JitterStrategy = JitterStrategy.PLAN
    max_elapsed: float | None = Field(default=300.0, gt=0.0)
    max_retry_after: float | None = Field(default=120.0, ge=0.0)
    max_reasks: int = Field(default=2, ge=0)
    retry_categories: frozenset[ErrorCategory] = DEFAULT_RETRY_CATEGORIES

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.max_delay < self.initial_delay:
            raise ValueError(f"max_delay ({self.max_delay}) must be at least initial_delay ({self.initial_delay})")
        if not all(math.isfinite(v) for v in (self.initial_delay, self.max_delay, self.exponential_base)):
            raise ValueError("delays and exponential_base must be finite")
        return self

    @property
    def strategy(self) -> JitterStrategy:
        """The jitter actually applied: NONE when jitter is switched off."""
        return self.jitter_strategy if self.jitter_enabled else JitterStrategy.NONE

    def backoff(self, retry: int) -> float:
        """The delay before retry number ``retry`` (1 = the first retry), capped at ``max_delay``, unjittered."""
        return exponential_delay(retry, initial=self.initial_delay, base=self.exponential_base, cap=self.max_delay)

    def delay(self, retry: int, rng: RandomSource, previous: float | None = None) -> float:
        """The jittered wait before retry number ``retry``; DECORRELATED grows from ``previous``, the last
        such wait (``initial_delay`` before the first), instead of from ``retry``."""
        strategy = self.strategy
        if strategy is JitterStrategy.DECORRELATED:
            last = self.initial_delay if previous is None else previous
            return jittered_delay(strategy, 0.0, rng, initial=self.initial_delay, previous=last, cap=self.max_delay)
        backoff = self.backoff(retry)
        return backoff if strategy is JitterStrategy.NONE else jittered_delay(strategy, backoff, rng)

    @classmethod
    def from_env(cls) -> RetryConfig:
        """Defaults overridden by ``RETRY_MAX_ATTEMPTS``, ``RETRY_INITIAL_DELAY``, ``RETRY_MAX_DELAY``,
        ``RETRY_JITTER_ENABLED`` and the other fields' ``RETRY_<FIELD>`` variables."""
        from flashcard_pipeline.config import RetrySettings, read_settings  # config imports us

        return cls.model_validate(read_settings(RetrySettings).model_dump())


@dataclass
class RetryStats:
    """Counters for the progress display and telemetry; only the event loop writes them."""

    #: Every call made, first ones included.
    attempts: int = 0
    #: Calls made again after a transient error.
    retries: int = 0
    #: Calls made again after invalid JSON or a schema violation.
    reasks: int = 0
    #: Requests abandoned with a retryable error (budget spent, wait beyond cap or deadline).
    gave_up: int = 0
    #: Seconds spent waiting between calls.
    waited: float = 0.0


GiveUpReason = Literal["attempts_exhausted", "reasks_exhausted", "retry_after_exceeds_cap", "deadline"]


@dataclass(frozen=True)
class RetryEvent:
    """What the policy decided after a failed call (passed to ``on_retry``)."""

    action: Literal["retry", "reask", "give_up"]
    #: Calls made so far for this request, the failed one included.
    attempt: int
    error: StructuredError
    #: Seconds until the next call (0 for re-asks and give-ups).
    delay: float
    context: CallContext
    reason: GiveUpReason | None = None


class RetryPolicy:
    """A :class:`~flashcard_pipeline.llm.policy.CallPolicy` that retries per :class:`RetryConfig`.

    Put it outermost in a :class:`~flashcard_pipeline.llm.policy.PolicyPipeline` so each retry passes
    through the breaker and limiter again.
    """

    def __init__(
        self,
        config: RetryConfig | None = None,
        *,
        clock: Clock | None = None,
        rng: RandomSource | None = None,
        on_retry: Callable[[RetryEvent], Any] | None = None,
    ) -> None:
        self.config = config or RetryConfig()
        self.clock: Clock = clock or SystemClock()
        self.rng: RandomSource = rng or random.Random()
        self.on_retry = on_retry
        self.stats = RetryStats()
        self._monotonic = self.clock.monotonic
        self._warned_nested = False

    def __repr__(self) -> str:
        return f"RetryPolicy({self.config!r})"

    async def execute(self, call: Callable[[], Awaitable[T]], context: CallContext) -> T:
        if RETRY_SCOPE.get() is not None:
            return await self._nested(call)
        paused = [0.0]
        token = RETRY_SCOPE.set(paused)
        try:
            started = self._monotonic()
            self.stats.attempts += 1
            try:
                return await call()
            except StructuredError as exc:
                error = exc
            # Out of the except block, so later errors do not chain onto this one.
            return await self._retry(call, context, error, started, paused)
        finally:
            RETRY_SCOPE.reset(token)

    async def _nested(self, call: Callable[[], Awaitable[T]]) -> T:
        if not self._warned_nested:
            self._warned_nested = True
            log.warning("a retry policy runs inside another one's call; only the outer one retries")
        return await call()

    def retryable(self, error: StructuredError) -> bool:
        return error.retryable and not error.aborts_run and error.category in self.config.retry_categories

    async def _retry(self, call: Callable[[], Awaitable[T]], context: CallContext, error: StructuredError,
                     started: float, paused: list[float]) -> T:
        config = self.config
        calls = 1
        transient = reasks = 0
        previous: float | None = None
        while True:
            if not self.retryable(error):
                raise error
            if isinstance(error, REASK_ERRORS):
                if reasks >= config.max_reasks:
                    raise self._give_up(error, context, calls, reasks, "reasks_exhausted")
                reasks += 1
                action: Literal["retry", "reask"] = "reask"
                delay = 0.0
            else:
                transient += 1
                if transient >= config.max_attempts:
                    raise self._give_up(error, context, calls, reasks, "attempts_exhausted")
                asked = error.retry_after
                cap = config.max_retry_after
                if asked is not None and (not math.isfinite(asked) or (cap is not None and asked > cap)):
                    raise self._give_up(error, context, calls, reasks, "retry_after_exceeds_cap")
                backoff = previous = config.delay(transient, self.rng, previous)
                action = "retry"
                delay = backoff if asked is None else max(backoff, asked)
            trying = self._monotonic() - started - paused[0]
            if config.max_elapsed is not None and trying + delay > config.max_elapsed:
                raise self._give_up(error, context, calls, reasks, "deadline")

            self._announce(RetryEvent(action, calls, error, delay, context))
            if delay > 0:
                await self.clock.sleep(delay)
                self.stats.waited += delay
            if context.before_retry is not None:
                context.before_retry()
            calls += 1
            self.stats.attempts += 1
            if action == "retry":
                self.stats.retries += 1
            else:
                self.stats.reasks += 1
            try:
                return await call()
            except StructuredError as exc:
                error = exc

    def _announce(self, event: RetryEvent) -> None:
        error, context = event.error, event.context
        if event.action == "retry":
            log.info("call %d for %s %r failed (%s/%s: %s); retrying in %.2fs", event.attempt, context.stage,
                     context.item_key, error.category.value, error.code, error.message, event.delay)
        else:
            log.info("re-asking for %s %r after %s/%s: %s", context.stage, context.item_key,
                     error.category.value, error.code, error.message)
        if self.on_retry is not None:
            self.on_retry(event)

    def _give_up(self, error: StructuredError, context: CallContext, calls: int, reasks: int,
                 reason: GiveUpReason) -> StructuredError:
        self.stats.gave_up += 1
        error.details["retry"] = {"calls": calls, "reasks": reasks, "gave_up": reason}
        log.info("giving up on %s %r after %d calls (%s): %s/%s: %s", context.stage, context.item_key, calls,
                 reason, error.category.value, error.code, error.message)
        if self.on_retry is not None:
            self.on_retry(RetryEvent("give_up", calls, error, 0.0, context, reason))
        return error
