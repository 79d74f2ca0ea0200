"""Circuit breaker: stop sending requests to a provider that keeps failing, probe it now and then,
and resume as soon as it answers again.

Semantics follow Polly v8's advanced circuit breaker:

* **Closed.** Outcomes go into a rolling window of ``sampling_buckets`` time buckets spanning
  ``sampling_duration``. A *failure* trips the circuit when the window holds at least
  ``min_throughput`` outcomes and ``failures / throughput >= failure_ratio`` (both inclusive).
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
:class:`~flashcard_pipeline.resilience.clock.Clock`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import NoDecode

from flashcard_pipeline.errors import CircuitBreakerError, ErrorCategory, StructuredError
from flashcard_pipeline.llm.policy import CallContext, CallPolicy, PolicyPipeline, record_pause
from flashcard_pipeline.resilience.clock import Clock, SystemClock
from flashcard_pipeline.resilience.retry import exponential_delay

__all__ = [
    "DEFAULT_FAILURE_CATEGORIES",
    "MAX_BREAK_SECONDS",
    "BreakDurationArguments",
    "BreakDurationGenerator",
    "BreakerWaitStats",
    "CircuitBreaker",
    "CircuitBreakerConfig",
    "CircuitBreakerManualControl",
    "CircuitBreakerPolicy",
    "CircuitBreakerStateProvider",
    "CircuitState",
    "CircuitTransition",
    "CircuitWaitExceededError",
    "Classifier",
    "HealthInfo",
    "Permit",
    "breaker_policies",
    "default_classifier",
    "exponential_break_duration",
]

log = logging.getLogger("flashcard_pipeline.resilience.circuit_breaker")
T = TypeVar("T")

#: Provider and network trouble. A bad request, a 429 or an unusable answer means the provider did
#: answer, so by default they count as successes (the rate limiter and the re-ask budget handle them).
DEFAULT_FAILURE_CATEGORIES: frozenset[ErrorCategory] = frozenset({
    ErrorCategory.EXTERNAL_SERVICE,
    ErrorCategory.NETWORK,
    ErrorCategory.TIMEOUT,
})
#: A generator's answer is clamped to this, so "forever" still fits in a datetime.
MAX_BREAK_SECONDS = 365 * 86_400.0
#: Shortest wait between two attempts to get through while the circuit is not closed.
_MIN_WAIT = 0.001


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    ISOLATED = "isolated"


_CLOSED = CircuitState.CLOSED
_OPEN = CircuitState.OPEN
_HALF_OPEN = CircuitState.HALF_OPEN
_ISOLATED = CircuitState.ISOLATED


class CircuitWaitExceededError(CircuitBreakerError):
    """The circuit stayed open longer than the caller was willing to wait.

    Not retryable: the wait already covered what a retry would do, so a retry policy outside the
    breaker ends the request at once instead of spending its attempts on an open circuit.
    """

    default_code = "circuit_wait_exceeded"
    retryable = False


# -- configuration ------------------------------------------------------------------------------------


def _finite(default: float, **bounds: float) -> Any:
    return Field(default=default, allow_inf_nan=False, **bounds)


class CircuitBreakerConfig(BaseModel):
    """When a circuit trips, how long it stays open, and how the pipeline waits for it.

    The first group configures each breaker; ``enabled``, ``max_wait`` and ``poll_interval`` configure
    the pipeline around them. :meth:`from_env` reads the ``CB_<FIELD>`` variables.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    failure_ratio: float = _finite(0.5, gt=0.0, le=1.0)
    min_throughput: int = Field(default=10, ge=2, le=1_000_000)
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
    failure_categories: Annotated[frozenset[ErrorCategory], NoDecode] = DEFAULT_FAILURE_CATEGORIES
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

    @classmethod
    def from_env(cls) -> CircuitBreakerConfig:
        """Defaults overridden by ``CB_FAILURE_RATIO``, ``CB_MIN_THROUGHPUT``, ``CB_BREAK_DURATION`` and the
        other fields' ``CB_<FIELD>`` variables; a bad value is a :class:`ConfigurationError` naming it."""
        from flashcard_pipeline.config import CircuitBreakerSettings, read_settings

        return cls.model_validate(read_settings(CircuitBreakerSettings).model_dump())


