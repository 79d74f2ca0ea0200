"""CircuitBreaker and the engine's waiting breakers on a FakeClock: trip rules, the window, half-open probes,
dynamic breaks, manual control, monitoring, waiting in the pipeline and the interplay with retries.

Nothing sleeps for real. The Hypothesis state machine lives in test_circuit_breaker_model.py, the
simulator load test in test_circuit_breaker_load.py, the database and CLI in test_circuit_breaker_store.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pydantic
import pytest

from flashcard_pipeline.config import breaker_config
from flashcard_pipeline.errors import (
    AuthenticationError,
    BadRequestError,
    BudgetExceededError,
    CircuitBreakerError,
    ConfigurationError,
    ErrorCategory,
    MalformedJSONError,
    NetworkError,
    RateLimitError,
    RequestTimeoutError,
    ServerError,
    StructuredError,
    error_from_dict,
)
from flashcard_pipeline.resilience import BreakerPause, CallContext, EventHub, PolicyPipeline, Resilience
from flashcard_pipeline.resilience.breaker import (
    MAX_BREAK_SECONDS,
    BreakDurationArguments,
    CircuitBreaker,
    CircuitBreakerConfig,
    CircuitBreakerManualControl,
    CircuitCreated,
    CircuitState,
    CircuitTransition,
    CircuitWaitExceededError,
    exponential_break_duration,
)
from flashcard_pipeline.resilience.breaker.window import one_sided_z, wilson_lower
from flashcard_pipeline.resilience.retry import RetryConfig, RetryPolicy
from flashcard_pipeline.resilience.testing import FakeClock

CTX = CallContext(stage="nuance", item_key="학교", provider="openrouter", model="m", estimated_tokens=100)
OTHER_MODEL = CallContext(stage="nuance", item_key="학교", provider="openrouter", model="n", estimated_tokens=100)


@pytest.fixture(autouse=True)
def _no_breaker_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own CB_* settings must not change what these tests see."""
    for name in list(os.environ):
        if name.startswith("CB_"):
            monkeypatch.delenv(name)


def config(**overrides: Any) -> CircuitBreakerConfig:
    """Polly's plain ratio (``confidence=0``) unless a test asks for the confidence bound."""
    base: dict[str, Any] = {"confidence": 0.0, "min_throughput": 4, "failure_ratio": 0.5, "sampling_duration": 10.0,
                            "sampling_buckets": 10, "break_duration": 5.0, "max_break_duration": 40.0}
    return CircuitBreakerConfig(**{**base, **overrides})


def make(clock: FakeClock | None = None, **overrides: Any) -> tuple[CircuitBreaker, FakeClock, list[CircuitTransition]]:
    clock = clock or FakeClock(autojump=False)
    seen: list[CircuitTransition] = []
    events = EventHub()
    events.subscribe(CircuitTransition, seen.append)
    breaker = CircuitBreaker(config(**overrides), name="openrouter/m", clock=clock, events=events)
    return breaker, clock, seen


async def ok() -> str:
    return "ok"


async def down() -> str:
    raise ServerError("upstream 503", status_code=503)


async def outcome(breaker: CircuitBreaker, call: Callable[[], Awaitable[str]]) -> str:
    """``ok``, ``failed`` (the call's error) or ``rejected`` (the breaker's)."""
    try:
        return await breaker.execute(call)
    except CircuitBreakerError:
        return "rejected"
    except StructuredError:
        return "failed"


async def play(breaker: CircuitBreaker, pattern: str) -> list[str]:
    """``s`` a success, ``f`` a failure, in order."""
    return [await outcome(breaker, ok if step == "s" else down) for step in pattern]


async def trip(breaker: CircuitBreaker) -> None:
    await play(breaker, "f" * breaker.config.min_throughput)
    assert breaker.state_provider.state is CircuitState.OPEN


class Gate:
    """A call that waits until released, counting how many got in."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.entered = 0
        self.release = asyncio.Event()
        self.error = error

    async def __call__(self) -> str:
        self.entered += 1
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return "ok"


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def drive(clock: FakeClock, *calls: Awaitable[Any], step: float = 0.5, limit: int = 10_000) -> list[Any]:
    """Run ``calls`` concurrently on a clock without autojump, moving time ``step`` by ``step`` whenever every
    task is blocked: concurrent sleepers wake at their own times instead of adding up."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    for _ in range(limit):
        await settle()
        if all(task.done() for task in tasks):
            break
        clock.advance(step)
    return await asyncio.gather(*tasks, return_exceptions=True)


# -- configuration ------------------------------------------------------------------------------------


def test_defaults_are_the_plans() -> None:
    c = CircuitBreakerConfig()
    assert (c.failure_ratio, c.min_throughput, c.break_duration) == (0.5, 10, 30.0)
    assert c.confidence == 0.95, "ours: the ratio must be clearly above the threshold (docs/operations.md)"
    assert c.half_open_max_probes == 1 and c.sampling_duration == 30.0 and c.bucket_duration == 3.0
    assert c.failure_categories == {ErrorCategory.EXTERNAL_SERVICE, ErrorCategory.NETWORK, ErrorCategory.TIMEOUT}


def test_from_env_reads_the_cb_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CB_FAILURE_RATIO", "0.25")
    monkeypatch.setenv("CB_MIN_THROUGHPUT", "20")
    monkeypatch.setenv("CB_BREAK_DURATION", "12.5")
    monkeypatch.setenv("CB_MAX_WAIT", "0")
    monkeypatch.setenv("CB_FAILURE_CATEGORIES", "external_service, rate_limit")
    c = breaker_config()
    assert (c.failure_ratio, c.min_throughput, c.break_duration, c.max_wait) == (0.25, 20, 12.5, 0.0)
    assert c.failure_categories == {ErrorCategory.EXTERNAL_SERVICE, ErrorCategory.RATE_LIMIT}
    monkeypatch.setenv("CB_FAILURE_CATEGORIES", '["network"]')
    assert breaker_config().failure_categories == {ErrorCategory.NETWORK}


