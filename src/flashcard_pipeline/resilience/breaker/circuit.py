"""Circuit breaker: stop sending requests to a provider that keeps failing, probe it now and then,
and resume as soon as it answers again.

Semantics follow Polly v8's advanced circuit breaker:

* **Closed.** Outcomes go into a rolling window of ``sampling_buckets`` time buckets spanning
  ``sampling_duration``. A *failure* trips the circuit when the window holds at least
  ``min_throughput`` outcomes and ``failures / throughput >= failure_ratio`` (both inclusive), and
  (our addition, ``confidence``) the Wilson lower bound of that ratio reaches ``failure_ratio`` too.
* **Open.** Every call is refused at once with :class:`CircuitBreakerError`, whose ``retry_after``
  is the time left. The first call after the break moves the circuit to half-open.
* **Half-open.** Up to ``half_open_max_probes`` calls go through. A probe success closes the
  circuit and clears the window; a probe failure opens it again for the next break duration.
* **Isolated.** Held open by an operator until closed by hand.

Where it departs from Polly, on purpose:

* Only a probe can close the circuit and only a probe's failure can re-open it. An outcome of a call
  admitted in an earlier state (sent before the trip, ending while open or half-open) changes nothing;
  Polly closes the circuit on any success that happens to arrive during half-open.
* A probe that never reports frees its slot after ``probe_timeout``; a cancelled probe frees its
  slot without closing the circuit (Polly counts a cancellation as a success).
* Isolating does not call the break duration generator and does not count as a half-open attempt.

There is no lock: the breaker belongs to one event loop and changes state synchronously between
``await`` points, so nothing is held while the protected call runs. Time comes from a
:class:`~flashcard_pipeline.resilience.core.clock.Clock`; every transition, probe and refusal is an event on
the breaker's :class:`~flashcard_pipeline.resilience.core.events.EventHub`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from flashcard_pipeline.errors import CircuitBreakerError
from flashcard_pipeline.resilience.breaker.config import (
    BreakDurationArguments,
    BreakDurationGenerator,
    CircuitBreakerConfig,
    Classifier,
    default_classifier,
    exponential_break_duration,
    next_break_duration,
)
from flashcard_pipeline.resilience.breaker.control import CircuitBreakerManualControl, CircuitBreakerStateProvider
from flashcard_pipeline.resilience.breaker.events import (
    CallRefused,
    CircuitState,
    CircuitTransition,
    HealthInfo,
    Permit,
    ProbeEvent,
    ProbeOutcome,
    describe_error,
)
from flashcard_pipeline.resilience.breaker.window import SamplingWindow, one_sided_z
from flashcard_pipeline.resilience.core.clock import Clock, SystemClock
from flashcard_pipeline.resilience.core.context import CallContext
from flashcard_pipeline.resilience.core.events import EventHub, ResilienceEvent

if TYPE_CHECKING:
    from flashcard_pipeline.resilience.breaker.wait import CircuitWaiter

log = logging.getLogger("flashcard_pipeline.resilience.circuit_breaker")
T = TypeVar("T")
#: Shortest wait between two attempts to get through while the circuit is not closed.
_MIN_WAIT = 0.001

_CLOSED = CircuitState.CLOSED
_OPEN = CircuitState.OPEN
_HALF_OPEN = CircuitState.HALF_OPEN
_ISOLATED = CircuitState.ISOLATED


class CircuitBreaker:
    """One circuit (one provider and model in the pipeline). See the module docstring for the rules.

    Use :meth:`execute` as a :class:`~flashcard_pipeline.resilience.core.policy.CallPolicy`, or the parts it
    is made of: :meth:`acquire` (raises :class:`CircuitBreakerError` when refused), then :meth:`record_success`,
    :meth:`record_failure` or :meth:`release` with the permit. :attr:`state_provider` reads,
    :attr:`manual_control` isolates, closes and resets. With a ``waiter`` a refused call waits for the circuit
    (up to ``max_wait``) instead of failing at once.
    """

    def __init__(
        self,
        config: CircuitBreakerConfig | None = None,
        *,
        name: str = "default",
        clock: Clock | None = None,
        break_duration_generator: BreakDurationGenerator | None = None,
        classify: Classifier | None = None,
        events: EventHub | None = None,
        waiter: CircuitWaiter | None = None,
    ) -> None:
        self.config = config = config or CircuitBreakerConfig()
        self.name = name
        self.clock: Clock = clock or SystemClock()
        self._monotonic = self.clock.monotonic
        self._generator = break_duration_generator
        self._default_generator = exponential_break_duration(config)
        self._classify: Classifier = classify or default_classifier(config.failure_categories)
        self.events = events if events is not None else EventHub()
        self._waiter = waiter

        self._state = _CLOSED
        self._epoch = 0
        now = self._monotonic()
        self._entered = now
        self._entered_wall = self.clock.now()
        self._open_until = -math.inf
        self._break: float | None = None
        self._half_open_attempts = 0
        self._probes: dict[int, float] = {}
        self._probe_ids = itertools.count(1)
        self._isolation: str | None = None
        self._last_failure: str | None = None
        self._refusal = CircuitBreakerError("", circuit_state=_CLOSED.value)

        self._z = one_sided_z(config.confidence)
        self._window = window = SamplingWindow(config.sampling_duration, config.sampling_buckets)
        # Aliases of the window's lists and sizes for the closed path, which counts a success inline.
        self._bucket, self._n, self._ids, self._succ = window.bucket, window.size, window.ids, window.successes

        self._successes = self._failures = self._rejected = self._ignored = 0
        self._opened = self._transitions = 0
        self._history: deque[CircuitTransition] = deque(maxlen=config.history_size)
        self._changed: asyncio.Event | None = None
        self.state_provider = CircuitBreakerStateProvider(self)
        self.manual_control = CircuitBreakerManualControl(self)

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self._state.value})"

    # -- admission ------------------------------------------------------------------------------------

    def acquire(self) -> Permit:
        """Admit one call now or raise :class:`CircuitBreakerError` (open, isolated, or no probe slot free)."""
        state = self._state
        if state is _CLOSED:
            return Permit(self._epoch)
        now = self._monotonic()
        if state is _OPEN:
            if now < self._open_until:
                raise self._rejection(now)
            self._transition(_HALF_OPEN, now, f"break of {self._break or 0:g} s over: probing")
            state = _HALF_OPEN
        if state is _HALF_OPEN:
            probes = self._probes
            if probes:
                self._expire_probes(now)
            if len(probes) < self.config.half_open_max_probes:
                probe = next(self._probe_ids)
                probes[probe] = now
                self._probe(probe, "admitted")
                return Permit(self._epoch, probe)
        raise self._rejection(now)

    def _expire_probes(self, now: float) -> None:
        timeout = self.config.probe_timeout
        for probe, started in list(self._probes.items()):
            if now - started >= timeout:
                del self._probes[probe]
                log.warning("circuit %s: probe %d did not report within %g s; freeing its slot", self.name, probe,
                            timeout)
                self._probe(probe, "expired")

    def _probe(self, probe: int, outcome: ProbeOutcome) -> None:
        if self.events.wants(ProbeEvent):
            self.events.emit(ProbeEvent(self.name, probe, outcome))

    def _rejection(self, now: float) -> CircuitBreakerError:
        self._rejected += 1
        state = self._state
        if state is _OPEN:
            retry_after: float | None = self._open_until - now
        elif state is _HALF_OPEN:
            oldest = min(self._probes.values(), default=now)
            retry_after = max(_MIN_WAIT, oldest + self.config.probe_timeout - now)
        else:
            retry_after = None
        template = self._refusal
        error = CircuitBreakerError.__new__(CircuitBreakerError, *template.args)
        fields = error.__dict__
        fields.update(template.__dict__)
        fields["details"] = dict(template.details)
        fields["retry_after"] = retry_after
        fields["timestamp"] = datetime.now(UTC)
        if self.events.wants(CallRefused):
            self.events.emit(CallRefused(self.name, state, retry_after))
        return error

    def _describe_refusal(self, wall: datetime) -> None:
        """Build the refusal of the state just entered once; each refusal is a copy with its own timestamp,
        ``retry_after`` and ``details`` (an open circuit refuses all day, so this keeps refusing cheap)."""
        state, name = self._state, self.name
        details: dict[str, Any] = {"circuit": name}
        if state is _OPEN:
            until = wall + timedelta(seconds=self._break or 0.0)
            message = (f"circuit {name} is open until {until:%H:%M:%S} UTC "
                       f"(last failure: {self._last_failure or 'none'})")
        elif state is _HALF_OPEN:
            message = f"circuit {name} is half-open and waiting for its probe's answer"
        else:
            message = f"circuit {name} is isolated by an operator: {self._isolation}"
            details["reason"] = self._isolation
        self._refusal = CircuitBreakerError(message, circuit_state=state.value, details=details)

    # -- outcomes -------------------------------------------------------------------------------------

    def record_success(self, permit: Permit) -> None:
        if permit.epoch != self._epoch:
            self._ignored += 1
            return
        if permit.probe:
            if self._probes.pop(permit.probe, None) is None:
                self._ignored += 1
                return
            self._successes += 1
            self._probe(permit.probe, "succeeded")
            self._close(self._monotonic(), "probe succeeded")
            return
        self._successes += 1
        self._window.add(self._monotonic(), failed=False)

    def record_failure(self, permit: Permit, error: BaseException | None = None) -> None:
        if permit.epoch != self._epoch:
            self._ignored += 1
            return
        now = self._monotonic()
        if permit.probe:
            if self._probes.pop(permit.probe, None) is None:
                self._ignored += 1
                return
            self._failures += 1
            self._probe(permit.probe, "failed")
            self._window.add(now, failed=True)
            self._last_failure = describe_error(error)
            self._half_open_attempts += 1
            self._open(now, f"probe failed: {self._last_failure}")
            return
        self._failures += 1
        self._window.add(now, failed=True)
        config = self.config
        tripped = self._window.tripping(now, ratio=config.failure_ratio, min_throughput=config.min_throughput,
                                        z=self._z, recent_buckets=config.recent_buckets)
        if tripped is not None:
            health, span = tripped
            self._last_failure = describe_error(error)
            self._open(now, f"{health.failures} of {health.throughput} calls failed in the last {span:g} s "
                            f"(last: {self._last_failure})", health)

    def release(self, permit: Permit) -> None:
        """An outcome with no verdict (cancelled, a bug): a probe's slot is freed, nothing else changes."""
        self._ignored += 1
        if permit.probe and self._probes.pop(permit.probe, None) is not None:
            self._probe(permit.probe, "released")
            self._signal()

    def record(self, permit: Permit, error: BaseException) -> None:
        """Record whatever ``error`` counts as under the classifier."""
        verdict = self._classify(error)
        if verdict is None:
            self.release(permit)
        elif verdict:
            self.record_failure(permit, error)
        else:
            self.record_success(permit)

    # -- running calls --------------------------------------------------------------------------------

    async def execute(self, call: Callable[[], Awaitable[T]], context: CallContext | None = None) -> T:
        """Run ``call`` if the circuit lets it through; if not, raise :class:`CircuitBreakerError` at once or,
        with a waiter, wait for the circuit to admit it."""
        if self._state is _CLOSED:
            epoch = self._epoch
            try:
                result = await call()
            except BaseException as exc:
                self.record(Permit(epoch), exc)
                raise
            if epoch == self._epoch:
                # The common case of _closed_success inlined (same bucket as the last call): a success
                # while closed is what almost every call is, and a method call here is a fifth of the overhead.
                index = int(self._monotonic() // self._bucket)
                slot = index % self._n
                if self._ids[slot] == index:
                    self._successes += 1
                    self._succ[slot] += 1
                    return result
            self._closed_success(epoch)
            return result
        try:
            permit = self.acquire()
        except CircuitBreakerError as rejection:
            if self._waiter is None:
                raise
            permit = await self._waiter.wait(self, rejection, context)
        return await self.run(permit, call)

    def _closed_success(self, epoch: int) -> None:
        """:meth:`record_success` for a call admitted while closed, without building a Permit."""
        if epoch != self._epoch:
            self._ignored += 1
            return
        self._successes += 1
        self._window.add(self._monotonic(), failed=False)

    async def run(self, permit: Permit, call: Callable[[], Awaitable[T]]) -> T:
        """Run ``call`` under a permit from :meth:`acquire` and record its outcome."""
        try:
            result = await call()
        except BaseException as exc:
            self.record(permit, exc)
            raise
        self.record_success(permit)
        return result

    async def wait_for_change(self, seconds: float) -> bool:
        """Wait until the state changes or a probe slot frees (True), or ``seconds`` pass (False)."""
        event = self._changed
        if event is None:
            event = self._changed = asyncio.Event()
        sleeper = asyncio.ensure_future(self.clock.sleep(max(_MIN_WAIT, seconds)))
        waiter = asyncio.ensure_future(event.wait())
        try:
            done, _ = await asyncio.wait((sleeper, waiter), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waiter.cancel()
        return waiter in done

    # -- state changes --------------------------------------------------------------------------------

    def _open(self, now: float, reason: str, health: HealthInfo | None = None, *, source: str | None = None) -> None:
        health = health or self._window.health(now)
        duration = next_break_duration(self._generator, self._default_generator, BreakDurationArguments(
            failure_count=health.failures, failure_ratio=health.failure_ratio,
            half_open_attempts=self._half_open_attempts, circuit=self.name), self.config.break_duration)
        self._break = duration
        self._open_until = now + duration
        self._probes.clear()
        self._opened += 1
        self._transition(_OPEN, now, reason, source=source, health=health, break_duration=duration)

    def _close(self, now: float, reason: str, *, manual: bool = False, source: str | None = None) -> None:
        self._window.clear()
        self._probes.clear()
        self._half_open_attempts = 0
        self._open_until = -math.inf
        self._isolation = None
        self._transition(_CLOSED, now, reason, manual=manual, source=source, health=HealthInfo(0, 0))

    def _transition(self, to: CircuitState, now: float, reason: str, *, manual: bool = False,
                    source: str | None = None, health: HealthInfo | None = None,
                    break_duration: float | None = None) -> None:
        previous = self._state
        health = health or self._window.health(now)
        self._state = to
        self._epoch += 1
        wall = self.clock.now()
        if previous is not to:
            self._transitions += 1
            self._entered = now
            self._entered_wall = wall
        record = CircuitTransition(
            circuit=self.name, from_state=previous, to_state=to, at=now, wall=wall, reason=reason, manual=manual,
            source=source, failure_count=health.failures, throughput=health.throughput,
            failure_ratio=health.failure_ratio, break_duration=break_duration,
            half_open_attempts=self._half_open_attempts)
        self._history.append(record)
        if to is not _CLOSED:
            self._describe_refusal(wall)
        level = logging.WARNING if manual or to is _OPEN or to is _ISOLATED else logging.INFO
        by = f" ({source})" if source else ""
        log.log(level, "circuit %s: %s -> %s%s: %s", self.name, previous.value, to.value, by, reason)
        self.events.emit(record)
        self._signal()

    def _signal(self) -> None:
        event = self._changed
        if event is not None:
            self._changed = None
            event.set()


@dataclass(frozen=True)
class CircuitCreated(ResilienceEvent):
    """A circuit was made, before its first call is admitted (a standing isolation can hold it from the start)."""

    breaker: CircuitBreaker
