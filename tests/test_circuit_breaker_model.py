"""A Hypothesis state machine drives a CircuitBreaker and a naive reference model with the same random
sequence of admissions, outcomes (success, failure, no verdict, in any order), manual actions and
clock moves, and checks after every step that both agree on everything observable.

The model keeps every outcome with its time and recounts the window from scratch; the breaker keeps
bucket counters. Both use the documented bucket rule: an outcome at t counts at now while
``floor(now / b) - n < floor(t / b)`` (b the bucket length, n the number of buckets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from flashcard_pipeline.errors import CircuitBreakerError, ServerError
from flashcard_pipeline.resilience.breaker import (
    CircuitBreaker,
    CircuitBreakerConfig,
    CircuitState,
    Permit,
)
from flashcard_pipeline.resilience.testing import FakeClock

CONFIG = CircuitBreakerConfig(confidence=0.0, min_throughput=3, failure_ratio=0.5, sampling_duration=4.0,
                              sampling_buckets=4,
                              break_duration=2.0, max_break_duration=8.0, break_duration_factor=2.0,
                              half_open_max_probes=2, probe_timeout=7.0)
BUCKET = CONFIG.sampling_duration / CONFIG.sampling_buckets


@dataclass
class Model:
    state: CircuitState = CircuitState.CLOSED
    epoch: int = 0
    outcomes: list[tuple[float, bool]] = field(default_factory=list)
    open_until: float = -math.inf
    half_open_attempts: int = 0
    probes: dict[int, float] = field(default_factory=dict)
    next_probe: int = 1
    successes: int = 0
    failures: int = 0
    rejected: int = 0

    def window(self, now: float) -> tuple[int, int]:
        newest = int(now // BUCKET)
        kept = [failed for t, failed in self.outcomes if newest - CONFIG.sampling_buckets < int(t // BUCKET)]
        return len(kept) - sum(kept), sum(kept)

    def move(self, state: CircuitState) -> None:
        self.state = state
        self.epoch += 1

    def open(self, now: float) -> None:
        brk = min(CONFIG.max_break_duration, CONFIG.break_duration * CONFIG.break_duration_factor
                  ** self.half_open_attempts)
        self.open_until = now + brk
        self.probes.clear()
        self.move(CircuitState.OPEN)

    def close(self) -> None:
        self.outcomes.clear()
        self.probes.clear()
        self.half_open_attempts = 0
        self.open_until = -math.inf
        self.move(CircuitState.CLOSED)

    def acquire(self, now: float) -> tuple[int, int] | None:
        """(epoch, probe) of an admitted call, or None when refused."""
        if self.state is CircuitState.CLOSED:
            return self.epoch, 0
        if self.state is CircuitState.OPEN and now >= self.open_until:
            self.move(CircuitState.HALF_OPEN)
        if self.state is CircuitState.HALF_OPEN:
            self.probes = {p: t for p, t in self.probes.items() if now - t < CONFIG.probe_timeout}
            if len(self.probes) < CONFIG.half_open_max_probes:
                probe = self.next_probe
                self.next_probe += 1
                self.probes[probe] = now
                return self.epoch, probe
        self.rejected += 1
        return None

    def live(self, epoch: int, probe: int) -> bool:
        return epoch == self.epoch and (probe == 0 or probe in self.probes)

    def succeed(self, now: float, epoch: int, probe: int) -> None:
        if not self.live(epoch, probe):
            return
        self.successes += 1
        if probe:
            del self.probes[probe]
            self.close()
        else:
            self.outcomes.append((now, False))

    def fail(self, now: float, epoch: int, probe: int) -> None:
        if not self.live(epoch, probe):
            return
        self.failures += 1
        self.outcomes.append((now, True))
        if probe:
            del self.probes[probe]
            self.half_open_attempts += 1
            self.open(now)
            return
        ok, failed = self.window(now)
        if ok + failed >= CONFIG.min_throughput and failed / (ok + failed) >= CONFIG.failure_ratio:
            self.open(now)

    def drop(self, epoch: int, probe: int) -> None:
        if probe and self.live(epoch, probe):
            del self.probes[probe]


class BreakerMachine(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.clock = FakeClock(autojump=False)
        self.breaker = CircuitBreaker(CONFIG, name="p/m", clock=self.clock)
        self.model = Model()
        self.permits: list[tuple[Permit, int, int]] = []

    @rule(dt=st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.75, 2.0, 3.0, 4.0, 7.0, 9.5]))
    def advance(self, dt: float) -> None:
        self.clock.advance(dt)

    def _acquire(self) -> tuple[Permit, int, int] | None:
        expected = self.model.acquire(self.clock.monotonic())
        try:
            permit = self.breaker.acquire()
        except CircuitBreakerError as refusal:
            assert expected is None, f"refused but the model admits: {refusal}"
            assert refusal.circuit_state == self.model.state.value
            if self.model.state is CircuitState.OPEN:
                assert refusal.retry_after == self.model.open_until - self.clock.monotonic()
            return None
        assert expected is not None, "admitted but the model refuses"
        assert (permit.probe != 0) == (expected[1] != 0)
        return permit, *expected

    def _finish(self, held: tuple[Permit, int, int], verdict: str) -> None:
        permit, epoch, probe = held
        now = self.clock.monotonic()
        if verdict == "success":
            self.breaker.record_success(permit)
            self.model.succeed(now, epoch, probe)
        elif verdict == "failure":
            self.breaker.record_failure(permit, ServerError("503"))
            self.model.fail(now, epoch, probe)
        else:
            self.breaker.release(permit)
            self.model.drop(epoch, probe)

    @rule(verdicts=st.lists(st.sampled_from(["success", "failure", "failure", "none"]), min_size=1, max_size=6))
    def calls(self, verdicts: list[str]) -> None:
        """Calls one after the other, each finished before the next starts (the common case)."""
        for verdict in verdicts:
            held = self._acquire()
            if held is not None:
                self._finish(held, verdict)

    @rule()
    def acquire(self) -> None:
        """A call that stays in flight while other things happen."""
        held = self._acquire()
        if held is not None:
            self.permits.append(held)

    @precondition(lambda self: self.permits)
    @rule(data=st.data(), verdict=st.sampled_from(["success", "failure", "none"]))
    def finish(self, data: st.DataObject, verdict: str) -> None:
        index = data.draw(st.integers(0, len(self.permits) - 1))
        self._finish(self.permits.pop(index), verdict)

    @rule(action=st.sampled_from(["isolate", "close", "reset"]))
    def manual(self, action: str) -> None:
        control = self.breaker.manual_control
        if action == "isolate":
            control.isolate("test")
            self.model.probes.clear()
            self.model.move(CircuitState.ISOLATED)
        else:
            getattr(control, action)("test")
            if action == "reset":
                self.model.successes = self.model.failures = self.model.rejected = 0
            self.model.close()

    @invariant()
    def agree(self) -> None:
        if not hasattr(self, "model"):
            return
        provider, model, now = self.breaker.state_provider, self.model, self.clock.monotonic()
        assert provider.state is model.state
        health = provider.health
        assert (health.successes, health.failures) == model.window(now)
        assert (provider.success_count, provider.failure_count, provider.rejected_count) == (
            model.successes, model.failures, model.rejected)
        assert provider.half_open_attempts == model.half_open_attempts
        live_probes = sum(1 for t in model.probes.values() if now - t < CONFIG.probe_timeout)
        assert provider.probes_in_flight == live_probes <= CONFIG.half_open_max_probes
        expected_after = max(0.0, model.open_until - now) if model.state is CircuitState.OPEN else None
        assert provider.retry_after == expected_after
        if model.state is CircuitState.OPEN:
            assert CONFIG.break_duration <= (provider.break_duration or 0) <= CONFIG.max_break_duration


BreakerMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
TestBreakerAgainstModel = BreakerMachine.TestCase
