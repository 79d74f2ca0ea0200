"""How many times, how long between, and until when a failed call is made again (plain data, read from the
environment only by :mod:`flashcard_pipeline.config`)."""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Protocol, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flashcard_pipeline.errors import ErrorCategory, MalformedJSONError, SchemaViolationError, StructuredError
from flashcard_pipeline.resilience.core.backoff import exponential_delay

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

    max_attempts: int = Field(default=8, ge=1)
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