@pytest.mark.parametrize(("name", "value", "says"), [
    ("CB_FAILURE_RATIO", "0", "greater than 0"),
    ("CB_FAILURE_RATIO", "1.5", "less than or equal to 1"),
    ("CB_FAILURE_RATIO", "half", "valid number"),
    ("CB_MIN_THROUGHPUT", "1", "greater than or equal to 2"),
    ("CB_BREAK_DURATION", "-3", "greater than 0"),
    ("CB_BREAK_DURATION", "nan", "finite"),
    ("CB_SAMPLING_DURATION", "0", "greater than 0"),
    ("CB_FAILURE_CATEGORIES", "outage", "external_service"),
    ("CB_MAX_BREAK_DURATION", "10", "max_break_duration (10) must be at least break_duration (30)"),
])
def test_invalid_values_are_rejected_with_a_clear_message(monkeypatch: pytest.MonkeyPatch, name: str, value: str,
                                                          says: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError) as info:
        breaker_config()
    message = str(info.value)
    assert says in message
    if "must be at least" not in says:
        assert name in message


def test_the_model_rejects_the_same_values_directly() -> None:
    with pytest.raises(pydantic.ValidationError, match="max_break_duration"):
        CircuitBreakerConfig(break_duration=60, max_break_duration=30)
    with pytest.raises(pydantic.ValidationError):
        CircuitBreakerConfig(half_open_max_probes=0)
    with pytest.raises(pydantic.ValidationError):
        CircuitBreakerConfig(probe_timeout=math.inf)


# -- when it trips ------------------------------------------------------------------------------------


async def test_below_the_minimum_throughput_it_never_trips() -> None:
    breaker, _, seen = make(min_throughput=10)
    assert await play(breaker, "f" * 9) == ["failed"] * 9
    assert breaker.state_provider.state is CircuitState.CLOSED and seen == []
    assert breaker.state_provider.health.failure_ratio == 1.0


@pytest.mark.parametrize(("ratio", "failures", "calls"), [(0.5, 5, 10), (0.3, 3, 10), (0.7, 7, 10), (1.0, 4, 4),
                                                         (0.1, 1, 10), (1 / 3, 2, 6)])
async def test_a_ratio_exactly_at_the_threshold_trips(ratio: float, failures: int, calls: int) -> None:
    breaker, _, seen = make(failure_ratio=ratio, min_throughput=calls)
    await play(breaker, "s" * (calls - failures) + "f" * failures)
    assert breaker.state_provider.state is CircuitState.OPEN
    assert [(t.failure_count, t.throughput) for t in seen] == [(failures, calls)]


@pytest.mark.parametrize(("ratio", "failures", "calls"), [(0.5, 4, 10), (0.3, 2, 10), (0.7, 6, 10)])
async def test_a_ratio_just_below_the_threshold_does_not(ratio: float, failures: int, calls: int) -> None:
    breaker, _, _ = make(failure_ratio=ratio, min_throughput=calls)
    await play(breaker, "s" * (calls - failures) + "f" * failures)
    assert breaker.state_provider.state is CircuitState.CLOSED


# -- the confidence bound (the default) ----------------------------------------------------------------------


def test_the_wilson_bound_widens_on_small_samples() -> None:
    z = one_sided_z(0.95)
    assert z == pytest.approx(1.645, abs=1e-3)
    assert wilson_lower(6, 10, z) == pytest.approx(0.352, abs=1e-3), "6 of 10: not clearly above 0.5"
    assert wilson_lower(10, 10, z) == pytest.approx(0.787, abs=1e-3)
    assert wilson_lower(600, 1000, z) > 0.57
    assert wilson_lower(0, 10, z) == 0.0 and wilson_lower(3, 10, 0.0) == pytest.approx(0.3)


async def test_by_default_six_failures_of_ten_are_noise_but_a_failing_streak_trips() -> None:
    breaker, _, seen = make(confidence=0.95, min_throughput=10)
    await play(breaker, "sfsfsffsff")  # 6 of 10, what a provider failing a quarter of calls gives now and then
    assert breaker.state_provider.state is CircuitState.CLOSED and seen == []
    await play(breaker, "ffff")  # 10 of 14: the bound (0.494) is still under 0.5
    assert breaker.state_provider.state is CircuitState.CLOSED
    await play(breaker, "f")  # 11 of 15: bound 0.52
    assert breaker.state_provider.state is CircuitState.OPEN
    assert [(t.failure_count, t.throughput) for t in seen] == [(11, 15)]


async def test_by_default_an_outage_trips_on_the_minimum_throughput_of_failures() -> None:
    breaker, _, seen = make(confidence=0.95, min_throughput=10)
    await trip(breaker)
    assert [(t.failure_count, t.throughput) for t in seen] == [(10, 10)]


@pytest.mark.parametrize("ratio", [0.5, 1.0])
async def test_a_threshold_the_bound_cannot_reach_is_met_by_every_call_failing(ratio: float) -> None:
    breaker, _, _ = make(confidence=0.95, min_throughput=4, failure_ratio=ratio)
    await play(breaker, "ffff")
    assert breaker.state_provider.state is CircuitState.OPEN


async def test_by_default_a_quarter_of_calls_failing_never_trips() -> None:
    """20,000 calls over 1,000 s at 20 per second, each failing with probability 0.25, in the default window."""
    clock = FakeClock(autojump=False)
    breaker = CircuitBreaker(CircuitBreakerConfig(), name="p/m", clock=clock)
    rng = random.Random(11)
    for _ in range(20_000):
        clock.advance(0.05)
        await outcome(breaker, down if rng.random() < 0.25 else ok)
    assert breaker.state_provider.state is CircuitState.CLOSED


