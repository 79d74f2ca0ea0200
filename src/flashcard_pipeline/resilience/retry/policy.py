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

Time and randomness are injected (:class:`~flashcard_pipeline.resilience.core.clock.Clock`,
:class:`RandomSource`) so tests never sleep and jitter is reproducible.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from flashcard_pipeline.errors import StructuredError
from flashcard_pipeline.resilience.core.clock import Clock, SystemClock
from flashcard_pipeline.resilience.core.context import CallContext
from flashcard_pipeline.resilience.core.events import EventHub, ResilienceEvent
from flashcard_pipeline.resilience.retry.config import REASK_ERRORS, RandomSource, RetryConfig

log = logging.getLogger("flashcard_pipeline.resilience.retry")
T = TypeVar("T")


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
class RetryEvent(ResilienceEvent):
    """What the policy decided after a failed call: ``retry`` (scheduled after ``delay``), ``reask`` or
    ``give_up`` (with its ``reason``)."""

    action: Literal["retry", "reask", "give_up"]
    #: Calls made so far for this request, the failed one included.
    attempt: int
    error: StructuredError
    #: Seconds until the next call (0 for re-asks and give-ups).
    delay: float
    context: CallContext
    reason: GiveUpReason | None = None


class RetryPolicy:
    """A :class:`~flashcard_pipeline.resilience.core.policy.CallPolicy` that retries per :class:`RetryConfig`.

    Put it outermost in a :class:`~flashcard_pipeline.resilience.core.policy.PolicyPipeline` so each retry
    passes through the breaker and limiter again. Its decisions go to ``events`` as :class:`RetryEvent`.
    """

    def __init__(
        self,
        config: RetryConfig | None = None,
        *,
        clock: Clock | None = None,
        rng: RandomSource | None = None,
        events: EventHub | None = None,
    ) -> None:
        self.config = config or RetryConfig()
        self.clock: Clock = clock or SystemClock()
        self.rng: RandomSource = rng or random.Random()
        self.events = events if events is not None else EventHub()
        self.stats = RetryStats()
        self._monotonic = self.clock.monotonic
        self._warned_nested = False

    def __repr__(self) -> str:
        return f"RetryPolicy({self.config!r})"

    async def execute(self, call: Callable[[], Awaitable[T]], context: CallContext) -> T:
        if context.retrying:
            return await self._nested(call)
        context.retrying = True
        context.paused = 0.0
        try:
            started = self._monotonic()
            self.stats.attempts += 1
            try:
                return await call()
            except StructuredError as exc:
                error = exc
            # Out of the except block, so later errors do not chain onto this one.
            return await self._retry(call, context, error, started)
        finally:
            context.retrying = False

    async def _nested(self, call: Callable[[], Awaitable[T]]) -> T:
        if not self._warned_nested:
            self._warned_nested = True
            log.warning("a retry policy runs inside another one's call; only the outer one retries")
        return await call()

    def retryable(self, error: StructuredError) -> bool:
        return error.retryable and not error.aborts_run and error.category in self.config.retry_categories

    async def _retry(self, call: Callable[[], Awaitable[T]], context: CallContext, error: StructuredError,
                     started: float) -> T:
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
            trying = self._monotonic() - started - context.paused
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
        self.events.emit(event)

    def _give_up(self, error: StructuredError, context: CallContext, calls: int, reasks: int,
                 reason: GiveUpReason) -> StructuredError:
        self.stats.gave_up += 1
        error.details["retry"] = {"calls": calls, "reasks": reasks, "gave_up": reason}
        log.info("giving up on %s %r after %d calls (%s): %s/%s: %s", context.stage, context.item_key, calls,
                 reason, error.category.value, error.code, error.message)
        self.events.emit(RetryEvent("give_up", calls, error, 0.0, context, reason))
        return error
