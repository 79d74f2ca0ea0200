"""RetryPolicy: back-off and jitter bounds, Retry-After, budgets, deadline, cancellation, end to end.

Nothing here sleeps for real: every policy runs on a FakeClock and a seeded random source.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from flashcard_pipeline.cli.app import app
from flashcard_pipeline.config import retry_config
from flashcard_pipeline.errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    BudgetExceededError,
    CircuitBreakerError,
    ConfigurationError,
    ErrorCategory,
    InsufficientCreditsError,
    MalformedJSONError,
    NetworkError,
    RateLimitError,
    SchemaViolationError,
    ServerError,
    StructuredError,
    TruncatedOutputError,
)
from flashcard_pipeline.llm import ChatMessage, ChatRequest, LLMClient, resolve_provider
from flashcard_pipeline.pipeline import Pipeline
from flashcard_pipeline.resilience import (
    CallContext,
    EventHub,
    JitterStrategy,
    PolicyPipeline,
    RetryConfig,
    RetryEvent,
    RetryPolicy,
    SystemClock,
)
from flashcard_pipeline.resilience.core.backoff import exponential_delay
from flashcard_pipeline.resilience.retry import jittered_delay
from flashcard_pipeline.resilience.testing import FakeClock
from flashcard_pipeline.runner import ProcessOptions, process
from flashcard_pipeline.simulator import SimulatorConfig
from flashcard_pipeline.storage.db import open_database
from flashcard_pipeline.storage.ledger import Ledger
from flashcard_pipeline.storage.schema import RunStatus
from tests.test_pipeline import SETTINGS, TERMS, ScriptedClient, new_run, raise_


@pytest.fixture(autouse=True)
def _no_retry_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own RETRY_* settings must not change what these tests see, nor real-time circuit
    breaker pauses (tests/test_circuit_breaker*.py cover retry and breaker together)."""
    for name in list(os.environ):
        if name.startswith("RETRY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CB_ENABLED", "false")


CTX = CallContext(stage="nuance", item_key="학교", provider="openrouter", model="m", estimated_tokens=100)
NO_JITTER = {"jitter_enabled": False}


class Script:
    """A call that plays ``outcomes`` in order (the last one repeats) and notes when it was made."""

    def __init__(self, *outcomes: Any, clock: FakeClock | None = None, duration: float = 0.0) -> None:
        self.outcomes = outcomes
        self.clock = clock
        self.duration = duration
        self.times: list[float] = []

    @property
    def calls(self) -> int:
        return len(self.times)

    async def __call__(self) -> Any:
        if len(self.times) >= 100:
            raise RuntimeError("runaway retry loop")  # not a StructuredError: ends the policy at once
        self.times.append(self.clock.monotonic() if self.clock else 0.0)
        outcome = self.outcomes[min(len(self.times), len(self.outcomes)) - 1]
        if self.clock and self.duration:
            await self.clock.sleep(self.duration)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def make_policy(seed: int = 1, **config: Any) -> tuple[RetryPolicy, FakeClock, list[RetryEvent]]:
    clock = FakeClock()
    events: list[RetryEvent] = []
    hub = EventHub()
    hub.subscribe(RetryEvent, events.append)
    policy = RetryPolicy(RetryConfig(**config), clock=clock, rng=random.Random(seed), events=hub)
    return policy, clock, events


# -- configuration ----------------------------------------------------------------------------------


def test_defaults_are_the_plans() -> None:
    config = RetryConfig()
    assert (config.max_attempts, config.initial_delay, config.max_delay, config.exponential_base) == (8, 1.0, 60.0,
                                                                                                      2.0)
    assert config.jitter_enabled and config.strategy is JitterStrategy.PLAN
    assert config.max_elapsed is not None and config.max_retry_after is not None
    assert ErrorCategory.VALIDATION not in config.retry_categories
    assert ErrorCategory.RATE_LIMIT in config.retry_categories


def test_from_env_reads_the_retry_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETRY_MAX_ATTEMPTS", "5")
    monkeypatch.setenv("RETRY_INITIAL_DELAY", "0.25")
    monkeypatch.setenv("RETRY_MAX_DELAY", "10")
    monkeypatch.setenv("RETRY_JITTER_ENABLED", "false")
    monkeypatch.setenv("RETRY_JITTER_STRATEGY", "decorrelated")
    config = retry_config()
    assert (config.max_attempts, config.initial_delay, config.max_delay) == (5, 0.25, 10.0)
    assert not config.jitter_enabled and config.strategy is JitterStrategy.NONE
    assert config.jitter_strategy is JitterStrategy.DECORRELATED