async def outage_after_a_busy_window(recent_buckets: int) -> tuple[float, str]:
    """300 successes over 30 s at 10 calls a second, then every call fails: seconds to trip, and the reason."""
    clock = FakeClock(autojump=False)
    breaker = CircuitBreaker(CircuitBreakerConfig(recent_buckets=recent_buckets), name="p/m", clock=clock)
    for _ in range(300):
        clock.advance(0.1)
        await outcome(breaker, ok)
    down_since = clock.monotonic()
    while breaker.state_provider.state is CircuitState.CLOSED:
        clock.advance(0.1)
        await outcome(breaker, down)
    return clock.monotonic() - down_since, breaker.state_provider.transitions[-1].reason


async def test_a_sudden_outage_in_a_busy_run_trips_on_the_newest_buckets_in_seconds() -> None:
    seconds, reason = await outage_after_a_busy_window(recent_buckets=2)
    assert seconds <= 3.5 and "in the last 6 s" in reason, "within a bucket or so of the first failure"
    slow, reason = await outage_after_a_busy_window(recent_buckets=0)
    assert slow >= 15.0 and "in the last 30 s" in reason, "the whole window alone waits for its successes to age"


@pytest.mark.parametrize("share", [0.25, 0.35])
async def test_the_newest_buckets_do_not_trip_on_a_noisy_provider(share: float) -> None:
    """20,000 calls at 10 per second, each failing with probability ``share``: the recent rule's doubled minimum
    throughput and the confidence bound keep noise from opening the circuit."""
    clock = FakeClock(autojump=False)
    breaker = CircuitBreaker(CircuitBreakerConfig(), name="p/m", clock=clock)
    rng = random.Random(7)
    for _ in range(20_000):
        clock.advance(0.1)
        await outcome(breaker, down if rng.random() < share else ok)
    assert breaker.state_provider.opened_count == 0


async def test_the_trip_is_evaluated_on_a_failure_only() -> None:
    breaker, _, _ = make(min_throughput=10, failure_ratio=0.5)
    await play(breaker, "fffff" + "ssss")   # 5 of 9: below the minimum throughput
    await play(breaker, "s")                # 5 of 10 now, but a success never trips
    assert breaker.state_provider.state is CircuitState.CLOSED
    await play(breaker, "f")                # 6 of 11
    assert breaker.state_provider.state is CircuitState.OPEN


async def test_the_window_boundary() -> None:
    """Sampling 10 s in 1 s buckets: an outcome counts until its bucket leaves the window, here at t = 10."""
    breaker, clock, _ = make(min_throughput=4, sampling_duration=10, sampling_buckets=10)
    clock.advance(0.5)
    await play(breaker, "fff")
    clock.advance(9.49)             # t = 9.99: the three failures are still in the window
    assert breaker.state_provider.health.failures == 3
    await play(breaker, "f")
    assert breaker.state_provider.state is CircuitState.OPEN

    breaker, clock, _ = make(min_throughput=4, sampling_duration=10, sampling_buckets=10)
    clock.advance(0.5)
    await play(breaker, "fff")
    clock.advance(9.5)              # t = 10.0: their bucket has left
    assert breaker.state_provider.health.failures == 0
    await play(breaker, "f")
    assert breaker.state_provider.state is CircuitState.CLOSED
    assert breaker.state_provider.health.throughput == 1


async def test_outcomes_spread_over_buckets_leave_one_bucket_at_a_time() -> None:
    breaker, clock, _ = make(min_throughput=100, sampling_duration=4, sampling_buckets=4)
    for _ in range(4):
        await play(breaker, "fs")
        clock.advance(1.0)
    assert breaker.state_provider.health.throughput == 6  # t = 4: the first bucket is gone
    clock.advance(2.0)
    assert breaker.state_provider.health.throughput == 2
    clock.advance(100.0)
    assert breaker.state_provider.health.throughput == 0


# -- open ---------------------------------------------------------------------------------------------


async def test_open_rejects_at_once_with_retry_after_and_does_not_call() -> None:
    breaker, clock, _ = make(break_duration=5.0)
    await trip(breaker)
    clock.advance(2.0)
    called: list[int] = []

    async def call() -> str:
        called.append(1)
        return "ok"

    with pytest.raises(CircuitBreakerError) as info:
        await breaker.execute(call)
    error = info.value
    assert called == [] and error.circuit_state == "open" and error.retry_after == pytest.approx(3.0)
    assert error.retryable and error.category is ErrorCategory.CIRCUIT_OPEN
    assert "openrouter/m" in error.message and "server_error" in error.message
    assert breaker.state_provider.rejected_count == 1


async def test_late_results_while_open_change_nothing() -> None:
    breaker, _, seen = make(break_duration=5.0)
    slow_ok, slow_fail = Gate(), Gate(ServerError("late"))
    tasks = [asyncio.create_task(breaker.execute(slow_ok)), asyncio.create_task(breaker.execute(slow_fail))]
    await settle()
    await trip(breaker)
    opened_until = breaker.state_provider.retry_after
    before = breaker.state_provider.stats()
    slow_ok.release.set()
    slow_fail.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[0] == "ok" and isinstance(results[1], ServerError), "callers still get their own outcome"
    after = breaker.state_provider.stats()
    assert breaker.state_provider.state is CircuitState.OPEN and len(seen) == 1
    assert breaker.state_provider.retry_after == opened_until
    assert (after["failure_count"], after["success_count"], after["window"]) == (
        before["failure_count"], before["success_count"], before["window"])
    assert after["ignored_count"] == before["ignored_count"] + 2


