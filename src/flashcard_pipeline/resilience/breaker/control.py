"""Reading a breaker without changing it, and steering breakers by hand."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from flashcard_pipeline.resilience.breaker.events import CircuitState, CircuitTransition, HealthInfo

if TYPE_CHECKING:
    from flashcard_pipeline.resilience.breaker.circuit import CircuitBreaker

_OPEN = CircuitState.OPEN


class CircuitBreakerStateProvider:
    """Read-only view of a breaker for monitoring: reading never changes its state.

    An open circuit whose break is over still reads ``open`` (with ``retry_after == 0``): it becomes
    half-open only when a call arrives.
    """

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker

    @property
    def name(self) -> str:
        return self._breaker.name

    @property
    def state(self) -> CircuitState:
        return self._breaker._state

    @property
    def time_in_state(self) -> float:
        b = self._breaker
        return max(0.0, b._monotonic() - b._entered)

    @property
    def since(self) -> datetime:
        return self._breaker._entered_wall

    @property
    def failure_count(self) -> int:
        """Calls that counted as failures since the breaker was created or reset."""
        return self._breaker._failures

    @property
    def success_count(self) -> int:
        return self._breaker._successes

    @property
    def rejected_count(self) -> int:
        return self._breaker._rejected

    @property
    def ignored_count(self) -> int:
        """Outcomes that changed nothing: late ones, cancellations, calls with no verdict."""
        return self._breaker._ignored

    @property
    def opened_count(self) -> int:
        return self._breaker._opened

    @property
    def health(self) -> HealthInfo:
        b = self._breaker
        return b._window.health(b._monotonic())

    @property
    def half_open_attempts(self) -> int:
        return self._breaker._half_open_attempts

    @property
    def probes_in_flight(self) -> int:
        b = self._breaker
        now = b._monotonic()
        return sum(1 for started in b._probes.values() if now - started < b.config.probe_timeout)

    @property
    def retry_after(self) -> float | None:
        """Seconds until an open circuit admits a probe (0 once due); None unless open."""
        b = self._breaker
        if b._state is not _OPEN:
            return None
        return max(0.0, b._open_until - b._monotonic())

    @property
    def break_duration(self) -> float | None:
        """The length of the current (or last) break."""
        return self._breaker._break

    @property
    def isolation_reason(self) -> str | None:
        return self._breaker._isolation

    @property
    def transitions(self) -> tuple[CircuitTransition, ...]:
        """The most recent transitions and manual actions, oldest first (``history_size`` of them)."""
        return tuple(self._breaker._history)

    def stats(self) -> dict[str, Any]:
        """Everything above as one JSON-ready dict (for metrics, the database and ``breaker status``)."""
        b = self._breaker
        now = b._monotonic()
        health = b._window.health(now)
        retry_after = self.retry_after
        history = b._history
        return {
            "circuit": b.name,
            "state": b._state.value,
            "since": b._entered_wall.isoformat(),
            "time_in_state": round(max(0.0, now - b._entered), 3),
            "failure_count": b._failures,
            "success_count": b._successes,
            "rejected_count": b._rejected,
            "ignored_count": b._ignored,
            "opened_count": b._opened,
            "transition_count": b._transitions,
            "window": {"successes": health.successes, "failures": health.failures,
                       "throughput": health.throughput, "failure_ratio": round(health.failure_ratio, 4),
                       "sampling_duration": b.config.sampling_duration},
            "retry_after": None if retry_after is None else round(retry_after, 3),
            "open_until": (None if retry_after is None
                           else (b.clock.now() + timedelta(seconds=retry_after)).isoformat()),
            "break_duration": b._break,
            "half_open_attempts": b._half_open_attempts,
            "probes_in_flight": self.probes_in_flight,
            "isolation_reason": b._isolation,
            "last_failure": b._last_failure,
            "last_transition": history[-1].to_dict() if history else None,
        }


class CircuitBreakerManualControl:
    """Isolate, close or reset one or more breakers by hand. Each action needs a reason and is logged.

    * ``isolate``: hold the circuit open until closed by hand (calls are refused; a probe in flight is
      ignored when it reports; the break duration generator is not consulted).
    * ``close``: close the circuit and clear its window and its break duration back-off.
    * ``reset``: ``close`` and also zero the counters.
    """

    def __init__(self, *breakers: CircuitBreaker) -> None:
        self._breakers: list[CircuitBreaker] = list(breakers)

    def attach(self, breaker: CircuitBreaker) -> None:
        if breaker not in self._breakers:
            self._breakers.append(breaker)

    @property
    def breakers(self) -> tuple[CircuitBreaker, ...]:
        return tuple(self._breakers)

    def isolate(self, reason: str, *, source: str | None = None) -> None:
        reason = _reason(reason)
        for breaker in self._breakers:
            now = breaker._monotonic()
            breaker._probes.clear()
            breaker._isolation = reason
            breaker._open_until = math.inf
            breaker._transition(CircuitState.ISOLATED, now, f"isolated by hand: {reason}", manual=True,
                                source=source)

    def trip(self, reason: str, *, source: str | None = None) -> None:
        """Open a closed circuit as if it had tripped itself (its break duration, then probes).

        How a worker follows a peer that saw the provider fail: the evidence is paid for once, not once per worker.
        An open, half-open or isolated circuit is left as it is.
        """
        reason = _reason(reason)
        for breaker in self._breakers:
            if breaker._state is CircuitState.CLOSED:
                breaker._open(breaker._monotonic(), reason, source=source)

    def close(self, reason: str, *, source: str | None = None) -> None:
        reason = _reason(reason)
        for breaker in self._breakers:
            breaker._close(breaker._monotonic(), f"closed by hand: {reason}", manual=True, source=source)

    def reset(self, reason: str, *, source: str | None = None) -> None:
        reason = _reason(reason)
        for breaker in self._breakers:
            breaker._successes = breaker._failures = breaker._rejected = breaker._ignored = breaker._opened = 0
            breaker._close(breaker._monotonic(), f"reset by hand: {reason}", manual=True, source=source)


def _reason(reason: str) -> str:
    text = (reason or "").strip()
    if not text:
        raise ValueError("a manual circuit breaker action needs a reason")
    return text