# -- records ------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class CircuitTransition:
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


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "no error"
    if isinstance(error, StructuredError):
        return f"{error.category.value}/{error.code}: {error.message[:200]}"
    return f"{type(error).__name__}: {str(error)[:200]}"


# -- the breaker --------------------------------------------------------------------------------------


class CircuitBreaker:
    """One circuit (one provider and model in the pipeline). See the module docstring for the rules.

    Use :meth:`execute` as a :class:`~flashcard_pipeline.llm.policy.CallPolicy`, or the parts it is made
    of: :meth:`acquire` (raises :class:`CircuitBreakerError` when refused), then :meth:`record_success`,
    :meth:`record_failure` or :meth:`release` with the permit. :attr:`state_provider` reads,
    :attr:`manual_control` isolates, closes and resets.
    """

    def __init__(
        self,
        config: CircuitBreakerConfig | None = None,
        *,
        name: str = "default",
        clock: Clock | None = None,
        break_duration_generator: BreakDurationGenerator | None = None,
        classify: Classifier | None = None,
        on_transition: Callable[[CircuitTransition], Any] | None = None,
    ) -> None:
        self.config = config = config or CircuitBreakerConfig()
        self.name = name
        self.clock: Clock = clock or SystemClock()
        self._monotonic = self.clock.monotonic
        self._generator = break_duration_generator
        self._default_generator = exponential_break_duration(config)
        self._classify: Classifier = classify or default_classifier(config.failure_categories)
        self._listeners: list[Callable[[CircuitTransition], Any]] = [on_transition] if on_transition else []

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

        self._bucket = config.bucket_duration
        self._n = config.sampling_buckets
        self._ids: list[float] = []
        self._succ: list[int] = []
        self._fail: list[int] = []
        self._clear_window()

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
                return Permit(self._epoch, probe)
        raise self._rejection(now)

    def _expire_probes(self, now: float) -> None:
        timeout = self.config.probe_timeout
        for probe, started in list(self._probes.items()):
            if now - started >= timeout:
                del self._probes[probe]
                log.warning("circuit %s: probe %d did not report within %g s; freeing its slot", self.name, probe,
                            timeout)

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
            self._close(self._monotonic(), "probe succeeded")
            return
        self._successes += 1
        self._add(self._monotonic(), failed=False)

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
            self._add(now, failed=True)
            self._last_failure = _describe(error)
            self._half_open_attempts += 1
            self._open(now, f"probe failed: {self._last_failure}")
            return
        self._failures += 1
        self._add(now, failed=True)
        health = self._health(now)
        total = health.throughput
        if total >= self.config.min_throughput and health.failures / total >= self.config.failure_ratio:
            self._last_failure = _describe(error)
            self._open(now, f"{health.failures} of {total} calls failed in the last "
                            f"{self.config.sampling_duration:g} s (last: {self._last_failure})", health)

    def release(self, permit: Permit) -> None:
        """An outcome with no verdict (cancelled, a bug): a probe's slot is freed, nothing else changes."""
        self._ignored += 1
        if permit.probe and self._probes.pop(permit.probe, None) is not None:
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
        """Run ``call`` if the circuit lets it through; raise :class:`CircuitBreakerError` at once if not."""
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
        return await self.run(self.acquire(), call)

    def _closed_success(self, epoch: int) -> None:
        """:meth:`record_success` for a call admitted while closed, without building a Permit."""
        if epoch != self._epoch:
            self._ignored += 1
            return
        self._successes += 1
        self._add(self._monotonic(), failed=False)

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

    def add_listener(self, listener: Callable[[CircuitTransition], Any]) -> None:
        """Call ``listener`` with every transition and manual action; an exception it raises is logged."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[CircuitTransition], Any]) -> None:
        self._listeners.remove(listener)

    # -- manual control (through CircuitBreakerManualControl) ----------------------------------------

    def _isolate(self, reason: str, source: str | None) -> None:
        now = self._monotonic()
        self._probes.clear()
        self._isolation = reason
        self._open_until = math.inf
        self._transition(_ISOLATED, now, f"isolated by hand: {reason}", manual=True, source=source)

    def _manual_close(self, reason: str, source: str | None, *, reset: bool = False) -> None:
        if reset:
            self._successes = self._failures = self._rejected = self._ignored = self._opened = 0
        verb = "reset" if reset else "closed"
        self._close(self._monotonic(), f"{verb} by hand: {reason}", manual=True, source=source)

    # -- state changes --------------------------------------------------------------------------------

    def _open(self, now: float, reason: str, health: HealthInfo | None = None) -> None:
        health = health or self._health(now)
        duration = self._next_break(BreakDurationArguments(
            failure_count=health.failures, failure_ratio=health.failure_ratio,
            half_open_attempts=self._half_open_attempts, circuit=self.name))
        self._break = duration
        self._open_until = now + duration
        self._probes.clear()
        self._opened += 1
        self._transition(_OPEN, now, reason, health=health, break_duration=duration)

    def _close(self, now: float, reason: str, *, manual: bool = False, source: str | None = None) -> None:
        self._clear_window()
        self._probes.clear()
        self._half_open_attempts = 0
        self._open_until = -math.inf
        self._isolation = None
        self._transition(_CLOSED, now, reason, manual=manual, source=source, health=HealthInfo(0, 0))

    def _next_break(self, args: BreakDurationArguments) -> float:
        generator = self._generator
        if generator is None:
            return self._default_generator(args)
        try:
            value = generator(args)
            seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
        except Exception:
            log.exception("circuit %s: the break duration generator failed; breaking for %g s", self.name,
                          self.config.break_duration)
            return self.config.break_duration
        if not seconds >= 0:  # also catches NaN
            log.error("circuit %s: the break duration generator returned %r; breaking for %g s", self.name, value,
                      self.config.break_duration)
            return self.config.break_duration
        return min(seconds, MAX_BREAK_SECONDS)

    def _transition(self, to: CircuitState, now: float, reason: str, *, manual: bool = False,
                    source: str | None = None, health: HealthInfo | None = None,
                    break_duration: float | None = None) -> None:
        previous = self._state
        health = health or self._health(now)
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
        for listener in tuple(self._listeners):
            try:
                listener(record)
            except Exception:
                log.exception("circuit %s: a transition listener failed", self.name)
        self._signal()

    def _signal(self) -> None:
        event = self._changed
        if event is not None:
            self._changed = None
            event.set()

    # -- the sampling window --------------------------------------------------------------------------

    def _clear_window(self) -> None:
        self._ids = [-math.inf] * self._n
        self._succ = [0] * self._n
        self._fail = [0] * self._n

    def _add(self, now: float, *, failed: bool) -> None:
        index = int(now // self._bucket)
        slot = index % self._n
        if self._ids[slot] != index:
            self._ids[slot] = index
            self._succ[slot] = self._fail[slot] = 0
        if failed:
            self._fail[slot] += 1
        else:
            self._succ[slot] += 1

    def _health(self, now: float) -> HealthInfo:
        """The window at ``now``, computed without changing anything."""
        newest = int(now // self._bucket)
        oldest = newest - self._n
        successes = failures = 0
        for slot, index in enumerate(self._ids):
            if oldest < index <= newest:
                successes += self._succ[slot]
                failures += self._fail[slot]
        return HealthInfo(successes, failures)


# -- reading and steering -----------------------------------------------------------------------------


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
        return b._health(b._monotonic())

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
        health = b._health(now)
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
            breaker._isolate(reason, source)

    def close(self, reason: str, *, source: str | None = None) -> None:
        reason = _reason(reason)
        for breaker in self._breakers:
            breaker._manual_close(reason, source)

    def reset(self, reason: str, *, source: str | None = None) -> None:
        reason = _reason(reason)
        for breaker in self._breakers:
            breaker._manual_close(reason, source, reset=True)


def _reason(reason: str) -> str:
    text = (reason or "").strip()
    if not text:
        raise ValueError("a manual circuit breaker action needs a reason")
    return text


# -- the pipeline's policy ----------------------------------------------------------------------------


@dataclass
class BreakerWaitStats:
    """How much waiting the policy did (for the run's metrics)."""

    waits: int = 0
    waited: float = 0.0
    wait_exceeded: int = 0
    per_circuit: dict[str, float] = field(default_factory=dict)


class CircuitBreakerPolicy:
    """A :class:`~flashcard_pipeline.llm.policy.CallPolicy` with one breaker per provider and model.

    Unlike a bare breaker it does not fail a call the circuit refuses: the call waits (without
    spending the retry policy's attempts, which sits outside) until the circuit lets it through,
    for at most ``config.max_wait`` seconds, then fails with :class:`CircuitWaitExceededError`.
    ``on_pause`` is told why the run is paused (``None`` once nothing waits).
    """

    def __init__(
        self,
        config: CircuitBreakerConfig | None = None,
        *,
        clock: Clock | None = None,
        break_duration_generator: BreakDurationGenerator | None = None,
        classify: Classifier | None = None,
        on_transition: Callable[[CircuitTransition], Any] | None = None,
        on_pause: Callable[[str | None], Any] | None = None,
    ) -> None:
        self.config = config or CircuitBreakerConfig()
        self.clock: Clock = clock or SystemClock()
        self._generator = break_duration_generator
        self._classify = classify
        self._listeners: list[Callable[[CircuitTransition], Any]] = [on_transition] if on_transition else []
        self._creation_listeners: list[Callable[[CircuitBreaker], Any]] = []
        self.on_pause = on_pause
        self.manual_control = CircuitBreakerManualControl()
        self.stats = BreakerWaitStats()
        self._breakers: dict[tuple[str, str], CircuitBreaker] = {}
        self._by_name: dict[str, CircuitBreaker] = {}
        self._waiting: dict[str, int] = {}
        self._pause: str | None = None

    def __repr__(self) -> str:
        return f"CircuitBreakerPolicy({len(self._breakers)} circuits)"

    @property
    def breakers(self) -> dict[str, CircuitBreaker]:
        """Every circuit made so far, by name (``provider/model``)."""
        return dict(self._by_name)

    def breaker(self, provider: str, model: str) -> CircuitBreaker:
        """The breaker for ``provider`` and ``model``, made on first use."""
        found = self._breakers.get((provider, model))
        if found is not None:
            return found
        breaker = CircuitBreaker(self.config, name=f"{provider}/{model}", clock=self.clock,
                                 break_duration_generator=self._generator, classify=self._classify)
        breaker.add_listener(self._on_transition)
        self._breakers[(provider, model)] = breaker
        self._by_name[breaker.name] = breaker
        self.manual_control.attach(breaker)
        for listener in tuple(self._creation_listeners):
            try:
                listener(breaker)
            except Exception:
                log.exception("circuit %s: a creation listener failed", breaker.name)
        return breaker

    def breaker_named(self, name: str) -> CircuitBreaker:
        """The breaker called ``provider/model`` (made if needed, so a circuit can be isolated before use)."""
        found = self._by_name.get(name)
        if found is not None:
            return found
        provider, _, model = name.partition("/")
        if not provider or not model:
            raise ValueError(f"a circuit is named provider/model, got {name!r}")
        return self.breaker(provider, model)

    def add_listener(self, listener: Callable[[CircuitTransition], Any]) -> None:
        """Listen to the transitions of every circuit, present and future."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[CircuitTransition], Any]) -> None:
        self._listeners.remove(listener)

    def add_creation_listener(self, listener: Callable[[CircuitBreaker], Any]) -> None:
        """Call ``listener`` with each circuit as it is made, before its first call is admitted, so a standing
        isolation can hold it from the start; an exception it raises is logged."""
        self._creation_listeners.append(listener)

    def remove_creation_listener(self, listener: Callable[[CircuitBreaker], Any]) -> None:
        self._creation_listeners.remove(listener)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {name: breaker.state_provider.stats() for name, breaker in self._by_name.items()}

    async def execute(self, call: Callable[[], Awaitable[T]], context: CallContext) -> T:
        breaker = self._breakers.get((context.provider, context.model))
        if breaker is None:
            breaker = self.breaker(context.provider, context.model)
        if breaker._state is _CLOSED:
            # CircuitBreaker.execute's closed path, repeated here to save a coroutine per call.
            epoch = breaker._epoch
            try:
                result = await call()
            except BaseException as exc:
                breaker.record(Permit(epoch), exc)
                raise
            if epoch == breaker._epoch:
                index = int(breaker._monotonic() // breaker._bucket)
                slot = index % breaker._n
                if breaker._ids[slot] == index:
                    breaker._successes += 1
                    breaker._succ[slot] += 1
                    return result
            breaker._closed_success(epoch)
            return result
        try:
            permit = breaker.acquire()
        except CircuitBreakerError as rejection:
            permit = await self._wait(breaker, rejection, context)
        return await breaker.run(permit, call)

    async def _wait(self, breaker: CircuitBreaker, rejection: CircuitBreakerError, context: CallContext) -> Permit:
        clock, name, max_wait = self.clock, breaker.name, self.config.max_wait
        started = clock.monotonic()
        self.stats.waits += 1
        self._waiting[name] = self._waiting.get(name, 0) + 1
        self._update_pause()
        try:
            while True:
                remaining = max_wait - (clock.monotonic() - started)
                if remaining <= 0:
                    self.stats.wait_exceeded += 1
                    log.info("circuit %s: %s %r waited %g s for the circuit; giving up", name, context.stage,
                             context.item_key, max_wait)
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
            record_pause(waited)
            self.stats.waited += waited
            self.stats.per_circuit[name] = self.stats.per_circuit.get(name, 0.0) + waited
            self._waiting[name] -= 1
            self._update_pause()

    def _on_transition(self, record: CircuitTransition) -> None:
        for listener in tuple(self._listeners):
            try:
                listener(record)
            except Exception:
                log.exception("circuit %s: a transition listener failed", record.circuit)
        if self._waiting.get(record.circuit):
            self._update_pause()

    def pause_reason(self) -> str | None:
        """Why calls are waiting right now, or None."""
        parts = []
        for name, count in self._waiting.items():
            if count <= 0:
                continue
            provider = self._by_name[name].state_provider
            state = provider.state
            calls = f"{count} call{'s' if count != 1 else ''} waiting"
            if state is _OPEN:
                until = self.clock.now() + timedelta(seconds=provider.retry_after or 0.0)
                until = until.astimezone()  # local time: this is for the person watching the run
                parts.append(f"circuit {name} open until {until:%H:%M:%S} (provider failing); {calls}")
            elif state is _HALF_OPEN:
                parts.append(f"circuit {name} half-open, probing the provider; {calls}")
            elif state is _ISOLATED:
                parts.append(f"circuit {name} isolated by an operator ({provider.isolation_reason}); {calls}")
        return "; ".join(parts) or None

    def _update_pause(self) -> None:
        if self.on_pause is None:
            return
        reason = self.pause_reason()
        if reason != self._pause:
            self._pause = reason
            if self.on_pause is not None:
                try:
                    self.on_pause(reason)
                except Exception:
                    log.exception("the circuit breaker pause listener failed")


def breaker_policies(policy: CallPolicy | None) -> list[CircuitBreakerPolicy]:
    """The circuit breaker policies inside ``policy`` (itself, or nested in pipelines)."""
    if isinstance(policy, CircuitBreakerPolicy):
        return [policy]
    if isinstance(policy, PolicyPipeline):
        return [found for inner in policy.policies for found in breaker_policies(inner)]
    return []
