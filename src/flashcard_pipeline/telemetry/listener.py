"""The engine's events as span events and metrics.

Subscribed to the run's :class:`EventHub`, it is called synchronously in the task that made the decision, so the
current span is the stage the event belongs to (the retry loop, the breaker and the limiter run around the
attempt, inside its stage). Events with no stage (a manual isolation from the database, a breaker's pause
reason) go on the run's span; transitions go on both.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE

from flashcard_pipeline.resilience import (
    BreakerPause,
    CallRefused,
    CircuitCreated,
    CircuitTransition,
    EventHub,
    LimitCut,
    LimitPause,
    LimitRaise,
    LimitWait,
    ProbeEvent,
    RetryEvent,
)
from flashcard_pipeline.telemetry.instruments import Instruments
from flashcard_pipeline.telemetry.spans import CURRENT_STAGE, error_type


class EngineListener:
    """Turns each resilience event into a span event on the span it belongs to, and into metrics."""

    def __init__(self, instruments: Instruments) -> None:
        self.instruments = instruments
        self.run_span: trace.Span | None = None

    def attach(self, events: EventHub) -> None:
        events.subscribe(RetryEvent, self.retry)
        events.subscribe(CircuitCreated, self.circuit_created)
        events.subscribe(CircuitTransition, self.transition)
        events.subscribe(CallRefused, self.refused)
        events.subscribe(ProbeEvent, self.probe)
        events.subscribe(BreakerPause, self.breaker_pause)
        events.subscribe(LimitWait, self.limit_wait)
        events.subscribe(LimitPause, self.limit_pause)
        events.subscribe(LimitCut, self.limit_change)
        events.subscribe(LimitRaise, self.limit_change)

    def _event(self, name: str, attributes: dict[str, Any], *, also_run: bool = False) -> None:
        span = trace.get_current_span()
        recording = span.is_recording()
        if recording:
            span.add_event(name, attributes)
        run = self.run_span
        if run is not None and (also_run or not recording) and run is not span:
            run.add_event(name, attributes)

    def retry(self, event: RetryEvent) -> None:
        kind = error_type(event.error)
        attributes: dict[str, Any] = {"flashcard.retry.action": event.action, "flashcard.attempt": event.attempt,
                                      ERROR_TYPE: kind, "flashcard.retry.delay_s": round(event.delay, 6)}
        if event.reason is not None:
            attributes["flashcard.retry.reason"] = event.reason
        self._event(f"retry.{event.action}", attributes)
        self.instruments.retries.add(1, {"flashcard.retry.action": event.action, ERROR_TYPE: kind,
                                         "flashcard.stage": event.context.stage})

    def circuit_created(self, event: CircuitCreated) -> None:
        breaker = event.breaker
        self.instruments.circuits[breaker.name] = breaker.state_provider.state.value

    def transition(self, event: CircuitTransition) -> None:
        self.instruments.circuits[event.circuit] = event.to_state.value
        attributes: dict[str, Any] = {"flashcard.circuit": event.circuit,
                                      "flashcard.circuit.from": event.from_state.value,
                                      "flashcard.circuit.to": event.to_state.value,
                                      "flashcard.circuit.reason": event.reason[:200],
                                      "flashcard.circuit.manual": event.manual}
        if event.break_duration is not None:
            attributes["flashcard.circuit.break_s"] = event.break_duration
        self._event("circuit.transition", attributes, also_run=True)
        self.instruments.circuit_transitions.add(1, {"flashcard.circuit": event.circuit,
                                                     "flashcard.circuit.from": event.from_state.value,
                                                     "flashcard.circuit.to": event.to_state.value})

    def refused(self, event: CallRefused) -> None:
        attributes: dict[str, Any] = {"flashcard.circuit": event.circuit,
                                      "flashcard.circuit.state": event.state.value}
        if event.retry_after is not None:
            attributes["flashcard.circuit.retry_after_s"] = round(event.retry_after, 3)
        self._event("circuit.refused", attributes)
        self.instruments.circuit_refusals.add(1, {"flashcard.circuit": event.circuit,
                                                  "flashcard.circuit.state": event.state.value})

    def probe(self, event: ProbeEvent) -> None:
        self._event("circuit.probe", {"flashcard.circuit": event.circuit, "flashcard.circuit.probe": event.probe,
                                      "flashcard.circuit.probe.outcome": event.outcome})

    def breaker_pause(self, event: BreakerPause) -> None:
        if self.run_span is not None:
            self.run_span.add_event("circuit.pause", {"flashcard.pause.reason": event.reason or ""})

    def limit_wait(self, event: LimitWait) -> None:
        stage = CURRENT_STAGE.get()
        if stage is not None:
            stage.limit_wait += event.seconds
        self._event("ratelimit.wait", {"flashcard.ratelimit.group": event.group,
                                       "flashcard.ratelimit.dimension": event.dimension,
                                       "flashcard.ratelimit.wait_s": round(event.seconds, 6)})
        self.instruments.limit_wait.record(event.seconds, {"flashcard.ratelimit.group": event.group,
                                                           "flashcard.ratelimit.dimension": event.dimension})

    def limit_pause(self, event: LimitPause) -> None:
        self._event("ratelimit.pause", {"flashcard.ratelimit.group": event.group,
                                        "flashcard.ratelimit.pause_s": round(event.seconds, 6)}, also_run=True)
        self.instruments.limit_pauses.add(1, {"flashcard.ratelimit.group": event.group})
        self.instruments.limit_pause_time.add(event.seconds, {"flashcard.ratelimit.group": event.group})

    def limit_change(self, event: LimitCut | LimitRaise) -> None:
        direction = "cut" if isinstance(event, LimitCut) else "raise"
        self._event(f"ratelimit.{direction}", {"flashcard.ratelimit.group": event.group,
                                               "flashcard.ratelimit.dimension": event.dimension,
                                               "flashcard.ratelimit.before": event.before,
                                               "flashcard.ratelimit.after": event.after,
                                               "flashcard.ratelimit.cause": event.cause}, also_run=True)
        self.instruments.limit_changes.add(1, {"flashcard.ratelimit.group": event.group,
                                               "flashcard.ratelimit.dimension": event.dimension,
                                               "flashcard.ratelimit.direction": direction,
                                               "flashcard.ratelimit.cause": event.cause})