async def test_a_late_success_during_half_open_does_not_close_the_circuit() -> None:
    """Polly closes on any success that arrives while half-open; only a probe may."""
    breaker, clock, _ = make(break_duration=5.0)
    late = Gate()
    task = asyncio.create_task(breaker.execute(late))
    await settle()
    await trip(breaker)
    clock.advance(5.0)
    probe = Gate()
    probe_task = asyncio.create_task(breaker.execute(probe))
    await settle()
    assert breaker.state_provider.state is CircuitState.HALF_OPEN and probe.entered == 1
    late.release.set()
    assert await task == "ok"
    assert breaker.state_provider.state is CircuitState.HALF_OPEN
    probe.release.set()
    await probe_task
    assert breaker.state_provider.state is CircuitState.CLOSED


# -- half-open ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("probes", [1, 3])
async def test_n_concurrent_callers_at_half_open_and_exactly_the_permitted_number_probe(probes: int) -> None:
    breaker, clock, _ = make(break_duration=5.0, half_open_max_probes=probes)
    await trip(breaker)
    clock.advance(5.0)
    gate = Gate()
    tasks = [asyncio.create_task(outcome(breaker, gate)) for _ in range(20)]
    await settle()
    assert gate.entered == probes
    assert breaker.state_provider.probes_in_flight == probes
    gate.release.set()
    results = await asyncio.gather(*tasks)
    assert results.count("ok") == probes and results.count("rejected") == 20 - probes
    assert breaker.state_provider.state is CircuitState.CLOSED


async def test_a_probe_success_closes_and_resets_the_metrics() -> None:
    breaker, clock, seen = make(break_duration=5.0, min_throughput=4)
    await trip(breaker)
    clock.advance(5.0)
    assert await play(breaker, "s") == ["ok"]
    provider = breaker.state_provider
    assert provider.state is CircuitState.CLOSED and provider.health.throughput == 0
    assert [(t.from_state, t.to_state) for t in seen] == [
        (CircuitState.CLOSED, CircuitState.OPEN), (CircuitState.OPEN, CircuitState.HALF_OPEN),
        (CircuitState.HALF_OPEN, CircuitState.CLOSED)]
    assert await play(breaker, "fff") == ["failed"] * 3  # the old failures are gone: needs 4 again
    assert provider.state is CircuitState.CLOSED


async def test_a_probe_failure_reopens_with_the_next_break_duration() -> None:
    breaker, clock, seen = make(break_duration=5.0, max_break_duration=40.0)
    await trip(breaker)
    clock.advance(5.0)
    assert await play(breaker, "f") == ["failed"]
    assert breaker.state_provider.state is CircuitState.OPEN
    assert breaker.state_provider.retry_after == 10.0 and seen[-1].break_duration == 10.0
    assert seen[-1].half_open_attempts == 1 and "probe failed" in seen[-1].reason
    clock.advance(9.9)
    assert await play(breaker, "s") == ["rejected"]


async def test_a_cancelled_probe_frees_its_slot_without_closing() -> None:
    breaker, clock, _ = make(break_duration=5.0)
    await trip(breaker)
    clock.advance(5.0)
    stuck = Gate()
    probe = asyncio.create_task(breaker.execute(stuck))
    await settle()
    assert await play(breaker, "s") == ["rejected"]
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert breaker.state_provider.state is CircuitState.HALF_OPEN and breaker.state_provider.probes_in_flight == 0
    assert await play(breaker, "s") == ["ok"]
    assert breaker.state_provider.state is CircuitState.CLOSED


async def test_a_probe_that_never_reports_frees_its_slot_after_the_timeout() -> None:
    breaker, clock, _ = make(break_duration=5.0, probe_timeout=60.0)
    await trip(breaker)
    clock.advance(5.0)
    lost = Gate()
    lost_task = asyncio.create_task(breaker.execute(lost))
    await settle()
    clock.advance(59.0)
    with pytest.raises(CircuitBreakerError) as info:
        await breaker.execute(ok)
    assert info.value.circuit_state == "half_open" and info.value.retry_after == pytest.approx(1.0)
    clock.advance(1.0)
    second = Gate(ServerError("still down"))
    second_task = asyncio.create_task(breaker.execute(second))
    await settle()
    assert second.entered == 1, "the slot was freed"
    lost.release.set()
    assert await lost_task == "ok"
    assert breaker.state_provider.state is CircuitState.HALF_OPEN, "the lost probe's late answer is ignored"
    second.release.set()
    with pytest.raises(ServerError):
        await second_task
    assert breaker.state_provider.state is CircuitState.OPEN


async def test_a_probe_with_no_verdict_frees_its_slot() -> None:
    breaker, clock, _ = make(break_duration=5.0)
    await trip(breaker)
    clock.advance(5.0)

    async def bug() -> str:
        raise KeyError("a bug, not the provider")

    with pytest.raises(KeyError):
        await breaker.execute(bug)
    assert breaker.state_provider.state is CircuitState.HALF_OPEN
    assert await play(breaker, "s") == ["ok"]


# -- what counts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("error", "counts"), [
    (ServerError("503", status_code=503), True),
    (NetworkError("reset"), True),
    (RequestTimeoutError("slow"), True),
    (BadRequestError("400", status_code=400), False),
    (AuthenticationError("401", status_code=401), False),
    (RateLimitError("429", status_code=429), False),
    (MalformedJSONError("not json"), False),
])
async def test_provider_and_network_failures_count_bad_requests_do_not(error: StructuredError, counts: bool) -> None:
    breaker, _, _ = make(min_throughput=4)

    async def call() -> str:
        raise error

    for _ in range(4):
        with pytest.raises(type(error)):
            await breaker.execute(call)
    provider = breaker.state_provider
    assert (provider.state is CircuitState.OPEN) is counts
    assert (provider.failure_count, provider.success_count) == ((4, 0) if counts else (0, 4))


