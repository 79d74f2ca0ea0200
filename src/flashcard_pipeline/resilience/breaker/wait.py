"""Waiting for a circuit instead of failing: what the pipeline's breakers do with a refused call.

A refused call waits (without spending the retry policy's attempts, which sits outside) until its circuit
lets it through, for at most ``max_wait`` seconds, then fails with :class:`CircuitWaitExceededError`. The
waiter is shared by every circuit of an engine, so it can say in one line why the run is paused
(:class:`BreakerPause` events) and count the waiting for the run's metrics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

from flashcard_pipeline.errors import CircuitBreakerError
from flashcard_pipeline.resilience.breaker.events import (
    BreakerPause,
    CircuitState,
    CircuitTransition,
    CircuitWaitExceededError,
    Permit,
)
from flashcard_pipeline.resilience.core.clock import Clock
from flashcard_pipeline.resilience.core.context import CallContext
from flashcard_pipeline.resilience.core.events import EventHub

if TYPE_CHECKING:
    from flashcard_pipeline.resilience.breaker.circuit import CircuitBreaker

log = logging.getLogger("flashcard_pipeline.resilience.circuit_breaker")


@dataclass
class BreakerWaitStats:
    """How much waiting the waiter did (for the run's metrics)."""

    waits: int = 0
    waited: float = 0.0
    wait_exceeded: int = 0
    per_circuit: dict[str, float] = field(default_factory=dict)


class CircuitWaiter:
    """Waits up to ``max_wait`` seconds for a circuit to admit a refused call (0: fail at once)."""

    def __init__(self, max_wait: float, *, clock: Clock, events: EventHub) -> None:
        self.max_wait = max_wait
        self.clock = clock
        self.events = events
        self.stats = BreakerWaitStats()
        self._waiting: dict[CircuitBreaker, int] = {}
        self._pause: str | None = None
        events.subscribe(CircuitTransition, self._on_transition)

    async def wait(self, breaker: CircuitBreaker, rejection: CircuitBreakerError,
                   context: CallContext | None) -> Permit:
        """A permit once ``breaker`` admits the call, or :class:`CircuitWaitExceededError` after ``max_wait``."""
        clock, name, max_wait = self.clock, breaker.name, self.max_wait
        started = clock.monotonic()
        self.stats.waits += 1
        self._waiting[breaker] = self._waiting.get(breaker, 0) + 1
        self._update_pause()
        try:
            while True:
                remaining = max_wait - (clock.monotonic() - started)
                if remaining <= 0:
                    self.stats.wait_exceeded += 1
                    who = f"{context.stage} {context.item_key!r}" if context is not None else "a call"
                    log.info("circuit %s: %s waited %g s for the circuit; giving up", name, who, max_wait)
                    raise CircuitWaitExceededError(
                        f"circuit {name} did not let the call through within {max_wait:g} s "
                        f"(CB_MAX_WAIT / --breaker-max-wait): {rejection.message}",
                        circuit_state=rejection.circuit_state, details={**rejection.details, "waited": max_wait},
                        cause=rejection.message)
                after = rejection.retry_after
                await breaker.wait_for_change(remaining if after is None else min(after, remaining))
                try:
                    return breaker.acquire()
                except CircuitBreakerError as again:
                    rejection = again
        finally:
            waited = clock.monotonic() - started
            if context is not None:
                context.record_pause(waited)
            self.stats.waited += waited
            self.stats.per_circuit[name] = self.stats.per_circuit.get(name, 0.0) + waited
            self._waiting[breaker] -= 1
            self._update_pause()

    def _on_transition(self, record: CircuitTransition) -> None:
        if any(breaker.name == record.circuit and count > 0 for breaker, count in self._waiting.items()):
            self._update_pause()

    def pause_reason(self) -> str | None:
        """Why calls are waiting right now, or None."""
        parts = []
        for breaker, count in self._waiting.items():
            if count <= 0:
                continue
            name, provider = breaker.name, breaker.state_provider
            state = provider.state
            calls = f"{count} call{'s' if count != 1 else ''} waiting"
            if state is CircuitState.OPEN:
                until = self.clock.now() + timedelta(seconds=provider.retry_after or 0.0)
                until = until.astimezone()  # local time: this is for the person watching the run
                parts.append(f"circuit {name} open until {until:%H:%M:%S} (provider failing); {calls}")
            elif state is CircuitState.HALF_OPEN:
                parts.append(f"circuit {name} half-open, probing the provider; {calls}")
            elif state is CircuitState.ISOLATED:
                parts.append(f"circuit {name} isolated by an operator ({provider.isolation_reason}); {calls}")
        return "; ".join(parts) or None

    def _update_pause(self) -> None:
        if not self.events.wants(BreakerPause):
            return  # nobody shows it: no need to compose it on every wait
        reason = self.pause_reason()
        if reason != self._pause:
            self._pause = reason
            self.events.emit(BreakerPause(reason))
