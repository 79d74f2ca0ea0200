"""The breaker's states, the events it emits (transition, probe, refusal, pause) and the
records of one admitted call."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from flashcard_pipeline.errors import CircuitBreakerError, StructuredError
from flashcard_pipeline.resilience.core.events import ResilienceEvent


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    ISOLATED = "isolated"


class CircuitWaitExceededError(CircuitBreakerError):
    """The circuit stayed open longer than the caller was willing to wait.

    Not retryable: the wait already covered what a retry would do, so a retry policy outside the
    breaker ends the request at once instead of spending its attempts on an open circuit.
    """

    default_code = "circuit_wait_exceeded"
    retryable = False


@dataclass(frozen=True)
class HealthInfo:
    """The outcomes in the sampling window."""

    successes: int
    failures: int

    @property
    def throughput(self) -> int:
        return self.successes + self.failures

    @property
    def failure_ratio(self) -> float:
        total = self.successes + self.failures
        return self.failures / total if total else 0.0


@dataclass(frozen=True)
class CircuitTransition(ResilienceEvent):
    """One change of state, or one manual action (which may leave the state as it was)."""

    circuit: str
    from_state: CircuitState
    to_state: CircuitState
    #: Monotonic time of the breaker's clock.
    at: float
    wall: datetime
    reason: str
    manual: bool = False
    #: Who asked, for manual actions (a user, a command id).
    source: str | None = None
    failure_count: int = 0
    throughput: int = 0
    failure_ratio: float = 0.0
    #: Seconds the circuit stays open (OPEN only).
    break_duration: float | None = None
    half_open_attempts: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "circuit": self.circuit, "from_state": self.from_state.value, "to_state": self.to_state.value,
            "at": self.wall.isoformat(), "reason": self.reason, "manual": self.manual, "source": self.source,
            "failure_count": self.failure_count, "throughput": self.throughput,
            "failure_ratio": round(self.failure_ratio, 4), "break_duration": self.break_duration,
            "half_open_attempts": self.half_open_attempts,
        }


class Permit:
    """Admission of one call: which state epoch let it in and, for a probe, its slot."""

    __slots__ = ("epoch", "probe")

    def __init__(self, epoch: int, probe: int = 0) -> None:
        self.epoch = epoch
        self.probe = probe

    def __repr__(self) -> str:
        return f"Permit(epoch={self.epoch}, probe={self.probe})"



ProbeOutcome = Literal["admitted", "succeeded", "failed", "released", "expired"]


@dataclass(frozen=True)
class ProbeEvent(ResilienceEvent):
    """A half-open probe was let through, reported (``succeeded``, ``failed``, ``released`` without a
    verdict) or timed out (``expired``: it never reported and its slot is free again)."""

    circuit: str
    probe: int
    outcome: ProbeOutcome


@dataclass(frozen=True)
class CallRefused(ResilienceEvent):
    """The circuit refused a call (open, isolated, or no probe slot free); ``retry_after`` as in the error."""

    circuit: str
    state: CircuitState
    retry_after: float | None


@dataclass(frozen=True)
class BreakerPause(ResilienceEvent):
    """Why calls wait for circuits now (for the person watching the run), or ``None`` once none waits."""

    reason: str | None


def describe_error(error: BaseException | None) -> str:
    """An error in one line for a transition's reason and ``last_failure``."""
    if error is None:
        return "no error"
    if isinstance(error, StructuredError):
        return f"{error.category.value}/{error.code}: {error.message[:200]}"
    return f"{type(error).__name__}: {str(error)[:200]}"