async def test_a_spent_budget_gives_no_verdict_so_it_cannot_close_a_half_open_circuit() -> None:
    breaker, clock, _ = make(min_throughput=2, break_duration=5.0)
    await play(breaker, "ff")
    assert breaker.state_provider.state is CircuitState.OPEN
    clock.advance(5.0)

    async def refused() -> str:
        raise BudgetExceededError("budget reached")  # raised before anything was sent

    with pytest.raises(BudgetExceededError):
        await breaker.execute(refused)
    provider = breaker.state_provider
    assert provider.state is not CircuitState.CLOSED, "a probe that sent nothing proved nothing"
    assert (provider.failure_count, provider.success_count) == (2, 0), "nor counted as a success"


async def test_which_errors_count_is_configurable() -> None:
    breaker, _, _ = make(min_throughput=2, failure_categories=frozenset({ErrorCategory.RATE_LIMIT}))

    async def limited() -> str:
        raise RateLimitError("429")

    await play(breaker, "ff")
    assert breaker.state_provider.state is CircuitState.CLOSED, "server errors no longer count"
    for _ in range(2):
        with pytest.raises(RateLimitError):
            await breaker.execute(limited)
    assert breaker.state_provider.state is CircuitState.OPEN

    custom = CircuitBreaker(config(min_throughput=2), clock=FakeClock(),
                            classify=lambda e: isinstance(e, KeyError) or None)

    async def key_error() -> str:
        raise KeyError("x")

    for _ in range(2):
        with pytest.raises(KeyError):
            await custom.execute(key_error)
    assert custom.state_provider.state is CircuitState.OPEN


async def test_cancelled_calls_and_bugs_while_closed_are_not_counted() -> None:
    breaker, _, _ = make(min_throughput=2)
    gate = Gate()
    task = asyncio.create_task(breaker.execute(gate))
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    provider = breaker.state_provider
    assert provider.health.throughput == 0 and provider.ignored_count == 1


# -- dynamic break duration -----------------------------------------------------------------------------


async def test_the_default_generator_grows_exponentially_to_the_cap_and_resets_on_close() -> None:
    breaker, clock, seen = make(break_duration=5.0, max_break_duration=40.0)
    await trip(breaker)
    breaks = [breaker.state_provider.break_duration]
    for _ in range(5):
        clock.advance(breaker.state_provider.retry_after or 0.0)
        await play(breaker, "f")  # the probe fails
        breaks.append(breaker.state_provider.break_duration)
    assert breaks == [5.0, 10.0, 20.0, 40.0, 40.0, 40.0]
    clock.advance(40.0)
    await play(breaker, "s")
    assert breaker.state_provider.state is CircuitState.CLOSED and breaker.state_provider.half_open_attempts == 0
    await trip(breaker)
    assert breaker.state_provider.break_duration == 5.0, "back to the base after a close"
    assert [t.half_open_attempts for t in seen if t.to_state is CircuitState.OPEN] == [0, 1, 2, 3, 4, 5, 0]


def test_the_default_generator_cannot_overflow() -> None:
    generate = exponential_break_duration(config(break_duration=30.0, max_break_duration=300.0))
    for attempts in (0, 1, 3, 4, 1_000, 10**9, 10**100):
        value = generate(BreakDurationArguments(failure_count=1, failure_ratio=1.0, half_open_attempts=attempts,
                                                circuit="c"))
        assert math.isfinite(value) and 30.0 <= value <= 300.0
    huge = exponential_break_duration(config(break_duration=1.0, max_break_duration=MAX_BREAK_SECONDS,
                                             break_duration_factor=1000.0))
    assert huge(BreakDurationArguments(1, 1.0, 10**6, "c")) == MAX_BREAK_SECONDS


async def test_the_generator_receives_failure_count_ratio_and_half_open_attempts() -> None:
    calls: list[BreakDurationArguments] = []

    def generator(args: BreakDurationArguments) -> timedelta:
        calls.append(args)
        return timedelta(seconds=7 + args.half_open_attempts)

    clock = FakeClock(autojump=False)
    breaker = CircuitBreaker(config(min_throughput=4, failure_ratio=0.8), name="p/m", clock=clock,
                             break_duration_generator=generator)
    await play(breaker, "sfff")
    await play(breaker, "f")
    assert breaker.state_provider.break_duration == 7.0
    clock.advance(7.0)
    await play(breaker, "f")
    assert breaker.state_provider.break_duration == 8.0
    assert [(a.failure_count, a.failure_ratio, a.half_open_attempts, a.circuit) for a in calls] == [
        (4, 0.8, 0, "p/m"), (5, 5 / 6, 1, "p/m")]


