"""Typed events and the one listener every policy of an engine reports to.

Each policy emits what it decides (a retry, a breaker transition, a limiter pause, ...) as an instance of a
:class:`ResilienceEvent` subclass defined next to the policy. An :class:`EventHub` fans each event out to the
subscribers of its type: the progress display, the run's stored metrics and the breaker's database sync today;
telemetry and structured logs attach the same way. Emitting happens synchronously on the event loop, between
awaits, so a subscriber sees events in the order they happened; a subscriber that raises is logged and never
breaks the call that emitted.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger("flashcard_pipeline.resilience.events")


class ResilienceEvent:
    """Base of every event; subclasses are frozen dataclasses."""

    __slots__ = ()


E = TypeVar("E", bound=ResilienceEvent)
Listener = Callable[[Any], object]


class EventHub:
    """Subscribers by event type; :meth:`emit` calls those whose type the event is an instance of."""

    def __init__(self) -> None:
        self._subscribers: list[tuple[type[ResilienceEvent], Listener]] = []
        #: The listeners of each event type emitted or asked about, in subscription order (cleared on change).
        self._routes: dict[type[ResilienceEvent], tuple[Listener, ...]] = {}

    def subscribe(self, kind: type[E], listener: Callable[[E], object]) -> None:
        """Call ``listener`` with every event of type ``kind`` (``ResilienceEvent``: every event)."""
        self._subscribers.append((kind, listener))
        self._routes.clear()

    def unsubscribe(self, kind: type[E], listener: Callable[[E], object]) -> None:
        """Stop calling ``listener`` for ``kind``; an unknown pair is ignored."""
        with contextlib.suppress(ValueError):
            self._subscribers.remove((kind, listener))
        self._routes.clear()

    def _listeners(self, kind: type[ResilienceEvent]) -> tuple[Listener, ...]:
        found = self._routes.get(kind)
        if found is None:
            found = self._routes[kind] = tuple(listener for subscribed, listener in self._subscribers
                                               if issubclass(kind, subscribed))
        return found

    def wants(self, kind: type[ResilienceEvent]) -> bool:
        """Whether an event of ``kind`` would reach anyone: a policy may skip building one nobody would see."""
        return bool(self._listeners(kind))

    def emit(self, event: ResilienceEvent) -> None:
        for listener in self._listeners(type(event)):
            try:
                listener(event)
            except Exception:
                log.exception("a %s listener failed", type(event).__name__)