@pytest.mark.parametrize(("name", "value"), [("RETRY_MAX_ATTEMPTS", "0"), ("RETRY_MAX_DELAY", "soon"),
                                             ("RETRY_JITTER_ENABLED", "perhaps")])
def test_a_bad_variable_is_a_configuration_error_naming_it(monkeypatch: pytest.MonkeyPatch, name: str,
                                                           value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=name):
        retry_config()


def test_inconsistent_delays_are_rejected() -> None:
    with pytest.raises(pydantic.ValidationError, match="max_delay"):
        RetryConfig(initial_delay=5, max_delay=1)
    with pytest.raises(pydantic.ValidationError):
        RetryConfig(exponential_base=0.5)


# -- delays -----------------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_and_stays_there_for_huge_attempt_numbers() -> None:
    config = RetryConfig(**NO_JITTER)
    assert [config.backoff(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    for huge in (1_000, 10**6, 10**18, 10**400):
        assert config.backoff(huge) == 60.0
    assert RetryConfig(exponential_base=1.0, initial_delay=3, **NO_JITTER).backoff(10**9) == 3.0
    assert RetryConfig(initial_delay=0, max_delay=0).delay(10**9, random.Random(0)) == 0.0


@settings(max_examples=300, deadline=None)
@given(attempt=st.integers(min_value=1, max_value=10**500),
       initial=st.floats(5e-324, 100) | st.sampled_from([5e-324, 1e-310, 1e-300]),
       base=st.floats(1.0, 50), extra=st.floats(0, 10_000) | st.just(1e300))
def test_exponential_delay_is_bounded_and_monotone(attempt: int, initial: float, base: float, extra: float) -> None:
    cap = initial + extra
    here = exponential_delay(attempt, initial=initial, base=base, cap=cap)
    after = exponential_delay(attempt + 1, initial=initial, base=base, cap=cap)
    assert math.isfinite(here) and min(initial, cap) <= here <= cap
    assert here <= after * (1 + 1e-12)


@pytest.mark.parametrize("attempt", [1, 2, 1_100, 10**9, 10**400])
def test_an_unbounded_cap_never_overflows_either(attempt: int) -> None:
    delay = exponential_delay(attempt, initial=1.0, base=2.0, cap=math.inf)
    assert delay == (2.0 ** (attempt - 1) if attempt < 1_000 else math.inf)
    assert isinstance(delay, float), "no giant integer is built on the way"


@pytest.mark.parametrize("strategy", list(JitterStrategy))
@pytest.mark.parametrize("retry", [1, 2, 3, 7, 64, 1025, 10**9, 10**300])
def test_every_strategy_stays_within_its_bounds_at_any_attempt(strategy: JitterStrategy, retry: int) -> None:
    config = RetryConfig(jitter_strategy=strategy, initial_delay=0.5, max_delay=30)
    rng = random.Random(retry)
    backoff = config.backoff(retry)
    previous: float | None = None
    for _ in range(200):
        delay = config.delay(retry, rng, previous)
        assert 0 <= delay <= config.max_delay
        if strategy is JitterStrategy.PLAN:
            assert backoff / 2 <= delay <= backoff
        elif strategy is JitterStrategy.FULL:
            assert delay <= backoff
        elif strategy is JitterStrategy.NONE:
            assert delay == backoff
        else:
            last = config.initial_delay if previous is None else previous
            assert config.initial_delay <= delay <= min(config.max_delay, 3 * last)
        previous = delay


def ks_uniform(samples: list[float], low: float, high: float) -> float:
    """Kolmogorov–Smirnov distance between ``samples`` and the uniform distribution on [low, high]."""
    ordered = sorted(samples)
    n = len(ordered)
    return max(max((i + 1) / n - (x - low) / (high - low), (x - low) / (high - low) - i / n)
               for i, x in enumerate(ordered))


@pytest.mark.parametrize(("strategy", "expected"), [
    (JitterStrategy.PLAN, (4.0, 8.0)),          # 8 * (0.5 + U * 0.5)
    (JitterStrategy.FULL, (0.0, 8.0)),          # U(0, 8)
    (JitterStrategy.DECORRELATED, (1.0, 6.0)),  # U(initial=1, 3 * previous=6)
])
def test_jitter_is_uniform_on_the_documented_interval(strategy: JitterStrategy,
                                                      expected: tuple[float, float]) -> None:
    rng = random.Random(20250301)
    n = 20_000
    samples = [jittered_delay(strategy, 8.0, rng, initial=1.0, previous=2.0, cap=60.0) for _ in range(n)]
    low, high = expected
    assert low <= min(samples) < low + 0.01 * (high - low)
    assert high - 0.01 * (high - low) < max(samples) <= high
    assert ks_uniform(samples, low, high) < 1.63 / math.sqrt(n)  # 1 % critical value
    spread = (high - low) / math.sqrt(12 * n)
    assert abs(sum(samples) / n - (low + high) / 2) < 4 * spread


def test_no_jitter_means_identical_delays_and_jitter_spreads_simultaneous_clients() -> None:
    plain = RetryConfig(**NO_JITTER)
    assert {plain.delay(3, random.Random(seed)) for seed in range(50)} == {4.0}
    jittered = RetryConfig()
    assert len({jittered.delay(3, random.Random(seed)) for seed in range(50)}) == 50


async def test_decorrelated_delays_grow_from_the_previous_one_and_respect_the_cap() -> None:
    policy, clock, _ = make_policy(jitter_strategy=JitterStrategy.DECORRELATED, max_attempts=60, max_elapsed=None,
                                   initial_delay=1.0, max_delay=20.0)
    with pytest.raises(ServerError):
        await policy.execute(Script(ServerError("down")), CTX)
    sleeps = clock.sleeps
    assert len(sleeps) == 59 and all(1.0 <= s <= 20.0 for s in sleeps)
    assert all(now <= 3 * before for before, now in zip([1.0, *sleeps], sleeps, strict=False))
    below_cap = [s for s in sleeps if s < 20.0]
    assert 20.0 in sleeps and len(set(below_cap)) == len(below_cap), "random below the cap, clamped at it"


# -- what is retried ---------------------------------------------------------------------------------


async def test_success_first_time_is_one_call_and_no_wait() -> None:
    policy, clock, events = make_policy()
    call = Script("answer")
    assert await policy.execute(call, CTX) == "answer"
    assert call.calls == 1 and clock.sleeps == [] and events == []
    assert (policy.stats.attempts, policy.stats.retries, policy.stats.gave_up) == (1, 0, 0)


async def test_transient_errors_are_retried_with_growing_waits_until_success() -> None:
    policy, clock, events = make_policy(max_attempts=4, **NO_JITTER)
    call = Script(ServerError("503", status_code=503), RateLimitError("429", status_code=429),
                  NetworkError("reset"), "answer", clock=clock)
    assert await policy.execute(call, CTX) == "answer"
    assert call.times == [0.0, 1.0, 3.0, 7.0]
    assert [e.action for e in events] == ["retry"] * 3 and [e.attempt for e in events] == [1, 2, 3]
    assert (policy.stats.attempts, policy.stats.retries, policy.stats.waited) == (4, 3, 7.0)


async def test_after_max_attempts_the_last_error_is_raised_with_the_tally() -> None:
    policy, _, events = make_policy(max_attempts=3)
    errors = [ServerError(f"failure {i}", status_code=502) for i in range(5)]
    call = Script(*errors)
    with pytest.raises(ServerError) as info:
        await policy.execute(call, CTX)
    assert info.value is errors[2] and call.calls == 3
    assert info.value.details["retry"] == {"calls": 3, "reasks": 0, "gave_up": "attempts_exhausted"}
    assert events[-1].action == "give_up" and events[-1].reason == "attempts_exhausted"
    assert policy.stats.gave_up == 1


class Aborting(ServerError):
    aborts_run = True


@pytest.mark.parametrize("error", [
    BadRequestError("400", status_code=400), AuthenticationError("401", status_code=401),
    InsufficientCreditsError("402", status_code=402), AuthenticationError("403", status_code=403),
    BadRequestError("404", status_code=404, code="not_found"), APIError("409", status_code=409),
    ConfigurationError("bad model"), BudgetExceededError("spent"), Aborting("retryable but fatal"),
], ids=lambda e: f"{type(e).__name__}-{e.message}")
async def test_permanent_errors_are_never_retried(error: StructuredError) -> None:
    policy, clock, events = make_policy()
    call = Script(error, "never reached")
    with pytest.raises(StructuredError) as info:
        await policy.execute(call, CTX)
    assert info.value is error and call.calls == 1 and clock.sleeps == [] and events == []
    assert "retry" not in error.details


async def test_bugs_are_not_retried() -> None:
    policy, _, _ = make_policy()
    call = Script(KeyError("oops"), "never reached")
    with pytest.raises(KeyError):
        await policy.execute(call, CTX)
    assert call.calls == 1


async def test_only_the_configured_categories_are_retried() -> None:
    policy, _, _ = make_policy(retry_categories=frozenset({ErrorCategory.EXTERNAL_SERVICE}))
    limited = Script(RateLimitError("429", status_code=429), "ok")
    with pytest.raises(RateLimitError):
        await policy.execute(limited, CTX)
    assert limited.calls == 1
    assert await policy.execute(Script(ServerError("503"), "ok"), CTX) == "ok"


def provider_client(handler: Callable[[httpx.Request], httpx.Response], clock: FakeClock) -> LLMClient:
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    provider = resolve_provider("openrouter", api_key="sk-test-0123456789", env={})
    return LLMClient(provider, http=http, wall_clock=clock.now)


def ok_response(content: str = '{"ok": true}', finish_reason: str = "stop") -> httpx.Response:
    return httpx.Response(200, json={"id": "gen-1", "model": "m", "usage": {"prompt_tokens": 1, "completion_tokens": 1},
                                     "choices": [{"message": {"content": content}, "finish_reason": finish_reason}]})


REQUEST = ChatRequest(model="m", messages=(ChatMessage("user", "사과"),))


def first_then_ok(first: Callable[[httpx.Request], httpx.Response]) -> tuple[list[float], Callable[..., Any]]:
    seen: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(len(seen))
        return first(request) if len(seen) == 1 else ok_response()

    return seen, handler


def status(code: int, headers: dict[str, str] | None = None) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(code, json={"error": {"code": code, "message": "no"}}, headers=headers)


def raising(error: type[httpx.RequestError]) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        raise error("boom", request=request)

    return handler


async def test_before_retry_runs_before_each_retry_and_can_end_the_loop() -> None:
    policy, _, _ = make_policy(max_attempts=10, **NO_JITTER)
    checks: list[int] = []
    script = Script(ServerError("503", status_code=503))

    def budget() -> None:
        checks.append(script.calls)
        if len(checks) == 3:
            raise BudgetExceededError("budget reached")

    context = dataclasses.replace(CTX, before_retry=budget)
    with pytest.raises(BudgetExceededError):
        await policy.execute(script, context)
    assert checks == [1, 2, 3] and script.calls == 3, "checked before every retry, never before the first call"
    assert policy.stats.attempts == 3


@pytest.mark.parametrize(("first", "calls"), [
    (status(400), 1), (status(401), 1), (status(402), 1), (status(403), 1), (status(404), 1), (status(422), 1),
    (status(408), 2), (status(429), 2), (status(500), 2), (status(502), 2), (status(503), 2), (status(504), 2),
    (raising(httpx.ConnectError), 2), (raising(httpx.RemoteProtocolError), 2), (raising(httpx.ReadTimeout), 2),
    (raising(httpx.ConnectTimeout), 2), (lambda r: ok_response(content=""), 2),
    (lambda r: ok_response(finish_reason="length"), 2), (lambda r: httpx.Response(200, json={"error": {
        "code": 502, "message": "upstream died"}}), 2),
    (lambda r: httpx.Response(200, json={"error": {"code": 402, "message": "no credit"}}), 1),
    (lambda r: httpx.Response(200, text="<html>proxy error</html>"), 2),
], ids=["400", "401", "402", "403", "404", "422", "408", "429", "500", "502", "503", "504", "connect", "protocol",
        "read-timeout", "connect-timeout", "empty", "truncated", "502-in-200", "402-in-200", "html-200"])
async def test_what_the_client_raises_is_retried_exactly_when_it_should_be(
        first: Callable[[httpx.Request], httpx.Response], calls: int) -> None:
    policy, clock, _ = make_policy()
    seen, handler = first_then_ok(first)
    async with provider_client(handler, clock) as client:
        if calls == 1:
            with pytest.raises(StructuredError) as info:
                await policy.execute(lambda: client.complete(REQUEST), CTX)
            assert not info.value.retryable
        else:
            response = await policy.execute(lambda: client.complete(REQUEST), CTX)
            assert response.content == '{"ok": true}'
    assert len(seen) == calls
    assert len(clock.sleeps) == calls - 1


# -- Retry-After ------------------------------------------------------------------------------------


async def test_the_wait_is_never_shorter_than_retry_after_nor_than_the_backoff() -> None:
    policy, clock, _ = make_policy(max_attempts=3)
    call = Script(RateLimitError("slow down", retry_after=7.0), "ok", clock=clock)
    assert await policy.execute(call, CTX) == "ok"
    assert call.times == [0.0, 7.0]

    policy, clock, _ = make_policy(initial_delay=5.0, **NO_JITTER)
    call = Script(ServerError("busy", retry_after=0.5), "ok", clock=clock)
    assert await policy.execute(call, CTX) == "ok"
    assert call.times == [0.0, 5.0]


def http_date(clock: FakeClock, seconds: float) -> str:
    return format_datetime(clock.now() + timedelta(seconds=seconds), usegmt=True)


@pytest.mark.parametrize(("headers", "wait"), [
    (lambda c: {"Retry-After": "7"}, 7.0),
    (lambda c: {"retry-after-ms": "2500", "Retry-After": "1"}, 2.5),   # the precise header wins
    (lambda c: {"retry-after-ms": "250", "Retry-After": "9"}, 1.0),    # ...but never below our own back-off
    (lambda c: {"Retry-After": http_date(c, 30)}, 30.0),
    (lambda c: {"Retry-After": http_date(c, -3600)}, 1.0),             # a date in the past: our back-off
    (lambda c: {"Retry-After": "after lunch"}, 1.0),                   # unparseable: our back-off
    (lambda c: {"Retry-After": "-5"}, 1.0),
], ids=["seconds", "ms-precedence", "ms-below-backoff", "http-date", "past-date", "unparseable", "negative"])
async def test_retry_after_headers_decide_when_the_next_call_starts(
        headers: Callable[[FakeClock], dict[str, str]], wait: float) -> None:
    policy, clock, _ = make_policy(**NO_JITTER)
    clock.advance(1234.0)  # wall time moves too (whole seconds: HTTP dates have no fractions)
    sent: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(clock.monotonic())
        return status(429, headers(clock))(request) if len(sent) == 1 else ok_response()

    async with provider_client(handler, clock) as client:
        await policy.execute(lambda: client.complete(REQUEST), CTX)
    assert len(sent) == 2
    assert sent[1] - sent[0] == pytest.approx(wait, abs=1e-6)


async def test_a_retry_after_beyond_the_cap_gives_up_at_once() -> None:
    policy, clock, events = make_policy(max_retry_after=120.0)
    error = RateLimitError("come back tomorrow", retry_after=86_400.0)
    call = Script(error, "ok")
    with pytest.raises(RateLimitError) as info:
        await policy.execute(call, CTX)
    assert info.value is error and call.calls == 1 and clock.sleeps == []
    assert info.value.details["retry"]["gave_up"] == "retry_after_exceeds_cap"
    assert [e.reason for e in events] == ["retry_after_exceeds_cap"]

    forever, clock, _ = make_policy(max_retry_after=None, max_elapsed=None)
    with pytest.raises(RateLimitError):
        await forever.execute(Script(RateLimitError("never", retry_after=math.inf), "ok"), CTX)
    assert clock.sleeps == []

    uncapped, clock, _ = make_policy(max_retry_after=None, max_elapsed=None)
    assert await uncapped.execute(Script(RateLimitError("later", retry_after=86_400.0), "ok"), CTX) == "ok"
    assert clock.sleeps == [86_400.0]


async def test_an_open_circuit_is_waited_out_like_a_retry_after() -> None:
    policy, clock, _ = make_policy()
    call = Script(CircuitBreakerError("open", circuit_state="open", retry_after=12.0), "ok", clock=clock)
    assert await policy.execute(call, CTX) == "ok"
    assert call.times == [0.0, 12.0]


# -- deadline ---------------------------------------------------------------------------------------


async def test_the_deadline_stops_retries_that_would_end_too_late() -> None:
    policy, clock, events = make_policy(max_attempts=50, max_elapsed=10.0)
    call = Script(RateLimitError("busy", retry_after=4.0), clock=clock)
    with pytest.raises(RateLimitError) as info:
        await policy.execute(call, CTX)
    assert call.times == [0.0, 4.0, 8.0]  # a fourth call would start at 12 s, past the 10 s deadline
    assert info.value.details["retry"] == {"calls": 3, "reasks": 0, "gave_up": "deadline"}
    assert clock.monotonic() == 8.0, "it gave up without sleeping in vain"
    assert events[-1].reason == "deadline"


async def test_time_spent_in_calls_counts_against_the_deadline() -> None:
    policy, clock, _ = make_policy(max_attempts=50, max_elapsed=10.0, **NO_JITTER)
    call = Script(ServerError("slow and broken"), clock=clock, duration=3.0)
    with pytest.raises(ServerError):
        await policy.execute(call, CTX)
    assert call.times == [0.0, 4.0, 9.0]  # calls end at 3, 7 and 12; waits 1 and 2; 12 + 4 > 10
    assert all(t < 10.0 for t in call.times)


async def test_time_paused_by_inner_policies_does_not_count_against_the_deadline() -> None:
    policy, clock, _ = make_policy(max_attempts=5, max_elapsed=10.0, **NO_JITTER)
    calls = 0

    async def waits_for_an_open_circuit_then_fails_once() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            await clock.sleep(60.0)  # an inner breaker held the call while the provider was down
            CTX.record_pause(60.0)
            raise ServerError("first call after the outage failed")
        return "ok"

    assert await policy.execute(waits_for_an_open_circuit_then_fails_once, CTX) == "ok"
    assert calls == 2 and clock.monotonic() == 61.0

    CTX.record_pause(5.0)  # outside any retry loop: ignored, no error


# -- cancellation -----------------------------------------------------------------------------------


async def test_cancelling_during_the_wait_propagates_and_ends_the_loop() -> None:
    clock = FakeClock(autojump=False)
    policy = RetryPolicy(RetryConfig(max_attempts=5), clock=clock, rng=random.Random(0))
    call = Script(ServerError("503"), "ok")
    task = asyncio.create_task(policy.execute(call, CTX))
    for _ in range(100):
        if clock.sleepers:
            break
        await asyncio.sleep(0)
    assert clock.sleepers == 1 and call.calls == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    clock.advance(3600)
    await asyncio.sleep(0)
    assert call.calls == 1 and policy.stats.retries == 0


async def test_cancellation_inside_a_call_is_not_retried() -> None:
    policy, clock, _ = make_policy()
    call = Script(asyncio.CancelledError(), "ok")
    with pytest.raises(asyncio.CancelledError):
        await policy.execute(call, CTX)
    assert call.calls == 1 and clock.sleeps == []


# -- bad output: the separate re-ask budget ---------------------------------------------------------


async def test_bad_output_is_reasked_at_once_from_its_own_small_budget() -> None:
    policy, clock, events = make_policy(max_reasks=2)
    call = Script(MalformedJSONError("not json"), SchemaViolationError("no cards"), SchemaViolationError("again"))
    with pytest.raises(SchemaViolationError) as info:
        await policy.execute(call, CTX)
    assert call.calls == 3 and clock.sleeps == []
    assert [e.action for e in events] == ["reask", "reask", "give_up"]
    assert info.value.details["retry"] == {"calls": 3, "reasks": 2, "gave_up": "reasks_exhausted"}
    assert (policy.stats.reasks, policy.stats.retries) == (2, 0)


async def test_reasks_and_transient_retries_are_counted_separately() -> None:
    policy, _, _ = make_policy(max_attempts=3, max_reasks=2)
    call = Script(SchemaViolationError("a"), ServerError("b"), MalformedJSONError("c"), ServerError("d"), "ok")
    assert await policy.execute(call, CTX) == "ok"
    assert (call.calls, policy.stats.reasks, policy.stats.retries) == (5, 2, 2)


async def test_truncated_output_is_an_ordinary_retry_with_back_off() -> None:
    policy, clock, events = make_policy(max_reasks=0, **NO_JITTER)
    assert await policy.execute(Script(TruncatedOutputError("cut"), "ok"), CTX) == "ok"
    assert clock.sleeps == [1.0] and events[0].action == "retry"


KINDS = {"5xx": lambda: ServerError("x"), "429": lambda: RateLimitError("y", retry_after=2.0),
         "bad": lambda: SchemaViolationError("z"), "ok": lambda: "ok"}


@settings(max_examples=150, deadline=None)
@given(outcomes=st.lists(st.sampled_from(sorted(KINDS)), min_size=1, max_size=20),
       attempts=st.integers(1, 5), reasks=st.integers(0, 3))
def test_cost_is_linear_whatever_the_model_does(outcomes: list[str], attempts: int, reasks: int) -> None:
    policy, _, _ = make_policy(max_attempts=attempts, max_reasks=reasks, max_elapsed=None)
    made: list[str] = []

    async def call() -> str:
        if len(made) >= 100:
            raise RuntimeError("runaway retry loop")
        kind = outcomes[min(len(made), len(outcomes) - 1)]
        made.append(kind)
        result = KINDS[kind]()
        if isinstance(result, Exception):
            raise result
        return result

    async def run() -> str:
        try:
            return await policy.execute(call, CTX)
        except StructuredError:
            return "failed"

    result = asyncio.run(run())
    assert len(made) <= attempts + reasks
    transient = sum(kind in ("5xx", "429") for kind in made)
    bad = made.count("bad")
    assert transient <= attempts and bad <= reasks + 1
    if result == "ok":
        assert made[-1] == "ok"
    else:
        assert transient == attempts or bad == reasks + 1


# -- one loop per call ------------------------------------------------------------------------------


async def test_a_nested_retry_policy_does_not_multiply_the_calls() -> None:
    outer, clock, _ = make_policy(max_attempts=3)
    inner = RetryPolicy(RetryConfig(max_attempts=4), clock=clock, rng=random.Random(2))
    call = Script(ServerError("down"))
    with pytest.raises(ServerError):
        await PolicyPipeline([outer, inner]).execute(call, CTX)
    assert call.calls == 3 and inner.stats.retries == 0


async def test_in_the_pipeline_an_item_fails_after_exactly_max_attempts_calls_and_the_run_goes_on(
        db_url: str) -> None:
    ledger = Ledger(open_database(db_url))
    run = new_run(ledger)
    clock = FakeClock()
    policy = RetryPolicy(RetryConfig(max_attempts=3), clock=clock, rng=random.Random(3))
    client = ScriptedClient(faults={("그", "nuance"): raise_(ServerError("upstream 503", status_code=503))})
    outcome = await Pipeline(ledger=ledger, client=client, settings=SETTINGS, policy=policy,
                             flush_interval=0.01).run(run)
    assert outcome.status is RunStatus.FAILED
    assert [(f.term, f.stage, f.category, f.code) for f in outcome.failures] == [
        ("그", "nuance", "external_service", "server_error")]
    assert Counter(client.calls)[("그", "nuance")] == 3
    assert ("그", "cards") not in client.calls
    failed_calls = [c for c in ledger.api_calls(run.id) if c.status == "error"]
    assert len(failed_calls) == 3
    assert {(c.error_category, c.error_code, c.http_status) for c in failed_calls} == {
        ("external_service", "server_error", 503)}
    assert outcome.stats.done == len(TERMS) - 1 and len(clock.sleeps) == 2


# -- hook, counters, log ----------------------------------------------------------------------------


async def test_each_retry_is_logged_once_and_reported_to_the_hook(caplog: pytest.LogCaptureFixture) -> None:
    policy, clock, events = make_policy(max_attempts=3)
    caplog.set_level(logging.INFO, logger="flashcard_pipeline.resilience.retry")
    secretless = ServerError("upstream 502", status_code=502)
    assert await policy.execute(Script(secretless, RateLimitError("429", retry_after=3.0), "ok"), CTX) == "ok"
    lines = [r.getMessage() for r in caplog.records if r.name == "flashcard_pipeline.resilience.retry"]
    assert len(lines) == 2
    assert "external_service/server_error" in lines[0] and "학교" in lines[0] and "nuance" in lines[0]
    assert [e.delay for e in events] == clock.sleeps and clock.sleeps[1] >= 3.0
    assert all(e.context is CTX for e in events)


# -- FakeClock --------------------------------------------------------------------------------------


async def test_fake_clock_jumps_and_keeps_wall_time_in_step() -> None:
    clock = FakeClock(start=100.0)
    wall = clock.now()
    await clock.sleep(2.5)
    await clock.sleep(-1)
    assert clock.monotonic() == 102.5 and clock.sleeps == [2.5, 0.0] and clock.slept == 2.5
    assert clock.now() - wall == timedelta(seconds=2.5)
    with pytest.raises(ValueError):
        clock.advance(-1)


async def test_fake_clock_without_autojump_wakes_sleepers_in_order() -> None:
    clock = FakeClock(autojump=False)
    woke: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(name)

    tasks = [asyncio.create_task(sleeper("late", 5)), asyncio.create_task(sleeper("early", 2))]
    await asyncio.sleep(0)
    assert clock.sleepers == 2
    clock.advance(3)
    await asyncio.sleep(0)
    assert woke == ["early"]
    clock.advance(2)
    await asyncio.gather(*tasks)
    assert woke == ["early", "late"]


async def test_system_clock_is_a_clock() -> None:
    clock = SystemClock()
    before = clock.monotonic()
    await clock.sleep(0)
    assert clock.monotonic() >= before and clock.now().tzinfo is not None


# -- end to end -------------------------------------------------------------------------------------


def word_file(tmp_path: Path, count: int) -> Path:
    path = tmp_path / "words.csv"
    path.write_text("position,term,type\n" + "".join(f"{i},낱말{i},noun\n" for i in range(1, count + 1)),
                    encoding="utf-8")
    return path


async def test_every_item_completes_against_a_simulator_failing_40_percent_of_calls(tmp_path: Path,
                                                                                    db_url: str) -> None:
    clock = FakeClock()
    events: list[RetryEvent] = []
    hub = EventHub()
    hub.subscribe(RetryEvent, events.append)
    policy = RetryPolicy(RetryConfig(max_attempts=15, max_elapsed=None), clock=clock, rng=random.Random(4),
                         events=hub)
    options = ProcessOptions(input_path=word_file(tmp_path, 40), output=tmp_path / "cards.jsonl", provider="simulated",
                             db_url=db_url, concurrency=8,
                             simulator=SimulatorConfig(server_error_rate=0.3, rate_limit_rate=0.1, seed=11))
    started = time.perf_counter()
    result = await process(options, policy=policy)
    elapsed = time.perf_counter() - started
    assert result.outcome is not None and result.outcome.status is RunStatus.COMPLETED
    assert result.outcome.stats.done == 40 and result.outcome.failures == []
    assert sum(1 for line in (tmp_path / "cards.jsonl").read_text().splitlines() if json.loads(line)) >= 80

    stats = policy.stats
    assert stats.retries > 20 and stats.gave_up == 0 and stats.attempts == stats.retries + 80
    limited = [e for e in events if e.error.category is ErrorCategory.RATE_LIMIT]
    assert limited and all(e.delay >= 1.0 for e in limited), "never earlier than Retry-After: 1"
    assert clock.slept > elapsed, "the waits were virtual"

    ledger = Ledger(open_database(db_url))
    calls = ledger.api_calls(result.outcome.run_id)
    failed = [c for c in calls if c.status == "error"]
    assert len(calls) == stats.attempts and len(failed) == stats.retries
    assert {(c.error_category, c.error_code) for c in failed} == {("external_service", "server_error"),
                                                                  ("rate_limit", "rate_limited")}


async def test_the_runner_builds_its_retry_policy_from_the_environment(tmp_path: Path, db_url: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    simulator = SimulatorConfig(server_error_rate=0.3, seed=5)
    monkeypatch.setenv("RETRY_MAX_ATTEMPTS", "1")
    options = ProcessOptions(input_path=word_file(tmp_path, 20), output=tmp_path / "a.jsonl", provider="simulated",
                             db_url=db_url, simulator=simulator)
    once = await process(options)
    assert once.outcome is not None and once.outcome.failures
    ledger = Ledger(open_database(db_url))
    per_stage = Counter((c.item_id, c.stage) for c in ledger.api_calls(once.outcome.run_id))
    assert set(per_stage.values()) == {1}

    patient = RetryConfig(max_attempts=30, initial_delay=0.0, max_delay=0.0)
    again = await process(ProcessOptions(input_path=options.input_path, output=tmp_path / "b.jsonl",
                                         provider="simulated", db_url=f"sqlite:///{tmp_path / 'b.db'}",
                                         simulator=simulator, retry=patient))
    assert again.outcome is not None and again.outcome.status is RunStatus.COMPLETED


def test_cli_max_attempts_and_a_bad_retry_variable(tmp_path: Path, db_url: str) -> None:
    runner = CliRunner()
    source = word_file(tmp_path, 12)
    result = runner.invoke(app, ["process", str(source), "--provider", "simulated", "--db", db_url, "-o",
                                 str(tmp_path / "o.jsonl"), "--max-attempts", "1", "--sim", "server_error_rate=0.5",
                                 "--sim", "seed=3"])
    assert result.exit_code == 1, result.stdout + result.stderr
    ledger = Ledger(open_database(db_url))
    run = ledger.get_run()
    assert run is not None
    assert set(Counter((c.item_id, c.stage) for c in ledger.api_calls(run.id)).values()) == {1}

    bad = runner.invoke(app, ["process", str(source), "--provider", "simulated", "--db", db_url],
                        env={"RETRY_MAX_ATTEMPTS": "0"})
    assert bad.exit_code == 2 and "RETRY_MAX_ATTEMPTS" in bad.stderr and "Traceback" not in bad.stderr