@pytest.mark.parametrize("bad", [lambda a: 1 / 0, lambda a: float("nan"), lambda a: -5, lambda a: "soon"])
async def test_a_broken_generator_falls_back_to_the_base_duration(bad: Callable[[Any], Any],
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    breaker = CircuitBreaker(config(break_duration=5.0), clock=FakeClock(autojump=False),
                             break_duration_generator=bad)
    await trip(breaker)
    assert breaker.state_provider.break_duration == 5.0
    assert any("generator" in r.getMessage() for r in caplog.records)


async def test_an_endless_break_from_the_generator_is_clamped() -> None:
    breaker = CircuitBreaker(config(), clock=FakeClock(autojump=False), break_duration_generator=lambda a: math.inf)
    await trip(breaker)
    assert breaker.state_provider.break_duration == MAX_BREAK_SECONDS
    assert json.dumps(breaker.state_provider.stats())  # the wall time of the end still fits a datetime


# -- manual control ---------------------------------------------------------------------------------------


async def test_isolate_with_a_probe_in_flight_holds_it_open_until_closed(caplog: pytest.LogCaptureFixture) -> None:
    generated: list[BreakDurationArguments] = []

    def generator(args: BreakDurationArguments) -> float:
        generated.append(args)
        return 5.0

    clock = FakeClock(autojump=False)
    breaker = CircuitBreaker(config(), name="p/m", clock=clock, break_duration_generator=generator)
    await trip(breaker)
    clock.advance(5.0)
    probe = Gate()
    probe_task = asyncio.create_task(breaker.execute(probe))
    await settle()
    caplog.set_level(logging.WARNING, logger="flashcard_pipeline.resilience.circuit_breaker")
    breaker.manual_control.isolate("provider incident #42", source="alice")
    assert len(generated) == 1, "isolating does not call the generator"
    probe.release.set()
    assert await probe_task == "ok"
    provider = breaker.state_provider
    assert provider.state is CircuitState.ISOLATED, "the probe's success does not end an isolation"
    clock.advance(10**6)
    with pytest.raises(CircuitBreakerError) as info:
        await breaker.execute(ok)
    assert info.value.circuit_state == "isolated" and info.value.retry_after is None
    assert "provider incident #42" in info.value.message
    assert provider.retry_after is None and provider.isolation_reason == "provider incident #42"
    assert provider.half_open_attempts == 0

    breaker.manual_control.close("incident over", source="bob")
    assert provider.state is CircuitState.CLOSED and await breaker.execute(ok) == "ok"
    manual = [t for t in provider.transitions if t.manual]
    assert [(t.to_state, t.source) for t in manual] == [(CircuitState.ISOLATED, "alice"), (CircuitState.CLOSED, "bob")]
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("provider incident #42" in m and "alice" in m for m in logged)
    assert any("incident over" in m and "bob" in m for m in logged)


async def test_reset_and_closing_a_closed_circuit_are_logged_with_their_reason(
        caplog: pytest.LogCaptureFixture) -> None:
    breaker, _, seen = make()
    caplog.set_level(logging.WARNING, logger="flashcard_pipeline.resilience.circuit_breaker")
    breaker.manual_control.close("double-checking after the incident", source="carol")
    await trip(breaker)
    breaker.manual_control.reset("counters for the new day", source="dave")
    breaker.manual_control.reset("again, already closed", source="erin")
    manual = [(t.from_state, t.to_state, t.reason, t.source) for t in seen if t.manual]
    assert manual == [
        (CircuitState.CLOSED, CircuitState.CLOSED, "closed by hand: double-checking after the incident", "carol"),
        (CircuitState.OPEN, CircuitState.CLOSED, "reset by hand: counters for the new day", "dave"),
        (CircuitState.CLOSED, CircuitState.CLOSED, "reset by hand: again, already closed", "erin")]
    logged = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING and r.name == "flashcard_pipeline.resilience.circuit_breaker"]
    for who, why in (("carol", "double-checking after the incident"), ("dave", "counters for the new day"),
                     ("erin", "again, already closed")):
        assert any(f"({who})" in m and why in m for m in logged), (who, logged)
    assert any("closed -> closed (carol)" in m for m in logged), "a no-op close is still on record"
    assert breaker.state_provider.state is CircuitState.CLOSED and breaker.state_provider.failure_count == 0


async def test_close_and_reset_clear_the_window_and_the_back_off_and_reset_zeroes_counters() -> None:
    breaker, clock, _ = make(break_duration=5.0)
    await trip(breaker)
    clock.advance(5.0)
    await play(breaker, "f")
    assert breaker.state_provider.break_duration == 10.0
    breaker.manual_control.close("checked by hand")
    provider = breaker.state_provider
    assert provider.state is CircuitState.CLOSED and provider.health.throughput == 0
    assert provider.failure_count == 5, "close keeps the counters"
    await trip(breaker)
    assert provider.break_duration == 5.0
    breaker.manual_control.reset("new day")
    assert (provider.state, provider.failure_count, provider.success_count, provider.rejected_count) == (
        CircuitState.CLOSED, 0, 0, 0)
    assert provider.transitions[-1].reason == "reset by hand: new day"


def test_every_manual_action_needs_a_reason() -> None:
    breaker, _, seen = make()
    for action in (breaker.manual_control.isolate, breaker.manual_control.close, breaker.manual_control.reset):
        with pytest.raises(ValueError, match="reason"):
            action("  ")
    assert seen == [] and breaker.state_provider.state is CircuitState.CLOSED


def test_one_manual_control_can_steer_several_breakers() -> None:
    clock = FakeClock(autojump=False)
    a, b = CircuitBreaker(config(), name="p/a", clock=clock), CircuitBreaker(config(), name="p/b", clock=clock)
    control = CircuitBreakerManualControl(a)
    control.attach(b)
    control.attach(b)
    control.isolate("maintenance window")
    assert a.state_provider.state is b.state_provider.state is CircuitState.ISOLATED
    assert control.breakers == (a, b)


# -- monitoring ---------------------------------------------------------------------------------------------


async def test_the_state_provider_reports_without_changing_anything() -> None:
    breaker, clock, seen = make(break_duration=5.0)
    assert await play(breaker, "ssff") == ["ok", "ok", "failed", "failed"]
    clock.advance(7.5)
    provider = breaker.state_provider
    first = provider.stats()
    again = provider.stats()
    assert first == again
    assert provider.state is CircuitState.OPEN and provider.retry_after == 0.0, "due, but only a call half-opens it"
    assert len(seen) == 1 and provider.time_in_state == 7.5
    assert (first["failure_count"], first["success_count"], first["opened_count"]) == (2, 2, 1)
    assert first["window"] == {"successes": 2, "failures": 2, "throughput": 4, "failure_ratio": 0.5,
                               "sampling_duration": 10.0}
    assert first["retry_after"] == 0.0 and first["break_duration"] == 5.0 and first["probes_in_flight"] == 0
    assert first["last_transition"]["to_state"] == "open" and first["state"] == "open"
    assert json.loads(json.dumps(first)) == first
    assert provider.transitions == tuple(seen)


