"""What the run does with the engine's events: the progress display and the run's stored metrics subscribe
here (telemetry and structured logs attach the same way, to the same :class:`EventHub`)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from flashcard_pipeline.pipeline import RunStats
from flashcard_pipeline.resilience import (
    BreakerPause,
    CallRefused,
    CircuitTransition,
    EventHub,
    LimitCut,
    LimitPause,
    LimitRaise,
    LimitStatus,
    LimitWait,
    ProbeEvent,
    ResilienceEvent,
    RetryEvent,
)

#: How the progress line words a limit's reason where the short name would not tell a user what happens.
SAID = {"probing": "finding the provider's limit (--rpm N skips this)"}


class ProgressObserver:
    """Puts why calls wait into the live :class:`RunStats`: a circuit's pause reason, a 429's pause."""

    def __init__(self, stats: RunStats) -> None:
        self.stats = stats
        self._shown: str | None = None

    def attach(self, events: EventHub) -> None:
        events.subscribe(BreakerPause, self._breaker_pause)
        events.subscribe(LimitPause, self._limit_pause)
        events.subscribe(LimitStatus, self._limit_status)

    def _breaker_pause(self, event: BreakerPause) -> None:
        """Shows the breakers' reason, leaving another component's reason alone when the breakers have none."""
        if event.reason is not None:
            self.stats.pause_reason = event.reason
        elif self.stats.pause_reason == self._shown:
            self.stats.pause_reason = None
        self._shown = event.reason

    def _limit_pause(self, event: LimitPause) -> None:
        self.stats.note_rate_limit(event.group, event.seconds)

    def _limit_status(self, event: LimitStatus) -> None:
        if event.dimension != "requests":
            return
        if event.planned is None:
            self.stats.limit_status = "none" if event.reason == "unlimited" else f"none, {event.reason}"
        else:
            self.stats.limit_status = f"{event.planned:,.0f}/min, {SAID.get(event.reason, event.reason)}"


class EventTally:
    """Counts every event by kind (and the seconds limiters held calls), for the run's stored metrics."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.limit_wait_s = 0.0

    def attach(self, events: EventHub) -> None:
        events.subscribe(ResilienceEvent, self.record)

    def record(self, event: ResilienceEvent) -> None:
        self.counts[_kind(event)] += 1
        if isinstance(event, LimitWait):
            self.limit_wait_s += event.seconds

    def to_dict(self) -> dict[str, Any]:
        return {**dict(sorted(self.counts.items())), "limit_wait_s": round(self.limit_wait_s, 3)}


def _kind(event: ResilienceEvent) -> str:
    if isinstance(event, RetryEvent):
        return event.action
    if isinstance(event, CircuitTransition):
        return f"circuit_{event.to_state.value}"
    if isinstance(event, ProbeEvent):
        return f"probe_{event.outcome}"
    if isinstance(event, LimitCut | LimitRaise):
        return f"limit_{'cut' if isinstance(event, LimitCut) else 'raise'}_{event.dimension}"
    names = {CallRefused: "circuit_refusal", LimitWait: "limit_wait", LimitPause: "limit_pause",
             LimitStatus: "limit_status", BreakerPause: "breaker_pause"}
    return names.get(type(event), type(event).__name__)
