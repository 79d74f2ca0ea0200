"""When a circuit trips, how long it stays open, and what counts as a failure (plain data; the ``CB_*``
variables are read by :mod:`flashcard_pipeline.config`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flashcard_pipeline.errors import ErrorCategory, StructuredError
from flashcard_pipeline.resilience.core.backoff import exponential_delay

log = logging.getLogger("flashcard_pipeline.resilience.circuit_breaker")

#: Provider and network trouble. A bad request, a 429 or an unusable answer means the provider did
#: answer, so by default they count as successes (the rate limiter and the re-ask budget handle them).
DEFAULT_FAILURE_CATEGORIES: frozenset[ErrorCategory] = frozenset({
    ErrorCategory.EXTERNAL_SERVICE,
    ErrorCategory.NETWORK,
    ErrorCategory.TIMEOUT,
})
#: A generator's answer is clamped to this, so "forever" still fits in a datetime.
MAX_BREAK_SECONDS = 365 * 86_400.0


def _finite(default: float, *, gt: float | None = None, ge: float | None = None, le: float | None = None) -> Any:
    return Field(default=default, allow_inf_nan=False, gt=gt, ge=ge, le=le)


class CircuitBreakerConfig(BaseModel):
    """When a circuit trips, how long it stays open, and how the pipeline waits for it.

    The first group configures each breaker; ``enabled``, ``max_wait`` and ``poll_interval`` configure
    the pipeline around them. ``flashcard_pipeline.config.breaker_config`` reads the ``CB_<FIELD>`` variables.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    failure_ratio: float = _finite(0.5, gt=0.0, le=1.0)
    min_throughput: int = Field(default=10, ge=2, le=1_000_000)
    #: Trip only when the Wilson lower bound of the failure ratio at this one-sided confidence reaches
    #: ``failure_ratio`` (0: the plain ratio, as Polly). 0.95 keeps a provider failing 25% of calls closed.
    confidence: float = Field(default=0.95, ge=0.0, lt=1.0, allow_inf_nan=False)
    #: Also trip on the newest this many buckets alone (with twice ``min_throughput`` calls in them), so a sudden
    #: outage opens the circuit in seconds although the whole window is still full of earlier successes (0: off).
    recent_buckets: int = Field(default=2, ge=0, le=1000)
    #: Seconds of history the failure ratio is computed over.
    sampling_duration: float = _finite(30.0, gt=0.0, le=86_400.0)
    #: Number of time buckets in the window: an outcome leaves it with its bucket.
    sampling_buckets: int = Field(default=10, ge=1, le=1000)
    #: The first break, in seconds; the default generator doubles it after each failed probe.
    break_duration: float = _finite(30.0, gt=0.0, le=MAX_BREAK_SECONDS)
    max_break_duration: float = _finite(300.0, gt=0.0, le=MAX_BREAK_SECONDS)
    break_duration_factor: float = _finite(2.0, ge=1.0, le=1000.0)
    half_open_max_probes: int = Field(default=1, ge=1, le=10_000)
    #: A probe that has not reported after this many seconds frees its slot.
    probe_timeout: float = _finite(180.0, gt=0.0)
    failure_categories: frozenset[ErrorCategory] = DEFAULT_FAILURE_CATEGORIES
    history_size: int = Field(default=100, ge=1, le=100_000)

    enabled: bool = True
    #: Seconds a call waits for an open circuit to let it through before failing (0: fail at once).
    max_wait: float = _finite(600.0, ge=0.0)
    #: Seconds between two looks at the database for `breaker isolate|close` commands.
    poll_interval: float = _finite(1.0, gt=0.0, le=60.0)

    @field_validator("failure_categories", mode="before")
    @classmethod
    def _split_categories(cls, value: Any) -> Any:
        """Accept ``external_service,network`` as well as a JSON list from the environment."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.max_break_duration < self.break_duration:
            raise ValueError(f"max_break_duration ({self.max_break_duration:g}) must be at least "
                             f"break_duration ({self.break_duration:g})")
        return self

    @property
    def bucket_duration(self) -> float:
        return self.sampling_duration / self.sampling_buckets



@dataclass(frozen=True)
class BreakDurationArguments:
    """What a break duration generator may base its answer on."""

    #: Failures in the sampling window when the circuit opens.
    failure_count: int
    failure_ratio: float
    #: Failed probes since the circuit last closed: 0 when it trips from closed, 1 after the first failed probe.
    half_open_attempts: int
    circuit: str


#: Returns the break in seconds (or a timedelta). Called each time the circuit opens, never when isolated.
BreakDurationGenerator = Callable[[BreakDurationArguments], "float | timedelta"]
#: Maps what a call raised to True (a failure), False (a success: the provider answered) or None
#: (no verdict: a cancellation, a bug; a probe's slot is freed).
Classifier = Callable[[BaseException], "bool | None"]


def default_classifier(categories: Iterable[ErrorCategory] = DEFAULT_FAILURE_CATEGORIES) -> Classifier:
    """Failures are structured errors of ``categories``; other structured errors mean the provider answered;
    an open circuit further in, a spent budget (nothing was sent), a cancellation or a bug gives no verdict."""
    counted = frozenset(categories)
    unsent = frozenset({ErrorCategory.CIRCUIT_OPEN, ErrorCategory.BUDGET})

    def classify(error: BaseException) -> bool | None:
        if isinstance(error, StructuredError):
            if error.category in counted:
                return True
            return None if error.category in unsent else False
        return None

    return classify


def exponential_break_duration(config: CircuitBreakerConfig) -> Callable[[BreakDurationArguments], float]:
    """``break_duration * factor ** half_open_attempts`` capped at ``max_break_duration``, for any count."""
    base, factor, cap = config.break_duration, config.break_duration_factor, config.max_break_duration

    def generate(args: BreakDurationArguments) -> float:
        return exponential_delay(args.half_open_attempts + 1, initial=base, base=factor, cap=cap)

    return generate


def next_break_duration(generator: BreakDurationGenerator | None,
                        default: Callable[[BreakDurationArguments], float], args: BreakDurationArguments,
                        fallback: float) -> float:
    """The break a circuit opens for: the generator's answer clamped to ``MAX_BREAK_SECONDS``, or ``fallback``
    (``break_duration``) when a custom generator fails or answers nonsense, which is logged."""
    if generator is None:
        return default(args)
    try:
        value = generator(args)
        seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    except Exception:
        log.exception("circuit %s: the break duration generator failed; breaking for %g s", args.circuit, fallback)
        return fallback
    if not seconds >= 0:  # also catches NaN
        log.error("circuit %s: the break duration generator returned %r; breaking for %g s", args.circuit, value,
                  fallback)
        return fallback
    return min(seconds, MAX_BREAK_SECONDS)