async def test_history_is_bounded() -> None:
    breaker, clock, _ = make(history_size=3, break_duration=1.0, max_break_duration=1.0)
    for _ in range(4):
        await trip(breaker)
        clock.advance(1.0)
        await play(breaker, "s")
    transitions = breaker.state_provider.transitions
    assert len(transitions) == 3 and transitions[-1].to_state is CircuitState.CLOSED
    assert breaker.state_provider.stats()["transition_count"] == 12


async def test_an_event_handler_that_raises_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(autojump=False)
    later: list[CircuitTransition] = []

    def broken(record: CircuitTransition) -> None:
        raise RuntimeError("dashboard is down")

    events = EventHub()
    events.subscribe(CircuitTransition, broken)
    events.subscribe(CircuitTransition, later.append)
    breaker = CircuitBreaker(config(), clock=clock, events=events)
    errors = [await outcome(breaker, down) for _ in range(4)]
    assert errors == ["failed"] * 4, "the caller still gets its own error, not the handler's"
    assert breaker.state_provider.state is CircuitState.OPEN and len(later) == 1
    assert any("listener failed" in r.getMessage() for r in caplog.records)
    events.unsubscribe(CircuitTransition, broken)
    breaker.manual_control.close("ok")
    assert len(later) == 2


# -- errors -------------------------------------------------------------------------------------------------


def test_the_wait_exceeded_error_is_an_open_circuit_that_is_not_retried() -> None:
    error = CircuitWaitExceededError("waited", circuit_state="open", retry_after=3.0)
    assert error.category is ErrorCategory.CIRCUIT_OPEN and error.code == "circuit_wait_exceeded"
    assert not error.retryable and isinstance(error, CircuitBreakerError)
    loaded = error_from_dict(json.loads(json.dumps(error.to_dict())))
    assert type(loaded) is CircuitWaitExceededError and not loaded.retryable


# -- the pipeline's policy -------------------------------------------------------------------------------------


def policy_with(clock: FakeClock, **overrides: Any) -> tuple[Resilience, list[str | None]]:
    """An engine with waiting breakers only, and the pause reasons it announces."""
    pauses: list[str | None] = []
    policy = Resilience(breaker=config(**overrides), clock=clock)
    policy.events.subscribe(BreakerPause, lambda event: pauses.append(event.reason))
    return policy, pauses


class Provider:
    """A provider that is down until ``up_at`` on the clock; records the time of every call it receives."""

    def __init__(self, clock: FakeClock, up_at: float = math.inf) -> None:
        self.clock = clock
        self.up_at = up_at
        self.calls: list[float] = []

    async def __call__(self) -> str:
        now = self.clock.monotonic()
        self.calls.append(now)
        if now < self.up_at:
            raise ServerError("503", status_code=503)
        return "ok"


async def test_one_breaker_per_provider_and_model() -> None:
    clock = FakeClock(autojump=False)
    policy, _ = policy_with(clock, max_wait=0.0)
    for _ in range(4):
        with pytest.raises(ServerError):
            await policy.execute(down, CTX)
    assert await policy.execute(ok, OTHER_MODEL) == "ok"
    assert policy.breaker("openrouter", "m").state_provider.state is CircuitState.OPEN
    assert policy.breaker("openrouter", "n").state_provider.state is CircuitState.CLOSED
    assert set(policy.breakers) == {"openrouter/m", "openrouter/n"}
    assert policy.breaker_named("openrouter/m") is policy.breaker("openrouter", "m")
    assert policy.breaker_named("simulated/simulated/flashcard-sim").name == "simulated/simulated/flashcard-sim"
    with pytest.raises(ValueError, match="provider/model"):
        policy.breaker_named("no-model")


async def test_a_creation_listener_sees_each_circuit_once_before_its_first_call(
        caplog: pytest.LogCaptureFixture) -> None:
    policy, _ = policy_with(FakeClock(autojump=False), max_wait=0.0)
    made: list[str] = []

    def hold(breaker: CircuitBreaker) -> None:
        made.append(breaker.name)
        breaker.manual_control.isolate("held from the start")

    def broken(breaker: CircuitBreaker) -> None:
        raise RuntimeError("dashboard is down")

    def held(event: CircuitCreated) -> None:
        hold(event.breaker)

    policy.events.subscribe(CircuitCreated, lambda event: broken(event.breaker))
    policy.events.subscribe(CircuitCreated, held)
    with pytest.raises(CircuitWaitExceededError, match="held from the start"):
        await policy.execute(ok, CTX)
    policy.breaker_named("openrouter/m")
    assert made == ["openrouter/m"] and any("CircuitCreated listener failed" in r.getMessage()
                                            for r in caplog.records)
    policy.events.unsubscribe(CircuitCreated, held)
    assert await policy.execute(ok, OTHER_MODEL) == "ok" and made == ["openrouter/m"]


async def test_while_open_calls_wait_for_half_open_instead_of_failing() -> None:
    clock = FakeClock(autojump=False)
    policy, pauses = policy_with(clock, break_duration=5.0, max_break_duration=40.0, max_wait=600.0)
    provider = Provider(clock, up_at=12.0)
    for _ in range(4):
        with pytest.raises(ServerError):
            await policy.execute(provider, CTX)
    results = await drive(clock, *(policy.execute(provider, CTX) for _ in range(6)))
    # The probe at t=5 fails (next break 10 s); the one at t=15 succeeds and lets the rest through.
    assert sorted(map(str, results)) == ["503"] + ["ok"] * 5, "only the failed probe failed"
    assert provider.calls == [0.0] * 4 + [5.0] + [15.0] * 5, "one probe per break reached the provider"
    assert pauses[0] is not None and "circuit openrouter/m open until" in pauses[0] and "waiting" in pauses[0]
    assert pauses[-1] is None
    assert policy.waiter.stats.waits >= 5 and policy.waiter.stats.wait_exceeded == 0


async def test_waiting_ends_with_a_clear_non_retryable_error_after_max_wait() -> None:
    clock = FakeClock()
    policy, pauses = policy_with(clock, break_duration=5.0, max_break_duration=5.0, max_wait=12.0)
    provider = Provider(clock)
    for _ in range(4):
        with pytest.raises(ServerError):
            await policy.execute(provider, CTX)
    started = clock.monotonic()
    with pytest.raises(ServerError):
        await policy.execute(provider, CTX)  # waits 5 s, then is the probe, which fails
    assert clock.monotonic() - started == pytest.approx(5.0)
    policy.breaker_named("openrouter/m").manual_control.isolate("provider down for the day")
    with pytest.raises(CircuitWaitExceededError) as info:
        await policy.execute(provider, CTX)
    error = info.value
    assert error.category is ErrorCategory.CIRCUIT_OPEN and not error.retryable
    assert "12 s" in error.message and "CB_MAX_WAIT" in error.message and "provider down for the day" in error.message
    assert policy.waiter.stats.wait_exceeded == 1 and pauses[-1] is None
    assert any(p and "isolated by an operator (provider down for the day)" in p for p in pauses)


async def test_max_wait_zero_fails_at_once() -> None:
    clock = FakeClock()
    policy, _ = policy_with(clock, max_wait=0.0)
    for _ in range(4):
        with pytest.raises(ServerError):
            await policy.execute(down, CTX)
    with pytest.raises(CircuitWaitExceededError):
        await policy.execute(ok, CTX)
    assert clock.sleeps == []


async def test_a_manual_close_wakes_the_waiting_calls_at_once() -> None:
    clock = FakeClock(autojump=False)
    policy, pauses = policy_with(clock, max_wait=600.0)
    policy.breaker_named("openrouter/m").manual_control.isolate("drill")
    tasks = [asyncio.create_task(policy.execute(ok, CTX)) for _ in range(3)]
    await settle()
    assert clock.sleepers == 3 and not any(t.done() for t in tasks)
    assert pauses[-1] is not None and "3 calls waiting" in pauses[-1]
    policy.manual_control.close("drill over")
    assert await asyncio.gather(*tasks) == ["ok"] * 3
    assert clock.monotonic() == 0.0 and pauses[-1] is None


async def test_cancelling_a_waiting_call_stops_its_wait() -> None:
    clock = FakeClock(autojump=False)
    policy, pauses = policy_with(clock, max_wait=600.0)
    policy.breaker_named("openrouter/m").manual_control.isolate("drill")
    task = asyncio.create_task(policy.execute(ok, CTX))
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await settle()
    assert clock.sleepers == 0 and pauses[-1] is None


# -- with the retry policy outside ----------------------------------------------------------------------------------


async def test_waiting_for_the_circuit_does_not_spend_retry_attempts() -> None:
    clock = FakeClock()
    retry = RetryPolicy(RetryConfig(max_attempts=2, max_elapsed=None, jitter_enabled=False), clock=clock,
                        rng=random.Random(1))
    breaker, _ = policy_with(clock, break_duration=5.0, max_break_duration=40.0, max_wait=600.0)
    pipeline = PolicyPipeline([retry, breaker])
    provider = Provider(clock, up_at=12.0)
    for _ in range(2):  # two requests, two attempts each (1 s apart): the 4th failure trips it at t=2
        with pytest.raises(ServerError):
            await pipeline.execute(provider, CTX)
    assert breaker.breaker_named("openrouter/m").state_provider.state is CircuitState.OPEN
    # The next request waits 5 s, is the probe at t=7 (fails: its 1st attempt), backs off 1 s, waits
    # for the 10 s break and is the probe at t=17 (succeeds: its 2nd attempt). 15 s of waiting, 2 calls.
    assert await pipeline.execute(provider, CTX) == "ok"
    assert provider.calls == [0.0, 1.0, 1.0, 2.0, 7.0, 17.0]
    assert (retry.stats.attempts, retry.stats.retries, retry.stats.gave_up) == (6, 3, 2)
    assert breaker.waiter.stats.wait_exceeded == 0 and breaker.waiter.stats.waited == pytest.approx(14.0)


async def test_after_max_wait_the_retry_policy_does_not_retry_the_open_circuit() -> None:
    clock = FakeClock()
    retry = RetryPolicy(RetryConfig(max_attempts=5, max_elapsed=None), clock=clock, rng=random.Random(1))
    breaker, _ = policy_with(clock, max_wait=60.0)
    breaker.breaker_named("openrouter/m").manual_control.isolate("down for maintenance")
    provider = Provider(clock, up_at=0.0)
    with pytest.raises(CircuitWaitExceededError) as info:
        await PolicyPipeline([retry, breaker]).execute(provider, CTX)
    assert provider.calls == [] and retry.stats.attempts == 1 and retry.stats.retries == 0
    assert info.value.category is ErrorCategory.CIRCUIT_OPEN
    assert clock.monotonic() == pytest.approx(60.0), "one wait of max_wait, not one per attempt"


async def test_a_bare_breaker_inside_a_retry_is_waited_out_through_retry_after() -> None:
    """Without the waiting policy, a refusal is an ordinary retryable error carrying Retry-After."""
    clock = FakeClock()
    retry = RetryPolicy(RetryConfig(max_attempts=3, max_elapsed=None, jitter_enabled=False), clock=clock,
                        rng=random.Random(1))
    breaker = CircuitBreaker(config(break_duration=5.0), clock=clock)
    await trip(breaker)
    assert await PolicyPipeline([retry, breaker]).execute(ok, CTX) == "ok"
    assert clock.sleeps == [5.0] and retry.stats.retries == 1
